"""Hugging Face ``Conv1D`` (GPT-2's projections): an ``x @ W + b`` layer whose weight is stored
transposed, ``(in, out)``. It is a Linear in all but layout, so ``compress`` works on a copy of
the model in which each one is an ``nn.Linear`` with the transposed weight: the same function,
and every pass (pairs, moments, the budget, the correction, packing, export) applies unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from ..graph.ties import weight_holders
from ..graph.tracing import structural_copy

__all__ = ["is_hf_conv1d", "with_linear_for_conv1d"]


def is_hf_conv1d(mod: nn.Module) -> bool:
    """``transformers``' Conv1D or a subclass, recognised without importing transformers."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in type(mod).__mro__)


def _convertible(mod: nn.Module, holders: dict[int, list[str]]) -> bool:
    w = getattr(mod, "weight", None)
    b = getattr(mod, "bias", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 2 and len(holders.get(id(w), [])) == 1
            and (b is None or (isinstance(b, torch.Tensor) and b.shape == (w.shape[1],)))
            and type(mod).forward.__qualname__ == "Conv1D.forward")


def _as_linear(mod: nn.Module) -> nn.Linear:
    w = mod.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if mod.bias is not None:
        lin.bias = mod.bias  # the same tensor: compress gives the result its own copy
    lin.train(mod.training)
    return lin


def with_linear_for_conv1d(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A structural copy of ``model`` (modules copied, tensors shared) with every Hugging Face
    Conv1D replaced by an ``nn.Linear`` that computes the same function, and the replaced
    names; ``model`` itself and ``[]`` when it has none. A Conv1D whose weight another module
    also holds (tied), or a subclass with its own ``forward``, stays as it is (the report gives
    the reason)."""
    holders = weight_holders(model)
    names = [name for name, mod in model.named_modules() if is_hf_conv1d(mod) and _convertible(mod, holders)]
    if not names:
        return model, []
    if names == [""]:  # the model is a bare Conv1D
        return _as_linear(model), names
    work = structural_copy(model)
    for name in names:
        work.set_submodule(name, _as_linear(work.get_submodule(name)))
    return work, names
