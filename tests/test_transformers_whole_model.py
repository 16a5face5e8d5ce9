"""Hugging Face models compressed as a whole: traced on an example input, moments through
attention, one size budget (also over parts), and the MiniLM targets (opt-in)."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfmpc_fx
from dfmpc_fx import get_report
from dfmpc_fx.graph.moments import estimate_moments, layer_input_moments
from dfmpc_fx.graph.tracing import EXAMPLE_SHAPE_KEY, trace_model, trace_with_example
from dfmpc_fx.numerics import compensation as cm

D = torch.float64
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
FULL = os.environ.get("DFMPC_FULL_CHECKPOINT_TESTS") == "1"


class _SdpaBlock(nn.Module):
    """LayerNorm -> q/k/v -> heads -> scaled_dot_product_attention -> merge -> o, as HF writes it."""

    def __init__(self, c: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln, self.q, self.k, self.v, self.o = nn.LayerNorm(c), nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        b, t, c = h.shape
        q, k, v = (p(h).view(b, t, -1, c // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.o(ctx)[:, 0]


def test_attention_context_takes_the_value_moments_when_shapes_are_known() -> None:
    model = _SdpaBlock().eval()
    gm = trace_with_example(model, {"x": torch.randn(2, 5, 16)})
    assert any(EXAMPLE_SHAPE_KEY in n.meta for n in gm.graph.nodes)
    est = estimate_moments(gm)
    inputs = layer_input_moments(gm, est)
    ln = inputs["v"][0]
    assert torch.equal(ln.mean, model.ln.bias.detach().to(D))
    v_out = cm.layer_output_moments(model.v.weight.detach().to(D), model.v.bias.detach().to(D), ln)
    o_in, src = inputs["o"]
    assert o_in is not None, src
    assert torch.allclose(o_in.mean, v_out.mean) and torch.allclose(o_in.var, v_out.var)
    # the plain symbolic trace has no shapes: the merge of the heads stays unknown, with a reason
    plain = trace_model(model)
    m, reason = layer_input_moments(plain, estimate_moments(plain))["o"]
    assert m is None and reason


class _EagerBlock(_SdpaBlock):
    """The same block with attention written out, as HF's eager attention and timm's non-fused
    path write it: matmul, scale, mask, softmax over the last dim, dropout, matmul with v."""

    def __init__(self, softmax_dim: int = -1, **kw) -> None:
        super().__init__(**kw)
        self.softmax_dim = softmax_dim
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        b, t, c = h.shape
        q, k, v = (p(h).view(b, t, -1, c // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(c // self.heads)
        probs = self.drop(F.softmax(scores, dim=self.softmax_dim, dtype=torch.float32).to(q.dtype))
        ctx = (probs @ v).transpose(1, 2).contiguous().reshape(b, t, c)
        return self.o(ctx)[:, 0]


def test_eager_attention_context_takes_the_value_moments() -> None:
    """softmax(q k^T) @ v written out gets what scaled_dot_product_attention gets: v's moments at
    the output projection; a softmax over another dim does not (its rows do not sum to one over
    the tokens the matmul sums), and keeps the output projection's moments unknown."""
    model = _EagerBlock().eval()
    gm = trace_with_example(model, {"x": torch.randn(2, 5, 16)})
    inputs = layer_input_moments(gm, estimate_moments(gm))
    ln = inputs["v"][0]
    v_out = cm.layer_output_moments(model.v.weight.detach().to(D), model.v.bias.detach().to(D), ln)
    o_in, src = inputs["o"]
    assert o_in is not None, src
    assert torch.allclose(o_in.mean, v_out.mean) and torch.allclose(o_in.var, v_out.var)
    sdpa = _SdpaBlock().eval()  # the block is the SDPA block written out
    sdpa.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), sdpa(x), atol=1e-5)
    # the allocator's noise gains: the same shares for q, k, v as scaled_dot_product_attention's
    from dfmpc_fx.graph.sensitivity import output_noise_gains

    def gains(m):
        g = trace_with_example(m, {"x": torch.randn(2, 5, 16)})
        return output_noise_gains(g, estimate_moments(g).moments)

    eager_gains, sdpa_gains = gains(model), gains(sdpa)
    layers = ("q", "k", "v", "o")  # (the eager block has a softmax module the SDPA one does not)
    assert [eager_gains[n] for n in layers] == pytest.approx([sdpa_gains[n] for n in layers])
    assert eager_gains["v"] > eager_gains["q"]
    wrong = _EagerBlock(softmax_dim=-2).eval()
    gm = trace_with_example(wrong, {"x": torch.randn(2, 5, 16)})
    m, reason = layer_input_moments(gm, estimate_moments(gm))["o"]
    assert m is None and "matmul" in reason


def test_example_trace_runs_nothing_on_the_users_model_and_keeps_names() -> None:
    model = _SdpaBlock().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = trace_with_example(model, {"x": torch.randn(1, 3, 16)})
    assert {"q", "k", "v", "o", "ln"} <= {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _tiny_bert(attn_implementation: str | None = None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, **extra)
    model = transformers.BertModel(cfg).eval()
    if attn_implementation is not None:
        assert model.config._attn_implementation == attn_implementation
    return model


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
@pytest.mark.parametrize("attn", [None, "eager"])
def test_bert_model_is_compressed_whole_with_moments_at_every_linear(attn) -> None:
    """Default (SDPA) and eager attention alike: every Linear gets propagated input moments."""
    bert = _tiny_bert(attn)
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    q = dfmpc_fx.compress(bert, max_bits=16, default_bits=16, first_last_bits=None)
    assert type(q) is type(bert) and q is not bert
    report = get_report(q)
    assert any("traced on an example input" in w for w in report.warnings)
    linears = [n for n, m in bert.named_modules() if isinstance(m, nn.Linear)]
    assert [l.name for l in report.layers] == linears
    # every Linear of the encoder gets data-free input moments (attention output included)
    for layer in report.layers:
        assert layer.input_moments and layer.input_moments.startswith("propagated"), (layer.name, layer.input_moments)
    # LayerNorm-based means are not used for mean correction by default
    assert all(l.mean_shift is None for l in report.layers)
    with torch.no_grad():  # the model's own forward (masks, other lengths) with the 16-bit layers
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        out = q(input_ids=ids, attention_mask=mask).last_hidden_state
    assert float((out - ref).norm() / ref.norm()) < 1e-3
    assert not isinstance(bert.encoder.layer[0].attention.self.query, dfmpc_fx.QuantLinear)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
@pytest.mark.parametrize("untraceable", ["auto", "parts"])
@pytest.mark.parametrize("target", [4.0, 3.0])
def test_bits_per_weight_budget_is_met_over_the_whole_model(untraceable: str, target: float) -> None:
    bert = _tiny_bert()
    q = dfmpc_fx.compress(bert, target_bits=target, untraceable=untraceable)
    report = get_report(q)
    assert target - 0.1 <= report.bits_per_weight <= target + 1e-9, report.bits_per_weight
    assert all(l.bits is not None for l in report.layers)
    if untraceable == "parts":
        assert any("all parts at once" in w for w in report.warnings)
    with torch.no_grad():
        q(input_ids=torch.randint(0, 64, (1, 7)))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
def test_parts_budget_in_bytes() -> None:
    bert = _tiny_bert()
    whole = get_report(dfmpc_fx.compress(bert, target_bits=4.0, untraceable="parts"))
    q = dfmpc_fx.compress(bert, target_bytes=whole.compressed_bytes, untraceable="parts")
    assert get_report(q).compressed_bytes <= whole.compressed_bytes


def _embedding_agreement(st, sentences, q) -> tuple[float, float]:
    bert = st[0].model
    ref = st.encode(sentences, convert_to_tensor=True, batch_size=64)
    st[0].model = q
    try:
        out = st.encode(sentences, convert_to_tensor=True, batch_size=64)
    finally:
        st[0].model = bert

    def nn_(e):
        e = F.normalize(e, dim=1)
        s = e @ e.T
        s.fill_diagonal_(-2)
        return s.argmax(1)

    return float(F.cosine_similarity(out, ref).mean()), float((nn_(out) == nn_(ref)).float().mean())


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="MiniLM budget figures: set DFMPC_FULL_CHECKPOINT_TESTS=1")
def test_minilm_whole_model_at_4_and_3_bits_per_weight(minilm) -> None:
    st, sentences = minilm
    bert = st[0].model
    # Measured (benchmarks/minilm.py, 320 sentences): 4.0 -> cosine 0.947, NN 0.931 at 3.992 bits/w;
    # 3.0 -> 0.819, NN 0.875; uniform W4 plain 0.927 at 4.063 bits/w.
    for target, cos_floor, nn_floor in ((4.0, 0.935, 0.91), (3.0, 0.80, 0.85)):
        q = dfmpc_fx.compress(bert, target_bits=target)
        rep = get_report(q)
        assert target - 0.1 <= rep.bits_per_weight <= target
        cos, agree = _embedding_agreement(st, sentences, q)
        assert cos >= cos_floor and agree >= nn_floor, (target, cos, agree)


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="MiniLM budget figures: set DFMPC_FULL_CHECKPOINT_TESTS=1")
@pytest.mark.xfail(strict=True, reason="issue 12 target not reached: data-free 4 bits/w gives cosine 0.947 "
                                       "(uniform W4 with input factors 0.941 at 4.09 bits/w, an allocation from "
                                       "measured per-layer costs 0.944, uniform W4 g32 0.954; "
                                       "benchmarks/minilm_ceiling.py)")
def test_minilm_issue_12_target_cosine_099_at_4_bits(minilm) -> None:
    st, sentences = minilm
    q = dfmpc_fx.compress(st[0].model, target_bits=4.0)
    assert get_report(q).bits_per_weight <= 4.0
    cos, _ = _embedding_agreement(st, sentences, q)
    assert cos >= 0.99, cos


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="MiniLM budget figures: set DFMPC_FULL_CHECKPOINT_TESTS=1")
def test_minilm_cosine_099_at_6_bits_per_weight_and_above_uniform_w5_at_5(minilm) -> None:
    """The size that reaches the issue's 0.99: measured 0.9943 at target_bits=6.0 (uniform W6
    0.9939 at 6.06 bits/w); at 5.0, 0.9819 against uniform W5's 0.9776 at 5.06."""
    st, sentences = minilm
    bert = st[0].model
    cos = {}
    for label, kw in (("b6", dict(target_bits=6.0)), ("b5", dict(target_bits=5.0)),
                      ("w5", dict(default_bits=5, first_last_bits=None))):
        q = dfmpc_fx.compress(bert, **kw)
        if label.startswith("b"):
            assert get_report(q).bits_per_weight <= kw["target_bits"]
        cos[label] = _embedding_agreement(st, sentences, q)[0]
    assert cos["b6"] >= 0.99, cos
    assert cos["b5"] >= cos["w5"] - 0.001, cos


def test_minilm_zero_point_options_beat_symmetric_only_at_equal_size(minilm) -> None:
    """scheme="auto" (the default) lets the allocator store a Linear per channel with a zero
    point; measured on 320 sentences at 4.0 bits/w: cosine 0.947 against 0.926 symmetric-only
    (3.0 bits/w: 0.819 against 0.781). Both within the same budget."""
    st, sentences = minilm
    bert = st[0].model
    cos = {}
    for scheme in ("auto", "symmetric"):
        q = dfmpc_fx.compress(bert, target_bits=4.0, scheme=scheme)
        rep = get_report(q)
        assert rep.bits_per_weight <= 4.0
        if scheme == "auto":
            assert any(l.scheme == "asymmetric" for l in rep.layers)
        else:
            assert all(l.scheme == "symmetric" for l in rep.layers)
        cos[scheme] = _embedding_agreement(st, sentences, q)[0]
    assert cos["auto"] >= cos["symmetric"] + 0.01, cos
