"""Per-input-channel factors (``DFMPCConfig.input_scales``): chosen from data-free input
variances, charged to the budget where they pay, stored and exact through packing, save/load
and every export format; off for the explicit layouts."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfmpc_fx
from dfmpc_fx.numerics.input_scales import choose_input_factors, input_channel_factors
from dfmpc_fx.numerics.quant import quantize_uniform
from dfmpc_fx.transform.modules import is_quant_module, quantized_layer_bits

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=dfmpc_fx.NoCompensablePairWarning)


def _skewed_variances(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, generator=g).mul(4).sub(2).exp().square()  # spread over ~3.5 decades
    v[:: max(n // 8, 1)] *= 100.0  # a few outlier features, as a transformer's LayerNorm makes
    return v


def _output_noise(w: torch.Tensor, q: torch.Tensor, var: torch.Tensor, n: int = 4000) -> float:
    """Measured E||(Q - W) x||^2 / E||W x||^2 for inputs with per-feature variances ``var``."""
    x = torch.randn(n, w.shape[1], generator=torch.Generator().manual_seed(1), dtype=w.dtype) * var.sqrt()
    return float(((x @ (q - w).T).square().sum()) / (x @ w.T).square().sum())


def test_factors_lower_the_measured_output_noise_of_skewed_inputs():
    """A trained layer's weights on its high-variance inputs are small (each input contributes
    comparably to the output): one grid per row then wastes its resolution on them."""
    torch.manual_seed(0)
    var = _skewed_variances(128)
    w = torch.randn(96, 128) * var.rsqrt()
    for bits in (3, 4):
        def quantize(t, bits=bits):
            return quantize_uniform(t, bits).dequantize()

        got = choose_input_factors(w, var, quantize, torch.float16)
        assert got.alpha > 0 and got.factors is not None and got.factors.dtype == torch.float16
        assert got.saved > 0
        tv = got.factors.float()[None, :]
        with_factors = quantize(w / tv) * tv
        plain, better = _output_noise(w, quantize(w), var), _output_noise(w, with_factors, var)
        assert better < 0.8 * plain, (bits, plain, better)
    # iid weights (nothing to protect): the same rule keeps none
    iid = choose_input_factors(torch.randn(96, 128), var, lambda t: quantize_uniform(t, 3).dequantize(), torch.float16)
    assert iid.factors is None


def test_no_factors_where_variances_give_nothing_to_weigh():
    w = torch.randn(8, 16)
    q = lambda t: quantize_uniform(t, 3).dequantize()  # noqa: E731
    for var in (torch.ones(16), torch.zeros(16), torch.full((16,), float("nan")), torch.ones(15)):
        got = choose_input_factors(w, var, q, torch.float32)
        assert got.factors is None and got.alpha == 0.0 and got.saved == 0.0
    t = input_channel_factors(_skewed_variances(16), 0.5, torch.float16)
    assert t.dtype == torch.float16 and bool(torch.isfinite(t).all())
    assert float(t.float().log().mean()) == pytest.approx(0.0, abs=1e-2)  # geometric mean 1


def test_config_auto_follows_the_budget_and_validates():
    C = dfmpc_fx.DFMPCConfig
    assert C().uses_input_scales and C(target_bits=3.0).uses_input_scales
    assert not C(target_bits=None).uses_input_scales and not C(method="paper").uses_input_scales
    assert C(target_bits=None, input_scales=True).uses_input_scales
    assert not C(target_bits=3.0, input_scales=False).uses_input_scales
    for bad in ("yes", 1, None):
        with pytest.raises(dfmpc_fx.ConfigError, match="input_scales"):
            C(input_scales=bad)
    with pytest.raises(dfmpc_fx.ConfigError, match="method='dfmpc'"):
        C(method="paper", input_scales=True)
    assert C.from_dict(C(input_scales=False).to_dict()) == C(input_scales=False)


class LayerNormMLP(nn.Module):
    """Linear -> LayerNorm (a few large gammas, as in BERT) -> Linear -> GELU -> Linear."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.inp, self.ln = nn.Linear(32, c), nn.LayerNorm(c)
        self.up, self.down = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        with torch.no_grad():
            gamma = _skewed_variances(c, seed=3).sqrt().clamp(0.05, 12.0)
            self.ln.weight.copy_(gamma)
            self.ln.bias.normal_(0.0, 0.1)
            self.up.weight.div_(gamma)  # as trained: small weights on the large features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.ln(self.inp(x)))))


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return LayerNormMLP().eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_budget_buys_factors_where_they_pay_and_counts_them(mlp):
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(2))
    q = dfmpc_fx.compress(mlp, target_bits=3.0)
    rep = dfmpc_fx.get_report(q)
    with_factors = {l.name for l in rep.layers if l.input_scale_exponent}
    assert "up" in with_factors  # after the skewed LayerNorm
    assert rep.bits_per_weight <= 3.0 + 1e-9
    total, weights = 0, 0
    for name, m in q.named_modules():
        if is_quant_module(m):
            has = hasattr(m, "weight_input_scale")
            assert has == (name in with_factors)
            n_scale = m.weight_scale.numel() + (m.weight_input_scale.numel() if has else 0) \
                + (m.weight_zero_point.numel() if m.scheme == "asymmetric" else 0)
            assert quantized_layer_bits(m) == m.w_bits * m.weight.numel() + 16 * n_scale
            total, weights = total + quantized_layer_bits(m), weights + m.weight.numel()
    assert rep.bits_per_weight == pytest.approx(total / weights)
    # at the same budget, the model with factors is closer to the float one
    plain = dfmpc_fx.compress(mlp, target_bits=3.0, input_scales=False)
    with torch.no_grad():
        ref = mlp(x)
        assert _rel(q(x), ref) < 0.9 * _rel(plain(x), ref), (_rel(q(x), ref), _rel(plain(x), ref))


def test_layouts_get_no_factors_unless_asked(mlp):
    q = dfmpc_fx.compress(mlp, default_bits=4, first_last_bits=None)
    assert not any(hasattr(m, "weight_input_scale") for m in q.modules())
    assert all(l.input_scale_exponent is None for l in dfmpc_fx.get_report(q).layers)
    forced = dfmpc_fx.compress(mlp, default_bits=4, first_last_bits=None, input_scales=True)
    assert hasattr(forced.get_submodule("up"), "weight_input_scale")
    assert dfmpc_fx.get_report(forced).compressed_bytes > dfmpc_fx.get_report(q).compressed_bytes


class ConvAndLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(4, 16, 3, padding=1), nn.BatchNorm1d(16)
        self.c1b, self.b1b = nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16)
        self.c2, self.b2 = nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.c3, self.b3 = nn.Conv2d(24, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))  # (B, 16, L)
        h = torch.relu(self.b1b(self.c1b(h)))
        h = torch.relu(self.b2(self.c2(h.unsqueeze(2).expand(-1, -1, 4, -1))))
        h = torch.relu(self.b3(self.c3(h)))
        return self.fc(h.mean((2, 3)))


def test_packed_save_and_exports_bit_exact_with_factors(tmp_path, artifacts_reproduce):
    torch.manual_seed(0)
    model = ConvAndLinear().eval()
    with torch.no_grad():  # skewed BatchNorm gammas, the next layer's weights small where they are large
        for bn, nxt in ((model.b1, model.c1b), (model.b2, model.c3), (model.b3, model.fc)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            gamma = _skewed_variances(bn.num_features, seed=5).sqrt().clamp(0.05, 10.0)
            bn.weight.copy_(gamma)
            nxt.weight.div_(gamma.reshape((1, -1) + (1,) * (nxt.weight.dim() - 2)))
    q = dfmpc_fx.compress(model, default_bits=3, first_last_bits=None, input_scales=True, scale_dtype="float16")
    names = {n for n, m in q.named_modules() if hasattr(m, "weight_input_scale")}
    assert {"c1b", "c3", "fc"} <= names  # Conv1d, Conv2d, Linear after skewed BatchNorms
    assert "c1" not in names  # the model's input: equal variances, nothing to weigh
    packed = artifacts_reproduce(q, torch.randn(2, 4, 10), tmp_path)
    for name in names:
        p, m = packed.get_submodule(name), q.get_submodule(name)
        assert p.weight_input_scale.dtype == torch.float16
        assert torch.equal(p.dequantize_weight(), m.weight)
        assert quantized_layer_bits(p) == quantized_layer_bits(m)


@pytest.mark.slow
def test_minilm_factors_beat_none_at_the_same_budget(minilm):
    """all-MiniLM-L6-v2 at 4.0 bits/w: measured (benchmarks/minilm.py) cosine 0.947 with
    factors against 0.935 without, both at <= 4.0 bits/w."""
    st, sentences = minilm
    bert = st[0].model
    ref = st.encode(sentences, convert_to_tensor=True, batch_size=64)
    cos = {}
    for flag in (True, False):
        q = dfmpc_fx.compress(bert, target_bits=4.0, input_scales="auto" if flag else False)
        rep = dfmpc_fx.get_report(q)
        assert rep.bits_per_weight <= 4.0 + 1e-9
        assert any(l.input_scale_exponent for l in rep.layers) == flag
        st[0].model = q
        try:
            out = st.encode(sentences, convert_to_tensor=True, batch_size=64)
        finally:
            st[0].model = bert
        cos[flag] = float(F.cosine_similarity(out, ref).mean())
    assert cos[True] > cos[False] + 0.003, cos


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("quantizer", ["per_channel", "grouped", "zero_point", "per_tensor"])
def test_stacked_candidates_choose_what_one_call_per_candidate_chooses(quantizer, threads):
    """With ``row_wise`` the five exponents' rows are quantized in one stacked call; the choice,
    its factors and the saved ratio are those of one call per exponent, exactly, with 1-3
    threads. A per-tensor quantizer is not row-wise: compress never stacks for it, and stacking
    it would change the result (the control that the comparison can fail)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(80, 48, 3, 3, generator=g) * 0.05
    var = torch.rand(48, generator=g).pow(3) * 4 + 1e-3
    quantize = {
        "per_channel": lambda x: quantize_uniform(x, 3).dequantize(),
        "grouped": lambda x: quantize_uniform(x, 3, group_size=64).dequantize(),
        "zero_point": lambda x: quantize_uniform(x, 3, symmetric=False, affine_from_symmetric=True).dequantize(),
        "per_tensor": lambda x: quantize_uniform(x, 2, per_channel=False).dequantize(),
    }[quantizer]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = choose_input_factors(w, var, quantize, torch.float16)
        stacked = choose_input_factors(w, var, quantize, torch.float16, row_wise=True)
    finally:
        torch.set_num_threads(before)
    same = (alone.alpha == stacked.alpha and alone.saved == stacked.saved
            and (alone.factors is None) == (stacked.factors is None)
            and (alone.factors is None or torch.equal(alone.factors, stacked.factors)))
    assert same == (quantizer != "per_tensor"), (alone, stacked)
