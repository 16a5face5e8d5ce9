"""Packed low-bit layers: the truly compressed form of a model returned by :func:`dfmpc_fx.compress`.

A ``Quant*`` layer holds a dequantized float weight (it only simulates compression). Its
``Packed*`` counterpart holds the same weight as unsigned integer codes bit-packed into a
``uint8`` buffer, plus the per-channel (or per-tensor) scales and zero points, and dequantizes
inside ``forward``. Nothing is cached: the module's state is the packed bytes plus a few bytes
of bit masks and power-of-two factors (non-persistent buffers derived from the bit width), so a
TorchScript, ``torch.export`` or ONNX file of a packed model is about ``bits x weights / 8``
bytes per layer. Unpacking on every call costs a few elementwise passes over the weights, which
is small next to the convolutions at useful batch sizes (see ``benchmarks/bench_artifact.py``).

Storage layout (dense for every bit width 1..16)
------------------------------------------------
A ``b``-bit code ``u`` (``0 <= u < 2**b``) is split into bit fields whose widths are powers of
two: the binary decomposition of ``b`` greatest first, with 16 = 8 + 8 (2 -> [2], 3 -> [2, 1],
4 -> [4], 6 -> [4, 2], 8 -> [8]). Each field width ``f`` is a *plane*: ``8 // f`` fields per byte,
code ``i`` of the layer (row-major order of the weight) in byte ``i // (8 // f)`` at bit
``f * (i % (8 // f))`` (little-endian within the byte). The planes follow each other in one
``uint8`` buffer ``packed``; the plane holding bits ``[o, o + f)`` of the code comes first for the
lowest ``o``. So four 2-bit codes share a byte, two 4-bit codes share a byte, and 3-bit codes
are stored densely (a 2-bit plane and a 1-bit plane: 3/8 byte per weight, no nibble padding).
The only padding is at the end of each plane (less than one byte per plane).

Dequantization is ``w = (u - weight_zero_point) * weight_scale`` broadcast over dim 0 (times
``weight_input_scale`` along dim 1 where the layer has per-input-channel factors), where
``weight_zero_point`` is relative to the *unsigned* code (symmetric codes ``c`` are stored as
``u = c + 2**(b-1) - 1``); a grouped layer (``group_size > 0``) stores scales of shape
``(C, G)`` and gathers column ``j // group_size`` of them for weight column ``j``. Unpacking uses only ``bitwise_and`` on ``uint8``, a cast to float and
multiplication by powers of two (no shifts), which TorchScript, ``torch.export`` and ONNX
(``BitwiseAnd`` on uint8) all support; every step is exact, so the packed layer computes
bit-for-bit the same weight as the fake-quant layer and therefore the same outputs.
"""

import copy
import math
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule

from ..errors import PackError
from ..numerics.quant import column_view, expand_groups, group_count
from ..numerics.packing import _plane_tables, _unpack, pack_codes, packed_nbytes, plane_layout, unpack_codes
from ..graph.tracing import own_forward
from ..transform.modules import QuantConv1d, QuantConv2d, QuantLinear, _QuantMixin, is_quant_module

__all__ = [
    "PackedConv1d",
    "PackedConv2d",
    "PackedLinear",
    "PACKED_MODULES",
    "PackError",
    "pack_codes",
    "unpack_codes",
    "plane_layout",
    "packed_nbytes",
    "pack_module",
    "unpack_module",
    "pack_model",
    "unpack_model",
    "is_packed",
]


# --- modules ---------------------------------------------------------------------------------
class _PackedBase(nn.Module):
    """State: ``packed`` (uint8), ``weight_scale``, ``weight_zero_point`` (unsigned-code zero
    point, shape (C,) or (1,); grouped: scale (C, G), zero point (C, G) or (1,)), ``bias``;
    attributes ``w_bits``, ``role``, ``scheme``, ``group_size`` (0: not grouped)."""

    __jit_unused_properties__ = ["weight"]

    w_bits: int
    role: str
    scheme: str
    weight_shape: List[int]
    numel: int
    plane_nbytes: List[int]
    plane_fields: List[int]
    zero_point_numel: int
    weight_requires_grad: bool
    group_size: int

    def _init_packed(self, weight_shape: List[int], bits: int, role: str, scheme: str, packed: Tensor,
                     scale: Tensor, zero_point: Tensor, bias: Optional[Tensor], requires_grad: bool,
                     compute_dtype: Optional[torch.dtype] = None, input_scale: Optional[Tensor] = None) -> None:
        self.w_bits = int(bits)
        self.role = str(role)
        self.scheme = str(scheme)
        self.group_size = 0
        self.weight_shape = [int(s) for s in weight_shape]
        self.numel = int(math.prod(self.weight_shape))
        self.plane_nbytes, self.plane_fields, masks, factors = _plane_tables(self.w_bits, self.numel)
        if packed.dtype != torch.uint8 or packed.numel() != sum(self.plane_nbytes):
            raise PackError(f"packed buffer must be uint8 of {sum(self.plane_nbytes)} bytes, got {packed.dtype} {packed.numel()}")
        self.register_buffer("packed", packed.detach().clone())
        self.register_buffer("weight_scale", scale.detach().clone())
        self.register_buffer("weight_zero_point", zero_point.detach().clone())
        if input_scale is not None:  # per-input-channel factors along dim 1 (DFMPCConfig.input_scales)
            self.register_buffer("weight_input_scale", input_scale.detach().clone())
        # per-field bit masks and power-of-two factors (a few bytes; derived from w_bits, so not in
        # the state dict, but saved with TorchScript and torch.export artifacts)
        self.register_buffer("plane_mask", torch.tensor(masks, dtype=torch.uint8, device=packed.device), persistent=False)
        # the weight is rebuilt in the float layer's dtype; scales may be stored narrower (float16)
        self.register_buffer("plane_factor", torch.tensor(factors, dtype=compute_dtype or scale.dtype,
                                                          device=packed.device), persistent=False)
        self.weight_requires_grad = bool(requires_grad)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
        else:
            self.register_parameter("bias", None)

    @torch.jit.unused
    def __getstate__(self):
        # pickle the set of non-persistent buffer names as a sorted list: a set pickles in string
        # hash order, which changes between processes, and dfmpc_fx.save promises the same bytes
        state = super().__getstate__()
        state["_non_persistent_buffers_set"] = sorted(state.get("_non_persistent_buffers_set", ()))
        return state

    @torch.jit.unused
    def __setstate__(self, state):
        state = dict(state)
        state["_non_persistent_buffers_set"] = set(state.get("_non_persistent_buffers_set", ()))
        state.setdefault("group_size", 0)  # saved before grouped scales existed
        super().__setstate__(state)

    def dequantize_weight(self) -> Tensor:
        """The float weight, bit-identical to the fake-quant layer's."""
        codes = _unpack(self.packed, self.plane_nbytes, self.plane_fields, self.plane_mask, self.plane_factor,
                        self.numel)
        w = codes.reshape([self.weight_shape[0], -1])
        if self.group_size > 0:
            # group j // group_size of each row: a gather, no padded codes for a short last group
            idx = torch.div(torch.arange(w.shape[1], device=w.device), self.group_size, rounding_mode="floor")
            zp = self.weight_zero_point.to(w.dtype)
            zp = zp.index_select(1, idx) if zp.dim() == 2 else zp.unsqueeze(1)
            w = (w - zp) * self.weight_scale.to(w.dtype).index_select(1, idx)
        else:
            w = (w - self.weight_zero_point.to(w.dtype).unsqueeze(1)) * self.weight_scale.to(w.dtype).unsqueeze(1)
        w = w.reshape(self.weight_shape)
        if hasattr(self, "weight_input_scale"):  # resolved when scripting: layers without factors skip it
            shape = [1, -1]
            for _ in range(len(self.weight_shape) - 2):
                shape.append(1)
            w = w * self.weight_input_scale.to(w.dtype).reshape(shape)
        return w

    @property
    def weight(self) -> Tensor:  # read-only convenience for Python code (not scripted)
        return self.dequantize_weight()

    def unsigned_codes(self) -> Tensor:
        """The stored codes as int64 in the weight's shape (0 .. 2**w_bits - 1)."""
        return unpack_codes(self.packed, self.w_bits, self.numel).reshape(self.weight_shape)

    def quant_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size > 0 else ""
        return f"w_bits={self.w_bits}, role={self.role}, scheme={self.scheme}{g}, packed_bytes={self.packed.numel()}"


class _PackedConvNd(_PackedBase):
    _reversed_padding_repeated_twice: List[int]

    def _init_conv(self, layer: nn.Module) -> None:
        self.in_channels = int(layer.in_channels)
        self.out_channels = int(layer.out_channels)
        self.kernel_size = tuple(layer.kernel_size)
        self.stride = tuple(layer.stride)
        self.padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
        self.dilation = tuple(layer.dilation)
        self.groups = int(layer.groups)
        self.padding_mode = str(layer.padding_mode)
        self._reversed_padding_repeated_twice = [int(p) for p in layer._reversed_padding_repeated_twice]

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}")
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + ", " + self.quant_repr()


class PackedConv1d(_PackedConvNd):
    """Packed :class:`~dfmpc_fx.QuantConv1d`."""

    def forward(self, input: Tensor) -> Tensor:
        weight = self.dequantize_weight()
        if self.padding_mode != "zeros":
            return F.conv1d(F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode),
                            weight, self.bias, self.stride, [0], self.dilation, self.groups)
        return F.conv1d(input, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PackedConv2d(_PackedConvNd):
    """Packed :class:`~dfmpc_fx.QuantConv2d`."""

    def forward(self, input: Tensor) -> Tensor:
        weight = self.dequantize_weight()
        if self.padding_mode != "zeros":
            return F.conv2d(F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode),
                            weight, self.bias, self.stride, [0, 0], self.dilation, self.groups)
        return F.conv2d(input, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PackedLinear(_PackedBase):
    """Packed :class:`~dfmpc_fx.QuantLinear`."""

    def _init_linear(self, layer: nn.Module) -> None:
        self.in_features = int(layer.in_features)
        self.out_features = int(layer.out_features)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.dequantize_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + self.quant_repr()


PACKED_MODULES: dict[type, type] = {QuantConv1d: PackedConv1d, QuantConv2d: PackedConv2d, QuantLinear: PackedLinear}
_QUANT_OF: dict[type, type] = {v: k for k, v in PACKED_MODULES.items()}


class _PackedOwnForward(_PackedBase):
    """Base of the packed form of a conv/linear subclass with its own ``forward`` (timm's
    Conv2dSame, ScaledStdConv2d, a user's TF-'same' conv).

    ``compress`` keeps such a layer's class (its forward is what the model computes) and only
    replaces its weight; packing does the same one step further: the packed class is made per
    user class, ``Packed<Name>(_PackedOwnForward, <user class>)``, so the user's ``forward`` runs
    unchanged and reads ``self.weight``, which is here the property that dequantizes the packed
    codes on every call (bit-identical to the fake-quant weight). Every other parameter,
    buffer and attribute of the layer stays. The class is created on demand (cached per user
    class); it pickles as the user's class plus this state (``__reduce_ex__``), so
    ``dfmpc_fx.save``/``load`` need the user's class importable, as for any pickled module.
    The ``weight`` property is compiled by TorchScript (not unused as in ``Packed*``) because the
    user's forward reads it."""

    __jit_unused_properties__: List[str] = []
    _user_class: type = nn.Module

    @torch.jit.unused
    def __reduce_ex__(self, protocol):
        return (_new_packed_own_forward, (self._user_class,), self.__getstate__())


_OWN_FORWARD_CLASSES: dict[type, type] = {}


def packed_class_for(cls: type) -> type:
    """The packed class of the conv/linear subclass ``cls`` (created once per class)."""
    packed = _OWN_FORWARD_CLASSES.get(cls)
    if packed is None:
        packed = type(f"Packed{cls.__name__}", (_PackedOwnForward, cls),
                      {"_user_class": cls, "__module__": __name__, "__doc__": f"Packed form of {cls.__qualname__} "
                       "(its own forward; the weight is dequantized from packed codes on access)."})
        _OWN_FORWARD_CLASSES[cls] = packed
    return packed


def _new_packed_own_forward(cls: type) -> nn.Module:
    """Unpickling: an empty instance of ``cls``'s packed class (the state follows)."""
    packed = packed_class_for(cls)
    return packed.__new__(packed)


#: Attributes that only the packed form has (removed again by unpacking).
_PACKED_ONLY = ("weight_shape", "numel", "plane_nbytes", "plane_fields", "zero_point_numel", "weight_requires_grad")


def _is_packable(mod: nn.Module) -> bool:
    """A ``Quant*`` layer, or a conv/linear subclass with its own forward that ``compress``
    quantized keeping its class (not yet packed)."""
    if type(mod) in PACKED_MODULES:
        return True
    return is_quant_module(mod) and own_forward(mod) and not isinstance(mod, _PackedBase)


def _is_packed_module(mod: nn.Module) -> bool:
    return type(mod) in _QUANT_OF or isinstance(mod, _PackedOwnForward)


def _own_forward_shell(layer: nn.Module) -> nn.Module:
    """An instance of ``layer``'s packed class holding a copy of its state without the weight
    (other parameters and buffers cloned, submodules deep-copied, attributes shared)."""
    cls = packed_class_for(type(layer))
    new = cls.__new__(cls)
    state = dict(vars(layer))
    state["_parameters"] = {k: None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                            for k, p in layer._parameters.items() if k != "weight"}
    state["_buffers"] = {k: None if b is None else b.detach().clone() for k, b in layer._buffers.items()}
    state["_modules"] = {k: None if m is None else copy.deepcopy(m) for k, m in layer._modules.items()}
    state["_non_persistent_buffers_set"] = set(layer._non_persistent_buffers_set)
    for key, value in list(state.items()):
        if isinstance(value, dict) and key.startswith("_") and key.endswith("hooks"):
            state[key] = copy.copy(value)
    new.__dict__.update(state)
    return new


def _code_offset(scheme: str, bits: int) -> int:
    """Added to the signed codes of a scheme to make them unsigned ``0 .. 2**bits - 1``."""
    return 2 ** (bits - 1) - 1 if scheme in ("symmetric", "ternary") else 0


def _as_compact(t: Tensor) -> Tensor:
    """A zero-point vector whose entries are all equal becomes shape (1,) (same broadcast): the
    symmetric schemes' zero points are all ``2**(b-1) - 1`` and need not cost 4 bytes a channel."""
    flat = t.reshape(-1)
    if flat.numel() > 1 and bool((flat == flat[0]).all()):
        return flat[:1].clone()
    return flat.clone()


def pack_module(layer: nn.Module, name: str = "layer") -> nn.Module:
    """The ``Packed*`` module for a ``Quant*`` ``layer`` (for a quantized conv/linear subclass
    with its own forward: its packed class, see :class:`_PackedOwnForward`); raises
    :class:`PackError` if not exact."""
    cls = PACKED_MODULES.get(type(layer))
    if cls is None and not _is_packable(layer):
        raise PackError(f"{name}: {type(layer).__name__} is not a QuantConv1d/QuantConv2d/QuantLinear "
                        "or a quantized conv/linear subclass with its own forward")
    bits, scheme = int(layer.w_bits), str(layer.scheme)
    weight = layer.weight.detach()
    if not torch.is_floating_point(weight) or weight.dtype not in (torch.float32, torch.float64):
        raise PackError(f"{name}: packing needs a float32 or float64 weight, got {weight.dtype}")
    scale = layer.weight_scale.detach().to(weight.dtype).reshape(-1)
    zero_point = layer.weight_zero_point.detach().to(weight.dtype).reshape(-1)
    c_out = weight.shape[0]
    factors = getattr(layer, "weight_input_scale", None)
    on_grid = weight  # what the codes times the scales give (before the per-input-channel factors)
    if isinstance(factors, torch.Tensor):
        if factors.numel() != weight.shape[1]:
            raise PackError(f"{name}: weight_input_scale must have {weight.shape[1]} entries (one per input channel)")
        on_grid = weight / column_view(factors.detach().to(weight.dtype), weight.dim())
    else:
        factors = None
    group_size = getattr(layer, "group_size", None)
    if group_size is not None:
        k = weight[0].numel()
        n_scales = c_out * group_count(k, group_size)
        if scale.numel() != n_scales or zero_point.numel() != n_scales:
            raise PackError(f"{name}: grouped weight_scale/weight_zero_point must have {n_scales} entries "
                            f"({c_out} channels x ceil({k}/{group_size}) groups)")
        scale, zero_point = scale.reshape(c_out, -1), zero_point.reshape(c_out, -1)
        rows = on_grid.reshape(c_out, -1)
        signed = torch.round(rows / expand_groups(scale, k, group_size) + expand_groups(zero_point, k, group_size))
        signed = signed.reshape(weight.shape)
    else:
        if scale.numel() not in (1, c_out) or zero_point.numel() not in (1, c_out):
            raise PackError(f"{name}: weight_scale/weight_zero_point must have 1 or {c_out} entries")
        shape = (-1,) + (1,) * (weight.dim() - 1)
        signed = torch.round(on_grid / scale.view(shape) + zero_point.view(shape))
    offset = _code_offset(scheme, bits)
    unsigned = signed + offset
    lo, hi = float(unsigned.min()), float(unsigned.max())
    if lo < 0 or hi > 2**bits - 1:
        raise PackError(f"{name}: codes span [{lo:g}, {hi:g}], outside the {bits}-bit range [0, {2**bits - 1}] "
                        f"of scheme {scheme!r}")
    packed = pack_codes(unsigned.to(torch.int64), bits)
    if cls is None:
        new = _own_forward_shell(layer)
    else:
        new = cls()
        if isinstance(layer, nn.Linear):
            new._init_linear(layer)
        else:
            new._init_conv(layer)
    zp_stored = _as_compact(zero_point + offset).to(layer.weight_zero_point.dtype)
    if group_size is not None and zp_stored.numel() > 1:
        zp_stored = zp_stored.reshape(scale.shape)
    stored_scale = scale.to(layer.weight_scale.dtype)  # exact: scale came from that dtype
    new._init_packed(list(weight.shape), bits, getattr(layer, "role", "default"), scheme, packed, stored_scale,
                     zp_stored, layer.bias, layer.weight.requires_grad, compute_dtype=weight.dtype, input_scale=factors)
    new.zero_point_numel = int(zero_point.numel())
    new.group_size = 0 if group_size is None else int(group_size)
    new.train(layer.training)
    rebuilt = new.dequantize_weight()
    if not torch.equal(rebuilt, weight):
        dev = float((rebuilt - weight).abs().max())
        raise PackError(
            f"{name}: the weight is not on its {bits}-bit quantization grid (max deviation {dev:.3g} after packing): "
            "was it modified (e.g. fine-tuned) after dfmpc_fx.compress? Re-run compress on the float model"
        )
    return new


def unpack_module(layer: nn.Module) -> nn.Module:
    """The ``Quant*`` module (fake-quant weight) for a ``Packed*`` ``layer``; exact inverse of
    :func:`pack_module`."""
    from ..numerics.quant import QuantizedWeight

    cls = _QUANT_OF.get(type(layer))
    if cls is None and not isinstance(layer, _PackedOwnForward):
        raise PackError(f"{type(layer).__name__} is not a packed module")
    weight = layer.dequantize_weight().detach()
    offset = _code_offset(layer.scheme, layer.w_bits)
    scale = layer.weight_scale.detach()
    zp = layer.weight_zero_point.detach() - offset
    if zp.numel() != layer.zero_point_numel:  # the packed form stores equal zero points once
        zp = zp.reshape(-1).expand(layer.zero_point_numel).clone()
    group_size = int(getattr(layer, "group_size", 0)) or None
    if group_size is not None:
        zp = zp.reshape(scale.shape)
    factors = getattr(layer, "weight_input_scale", None)
    qw = QuantizedWeight(codes=torch.empty(0), scale=scale, zero_point=zp, bits=layer.w_bits, scheme=layer.scheme,
                         group_size=group_size, input_scale=factors.detach() if isinstance(factors, Tensor) else None)
    has_bias = layer.bias is not None
    grad = layer.weight_requires_grad
    if cls is None:  # a subclass with its own forward: back to the user's class
        user = layer._user_class
        new = user.__new__(user)
        state = dict(vars(layer))
        for key in _PACKED_ONLY:
            state.pop(key, None)
        state["_buffers"] = {k: b for k, b in layer._buffers.items()
                             if k not in ("packed", "plane_mask", "plane_factor", "weight_scale", "weight_zero_point",
                                          "weight_input_scale")}
        state["_non_persistent_buffers_set"] = set(layer._non_persistent_buffers_set) - {"plane_mask", "plane_factor"}
        state["_parameters"] = dict(layer._parameters)
        new.__dict__.update(state)
        new = copy.deepcopy(new)
        new._parameters = {"weight": nn.Parameter(weight.clone(), requires_grad=grad),
                           **{k: p for k, p in new._parameters.items() if k != "weight"}}
        _QuantMixin._set_quant(new, qw, layer.role)  # type: ignore[arg-type]
        new.train(layer.training)
        return new
    if cls is QuantLinear:
        new = cls(layer.in_features, layer.out_features, bias=has_bias, device="meta")
    else:
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                  dilation=layer.dilation, groups=layer.groups, bias=has_bias, padding_mode=layer.padding_mode,
                  device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=grad)
    new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=grad) if has_bias else None
    new._set_quant(qw, layer.role)
    new.train(layer.training)
    return new


def is_packed(model: nn.Module) -> bool:
    """Whether ``model`` contains packed layers."""
    return any(_is_packed_module(m) for m in model.modules())


def _swap(model: nn.Module, convert, select) -> nn.Module:
    """A copy of ``model`` whose modules for which ``select(module)`` holds are replaced by
    ``convert(module)``; the replaced modules' tensors are never copied (deepcopy memo)."""
    memo: dict[int, object] = {}
    found = False
    for name, mod in model.named_modules():
        if select(mod) and id(mod) not in memo:
            memo[id(mod)] = convert(mod, name)
            found = True
    if not found:
        return copy.deepcopy(model)
    return copy.deepcopy(model, memo)


def pack_model(qmodel: nn.Module) -> Union[GraphModule, nn.Module]:
    """A copy of ``qmodel`` with every ``Quant*`` module replaced by its ``Packed*`` counterpart
    (and every quantized conv/linear subclass with its own forward by its packed class).

    ``qmodel`` is not modified; the graph, module names, other modules and ``meta`` (the
    compression report) are kept. Outputs are identical to ``qmodel``'s (bit for bit: the
    dequantized weights are equal). Raises :class:`PackError` if a layer's weight is not on its
    quantization grid. A model that is already packed is returned as a copy.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"pack_model expects an nn.Module, got {type(qmodel).__name__}")
    return _swap(qmodel, lambda m, n: pack_module(m, n), _is_packable)


def unpack_model(model: nn.Module) -> Union[GraphModule, nn.Module]:
    """Inverse of :func:`pack_model`: ``Packed*`` modules back to ``Quant*`` (exact)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpack_model expects an nn.Module, got {type(model).__name__}")
    return _swap(model, lambda m, n: unpack_module(m), _is_packed_module)
