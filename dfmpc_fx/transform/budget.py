"""Size-budget allocation for ``compress``: turns the layers' plan inputs into the costs of
:mod:`dfmpc_fx.numerics.allocation`, solves for the budget, and writes the choice back."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import DFMPCConfig
from ..errors import ConfigError
from ..numerics.allocation import (
    Candidate, InfeasibleBudget, LayerCost, allocate, estimate_layer, price_of_bit, sample_rows,
)
from ..numerics.quant import QuantizedWeight, quantize_uniform_widths, reduces_row_by_row
from .input_scaling import input_factors_for
from .plan import LayerInputs, quantize_for, quantizes_row_by_row

__all__ = ["BudgetChoice", "choose_widths", "candidates_for", "DefaultBudgetWarning", "layer_costs", "quantize_options", "reserve_input_factors", "solve_widths"]


class DefaultBudgetWarning(UserWarning):
    """The default size budget (no ``target_bits`` given) is below what the model can reach:
    it was compressed to its smallest size instead."""


@dataclass
class BudgetChoice:
    """The allocator's answer for one layer: its option and the estimates it chose among."""

    option: Candidate
    size_bits: float
    estimate: dict[str, float]  # option label -> predicted noise-to-signal ratio at the layer's output
    gain: float  # share of that ratio expected at the model's output (the knapsack weighs damage by it)


def candidates_for(name: str, cfg: DFMPCConfig, row_len: int, folds_into_batchnorm: bool = False) -> list[Candidate]:
    """The options of one layer: pinned by ``fixed_bits``, else every width x granularity
    (groups no shorter than the row are the per-channel option and are left out), and under
    ``scheme="auto"`` each width also per channel with a zero point where the layer's scales do
    not fold into a BatchNorm (``folds_into_batchnorm``; a zero point cannot move there)."""
    if name in cfg.fixed_bits:
        return [Candidate(cfg.fixed_bits[name], None)]
    groups = [g for g in cfg.group_sizes if g < row_len]
    affine = cfg.offers_zero_point_option and not folds_into_batchnorm
    return [c for b in sorted(set(cfg.candidate_bits))
            for c in [Candidate(b, None), *([Candidate(b, None, "asymmetric")] if affine else []),
                      *(Candidate(b, g) for g in groups)]]


def quantize_options(rows: torch.Tensor, options: list[Candidate], cfg: DFMPCConfig,
                     role: Optional[str] = None) -> list[QuantizedWeight]:
    """``[quantize_for(rows, o.bits, cfg, o.group_size, role) for o in options]``, with the
    per-channel widths of the default quantizer (``method="dfmpc"``, symmetric, per channel)
    batched into one call (:func:`dfmpc_fx.numerics.quant.quantize_uniform_widths`, equal bit for
    bit); grouped options and the other quantizers go one by one."""
    batched = [i for i, o in enumerate(options) if o.group_size is None and o.scheme is None and o.bits is not None] \
        if cfg.method == "dfmpc" and cfg.scheme_for(None) == "symmetric" and cfg.granularity == "per_channel" else []
    out: list[Optional[QuantizedWeight]] = [None] * len(options)
    if len(batched) > 1:
        for i, qw in zip(batched, quantize_uniform_widths(rows, [options[i].bits for i in batched])):
            out[i] = qw.with_scale_dtype(torch.float16) if cfg.scale_bits == 16 else qw
    for i, o in enumerate(options):
        if out[i] is None:
            out[i] = quantize_for(rows, o.bits, cfg, o.group_size, role, scheme=o.scheme)
    return out


#: Output channels of each layer the allocator scores its options on
#: (:func:`~dfmpc_fx.numerics.allocation.estimate_layer`'s ``max_rows``).
SCORED_ROWS = 16


def _quantize_samples_together(
    inputs: list[LayerInputs], options: list[list[Candidate]], cfg: DFMPCConfig, max_rows: int,
) -> dict[int, list[torch.Tensor]]:
    """The dequantized sample rows that :func:`~dfmpc_fx.numerics.allocation.estimate_layer`
    scores, for layers that share their options and row shape (a ResNet's repeated blocks, a
    transformer's q/k/v/o): their samples are stacked and quantized in one
    :func:`quantize_options` call per option set instead of one per layer (the sample is a few
    rows, so each call costs its operations' overhead, not arithmetic). Only layers whose every
    option quantizes row by row (:func:`~dfmpc_fx.transform.plan.quantizes_row_by_row`: per
    channel, or per group inside a row) are stacked, so each gets what its own call gives, bit
    for bit; the others (``granularity="per_tensor"``'s one scale per weight) and layers with
    fewer sampled rows than torch has threads keep their own call (``quantize_uniform_widths``
    then goes width by width). ``{layer index: one tensor per quantized option}``, only for the
    layers batched here."""
    together: dict[tuple, list[int]] = {}
    picks: dict[int, torch.Tensor] = {}
    for i, inp in enumerate(inputs):
        w = inp.weight
        rows = sample_rows(w.shape[0], max_rows)
        if not reduces_row_by_row(len(rows)) \
                or any(o.bits is None or not quantizes_row_by_row(cfg, o.group_size) for o in options[i]):
            continue
        picks[i] = rows
        key = (tuple(options[i]), tuple(w.shape[1:]), w.dtype, w.device)
        together.setdefault(key, []).append(i)
    out: dict[int, list[torch.Tensor]] = {}
    for key, members in together.items():
        if len(members) < 2:
            continue
        samples = [inputs[i].weight[picks[i]] for i in members]
        stacked = torch.cat(samples)
        quantized = [q.dequantize() for q in quantize_options(stacked, list(key[0]), cfg)]
        counts = [len(t) for t in samples]
        per_option = [torch.split(q, counts) for q in quantized]
        for j, i in enumerate(members):
            out[i] = [parts[j] for parts in per_option]
    return out


def _input_variance_per_weight(inp: LayerInputs) -> Optional[torch.Tensor]:
    """The input variance each weight of a row multiplies: ``(K,)``, or ``(C_out, K)`` for a
    grouped convolution (each row sees its own group's channels)."""
    if inp.in_moments is None:
        return None
    w = inp.weight
    k = w[0, 0].numel() if w.dim() > 2 else 1
    v = inp.in_moments.var
    if inp.groups == 1:
        return v.repeat_interleave(k) if k > 1 else v
    ipg = w.shape[1]
    c_out = w.shape[0]
    group_of_row = torch.arange(c_out) // (c_out // inp.groups)
    per_group = v.reshape(inp.groups, ipg)
    rows = per_group[group_of_row]
    return rows.repeat_interleave(k, dim=1) if k > 1 else rows


def layer_costs(
    inputs: list[LayerInputs], cfg: DFMPCConfig, gains: dict[str, float], names: Optional[list[str]] = None,
) -> tuple[list[LayerCost], dict[str, list[float]]]:
    """The allocator's options of every layer of ``inputs``: sizes, and damage weighted by the
    layer's output-noise gain (:func:`dfmpc_fx.graph.sensitivity.output_noise_gains`, keyed by
    the layers' own names), with the unweighted noise-to-signal ratios by cost name.
    ``names``: the names the costs carry (and ``fixed_bits`` is looked up by), by default the
    layers' own (a part of a model compressed part by part passes its qualified names)."""
    costs: list[LayerCost] = []
    raw: dict[str, list[float]] = {}
    all_names = [names[i] if names is not None else inp.name for i, inp in enumerate(inputs)]
    all_options = [candidates_for(name, cfg, inp.weight[0].numel(), inp.folds_into_batchnorm)
                   for name, inp in zip(all_names, inputs)]
    scored = _quantize_samples_together(inputs, all_options, cfg, SCORED_ROWS)
    for i, inp in enumerate(inputs):
        name, options = all_names[i], all_options[i]

        def quantize(rows: torch.Tensor, opts: list[Candidate], i: int = i, inp: LayerInputs = inp) -> list[torch.Tensor]:
            if i in scored:
                return scored[i]
            return [q.dequantize() for q in quantize_options(rows, opts, cfg, inp.role)]

        cost = estimate_layer(
            name, inp.weight, options, quantize, _input_variance_per_weight(inp),
            inp.bn.var if inp.bn is not None else None, cfg.scheme_for, max_rows=SCORED_ROWS,
            scale_bits=cfg.scale_bits, folded=inp.fold_scales,
        )
        raw[name] = list(cost.damage)
        g = gains.get(inp.name, 1.0)
        cost.damage = [d * g for d in cost.damage]
        costs.append(cost)
    return costs, raw


def _budget_bits(cfg: DFMPCConfig, fixed_weight_bits: float, all_weights: int, fixed_other_bits: float) -> float:
    """Bits the budget leaves for the layers the allocator covers."""
    if cfg.target_bits is not None:
        return cfg.target_bits * all_weights - fixed_weight_bits
    return 8.0 * cfg.target_bytes - fixed_other_bits - fixed_weight_bits


def solve_widths(
    costs: list[LayerCost], raw: dict[str, list[float]], gains: dict[str, float], cfg: DFMPCConfig,
    fixed_weight_bits: float, all_weights: int, fixed_other_bits: float, notes: Optional[list[str]] = None,
) -> dict[str, BudgetChoice]:
    """One knapsack over ``costs`` (every layer the budget covers: of one traced model, or of all
    the parts of a model compressed part by part) for the configured budget, keyed by cost
    name; ``gains`` (by cost name) are only reported. Arguments as :func:`choose_widths`."""
    budget = _budget_bits(cfg, fixed_weight_bits, all_weights, fixed_other_bits)
    try:
        choice = allocate(costs, budget)
    except InfeasibleBudget as exc:
        smallest = exc.smallest + fixed_weight_bits
        if cfg.target_bits is not None:
            reach = f"target_bits={math.ceil(smallest / all_weights * 1000) / 1000:.3f}"
        else:
            reach = f"target_bytes={math.ceil((smallest + fixed_other_bits) / 8)}"
        if cfg.budget_is_default:
            # The user asked for no size, so no error about a budget they never set. Where layers
            # kept in float (tied weights, skip_layers) put the model out of reach, the layers the
            # budget covers get its bits per weight among themselves; where even that is out of
            # reach (a tiny model whose scales dominate), every layer gets its smallest option.
            covered = cfg.target_bits * sum(c.numel for c in costs)
            if covered >= exc.smallest:
                done = (f"the {len(costs)} layers it covers got {cfg.target_bits:g} bits/w among themselves "
                        "(the float layers are not counted)")
            else:
                done = "every layer got its smallest option"
            note = (f"the default budget target_bits={cfg.target_bits:g} is below the smallest this model can be "
                    f"made ({reach}): {done}; pass target_bits=... or a layout to choose")
            warnings.warn(note, DefaultBudgetWarning, stacklevel=3)
            if notes is not None:
                notes.append(note)
            choice = allocate(costs, max(covered, exc.smallest))
        else:
            raise ConfigError(
                f"the size budget cannot be reached: the smallest this model can be made with candidate_bits="
                f"{cfg.candidate_bits}, group_sizes={cfg.group_sizes}, fixed_bits and skip_layers as given is {reach}; "
                "raise the budget, allow lower candidate_bits, or pin fewer layers"
            ) from None
    out: dict[str, BudgetChoice] = {}
    for cost, idx in zip(costs, choice):
        out[cost.name] = BudgetChoice(
            option=cost.options[idx], size_bits=cost.size_bits[idx],
            estimate={opt.label(): d for opt, d in zip(cost.options, raw[cost.name])}, gain=gains.get(cost.name, 1.0),
        )
    return out


def choose_widths(
    inputs: list[LayerInputs], cfg: DFMPCConfig, fixed_weight_bits: float, all_weights: int, fixed_other_bits: float,
    gains: dict[str, float], notes: Optional[list[str]] = None,
) -> dict[str, BudgetChoice]:
    """Widths and granularities of the quantizable layers ``inputs`` under the configured budget.
    ``notes`` receives the warning when the default budget is out of this model's reach (its
    smallest size is used then; an explicit budget out of reach is a ConfigError).

    ``fixed_weight_bits``: bits of conv/linear weights that stay in float whatever the budget
    (skipped or unreachable layers, 32 bits each); ``all_weights``: the number of conv/linear
    weights of the whole model; ``fixed_other_bits``: the rest of the model (biases, norms,
    embeddings), for ``target_bytes``; ``gains``: each layer's output-noise gain
    (:func:`dfmpc_fx.graph.sensitivity.output_noise_gains`), which weighs its damage.
    """
    costs, raw = layer_costs(inputs, cfg, gains)
    choices = solve_widths(costs, raw, gains, cfg, fixed_weight_bits, all_weights, fixed_other_bits, notes)
    choices, reserved = reserve_input_factors(inputs, [inp.name for inp in inputs], costs, raw, choices, gains, cfg,
                                              fixed_weight_bits, all_weights, fixed_other_bits, notes)
    for inp in inputs:
        inp.input_scale_reserved = inp.name in reserved
    return choices


def reserve_input_factors(
    inputs: list[LayerInputs], names: list[str], costs: list[LayerCost], raw: dict[str, list[float]],
    choices: dict[str, BudgetChoice], gains: dict[str, float], cfg: DFMPCConfig, fixed_weight_bits: float,
    all_weights: int, fixed_other_bits: float, notes: Optional[list[str]] = None,
) -> tuple[dict[str, BudgetChoice], set[str]]:
    """Steps 2-4 of a budget with input factors, after :func:`solve_widths` chose ``choices``:
    at the widths just chosen, a layer keeps its factors where the damage they remove beats what
    their bytes would buy as more bits (:func:`price_of_bit`); the knapsack is then solved again
    with those bytes charged (the estimate itself stays without factors: see
    :mod:`dfmpc_fx.transform.input_scaling`). Returns the final choices and the cost names of
    the layers whose factors are charged (the others get none). ``names``: the cost name of each
    of ``inputs`` (its qualified name when a model is compressed part by part); ``gains`` and
    the rest as :func:`solve_widths`."""
    if not cfg.uses_input_scales:
        return choices, set()
    price = price_of_bit(costs, [c.options.index(choices[c.name].option) for c in costs])
    extra: dict[str, int] = {}
    by_name = {c.name: c for c in costs}
    for inp, name in zip(inputs, names):
        option = choices[name].option
        cost = by_name[name]
        cost_bits = inp.weight.shape[1] * cfg.scale_bits  # one factor per input channel
        # factors cannot remove more damage than the layer has left: skip choosing them there
        if cost.damage[cost.options.index(option)] <= price * cost_bits:
            continue
        got = input_factors_for(inp, cfg, option.bits, option.group_size, option.scheme)
        # damage in the knapsack's units: the estimate's rows are a sample of the layer's
        if got is not None and got.factors is not None and got.saved * gains.get(name, 1.0) > price * cost_bits:
            extra[name] = cost_bits
    if not extra:
        return choices, set()
    charged = [LayerCost(c.name, c.numel, c.options,
                         [s + extra.get(c.name, 0) if o.bits is not None else s for s, o in zip(c.size_bits, c.options)],
                         c.damage) for c in costs]
    floor = sum(min(c.size_bits) for c in charged)
    if floor > _budget_bits(cfg, fixed_weight_bits, all_weights, fixed_other_bits):
        return choices, set()  # the factors do not fit next to the smallest widths: none
    return solve_widths(charged, raw, gains, cfg, fixed_weight_bits, all_weights, fixed_other_bits, notes), set(extra)
