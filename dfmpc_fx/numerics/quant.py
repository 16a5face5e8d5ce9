"""Weight quantizers as plain tensor functions (no fx, no Lightning).

Every quantizer returns a :class:`QuantizedWeight`: integer codes, scales and zero points such
that ``dequantize() == (codes - zero_point) * scale`` broadcast over output channels (dim 0).
The fake-quant weight a module holds is exactly that dequantized tensor, so a packed artifact
(codes + scales) reproduces the fake-quant model bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedWeight",
    "quantize_uniform",
    "quantize_ternary_twn",
    "quantize_dorefa",
    "fake_quantize_weight",
]


@dataclass
class QuantizedWeight:
    """Integer codes plus the affine map back to float.

    ``scale`` and ``zero_point`` have shape ``(C,)`` for per-channel quantizers (C = output
    channels, dim 0 of the weight) or ``(1,)`` for per-tensor ones.
    """

    codes: torch.Tensor  # integer-valued, in the weight's float dtype (no conversion passes)
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    scheme: str  # "symmetric", "asymmetric", "ternary", "dorefa"

    def dequantize(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        if self.scheme in ("symmetric", "ternary"):  # zero point is 0: one pass
            return self.codes * self.scale.view(shape)
        return (self.codes - self.zero_point.view(shape)) * self.scale.view(shape)

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


def quantize_uniform(
    w: torch.Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    symmetric: bool = True,
    refine_iters: int | None = None,
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
    """
    _check_weight(w, bits)
    rows = _per_channel_view(w.detach(), per_channel)
    if refine_iters is None:
        refine_iters = 2 if bits <= 4 else 0
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        if bits in _GAUSSIAN_STEP:
            # Start at the MSE-optimal step of a Gaussian with the row's spread; the
            # refinement below then adapts to the actual (often heavier-tailed) weights.
            if bits == 2:
                # TWN's threshold rule: round at 0.7 E|w|, i.e. step 1.4 E|w|.
                scale = rows.abs().mean(dim=1) * 1.4
            else:
                scale = rows.std(dim=1, correction=0) * _GAUSSIAN_STEP[bits]
        else:
            # max |w| as max(max w, -min w): two plain reductions are 3x faster here than
            # |w| then max, and 10x faster than aminmax along a dim
            scale = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg()) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.div(rows, scale[:, None]).round_()
        if bits in _GAUSSIAN_STEP:
            codes.clamp_(-qmax, qmax)  # a max-abs step cannot overflow: |w| / (max|w| / qmax) <= qmax
        for _ in range(refine_iters):
            qq = torch.linalg.vector_norm(codes, dim=1).square_()  # <q,q>; 5x faster than vecdot
            new_scale = torch.linalg.vecdot(rows, codes, dim=1) / qq.clamp_min(1.0)
            scale = torch.where((qq > 0) & (new_scale > 0), new_scale, scale)
            torch.div(rows, scale[:, None], out=codes).round_().clamp_(-qmax, qmax)
        zero_point = torch.zeros_like(scale)
        scheme = "symmetric"
    else:
        qmax_u = 2**bits - 1
        lo = rows.amin(dim=1).clamp(max=0.0)
        hi = rows.amax(dim=1).clamp(min=0.0)
        scale = (hi - lo) / qmax_u
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(-lo / scale).clamp(0, qmax_u)
        codes = torch.div(rows, scale[:, None]).round_().add_(zero_point[:, None]).clamp_(0, qmax_u)
        scheme = "asymmetric"
    return QuantizedWeight(
        codes=codes.reshape(w.shape),
        scale=scale.to(w.dtype),
        zero_point=zero_point.to(w.dtype),
        bits=bits,
        scheme=scheme,
    )


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

    ``tanh=True`` (the paper, what ``method="paper"`` uses): ``w_q = 2 round_k(tanh(w) /
    (2 max|tanh w|) + 1/2) - 1`` in [-1, 1], times ``max|w|`` to give a pretrained layer its
    magnitude back. That maps ``w`` to about ``max|w| tanh(w) / tanh(max|w|)``: a gain of
    ``max|w| / tanh(max|w|)`` on small weights and a warped grid, far from ``w`` once max |w|
    is not small (relative weight errors of 1.4-8.0 on timm-style weights; 0.35 on the
    ResNet-20's first conv at 6 and at 8 bits).

    ``tanh=False``: the same 2^k uniform levels on ``w / max|w|`` directly, which stays close to
    the float weights (8 bits: < 1% relative error at max |w| ~ 3). It is not the default
    because the distortion is part of the paper's baseline as published here: on the
    ResNet-20 benchmark (first 1000 test images) the tanh gain on the 6-bit layers happens to
    offset TWN's shrinkage of the 2-bit ones, and ``paper@MP2/6`` drops from 77.7% to 24.9%
    without it (while MP4/8 rises from 80.7% to 93.7%).

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
) -> torch.Tensor:
    """Quantize then dequantize ``w``: the float tensor a fake-quant layer computes with.

    ``scheme`` is one of ``symmetric``, ``asymmetric``, ``ternary`` (2 bits only), ``dorefa``.
    """
    return quantize_weight(w, bits, scheme=scheme, per_channel=per_channel).dequantize()


def quantize_weight(
    w: torch.Tensor, bits: int, *, scheme: str = "symmetric", per_channel: bool = True
) -> QuantizedWeight:
    """Dispatch to the quantizer named by ``scheme``."""
    if scheme == "symmetric":
        return quantize_uniform(w, bits, per_channel=per_channel, symmetric=True)
    if scheme == "asymmetric":
        return quantize_uniform(w, bits, per_channel=per_channel, symmetric=False)
    if scheme == "ternary":
        if bits != 2:
            raise ValueError(f"ternary quantization is 2-bit, got bits={bits}")
        return quantize_ternary_twn(w, per_channel=per_channel)
    if scheme == "dorefa":
        return quantize_dorefa(w, bits, per_channel=per_channel)
    raise ValueError(f"unknown quantizer scheme {scheme!r}")


__all__.append("quantize_weight")
