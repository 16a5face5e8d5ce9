"""Fake-quant layers: plain subclasses of the float layers that hold dequantized weights.

Their ``forward`` is the parent's, so the compressed model runs as fast as the float one and
scripts to TorchScript without this package; the bit width and role show in ``print(model)``,
and the per-channel scales and zero points travel as buffers (enough to rebuild integer codes).
"""
import math
import copy
from typing import Optional

import torch
from torch import nn

from ..graph.tracing import own_forward
from ..numerics.quant import QuantizedWeight

__all__ = ["QuantConv1d", "QuantConv2d", "QuantLinear", "QUANT_MODULES", "to_quant_module", "quantized_layer_bytes",
           "quantized_layer_bits", "is_quant_module"]


class _QuantMixin:
    """Adds ``w_bits``, ``role``, ``scheme`` attributes and scale/zero-point buffers."""

    def _set_quant(self, qw: QuantizedWeight, role: str) -> None:
        self.w_bits = int(qw.bits)
        self.role = role
        self.scheme = qw.scheme
        # input weights per scale (scales of shape (C_out, G)); None: per channel / per tensor
        self.group_size = None if qw.group_size is None else int(qw.group_size)
        self.register_buffer("weight_scale", qw.scale.detach().clone())  # type: ignore[attr-defined]
        self.register_buffer("weight_zero_point", qw.zero_point.detach().clone())  # type: ignore[attr-defined]
        if qw.input_scale is not None:  # per-input-channel factors (DFMPCConfig.input_scales)
            self.register_buffer("weight_input_scale", qw.input_scale.detach().clone())  # type: ignore[attr-defined]

    def quant_repr(self) -> str:
        s = f"w_bits={self.w_bits}, role={self.role}, scheme={self.scheme}"
        return s if getattr(self, "group_size", None) is None else s + f", group_size={self.group_size}"


class QuantConv1d(_QuantMixin, nn.Conv1d):
    def extra_repr(self) -> str:
        return nn.Conv1d.extra_repr(self) + ", " + self.quant_repr()


class QuantConv2d(_QuantMixin, nn.Conv2d):
    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + ", " + self.quant_repr()


class QuantLinear(_QuantMixin, nn.Linear):
    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + ", " + self.quant_repr()


QUANT_MODULES: dict[type, type] = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def is_quant_module(mod: nn.Module) -> bool:
    """A layer ``compress`` quantized: a ``Quant*`` module, or a layer subclass with its own
    ``forward`` that kept its class and got the same ``w_bits``/scale attributes."""
    return isinstance(mod, _QuantMixin) or (hasattr(mod, "w_bits") and "weight_scale" in mod._buffers)


def _quantized_subclass_copy(
    layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor], qw: QuantizedWeight, role: str
) -> nn.Module:
    """``layer`` (a subclass with its own ``forward``) copied with only its weight and bias
    replaced: its class, and so its forward (TF 'same' padding, weight standardization, ...),
    stay, and it pickles wherever the user's class imports. Other parameters are cloned."""
    new = type(layer).__new__(type(layer))
    new.__dict__.update(vars(layer))
    new._parameters = dict(layer._parameters)
    new._buffers = {k: None if b is None else b.detach().clone() for k, b in layer._buffers.items()}
    new._modules = dict(layer._modules)
    new._non_persistent_buffers_set = set(layer._non_persistent_buffers_set)
    grad = layer.weight.requires_grad
    for key, p in layer._parameters.items():
        if p is not None and key not in ("weight", "bias"):
            new._parameters[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    new._modules = {k: None if m is None else copy.deepcopy(m) for k, m in layer._modules.items()}
    new._parameters["weight"] = nn.Parameter(weight.detach(), requires_grad=grad)
    new._parameters["bias"] = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=grad)
    _QuantMixin._set_quant(new, qw, role)  # type: ignore[arg-type]
    new.train(layer.training)
    return new


def to_quant_module(
    layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor], qw: QuantizedWeight, role: str
) -> nn.Module:
    """A new Quant* module with ``layer``'s hyper-parameters, ``weight`` and ``bias``.

    A subclass that overrides ``forward`` keeps its class instead (a plain Quant* module would
    run the parent's forward: wrong outputs or a crash)."""
    if own_forward(layer):
        return _quantized_subclass_copy(layer, weight, bias, qw, role)
    cls = next(q for f, q in QUANT_MODULES.items() if type(layer) is f or isinstance(layer, f))
    has_bias = bias is not None
    # Built without the layer's __init__ (which would allocate and initialise weights only to
    # throw them away; 0.1-0.5 ms a layer): a bare Module plus the layer's hyper-parameters
    # (every plain attribute such as stride, padding, groups, in_features), but none of its
    # parameters, buffers, submodules or hooks.
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in vars(layer).items():
        if key not in vars(new):
            vars(new)[key] = value
    grad = layer.weight.requires_grad
    new.weight = nn.Parameter(weight.detach(), requires_grad=grad)  # callers pass a fresh tensor
    if has_bias:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=grad)
    else:
        new.register_parameter("bias", None)
    new._set_quant(qw, role)
    new.train(layer.training)
    return new


def _layer_counts(module: nn.Module) -> tuple[int, int, int]:
    """(bits, weights, bits of the stored scales plus varying zero points and input factors) of
    a Quant* or Packed* module; scales count at their stored width (float32, or float16)."""
    numel = int(module.numel) if hasattr(module, "numel") and isinstance(module.numel, int) else module.weight.numel()
    scale = module.weight_scale
    params = scale.numel() * scale.element_size() * 8
    if str(module.scheme) in ("asymmetric", "dorefa"):
        zp = module.weight_zero_point
        params += zp.numel() * zp.element_size() * 8
    factors = getattr(module, "weight_input_scale", None)
    if isinstance(factors, torch.Tensor):
        params += factors.numel() * factors.element_size() * 8
    return int(module.w_bits), numel, params


def quantized_layer_bytes(module: nn.Module) -> int:
    """Theoretical bytes of one quantized layer's weight: ``ceil(bits * numel / 8)`` plus the
    stored scales (4 bytes each in float32, 2 in float16) and, for schemes with a varying zero
    point (asymmetric, dorefa), the zero points at the same width, and the per-input-channel
    factors where the layer has them (``weight_input_scale``). Counts the buffers the module
    holds (shape (C,), (1,) or (C, G)), so grouped and per-channel layers are sized alike; bias
    is not included. Accepts Quant* and Packed* modules (a packed layer's ``packed`` buffer is
    this codes term, up to per-plane padding)."""
    bits, numel, param_bits = _layer_counts(module)
    return math.ceil(bits * numel / 8) + math.ceil(param_bits / 8)


def quantized_layer_bits(module: nn.Module) -> int:
    """The same size in bits, without rounding the codes up to whole bytes (what a budget in
    bits per weight averages)."""
    bits, numel, param_bits = _layer_counts(module)
    return bits * numel + param_bits
