"""Tied weights: one weight tensor held by several modules (an output projection tied to its
input embedding, two layers given one ``Parameter``).

Quantizing one holder would untie it: the model would then store the weight twice (float in the
other holder, codes in this one) and grow instead of shrinking, and a size budget would count
one tensor's weights as if they were several layers'. So a conv/linear layer whose weight has
another holder is kept in float, with a reason that names the holders and says how to untie it.
A module called several times (one holder, several calls) is not a tie.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from torch import nn

__all__ = ["weight_holders", "tied_layers"]


def weight_holders(root: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): ["module.name", ...]}`` over every module of ``root`` that holds each
    parameter (a module registered under two names counts once)."""
    holders: dict[int, list[str]] = {}
    for name, mod in root.named_modules():
        for field, p in mod._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append(f"{name}.{field}" if name else field)
    return holders


def tied_layers(modules: Mapping[str, nn.Module], layers: Iterable[str],
                holders: Mapping[int, list[str]]) -> dict[str, str]:
    """The layers of ``layers`` (names in ``modules``) whose weight another module also holds,
    with the reason they stay float."""
    out: dict[str, str] = {}
    for name in layers:
        weight = getattr(modules[name], "weight", None)
        if weight is None:
            continue
        found = holders.get(id(weight), [])
        if len(found) > 1:
            others = ", ".join(found)
            out[name] = (f"weight tied ({others} are one tensor): kept in float so the tie holds (quantizing one "
                         f"holder would store the weight twice); to quantize it, untie it first, e.g. "
                         f"`layer.weight = nn.Parameter(layer.weight.detach().clone())`")
    return out
