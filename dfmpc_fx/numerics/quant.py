"""Weight quantizers as plain tensor functions (no fx, no Lightning).

Every quantizer returns a :class:`QuantizedWeight`: integer codes, scales and zero points such
that ``dequantize() == (codes - zero_point) * scale`` broadcast over output channels (dim 0).
The fake-quant weight a module holds is exactly that dequantized tensor, so a packed artifact
(codes + scales) reproduces the fake-quant model bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = [
    "QuantizedWeight",
    "quantize_uniform",
    "quantize_ternary_twn",
    "quantize_dorefa",
    "fake_quantize_weight",
    "scale_overhead_bits",
    "group_count",
    "expand_groups",
    "SCALE_DTYPES",
    "column_view",
    "row_std",
    "quantize_uniform_widths",
    "row_dot",
    "reduces_row_by_row",
]

#: Storage dtypes of scales and zero points: float32 (the weight's dtype, exact) or float16
#: (half the overhead: a 3x3 depthwise filter's per-channel scale costs 1.8 instead of 3.6 bits
#: per weight; an fp16 scale has 11 significant bits, far finer than a 2-8 bit grid).
SCALE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


def column_view(factors: torch.Tensor, weight_dim: int) -> torch.Tensor:
    """``factors`` (one per input channel, dim 1 of a weight) shaped to broadcast over a
    weight of ``weight_dim`` dimensions."""
    return factors.reshape((1, -1) + (1,) * (weight_dim - 2))


@dataclass
class QuantizedWeight:
    """Integer codes plus the affine map back to float.

    ``scale`` and ``zero_point`` have shape ``(C,)`` for per-channel quantizers (C = output
    channels, dim 0 of the weight), ``(1,)`` for per-tensor ones, or ``(C, G)`` when grouped
    (``group_size`` consecutive weights of the flattened ``(C, K)`` row share one; G =
    ceil(K / group_size)). ``input_scale`` (``(C_in,)``, or None): per-input-channel factors
    the dequantized codes are multiplied by along dim 1
    (:mod:`dfmpc_fx.numerics.input_scales`).
    """

    codes: torch.Tensor  # integer-valued, in the weight's float dtype (no conversion passes)
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    scheme: str  # "symmetric", "asymmetric", "ternary", "dorefa"
    group_size: Optional[int] = None  # input weights per scale; None: one scale per channel
    input_scale: Optional[torch.Tensor] = None  # (C_in,) factors along dim 1; None: none

    def dequantize(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The float weight. ``out``: a tensor of the codes' shape and dtype to write it into
        (per-channel and per-tensor layouts; a grouped one returns a new tensor)."""
        w = self._dequantize_codes(out)
        if self.input_scale is None:
            return w
        return w.mul_(column_view(self.input_scale.to(w.dtype), w.dim()))  # w is new (or out)

    def _dequantize_codes(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        # scales and zero points may be stored narrower (float16): compute in the codes' dtype
        scale_t = self.scale.to(self.codes.dtype)
        zp_t = self.zero_point.to(self.codes.dtype)
        if self.group_size is not None:
            rows = self.codes.reshape(self.codes.shape[0], -1)
            k = rows.shape[1]
            scale = expand_groups(scale_t, k, self.group_size)
            if self.scheme in ("symmetric", "ternary"):
                return (rows * scale).reshape(self.codes.shape)
            zp = expand_groups(zp_t, k, self.group_size)
            return ((rows - zp) * scale).reshape(self.codes.shape)
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        if self.scheme in ("symmetric", "ternary"):  # zero point is 0: one pass
            return torch.mul(self.codes, scale_t.view(shape), out=out)
        return torch.sub(self.codes, zp_t.view(shape), out=out).mul_(scale_t.view(shape))

    def with_scale_dtype(self, dtype: torch.dtype) -> "QuantizedWeight":
        """The same codes with scales and zero points stored as ``dtype`` (float16 halves their
        bytes). The codes need no re-rounding: float16 moves a scale by at most 2^-11 of itself,
        which shifts a code of at most 255 by under 0.13 of a step; integer zero points below 2048
        are exact. ``dequantize`` then uses the rounded scales, so corrections see the stored grid."""
        if self.scale.dtype == dtype and (self.input_scale is None or self.input_scale.dtype == dtype):
            return self
        return QuantizedWeight(self.codes, self.scale.to(dtype), self.zero_point.to(dtype), self.bits, self.scheme,
                               self.group_size, None if self.input_scale is None else self.input_scale.to(dtype))

    @property
    def qmin(self) -> int:
        return int(self.codes.min()) if self.codes.numel() else 0

    @property
    def num_levels(self) -> int:
        return 2**self.bits


#: Step of the MSE-optimal uniform quantizer for a unit Gaussian, by bit width (narrow range).
_GAUSSIAN_STEP: dict[int, float] = {2: 1.224, 3: 0.66, 4: 0.40}


def _per_channel_view(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Rows are the groups that share one scale: output channels, or one row for the tensor."""
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def _check_weight(w: torch.Tensor, bits: int) -> None:
    if not torch.is_floating_point(w):
        raise TypeError(f"expected a floating-point weight, got {w.dtype}")
    if not 2 <= bits <= 16:
        raise ValueError(f"bits={bits} out of range 2..16")


def reduces_row_by_row(n_rows: int) -> bool:
    """Whether torch reduces each row of an ``(n_rows, K)`` tensor along dim 1 in one thread, so
    a row's result does not depend on the rows around it: true from as many rows as torch has
    threads. With fewer, it may split a row's own reduction, and a row can then move by an ulp
    between a batch and a call of its own. The batched and blockwise paths here and in the
    allocator (stacked scoring, stacked input-factor candidates) hold only where this is true."""
    return n_rows >= torch.get_num_threads()


#: Elements of one float64 chunk in :func:`row_std` (2 MiB), and the layer size from which the
#: chunked path pays (below it the one-shot reductions are as fast).
_STD_CHUNK = 262_144
_STD_CHUNKED_FROM = 1 << 20


def _float64_row_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows.sum(dim=1, dtype=float64), vector_norm(rows, dim=1, dtype=float64))``, equal bit
    for bit. On CPU each of those reductions first converts the whole tensor to float64 (a
    fresh allocation twice the rows' size, page faults included: 40 ms for resnet50's fc); here
    blocks of rows are converted into one reused float64 buffer and reduced there, the same
    kernel on the same values. Blocks hold at least as many rows as torch has threads, so each
    row is still reduced by one thread, in the order the one-shot reduction uses."""
    c, k = rows.shape
    if rows.numel() < _STD_CHUNKED_FROM or not reduces_row_by_row(c) or not rows.is_contiguous() \
            or rows.device.type != "cpu":
        return (rows.sum(dim=1, dtype=torch.float64),
                torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64))
    threads = torch.get_num_threads()
    step = max(threads, _STD_CHUNK // k)
    total = torch.empty(c, dtype=torch.float64)
    norm = torch.empty(c, dtype=torch.float64)
    buf = torch.empty(min(step, c), k, dtype=torch.float64)
    for start in range(0, c, step):
        end = min(start + step, c)
        start = min(start, end - threads)  # a short last block reaches back: >= threads rows too
        b = buf[:end - start]
        b.copy_(rows[start:end])
        torch.sum(b, dim=1, out=total[start:end])
        torch.linalg.vector_norm(b, dim=1, out=norm[start:end])
    return total, norm


def row_std(rows: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of each row of a 2-D float tensor, as ``rows.std(dim=1,
    correction=0)`` gives it: both accumulate in float64 and round once to the rows' dtype
    (equal on every row of torchvision's resnet50 and of the committed checkpoints), but from two
    plain float64 reductions (sum, sum of squares) instead of a Welford pass, about 4x faster on
    CPU (and on large layers blockwise, :func:`_float64_row_moments`). Rows whose mean dominates
    their spread (``E[x^2] > 16 Var``), where the one-pass formula would cancel, take
    ``torch.std`` itself."""
    if rows.dtype != torch.float32 or rows.shape[1] == 0:
        return rows.std(dim=1, correction=0)
    k = rows.shape[1]
    total, norm = _float64_row_moments(rows)
    mean = total.div_(k)
    mean_sq = norm.square_().div_(k)
    var = mean_sq - mean * mean
    out = var.clamp_min(0.0).sqrt_().to(rows.dtype)
    risky = mean_sq > 16.0 * var
    if bool(risky.any()):
        idx = risky.nonzero().reshape(-1)
        out[idx] = rows[idx].std(dim=1, correction=0)
    return out


class _RowStats:
    """The row statistics a symmetric starting scale reads, each computed once when first asked
    for (several widths of one weight share them)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            rows = self.rows
            if key == "absmean":
                # the L1 norm fuses |w| into the reduction (no temporary of the rows' size)
                self._cache[key] = torch.linalg.vector_norm(rows, ord=1, dim=1).div_(rows.shape[1])
            elif key == "std":
                self._cache[key] = row_std(rows)
            else:  # "maxabs": max(max w, -min w), two plain reductions (3x faster than |w| then max)
                self._cache[key] = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg())
        return self._cache[key]


def _symmetric_start(bits: int, stats: _RowStats) -> torch.Tensor:
    """Each row's starting scale for the narrow signed grid of ``bits``.

    At 2-4 bits, the MSE-optimal step of a Gaussian with the row's spread (TWN's threshold rule,
    step 1.4 E|w|, at 2 bits); the refinement then adapts it to the actual, often heavier-tailed,
    weights. Above, max-abs (near optimal there)."""
    if bits == 2:
        return stats.get("absmean") * 1.4
    if bits in _GAUSSIAN_STEP:
        return stats.get("std") * _GAUSSIAN_STEP[bits]
    return stats.get("maxabs") / (2 ** (bits - 1) - 1)


def row_dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.vecdot(a, b, dim=1)`` for real 2-D tensors, equal bit for bit (vecdot is
    that product then that sum), with the product written into ``scratch`` (``a``'s shape and
    dtype) instead of a fresh tensor: 3x faster on a large layer, where the allocation's page
    faults cost more than the arithmetic."""
    return torch.mul(a, b, out=scratch).sum(dim=1)


def _refine_symmetric(
    rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, iters: int, clamp: Callable[[torch.Tensor], None]
) -> torch.Tensor:
    """Alternating least squares on ``w ~ s q``: the scale optimal for the codes
    (``<w,q>/<q,q>``), then the codes for that scale (rounded into ``codes`` in place and
    clamped by ``clamp``); never increases a row's squared error. Returns the scales."""
    scratch = torch.empty_like(rows) if iters else None
    for _ in range(iters):
        qq = torch.linalg.vector_norm(codes, dim=1).square_()  # <q,q>; 5x faster than vecdot
        new_scale = row_dot(rows, codes, scratch) / qq.clamp_min(1.0)
        scale = torch.where((qq > 0) & (new_scale > 0), new_scale, scale)
        torch.div(rows, scale[:, None], out=codes).round_()
        clamp(codes)
    return scale


def _quantize_rows(
    rows: torch.Tensor, bits: int, symmetric: bool, refine_iters: int, grouped: bool = False,
    affine_from_symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and zero point of each row of ``rows`` (one scale per row).

    ``affine_from_symmetric`` (asymmetric only): refine from two starts, min/max and the refined
    symmetric solution with its zero point at mid-range, and keep each row's better one. The
    symmetric grid is the affine one less its top level, so the result is never worse than the
    symmetric quantizer (min/max alone is, by far, at 2-3 bits: it spends levels on outliers)."""
    if not symmetric and affine_from_symmetric:
        qmax_u = 2**bits - 1
        iters = max(refine_iters, 1)
        c_mm, s_mm, z_mm = _quantize_rows(rows, bits, False, 0)
        c_mm, s_mm, z_mm, e_mm = _refine_affine(rows, c_mm, s_mm, z_mm, qmax_u, iters, with_error=True)
        c_s, s_s, _ = _quantize_rows(rows, bits, True, iters, grouped)
        mid = float(2 ** (bits - 1) - 1)
        z_s = torch.full_like(s_s, mid)
        c_s, s_s, z_s, e_s = _refine_affine(rows, c_s.add_(mid), s_s, z_s, qmax_u, iters, with_error=True)
        pick = e_s < e_mm
        return (torch.where(pick[:, None], c_s, c_mm, out=c_mm), torch.where(pick, s_s, s_mm),
                torch.where(pick, z_s, z_mm))
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _symmetric_start(bits, _RowStats(rows))
        # a 1-weight group has std 0: start from max-abs there (else its scale would be 1);
        # grouped only, so the per-channel path stays as it was
        if grouped and bits in _GAUSSIAN_STEP and rows.shape[1] == 1:
            scale = rows[:, 0].abs() / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.div(rows, scale[:, None]).round_()
        if bits in _GAUSSIAN_STEP:
            codes.clamp_(-qmax, qmax)  # a max-abs step cannot overflow: |w| / (max|w| / qmax) <= qmax
        scale = _refine_symmetric(rows, codes, scale, refine_iters, lambda t: t.clamp_(-qmax, qmax))
        zero_point = torch.zeros_like(scale)
    else:
        qmax_u = 2**bits - 1
        lo = rows.amin(dim=1).clamp(max=0.0)
        hi = rows.amax(dim=1).clamp(min=0.0)
        scale = (hi - lo) / qmax_u
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(-lo / scale).clamp(0, qmax_u)
        codes = torch.div(rows, scale[:, None]).round_().add_(zero_point[:, None]).clamp_(0, qmax_u)
        if grouped and refine_iters:
            codes, scale, zero_point = _refine_affine(rows, codes, scale, zero_point, qmax_u, refine_iters)
    return codes, scale, zero_point


def _refine_affine(
    rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax_u: int, iters: int,
    with_error: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Alternating least squares for ``w ~ s (q - z)`` with an integer zero point ``z``.

    Min/max spends levels on the extremes of a row; here the affine map is refit to the codes
    (``w ~ a q + b`` by least squares, ``z = round(-b / a)``, then the ``s`` optimal for
    ``q - z``), codes are re-rounded, and each row keeps its best iterate (never worse than
    its start). ``with_error``: also each row's squared error (the caller compares starts).

    Cost (the zero-point option is scored and applied on every classifier and transformer
    projection): the fits read three row moments of the codes (``sum q``, ``sum q^2``,
    ``sum q w``) instead of centred copies, and a new iterate's error is the rounding residual
    ``w / s + z - q`` left in the buffer the codes were rounded from (``s^2 sum r^2``: no
    cancellation, unlike expanding ``sum (w - s (q - z))^2``); one scratch buffer and two code
    buffers, reused (inside ``compress`` a fresh layer-sized tensor page-faults: the classifier of
    resnet50 took 116 ms with a new tensor per step, 57 ns per weight). ``codes`` is overwritten.
    """
    k = rows.shape[1]
    buf = torch.empty_like(rows)
    cand = torch.empty_like(rows) if iters else None  # the next iterate's codes (two code buffers, swapped)
    torch.sub(codes, zero_point[:, None], out=buf).mul_(scale[:, None])
    best = torch.linalg.vector_norm(torch.sub(rows, buf, out=buf), dim=1).square_()
    w_sum = rows.sum(dim=1)
    w_mean = w_sum / k
    for _ in range(iters):
        q_sum = codes.sum(dim=1)
        q_sq = torch.linalg.vector_norm(codes, dim=1).square_()
        qw = row_dot(rows, codes, buf)  # buf is free here: rewritten below
        q_mean = q_sum / k
        var = q_sq - q_sum * q_mean  # sum (q - mean q)^2: 0, or at least (k - 1) / k for integer codes
        a = (qw - q_mean * w_sum) / var.clamp_min(1e-12)
        ok = (var > 0.25) & (a > 0)
        a = torch.where(ok, a, scale)
        z = torch.where(ok, torch.round(-(w_mean - a * q_mean) / a), zero_point).clamp(0, qmax_u)
        dd = q_sq - 2.0 * z * q_sum + k * z * z  # sum (q - z)^2: 0, or at least 1
        s = (qw - z * w_sum) / dd.clamp_min(1e-12)
        s = torch.where((dd > 0.5) & (s > 0), s, a)
        torch.div(rows, s[:, None], out=buf).add_(z[:, None])
        c = torch.round(buf, out=cand).clamp_(0, qmax_u)
        e = torch.linalg.vector_norm(buf.sub_(c), dim=1).square_().mul_(s * s)
        better = e < best
        if bool(better.all()):
            codes, scale, zero_point, cand = c, s, z, codes  # the old codes' buffer is the next candidate's
        else:
            torch.where(better[:, None], c, codes, out=codes)
            scale = torch.where(better, s, scale)
            zero_point = torch.where(better, z, zero_point)
        best = torch.minimum(e, best)
    return (codes, scale, zero_point, best) if with_error else (codes, scale, zero_point)


def group_count(k: int, group_size: Optional[int]) -> int:
    """Groups of one output channel's ``k`` input weights (the last one may be shorter)."""
    if group_size is None:
        return 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    return -(-k // group_size)


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Per-group values ``(C, G)`` repeated over their input weights: ``(C, k)``.

    An index gather (``t[:, j // group_size]``) rather than padding, so a shorter last group
    needs no padded codes; the packed modules compute the same gather in ``forward``.
    """
    idx = torch.div(torch.arange(k, device=t.device), group_size, rounding_mode="floor")
    return t.reshape(t.shape[0], -1).index_select(1, idx)


def scale_overhead_bits(numel: int, c_out: int, group_size: Optional[int], scheme: str, scale_bits: int = 32) -> int:
    """Bits that the scales and zero points of one layer cost.

    One ``scale_bits`` float scale per group (a row of ``group_size`` input weights of one output
    channel; the whole channel when ``group_size`` is None; pass ``c_out=1`` for per-tensor)
    plus a zero point of the same width for the schemes whose zero point is not constant
    (``asymmetric``, ``dorefa``). The width is that of the stored buffers (float32, or float16
    with ``DFMPCConfig(scale_dtype="float16")``), which is what ``compress``'s size report counts.
    """
    if c_out < 1 or numel % c_out:
        raise ValueError(f"numel={numel} is not a multiple of c_out={c_out}")
    if scale_bits not in (16, 32):
        raise ValueError(f"scale_bits must be 16 or 32, got {scale_bits!r}")
    n_scales = c_out * group_count(numel // c_out, group_size)
    per_scale = 2 * scale_bits if scheme in ("asymmetric", "dorefa") else scale_bits
    return n_scales * per_scale


def quantize_uniform(
    w: torch.Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    symmetric: bool = True,
    refine_iters: int | None = None,
    group_size: Optional[int] = None,
    affine_from_symmetric: bool = False,
) -> QuantizedWeight:
    """Uniform quantizer with a zero level.

    Symmetric uses the narrow signed range ``[-(2^(b-1)-1), 2^(b-1)-1]`` (2 bits is ternary);
    asymmetric uses ``[0, 2^b-1]`` with a per-row zero point from min/max.

    For symmetric low bit widths the max-abs scale wastes most levels on outliers, so the scale
    starts from the MSE-optimal step for a Gaussian of the row's spread and is refined by
    alternating least squares (codes for a scale, then the scale that is optimal for those codes,
    ``s = <w,q>/<q,q>``), which never increases the squared error. By default this runs 2
    iterations for <= 4 bits and none above (max-abs is near optimal there and the refinement
    would cost time on most of a model's weights).

    ``group_size``: one scale (and zero point) per ``group_size`` consecutive input weights of
    each output channel (the flattened ``(C_out, K)`` row; the last group is shorter when
    ``group_size`` does not divide K); asymmetric groups then refine min/max by alternating least
    squares on (scale, integer zero point) (per-channel asymmetric stays min/max, as before). At 2-3 bits a channel's range is set by a few outliers;
    smaller groups confine each outlier's damage. Scale and zero point then have shape
    ``(C_out, G)``; requires ``per_channel``.

    ``affine_from_symmetric`` (asymmetric only; ``DFMPCConfig(scheme="auto")`` under a size
    budget): every row or group is refined by least squares from min/max and from the symmetric
    solution, and keeps the better (never worse than the symmetric quantizer; at least one
    iteration even above 4 bits).
    """
    _check_weight(w, bits)
    if refine_iters is None:
        refine_iters = 2 if bits <= 4 else 0
    if group_size is None:
        rows = _per_channel_view(w.detach(), per_channel)
        codes, scale, zero_point = _quantize_rows(rows, bits, symmetric, refine_iters,
                                                  affine_from_symmetric=affine_from_symmetric)
    else:
        if not per_channel:
            raise ValueError("group_size needs per_channel=True (groups split each output channel)")
        rows = w.detach().reshape(w.shape[0], -1)
        c, k = rows.shape
        n_groups = group_count(k, group_size)
        full = k // group_size  # groups of exactly group_size weights
        parts = []
        if full:
            parts.append(_quantize_rows(rows[:, : full * group_size].reshape(c * full, group_size), bits, symmetric,
                                        refine_iters, grouped=True, affine_from_symmetric=affine_from_symmetric))
        if full < n_groups:  # the shorter last group
            parts.append(_quantize_rows(rows[:, full * group_size:].contiguous(), bits, symmetric, refine_iters,
                                        grouped=True, affine_from_symmetric=affine_from_symmetric))
        codes = torch.cat([p[0].reshape(c, -1) for p in parts], dim=1)
        scale = torch.cat([p[1].reshape(c, -1) for p in parts], dim=1)
        zero_point = torch.cat([p[2].reshape(c, -1) for p in parts], dim=1)
    return QuantizedWeight(
        codes=codes.reshape(w.shape),
        scale=scale.to(w.dtype),
        zero_point=zero_point.to(w.dtype),
        bits=bits,
        scheme="symmetric" if symmetric else "asymmetric",
        group_size=group_size,
    )


def quantize_uniform_widths(w: torch.Tensor, widths: list[int]) -> list[QuantizedWeight]:
    """``[quantize_uniform(w, b) for b in widths]`` (symmetric, per channel, default refinement),
    equal to it bit for bit, in one batched pass over ``len(widths)`` stacked copies of the rows.

    The allocator scores every candidate width on a small sample of rows, where each quantizer
    call is dominated by per-operation overhead, not arithmetic (measured gain is modest: the
    scoring of resnet50's 54 layers took 0.22 s instead of 0.27 s). It runs the same start rule
    and refinement as :func:`quantize_uniform` (``_symmetric_start``, ``_refine_symmetric``);
    every step is row-wise, so stacking changes no row's result, and the clamp that only the
    Gaussian-start widths apply is a no-op on max-abs rows (``|w| / (max|w| / qmax) <= qmax``).
    """
    if not widths:
        return []
    for b in widths:
        _check_weight(w, b)
    rows = w.detach().reshape(w.shape[0], -1)
    c = rows.shape[0]
    if not reduces_row_by_row(c):
        # fewer rows than threads: torch splits a row's own reduction across threads, and that
        # split depends on how many rows there are, so stacking could move a scale by an ulp
        return [quantize_uniform(w, b) for b in widths]
    # refined widths (the default: 2 iterations at <= 4 bits) first, so they are one slice
    order = sorted(range(len(widths)), key=lambda i: widths[i] > 4)
    n_refined = sum(1 for b in widths if b <= 4)
    stats = _RowStats(rows)
    scale = torch.cat([_symmetric_start(widths[i], stats) for i in order])
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stacked = rows.repeat(len(widths), 1)
    codes = torch.div(stacked, scale[:, None]).round_()

    def clamp_blocks(t: torch.Tensor, count: int) -> None:
        for j in range(count):  # one scalar clamp per width: broadcast bounds cost more
            qmax = 2 ** (widths[order[j]] - 1) - 1
            t[j * c:(j + 1) * c].clamp_(-qmax, qmax)

    clamp_blocks(codes, len(widths))
    if n_refined:
        end = n_refined * c
        scale[:end] = _refine_symmetric(stacked[:end], codes[:end], scale[:end], 2,
                                        lambda t: clamp_blocks(t, n_refined))
    out: list[Optional[QuantizedWeight]] = [None] * len(widths)
    for j, i in enumerate(order):
        s_j = scale[j * c:(j + 1) * c]
        out[i] = QuantizedWeight(codes=codes[j * c:(j + 1) * c].reshape(w.shape), scale=s_j.to(w.dtype),
                                 zero_point=torch.zeros_like(s_j).to(w.dtype), bits=widths[i], scheme="symmetric")
    return out


def quantize_ternary_twn(w: torch.Tensor, *, per_channel: bool = False) -> QuantizedWeight:
    """Ternary weight networks (Li et al. 2016), the paper's 2-bit quantizer.

    Threshold ``delta = 0.7 * E|w|``; the scale is the mean magnitude of the weights above it.
    One scale per layer in the paper (``per_channel=False``).
    """
    _check_weight(w, 2)
    rows = _per_channel_view(w.detach(), per_channel)
    delta = 0.7 * rows.abs().mean(dim=1)
    mask = rows.abs() > delta[:, None]
    count = mask.sum(dim=1)
    alpha = (rows.abs() * mask).sum(dim=1) / count.clamp_min(1)
    alpha = torch.where(count > 0, alpha, torch.ones_like(alpha))
    codes = torch.sign(rows) * mask
    return QuantizedWeight(
        codes=codes.reshape(w.shape).to(w.dtype),
        scale=alpha.to(w.dtype),
        zero_point=torch.zeros_like(alpha).to(w.dtype),
        bits=2,
        scheme="ternary",
    )


def quantize_dorefa(w: torch.Tensor, bits: int, *, per_channel: bool = False, tanh: bool = True) -> QuantizedWeight:
    """DoReFa-Net weight quantizer (Zhou et al. 2016), the paper's k-bit quantizer (Eq. 6).

    ``tanh=True`` (the paper): ``w_q = 2 round_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1`` in
    [-1, 1], times ``max|w|`` to give a pretrained layer its magnitude back. That maps ``w`` to
    about ``max|w| tanh(w) / tanh(max|w|)``: a gain of ``max|w| / tanh(max|w|)`` on small
    weights and a warped grid, far from ``w`` once max |w| is not small (relative weight errors
    of 1.4-8.0 on timm-style weights; 0.35 on the ResNet-20's first conv at 6 and at 8 bits),
    whatever the bit width: the error is the warp, not the rounding.

    ``tanh=False``: the same 2^k uniform levels on ``w / max|w|`` directly, which stays close to
    the float weights (8 bits: < 1% relative error at max |w| ~ 3).

    ``method="paper"`` uses the tanh form only inside compensable pairs (the low/high layers
    the paper quantizes and compensates: there its baseline is defined by it, and on the
    ResNet-20 benchmark the tanh gain on the 6-bit layers happens to offset TWN's shrinkage of
    the 2-bit ones: ``paper@MP2/6`` drops from 77.7% to 24.9% of the first 1000 test images
    when every layer loses it) and ``tanh=False`` on every other layer (first/last, default,
    opaque blocks), where the paper prescribes nothing and the warp only destroys the model
    (see :func:`dfmpc_fx.transform.plan.quantize_for`).

    Same contract either way: ``(codes - zero_point) * scale``, ``zero_point = (2^k - 1) / 2``.
    DoReFa has no zero level: near-zero weights become +-max/(2^k - 1).
    """
    _check_weight(w, bits)
    rows = _per_channel_view(w.detach(), per_channel)
    n = 2**bits - 1
    amax = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg())
    if tanh:
        t = torch.tanh(rows)
        tmax = t.abs().amax(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
        codes = torch.round((t / (2 * tmax[:, None]) + 0.5) * n)
    else:
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        codes = torch.round((rows / (2 * safe[:, None]) + 0.5) * n).clamp_(0, n)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    # value = amax * (2 q / n - 1) = (q - n/2) * (2 amax / n)
    scale = 2 * amax / n
    zero_point = torch.full_like(scale, n / 2)
    return QuantizedWeight(
        codes=codes.reshape(w.shape).to(w.dtype),
        scale=scale.to(w.dtype),
        zero_point=zero_point.to(w.dtype),
        bits=bits,
        scheme="dorefa",
    )


def fake_quantize_weight(
    w: torch.Tensor,
    bits: int,
    *,
    scheme: str = "symmetric",
    per_channel: bool = True,
    group_size: Optional[int] = None,
) -> torch.Tensor:
    """Quantize then dequantize ``w``: the float tensor a fake-quant layer computes with.

    ``scheme`` is one of ``symmetric``, ``asymmetric``, ``ternary`` (2 bits only), ``dorefa``.
    """
    return quantize_weight(w, bits, scheme=scheme, per_channel=per_channel, group_size=group_size).dequantize()


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    *,
    scheme: str = "symmetric",
    per_channel: bool = True,
    group_size: Optional[int] = None,
    affine_from_symmetric: bool = False,
) -> QuantizedWeight:
    """Dispatch to the quantizer named by ``scheme``; ``group_size`` and
    ``affine_from_symmetric`` are for the uniform ones (:func:`quantize_uniform`)."""
    if scheme == "symmetric":
        return quantize_uniform(w, bits, per_channel=per_channel, symmetric=True, group_size=group_size)
    if scheme == "asymmetric":
        return quantize_uniform(w, bits, per_channel=per_channel, symmetric=False, group_size=group_size,
                                affine_from_symmetric=affine_from_symmetric)
    if group_size is not None:
        raise ValueError(f"group_size is supported by the symmetric and asymmetric schemes, not {scheme!r}")
    if scheme == "ternary":
        if bits != 2:
            raise ValueError(f"ternary quantization is 2-bit, got bits={bits}")
        return quantize_ternary_twn(w, per_channel=per_channel)
    if scheme == "dorefa":
        return quantize_dorefa(w, bits, per_channel=per_channel)
    raise ValueError(f"unknown quantizer scheme {scheme!r}")


__all__.append("quantize_weight")
