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
what is left of the budget with the best damage-per-bit upgrades, then a local search over
single and paired changes (one layer frees bits, another spends them); against that, a dynamic
programme over the layers on a Pareto frontier of (size, damage) thinned to 512 slices of the
budget's slack (exact on a few layers); the less damaged answer wins. Milliseconds for a
ResNet-50.
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
    scheme: Optional[str] = None  # None: the configuration's scheme for this granularity

    def label(self) -> str:
        if self.bits is None:
            return "fp32"
        return f"W{self.bits}" + (f"g{self.group_size}" if self.group_size else "") + \
            ("" if self.scheme is None else f"-{self.scheme[:4]}")


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


def option_bits(option: Candidate, shape: Sequence[int], scheme: str | Callable[[Optional[int]], str],
                scale_bits: int = 32, folded: bool = False) -> float:
    """Size of a layer of weight ``shape`` stored as ``option`` with quantizer ``scheme`` (a
    name, or a function of the option's group size that names it),
    scales and zero points (``scale_bits`` wide) included
    (:func:`dfmpc_fx.numerics.quant.scale_overhead_bits`). ``folded``: the per-channel scales
    live in the following BatchNorm (``DFMPCConfig.fold_scales``), so a per-channel option
    stores one scale for the layer."""
    numel = math.prod(shape)
    if option.bits is None:
        return 32.0 * numel
    rows = 1 if folded and option.group_size is None else shape[0]
    name = option.scheme or (scheme(option.group_size) if callable(scheme) else scheme)
    return float(option.bits * numel + scale_overhead_bits(numel, rows, option.group_size, name, scale_bits))


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
        self.wuw = (self.wu * self.w).sum(dim=1)  # sum_k u_k W_k^2
        self.signal = self.wuw if ref_var is None else ref_var.to(torch.float64)

    def ratios(self, quantized: torch.Tensor) -> list[float]:
        """The ratio of each option at once: ``quantized`` is ``(options, rows, K)``; one batched
        pass instead of one small pass per option (the rows are short: calls cost). The three
        products go through one scratch tensor (fresh float64 temporaries of a large layer's
        sample page-fault: they cost more than the arithmetic)."""
        q = quantized.to(torch.float64)
        w, wu = self.w.unsqueeze(0), self.wu.unsqueeze(0)
        buf = torch.empty_like(q)
        gamma = torch.mul(q, w, out=buf).sum(dim=2) / self.ww.clamp_min(1e-300)
        if self.u is None:
            torch.mul(q, q, out=buf)
        else:
            torch.mul(q, self.u.unsqueeze(0), out=buf).mul_(q)  # (q u) q, as before
        quq = buf.sum(dim=2)
        noise = (quq - 2.0 * gamma * torch.mul(q, wu, out=buf).sum(dim=2) + gamma * gamma * self.wuw).clamp_min(0.0)
        ok = self.signal > 0
        if not bool(ok.any()):
            return [0.0] * q.shape[0]
        return [float(v) for v in (noise[:, ok] / self.signal[ok]).mean(dim=1)]


class _OptionTable:
    """Every layer's option sizes and damages as ``(layers, options)`` float64 tables (padded
    with infinity), so the relaxation's per-layer choice at a price is a few tensor operations
    instead of a Python loop over every option (it runs once per bisection step)."""

    def __init__(self, costs: Sequence[LayerCost]) -> None:
        n_opt = max(len(c.options) for c in costs)
        inf = float("inf")
        self.size = torch.tensor([c.size_bits + [inf] * (n_opt - len(c.options)) for c in costs], dtype=torch.float64)
        self.damage = torch.tensor([c.damage + [0.0] * (n_opt - len(c.options)) for c in costs], dtype=torch.float64)
        self.valid = torch.isfinite(self.size)
        self.index = torch.arange(n_opt).expand_as(self.size)

    def pick(self, price: float) -> list[int]:
        """As ``min(options, key=(damage + price * size, size))`` per layer, first on ties (the
        same float64 operations, so the same choice)."""
        key = torch.where(self.valid, self.damage + price * self.size, float("inf"))
        best = key == key.amin(dim=1, keepdim=True)
        size = torch.where(best, self.size, float("inf"))
        best &= size == size.amin(dim=1, keepdim=True)
        return torch.where(best, self.index, self.index.shape[1]).amin(dim=1).tolist()




def _total(costs: Sequence[LayerCost], choice: Sequence[int]) -> float:
    return sum(c.size_bits[i] for c, i in zip(costs, choice))


def allocate(costs: Sequence[LayerCost], budget_bits: float) -> list[int]:
    """Index of the chosen option of every layer: least total damage with total size at most
    ``budget_bits``. Raises :class:`InfeasibleBudget` if even the smallest options exceed it."""
    smallest = [min(range(len(c.options)), key=lambda i: (c.size_bits[i], c.damage[i])) for c in costs]
    floor = _total(costs, smallest)
    if floor > budget_bits * (1 + 1e-12):
        raise InfeasibleBudget(budget_bits, floor)
    if not costs:  # every layer pinned (kept in float, tied): nothing to choose
        return []
    table = _OptionTable(costs)
    best = table.pick(0.0)
    if _total(costs, best) <= budget_bits:
        return best
    lo, hi = 0.0, 1.0
    while _total(costs, table.pick(hi)) > budget_bits:
        hi *= 4.0
        if hi > 1e30:
            return smallest
    for _ in range(60):  # bisection on the price of a bit
        mid = 0.5 * (lo + hi)
        if _total(costs, table.pick(mid)) > budget_bits:
            lo = mid
        else:
            hi = mid
    # Two answers, the better one wins: the relaxation's feasible side filled up greedily and
    # improved by local search, and a dynamic programme on a thinned frontier.
    finished = [_exchange(costs, _fill(costs, table.pick(hi), budget_bits), budget_bits), _frontier(costs, budget_bits)]
    return min(finished, key=lambda c: (sum(cost.damage[i] for cost, i in zip(costs, c)), _total(costs, c)))


def _frontier(costs: Sequence[LayerCost], budget_bits: float, buckets: int = 512) -> list[int]:
    """Dynamic programming over the layers on a thinned Pareto frontier of (size, damage):
    after each layer, of the partial choices whose size falls into the same one of ``buckets``
    slices of the budget's slack (the budget less the smallest sizes), only the least damaged
    is kept, and choices that cannot fit next to the remaining layers' smallest sizes are
    dropped. Exact while the frontier stays under ``buckets`` points (few layers); a second,
    independent answer to the relaxation's otherwise."""
    mins = [min(c.size_bits) for c in costs]
    after = [0.0] * (len(costs) + 1)
    for i in range(len(costs) - 1, -1, -1):
        after[i] = after[i + 1] + mins[i]
    width = max(budget_bits - after[0], 1e-9) / buckets
    size = torch.zeros(1, dtype=torch.float64)
    dmg = torch.zeros(1, dtype=torch.float64)
    parents: list[torch.Tensor] = []
    picks: list[torch.Tensor] = []
    done = 0.0  # smallest sizes of the layers already placed
    for i, c in enumerate(costs):
        s_opt = torch.tensor(c.size_bits, dtype=torch.float64)
        d_opt = torch.tensor(c.damage, dtype=torch.float64)
        s = (size.unsqueeze(1) + s_opt.unsqueeze(0)).reshape(-1)
        d = (dmg.unsqueeze(1) + d_opt.unsqueeze(0)).reshape(-1)
        ok = torch.nonzero(s + after[i + 1] <= budget_bits).reshape(-1)
        s, d = s[ok], d[ok]
        done += mins[i]
        slot = torch.floor((s - done) / width).clamp_min(0)
        order = torch.argsort(d, stable=True)
        order = order[torch.argsort(slot[order], stable=True)]
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = slot[order][1:] != slot[order][:-1]
        keep = order[first]
        keep = keep[torch.argsort(s[keep], stable=True)]
        best_before = torch.cummin(d[keep], dim=0).values
        pareto = torch.ones(len(keep), dtype=torch.bool)
        pareto[1:] = d[keep][1:] < best_before[:-1]
        keep = keep[pareto]
        flat = ok[keep]
        parents.append(torch.div(flat, len(c.options), rounding_mode="floor"))
        picks.append(flat % len(c.options))
        size, dmg = s[keep], d[keep]
    at = int(torch.argmin(dmg))
    choice = [0] * len(costs)
    for i in range(len(costs) - 1, -1, -1):
        choice[i] = int(picks[i][at])
        at = int(parents[i][at])
    return choice


def _fill(costs: Sequence[LayerCost], choice: list[int], budget_bits: float) -> list[int]:
    """Greedy fill: spend what is left of the budget on the upgrades with the most damage
    removed per extra bit, while they fit."""
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


def _exchange(costs: Sequence[LayerCost], choice: list[int], budget_bits: float, rounds: int = 1000) -> list[int]:
    """Local search after the fill: apply the best single change or pair of changes in two
    different layers (one frees bits, the other spends them) that lowers the total damage and
    still fits, until none does. The relaxation's optimum can sit far from the knapsack's on
    few, coarse layers; each exchange strictly lowers the damage, so this ends."""
    n_opt = max(len(c.options) for c in costs)
    inf = float("inf")
    size = torch.tensor([c.size_bits + [inf] * (n_opt - len(c.options)) for c in costs], dtype=torch.float64)
    dmg = torch.tensor([c.damage + [inf] * (n_opt - len(c.options)) for c in costs], dtype=torch.float64)
    layer = torch.arange(len(costs)).unsqueeze(1).expand_as(size).reshape(-1)
    option = torch.arange(n_opt).unsqueeze(0).expand_as(size).reshape(-1)
    rows = torch.arange(len(costs))
    for _ in range(rounds):
        cur = torch.tensor(choice)
        cur_size, cur_dmg = size[rows, cur], dmg[rows, cur]
        left = budget_bits - float(cur_size.sum())
        tol = 1e-12 * max(float(cur_dmg.sum()), 1e-300)
        ds = (size - cur_size.unsqueeze(1)).reshape(-1)
        dd = (dmg - cur_dmg.unsqueeze(1)).reshape(-1)
        finite = torch.isfinite(ds)
        best_gain, best_move = tol, None
        single = finite & (ds <= left) & (-dd > best_gain)
        if bool(single.any()):
            i = int(torch.argmin(torch.where(single, dd, torch.full_like(dd, inf))))
            best_gain, best_move = float(-dd[i]), [i]
        frees = torch.nonzero(finite & (ds < 0)).reshape(-1)
        saves = torch.nonzero(finite & (dd < 0)).reshape(-1)
        if len(frees) and len(saves):
            pair_ds = ds[frees].unsqueeze(1) + ds[saves].unsqueeze(0)
            pair_dd = dd[frees].unsqueeze(1) + dd[saves].unsqueeze(0)
            ok = (pair_ds <= left) & (layer[frees].unsqueeze(1) != layer[saves].unsqueeze(0)) & (-pair_dd > best_gain)
            if bool(ok.any()):
                k = int(torch.argmin(torch.where(ok, pair_dd, torch.full_like(pair_dd, inf))))
                a, b = divmod(k, len(saves))
                best_move = [int(frees[a]), int(saves[b])]
        if best_move is None:
            break
        for i in best_move:
            choice[int(layer[i])] = int(option[i])
    return choice


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
    quantize: Callable[[torch.Tensor, Sequence[Candidate]], list[torch.Tensor]],
    in_var_per_weight: Optional[torch.Tensor],
    ref_var: Optional[torch.Tensor],
    scheme: str | Callable[[Optional[int]], str],
    max_rows: int = 16,
    scale_bits: int = 32,
    folded: bool = False,
) -> LayerCost:
    """:class:`LayerCost` of one layer: each option's size and its noise-to-signal ratio on a
    sample of rows. ``quantize(rows, options)`` returns the dequantized rows (same shape) of
    each option (one call for all of them: batched, where it can be, by the caller);
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
        qs = torch.stack([q.reshape(flat.shape) for q in quantize(w, [options[i] for i in quantized])])
        for i, d in zip(quantized, reference.ratios(qs)):
            damage[i] = d
    return LayerCost(name, weight.numel(), list(options), sizes, damage)


__all__ += ["estimate_layer"]
