"""Bit assignment over compensable pairs (the paper's Fig. 2 / Algorithm 1, made general).

Pairs link layers into simple paths (a layer has at most one partner downstream and one
upstream). A low-bit layer must be the first of a pair so that its error is compensated:
paths with an even number of layers alternate low/high from the start (basic block: low-high),
odd ones start high (bottleneck 1x1-3x3-1x1: high-low-high; plain chains likewise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..config import DFMPCConfig
from .pairs import CompensablePair, PairSearch

LOW, HIGH, DEFAULT, FIRST_LAST, FLOAT, BUDGET = "low", "high", "default", "first_last", "float", "budget"


@dataclass
class BitPlan:
    """Role and bit width (None: float) of every weighted layer, and the pairs that compensate."""

    roles: dict[str, str]
    bits: dict[str, Optional[int]]
    active_pairs: list[CompensablePair]
    excluded_pairs: list[tuple[CompensablePair, str]] = field(default_factory=list)

    def pair_from(self, layer: str) -> Optional[CompensablePair]:
        for p in self.active_pairs:
            if p.first == layer:
                return p
        return None


def assign_bits(search: PairSearch, cfg: DFMPCConfig, keep_float: Mapping[str, str] = {}) -> BitPlan:
    """``keep_float``: layers the graph keeps in float whatever the config (tied weights), by
    name, with the reason."""
    layers = search.layers
    pinned: dict[str, str] = {name: FLOAT for name in keep_float}
    for name in cfg.skip_layers:
        if name not in layers:
            raise_unknown = [n for n in layers][:10]
            from ..errors import ConfigError

            raise ConfigError(f"skip_layers names {name!r}, which is not a weighted layer; some are: {raise_unknown}")
        pinned[name] = FLOAT
    if cfg.first_last_bits is not None and layers:
        for name in (layers[0], layers[-1]):
            pinned.setdefault(name, FIRST_LAST)

    usable: list[CompensablePair] = []
    excluded: list[tuple[CompensablePair, str]] = []
    for p in search.pairs:
        if p.first in pinned or p.second in pinned:
            which = p.first if p.first in pinned else p.second
            why = (keep_float.get(which, "skipped by skip_layers") if pinned[which] == FLOAT
                   else f"first/last layer kept at {cfg.first_last_bits} bits")
            excluded.append((p, f"{which}: {why}"))
        else:
            usable.append(p)

    succ = {p.first: p for p in usable}
    preds = {p.second for p in usable}
    roles: dict[str, str] = {}
    active: list[CompensablePair] = []
    for start in [p.first for p in usable if p.first not in preds]:
        path = [start]
        while path[-1] in succ:
            path.append(succ[path[-1]].second)
        offset = 0 if len(path) % 2 == 0 else 1
        for i, name in enumerate(path):
            roles[name] = LOW if (i + offset) % 2 == 0 else HIGH
        for name in path[:-1]:
            if roles[name] == LOW:
                active.append(succ[name])
            else:
                excluded.append((succ[name], f"{name} is high-bit in its chain; its partner is low-bit and compensated downstream"))

    bits: dict[str, Optional[int]] = {}
    for name in layers:
        if name in pinned:
            roles[name] = pinned[name]
            bits[name] = cfg.first_last_bits if pinned[name] == FIRST_LAST else None
        elif name in roles:
            bits[name] = cfg.low_bits if roles[name] == LOW else cfg.high_bits
        elif cfg.default_bits is None:
            roles[name], bits[name] = FLOAT, None
        else:
            roles[name], bits[name] = DEFAULT, cfg.default_bits
    return BitPlan(roles=roles, bits=bits, active_pairs=active, excluded_pairs=excluded)


def budget_roles(search: PairSearch, cfg: DFMPCConfig, keep_float: Mapping[str, str] = {}) -> BitPlan:
    """Roles under a size budget: every layer is the allocator's (``budget``) except those in
    ``skip_layers`` (float). No pair compensates: each quantized layer is corrected on its own,
    and where a BatchNorm follows, its variance takes the restoration a partner's scale would
    (the same correction for a positively homogeneous activation). ``bits`` holds a placeholder
    (the widest candidate) until the allocator has chosen. ``keep_float``: as :func:`assign_bits`
    (float whatever ``fixed_bits`` says)."""
    layers = search.layers
    for name in list(cfg.skip_layers) + list(cfg.fixed_bits):
        if name not in layers:
            from ..errors import ConfigError

            raise ConfigError(f"{name!r} (skip_layers / fixed_bits) is not a weighted layer; some are: {layers[:10]}")
    roles = {name: FLOAT if name in cfg.skip_layers or name in keep_float else BUDGET for name in layers}
    widest = max(cfg.candidate_bits)
    bits = {name: None if roles[name] == FLOAT else cfg.fixed_bits.get(name, widest) for name in layers}
    why = "not used under a size budget: each layer is corrected on its own (its BatchNorm absorbs the variance restoration)"
    return BitPlan(roles=roles, bits=bits, active_pairs=[], excluded_pairs=[(p, why) for p in search.pairs])
