"""The one place where ``compress`` edits the traced copy: layers become ``Quant*`` modules (or
get their own float weight), BatchNorms receive their corrected statistics."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.fx import GraphModule

from .modules import to_quant_module
from .plan import BatchNormUpdate, LayerPlan

__all__ = ["apply_plans"]


def _write(target: torch.Tensor, value: torch.Tensor) -> None:
    target.data.copy_(value.to(target.dtype))


def _apply_batchnorm(bn: nn.Module, update: BatchNormUpdate) -> None:
    if update.running_mean is not None:
        _write(bn.running_mean, update.running_mean)
    if update.running_var is not None:
        _write(bn.running_var, update.running_var)
    if update.bias is not None:
        _write(bn.bias, update.bias)
    if update.weight is not None:
        _write(bn.weight, update.weight)


def _remove_batchnorm(gm: GraphModule, name: str) -> None:
    """Take a folded BatchNorm out of the graph: its users read its input instead."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) == name:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            break
    gm.delete_submodule(name)


def apply_plans(gm: GraphModule, plans: Iterable[LayerPlan]) -> None:
    """Write every plan into ``gm`` (a working copy that shares only the float conv/linear
    weights with the user's model: those are replaced or left as they are, never written)."""
    removed = False
    for plan in plans:
        layer = gm.get_submodule(plan.name)
        w_dtype = layer.weight.dtype
        if plan.qweight is None:
            # Kept in float: the weight is still the input model's tensor; compress gives the copy
            # its own afterwards, one copy per tensor (``_own_every_tensor``), so ties hold.
            continue
        if plan.bn_update is not None and plan.bn_update.remove:
            _remove_batchnorm(gm, plan.bn_update.name)
            removed = True
        elif plan.bn_update is not None:
            _apply_batchnorm(gm.get_submodule(plan.bn_update.name), plan.bn_update)
        qw = plan.qweight
        # scales keep a narrower storage dtype (float16 under scale_dtype="float16"); otherwise the weight's
        store = torch.float16 if qw.scale.dtype == torch.float16 else w_dtype
        qw.scale, qw.zero_point = qw.scale.to(store), qw.zero_point.to(store)
        if qw.input_scale is not None:
            qw.input_scale = qw.input_scale.to(store)
        bias = None if plan.bias is None else plan.bias.to(w_dtype)
        gm.set_submodule(plan.name, to_quant_module(layer, plan.weight.to(w_dtype), bias, qw, plan.role))
    if removed:
        gm.graph.lint()
        gm.recompile()
