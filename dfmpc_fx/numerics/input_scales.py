"""Per-input-channel factors of a weight, chosen from data-free input moments (plain tensor
functions: no fx, no modules).

A rounding error in column ``j`` of a layer reaches its output multiplied by input ``x_j``:
with the mean part removed by mean correction, ``E||dW (x - mu)||^2 = sum_ij dW_ij^2 Var(x_j)``
(inputs taken as uncorrelated). A per-output-channel grid spends the same resolution on every
column, so the columns whose inputs vary most carry most of the output noise. Quantizing
``W / t`` with ``t_j = Var(x_j)^(-alpha/2)`` and storing ``t`` (the weight is ``Q(W / t) * t``)
moves resolution to those columns: the idea of AWQ (activation-aware weight quantization), with
the input variances taken from the BatchNorm/LayerNorm moments the library already propagates
instead of calibration data. ``alpha`` is picked among a few exponents by the allocator's own
noise estimate (:class:`dfmpc_fx.numerics.allocation._RowReference`) on a sample of rows;
``alpha = 0`` (no factors) is among them, so on that estimate the choice never loses.
The factors cost one stored value per input channel (``C_in`` of a ``C_out x C_in x k`` weight).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .allocation import _RowReference, sample_rows
from .quant import column_view, reduces_row_by_row

__all__ = ["INPUT_SCALE_EXPONENTS", "InputFactors", "column_view", "input_channel_factors", "choose_input_factors"]

#: Exponents ``alpha`` tried for ``t_j = Var(x_j)^(-alpha/2)``; 0 is "no factors".
INPUT_SCALE_EXPONENTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Variances below this share of the largest are raised to it (a dead input channel would
#: otherwise get an unbounded factor).
_VAR_FLOOR = 1e-4


def input_channel_factors(in_var: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """``t_j = Var(x_j)^(-alpha/2)``, normalized to geometric mean 1 and rounded to the storage
    ``dtype`` (the weight is quantized against the stored values, so packing is exact)."""
    v = in_var.to(torch.float64)
    v = v.clamp_min(float(v.max()) * _VAR_FLOOR)
    log_t = -0.5 * alpha * v.log()
    return (log_t - log_t.mean()).exp().to(dtype)


@dataclass
class InputFactors:
    """The choice for one layer: ``alpha``, the ``factors`` (None: none) and the predicted
    noise-to-signal ratio they remove (``saved``, on the sampled rows)."""

    alpha: float
    factors: Optional[torch.Tensor]
    saved: float


def choose_input_factors(
    weight: torch.Tensor,
    in_var: torch.Tensor,
    quantize: Callable[[torch.Tensor], torch.Tensor],
    store_dtype: torch.dtype,
    ref_var: Optional[torch.Tensor] = None,
    exponents: tuple[float, ...] = INPUT_SCALE_EXPONENTS,
    max_rows: int = 64,
    row_wise: bool = False,
) -> InputFactors:
    """:class:`InputFactors` of a weight ``(C_out, C_in, *kernel)`` whose input channels have
    variances ``in_var`` ``(C_in,)``: the exponent whose ``Q(W / t) * t`` has the least
    predicted output noise-to-signal on (at most ``max_rows``) sampled rows; ``factors`` is
    None for ``alpha = 0`` or when the variances give nothing to weigh (all equal, none
    positive, not finite). ``quantize(w)`` returns the dequantized ``w`` at the reference width;
    ``ref_var``: the float output variance per channel where a BatchNorm recorded it.
    ``row_wise``: ``quantize`` treats each row on its own (per-channel or grouped scales), so the
    candidates' rows are stacked and quantized in one call (each row as its own call gives it;
    not done with fewer sampled rows than torch has threads, where a reduction's split could
    move a value by an ulp)."""
    v = in_var.detach()
    if v.numel() != weight.shape[1] or v.numel() < 2 or not bool(torch.isfinite(v).all()) or not float(v.max()) > 0:
        return InputFactors(0.0, None, 0.0)
    if float(v.min()) >= float(v.max()) * (1 - 1e-6):
        return InputFactors(0.0, None, 0.0)
    rows = sample_rows(weight.shape[0], max_rows)
    w = weight.detach()[rows]
    k = w[0, 0].numel() if w.dim() > 2 else 1
    u = v.repeat_interleave(k) if k > 1 else v
    reference = _RowReference(w.reshape(w.shape[0], -1), u, None if ref_var is None else ref_var[rows])
    candidates: list[Optional[torch.Tensor]] = []
    scaled: list[torch.Tensor] = []  # the rows each candidate quantizes: W / t
    columns: list[Optional[torch.Tensor]] = []
    for alpha in exponents:
        t = None if alpha == 0 else input_channel_factors(v, alpha, store_dtype)
        candidates.append(t)
        tv = None if t is None else column_view(t.to(w.dtype), w.dim())
        columns.append(tv)
        scaled.append(w if tv is None else w / tv)
    if row_wise and len(scaled) > 1 and reduces_row_by_row(w.shape[0]):
        rounded = list(torch.split(quantize(torch.cat(scaled)), w.shape[0]))
    else:
        rounded = [quantize(x) for x in scaled]
    quantized = [q if tv is None else q * tv for q, tv in zip(rounded, columns)]
    ratios = reference.ratios(torch.stack([q.reshape(w.shape[0], -1) for q in quantized]))
    best = min(range(len(exponents)), key=lambda i: (ratios[i], exponents[i]))
    plain = ratios[exponents.index(0.0)] if 0.0 in exponents else ratios[best]
    return InputFactors(float(exponents[best]), candidates[best], max(plain - ratios[best], 0.0))
