"""Closed-form DF-MPC math as plain tensor functions (no fx, no Lightning).

Notation (see docs/method.md): layer l has float weights ``W`` (reference) and quantized weights
``Q``; its BatchNorm has ``gamma, beta, mu, sigma``; ``a = gamma/sigma * (W x - mu) + beta`` is
the pre-activation the next layer sees through a positively homogeneous activation, and ``c_j``
scales channel j of the quantized pre-activation so that ``c_j a^_j ~ a_j``.

All functions work per output channel and accept weights of shape ``(C_out, C_in/groups, *k)``
(conv) or ``(C_out, C_in)`` (linear); ``in_mean``/``in_var`` have one entry per *input* channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ChannelMoments",
    "relu_moments",
    "leaky_relu_moments",
    "weighted_channel_inner",
    "expected_output",
    "paper_coefficients",
    "derived_coefficients",
    "variance_matching_coefficients",
    "mean_correction",
    "fold_input_scale",
    "scale_input_moments",
]


@dataclass
class ChannelMoments:
    """Per-channel mean and variance of a tensor, as the data-free methods estimate them."""

    mean: torch.Tensor
    var: torch.Tensor

    def __post_init__(self) -> None:
        self.var = self.var.clamp_min(0.0)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def relu_moments(m: ChannelMoments) -> ChannelMoments:
    """Moments of ``relu(z)`` for ``z ~ N(mean, var)`` (rectified Gaussian), per channel."""
    std = m.var.sqrt()
    safe = std.clamp_min(1e-12)
    t = m.mean / safe
    first = m.mean * _Phi(t) + std * _phi(t)
    second = (m.mean**2 + m.var) * _Phi(t) + m.mean * std * _phi(t)
    # A degenerate (zero-variance) channel is a constant: relu of it.
    const = std <= 1e-12
    first = torch.where(const, m.mean.clamp_min(0), first)
    second = torch.where(const, m.mean.clamp_min(0) ** 2, second)
    return ChannelMoments(first, second - first**2)


def leaky_relu_moments(m: ChannelMoments, negative_slope: float | torch.Tensor) -> ChannelMoments:
    """Moments of ``leaky_relu(z) = relu(z) - a relu(-z)`` for Gaussian z (also PReLU)."""
    pos = relu_moments(m)
    pos_second = pos.var + pos.mean**2
    a = torch.as_tensor(negative_slope, dtype=m.mean.dtype)
    neg_mean = m.mean - pos.mean  # E[min(z, 0)]
    neg_second = (m.mean**2 + m.var) - pos_second  # E[min(z, 0)^2]
    first = pos.mean + a * neg_mean
    second = pos_second + a * a * neg_second
    return ChannelMoments(first, second - first**2)


def _grouped_in_weight(in_weight: torch.Tensor, c_out: int, ipg: int, groups: int) -> torch.Tensor:
    """``in_weight`` laid out as (C_out, ipg): the input channel each weight slot reads."""
    per_group = in_weight.reshape(groups, 1, ipg)
    return per_group.expand(groups, c_out // groups, ipg).reshape(c_out, ipg)


def weighted_channel_inner(
    a: torch.Tensor, b: torch.Tensor, in_weight: torch.Tensor, groups: int = 1
) -> torch.Tensor:
    """``sum_k in_weight_k * <a[j, k], b[j, k]>`` per output channel j (k: input channels)."""
    c_out, ipg = a.shape[0], a.shape[1]
    prod = a * b if a.dim() == 2 else (a * b).reshape(c_out, ipg, -1).sum(dim=2)  # (C_out, ipg)
    if groups == 1:
        return prod @ in_weight.to(prod.dtype)
    return (prod * _grouped_in_weight(in_weight.to(prod.dtype), c_out, ipg, groups)).sum(dim=1)


def expected_output(weight: torch.Tensor, in_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``E[W x]`` per output channel when input channel k has mean ``in_mean[k]`` everywhere."""
    c_out, ipg = weight.shape[0], weight.shape[1]
    summed = weight if weight.dim() == 2 else weight.reshape(c_out, ipg, -1).sum(dim=2)
    if groups == 1:
        return summed @ in_mean.to(summed.dtype)
    return (summed * _grouped_in_weight(in_mean.to(summed.dtype), c_out, ipg, groups)).sum(dim=1)


def mean_correction(
    quantized: torch.Tensor, reference: torch.Tensor, in_mean: torch.Tensor, groups: int = 1
) -> torch.Tensor:
    """Expected output shift ``E[(Q - W) x]`` caused by quantization, per output channel.

    Adding it to the following BatchNorm's running mean (or subtracting it from the layer's
    bias) restores each channel's float mean without data: the data-free counterpart of
    re-estimating BatchNorm statistics (method.md, point 2).
    """
    return expected_output(quantized - reference, in_mean, groups)


def paper_coefficients(
    quantized: torch.Tensor,
    reference: torch.Tensor,
    bn_scale: torch.Tensor,
    bias_ref: torch.Tensor,
    bias_hat: torch.Tensor,
    lambda1: float,
    lambda2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Eq. 27, one coefficient per output channel.

    ``u = bn_scale * W``, ``u^ = bn_scale * Q`` (bn_scale = gamma/sigma, or 1 without BN),
    ``y = bias_ref``, ``y^ = bias_hat`` (beta - gamma mu / sigma, or the layer bias).
    Returns ``(c, degenerate)``: ``degenerate`` marks channels whose quantized filter and bias
    are zero (0/0), which get c = 1; c is clamped at 0, the exact constrained optimum.
    """
    c_out = reference.shape[0]
    u = (reference.reshape(c_out, -1) * bn_scale[:, None])
    uh = (quantized.reshape(c_out, -1) * bn_scale[:, None])
    num = (uh * u).sum(dim=1) + lambda1 * bias_hat * bias_ref
    den = (uh * uh).sum(dim=1) + lambda1 * bias_hat**2 + lambda2
    return _safe_ratio(num, den)


def derived_coefficients(
    quantized: torch.Tensor,
    reference: torch.Tensor,
    bn_scale: torch.Tensor,
    mean_ref: torch.Tensor,
    mean_hat: torch.Tensor,
    in_var: torch.Tensor,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares c for inputs with per-channel variance ``in_var`` (method.md, point 1).

    ``c_j = (g_j^2 sum_k v_k <Q_jk, W_jk> + E[a^_j] E[a_j]) / (g_j^2 sum_k v_k ||Q_jk||^2 + E[a^_j]^2)``
    with ``g = bn_scale`` and ``E[a]``, ``E[a^]`` the expected pre-activations (``mean_ref``,
    ``mean_hat``). For zero-mean white inputs this is Eq. 27 with lambda1 = 1/E[x^2].
    """
    g2 = bn_scale**2
    cross = g2 * weighted_channel_inner(quantized, reference, in_var, groups)
    var_hat = g2 * weighted_channel_inner(quantized, quantized, in_var, groups)
    return _safe_ratio(cross + mean_hat * mean_ref, var_hat + mean_hat**2)


def variance_matching_coefficients(
    quantized: torch.Tensor,
    reference: torch.Tensor,
    bn_scale: torch.Tensor,
    mean_ref: torch.Tensor,
    mean_hat: torch.Tensor,
    in_var: torch.Tensor,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """c that restores each channel's second moment: ``E[(c a^)^2] = E[a^2]``.

    This is what re-estimating BatchNorm statistics on data does to the scale (the data-aware
    reference), predicted from the input moments instead of measured.
    """
    g2 = bn_scale**2
    var_ref = g2 * weighted_channel_inner(reference, reference, in_var, groups)
    var_hat = g2 * weighted_channel_inner(quantized, quantized, in_var, groups)
    c2, degenerate = _safe_ratio(var_ref + mean_ref**2, var_hat + mean_hat**2)
    return c2.sqrt(), degenerate


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    degenerate = den.abs() <= torch.finfo(den.dtype).tiny * 1e6
    c = torch.where(degenerate, torch.ones_like(num), num / torch.where(degenerate, torch.ones_like(den), den))
    return c.clamp_min(0.0), degenerate


def fold_input_scale(weight: torch.Tensor, c: torch.Tensor, groups: int = 1, features_per_channel: int = 1) -> torch.Tensor:
    """``W~[:, j] = c_j W[:, j]`` (Eq. 7): scale the input channels of the next layer.

    ``features_per_channel`` > 1 is a flatten between conv and linear: channel j of the first
    layer feeds input features ``j*F .. (j+1)*F - 1``.
    """
    if features_per_channel > 1:
        scale = c.repeat_interleave(features_per_channel)
        return weight * scale.view(1, -1)
    c_out, ipg = weight.shape[0], weight.shape[1]
    cols = c.view(1, -1) if groups == 1 else _grouped_in_weight(c, c_out, ipg, groups)
    return weight * cols.reshape(cols.shape + (1,) * (weight.dim() - 2)).to(weight.dtype)


def scale_input_moments(m: ChannelMoments, c: torch.Tensor) -> ChannelMoments:
    """Moments of ``x / c`` per channel (c = 0 channels keep x's moments: their weights are 0)."""
    safe = torch.where(c > 0, c, torch.ones_like(c))
    return ChannelMoments(m.mean / safe, m.var / safe**2)


def layer_output_moments(
    weight: torch.Tensor, bias: torch.Tensor | None, m: ChannelMoments, groups: int = 1
) -> ChannelMoments:
    """Moments of ``W x + b`` per output channel, inputs independent across channels/positions."""
    mean = expected_output(weight, m.mean, groups)
    if bias is not None:
        mean = mean + bias
    return ChannelMoments(mean, weighted_channel_inner(weight, weight, m.var, groups))


def batchnorm_output_moments(
    weight: torch.Tensor | None, bias: torch.Tensor | None, running_var: torch.Tensor, eps: float
) -> ChannelMoments:
    """What an eval-mode BatchNorm emits when its input has the statistics it recorded."""
    gamma = weight if weight is not None else torch.ones_like(running_var)
    beta = bias if bias is not None else torch.zeros_like(running_var)
    return ChannelMoments(beta.clone(), gamma**2 * running_var / (running_var + eps))


def expand_moments(m: ChannelMoments, size: int) -> ChannelMoments | None:
    """Broadcast moments to ``size`` entries: a scalar, or a flatten of C channels to C*F features."""
    n = m.mean.numel()
    if n == size:
        return m
    if n == 1:
        return ChannelMoments(m.mean.expand(size).clone(), m.var.expand(size).clone())
    if size % n == 0:
        f = size // n
        return ChannelMoments(m.mean.repeat_interleave(f), m.var.repeat_interleave(f))
    return None


__all__ += ["layer_output_moments", "batchnorm_output_moments", "expand_moments"]


def summed_kernel_variance(weight: torch.Tensor, in_var: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``sum_k v_k (sum_s W_jks)^2``: the output variance if each input channel were constant
    over the kernel window (perfect spatial correlation); the independent case is
    ``weighted_channel_inner(W, W, v)``."""
    c_out, ipg = weight.shape[0], weight.shape[1]
    summed = weight if weight.dim() == 2 else weight.reshape(c_out, ipg, -1).sum(dim=2)
    return weighted_channel_inner(summed, summed, in_var, groups)


def fit_input_correlation(
    recorded_var: torch.Tensor, independent: torch.Tensor, correlated: torch.Tensor
) -> tuple[float, float]:
    """Non-negative ``(alpha, beta)`` with ``recorded ~ alpha * independent + beta * correlated``.

    ``recorded`` is the variance BatchNorm measured on the training data for each channel; the
    fit (relative least squares over channels) calibrates a spatial-correlation model of the
    layer's input without data, so that the variance of the *quantized* layer's output can be
    predicted as ``alpha * A(Q) + beta * B(Q)``.
    """
    y = recorded_var.to(torch.float64)
    keep = y > 0
    n = int(keep.sum())
    if n == 0:
        return 1.0, 0.0
    scale = y[keep]
    a = independent.to(torch.float64)[keep] / scale
    b = correlated.to(torch.float64)[keep] / scale
    # The five inner products define the whole 2x2 problem; solving it in Python floats avoids
    # a dozen tiny tensor ops per layer (this runs once for every quantized layer).
    aa, ab, bb, a1, b1 = torch.stack([a @ a, a @ b, b @ b, a.sum(), b.sum()]).tolist()

    def loss(alpha: float, beta: float) -> float:  # ||alpha a + beta b - 1||^2
        return (alpha * alpha * aa + 2 * alpha * beta * ab + beta * beta * bb
                - 2 * alpha * a1 - 2 * beta * b1 + n)

    candidates: list[tuple[float, float]] = []
    det = aa * bb - ab * ab
    if det > 1e-12 * aa * bb:
        alpha, beta = (bb * a1 - ab * b1) / det, (aa * b1 - ab * a1) / det
        if alpha >= 0 and beta >= 0:
            candidates.append((alpha, beta))
    if aa > 0:
        candidates.append((a1 / aa, 0.0))
    if bb > 0:
        candidates.append((0.0, b1 / bb))
    if not candidates:
        return 1.0, 0.0
    return min(candidates, key=lambda ab_: loss(*ab_))


def predicted_variance_ratio(
    quantized: torch.Tensor,
    reference: torch.Tensor,
    in_var: torch.Tensor,
    groups: int,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """``Var(Q x) / Var(W x)`` per output channel under the fitted correlation model."""
    def model(w: torch.Tensor) -> torch.Tensor:
        out = alpha * weighted_channel_inner(w, w, in_var, groups)
        return out + beta * summed_kernel_variance(w, in_var, groups) if beta else out

    return variance_ratio(model(quantized), model(reference))


def variance_ratio(var_hat: torch.Tensor, var_ref: torch.Tensor) -> torch.Tensor:
    """``var_hat / var_ref``, 1 where the reference has no variance."""
    ok = var_ref > torch.finfo(var_ref.dtype).tiny * 1e6
    return torch.where(ok, var_hat / torch.where(ok, var_ref, torch.ones_like(var_ref)), torch.ones_like(var_ref))


__all__ += ["summed_kernel_variance", "fit_input_correlation", "predicted_variance_ratio", "variance_ratio"]


def variance_restoring_coefficients(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``c = 1 / sqrt(Var(Q x) / Var(W x))``; channels whose quantized output has no variance
    (all-zero filters) are degenerate and keep c = 1."""
    degenerate = ratio <= 1e-12
    c = torch.where(degenerate, torch.ones_like(ratio), ratio.clamp_min(1e-12).rsqrt())
    return c, degenerate


def mean_preserving_shift(mean: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Shift ``s`` with ``c * (a + s) = c * (a - E[a]) + E[a]``: scaling by c around the mean."""
    return mean * (1.0 / c - 1.0)


__all__ += ["variance_restoring_coefficients", "mean_preserving_shift"]


@dataclass
class KernelStats:
    """Per (output, input) channel reductions of a weight over its kernel positions.

    Every moment-based quantity of a layer is a channel-weighted sum of these, so computing them
    once per weight tensor replaces several full passes over it.
    """

    summed: torch.Tensor  # (C_out, ipg): sum_s W_jks
    sq_norm: torch.Tensor  # (C_out, ipg): sum_s W_jks^2
    groups: int

    def apply(self, per_slot: torch.Tensor, in_weight: torch.Tensor) -> torch.Tensor:
        c_out, ipg = per_slot.shape
        if self.groups == 1:
            return per_slot @ in_weight.to(per_slot.dtype)
        return (per_slot * _grouped_in_weight(in_weight.to(per_slot.dtype), c_out, ipg, self.groups)).sum(dim=1)

    def expected_output(self, in_mean: torch.Tensor) -> torch.Tensor:
        return self.apply(self.summed, in_mean)

    def independent_variance(self, in_var: torch.Tensor) -> torch.Tensor:
        return self.apply(self.sq_norm, in_var)

    def correlated_variance(self, in_var: torch.Tensor) -> torch.Tensor:
        return self.apply(self.summed * self.summed, in_var)


def kernel_stats(weight: torch.Tensor, groups: int = 1) -> KernelStats:
    c_out, ipg = weight.shape[0], weight.shape[1]
    flat = weight.reshape(c_out, ipg, -1)
    k = flat.shape[2]
    if k == 1:  # linear, 1x1: the weight itself
        summed = flat[:, :, 0]
    else:  # a GEMV against ones is about twice as fast as sum(dim=2) over a short last dim
        summed = (flat.reshape(-1, k) @ torch.ones(k, dtype=flat.dtype)).view(c_out, ipg)
    return KernelStats(summed, kernel_cross(weight, weight), groups)


__all__ += ["KernelStats", "kernel_stats"]


def kernel_cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_s a_jks b_jks`` per (output, input) channel: the kernel-position inner products."""
    c_out, ipg = a.shape[0], a.shape[1]
    fa, fb = a.reshape(c_out, ipg, -1), b.reshape(c_out, ipg, -1)
    if fa.shape[2] == 1:  # linear or 1x1: one position per kernel
        return (fa * fb)[:, :, 0]
    # einsum lowers to a batched matmul here, about twice as fast as vecdot or (a * b).sum(2).
    return torch.einsum("oik,oik->oi", fa, fb)


def quantized_variance_ratio(
    stats_q: KernelStats,
    stats_ref: KernelStats,
    cross: torch.Tensor,
    in_var: torch.Tensor,
    recorded_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predicted ``Var(Q x) / Var(W x)`` per output channel, without data.

    Split each quantized filter into its projection on the float filter and a remainder,
    ``Q = gamma W + N`` with ``gamma = <Q, W> / <W, W>``. Then
    ``Var(Q x) = gamma^2 Var(W x) + Var(N x)`` (+ a cross term that vanishes for noise
    uncorrelated with the input's structure):

    - ``Var(W x)`` is the variance BatchNorm recorded on the training data
      (``recorded_var``): it contains every spatial and cross-channel correlation the trained
      filter exploits, which no diagonal model recovers.
    - ``N`` is rounding noise; a direction that is random with respect to the input covariance
      sees only its average, so ``Var(N x) = sum_k v_k sum_s N_jks^2`` (independent inputs).

    Fitting one correlation model to the float filters and applying it to ``Q`` instead
    over-predicts ``Var(Q x)`` (trained filters align with the input's high-variance
    directions; rounding noise does not): by about 12% at 2 bits on ResNet-20, which cost 2-4
    points of accuracy. ``cross`` is :func:`kernel_cross` of ``(Q, W)``; without
    ``recorded_var`` the independent-input variance of ``W x`` stands in for it.
    """
    v = in_var.to(stats_ref.sq_norm.dtype)
    moments = PairedReductions(
        ref_sq=stats_ref.sq_norm.sum(dim=1), q_sq=stats_q.sq_norm.sum(dim=1), cross=cross.sum(dim=1),
        ref_sq_v=stats_ref.apply(stats_ref.sq_norm, v), q_sq_v=stats_q.apply(stats_q.sq_norm, v),
        cross_v=stats_ref.apply(cross, v), ref_out_mean=None, q_out_mean=None,
    )
    return moments.variance_ratio(recorded_var)


@dataclass
class PairedReductions:
    """Per output channel reductions of a float weight ``W`` and its quantized ``Q``: all that
    the data-free estimates of one layer (mean shift, variance ratio, weight error) read.

    ``*_v`` are weighted by the input channels' variances ``v_k``: ``ref_sq_v_j =
    sum_k v_k sum_s W_jks^2`` and so on; ``*_out_mean`` are the expected outputs for the input
    means (``None`` when no mean was given).
    """

    ref_sq: torch.Tensor  # sum_{k,s} W^2
    q_sq: torch.Tensor  # sum_{k,s} Q^2
    cross: torch.Tensor  # sum_{k,s} Q W
    ref_sq_v: torch.Tensor
    q_sq_v: torch.Tensor
    cross_v: torch.Tensor
    ref_out_mean: torch.Tensor | None
    q_out_mean: torch.Tensor | None

    def relative_error(self) -> float:
        """``||Q - W|| / ||W||`` as ``sqrt(||Q||^2 - 2 <Q, W> + ||W||^2) / ||W||``; NaN where that
        difference cancels (relative error below 1e-2, i.e. ~8 bits and up: float32 sums carry
        ~1e-7 relative error) and must be measured directly."""
        w2 = float(self.ref_sq.sum())
        e2 = float(self.q_sq.sum()) - 2.0 * float(self.cross.sum()) + w2
        return math.sqrt(e2 / w2) if w2 > 0 and e2 > 1e-4 * w2 else math.nan

    def variance_ratio(self, recorded_var: torch.Tensor | None = None) -> torch.Tensor:
        """See :func:`quantized_variance_ratio`."""
        dtype = self.ref_sq.dtype
        gamma = self.cross / self.ref_sq.clamp_min(torch.finfo(dtype).tiny)
        # sum_k v_k sum_s N_jks^2 with N = Q - gamma W, expanded (no (C_out, C_in) temporary)
        noise_var = (self.q_sq_v - 2.0 * gamma * self.cross_v + gamma * gamma * self.ref_sq_v).clamp_min(0.0)
        ref_var = recorded_var.to(dtype) if recorded_var is not None else self.ref_sq_v
        return variance_ratio(gamma * gamma * ref_var + noise_var, ref_var)


def paired_reductions(
    quantized: torch.Tensor,
    reference: torch.Tensor,
    in_var: torch.Tensor,
    in_mean: torch.Tensor | None = None,
    groups: int = 1,
) -> PairedReductions:
    """:class:`PairedReductions` of ``(Q, W)`` for input channel variances ``in_var`` (and means).

    Equal to reducing :func:`kernel_stats` and :func:`kernel_cross`, but without groups each
    filter is one row of length ``C_in * kernel`` with the input weights repeated over the
    kernel positions, so every quantity is a row reduction or a GEMV over the weights as laid
    out, and the three products share one scratch buffer: about half the time of the per-slot
    route (whose reduction over the 9 positions of a 3x3 kernel is a slow batched matmul).
    """
    c_out, ipg = reference.shape[0], reference.shape[1]
    dtype = reference.dtype
    v = in_var.to(dtype)
    k = reference[0, 0].numel() if reference.dim() > 2 else 1
    if groups == 1:
        w, q = reference.reshape(c_out, -1), quantized.reshape(c_out, -1)

        def per_position(t: torch.Tensor) -> torch.Tensor:  # one entry per (input, position)
            return t.to(dtype).repeat_interleave(k) if k > 1 else t.to(dtype)

        u = per_position(v)
        buf = torch.empty_like(w)
        sums: list[torch.Tensor] = []
        for a, b in ((w, w), (q, q), (q, w)):
            torch.mul(a, b, out=buf)
            sums += [buf.sum(dim=1), buf @ u]
        means: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if in_mean is not None:
            m = per_position(in_mean)
            means = (w @ m, q @ m)
        return PairedReductions(sums[0], sums[2], sums[4], sums[1], sums[3], sums[5], *means)
    stats_ref, stats_q = kernel_stats(reference, groups), kernel_stats(quantized, groups)
    cross = kernel_cross(quantized, reference)
    means = ((stats_ref.expected_output(in_mean), stats_q.expected_output(in_mean))
             if in_mean is not None else (None, None))
    return PairedReductions(
        ref_sq=stats_ref.sq_norm.sum(dim=1), q_sq=stats_q.sq_norm.sum(dim=1), cross=cross.sum(dim=1),
        ref_sq_v=stats_ref.independent_variance(v), q_sq_v=stats_q.independent_variance(v),
        cross_v=stats_ref.apply(cross, v), ref_out_mean=means[0], q_out_mean=means[1],
    )


__all__ += ["kernel_cross", "quantized_variance_ratio", "PairedReductions", "paired_reductions"]


def recorded_mean_scale(predicted: torch.Tensor, recorded: torch.Tensor, lo: float = 0.5, hi: float = 1.5) -> float:
    """The scalar ``a`` that best maps the float layer's predicted output means (``W E[x]``,
    from the data-free input moments) onto the means its BatchNorm recorded on the training
    data (less the layer's bias): ``argmin_a ||a * predicted - recorded||``, clamped to
    ``[lo, hi]`` (1 where the prediction carries no mean).

    The mean correction ``(Q - W) E[x]`` rests on the same predicted input means, and
    misses in the same way: zero padding (a border output sees fewer input weights than a
    full kernel: on a 4x4 map a 3x3 kernel's off-centre taps are in bounds at 9-12 of 16
    positions) and a ReLU of non-Gaussian pre-activations both shrink the true means below
    the prediction. Scaling the correction by ``a`` makes it consistent with the recorded
    statistics, without data: on resnet18_fmnist the predicted shift of the two 2-bit
    layer4 convs overshot the measured one by 30-37% before."""
    p = predicted.to(torch.float64)
    den = float((p * p).sum())
    if not den > 0 or not math.isfinite(den):
        return 1.0
    a = float((p * recorded.to(torch.float64)).sum()) / den
    return min(max(a, lo), hi) if math.isfinite(a) else 1.0


__all__ += ["recorded_mean_scale"]
