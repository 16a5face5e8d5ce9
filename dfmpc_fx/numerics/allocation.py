"""Bit allocation under a size budget, as plain tensor / list functions (no fx, no modules).

Damage model (data-free). After ``compress``'s corrections a layer's output keeps its mean
(mean correction) and its variance (variance restoration): what remains is the part of the
rounding error that is not along the float filter, ``N_j = Q_j - gamma_j W_j`` with
``gamma_j = <Q_j, W_j> / <W_j, W_j>``. With independent inputs of per-channel variance ``v_k``
its power is ``sum_k v_k ||N_jk||^2``; divided by the variance of the float output (the one
BatchNorm recorded, else ``sum_k v_k ||W_jk||^2``) it is the noise-to-signal ratio that layer
adds to its output. A network of normalised layers passes a relative perturbation on at about
unit gain, so the sum of the layers' ratios is the objective: every layer weighs the same per
unit of relative noise, whatever its size, which is why small sensitive layers (depthwise,
first, classifier) buy bits cheaply.

Scoring every width on every weight would cost a quantization pass per candidate; the
quantizers here are row-wise (per output channel, or per group inside a row), so the ratio is
estimated exactly on a fixed sample of rows, a few percent of a large layer.

Choice: a multiple-choice knapsack (one option per layer, sizes in bits) solved by Lagrangian
relaxation (bisection on the price of a bit: each layer then picks alone) and a greedy fill of
what is left of the budget with the best damage-per-bit upgrades; milliseconds for a ResNet-50.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .quant import scale_overhead_bits

__all__ = [
    "Candidate",
    "LayerCost",
    "option_bits",
    "sample_rows",
    "allocate",
    "InfeasibleBudget",
]

@dataclass(frozen=True)
class Candidate:
    """One way to store a layer: ``bits`` per weight, and one scale per output channel
    (``group_size=None``) or per ``group_size`` consecutive weights of a row; ``bits=None``:
    float32."""

    bits: Optional[int]
    group_size: Optional[int] = None

    def label(self) -> str:
        if self.bits is None:
            return "fp32"
        return f"W{self.bits}" + (f"g{self.group_size}" if self.group_size else "")


@dataclass
class LayerCost:
    """The options of one layer: their sizes in bits and their estimated damage."""

    name: str
    numel: int
    options: list[Candidate]
    size_bits: list[float]
    damage: list[float]


class InfeasibleBudget(ValueError):
    """No choice of options fits the budget; ``smallest`` is the smallest size that does."""

    def __init__(self, budget: float, smallest: float) -> None:
        super().__init__(f"budget {budget:.6g} below the smallest reachable {smallest:.6g}")
        self.budget, self.smallest = budget, smallest


def option_bits(option: Candidate, shape: Sequence[int], scheme: str, scale_bits: int = 32,
                folded: bool = False) -> float:
    """Size of a layer of weight ``shape`` stored as ``option`` with quantizer ``scheme``,
    scales and zero points (``scale_bits`` wide) included
    (:func:`dfmpc_fx.numerics.quant.scale_overhead_bits`). ``folded``: the per-channel scales
    live in the following BatchNorm (``DFMPCConfig.fold_scales``), so a per-channel option
    stores one scale for the layer."""
    numel = math.prod(shape)
    if option.bits is None:
        return 32.0 * numel
    rows = 1 if folded and option.group_size is None else shape[0]
    return float(option.bits * numel + scale_overhead_bits(numel, rows, option.group_size, scheme, scale_bits))


def sample_rows(c_out: int, max_rows: int) -> torch.Tensor:
    """A fixed, evenly spread sample of at most ``max_rows`` output channels."""
    if c_out <= max_rows:
        return torch.arange(c_out)
    return torch.linspace(0, c_out - 1, max_rows).round().long().unique()


class _RowReference:
    """The float rows of one layer with what every option's ratio reuses: ``sum_k W^2``, the
    input-weighted ``u * W`` and the output variances; :meth:`ratios` gives, per option, the mean
    over the rows of ``sum_k u_k (Q - gamma W)_k^2 / Var(W x)`` (see the module docstring)."""

    def __init__(self, weight_rows: torch.Tensor, in_var_per_weight: Optional[torch.Tensor], ref_var: Optional[torch.Tensor]):
        self.w = weight_rows.to(torch.float64)
        self.u = None if in_var_per_weight is None else in_var_per_weight.to(torch.float64).expand_as(self.w)
        self.wu = self.w if self.u is None else self.w * self.u
        self.ww = (self.w * self.w).sum(dim=1)
        self.signal = (self.wu * self.w).sum(dim=1) if ref_var is None else ref_var.to(torch.float64)

    def ratios(self, quantized: torch.Tensor) -> list[float]:
        """The ratio of each option at once: ``quantized`` is ``(options, rows, K)``; one batched
        pass instead of one small pass per option (the rows are short: calls cost)."""
        q = quantized.to(torch.float64)
        w, wu = self.w.unsqueeze(0), self.wu.unsqueeze(0)
        gamma = (q * w).sum(dim=2) / self.ww.clamp_min(1e-300)
        qu = q if self.u is None else q * self.u.unsqueeze(0)
        noise = ((qu * q).sum(dim=2) - 2.0 * gamma * (q * wu).sum(dim=2)
                 + gamma * gamma * (self.wu * self.w).sum(dim=1)).clamp_min(0.0)
        ok = self.signal > 0
        if not bool(ok.any()):
            return [0.0] * q.shape[0]
        return [float(v) for v in (noise[:, ok] / self.signal[ok]).mean(dim=1)]


def _pick(costs: Sequence[LayerCost], price: float) -> list[int]:
    return [min(range(len(c.options)), key=lambda i: (c.damage[i] + price * c.size_bits[i], c.size_bits[i]))
            for c in costs]


def _total(costs: Sequence[LayerCost], choice: Sequence[int]) -> float:
    return sum(c.size_bits[i] for c, i in zip(costs, choice))


def allocate(costs: Sequence[LayerCost], budget_bits: float) -> list[int]:
    """Index of the chosen option of every layer: least total damage with total size at most
    ``budget_bits``. Raises :class:`InfeasibleBudget` if even the smallest options exceed it."""
    smallest = [min(range(len(c.options)), key=lambda i: (c.size_bits[i], c.damage[i])) for c in costs]
    floor = _total(costs, smallest)
    if floor > budget_bits * (1 + 1e-12):
        raise InfeasibleBudget(budget_bits, floor)
    best = _pick(costs, 0.0)
    if _total(costs, best) <= budget_bits:
        return best
    lo, hi = 0.0, 1.0
    while _total(costs, _pick(costs, hi)) > budget_bits:
        hi *= 4.0
        if hi > 1e30:
            return smallest
    for _ in range(60):  # bisection on the price of a bit
        mid = 0.5 * (lo + hi)
        if _total(costs, _pick(costs, mid)) > budget_bits:
            lo = mid
        else:
            hi = mid
    choice = _pick(costs, hi)
    # Greedy fill: spend what the relaxation left on the upgrades with the most damage removed
    # per extra bit, while they fit.
    left = budget_bits - _total(costs, choice)
    while True:
        move, gain = None, 0.0
        for li, c in enumerate(costs):
            cur = choice[li]
            for oi in range(len(c.options)):
                extra = c.size_bits[oi] - c.size_bits[cur]
                saved = c.damage[cur] - c.damage[oi]
                if saved <= 0 or extra > left:
                    continue
                rate = saved / max(extra, 1e-9)
                if rate > gain:
                    move, gain = (li, oi, extra), rate
        if move is None:
            return choice
        li, oi, extra = move
        choice[li] = oi
        left -= extra


def price_of_bit(costs: Sequence[LayerCost], choice: Sequence[int]) -> float:
    """The damage one more bit would still remove at ``choice``: the best rate (damage removed
    per extra bit) among the upgrades not taken. Something else bought with bits is worth it
    when it removes at least this much per bit."""
    best = 0.0
    for c, cur in zip(costs, choice):
        for oi in range(len(c.options)):
            extra = c.size_bits[oi] - c.size_bits[cur]
            saved = c.damage[cur] - c.damage[oi]
            if extra > 0 and saved > 0:
                best = max(best, saved / extra)
    return best


__all__ += ["price_of_bit"]


def estimate_layer(
    name: str,
    weight: torch.Tensor,
    options: Sequence[Candidate],
    quantize: Callable[[torch.Tensor, Candidate], torch.Tensor],
    in_var_per_weight: Optional[torch.Tensor],
    ref_var: Optional[torch.Tensor],
    scheme: str,
    max_rows: int = 16,
    scale_bits: int = 32,
    folded: bool = False,
) -> LayerCost:
    """:class:`LayerCost` of one layer: each option's size and its noise-to-signal ratio on a
    sample of rows. ``quantize(rows, option)`` returns the dequantized rows (same shape);
    ``in_var_per_weight`` is ``(C_out, K)``, ``(K,)`` or None; ``folded`` as :func:`option_bits`."""
    rows = sample_rows(weight.shape[0], max_rows)
    w = weight[rows]
    flat = w.reshape(w.shape[0], -1)
    u = None
    if in_var_per_weight is not None:
        u = in_var_per_weight[rows] if in_var_per_weight.dim() == 2 else in_var_per_weight
    rv = ref_var[rows] if ref_var is not None else None
    reference = _RowReference(flat, u, rv)
    sizes = [option_bits(opt, weight.shape, scheme, scale_bits, folded) for opt in options]
    quantized = [i for i, opt in enumerate(options) if opt.bits is not None]
    damage = [0.0] * len(options)  # a float option leaves no rounding noise
    if quantized:
        qs = torch.stack([quantize(w, options[i]).reshape(flat.shape) for i in quantized])
        for i, d in zip(quantized, reference.ratios(qs)):
            damage[i] = d
    return LayerCost(name, weight.numel(), list(options), sizes, damage)


__all__ += ["estimate_layer"]
