"""scheme="auto": symmetric for the explicit layouts (bit-identical), and under a size budget a
per-channel zero-point option beside the symmetric one wherever a layer's scales do not fold
into a BatchNorm, started from the symmetric solution so that it is never worse than it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import dfmpc_fx
from dfmpc_fx.numerics.quant import quantize_uniform
from dfmpc_fx.transform.budget import candidates_for


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 6), k=st.integers(2, 300), offset=st.floats(-0.5, 0.5),
       seed=st.integers(0, 2**16), group=st.sampled_from([None, 4, 32]))
def test_affine_from_symmetric_is_never_worse_than_symmetric(bits, rows, k, offset, seed, group):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * 0.1 + offset * 0.1
    w[0, 0] += 1.0  # an outlier
    sym = quantize_uniform(w, bits, group_size=group)
    aff = quantize_uniform(w, bits, symmetric=False, group_size=group, affine_from_symmetric=True)
    minmax = quantize_uniform(w, bits, symmetric=False, group_size=group)
    per_row = lambda q: (q.dequantize() - w).square().sum(dim=1)  # noqa: E731
    assert bool((per_row(aff) <= per_row(sym) * (1 + 1e-5) + 1e-12).all())
    if group is None:  # per channel, min/max alone is a start too
        assert bool((per_row(aff) <= per_row(minmax) * (1 + 1e-5) + 1e-12).all())
    assert aff.scheme == "asymmetric" and int(aff.codes.min()) >= 0 and int(aff.codes.max()) <= 2**bits - 1


class _ConvBnFc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = _ConvBnFc()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.fc.weight.add_(0.05)  # rows off zero: a zero point pays
    return m.eval()


def test_explicit_layouts_are_bit_identical_to_symmetric(net):
    for kw in ({"default_bits": 4, "first_last_bits": None}, {"low_bits": 2}, {"method": "paper"}):
        a = dfmpc_fx.compress(net, **kw)
        b = dfmpc_fx.compress(net, scheme="symmetric", **kw)
        for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(ta, tb), (kw, na)


def test_budget_offers_zero_points_only_where_scales_do_not_fold(net):
    cfg = dfmpc_fx.DFMPCConfig(target_bits=3.0)
    assert cfg.scheme == "auto" and cfg.offers_zero_point_option
    assert {c.scheme for c in candidates_for("fc", cfg, 16)} == {None, "asymmetric"}
    assert {c.scheme for c in candidates_for("conv", cfg, 27, folds_into_batchnorm=True)} == {None}
    assert not dfmpc_fx.DFMPCConfig(target_bits=3.0, scheme="symmetric").offers_zero_point_option
    rep = dfmpc_fx.get_report(dfmpc_fx.compress(net, target_bits=4.0))
    layers = {l.name: l for l in rep.layers}
    assert layers["conv"].scales_folded and layers["conv"].scheme == "symmetric"
    assert "W4-asym" in layers["fc"].estimates and "W4" in layers["fc"].estimates
    assert rep.bits_per_weight <= 4.0
    # groups under "auto" carry zero points
    grouped = dfmpc_fx.compress(net, target_bits=4.0, group_sizes=(4,))
    for layer in dfmpc_fx.get_report(grouped).layers:
        if layer.group_size is not None:
            assert layer.scheme == "asymmetric"


def test_zero_point_option_is_chosen_where_rows_sit_off_zero_and_exports(tmp_path, net, artifacts_reproduce):
    with torch.no_grad():
        net.fc.weight.mul_(0.2).add_(0.3)  # every row far off zero: a symmetric grid wastes half its levels
    q = dfmpc_fx.compress(net, target_bits=4.0)
    layers = {l.name: l for l in dfmpc_fx.get_report(q).layers}
    fc = layers["fc"]
    assert fc.scheme == "asymmetric", fc.estimates
    same_bits = f"W{fc.bits}"
    assert fc.estimates[same_bits + "-asym"] < fc.estimates[same_bits], fc.estimates
    assert q.get_submodule("fc").scheme == "asymmetric"
    artifacts_reproduce(q, torch.randn(2, 3, 8, 8), tmp_path)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), k=st.integers(2, 200), seed=st.integers(0, 2**16), iters=st.integers(1, 4))
def test_affine_refinement_error_is_the_direct_error(bits, k, seed, iters):
    """The refinement reads each iterate's error from its rounding residual; it must be the
    squared error of the codes it returns (what picking between starts relies on), also after
    several iterations have swapped and partly merged its two code buffers."""
    from dfmpc_fx.numerics.quant import _quantize_rows, _refine_affine

    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(5, k, generator=g) * 0.1 + torch.randn(5, 1, generator=g) * 0.05
    c, s, z = _quantize_rows(rows, bits, False, 0)
    c, s, z, e = _refine_affine(rows, c, s, z, 2**bits - 1, iters, with_error=True)
    direct = (rows - (c - z[:, None]) * s[:, None]).square().sum(dim=1)
    assert torch.allclose(e, direct, rtol=1e-4, atol=1e-10)
    assert int(c.min()) >= 0 and int(c.max()) <= 2**bits - 1
