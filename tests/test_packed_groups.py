"""Grouped scales through Quant* modules, packing, save/load and the three export formats."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dfmpc_fx
from dfmpc_fx.artifacts.packed import PACKED_MODULES, pack_model, unpack_model
from dfmpc_fx.numerics.quant import quantize_uniform, scale_overhead_bits
from dfmpc_fx.transform.modules import QUANT_MODULES, quantized_layer_bytes, to_quant_module

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=dfmpc_fx.NoCompensablePairWarning)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)   # K = 27: groups 16 + 11
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)               # K = 144
        self.c3 = nn.Conv2d(32, 32, 3, padding=1, groups=4)     # K = 72
        self.c4 = nn.Conv1d(32, 8, 1)                           # K = 32
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 4, 10)                          # K = 32

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = self.pool(torch.relu(self.c3(x)))
        x = self.c4(torch.flatten(x, 2))
        return self.fc(torch.flatten(x, 1))


def _grouped_model():
    torch.manual_seed(0)
    gm = dfmpc_fx.compress(Net().eval(), low_bits=3)
    specs = {"c1": (16, True, 3), "c2": (64, False, 2), "c3": (32, True, 4), "c4": (5, False, 3), "fc": (32, True, 2)}
    for name, mod in list(gm.named_modules()):
        if type(mod) in QUANT_MODULES.values() and name in specs:
            gs, sym, bits = specs[name]
            qw = quantize_uniform(mod.weight.detach(), bits, symmetric=sym, group_size=gs)
            setattr(gm, name, to_quant_module(mod, qw.dequantize(), mod.bias, qw, mod.role))
    return gm, torch.randn(2, 3, 8, 8)


@pytest.fixture(scope="module")
def model_and_input():
    return _grouped_model()


def test_quant_modules_carry_groups(model_and_input):
    gm, _ = model_and_input
    assert gm.c1.group_size == 16 and gm.c1.weight_scale.shape == (16, 2)
    assert gm.c2.weight_zero_point.shape == (32, 3)
    assert "group_size=16" in repr(gm.c1)
    for name in ("c1", "c2", "c3", "c4", "fc"):
        m = getattr(gm, name)
        assert quantized_layer_bytes(m) * 8 >= scale_overhead_bits(m.weight.numel(), m.weight.shape[0], m.group_size,
                                                                   m.scheme)
        assert quantized_layer_bytes(m) == -(-m.w_bits * m.weight.numel() // 8) + scale_overhead_bits(
            m.weight.numel(), m.weight.shape[0], m.group_size, m.scheme) // 8


def test_pack_is_bit_exact_and_round_trips(model_and_input):
    gm, x = model_and_input
    packed = pack_model(gm)
    assert all(type(getattr(packed, n)) in PACKED_MODULES.values() for n in ("c1", "c2", "c3", "c4", "fc"))
    assert packed.c1.weight_zero_point.numel() == 1  # symmetric: one stored zero point
    assert packed.c2.weight_zero_point.shape == (32, 3)
    for name in ("c1", "c2", "c3", "c4", "fc"):
        assert torch.equal(getattr(packed, name).dequantize_weight(), getattr(gm, name).weight)
        assert quantized_layer_bytes(getattr(packed, name)) == quantized_layer_bytes(getattr(gm, name))
    with torch.no_grad():
        assert torch.equal(packed(x), gm(x))
    back = unpack_model(packed)
    for name in ("c1", "c2", "c3", "c4", "fc"):
        a, b = getattr(back, name), getattr(gm, name)
        assert a.group_size == b.group_size
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_scale, b.weight_scale)
        assert torch.equal(a.weight_zero_point, b.weight_zero_point)


def test_save_load(tmp_path, model_and_input):
    gm, x = model_and_input
    path = dfmpc_fx.save(gm, tmp_path / "m.pt")
    with torch.no_grad():
        for packed in (True, False):
            assert torch.equal(dfmpc_fx.load(path, packed=packed)(x), gm(x))


def test_torchscript(tmp_path, model_and_input):
    gm, x = model_and_input
    path = dfmpc_fx.export_torchscript(gm, tmp_path / "m.ts", x, packed=True)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_export_program(tmp_path, model_and_input):
    gm, x = model_and_input
    ep = dfmpc_fx.export_program(gm, x, packed=True, path=tmp_path / "m.pt2", dynamic_batch=True)
    loaded = torch.export.load(str(tmp_path / "m.pt2"))
    with torch.no_grad():
        for inp in (x, torch.randn(3, 3, 8, 8)):
            assert float((loaded.module()(inp) - gm(inp)).abs().max()) < 1e-5
            assert float((ep.module()(inp) - gm(inp)).abs().max()) < 1e-5


def test_export_onnx(tmp_path, model_and_input):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    gm, x = model_and_input
    path = dfmpc_fx.export_onnx(gm, tmp_path / "m.onnx", x, packed=True, dynamic_batch=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for inp in (x, torch.randn(3, 3, 8, 8)):
        (got,) = sess.run(None, {sess.get_inputs()[0].name: inp.numpy()})
        with torch.no_grad():
            assert float((torch.from_numpy(got) - gm(inp)).abs().max()) < 1e-4
