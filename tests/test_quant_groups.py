"""Group-wise scales: reference definition, error vs per-channel, ragged last group, size."""
from __future__ import annotations

import hashlib

import pytest
import torch

from dfmpc_fx.numerics.quant import quantize_uniform, quantize_weight, scale_overhead_bits


def _reference(qw, group_size):
    rows = qw.codes.reshape(qw.codes.shape[0], -1)
    out = torch.empty_like(rows)
    for j in range(rows.shape[1]):
        g = j // group_size
        out[:, j] = (rows[:, j] - qw.zero_point[:, g]) * qw.scale[:, g]
    return out.reshape(qw.codes.shape)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,gs", [((8, 4, 3, 3), 9), ((6, 50), 16), ((5, 7), 32), ((4, 10), 1)])
def test_grouped_dequantize_matches_definition(symmetric, shape, gs):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    qw = quantize_uniform(w, 3, symmetric=symmetric, group_size=gs)
    k = w[0].numel()
    assert qw.scale.shape == qw.zero_point.shape == (shape[0], -(-k // gs))
    assert qw.group_size == gs
    assert torch.equal(qw.dequantize(), _reference(qw, gs))
    lo, hi = (-3, 3) if symmetric else (0, 7)
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
    assert torch.equal(qw.codes, qw.codes.round())


@pytest.mark.parametrize("dist", ["gauss", "laplace", "student"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_groups_of_32_beat_per_channel(dist, bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    if dist == "gauss":
        w = torch.randn(64, 288, generator=gen)
    elif dist == "laplace":
        w = torch.distributions.Laplace(0.0, 1.0).sample((64, 288))
    else:
        w = torch.distributions.StudentT(3.0).sample((64, 288))
    w = w * (0.5 + torch.rand(64, 1, generator=gen))
    mse = {gs: (quantize_uniform(w, bits, symmetric=symmetric, group_size=gs).dequantize() - w).square().mean()
           for gs in (None, 32)}
    assert mse[32] < mse[None]


def test_ragged_last_group():
    w = torch.randn(3, 70)
    qw = quantize_uniform(w, 4, group_size=32)  # groups of 32, 32, 6
    assert qw.scale.shape == (3, 3) and qw.codes.shape == w.shape
    tail = quantize_uniform(w[:, 64:], 4)
    assert torch.equal(qw.scale[:, 2], tail.scale) and torch.equal(qw.codes[:, 64:], tail.codes)
    assert (qw.dequantize() - w).square().mean() < 0.03 * w.square().mean()


def test_group_size_errors():
    w = torch.randn(4, 8)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError):
            quantize_uniform(w, 3, group_size=bad)
    with pytest.raises(ValueError):
        quantize_uniform(w, 3, per_channel=False, group_size=4)
    with pytest.raises(ValueError):
        quantize_weight(w, 2, scheme="ternary", group_size=4)
    assert torch.equal(quantize_weight(w, 3, group_size=4).dequantize(), quantize_uniform(w, 3, group_size=4).dequantize())


def test_scale_overhead_bits():
    assert scale_overhead_bits(16 * 72, 16, None, "symmetric") == 16 * 32
    assert scale_overhead_bits(16 * 72, 16, 32, "symmetric") == 16 * 3 * 32
    assert scale_overhead_bits(16 * 72, 16, 32, "asymmetric") == 16 * 3 * 64
    assert scale_overhead_bits(100, 1, None, "dorefa") == 64
    with pytest.raises(ValueError):
        scale_overhead_bits(10, 3, None, "symmetric")


def test_per_channel_path_unchanged():
    """Digest of quantize_uniform's outputs recorded before group_size existed (torch 2.x, CPU)."""
    g = torch.Generator().manual_seed(0)
    h = hashlib.sha256()
    for shape in [(16, 8, 3, 3), (10, 37), (1, 5), (7, 3, 5)]:
        w = torch.randn(shape, generator=g) * 0.1
        w64 = w.double()
        for bits in (2, 3, 4, 5, 8):
            for pc in (True, False):
                for sym in (True, False):
                    for x in (w, w64):
                        q = quantize_uniform(x, bits, per_channel=pc, symmetric=sym)
                        for t in (q.codes, q.scale, q.zero_point, q.dequantize()):
                            h.update(t.contiguous().numpy().tobytes())
    assert h.hexdigest() == "99bf78b785cf41d387e1fc64364099465a3b4a21a4ccbeeb1d64c952eff7b0d5"


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_asymmetric_group_refinement_never_worse_than_min_max(bits):
    w = torch.distributions.StudentT(3.0).sample((32, 96))
    plain = quantize_uniform(w, bits, symmetric=False, group_size=32, refine_iters=0)
    refined = quantize_uniform(w, bits, symmetric=False, group_size=32)
    e0 = (plain.dequantize() - w).square().reshape(32, 3, 32).sum(-1)
    e1 = (refined.dequantize() - w).square().reshape(32, 3, 32).sum(-1)
    assert bool((e1 <= e0 * (1 + 1e-6)).all()) and e1.sum() < e0.sum()
    assert torch.equal(refined.zero_point, refined.zero_point.round())  # integer zero points: an exact zero level
