"""Data-free per-channel moments of every layer's input, propagated through the fx graph.

BatchNorm resets the estimate to the statistics it recorded during training (its output has
mean beta and variance gamma^2), which is what makes the estimate good without data; between
BatchNorms the pure functions of :mod:`dfmpc_fx.numerics.compensation` carry it through activations,
layers and residual adds. An op the table does not know makes the estimate unknown (``None``),
and the layers fed by it fall back to the paper's assumption (zero mean, unit variance).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..numerics import compensation as cmath
from ..numerics.compensation import ChannelMoments
from .pairs import (
    BATCHNORM_MODULES,
    FLATTEN_FUNCTIONS,
    FLATTEN_METHODS,
    FLATTEN_MODULES,
    HOMOGENEOUS_FUNCTIONS,
    HOMOGENEOUS_METHODS,
    HOMOGENEOUS_MODULES,
    WEIGHTED_MODULES,
)
from .tracing import is_batchnorm_act, own_forward

_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d,
                         nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d) + FLATTEN_MODULES
_RELU_LIKE = (nn.ReLU, nn.ReLU6)


def _scalar(mean: float, std: float) -> ChannelMoments:
    return ChannelMoments(torch.tensor([float(mean)], dtype=torch.float64), torch.tensor([float(std) ** 2], dtype=torch.float64))


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float64)


def _feeding_layers(gm: GraphModule, modules: dict[str, nn.Module]) -> set[Node]:
    """The nodes whose moments some conv/linear input depends on (a BatchNorm output depends
    only on the BatchNorm), so that nothing else is computed: neither a classifier's output nor
    a layer whose only consumers are BatchNorms."""
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
        stack.extend(node.all_input_nodes)
    return needed


def propagate_moments(gm: GraphModule, input_mean: float = 0.0, input_std: float = 1.0) -> dict[str, Optional[ChannelMoments]]:
    """Estimated moments (float64) of the outputs of the nodes that feed a conv/linear layer,
    directly or through other ops, keyed by node name (other nodes map to ``None``)."""
    modules = dict(gm.named_modules())
    est: dict[str, Optional[ChannelMoments]] = {}
    needed = _feeding_layers(gm, modules)

    def get(arg: object) -> Optional[ChannelMoments]:
        return est.get(arg.name) if isinstance(arg, Node) else None

    for node in gm.graph.nodes:
        out: Optional[ChannelMoments] = None
        if node not in needed:
            est[node.name] = None
            continue
        x = get(node.args[0]) if node.args else None
        if node.op == "placeholder":
            out = _scalar(input_mean, input_std)
        elif node.op == "call_module":
            mod = modules[str(node.target)]
            if isinstance(mod, BATCHNORM_MODULES) and mod.running_var is not None:
                out = cmath.batchnorm_output_moments(_f64(mod.weight) if mod.affine else None,
                                                     _f64(mod.bias) if mod.affine else None,
                                                     _f64(mod.running_var), mod.eps)
                if is_batchnorm_act(mod):  # BatchNorm fused with its activation
                    act = mod.act
                    out = (cmath.relu_moments(out) if isinstance(act, nn.ReLU) else
                           cmath.leaky_relu_moments(out, act.negative_slope) if isinstance(act, nn.LeakyReLU) else
                           out if isinstance(act, nn.Identity) else None)
            elif isinstance(mod, WEIGHTED_MODULES) and own_forward(mod):
                out = None  # its forward transforms the weight or the input: unknown moments
            elif isinstance(mod, WEIGHTED_MODULES) and x is not None:
                size = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
                xin = cmath.expand_moments(x, size)
                if xin is not None:
                    out = cmath.layer_output_moments(_f64(mod.weight), _f64(mod.bias), xin,
                                                     getattr(mod, "groups", 1))
            elif isinstance(mod, _RELU_LIKE) and x is not None:
                out = cmath.relu_moments(x)
            elif isinstance(mod, nn.LeakyReLU) and x is not None:
                out = cmath.leaky_relu_moments(x, mod.negative_slope)
            elif isinstance(mod, nn.PReLU) and x is not None:
                slope = _f64(mod.weight)
                xin = cmath.expand_moments(x, slope.numel()) if slope.numel() > 1 else x
                out = cmath.leaky_relu_moments(xin, slope) if xin is not None else None
            elif isinstance(mod, _PASS_THROUGH_MODULES):
                out = x
        elif node.op in ("call_function", "call_method"):
            target = node.target
            if target in ("relu", "relu_") or (node.op == "call_function" and target in HOMOGENEOUS_FUNCTIONS and "relu" in getattr(target, "__name__", "")):
                out = cmath.relu_moments(x) if x is not None else None
            elif node.op == "call_function" and target is torch.nn.functional.leaky_relu:
                slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
                out = cmath.leaky_relu_moments(x, float(slope)) if x is not None else None
            elif (node.op == "call_function" and (target in HOMOGENEOUS_FUNCTIONS or target in FLATTEN_FUNCTIONS)) or \
                    (node.op == "call_method" and (target in HOMOGENEOUS_METHODS or target in FLATTEN_METHODS)):
                out = x
            elif target in (operator.add, torch.add, operator.iadd, "add", "add_"):
                a, b = get(node.args[0]), get(node.args[1]) if len(node.args) > 1 else None
                if a is not None and b is not None and (a.mean.numel() == b.mean.numel() or 1 in (a.mean.numel(), b.mean.numel())):
                    out = ChannelMoments(a.mean + b.mean, a.var + b.var)
            elif target in (torch.cat, torch.concat):
                parts = [get(p) for p in node.args[0]] if isinstance(node.args[0], (list, tuple)) else []
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if parts and dim == 1 and all(p is not None and p.mean.numel() > 1 for p in parts):
                    out = ChannelMoments(torch.cat([p.mean for p in parts]), torch.cat([p.var for p in parts]))
        est[node.name] = out
    return est
