"""Models as people have them: layer subclasses with their own forward, functional weight use,
forwards that cache on ``self``, signatures with options, bare layers, BatchNorm fused with an
activation, timm and Hugging Face models."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfmpc_fx
from dfmpc_fx import DFMPCConfig, find_compensable_pairs, get_report
from dfmpc_fx.errors import CompressedModelError
from dfmpc_fx.graph.pairs import OWN_FORWARD, SCALE_VARYING
from dfmpc_fx.numerics.quant import quantize_dorefa, quantize_ternary_twn

BITS16 = DFMPCConfig(low_bits=16, high_bits=16, default_bits=16, first_last_bits=16, max_bits=16)


@torch.no_grad()
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dfmpc_fx.NoCompensablePairWarning)
        yield


class SameConv2d(nn.Conv2d):
    """TF 'same' padding, as in timm's Conv2dSame / efficientnet ports."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight standardization in forward (timm's StdConv2d / ScaledStdConv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BatchNormAct(nn.BatchNorm2d):
    """Mimics timm's BatchNormAct2d: BatchNorm with its activation inside."""

    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class SubclassNet(nn.Module):
    def __init__(self, conv_cls: type) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = conv_cls(8, 16, 3, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("conv_cls", [SameConv2d, StdConv2d])
def test_layer_subclass_with_own_forward_is_quantized_keeping_its_forward(conv_cls: type) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(SubclassNet(conv_cls))
    x = torch.randn(2, 3, 17, 17)
    q = dfmpc_fx.compress(model, BITS16)
    assert type(q.c1) is conv_cls and q.c1.w_bits == 16  # old code: traced through, left in float
    assert rel(q(x), model(x)) < 1e-3
    report = {l.name: l for l in get_report(q).layers}
    assert report["c1"].bits == 16
    refusal = {r["layer"]: r["reason"] for r in get_report(q).refusals}
    assert refusal["c1"] == OWN_FORWARD  # its channel scales are not its weight's: no pair
    q8 = dfmpc_fx.compress(model, example_inputs=x, default_bits=8)  # 8 bits: runs, stays close
    assert type(q8.c1) is conv_cls and rel(q8(x), model(x)) < 0.1


@pytest.mark.parametrize("conv_cls", [SameConv2d, StdConv2d])
def test_layer_subclass_with_own_forward_is_packed_keeping_its_forward(conv_cls: type, tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(SubclassNet(conv_cls))
    x = torch.randn(2, 3, 17, 17)
    q = dfmpc_fx.compress(model, low_bits=4, high_bits=8, default_bits=4)
    packed = dfmpc_fx.pack_model(q)
    c1 = packed.c1
    assert isinstance(c1, conv_cls) and type(c1).forward is conv_cls.forward  # its own forward still runs
    state = packed.state_dict()
    assert "c1.weight" not in state and state["c1.packed"].dtype == torch.uint8  # old code: float weight kept
    assert state["c1.packed"].numel() == -(-q.c1.weight.numel() * 4 // 8)  # 4 bits a weight
    with torch.no_grad():
        assert torch.equal(packed(x), q(x))
    back = dfmpc_fx.unpack_model(packed)
    assert type(back.c1) is conv_cls and torch.equal(back.c1.weight, q.c1.weight)
    assert list(back.state_dict()) == list(q.state_dict())
    path = dfmpc_fx.save(q, tmp_path / "m.dfmpc")
    loaded = dfmpc_fx.load(path, packed=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    ts = dfmpc_fx.export_torchscript(q, tmp_path / "m.ts", x)  # packed by default; checked on reload
    assert "c1.packed" in dict(torch.jit.load(str(ts)).named_buffers())


def test_layer_subclass_declared_leaf_keeps_its_forward() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(SubclassNet(SameConv2d))
    x = torch.randn(2, 3, 17, 17)
    q = dfmpc_fx.compress(model, BITS16, leaf_modules=[SameConv2d])  # old code: parent's forward, crash
    assert rel(q(x), model(x)) < 1e-3


class FunctionalAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.randn(8))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, embed: bool = False):
        key = str(x.device)  # timm's attention-bias cache (efficientformer, levit)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        y = F.linear(x, self.qkv.weight, self.qkv.bias)[..., :8] + self.cache[key]
        y = self.proj(y)
        return (y, y.mean()) if embed else y


def test_every_layer_is_in_the_report_with_a_reason() -> None:
    model = FunctionalAttn().eval()
    q = dfmpc_fx.compress(model, BITS16, concrete_args={"embed": False})
    layers = {l.name: l for l in get_report(q).layers}
    assert set(layers) == {"qkv", "proj", "unused"}
    assert layers["proj"].bits == 16 and layers["proj"].reason is None
    assert layers["qkv"].bits is None and "functional call" in layers["qkv"].reason
    assert layers["unused"].bits is None and layers["unused"].reason == "not reached by forward"


def test_user_model_is_never_mutated_by_tracing() -> None:
    model = FunctionalAttn().eval()
    for _ in range(2):
        find_compensable_pairs(model, concrete_args={"embed": False})
        q = dfmpc_fx.compress(model, BITS16, concrete_args={"embed": False})
    assert model.cache == {}  # old code: a Proxy stored under "Proxy(...)"
    x = torch.randn(3, 8)
    assert rel(q(x), model(x)) < 1e-3
    assert set(model.cache) == {"cpu"}
    q = dfmpc_fx.compress(model, BITS16, concrete_args={"embed": False}, example_inputs=x)  # cached non-leaf tensor
    assert rel(q(x), model(x)) < 1e-3


class OptionalMask(nn.Module):
    """``mask=None`` driving an ``is not None`` branch, as in timm's Hiera, and a bool default
    read once it is None, as in timm's ViT."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        y = torch.relu(self.bn(self.a(x)))
        if mask is not None or causal:  # timm's ViT: `if attn_mask is not None or is_causal:`
            y = y * mask.view(1, 1, 8, 8)
        return self.b(y)


def test_arguments_with_literal_defaults_are_traced_at_their_defaults() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(OptionalMask())
    x = torch.randn(2, 3, 8, 8)
    # old code: fx traced `mask` as a Proxy, took the masked branch, and the result failed on x
    q = dfmpc_fx.compress(model, BITS16, example_inputs=x)
    assert rel(q(x), model(x)) < 1e-3
    assert len(get_report(q).excluded_pairs) == 1  # a -> bn -> relu -> b, found (first/last pins it)
    assert len(find_compensable_pairs(model).pairs) == 1
    with pytest.raises(AssertionError, match="specialized to have value None"):
        q(x, torch.ones(8, 8))  # still in the signature, and a mask is refused loudly, not ignored
    qm = dfmpc_fx.compress(model, BITS16, output="module")  # the model's own forward takes the mask
    assert rel(qm(x, torch.ones(8, 8)), model(x, torch.ones(8, 8))) < 1e-3


def test_example_inputs_failure_is_typed() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with pytest.raises(CompressedModelError, match="example_inputs"):
        dfmpc_fx.compress(model, example_inputs=torch.randn(2, 5))


def test_output_module_keeps_forward_and_signature() -> None:
    model = FunctionalAttn().eval()
    x = torch.randn(3, 8)
    gm = dfmpc_fx.compress(model, BITS16, concrete_args={"embed": False})
    with pytest.raises(TypeError):
        gm(x, embed=True)  # the GraphModule lost `embed`: the default stays a GraphModule
    qm = dfmpc_fx.compress(model, BITS16, concrete_args={"embed": False}, output="module")
    assert type(qm) is FunctionalAttn and qm is not model
    y, m = qm(x, embed=True)
    assert rel(y, model(x)) < 1e-3 and isinstance(qm.proj, dfmpc_fx.QuantLinear)
    assert not isinstance(model.proj, dfmpc_fx.QuantLinear)
    assert {l.name: l.bits for l in get_report(qm).layers}["proj"] == 16
    with pytest.raises(dfmpc_fx.ConfigError):
        dfmpc_fx.compress(model, output="graphmodule")


def test_bare_layer() -> None:
    layer = nn.Linear(384, 384)
    x = torch.randn(4, 384)
    q = dfmpc_fx.compress(layer, example_inputs=x, default_bits=8)  # old code: InvalidModelError
    assert isinstance(q, dfmpc_fx.QuantLinear) and q.w_bits == 8
    assert rel(q(x), layer(x)) < 0.02
    assert [(l.name, l.bits) for l in get_report(q).layers] == [("", 8)]
    budget = dfmpc_fx.compress(layer, example_inputs=x)  # the default size budget: 4 bits/w, scales counted
    assert isinstance(budget, dfmpc_fx.QuantLinear) and get_report(budget).bits_per_weight <= 4.0
    conv = nn.Conv2d(3, 4, 3)
    assert isinstance(dfmpc_fx.compress(conv, BITS16), dfmpc_fx.QuantConv2d)


class BNActNet(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = BatchNormAct(8, act)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c3(self.bn(self.c2(torch.relu(self.c1(x)))))
        return self.fc(torch.relu(x).mean((2, 3)))


@pytest.mark.parametrize("act, pairs", [(nn.ReLU(), True), (nn.ReLU6(), False)])
def test_batchnorm_with_activation_inside(act: nn.Module, pairs: bool) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(BNActNet(act))
    search = find_compensable_pairs(model)
    found = {p.first: p for p in search.pairs}
    if pairs:
        assert found["c2"].bn == "bn" and found["c2"].second == "c3"
    else:
        assert "c2" not in found
        refusal = next(r for r in search.refusals if r.first == "c2")
        assert refusal.reason == SCALE_VARYING and "ReLU6" in refusal.detail
    x = torch.randn(2, 3, 12, 12)
    q = dfmpc_fx.compress(model, BITS16)
    assert type(q.bn) is BatchNormAct and rel(q(x), model(x)) < 1e-3
    q = dfmpc_fx.compress(model, low_bits=4, high_bits=8)
    assert rel(q(x), model(x)) < 0.3


def test_found_pairs_are_all_accounted_for_in_the_report() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(BNActNet(nn.ReLU()))
    search = find_compensable_pairs(model)
    for kwargs in ({}, {"compensate": False}, {"first_last_bits": None}):
        report = get_report(dfmpc_fx.compress(model, **kwargs))
        assert report.num_pairs + len(report.excluded_pairs) == len(search.pairs)
        assert all(": " in e for e in report.excluded_pairs)


def test_dorefa_8_bits_stays_close_to_large_weights() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 3, 3, 3)
    w = w / w.abs().max() * 3.0  # max |w| = 3: tanh warped this (rel. error 1.4-8.0 before)
    assert rel(quantize_dorefa(w, 8).dequantize(), w) > 0.3  # the paper's tanh form (method="paper" inside pairs)
    qw = quantize_dorefa(w, 8, tanh=False)
    assert rel(qw.dequantize(), w) < 0.01
    assert torch.equal(qw.dequantize(), (qw.codes - qw.zero_point) * qw.scale)
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= 255


class _PaperNet(nn.Module):
    """stem -> (a -> b) pair -> residual add with the stem -> fc: the stem (fan-out) and fc are
    outside every pair, a/b are the pair."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a, self.bna = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b, self.bnb = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.stem(x)))
        y = self.bnb(self.b(torch.relu(self.bna(self.a(s)))))
        return self.fc(torch.relu(y + s).mean(dim=(2, 3)))


@pytest.mark.parametrize("first_last_bits", [8, None])
def test_paper_mode_keeps_layers_outside_pairs_close_at_8_bits(first_last_bits) -> None:
    torch.manual_seed(0)
    model = _PaperNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3.0 / m.weight.abs().max())  # max |w| = 3: where tanh warps
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for compensate in (True, False):
        q = dfmpc_fx.compress(model, method="paper", low_bits=2, high_bits=6, default_bits=8,
                              first_last_bits=first_last_bits, compensate=compensate)
        layers = {l.name: l for l in get_report(q).layers}
        assert layers["a"].role == "low" and layers["b"].role == "high"
        outside = {"stem", "fc"}
        for name in outside:
            assert layers[name].role == ("first_last" if first_last_bits else "default") and layers[name].bits == 8
            w = q.get_submodule(name).weight
            assert rel(w, originals[name]) < 0.01, name  # old: the tanh warp, > 0.3
            assert layers[name].weight_rel_error < 0.01
            assert torch.equal(w, quantize_dorefa(originals[name], 8, tanh=False).dequantize())
        # inside the pair: the paper's quantizers as published (TWN at 2 bits, tanh DoReFa)
        low = quantize_ternary_twn(originals["a"])
        assert torch.equal(q.get_submodule("a").weight, low.dequantize())
        assert q.get_submodule("b").scheme == "dorefa"
        if not compensate:  # no partner scale folded into b: its codes are the published form's
            assert torch.equal(q.get_submodule("b").weight, quantize_dorefa(originals["b"], 6).dequantize())


def _timm():
    return pytest.importorskip("timm")


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("nf_regnet_b0", 64), ("efficientformer_l1", 224)])
def test_timm_models_compress_and_keep_function_at_16_bits(name: str, size: int) -> None:
    timm_ = _timm()
    torch.manual_seed(0)
    model = timm_.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]
    q = dfmpc_fx.compress(model, BITS16, example_inputs=x)
    assert all(not c for c in caches)  # old code: {'Proxy(getattr_2)': Proxy} in efficientformer_l1
    assert rel(q(x), model(x)) < 1e-3
    report = get_report(q)
    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}
    assert {l.name for l in report.layers} == names
    assert all(l.bits is not None or l.reason for l in report.layers)
    if name == "nf_regnet_b0":  # ScaledStdConv2d keeps its class (weight standardized in forward)
        assert type(q.stem.conv).__name__ == "ScaledStdConv2d" and q.stem.conv.w_bits == 16


def test_timm_batchnorm_act_is_a_batchnorm_with_its_activation() -> None:
    timm_ = _timm()
    from timm.layers import BatchNormAct2d

    for act, pairs in (("relu", True), ("relu6", False)):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=act), nn.Conv2d(8, 4, 3)).eval()
        search = find_compensable_pairs(model)
        assert (len(search.pairs) == 1) is pairs


def test_cli_takes_timm_specs(capsys: pytest.CaptureFixture) -> None:
    _timm()
    from dfmpc_fx.integrations import cli

    assert cli.main(["pairs", "timm:resnet18"]) == 0
    assert "layer1.0.conv1" in capsys.readouterr().out
    assert cli.main(["pairs", "timm:resnet19000"]) != 0
    assert "timm has no model" in capsys.readouterr().err
    model, shape = cli.build_model("timm:mobilenetv2_035")
    assert shape == (1, 3, 224, 224)


@pytest.mark.slow
def test_bert_model_compresses_in_one_call_and_serves_sentence_transformers(minilm) -> None:
    st, sentences = minilm
    bert = st[0].model
    ref = st.encode(sentences, convert_to_tensor=True, batch_size=64)
    q = dfmpc_fx.compress(bert, default_bits=8)  # no symbolic trace: traced on its dummy input, returned as a BertModel
    assert type(q) is type(bert) and q is not bert
    report = get_report(q)
    assert {l.bits for l in report.layers} == {8}
    assert len(report.layers) == sum(isinstance(m, nn.Linear) for m in bert.modules())
    st[0].model = q
    assert any("traced on an example input" in w for w in report.warnings)
    out = st.encode(sentences, convert_to_tensor=True, batch_size=64)
    cos = F.cosine_similarity(out, ref)
    assert float(cos.mean()) >= 0.999, float(cos.mean())
    assert not isinstance(bert.encoder.layer[0].attention.self.query, dfmpc_fx.QuantLinear)


def test_untraceable_model_by_parts_on_request() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                x = -x
            return self.head(self.block(x).mean((2, 3)))

    model = Untraceable().eval()
    with pytest.raises(dfmpc_fx.TraceError):
        dfmpc_fx.compress(model)
    x = torch.randn(2, 3, 9, 9)
    q = dfmpc_fx.compress(model, BITS16, untraceable="parts", example_inputs=x)
    assert type(q) is Untraceable and rel(q(x), model(x)) < 1e-3
    report = get_report(q)
    assert [l.name for l in report.layers] == ["block.0", "block.2", "head"]
    assert report.pairs == ["block: 0 -> 1 (ReLU) -> 2"]  # first/last pins are not applied per part
    q = dfmpc_fx.compress(model, untraceable="parts", low_bits=2, high_bits=6)
    assert [(l.name, l.bits) for l in get_report(q).layers] == [("block.0", 2), ("block.2", 6), ("head", 8)]
    assert rel(q(x), model(x)) < 0.5


class _UntraceableBN(nn.Module):
    """conv -> BatchNorm -> ReLU parts under a forward that fx cannot trace (a data-dependent branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 64, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                   nn.Conv2d(64, 64, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        g = torch.Generator().manual_seed(0)
        for bn in self.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_(0, 0.5, generator=g)
                bn.running_var.uniform_(0.5, 2.0, generator=g)
                bn.weight.data.uniform_(0.5, 1.5, generator=g)
                bn.bias.data.normal_(generator=g)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_parts_budget_gets_input_factors_and_folds_batchnorm() -> None:
    """Part by part, a size budget gets what a whole-model budget gets: input factors where they
    pay (their bytes charged to the one knapsack), and under target_bytes BatchNorms folded into
    their layers with the bytes they free (and the biases the plans add) counted."""
    torch.manual_seed(0)
    model = _UntraceableBN().eval()
    x = torch.randn(4, 3, 16, 16)
    q = dfmpc_fx.compress(model, target_bits=4.0, untraceable="parts")
    report = get_report(q)
    assert any("all parts at once" in w for w in report.warnings)
    assert report.bits_per_weight <= 4.0 + 1e-9
    with_factors = [l.name for l in report.layers if l.input_scale_exponent]
    assert with_factors, [(l.name, l.bits, l.input_scale_exponent) for l in report.layers]
    assert rel(q(x), model(x)) < 0.1
    budget = report.compressed_bytes
    qb = dfmpc_fx.compress(model, target_bytes=budget, untraceable="parts")
    rb = get_report(qb)
    assert rb.compressed_bytes <= budget
    assert {l.batchnorm_folded for l in rb.layers if l.name != "head"} == {"1", "4"}
    assert isinstance(qb.block[1], nn.Identity) and isinstance(model.block[1], nn.BatchNorm2d)
    assert rel(qb(x), model(x)) < 0.1


class _UntraceableNoBias(nn.Module):
    """Bias-free convs with no BatchNorm, under an untraceable forward: mean correction gives
    each of them a bias, which a byte budget must count."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 3, bias=False), nn.ReLU(), nn.Conv2d(32, 64, 3, bias=False), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(64, 64, 3, bias=False), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.head(self.b(self.a(x)).mean((2, 3)))


@pytest.mark.parametrize("budget", [24700, 25400, 26800, 29600, 33800, 38700])
def test_parts_byte_budget_counts_the_biases_corrections_add(budget: int) -> None:
    """Part by part, target_bytes was exceeded by the biases the corrections add to bias-free
    layers (at these budgets by 76-620 bytes): the pool now counts them."""
    torch.manual_seed(0)
    model = _UntraceableNoBias().eval()
    q = dfmpc_fx.compress(model, untraceable="parts", target_bytes=budget)
    report = get_report(q)
    assert report.compressed_bytes <= budget
    assert all(l.mean_shift is not None for l in report.layers if l.name != "head")


def test_markdown_lists_the_reasons() -> None:
    md = get_report(dfmpc_fx.compress(FunctionalAttn().eval(), concrete_args={"embed": False})).to_markdown()
    assert "| qkv | fp32 | weight used through a functional call (get_attr), kept in float |" in md
    assert "| unused | fp32 | not reached by forward |" in md


# --------------------------------------------------------------------------------------------
# tied weights, wrapped models, weights not loaded
# --------------------------------------------------------------------------------------------
class _TiedPair(nn.Module):
    """Two Linear layers given one Parameter, then an untied head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


class _TiedEmbedding(nn.Module):
    """An output projection tied to its input embedding, as in language models."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mix, self.out = nn.Embedding(100, 16), nn.Linear(16, 16), nn.Linear(16, 100)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(ids))))


def _storages(m: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("budget", [None, 3.0])
def test_tied_weights_stay_float_tied_and_within_the_budget(mode: str, budget) -> None:
    """A layer whose weight another module holds stays float with a reason (quantizing one
    holder would store the weight twice), the tie holds in the result, the budget counts the
    tensor once, and the result shares no tensor with the input."""
    torch.manual_seed(0)
    for net, tied, x in ((_TiedPair(), ["a", "b"], torch.randn(4, 32)),
                         (_TiedEmbedding(), ["out"], torch.randint(0, 100, (2, 5)))):
        net.train(mode == "train")
        cfg = DFMPCConfig(target_bits=budget) if budget else DFMPCConfig(low_bits=2, high_bits=6)
        if budget:
            # the float tied layers alone exceed 3 bits/w of the model: the error says so, typed
            with pytest.raises(dfmpc_fx.ConfigError, match="weights are tied"):
                dfmpc_fx.compress(net, cfg)
            cfg = DFMPCConfig(target_bits=30.0)
        q = dfmpc_fx.compress(net, cfg)
        rep = get_report(q)
        by_name = {r.name: r for r in rep.layers}
        for name in tied:
            assert by_name[name].bits is None and "weight tied" in by_name[name].reason, by_name[name]
        quantized = [r for r in rep.layers if r.bits is not None]
        assert quantized and all(r.name not in tied for r in quantized)
        if budget:
            assert rep.bits_per_weight <= 30.0 + 1e-9
        holders = [q.get_submodule(n).weight for n in tied] + ([q.emb.weight] if hasattr(net, "emb") else [])
        assert all(h is holders[0] for h in holders), "the tie must hold in the result"
        assert not _storages(net) & _storages(q), "the result shares a tensor with the input"
        net.eval()
        with torch.no_grad():
            assert q(x).shape == net(x).shape
        assert rep.compressed_bytes < rep.float_bytes


def test_tied_layer_inside_a_leaf_is_reported_as_tied() -> None:
    class Leafy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.block, self.fc = nn.Embedding(50, 16), nn.Sequential(nn.Linear(16, 50)), nn.Linear(50, 4)
            self.block[0].weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.block(self.emb(ids)))

    net = Leafy().eval()
    q = dfmpc_fx.compress(net, leaf_modules=["block"], low_bits=4, high_bits=6, default_bits=4)
    reason = {r.name: r.reason for r in get_report(q).layers}["block.0"]
    assert "weight tied" in reason
    assert q.block[0].weight is q.emb.weight and not _storages(net) & _storages(q)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_wrapped_models_compress_what_they_wrap(wrap: str) -> None:
    """torch.compile's OptimizedModule and DataParallel do not trace; compress takes the module
    inside, warns that the result is not wrapped, and says so in the report."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    wrapped = torch.compile(net) if wrap == "compile" else nn.DataParallel(net)
    with pytest.warns(UserWarning, match="the result is not wrapped"):
        q = dfmpc_fx.compress(wrapped, example_inputs=torch.randn(2, 3, 8, 8))
    direct = dfmpc_fx.compress(net)
    assert q.code == direct.code
    for k, v in direct.state_dict().items():
        assert torch.equal(v, q.state_dict()[k]), k
    assert any("is not wrapped" in w for w in get_report(q).warnings)


def test_weights_on_the_meta_device_are_a_typed_error() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(dfmpc_fx.InvalidModelError, match="meta device"):
        dfmpc_fx.compress(net)


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_hugging_face_conv1d_is_compressed_as_linear() -> None:
    """GPT-2's projections are transformers' Conv1D (``x @ W + b``, W stored transposed): each is
    compressed as an nn.Linear computing the same function (16 bits: the model's function kept),
    the input model keeps its Conv1D layers, untouched, and the report says what was done; the
    lm_head, tied to the token embedding, stays float with its reason."""
    net = _tiny_gpt2()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ids = torch.randint(0, 100, (2, 8))
    conv1d = [n for n, m in net.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = dfmpc_fx.compress(net, BITS16, example_inputs={"input_ids": ids})  # a dict: run with keywords
    rep = get_report(q)
    rows = {r.name: r for r in rep.layers}
    for name in conv1d:
        assert rows[name].bits == 16 and rows[name].kind == "Linear", rows[name]
        assert isinstance(q.get_submodule(name), nn.Linear)
    assert rows["lm_head"].bits is None and "weight tied" in rows["lm_head"].reason
    assert any("8 Hugging Face Conv1D layers" in w for w in rep.warnings)
    with torch.no_grad():
        assert rel(q(input_ids=ids).logits, net(input_ids=ids).logits) < 1e-3
    assert all(type(net.get_submodule(n)).__name__ == "Conv1D" for n in conv1d)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not _storages(net) & _storages(q)
    with pytest.raises(dfmpc_fx.ConfigError, match="lm_head"):
        dfmpc_fx.compress(net, target_bits=4.0)  # the float lm_head alone is above 4 bits/w of the model
    # part by part too, the tie holds (a part owns the copy's tensors: no second copy unties it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = dfmpc_fx.compress(net, BITS16, untraceable="parts")
    assert q.lm_head.weight is q.transformer.wte.weight and not _storages(net) & _storages(q)
    assert all(isinstance(q.get_submodule(n), nn.Linear) for n in conv1d)


def test_bare_conv1d_comes_back_as_its_compressed_linear() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(8, 16).eval()
    x = torch.randn(3, 16)
    q = dfmpc_fx.compress(layer, BITS16)
    assert isinstance(q, nn.Linear) and type(layer).__name__ == "Conv1D"
    with torch.no_grad():
        assert rel(q(x), layer(x)) < 1e-4
    assert any("(the model)" in w for w in get_report(q).warnings)


def test_default_budget_out_of_reach_for_float_layers_gives_the_rest_its_bits() -> None:
    """With the tied lm_head in float, GPT-2 cannot reach 4 bits/w; the default budget (never
    asked for) then gives the layers it covers 4 bits/w among themselves, not their smallest."""
    net = _tiny_gpt2()
    with pytest.warns(dfmpc_fx.DefaultBudgetWarning, match="layers it covers got 4 bits/w"):
        q = dfmpc_fx.compress(net)
    rep = get_report(q)
    quantized = [r for r in rep.layers if r.bits is not None]
    assert len(quantized) == 8 and len({r.bits for r in quantized}) > 1
    covered = sum(r.numel for r in quantized)
    weight_count = covered + net.lm_head.weight.numel()
    covered_bits = rep.bits_per_weight * weight_count - 32 * net.lm_head.weight.numel()
    assert 3.5 * covered < covered_bits <= 4.0 * covered + 1e-6


def test_conv1d_with_its_own_forward_or_a_tied_weight_stays_float_with_a_reason() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Scaled(Conv1D):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.fc = Conv1D(16, 16), Scaled(16, 16), Conv1D(16, 16), nn.Linear(16, 4)
            self.c.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))

    net = Net().eval()
    q = dfmpc_fx.compress(net, low_bits=4, high_bits=6, default_bits=4)
    rows = {r.name: r for r in get_report(q).layers}
    for name in ("a", "b", "c"):
        assert rows[name].bits is None and "Conv1D" in rows[name].reason, rows[name]
    assert rows["fc"].bits is not None
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert q(x).shape == net(x).shape


def test_layers_inside_a_leaf_are_allocated_by_the_budget() -> None:
    """fx keeps torch.nn containers such as nn.TransformerEncoder whole (one call). Under a
    size budget their inner Linear layers are the allocator's too (plain rounding, no moments):
    before, they were charged 32 bits/w while the allocator chose, then rounded at 8 bits, so
    target_bits=4.0 was a ConfigError claiming 31.6 bits/w was the smallest reachable."""
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(x).mean(1))

    net = Encoder().eval()
    x = torch.randn(2, 7, 32)
    for target in (3.0, 4.0):
        q = dfmpc_fx.compress(net, target_bits=target, example_inputs=x)
        rep = get_report(q)
        inner = [r for r in rep.layers if r.name.startswith("enc.")]
        assert len(inner) == 6 and all(r.bits is not None and r.bits <= 6 for r in inner)
        assert all("width chosen by the size budget" in r.reason for r in inner)
        assert rep.bits_per_weight <= target + 1e-9
        # the attention's in_proj_weight is no conv/linear layer: it stays float, and the report says so
        assert any("MultiheadAttention, 3,072 weights" in w for w in rep.warnings), rep.warnings
    with torch.no_grad():
        assert rel(q(x), net(x)) < 0.5
    # without a budget they keep plain rounding at default_bits
    q = dfmpc_fx.compress(net, low_bits=4, high_bits=6, default_bits=5)
    assert {r.bits for r in get_report(q).layers if r.name.startswith("enc.")} == {5}


def test_noise_gains_do_not_double_at_residual_adds_without_moments() -> None:
    """After a leaf module no moments are known, so a residual add cannot weigh its branches by
    variance. It now splits its gain in two (the shares sum to one, as with known variances).
    Before, it gave both branches its full gain, which doubled the gain at every block: the stem
    of a 12-block stack got 4096x the head's, and the layers inside the leaves got 1."""
    from dfmpc_fx.graph.moments import estimate_moments
    from dfmpc_fx.graph.sensitivity import output_noise_gains
    from dfmpc_fx.graph.tracing import trace_model

    class Opaque(nn.Module):  # declared a leaf: its output has no moments
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.fc(x))

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(16, 16)
            self.blocks = nn.ModuleList(Opaque() for _ in range(12))
            self.mlps = nn.ModuleList(nn.Linear(16, 16) for _ in range(12))
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            for block, mlp in zip(self.blocks, self.mlps):
                x = x + block(x)
                x = x + mlp(x)
            return self.head(x)

    net = Stack().eval()
    gm = trace_model(net, None, [Opaque])
    gains = output_noise_gains(gm, estimate_moments(gm).moments)
    assert gains["stem"] == pytest.approx(gains["head"])
    assert gains["blocks.0"] > 0 and gains["mlps.11"] == pytest.approx(gains["head"] / 2)
    # under a budget, the layers inside the leaves take their leaf's gain
    q = dfmpc_fx.compress(net, target_bits=4.0, leaf_modules=[Opaque])
    rows = {r.name: r for r in get_report(q).layers}
    assert rows["blocks.3.fc"].noise_gain == pytest.approx(gains["blocks.3"])
    assert "width chosen by the size budget" in rows["blocks.3.fc"].reason
