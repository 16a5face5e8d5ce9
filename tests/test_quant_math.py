"""Quantizers and closed forms: pure tensor functions checked against brute force."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfmpc_fx.numerics import compensation as cm
from dfmpc_fx.numerics.compensation import ChannelMoments
from dfmpc_fx.numerics.quant import quantize_dorefa, quantize_ternary_twn, quantize_uniform, quantize_weight

torch.set_default_dtype(torch.float32)


def _levels(qw) -> int:
    return int(qw.codes.unique().numel())


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_symmetric_codes_in_range_and_dequantize_consistent(bits: int, per_channel: bool) -> None:
    w = torch.randn(16, 8, 3, 3) * 0.1
    qw = quantize_uniform(w, bits, per_channel=per_channel)
    qmax = 2 ** (bits - 1) - 1
    assert qw.codes.min() >= -qmax and qw.codes.max() <= qmax
    assert torch.equal(qw.codes, qw.codes.round())
    assert qw.scale.shape == ((16,) if per_channel else (1,))
    q = qw.dequantize()
    scale = qw.scale.view(-1, 1, 1, 1)
    assert torch.allclose(q, qw.codes * scale)
    # more bits -> smaller error (monotone on the same weights)
    if bits < 8:
        finer = quantize_uniform(w, bits + 1, per_channel=per_channel).dequantize()
        assert (finer - w).norm() < (q - w).norm()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_least_squares_refinement_never_increases_error(bits: int) -> None:
    torch.manual_seed(1)
    w = torch.distributions.Laplace(0.0, 0.05).sample((32, 64))
    errs = [float((quantize_uniform(w, bits, refine_iters=k).dequantize() - w).norm()) for k in range(6)]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs


def test_refined_scale_beats_max_abs_at_low_bits() -> None:
    torch.manual_seed(2)
    w = torch.randn(64, 576) * 0.05
    w[:, 0] = 0.5  # an outlier per channel ruins max-abs scaling
    qmax = 3
    amax = w.abs().amax(1, keepdim=True) / qmax
    max_abs = torch.clamp(torch.round(w / amax), -qmax, qmax) * amax
    ours = quantize_uniform(w, 3).dequantize()
    assert (ours - w).norm() < 0.8 * (max_abs - w).norm()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_has_zero_point_and_all_levels(bits: int) -> None:
    w = torch.rand(8, 100) * 2 - 0.3
    qw = quantize_uniform(w, bits, symmetric=False)
    assert qw.codes.min() >= 0 and qw.codes.max() <= 2**bits - 1
    assert torch.equal(qw.zero_point, qw.zero_point.round())
    err = (qw.dequantize() - w).abs().max(dim=1).values
    assert torch.all(err <= qw.scale * 0.5 + 1e-6)


def test_ternary_twn_matches_definition() -> None:
    w = torch.tensor([[0.9, -0.1, 0.05, -0.8, 0.4, 0.0]])
    qw = quantize_ternary_twn(w)
    delta = 0.7 * w.abs().mean()
    mask = w.abs() > delta
    alpha = w.abs()[mask].mean()
    expected = torch.sign(w) * mask * alpha
    assert torch.allclose(qw.dequantize(), expected)
    assert _levels(qw) <= 3


def test_dorefa_has_no_zero_level_and_uses_k_bits() -> None:
    w = torch.randn(4, 256) * 0.05
    qw = quantize_dorefa(w, 3)
    q = qw.dequantize()
    assert _levels(qw) <= 8
    assert bool((q != 0).all()), "DoReFa has no zero level"
    assert float(q.abs().max()) == pytest.approx(float(w.abs().max()), rel=1e-5)


def test_quantize_weight_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        quantize_weight(torch.randn(3, 3), 3, scheme="ternary")
    with pytest.raises(ValueError):
        quantize_weight(torch.randn(3, 3), 3, scheme="nope")
    with pytest.raises(TypeError):
        quantize_weight(torch.ones(3, 3, dtype=torch.int32), 3)


# --- closed forms ----------------------------------------------------------------------------

def _brute_force_min(loss, lo: float = 0.0, hi: float = 4.0, n: int = 40001) -> float:
    cs = torch.linspace(lo, hi, n, dtype=torch.float64)
    return float(cs[torch.argmin(loss(cs))])


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    c_out=st.integers(1, 6),
    c_in=st.integers(1, 5),
    k=st.sampled_from([1, 3]),
    lam1=st.floats(0.0, 2.0),
    lam2=st.floats(0.0, 0.5),
)
def test_paper_closed_form_equals_brute_force_minimum(seed, c_out, c_in, k, lam1, lam2) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
    q = quantize_uniform(w, 2).dequantize()
    bn_scale = torch.rand(c_out, generator=g, dtype=torch.float64) + 0.2
    y = torch.randn(c_out, generator=g, dtype=torch.float64)
    y_hat = y + 0.1 * torch.randn(c_out, generator=g, dtype=torch.float64)
    c, degenerate = cm.paper_coefficients(q, w, bn_scale, y, y_hat, lam1, lam2)
    for j in range(c_out):
        if degenerate[j]:
            assert c[j] == 1.0
            continue
        u = bn_scale[j] * w[j].flatten()
        uh = bn_scale[j] * q[j].flatten()

        def loss(cs, u=u, uh=uh, j=j):  # Eq. 22
            return ((cs[:, None] * uh[None] - u[None]) ** 2).sum(1) + lam1 * (cs * y_hat[j] - y[j]) ** 2 + lam2 * cs**2

        best = _brute_force_min(loss, 0.0, max(4.0, 2 * float(c[j]) + 1))
        assert float(loss(torch.tensor([float(c[j])], dtype=torch.float64))) <= float(loss(torch.tensor([best], dtype=torch.float64))) + 1e-9
        assert abs(float(c[j]) - best) < 2e-3 * max(1.0, best)


def test_derived_coefficients_minimise_expected_loss_under_independent_inputs() -> None:
    """Monte Carlo: c from the formula minimises E[(c a^ - a)^2] for inputs with the given moments."""
    torch.manual_seed(3)
    c_out, c_in = 3, 4
    w = torch.randn(c_out, c_in, dtype=torch.float64)
    q = quantize_uniform(w, 2).dequantize()
    in_mean = torch.rand(c_in, dtype=torch.float64)
    in_var = torch.rand(c_in, dtype=torch.float64) + 0.1
    g = torch.rand(c_out, dtype=torch.float64) + 0.5
    beta = torch.randn(c_out, dtype=torch.float64) * 0.3
    mu = torch.randn(c_out, dtype=torch.float64) * 0.3
    x = in_mean + in_var.sqrt() * torch.randn(400_000, c_in, dtype=torch.float64)
    a = g * (x @ w.T - mu) + beta
    a_hat = g * (x @ q.T - mu) + beta
    mean_ref = g * (cm.expected_output(w, in_mean) - mu) + beta
    mean_hat = g * (cm.expected_output(q, in_mean) - mu) + beta
    c, _ = cm.derived_coefficients(q, w, g, mean_ref, mean_hat, in_var)
    empirical = (a_hat * a).mean(0) / (a_hat * a_hat).mean(0)
    assert torch.allclose(c, empirical.clamp_min(0), rtol=0.02, atol=0.01)


def test_coefficients_are_clamped_and_degenerate_channels_get_one() -> None:
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = torch.tensor([[-1.0, -1.0], [0.0, 0.0]], dtype=torch.float64)  # anti-correlated, all-zero
    ones = torch.ones(2, dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    c, degenerate = cm.paper_coefficients(q, w, ones, zeros, zeros, 0.5, 0.0)
    assert c[0] == 0.0  # negative optimum clamped at 0
    assert degenerate.tolist() == [False, True] and c[1] == 1.0


def test_mean_correction_equals_empirical_mean_shift_for_grouped_conv() -> None:
    torch.manual_seed(4)
    groups, c_in, c_out = 2, 4, 6
    w = torch.randn(c_out, c_in // groups, 3, 3, dtype=torch.float64)
    q = quantize_uniform(w, 2).dequantize()
    in_mean = torch.rand(c_in, dtype=torch.float64) + 0.5
    x = in_mean.view(1, -1, 1, 1) + 0.0 * torch.randn(1, c_in, 5, 5, dtype=torch.float64)
    shift = torch.nn.functional.conv2d(x, q - w, groups=groups)[0, :, 1, 1]  # interior position
    assert torch.allclose(cm.mean_correction(q, w, in_mean, groups), shift)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.integers(1, 6), groups=st.sampled_from([1, 2]),
       fpc=st.sampled_from([1, 4]))
def test_folding_c_into_next_layer_is_function_preserving(seed, c, groups, fpc) -> None:
    """Eq. 7: relu(c*z) through W2 == relu(z) through W2 with input channels scaled by c."""
    g = torch.Generator().manual_seed(seed)
    channels = c * groups
    z = torch.randn(3, channels, 2, 2, generator=g, dtype=torch.float64)
    coeff = torch.rand(channels, generator=g, dtype=torch.float64) * 2
    if fpc == 1:
        w2 = torch.randn(5 * groups, channels // groups, 1, 1, generator=g, dtype=torch.float64)
        lhs = torch.nn.functional.conv2d(torch.relu(coeff.view(1, -1, 1, 1) * z), w2, groups=groups)
        rhs = torch.nn.functional.conv2d(torch.relu(z), cm.fold_input_scale(w2, coeff, groups), groups=groups)
    else:
        w2 = torch.randn(5, channels * fpc, generator=g, dtype=torch.float64)
        lhs = torch.relu(coeff.view(1, -1, 1, 1) * z).flatten(1) @ w2.T
        rhs = torch.relu(z).flatten(1) @ cm.fold_input_scale(w2, coeff, 1, fpc).T
    assert torch.allclose(lhs, rhs, atol=1e-12)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1.5, 0.5), (-1.0, 2.0)])
def test_rectified_gaussian_moments_match_monte_carlo(mean: float, std: float) -> None:
    torch.manual_seed(5)
    z = mean + std * torch.randn(2_000_000, dtype=torch.float64)
    m = ChannelMoments(torch.tensor([mean], dtype=torch.float64), torch.tensor([std**2], dtype=torch.float64))
    r = cm.relu_moments(m)
    assert float(r.mean) == pytest.approx(float(torch.relu(z).mean()), abs=5e-3 * max(1, std))
    assert float(r.var) == pytest.approx(float(torch.relu(z).var()), rel=1e-2, abs=1e-3)
    lr = cm.leaky_relu_moments(m, 0.1)
    zl = torch.nn.functional.leaky_relu(z, 0.1)
    assert float(lr.mean) == pytest.approx(float(zl.mean()), abs=5e-3 * max(1, std))
    assert float(lr.var) == pytest.approx(float(zl.var()), rel=1e-2, abs=1e-3)


def test_layer_output_moments_for_independent_inputs() -> None:
    torch.manual_seed(6)
    w = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    m = ChannelMoments(torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.1)
    x = m.mean + m.var.sqrt() * torch.randn(500_000, 4, dtype=torch.float64)
    y = x @ w.T + b
    out = cm.layer_output_moments(w, b, m)
    assert torch.allclose(out.mean, y.mean(0), atol=0.01)
    assert torch.allclose(out.var, y.var(0), rtol=0.02)
    assert math.isclose(float(cm.expand_moments(m, 8).mean[1]), float(m.mean[0]))


def test_correlation_fit_recovers_the_recorded_variances() -> None:
    """Inputs constant over each kernel window with probability rho: the fit finds the mixture."""
    torch.manual_seed(7)
    w = torch.randn(32, 4, 3, 3, dtype=torch.float64)
    v = torch.rand(4, dtype=torch.float64) + 0.5
    a = cm.weighted_channel_inner(w, w, v)
    b = cm.summed_kernel_variance(w, v)
    recorded = 0.3 * a + 0.5 * b
    alpha, beta = cm.fit_input_correlation(recorded, a, b)
    assert alpha == pytest.approx(0.3, rel=1e-6) and beta == pytest.approx(0.5, rel=1e-6)
    # a Monte Carlo check of the correlated model: x_ks = v_k^0.5 * (sqrt(1-r) e_ks + sqrt(r) f_k)
    r = 0.6
    n = 200_000
    e = torch.randn(n, 4, 9, dtype=torch.float64)
    f = torch.randn(n, 4, 1, dtype=torch.float64)
    x = v.sqrt().view(1, 4, 1) * ((1 - r) ** 0.5 * e + r**0.5 * f)
    out = torch.einsum("nks,jks->nj", x, w.reshape(32, 4, 9))
    predicted = (1 - r) * a + r * b
    assert torch.allclose(out.var(0), predicted, rtol=0.03)
    q = quantize_uniform(w, 2).dequantize()
    ratio = cm.predicted_variance_ratio(q, w, v, 1, 1 - r, r)
    out_q = torch.einsum("nks,jks->nj", x, q.reshape(32, 4, 9))
    assert torch.allclose(ratio, out_q.var(0) / out.var(0), rtol=0.05)


def test_variance_restoring_scale_keeps_the_mean() -> None:
    ratio = torch.tensor([4.0, 0.25, 0.0], dtype=torch.float64)
    c, degenerate = cm.variance_restoring_coefficients(ratio)
    assert torch.allclose(c[:2], torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert degenerate.tolist() == [False, False, True] and c[2] == 1.0
    mean = torch.tensor([1.5, -0.5, 0.2], dtype=torch.float64)
    a = mean + torch.randn(1000, 3, dtype=torch.float64)
    shifted = c * (a + cm.mean_preserving_shift(mean, c))
    assert torch.allclose(shifted.mean(0) - mean, c * (a.mean(0) - mean), atol=1e-12)


def test_quantized_variance_ratio_uses_recorded_variance_for_the_structured_part() -> None:
    """Filters aligned with the input's high-variance directions (as trained filters are) plus
    rounding-like noise: the split predictor matches the exact Var(Qx)/Var(Wx); a diagonal
    model applied to Q and W alike over-predicts it (the bias the default used to have)."""
    torch.manual_seed(3)
    d, c_out, rank = 64, 512, 4
    basis = torch.randn(d, rank, dtype=torch.float64)
    cov = basis @ basis.T * 4.0 + torch.diag(torch.rand(d, dtype=torch.float64) + 0.5)
    w = (torch.randn(c_out, rank, dtype=torch.float64) @ basis.T) / d**0.5 + 0.05 * torch.randn(c_out, d, dtype=torch.float64)
    noise = torch.randn(c_out, d, dtype=torch.float64) * w.std(dim=1, keepdim=True) * 0.6
    q = 0.8 * w + noise
    exact = ((q @ cov) * q).sum(1) / ((w @ cov) * w).sum(1)
    v = cov.diagonal()
    recorded = ((w @ cov) * w).sum(1)
    sq, sr = cm.kernel_stats(q), cm.kernel_stats(w)
    new = cm.quantized_variance_ratio(sq, sr, cm.kernel_cross(q, w), v, recorded)
    diagonal = cm.variance_ratio(sq.independent_variance(v), sr.independent_variance(v))
    bias_new = float((new / exact).log().mean())
    bias_diag = float((diagonal / exact).log().mean())
    assert abs(bias_new) < 0.03, bias_new
    assert bias_diag > 0.2, bias_diag
    # 4-d conv weights: kernel_cross reduces over kernel positions only
    w4 = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    assert torch.allclose(cm.kernel_cross(w4, 2 * w4), 2 * cm.kernel_stats(w4).sq_norm)


@pytest.mark.parametrize("shape, groups", [((16, 12), 1), ((16, 12, 1, 1), 1), ((16, 6, 3, 3), 1),
                                           ((16, 3, 3, 3), 2), ((12, 1, 3, 3), 12), ((8, 5, 7), 1)])
def test_paired_reductions_match_the_definitions(shape: tuple, groups: int) -> None:
    """The one-scratch-buffer reductions equal the sums written out from their definitions,
    for linear, 1x1, 3x3, grouped, depthwise and 1-d layers; the weight error equals the norm."""
    torch.manual_seed(sum(shape) + groups)
    w = torch.randn(shape, dtype=torch.float64)
    q = (w * 3).round() / 3
    c_in = shape[1] * groups
    v, m = torch.rand(c_in, dtype=torch.float64) + 0.1, torch.randn(c_in, dtype=torch.float64)
    red = cm.paired_reductions(q, w, v, m, groups)

    def per_slot(a: torch.Tensor) -> torch.Tensor:  # (C_out, C_in): zero outside each filter's group
        flat = a.reshape(shape[0], shape[1], -1)
        full = torch.zeros(shape[0], c_in, flat.shape[2], dtype=a.dtype)
        per_group = shape[0] // groups
        for j in range(shape[0]):
            g = j // per_group
            full[j, g * shape[1]:(g + 1) * shape[1]] = flat[j]
        return full

    W, Q = per_slot(w), per_slot(q)
    expect = {
        "ref_sq": (W * W).sum((1, 2)), "q_sq": (Q * Q).sum((1, 2)), "cross": (Q * W).sum((1, 2)),
        "ref_sq_v": ((W * W).sum(2) * v).sum(1), "q_sq_v": ((Q * Q).sum(2) * v).sum(1),
        "cross_v": ((Q * W).sum(2) * v).sum(1),
        "ref_out_mean": (W.sum(2) * m).sum(1), "q_out_mean": (Q.sum(2) * m).sum(1),
    }
    for name, value in expect.items():
        assert torch.allclose(getattr(red, name), value, atol=1e-10), name
    assert red.relative_error() == pytest.approx(float((q - w).norm() / w.norm()), rel=1e-9)
    # and the variance ratio is the one quantized_variance_ratio gives from kernel statistics
    sq, sr = cm.kernel_stats(q, groups), cm.kernel_stats(w, groups)
    assert torch.allclose(red.variance_ratio(), cm.quantized_variance_ratio(sq, sr, cm.kernel_cross(q, w), v), atol=1e-10)
    # without input means, no expected outputs
    assert cm.paired_reductions(q, w, v, None, groups).ref_out_mean is None


def _odd_rows() -> list[torch.Tensor]:
    """Rows a row-wise quantizer must handle: trained-like, all-zero, constant, mean-dominated,
    huge, one weight, long."""
    g = torch.Generator().manual_seed(7)
    return [
        torch.randn(37, 8, 3, 3, generator=g) * 0.05,
        torch.zeros(4, 9),
        torch.full((3, 5), 2.0),
        torch.randn(50, 9, generator=g) * 1e-3 + 1.0,  # |mean| >> spread: the one-pass formula cancels
        torch.randn(20, 3, generator=g) * 1e6,
        torch.randn(16, 1, generator=g),
        torch.randn(16, 4608, generator=g) * 0.02 + 0.003,
        torch.randn(1, 300, generator=g),
    ]


def test_row_std_equals_torch_std() -> None:
    """The faster standard deviation the 3/4-bit quantizer starts from is torch.std's, value for
    value (both float64-accurate, rounded once), on odd rows and on every layer of two torchvision
    networks; an exact match, or the quantizer's output would move."""
    import torchvision

    from dfmpc_fx.numerics.quant import row_std

    rows = [w.reshape(w.shape[0], -1) for w in _odd_rows()]
    for name in ("resnet18", "mobilenet_v3_small"):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)
        rows += [p.detach().reshape(p.shape[0], -1) for p in model.parameters() if p.dim() >= 2]
    for r in rows:
        assert torch.equal(row_std(r), r.std(dim=1, correction=0)), tuple(r.shape)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_blockwise_float64_row_moments_equal_one_shot_reductions(threads: int) -> None:
    """Large layers' row sums and norms are reduced block by block in a reused float64 buffer;
    the result is the one-shot float64 reduction's, bit for bit, for rows shorter and longer than
    a block, a row count that no block size divides, and 1-3 threads."""
    from dfmpc_fx.numerics import quant

    g = torch.Generator().manual_seed(3)
    shapes = [(2048, 4608), (257, 4100), (7, 300_001), (1000, 2048), (4096, 257)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in shapes:
            rows = torch.randn(*shape, generator=g) * 0.02 + 0.001
            assert rows.numel() >= quant._STD_CHUNKED_FROM or shape[0] < threads
            total, norm = quant._float64_row_moments(rows)
            assert torch.equal(total, rows.sum(dim=1, dtype=torch.float64)), shape
            assert torch.equal(norm, torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)), shape
            assert torch.equal(quant.row_std(rows), rows.std(dim=1, correction=0)), shape
    finally:
        torch.set_num_threads(before)


def test_row_dot_equals_vecdot() -> None:
    """The refinements' <w, q> with the product in a scratch buffer is linalg.vecdot's, bit for bit."""
    from dfmpc_fx.numerics.quant import row_dot

    g = torch.Generator().manual_seed(4)
    for shape in [(2048, 4608), (16, 9), (3, 100_000), (64, 576)]:
        a = torch.randn(*shape, generator=g)
        b = torch.randn(*shape, generator=g).mul_(3).round_()
        assert torch.equal(row_dot(a, b, torch.empty_like(a)), torch.linalg.vecdot(a, b, dim=1)), shape


@pytest.mark.parametrize("widths", [[2, 3, 4, 5, 6, 8], [3], [8, 2, 6, 4], [5, 8], [4, 4]])
@pytest.mark.parametrize("threads", [1, 2])
def test_quantize_uniform_widths_equals_one_call_per_width(widths: list[int], threads: int) -> None:
    """The allocator's batched scoring quantizer gives, bit for bit, what quantize_uniform gives
    width by width (codes, scales, dequantized weights), with 1 or 2 threads."""
    from dfmpc_fx.numerics.quant import quantize_uniform_widths

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for w in _odd_rows():
            for got, b in zip(quantize_uniform_widths(w, widths), widths):
                ref = quantize_uniform(w, b)
                assert got.bits == b and got.scheme == ref.scheme
                assert torch.equal(got.codes, ref.codes), (tuple(w.shape), b)
                assert torch.equal(got.scale, ref.scale), (tuple(w.shape), b)
                assert torch.equal(got.dequantize(), ref.dequantize())
    finally:
        torch.set_num_threads(before)
