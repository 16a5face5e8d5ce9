"""Data-free per-channel moments of every layer's input, propagated through the fx graph.

BatchNorm resets the estimate to the statistics it recorded during training (its output has
mean beta and variance gamma^2), which is what makes the estimate good without data; a
BatchNorm's running mean/var are also its *input's* moments, so the node feeding a BatchNorm
takes them instead of the propagated guess (``MomentEstimate.source`` says
``"batchnorm:<name>"``). Between those, the pure functions of :mod:`dfmpc_fx.numerics`
carry the estimate through activations (Gaussian per channel), layers, LayerNorm, residual
adds, concatenations, scalar affine ops and squeeze-excitation gates. An op the table does not
know makes the estimate unknown (``None``) with a reason (``MomentEstimate.reasons``), and the
layers fed by it fall back to the paper's assumption (zero mean, unit variance).

Layout: moments are per channel (dim 1, conv tensors) or per feature (last dim, the
``(B, T, C)`` sequences of a transformer: LayerNorm and Linear outputs); 2-D tensors are both.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from ..numerics import compensation as cmath
from ..numerics import moments_math as mm
from ..numerics.compensation import ChannelMoments
from .pairs import (
    BATCHNORM_MODULES,
    FLATTEN_FUNCTIONS,
    FLATTEN_METHODS,
    FLATTEN_MODULES,
    HOMOGENEOUS_FUNCTIONS,
    HOMOGENEOUS_METHODS,
    WEIGHTED_MODULES,
)
from .tracing import EXAMPLE_SHAPE_KEY as SHAPE_KEY, is_batchnorm_act, own_forward

__all__ = ["MomentEstimate", "estimate_moments", "propagate_moments", "layer_input_moments"]

_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d,
                         nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d) + FLATTEN_MODULES
# Average pooling keeps each channel's mean; the variance is passed through unchanged, exact for
# a spatially constant channel and an over-estimate otherwise (kept: it is what the committed
# checkpoints' digests were built with, and no spatial correlation is known without data).
# Max pooling raises the mean, by between 0 (a spatially constant channel) and std * E[max of k
# standard normals] (1.03 for a 2x2 window, 1.49 for 3x3, independent elements), and lowers the
# variance; where it lands in between depends on the spatial correlation, unknown without data,
# so it too is passed through (an under-estimate of the mean). Under a size budget the
# recorded-mean calibration of the next BatchNorm (``mean_calibration``) absorbs part of it.

Fn = Callable[[ChannelMoments], ChannelMoments]

#: Activation modules -> moments of a Gaussian channel through them.
_ACTIVATION_MODULES: tuple[tuple[type, Callable[[nn.Module], Fn]], ...] = (
    (nn.ReLU6, lambda mod: mm.relu6_moments),  # before ReLU6's parent Hardtanh
    (nn.ReLU, lambda mod: cmath.relu_moments),
    (nn.Hardtanh, lambda mod: lambda x: mm.hardtanh_moments(x, mod.min_val, mod.max_val)),
    (nn.GELU, lambda mod: lambda x: mm.gelu_moments(x, mod.approximate)),
    (nn.SiLU, lambda mod: mm.silu_moments),
    (nn.Sigmoid, lambda mod: mm.sigmoid_moments),
    (nn.Tanh, lambda mod: mm.tanh_moments),
    (nn.Hardswish, lambda mod: mm.hardswish_moments),
    (nn.Hardsigmoid, lambda mod: mm.hardsigmoid_moments),
    (nn.Mish, lambda mod: mm.mish_moments),
    (nn.ELU, lambda mod: lambda x: mm.elu_moments(x, mod.alpha)),
    (nn.Softplus, lambda mod: lambda x: mm.softplus_moments(x, mod.beta, mod.threshold)),
    (nn.LeakyReLU, lambda mod: lambda x: cmath.leaky_relu_moments(x, mod.negative_slope)),
)


def _arg(node: Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _clamp_fn(node: Node) -> Optional[Fn]:
    lo, hi = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
    if not all(v is None or isinstance(v, numbers.Real) for v in (lo, hi)):
        return None
    return lambda x: mm.clip_moments(x, -math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))


#: Activation functions / tensor methods -> a builder from the node (for its arguments).
_ACTIVATION_FUNCTIONS: dict[Any, Callable[[Node], Optional[Fn]]] = {
    F.relu6: lambda n: mm.relu6_moments,
    F.gelu: lambda n: (lambda x, a=_arg(n, 1, "approximate", "none"): mm.gelu_moments(x, a)),
    F.silu: lambda n: mm.silu_moments,
    torch.sigmoid: lambda n: mm.sigmoid_moments, F.sigmoid: lambda n: mm.sigmoid_moments,
    torch.tanh: lambda n: mm.tanh_moments, F.tanh: lambda n: mm.tanh_moments,
    F.hardswish: lambda n: mm.hardswish_moments,
    F.hardsigmoid: lambda n: mm.hardsigmoid_moments,
    F.hardtanh: lambda n: (lambda x, lo=_arg(n, 1, "min_val", -1.0), hi=_arg(n, 2, "max_val", 1.0): mm.hardtanh_moments(x, lo, hi)),
    F.mish: lambda n: mm.mish_moments,
    F.elu: lambda n: (lambda x, a=_arg(n, 1, "alpha", 1.0): mm.elu_moments(x, a)),
    F.softplus: lambda n: (lambda x, b=_arg(n, 1, "beta", 1.0), t=_arg(n, 2, "threshold", 20.0): mm.softplus_moments(x, b, t)),
    F.leaky_relu: lambda n: (lambda x, s=_arg(n, 1, "negative_slope", 0.01): cmath.leaky_relu_moments(x, float(s))),
    torch.clamp: _clamp_fn, torch.clip: _clamp_fn,
}
_ACTIVATION_METHODS: dict[str, Callable[[Node], Optional[Fn]]] = {
    "sigmoid": lambda n: mm.sigmoid_moments, "sigmoid_": lambda n: mm.sigmoid_moments,
    "tanh": lambda n: mm.tanh_moments, "tanh_": lambda n: mm.tanh_moments,
    "clamp": _clamp_fn, "clamp_": _clamp_fn, "clip": _clamp_fn,
}

_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
_SUB = (operator.sub, operator.isub, torch.sub, "sub", "sub_")
_MUL = (operator.mul, operator.imul, torch.mul, "mul", "mul_")
_DIV = (operator.truediv, operator.itruediv, torch.div, "div", "div_")
_MEAN = (torch.mean, "mean")
#: Ops whose output moments are not a per-channel function of their input's (reasons).
_UNKNOWN_REASONS: dict[Any, str] = {
    torch.matmul: "attention/matmul", operator.matmul: "attention/matmul", torch.bmm: "attention/matmul",
    "matmul": "attention/matmul", "bmm": "attention/matmul", torch.baddbmm: "attention/matmul",
    F.softmax: "softmax", torch.softmax: "softmax", "softmax": "softmax",
    F.scaled_dot_product_attention: "attention/matmul",
    "permute": "permute/transpose moves the channel dim", "transpose": "permute/transpose moves the channel dim",
    torch.transpose: "permute/transpose moves the channel dim", torch.permute: "permute/transpose moves the channel dim",
    F.embedding: "embedding lookup", getattr: "attribute access",
}

CHANNEL, FEATURE = "channel", "feature"  # dim 1 / last dim; None: either (2-D) or a scalar


@dataclass
class MomentEstimate:
    """What :func:`estimate_moments` knows about each node's output.

    ``moments``: node name -> per-channel moments or ``None``; ``reasons``: for each needed
    node whose moments are unknown, why (the op where knowledge was lost); ``source``: how a
    known estimate was obtained (``"propagated"``, ``"input"``, or ``"batchnorm:<name>"`` when
    it is the running statistics of the BatchNorm the node feeds); ``layout``: ``"channel"``
    (dim 1), ``"feature"`` (last dim) or ``None`` (2-D or scalar, either reading holds)."""

    moments: dict[str, Optional[ChannelMoments]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    layout: dict[str, Optional[str]] = field(default_factory=dict)
    #: node name -> the LayerNorm whose output moments the node's mean rests on. Without
    #: recorded statistics a LayerNorm's per-feature output mean is taken as its ``beta`` (the
    #: normalised features as zero mean per feature), which trained transformers violate:
    #: on all-MiniLM-L6-v2 those means are further from the measured ones than zero is, so
    #: ``compress`` does not mean-correct from them by default (the variances still serve).
    assumed: dict[str, str] = field(default_factory=dict)


def _scalar(mean: float, std: float) -> ChannelMoments:
    return ChannelMoments(torch.tensor([float(mean)], dtype=torch.float64), torch.tensor([float(std) ** 2], dtype=torch.float64))


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float64)


def _recording_batchnorm(node: Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> Optional[str]:
    """A BatchNorm (called once, with running stats) that reads ``node``: its statistics are
    node's per-channel moments as measured on the training data."""
    for user in node.users:
        if user.op == "call_module" and user.args and user.args[0] is node:
            mod = modules[str(user.target)]
            if isinstance(mod, BATCHNORM_MODULES) and mod.running_var is not None and calls[str(user.target)] == 1:
                return str(user.target)
    return None


def _feeding_layers(gm: GraphModule, modules: dict[str, nn.Module], calls: dict[str, int]) -> set[Node]:
    """The nodes whose moments some conv/linear input depends on (a BatchNorm output depends
    only on the BatchNorm, a BatchNorm input only on its running stats), so that nothing else
    is computed: neither a classifier's output nor a layer whose only consumers are BatchNorms."""
    needed: set[Node] = set()
    stack = [n.args[0] for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(modules[str(n.target)], WEIGHTED_MODULES)
             and n.args and isinstance(n.args[0], Node)]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node.op == "call_module" and isinstance(modules[str(node.target)], BATCHNORM_MODULES):
            continue
        if _recording_batchnorm(node, modules, calls) is not None:
            continue
        stack.extend(node.all_input_nodes)
    return needed


def _dims(node: Node) -> Optional[tuple[int, ...]]:
    d = _arg(node, 1, "dim", None)
    if isinstance(d, int):
        return (d,)
    if isinstance(d, (tuple, list)) and all(isinstance(i, int) for i in d):
        return tuple(d)
    return None


def _constant(gm: GraphModule, arg: object) -> Optional[torch.Tensor]:
    """The tensor behind a ``get_attr`` node (a parameter or buffer), else None."""
    if not (isinstance(arg, Node) and arg.op == "get_attr"):
        return None
    obj: Any = gm
    for part in str(arg.target).split("."):
        obj = getattr(obj, part, None)
    return obj.detach().to(torch.float64) if isinstance(obj, torch.Tensor) else None


def _per_channel(t: torch.Tensor, m: ChannelMoments, layout: Optional[str]) -> Optional[torch.Tensor]:
    """A constant operand as one value per channel of ``m``: a scalar, ``(C, 1, ..)`` for a
    channel tensor, ``(.., C)`` for a per-feature one; None if it varies along other dims."""
    c = m.mean.numel()
    if t.numel() == 1:
        return t.reshape(1)
    if t.numel() != c:
        return None
    shape = [d for d in t.shape]
    if layout == FEATURE and shape[-1] == c:
        return t.reshape(c)
    if layout == CHANNEL and len(shape) >= 2 and shape[0] == c:  # broadcast (C, 1, 1) against (N, C, H, W)
        return t.reshape(c)
    return None


def _permuted_layout(node: Node, layout: Optional[str]) -> tuple[bool, Optional[str]]:
    """Where a permute moves the channel (dim 1) or feature (last) dim of a 4-D tensor."""
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if layout is None or not all(isinstance(d, int) for d in dims) or len(dims) < 3:
        return False, None
    dims = tuple(d % len(dims) for d in dims)
    src = 1 if layout == CHANNEL else len(dims) - 1
    new = dims.index(src) if src in dims else -1
    if new == 1:
        return True, CHANNEL
    if new == len(dims) - 1:
        return True, FEATURE
    return False, None


_HEADS = "heads:"  # a per-feature tensor split into (heads, head_dim): "heads:<dim of H>,<dim of D>"


def _heads(layout: Optional[str]) -> Optional[tuple[int, int]]:
    if layout is None or not layout.startswith(_HEADS):
        return None
    h, d = layout[len(_HEADS):].split(",")
    return int(h), int(d)


def _shape(node: object) -> Optional[tuple[int, ...]]:
    return node.meta.get(SHAPE_KEY) if isinstance(node, Node) else None


def _head_op(node: Node, x: Optional[ChannelMoments], xl: Optional[str], get: Callable[[object], Optional[ChannelMoments]],
             lay: Callable[[object], Optional[str]]) -> Optional[tuple[Optional[ChannelMoments], Optional[str]]]:
    """Moments through the reshapes and transposes of multi-head attention, and through the
    attention itself, where an example trace recorded the shapes; None: no rule applies.

    A per-feature (last dim) tensor of C features viewed as ``(..., H, D)`` keeps its C feature
    moments (feature ``h * D + d``); transposes move the two dims; merging them back as the last
    dim gives per-feature moments again. ``scaled_dot_product_attention(q, k, v)``: each output
    row is a convex combination of rows of ``v`` (softmax weights), so it is given ``v``'s
    moments. The mean is exact when every token's value has the same mean; the variance of a
    weighted average is at most ``v``'s, so ``v``'s variance is an upper bound (independent of the
    attention pattern, which is not known without data).
    """
    target, method = node.target, node.op == "call_method"
    src = node.args[0] if node.args else None
    if target is F.scaled_dot_product_attention:
        v_arg = _arg(node, 2, "value", None)
        v, vl = get(v_arg), lay(v_arg)
        if v is not None and (_heads(vl) is not None or vl == FEATURE):
            return v, vl
        return None
    in_shape, out_shape = _shape(src), _shape(node)
    if x is None or in_shape is None or out_shape is None:
        return None
    c = x.mean.numel()
    heads = _heads(xl)
    if method and target in ("view", "reshape") or target is torch.reshape:
        if xl == FEATURE and in_shape[-1] == c:
            if out_shape[-1] == c:
                return x, FEATURE
            n = len(out_shape)
            if n >= 2 and out_shape[-2] * out_shape[-1] == c and tuple(out_shape[:-2]) == tuple(in_shape[:-1]):
                return x, f"{_HEADS}{n - 2},{n - 1}"
        elif heads is not None:
            n = len(in_shape)
            if tuple(out_shape) == tuple(in_shape):
                return x, xl
            if heads == (n - 2, n - 1) and tuple(out_shape) == tuple(in_shape[:-2]) + (c,):
                return x, FEATURE
        return None
    if heads is not None and ((method and target == "transpose") or target is torch.transpose):
        dims = [_arg(node, 1, "dim0", None), _arg(node, 2, "dim1", None)]
        if not all(isinstance(d, int) for d in dims):
            return None
        n = len(in_shape)
        i, j = (d % n for d in dims)
        swap = {i: j, j: i}
        return x, f"{_HEADS}{swap.get(heads[0], heads[0])},{swap.get(heads[1], heads[1])}"
    if target is operator.getitem and xl == FEATURE and in_shape[-1] == c and out_shape and out_shape[-1] == c:
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if len(idx) < len(in_shape) and all(isinstance(i, (int, slice)) for i in idx):
            return x, FEATURE  # tokens selected (BERT's pooler reads the first): features unchanged
    return None


_MATMUL_TARGETS = (torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")
_SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax)
#: Ops between a softmax and the matmul that applies it which keep its rows summing to one.
_PROBABILITY_PASS_FUNCTIONS = (F.dropout, torch.dropout)
_PROBABILITY_PASS_METHODS = ("contiguous", "to", "type_as", "float", "half", "bfloat16")


def _is_last_dim(dim: Any, node: Node) -> bool:
    if not isinstance(dim, int):
        return False
    if dim == -1:
        return True
    shape = _shape(node)
    return shape is not None and dim == len(shape) - 1


def _is_attention_weights(node: object, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a softmax over its last dim (through dropout and dtype casts, which
    keep each row a set of weights summing to one)."""
    while isinstance(node, Node):
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), (nn.Dropout, nn.Identity)):
            node = node.args[0]
        elif (node.op == "call_function" and node.target in _PROBABILITY_PASS_FUNCTIONS) or \
                (node.op == "call_method" and node.target in _PROBABILITY_PASS_METHODS):
            node = node.args[0]
        elif node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Softmax):
            return _is_last_dim(modules[str(node.target)].dim, node)
        elif (node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS) or \
                (node.op == "call_method" and node.target == "softmax"):
            return _is_last_dim(_arg(node, 1, "dim", None), node)
        else:
            return False
    return False


def eager_attention_operands(node: Node, modules: dict[str, nn.Module]) -> Optional[tuple[object, object]]:
    """``(weights, values)`` of eager attention, ``softmax(q k^T / s + mask, dim=-1) @ v`` (HF's
    ``attn_implementation="eager"``, timm's non-fused attention): a matmul whose left operand is
    a softmax over its last dim, the dim the matmul sums over. None: not that pattern. The one
    test of the pattern, for the moments rule here and the noise gains of
    :mod:`dfmpc_fx.graph.sensitivity`."""
    if node.op not in ("call_function", "call_method") or node.target not in _MATMUL_TARGETS \
            or len(node.args) < 2 or node.kwargs or not _is_attention_weights(node.args[0], modules):
        return None
    return node.args[0], node.args[1]


def _attention_context(node: Node, modules: dict[str, nn.Module], get: Callable[[object], Optional[ChannelMoments]],
                       lay: Callable[[object], Optional[str]]) -> Optional[tuple[ChannelMoments, Optional[str]]]:
    """Eager attention (:func:`eager_attention_operands`): the same rule as
    ``scaled_dot_product_attention`` (each output row is a convex combination of rows of ``v``,
    so ``v``'s moments, the variance an upper bound), where ``v`` keeps its features in its last
    dim. None: not that pattern."""
    operands = eager_attention_operands(node, modules)
    if operands is None:
        return None
    v_arg = operands[1]
    v, vl = get(v_arg), lay(v_arg)
    if v is None:
        return None
    heads = _heads(vl)
    v_shape = _shape(v_arg)
    if vl == FEATURE and (v_shape is None or len(v_shape) >= 2):
        return v, FEATURE
    if heads is not None and v_shape is not None and heads[1] == len(v_shape) - 1 and heads[0] < len(v_shape) - 2:
        return v, vl  # (..., H, T, D): the token dim is summed over, heads and features stay
    return None


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None


def _compatible(a: ChannelMoments, b: ChannelMoments) -> bool:
    return a.mean.numel() == b.mean.numel() or 1 in (a.mean.numel(), b.mean.numel())


def _join_layout(a: Optional[str], b: Optional[str]) -> tuple[bool, Optional[str]]:
    if a is None or b is None or a == b:
        return True, a or b
    return False, None


def estimate_moments(gm: GraphModule, input_mean: float = 0.0, input_std: float = 1.0) -> MomentEstimate:
    """Estimated moments (float64) of the outputs of the nodes that feed a conv/linear layer,
    directly or through other ops, with the reason wherever they are unknown."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    res = MomentEstimate()
    needed = _feeding_layers(gm, modules, calls)

    def get(arg: object) -> Optional[ChannelMoments]:
        return res.moments.get(arg.name) if isinstance(arg, Node) else None

    def lay(arg: object) -> Optional[str]:
        return res.layout.get(arg.name) if isinstance(arg, Node) else None

    for node in gm.graph.nodes:
        if node not in needed:
            res.moments[node.name] = None
            continue
        src = node.args[0] if node.args else None
        x, xl = get(src), lay(src)
        out: Optional[ChannelMoments] = None
        layout: Optional[str] = xl
        reason: Optional[str] = None
        upstream = res.reasons.get(src.name) if isinstance(src, Node) else None
        target = node.target
        desc = f"{node.op} {target if isinstance(target, str) else getattr(target, '__name__', target)}"
        bn_name = _recording_batchnorm(node, modules, calls)

        if bn_name is not None:
            bn = modules[bn_name]
            out = ChannelMoments(_f64(bn.running_mean), _f64(bn.running_var))
            layout = CHANNEL if isinstance(bn, nn.BatchNorm2d) else None
            res.source[node.name] = f"batchnorm:{bn_name}"
        elif node.op == "placeholder":
            out, layout = _scalar(input_mean, input_std), None
            res.source[node.name] = "input"
        elif node.op == "call_module":
            mod = modules[str(target)]
            desc = f"module {type(mod).__name__} ({target})"
            if isinstance(mod, BATCHNORM_MODULES) and mod.running_var is not None:
                out = cmath.batchnorm_output_moments(_f64(mod.weight) if mod.affine else None,
                                                     _f64(mod.bias) if mod.affine else None,
                                                     _f64(mod.running_var), mod.eps)
                layout = CHANNEL if isinstance(mod, nn.BatchNorm2d) else None
                if is_batchnorm_act(mod):  # BatchNorm fused with its activation (timm BatchNormAct2d)
                    act = mod.act
                    out = (cmath.relu_moments(out) if isinstance(act, nn.ReLU) else
                           cmath.leaky_relu_moments(out, act.negative_slope) if isinstance(act, nn.LeakyReLU) else
                           out if isinstance(act, nn.Identity) else None)
                    if out is None:
                        reason = f"{desc}: fused activation {type(act).__name__} after the BatchNorm"
            elif isinstance(mod, WEIGHTED_MODULES) and own_forward(mod):
                reason = f"{desc}: its own forward transforms the weight or the input"
            elif isinstance(mod, WEIGHTED_MODULES):
                linear = isinstance(mod, nn.Linear)
                size = mod.in_features if linear else mod.in_channels
                if x is None:
                    reason = upstream
                elif not linear and xl == FEATURE:
                    reason = f"{desc}: input moments are per feature (last dim), the conv reads dim 1"
                else:
                    xin = cmath.expand_moments(x, size) if (xl != FEATURE or x.mean.numel() in (1, size)) else None
                    if xin is None:
                        reason = f"{desc}: input has {x.mean.numel()} channels for {size} inputs"
                    else:
                        out = cmath.layer_output_moments(_f64(mod.weight), _f64(mod.bias), xin, getattr(mod, "groups", 1))
                        layout = (FEATURE if xl == FEATURE else None) if linear else CHANNEL
            elif isinstance(mod, nn.LayerNorm) and type(mod).forward is nn.LayerNorm.forward:
                shape = tuple(mod.normalized_shape)
                if len(shape) != 1:
                    reason = f"{desc}: normalises over {len(shape)} dims"
                else:
                    inp = x if (x is not None and xl in (FEATURE, None) and x.mean.numel() == shape[0]) else None
                    out = mm.layernorm_output_moments(_f64(mod.weight), _f64(mod.bias), shape[0], inp)
                    layout = FEATURE
            elif isinstance(mod, nn.PReLU):
                if x is not None:
                    slope = _f64(mod.weight)
                    xin = cmath.expand_moments(x, slope.numel()) if slope.numel() > 1 else x
                    out = cmath.leaky_relu_moments(xin, slope) if xin is not None else None
                    reason = None if out is not None else f"{desc}: {slope.numel()} slopes for {x.mean.numel()} channels"
                else:
                    reason = upstream
            elif isinstance(mod, _PASS_THROUGH_MODULES):
                out, reason = x, upstream
                if isinstance(mod, FLATTEN_MODULES):
                    layout = None
            elif isinstance(mod, (nn.Softmax, nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag)):
                reason = f"{desc}: {'attention/softmax' if not isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) else 'embedding lookup'}"
            else:
                act = next((build(mod) for cls, build in _ACTIVATION_MODULES if isinstance(mod, cls)), None)
                if act is None:
                    reason = f"{desc}: no moments rule"
                elif x is None:
                    reason = upstream
                else:
                    out = act(x)
        elif node.op in ("call_function", "call_method"):
            method = node.op == "call_method"
            act_build = (_ACTIVATION_METHODS.get(target) if method else _ACTIVATION_FUNCTIONS.get(target)) \
                if isinstance(target, str) == method else None
            if act_build is not None:
                consts = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if not isinstance(a, (numbers.Real, str, type(None)))]
                fn = None if consts else act_build(node)
                if fn is None:
                    reason = f"{desc}: non-constant arguments"
                elif x is None:
                    reason = upstream
                else:
                    out = fn(x)
            elif target in ("relu", "relu_") or target in (F.relu, F.relu_, torch.relu, torch.relu_):
                out, reason = (cmath.relu_moments(x), None) if x is not None else (None, upstream)
            elif target is F.prelu:
                reason = f"{desc}: functional PReLU (slopes not known here)"
            elif (head := _head_op(node, x, xl, get, lay)) is not None:
                out, layout = head
            elif (ctx := _attention_context(node, modules, get, lay)) is not None:
                out, layout = ctx
            elif (not method and (target in HOMOGENEOUS_FUNCTIONS or target in FLATTEN_FUNCTIONS)) or \
                    (method and (target in HOMOGENEOUS_METHODS or target in FLATTEN_METHODS)):
                out, reason = x, upstream
                if target in FLATTEN_FUNCTIONS or target in FLATTEN_METHODS:
                    if xl == FEATURE and x is not None:
                        out, reason = None, f"{desc}: reshape of a per-feature (last dim) tensor"
                    layout = None
            elif target in _ADD or target in _SUB or target in _MUL or target in _DIV:
                a_arg, b_arg = node.args[0], _arg(node, 1, "other", None)
                a, b = get(a_arg), get(b_arg)
                na, nb = _number(a_arg), _number(b_arg)
                # A parameter/buffer operand (ConvNeXt's layer scale): one constant per channel.
                ta, tb = _constant(gm, a_arg), _constant(gm, b_arg)
                if tb is not None and a is not None:
                    nb = _per_channel(tb, a, lay(a_arg))
                if ta is not None and b is not None:
                    na = _per_channel(ta, b, lay(b_arg))
                alpha = _number(node.kwargs.get("alpha", 1.0)) if target in (torch.add, torch.sub, "add", "sub", "add_", "sub_") else 1.0
                sub = target in _SUB
                if target in _ADD or sub:
                    if alpha is None:
                        reason = f"{desc}: non-constant alpha"
                    elif a is not None and nb is not None:
                        out, layout = mm.affine_moments(a, 1.0, -nb * alpha if sub else nb * alpha), lay(a_arg)
                    elif b is not None and na is not None:
                        out, layout = mm.affine_moments(b, -alpha if sub else alpha, na), lay(b_arg)
                    elif a is not None and b is not None and alpha is not None and _compatible(a, b):
                        ok, layout = _join_layout(lay(a_arg), lay(b_arg))
                        if ok:
                            bb = mm.affine_moments(b, alpha) if alpha != 1.0 else b
                            out = mm.difference_moments(a, bb) if sub else ChannelMoments(a.mean + bb.mean, a.var + bb.var)
                        else:
                            reason = f"{desc}: operands are per channel and per feature"
                elif target in _MUL:
                    if a is not None and nb is not None:
                        out, layout = mm.affine_moments(a, nb), lay(a_arg)
                    elif b is not None and na is not None:
                        out, layout = mm.affine_moments(b, na), lay(b_arg)
                    elif a is not None and b is not None and _compatible(a, b):
                        ok, layout = _join_layout(lay(a_arg), lay(b_arg))
                        # Squeeze-excitation x * g: the gate, from a global pool, is taken as
                        # independent of the position of x it scales.
                        out = mm.product_moments(a, b) if ok else None
                        reason = None if ok else f"{desc}: operands are per channel and per feature"
                else:  # division: only by a constant
                    if a is not None and nb is not None and bool(torch.all(torch.as_tensor(nb) != 0)):
                        out, layout = mm.affine_moments(a, 1.0 / nb), lay(a_arg)
                    elif a is not None:
                        reason = f"{desc}: division by a tensor"
                if out is None and reason is None:
                    reason = next((res.reasons.get(p.name) for p in (a_arg, b_arg) if isinstance(p, Node) and res.reasons.get(p.name)), None) \
                        or f"{desc}: operands' moments unknown or of different sizes"
            elif target in ("neg",) or target is operator.neg or target is torch.neg:
                out, reason = (mm.affine_moments(x, -1.0), None) if x is not None else (None, upstream)
            elif target in _MEAN:
                dims = _dims(node)
                # Channel tensors: spatial dims (>= 2, or -1 / -1 with -2); sequences: the token dim.
                keep = dims is not None and (
                    (xl == CHANNEL and all(d >= 2 or d == -1 or (d == -2 and -1 in dims) for d in dims))
                    or (xl == FEATURE and all(d in (1, -2) for d in dims)))
                if x is None:
                    reason = upstream
                elif keep:
                    out = x  # a spatial/token mean keeps the mean; variance kept as for pooling
                else:
                    reason = f"{desc}: mean over dims {dims} of a {xl or 'unknown-layout'} tensor"
            elif target in (torch.cat, torch.concat):
                parts_args = node.args[0] if isinstance(node.args[0], (list, tuple)) else []
                parts = [get(p) for p in parts_args]
                dim = _arg(node, 1, "dim", 0)
                layouts = {lay(p) for p in parts_args}
                along = (dim == 1 and FEATURE not in layouts) or (dim == -1 and CHANNEL not in layouts)
                if parts and along and all(p is not None and p.mean.numel() > 1 for p in parts):
                    out = ChannelMoments(torch.cat([p.mean for p in parts]), torch.cat([p.var for p in parts]))
                    layout = CHANNEL if dim == 1 and CHANNEL in layouts else (FEATURE if dim == -1 else None)
                else:
                    reason = next((res.reasons[p.name] for p in parts_args if isinstance(p, Node) and p.name in res.reasons), None) \
                        or f"{desc}: along dim {dim}, or a part of unknown/scalar moments"
            elif target in ("permute",) or target is torch.permute:
                ok, layout = _permuted_layout(node, xl)
                if x is None:
                    reason = upstream
                elif ok:
                    out = x  # e.g. ConvNeXt's (N, C, H, W) <-> (N, H, W, C) around LayerNorm
                else:
                    reason = f"{desc}: permute/transpose moves the channel dim"
            elif target is F.layer_norm:
                shape = _arg(node, 1, "normalized_shape", None)
                shape = (shape,) if isinstance(shape, int) else tuple(shape) if isinstance(shape, (tuple, list)) else None
                w_arg, b_arg = _arg(node, 2, "weight", None), _arg(node, 3, "bias", None)
                w, b = _constant(gm, w_arg), _constant(gm, b_arg)
                if shape is None or len(shape) != 1 or not isinstance(shape[0], int) or \
                        (w_arg is not None and w is None) or (b_arg is not None and b is None):
                    reason = f"{desc}: normalised shape or affine not constant / not 1-D"
                else:
                    inp = x if (x is not None and xl in (FEATURE, None) and x.mean.numel() == shape[0]) else None
                    out = mm.layernorm_output_moments(w, b, shape[0], inp)
                    layout = FEATURE
            elif getattr(target, "__name__", "") == "stochastic_depth" and "torchvision" in getattr(target, "__module__", ""):
                if _arg(node, 3, "training", True) is False:
                    out, reason = x, upstream  # identity in eval mode
                else:
                    reason = f"{desc}: training-mode stochastic depth"
            elif target in _UNKNOWN_REASONS:
                # Keep the first loss of knowledge (e.g. the attention matmul, not the
                # transpose after it); an op that would lose it anyway names itself.
                reason = upstream if (x is None and upstream and "permute" in _UNKNOWN_REASONS[target]) \
                    else f"{desc}: {_UNKNOWN_REASONS[target]}"
            else:
                reason = f"{desc}: no moments rule"
        else:
            reason = f"{desc}: no moments rule"

        if out is not None and bn_name is None:
            if node.op == "call_module" and isinstance(modules.get(str(target)), nn.LayerNorm) or target is F.layer_norm:
                res.assumed[node.name] = str(target) if node.op == "call_module" else node.name
            else:
                origin = next((res.assumed[p.name] for p in node.all_input_nodes if p.name in res.assumed), None)
                if origin is not None:
                    res.assumed[node.name] = origin
        if out is not None:
            res.source.setdefault(node.name, "propagated")
            res.layout[node.name] = layout
        else:
            res.reasons[node.name] = reason or f"{desc}: input moments unknown"
            res.layout[node.name] = None
        res.moments[node.name] = out
    return res


def propagate_moments(gm: GraphModule, input_mean: float = 0.0, input_std: float = 1.0) -> dict[str, Optional[ChannelMoments]]:
    """Estimated moments (float64) of the outputs of the nodes that feed a conv/linear layer,
    directly or through other ops, keyed by node name (other nodes map to ``None``)."""
    return estimate_moments(gm, input_mean, input_std).moments


def layer_input_moments(gm: GraphModule, est: MomentEstimate) -> dict[str, tuple[Optional[ChannelMoments], str]]:
    """For each conv/linear module called once: its input's moments and where they come from
    (``"propagated"``, ``"batchnorm:<name>"``, ``"input"``) or why they are unknown."""
    modules = dict(gm.named_modules())
    out: dict[str, tuple[Optional[ChannelMoments], str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[str(node.target)], WEIGHTED_MODULES) and node.args:
            src = node.args[0]
            name = str(node.target)
            if name in out:
                out[name] = (None, "module called more than once")
                continue
            if not isinstance(src, Node):
                out[name] = (None, "input is not a graph value")
                continue
            m = est.moments.get(src.name)
            out[name] = (m, est.source.get(src.name, "propagated") if m is not None else est.reasons.get(src.name, "unknown"))
    return out
