"""float16 scales and zero points (``DFMPCConfig.scale_dtype``): counted at 16 bits by the budget
and the report, stored as float16 buffers, bit exact through packing, save/load and export."""
from __future__ import annotations

import json

import warnings

import pytest
import torch
from torch import nn

import dfmpc_fx
from dfmpc_fx.artifacts.packed import PACKED_MODULES, unpack_model
from dfmpc_fx.numerics.quant import quantize_uniform, scale_overhead_bits
from dfmpc_fx.transform.modules import is_quant_module, quantized_layer_bits

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=dfmpc_fx.NoCompensablePairWarning)


class DepthwiseNet(nn.Module):
    """Depthwise 3x3 filters (9 weights a channel): where a 32-bit scale costs 3.6 bits/w."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.pw = nn.Conv2d(32, 64, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        x = torch.relu(self.bn2(self.pw(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = DepthwiseNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (model.bn0, model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _quant_layers(q):
    return [(n, m) for n, m in q.named_modules() if is_quant_module(m)]


def test_config_resolves_and_validates():
    assert dfmpc_fx.DFMPCConfig().scale_bits == 16  # the default is a size budget
    assert dfmpc_fx.DFMPCConfig(target_bits=None).scale_bits == 32
    assert dfmpc_fx.DFMPCConfig(target_bits=3.0).scale_bits == 16
    assert dfmpc_fx.DFMPCConfig(target_bits=3.0, scale_dtype="float32").scale_bits == 32
    assert dfmpc_fx.DFMPCConfig(scale_dtype="float16").scale_bits == 16
    with pytest.raises(dfmpc_fx.ConfigError, match="scale_dtype"):
        dfmpc_fx.DFMPCConfig(scale_dtype="bfloat16")
    assert dfmpc_fx.DFMPCConfig.from_dict(dfmpc_fx.DFMPCConfig(scale_dtype="float16").to_dict()).scale_bits == 16


def test_scale_overhead_bits_width():
    assert scale_overhead_bits(32 * 9, 32, None, "symmetric", 16) == 32 * 16
    assert scale_overhead_bits(32 * 9, 32, None, "asymmetric", 16) == 32 * 32
    with pytest.raises(ValueError, match="16 or 32"):
        scale_overhead_bits(9, 1, None, "symmetric", 8)


def test_budget_stores_float16_and_counts_16_bits(net):
    q = dfmpc_fx.compress(net, target_bits=3.0)
    rep = dfmpc_fx.get_report(q)
    layers = _quant_layers(q)
    assert {n for n, _ in layers} == {"stem", "dw", "pw", "fc"}
    total_bits, total_w = 0, 0
    for _, m in layers:
        assert m.weight_scale.dtype == torch.float16 and m.weight.dtype == torch.float32
        n_scales = m.weight_scale.numel() + (m.weight_zero_point.numel() if m.scheme == "asymmetric" else 0)
        assert quantized_layer_bits(m) == m.w_bits * m.weight.numel() + 16 * n_scales
        total_bits += quantized_layer_bits(m)
        total_w += m.weight.numel()
    assert rep.bits_per_weight == pytest.approx(total_bits / total_w)
    assert rep.bits_per_weight <= 3.0 + 1e-9
    # the fake-quant weight is exactly codes x the stored float16 scale
    for _, m in layers:
        s = m.weight_scale.to(torch.float32).reshape(-1, *([1] * (m.weight.dim() - 1)))
        codes = m.weight / s
        assert torch.equal(codes, torch.round(codes))


def test_float16_buys_bits_on_depthwise(net):
    """Under the same budget, the halved scale cost goes into weight bits (per-channel scales
    kept in the layers: fold_scales=False, else the BatchNorms hold them at no cost)."""
    q16 = dfmpc_fx.compress(net, target_bits=3.5, fold_scales=False)
    q32 = dfmpc_fx.compress(net, target_bits=3.5, scale_dtype="float32", fold_scales=False)
    weight_bits = [sum(m.w_bits * m.weight.numel() for _, m in _quant_layers(q)) for q in (q16, q32)]
    assert weight_bits[0] > weight_bits[1]
    # the smallest reachable budget drops too (3.15 with float32 scales here, 2.575 with float16)
    with pytest.raises(dfmpc_fx.ConfigError, match="smallest"):
        dfmpc_fx.compress(net, target_bits=2.8, scale_dtype="float32", fold_scales=False)
    assert dfmpc_fx.get_report(dfmpc_fx.compress(net, target_bits=2.8, fold_scales=False)).bits_per_weight <= 2.8 + 1e-9


def test_layouts_without_budget_keep_float32(net):
    q = dfmpc_fx.compress(net, target_bits=None)  # the paper's MP2/6 layout
    assert all(m.weight_scale.dtype == torch.float32 for _, m in _quant_layers(q))
    q16 = dfmpc_fx.compress(net, target_bits=None, scale_dtype="float16")
    assert all(m.weight_scale.dtype == torch.float16 for _, m in _quant_layers(q16))
    assert dfmpc_fx.get_report(q16).compressed_bytes < dfmpc_fx.get_report(q).compressed_bytes


def test_grouped_asymmetric_float16_zero_points_exact():
    w = torch.randn(8, 64)
    qw = quantize_uniform(w, 3, symmetric=False, group_size=16).with_scale_dtype(torch.float16)
    assert qw.zero_point.dtype == torch.float16
    assert torch.equal(qw.zero_point, torch.round(qw.zero_point))
    deq = qw.dequantize()
    assert deq.dtype == torch.float32 and float((deq - w).norm() / w.norm()) < 0.35


def test_packed_save_and_exports_bit_exact(tmp_path, net, artifacts_reproduce):
    q = dfmpc_fx.compress(net, target_bits=5.0, candidate_bits=(2, 3), group_sizes=(16,), scheme="asymmetric")
    assert any(m.group_size == 16 for _, m in _quant_layers(q))
    packed = artifacts_reproduce(q, torch.randn(2, 3, 8, 8), tmp_path, onnx=False)  # ONNX: the test below
    for name, m in _quant_layers(q):
        p = packed.get_submodule(name)
        assert type(p) in PACKED_MODULES.values()
        assert p.weight_scale.dtype == torch.float16
        assert torch.equal(p.dequantize_weight(), m.weight)
        assert quantized_layer_bits(p) == quantized_layer_bits(m)
    assert all(m.weight_scale.dtype == torch.float16 for _, m in _quant_layers(unpack_model(packed)))


def test_onnx_float16_scales(tmp_path, net):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    q = dfmpc_fx.compress(net, target_bits=3.0)
    x = torch.randn(2, 3, 8, 8)
    path = dfmpc_fx.export_onnx(q, tmp_path / "m.onnx", x, packed=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert float((torch.from_numpy(got) - q(x)).abs().max()) < 1e-4


def test_default_is_a_budget_and_naming_a_layout_selects_it():
    C = dfmpc_fx.DFMPCConfig
    assert C().target_bits == 4.0 and C().budget_is_default
    assert C(compensate=False).target_bits == 4.0
    for layout in (dict(low_bits=2), dict(high_bits=6), dict(default_bits=8), dict(first_last_bits=None),
                   dict(method="paper"), dict(target_bits=None)):
        assert C(**layout).target_bits is None, layout
    assert C(target_bytes=1000).target_bits is None and C(target_bytes=1000).has_budget
    assert C(target_bits=3.0).target_bits == 3.0 and not C(target_bits=3.0).budget_is_default
    # The "not given" marker stays on the config (so replace/pickle-derived configs keep it) but
    # never leaves it: to_dict (reports, checkpoints, MLflow params) and JSON see plain ints.
    assert C().low_bits == 2 and type(C().low_bits + 0) is int
    assert all(type(C().to_dict()[f]) is int for f in ("low_bits", "high_bits", "default_bits", "first_last_bits"))
    assert json.loads(json.dumps(C().to_dict()))["high_bits"] == 6
    assert C.from_dict(C().to_dict()) == C()


def test_compress_overrides_on_a_default_config_select_the_layout(net):
    q = dfmpc_fx.compress(net, dfmpc_fx.DFMPCConfig(), low_bits=3)
    rep = dfmpc_fx.get_report(q)
    assert rep.target_bits is None and rep.num_pairs >= 1
    with pytest.raises(dfmpc_fx.ConfigError, match="target_bits=None"):
        dfmpc_fx.compress(net, dfmpc_fx.DFMPCConfig(target_bits=3.0), low_bits=3)


def test_default_budget_out_of_reach_warns_and_takes_the_smallest():
    tiny = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).eval()  # 16-bit scales on 2-3 weights a row
    with pytest.warns(dfmpc_fx.DefaultBudgetWarning, match="default budget"):
        q = dfmpc_fx.compress(tiny)
    rep = dfmpc_fx.get_report(q)
    assert all(l.bits == 2 for l in rep.layers) and any("default budget" in w for w in rep.warnings)
    with pytest.raises(dfmpc_fx.ConfigError, match="smallest"):
        dfmpc_fx.compress(tiny, target_bits=4.0)  # an explicit budget out of reach stays an error
