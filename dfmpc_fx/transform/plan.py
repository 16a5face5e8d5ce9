"""The per-layer plan of ``compress``: pure functions from what graph analysis found about one
layer to what must change (quantized weight, bias, BatchNorm statistics, the scale handed to the
partner layer), with no fx and no module edits.

Graph code (:mod:`dfmpc_fx.transform.compress`) decides *which* BatchNorm follows a layer,
which pair it belongs to and what its input moments are; this module computes; one place
(:mod:`dfmpc_fx.transform.apply`) writes the result into the graph.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import DFMPCConfig
from ..numerics import compensation as cmath
from ..numerics.compensation import ChannelMoments
from ..graph.bits import HIGH, LOW
from ..numerics.quant import QuantizedWeight, column_view, quantize_dorefa, quantize_weight
from .report import LayerReport

__all__ = ["BatchNormState", "LayerInputs", "LayerPlan", "BatchNormUpdate", "adds_bias", "plan_layer", "quantize_for"]


@dataclass
class BatchNormState:
    """The recorded statistics and affine of the BatchNorm that follows a layer (in the
    layer's working dtype)."""

    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    weight: Optional[torch.Tensor]  # gamma (None: not affine)
    bias: Optional[torch.Tensor]  # beta
    stats_dtype: torch.dtype  # dtype of the module's running statistics


@dataclass
class LayerInputs:
    """Everything :func:`plan_layer` reads about one weighted layer."""

    name: str
    kind: str
    role: str
    bits: Optional[int]  # None: kept in float
    weight: torch.Tensor  # float weight in the working dtype, partner scale already folded in
    bias: Optional[torch.Tensor]
    groups: int
    in_moments: Optional[ChannelMoments]  # per input channel (None: unknown)
    bn: Optional[BatchNormState]  # the BatchNorm that follows (None: none, or shared)
    bn_name: Optional[str]
    partner: Optional[str]  # second layer of the active pair this layer starts
    features_per_channel: int = 1
    group_size: Optional[int] = None  # scale granularity chosen for this layer (None: config's)
    scheme: Optional[str] = None  # quantizer scheme chosen for this layer by the allocator (None: config's)
    mean_trusted: bool = True  # False: in_moments' mean rests on an assumption not used for mean correction
    provenance: Optional[str] = None  # where in_moments came from, or why there are none (for the report)
    input_scale: Optional[torch.Tensor] = None  # per-input-channel factors (numerics/input_scales.py), or None
    input_scale_exponent: Optional[float] = None  # the exponent they were chosen with (None: not considered)
    input_scale_reserved: bool = False  # size budget: the factors' bytes are charged (input_scaling.py)
    fold_scales: bool = False  # per-channel scales go into ``bn`` (DFMPCConfig.fold_scales; graph side checked it may)
    fold_batchnorm: bool = False  # ``bn`` is folded into the layer and removed (DFMPCConfig.fold_batchnorm; checked it may)
    input_signal_fraction: float = 1.0  # 1 / (1 + rounding noise-to-signal estimated upstream): how far mean_calibration applies

    @property
    def folds_into_batchnorm(self) -> bool:
        """Its scales (``fold_scales``) or its whole BatchNorm (``fold_batchnorm``) fold."""
        return self.fold_scales or self.fold_batchnorm


@dataclass
class BatchNormUpdate:
    """New values for a BatchNorm's tensors (None: unchanged)."""

    name: str
    running_mean: Optional[torch.Tensor] = None
    running_var: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None  # gamma
    remove: bool = False  # folded into its layer (fold_batchnorm): apply takes the BatchNorm out of the graph


@dataclass
class LayerPlan:
    """What :mod:`dfmpc_fx.transform.apply` writes for one layer."""

    name: str
    role: str
    weight: torch.Tensor  # dequantized weight, or the float weight for layers kept in float
    bias: Optional[torch.Tensor]
    qweight: Optional[QuantizedWeight]  # None: kept in float
    bn_update: Optional[BatchNormUpdate]
    partner_scale: Optional[tuple[torch.Tensor, int]]  # (c, features per channel) for the partner
    report: LayerReport


#: Roles of the layers inside compensable pairs (graph/bits.py's LOW and HIGH).
PAIR_ROLES: frozenset[str] = frozenset({LOW, HIGH})


def quantizes_row_by_row(cfg: DFMPCConfig, group_size: Optional[int] = None) -> bool:
    """Whether :func:`quantize_for` at ``group_size`` treats each output channel on its own (per
    channel or per group inside a row, ``method="dfmpc"``), so that rows stacked from several
    weights quantize as each weight's own call would; ``granularity="per_tensor"`` and the
    paper's quantizers share one scale over all rows."""
    return cfg.method == "dfmpc" and (group_size is not None or cfg.granularity == "per_channel")


def quantize_for(
    ref: torch.Tensor, bits: int, cfg: DFMPCConfig, group_size: Optional[int] = None, role: Optional[str] = None,
    input_scale: Optional[torch.Tensor] = None, scheme: Optional[str] = None,
) -> QuantizedWeight:
    """The quantizer the configuration names for a layer of role ``role`` (the paper's
    TWN/DoReFa per layer, or ours).

    ``method="paper"``: the layers inside compensable pairs (roles ``low``/``high``, what the
    paper quantizes and compensates) get the paper's quantizers as published: TWN at 2 bits,
    tanh DoReFa (Eq. 6) above, one scale per layer. Every other layer (``default``,
    ``first_last``, ``budget``, inside an opaque leaf, ``role=None``) gets TWN at 2 bits and
    DoReFa's uniform grid *without* the tanh (``quantize_dorefa(..., tanh=False)``) above: the
    paper does not say how it quantizes layers outside its pairs, and tanh DoReFa warps a
    weight ``w`` to about ``max|w| tanh(w) / tanh(max|w|)``, relative weight errors of 0.35-8
    even at 8 bits (all-zero outputs on a CNN whose layers are mostly outside pairs), so it
    would measure that distortion instead of the method. Inside pairs the tanh form stays: the
    paper baseline is defined by it (the tanh gain on the high-bit layers offsets TWN's
    shrinkage of the low-bit ones).

    ``input_scale``: per-input-channel factors ``t`` (already in their storage dtype): ``W / t``
    is quantized and the result dequantizes to ``Q(W / t) * t``. ``scheme``: the allocator's
    choice for the layer (None: the configuration's, :meth:`DFMPCConfig.scheme_for`).
    """
    if input_scale is not None:
        qw = quantize_for(ref / column_view(input_scale.to(ref.dtype), ref.dim()), bits, cfg, group_size, role,
                          scheme=scheme)
        return dataclasses.replace(qw, input_scale=input_scale)
    if cfg.method == "paper":
        if bits == 2:
            qw = quantize_weight(ref, bits, scheme="ternary", per_channel=False)
        else:
            qw = quantize_dorefa(ref, bits, per_channel=False, tanh=role in PAIR_ROLES)
    else:
        scheme = scheme or cfg.scheme_for(group_size)
        # "auto"'s zero-point layers start from the symmetric solution too (never worse than it)
        qw = quantize_weight(ref, bits, scheme=scheme, per_channel=quantizes_row_by_row(cfg, group_size),
                             group_size=group_size, affine_from_symmetric=cfg.scheme == "auto" and scheme == "asymmetric")
    # "float32" keeps the weight's own dtype (exact); "float16" stores scales at half the bytes
    return qw.with_scale_dtype(torch.float16) if cfg.scale_bits == 16 else qw


def plan_layer(inp: LayerInputs, cfg: DFMPCConfig) -> LayerPlan:
    """Quantize one layer and derive its data-free corrections.

    Mean correction shifts the following BatchNorm's mean (or the layer's bias) by the expected
    output error ``E[(Q - W) x]``; variance restoration predicts ``Var(Q x) / Var(W x)`` and
    either scales the pre-activation through the partner (``c``, with a shift that keeps the
    corrected mean) or, without a partner, puts the ratio into the BatchNorm's variance.
    """
    ref, bias, bn = inp.weight, inp.bias, inp.bn
    dtype = ref.dtype
    rep = LayerReport(name=inp.name, kind=inp.kind, role=inp.role, bits=inp.bits, numel=ref.numel(),
                      input_moments=inp.provenance)
    if inp.bits is None:
        return LayerPlan(inp.name, inp.role, ref, bias, None, None, None, rep)

    qw = quantize_for(ref, inp.bits, cfg, inp.group_size, inp.role, inp.input_scale, inp.scheme)
    q = qw.dequantize()
    rep.scheme = qw.scheme
    rep.input_scale_exponent = inp.input_scale_exponent
    mu = bn.mean if bn is not None else None
    mu_hat = mu  # BatchNorm mean after mean correction, as stored (in the statistics' dtype)
    new_bias = bias
    update = BatchNormUpdate(inp.bn_name) if bn is not None else None
    in_m = inp.in_moments

    red = None
    if cfg.compensate and cfg.method == "dfmpc" and in_m is not None:
        red = cmath.paired_reductions(q, ref, in_m.var, in_m.mean, inp.groups)
    rep.weight_rel_error = relative_error(q, ref, red)
    if red is not None and cfg.mean_correction and inp.mean_trusted:
        delta = red.q_out_mean - red.ref_out_mean
        if bn is not None and cfg.calibrates_means:
            recorded = mu if bias is None else mu - bias
            scale = cmath.recorded_mean_scale(red.ref_out_mean, recorded)
            # the recorded means are the float model's; the quantized model's inputs carry
            # upstream rounding noise, which moves them back towards the Gaussian prediction
            rep.mean_scale = 1.0 + (scale - 1.0) * inp.input_signal_fraction
            delta = delta * rep.mean_scale
        rep.mean_shift = float(delta.abs().mean())
        if bn is not None:
            stored = (mu + delta).to(bn.stats_dtype)
            update.running_mean = stored
            mu_hat = stored.to(dtype)
        else:
            new_bias = -delta if bias is None else bias - delta

    ratio = None
    if red is not None and cfg.scale_rule == "batchnorm":
        # Predicted Var(Q x) / Var(W x): the part of Q along W scales the variance BatchNorm
        # recorded; the rest is noise that sees only the input's per-channel variances.
        ratio = red.variance_ratio(bn.var if bn is not None else None)
    partner_scale = None
    if cfg.compensate and inp.partner is not None:
        if ratio is not None:
            # Restore each channel's variance around its (corrected) mean, as re-estimating
            # BatchNorm on data would: c scales the pre-activation, folded into the partner;
            # the shift keeps the mean where mean correction put it.
            c, degenerate = cmath.variance_restoring_coefficients(ratio)
            mean_ref = _expected_preactivation(red.ref_out_mean, bias, bn, mu)
            shift = cmath.mean_preserving_shift(mean_ref, c)
            if bn is not None and bn.bias is not None:
                update.bias = bn.bias + shift
            elif bn is None:
                new_bias = shift if new_bias is None else new_bias + shift
        else:
            c, degenerate = _coefficients(q, ref, bias, new_bias, bn, mu, mu_hat, in_m, inp.groups, cfg)
        rep.coeff_mean, rep.coeff_min, rep.coeff_max = float(c.mean()), float(c.min()), float(c.max())
        rep.degenerate_channels = int(degenerate.sum())
        rep.partner = inp.partner
        partner_scale = (c, inp.features_per_channel)
    elif ratio is not None and bn is not None:
        # No partner to absorb a scale: put the predicted variance into BatchNorm itself.
        update.running_var = ((bn.var + bn.eps) * ratio - bn.eps).clamp_min(0)
    if inp.fold_batchnorm and bn is not None:
        qw, q, new_bias = _fold_batchnorm_into_layer(qw, new_bias, bn, update)
        update = BatchNormUpdate(inp.bn_name, remove=True)
        rep.batchnorm_folded = inp.bn_name
    elif inp.fold_scales and bn is not None and bn.weight is not None and qw.scheme == "symmetric" \
            and qw.group_size is None and qw.scale.numel() == ref.shape[0] > 1:
        qw, q, new_bias = _fold_scales_into_batchnorm(qw, new_bias, bn, update, scratch=q)
        rep.scales_folded = True
    return LayerPlan(inp.name, inp.role, q, new_bias, qw, update, partner_scale, rep)


def _fold_scales_into_batchnorm(
    qw: QuantizedWeight, bias: Optional[torch.Tensor], bn: BatchNormState, update: BatchNormUpdate,
    scratch: Optional[torch.Tensor] = None,
) -> tuple[QuantizedWeight, torch.Tensor, Optional[torch.Tensor]]:
    """One scale ``S`` for the codes; each channel's ratio ``r = s / S`` moves into the
    BatchNorm that follows, which then gives the same output:
    ``gamma' (y / r - mu / r) / sqrt(v / r^2 + eps) + beta`` equals
    ``gamma (y - mu) / sqrt(v + eps) + beta`` for ``gamma' = gamma sqrt(v + eps r^2) / sqrt(v + eps)``
    (``mu``, ``v``: the statistics after correction). The layer's own bias is divided by ``r``.
    ``scratch``: the unfolded dequantized weight, no longer needed: the folded one is written
    into it (a fresh tensor of a large layer's size costs more than the pass)."""
    dtype = bn.var.dtype
    s = qw.scale.to(dtype)
    shared = s.log().mean().exp().to(qw.scale.dtype).reshape(1)  # geometric mean, in the storage dtype
    r = s / shared.to(dtype)
    mean, var, _, _ = _current_batchnorm(bn, update)
    update.running_mean = (mean / r).to(bn.stats_dtype)
    update.running_var = (var / r.square()).to(bn.stats_dtype)
    update.weight = bn.weight * torch.sqrt(var + bn.eps * r.square()) / torch.sqrt(var + bn.eps)
    folded = QuantizedWeight(qw.codes, shared, torch.zeros_like(shared), qw.bits, qw.scheme, None, qw.input_scale)
    return folded, folded.dequantize(out=scratch), None if bias is None else bias / r.view(-1)


def adds_bias(inp: LayerInputs, cfg: DFMPCConfig) -> bool:
    """Whether :func:`plan_layer` gives a layer without a bias one: mean correction with no
    BatchNorm to shift, a partner's mean-preserving shift with no BatchNorm, or a folded
    BatchNorm. A byte budget counts those floats before any width is chosen."""
    if inp.bias is not None or inp.bits is None:
        return False
    if inp.bn is not None:
        return inp.fold_batchnorm
    if not (cfg.compensate and cfg.method == "dfmpc" and inp.in_moments is not None):
        return False
    return (cfg.mean_correction and inp.mean_trusted) or (inp.partner is not None and cfg.scale_rule == "batchnorm")


def _current_batchnorm(
    bn: BatchNormState, update: BatchNormUpdate,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(mean, var, gamma, beta)`` of a BatchNorm as the plan leaves it: ``update``'s values
    where it has them, else the recorded ones (in the working dtype)."""
    pick = lambda new, old: old if new is None else new.to(bn.var.dtype)  # noqa: E731
    return (pick(update.running_mean, bn.mean), pick(update.running_var, bn.var),
            pick(update.weight, bn.weight), pick(update.bias, bn.bias))


def batchnorm_multiplier(bn: BatchNormState, update: BatchNormUpdate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, mean, beta)`` of a BatchNorm as the plan leaves it: it computes
    ``m (y - mean) + beta`` with ``m = gamma / sqrt(var + eps)``."""
    mean, var, gamma, beta = _current_batchnorm(bn, update)
    gamma = torch.ones_like(var) if gamma is None else gamma
    beta = torch.zeros_like(var) if beta is None else beta
    return gamma / torch.sqrt(var + bn.eps), mean, beta


def _fold_batchnorm_into_layer(
    qw: QuantizedWeight, bias: Optional[torch.Tensor], bn: BatchNormState, update: BatchNormUpdate,
) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """The layer followed by its (corrected) BatchNorm as one layer: ``m (Q x + b - mean) + beta``
    is ``(m Q) x + beta + m (b - mean)``, and ``m Q`` is the same codes with each channel's
    scales times ``|m|`` (codes negated where ``m < 0``, so scales stay positive; the graph side
    allows negative ``m`` only for zero-point-free schemes). Scales keep their storage dtype."""
    m, mean, beta = batchnorm_multiplier(bn, update)
    b = torch.zeros_like(m) if bias is None else bias.to(m.dtype)
    new_bias = beta + m * (b - mean)
    c_out = m.shape[0]
    sign = torch.where(m < 0, -1.0, 1.0).to(qw.codes.dtype)
    codes = qw.codes * sign.view((-1,) + (1,) * (qw.codes.dim() - 1)) if bool((m < 0).any()) else qw.codes
    scale = qw.scale.to(m.dtype)
    if scale.dim() == 1:
        scale = scale.expand(c_out)  # a per-tensor scale becomes one per channel
        zero_point = qw.zero_point.expand(c_out)
        scale = scale * m.abs()
    else:
        zero_point = qw.zero_point
        scale = scale * m.abs().unsqueeze(1)
    folded = QuantizedWeight(codes, scale.to(qw.scale.dtype).contiguous(), zero_point.contiguous().clone(), qw.bits,
                             qw.scheme, qw.group_size, qw.input_scale)
    return folded, folded.dequantize(), new_bias


def relative_error(q: torch.Tensor, ref: torch.Tensor, red: Optional[cmath.PairedReductions]) -> float:
    """||Q - W|| / ||W||: from the paired reductions when they are at hand (no pass over the
    weights), else, and where their difference cancels (~8 bits and up), measured directly."""
    rel = red.relative_error() if red is not None else math.nan
    if math.isnan(rel):
        # torch.dist fuses the difference into the reduction (no temporary)
        rel = float(torch.dist(q, ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
    return rel


def _bn_affine(bn: BatchNormState, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gamma = bn.weight if bn.weight is not None else torch.ones_like(like)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(like)
    return gamma, beta


def _expected_preactivation(
    z: torch.Tensor, bias: Optional[torch.Tensor], bn: Optional[BatchNormState], mu: Optional[torch.Tensor],
) -> torch.Tensor:
    """E[a]: the float layer's expected output ``z`` (no bias) after its bias or BatchNorm."""
    if bias is not None:
        z = z + bias
    if bn is None:
        return z
    gamma, beta = _bn_affine(bn, z)
    return gamma / torch.sqrt(bn.var + bn.eps) * (z - mu) + beta


def _coefficients(
    q: torch.Tensor,
    ref: torch.Tensor,
    bias: Optional[torch.Tensor],
    new_bias: Optional[torch.Tensor],
    bn: Optional[BatchNormState],
    mu: Optional[torch.Tensor],
    mu_hat: Optional[torch.Tensor],
    in_m: Optional[ChannelMoments],
    groups: int,
    cfg: DFMPCConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compensation coefficients of one pair's first layer (paper Eq. 27 or the derived form)."""
    dtype, c_out = ref.dtype, ref.shape[0]
    zeros = torch.zeros(c_out, dtype=dtype)
    b = bias if bias is not None else zeros
    b_hat = new_bias if new_bias is not None else zeros
    if bn is not None:
        gamma = bn.weight if bn.weight is not None else torch.ones(c_out, dtype=dtype)
        beta = bn.bias if bn.bias is not None else zeros
        g = gamma / torch.sqrt(bn.var + bn.eps)
    else:
        g, beta = torch.ones(c_out, dtype=dtype), zeros
        mu = mu_hat = zeros
    if cfg.method == "paper":
        y = g * (b - mu) + beta
        y_hat = g * (b_hat - mu_hat) + beta
        return cmath.paper_coefficients(q, ref, g, y, y_hat, cfg.lambda1, cfg.lambda2)
    if in_m is None:  # unknown input statistics: the paper's zero-mean, unit-variance assumption
        in_m = ChannelMoments(torch.zeros(ref.shape[1] * groups, dtype=dtype), torch.ones(ref.shape[1] * groups, dtype=dtype))
    mean_ref = g * (cmath.expected_output(ref, in_m.mean, groups) + b - mu) + beta
    mean_hat = g * (cmath.expected_output(q, in_m.mean, groups) + b_hat - mu_hat) + beta
    rule = cmath.variance_matching_coefficients if cfg.scale_rule == "variance" else cmath.derived_coefficients
    return rule(q, ref, g, mean_ref, mean_hat, in_m.var, groups)
