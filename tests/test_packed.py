"""Packed modules, pack_model, the packed TorchScript artifact, and save/load."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import dfmpc_fx
from dfmpc_fx.artifacts.packed import PACKED_MODULES, PackError, packed_nbytes, pack_model, unpack_model
from dfmpc_fx.transform.modules import QUANT_MODULES

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.script deprecation
warnings.filterwarnings("ignore", category=dfmpc_fx.NoCompensablePairWarning)


def _randomize_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


class Net2d(nn.Module):
    """Every conv flavour the packed modules must reproduce."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4)
        self.c4 = nn.Conv2d(12, 12, 3, padding=1, padding_mode="reflect")
        self.c5 = nn.Conv2d(12, 16, 3, padding="same", padding_mode="circular", bias=False)
        self.c6 = nn.Conv2d(16, 16, 2, stride=2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10, bias=False)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.c3(x))
        x = torch.relu(self.c4(x))
        x = torch.relu(self.c5(x))
        x = self.c6(x)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.b1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 5, padding=2, groups=2, padding_mode="replicate")
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(x.flatten(1))


CONFIGS = {
    "default": dfmpc_fx.DFMPCConfig(),
    "3-5-7 bits": dfmpc_fx.DFMPCConfig(low_bits=3, high_bits=7, default_bits=5, first_last_bits=8),
    "4/8 per-tensor": dfmpc_fx.DFMPCConfig(low_bits=4, high_bits=8, granularity="per_tensor"),
    "asymmetric": dfmpc_fx.DFMPCConfig(scheme="asymmetric"),
    "paper (ternary + dorefa)": dfmpc_fx.DFMPCConfig(method="paper"),
    "16 bits": dfmpc_fx.DFMPCConfig(low_bits=16, high_bits=16, default_bits=16, first_last_bits=16, max_bits=16),
    "12/15 bits": dfmpc_fx.DFMPCConfig(low_bits=9, high_bits=15, default_bits=12, first_last_bits=11, max_bits=16),
}


def _model_and_input(kind: str):
    torch.manual_seed(0)
    if kind == "2d":
        return _randomize_bn(Net2d()).eval(), torch.randn(2, 3, 8, 8)
    return _randomize_bn(Net1d()).eval(), torch.randn(2, 4, 16)


@pytest.mark.parametrize("kind", ["2d", "1d"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_pack_model_is_exact(kind, cfg_name):
    model, x = _model_and_input(kind)
    qmodel = dfmpc_fx.compress(model, CONFIGS[cfg_name])
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    packed = pack_model(qmodel)
    # qmodel untouched, every Quant* replaced, nothing else changed
    assert all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items())
    assert not any(type(m) in QUANT_MODULES.values() for m in packed.modules())
    q_layers = {n: m for n, m in qmodel.named_modules() if type(m) in QUANT_MODULES.values()}
    p_layers = dict(packed.named_modules())
    for name, q in q_layers.items():
        p = p_layers[name]
        assert type(p) is PACKED_MODULES[type(q)]
        assert p.packed.dtype == torch.uint8
        assert p.packed.numel() == packed_nbytes(q.weight.numel(), q.w_bits)
        assert (p.w_bits, p.role, p.scheme) == (q.w_bits, q.role, q.scheme)
        assert torch.equal(p.dequantize_weight(), q.weight)
        assert torch.equal(p.weight, q.weight)
    with torch.no_grad():
        assert torch.equal(packed(x), qmodel(x))
    assert dfmpc_fx.get_report(packed).to_dict() == dfmpc_fx.get_report(qmodel).to_dict()
    # and back, exactly
    back = unpack_model(packed)
    sd_q, sd_b = qmodel.state_dict(), back.state_dict()
    assert sd_q.keys() == sd_b.keys()
    for k in sd_q:
        assert sd_q[k].dtype == sd_b[k].dtype and sd_q[k].shape == sd_b[k].shape and torch.equal(sd_q[k], sd_b[k]), k
    for name, q in q_layers.items():
        b = back.get_submodule(name)
        assert type(b) is type(q) and (b.w_bits, b.role, b.scheme) == (q.w_bits, q.role, q.scheme)


def test_pack_codes_match_quantizer_codes():
    """The stored codes are the quantizer's integer codes (offset to unsigned)."""
    model, _ = _model_and_input("2d")
    qmodel = dfmpc_fx.compress(model)
    packed = pack_model(qmodel)
    layer = packed.get_submodule("c3")
    q = qmodel.get_submodule("c3")
    codes = layer.unsigned_codes()
    assert codes.min() >= 0 and codes.max() < 2**layer.w_bits
    shape = (-1,) + (1,) * (q.weight.dim() - 1)
    signed = torch.round(q.weight / q.weight_scale.view(shape) + q.weight_zero_point.view(shape))
    assert torch.equal(codes, (signed + 2 ** (layer.w_bits - 1) - 1).to(torch.int64))


def test_pack_refuses_off_grid_weight():
    model, _ = _model_and_input("2d")
    qmodel = dfmpc_fx.compress(model)
    with torch.no_grad():
        qmodel.get_submodule("c3").weight.add_(1e-3)
    with pytest.raises(PackError, match="c3.*not on its .*quantization grid"):
        pack_model(qmodel)


def test_pack_model_without_quant_layers_is_a_copy():
    model = nn.Sequential(nn.Linear(3, 3))
    out = pack_model(model)
    assert out is not model and torch.equal(out[0].weight, model[0].weight)


@pytest.fixture(scope="module")
def resnet18_q():
    torchvision = pytest.importorskip("torchvision")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    return dfmpc_fx.compress(model)


def test_packed_torchscript_small_and_loads_without_dfmpc_fx(tmp_path, resnet18_q):
    x = torch.randn(2, 3, 32, 32)
    path = dfmpc_fx.export_torchscript(resnet18_q, tmp_path / "r18.ts", x, packed=True)
    report = dfmpc_fx.get_report(resnet18_q)
    size = path.stat().st_size
    assert report.artifact_bytes == size
    assert report.theoretical_bytes < size <= 1.25 * report.theoretical_bytes
    assert size < 0.2 * report.float_bytes
    with torch.no_grad():
        expected = resnet18_q(x)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["dfmpc_fx"] = None  # importing dfmpc_fx now fails: the file must not need it
        import torch
        m = torch.jit.load({str(path)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            y = m(io["x"])
        assert torch.equal(y, io["y"]), float((y - io["y"]).abs().max())
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_packed_torchscript_keeps_batch_dynamic(tmp_path):
    model, x = _model_and_input("2d")
    qmodel = dfmpc_fx.compress(model)
    path = dfmpc_fx.export_torchscript(qmodel, tmp_path / "m.ts", x, packed=True)
    loaded = torch.jit.load(str(path))
    x5 = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x5), qmodel(x5))


def test_save_load_round_trip(tmp_path, resnet18_q):
    x = torch.randn(1, 3, 32, 32)
    path = dfmpc_fx.save(resnet18_q, tmp_path / "r18.dfmpc")
    report = dfmpc_fx.get_report(resnet18_q)
    assert path.stat().st_size <= 1.25 * report.theoretical_bytes
    loaded = dfmpc_fx.load(path)
    sd_a, sd_b = resnet18_q.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) and sd_a[k].dtype == sd_b[k].dtype for k in sd_a)
    assert isinstance(loaded, torch.fx.GraphModule)
    assert {n: type(m) for n, m in resnet18_q.named_modules() if n} == {n: type(m) for n, m in loaded.named_modules() if n}
    assert dfmpc_fx.get_report(loaded).to_dict() == report.to_dict()
    assert loaded.training == resnet18_q.training
    with torch.no_grad():
        assert torch.equal(loaded(x), resnet18_q(x))
    # the packed form on request, and a saved packed model comes back packed
    as_packed = dfmpc_fx.load(path, packed=True)
    assert any(type(m) in PACKED_MODULES.values() for m in as_packed.modules())
    with torch.no_grad():
        assert torch.equal(as_packed(x), resnet18_q(x))
    path2 = dfmpc_fx.save(as_packed, tmp_path / "packed.dfmpc")
    again = dfmpc_fx.load(path2)
    assert any(type(m) in PACKED_MODULES.values() for m in again.modules())
    assert dfmpc_fx.get_report(again).to_dict() == report.to_dict()
    # same model, same bytes (whatever the file name)
    path3 = dfmpc_fx.save(resnet18_q, tmp_path / "other_name.bin")
    assert path3.read_bytes() == path.read_bytes()


def test_saved_file_loads_with_mmap(tmp_path):
    model, x = _model_and_input("2d")
    qmodel = dfmpc_fx.compress(model)
    path = dfmpc_fx.save(qmodel, tmp_path / "m.dfmpc")
    payload = torch.load(str(path), mmap=True, weights_only=False)
    with torch.no_grad():
        assert torch.equal(payload["model"](x), qmodel(x))


def test_load_refuses_foreign_files(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(dfmpc_fx.SerializationError, match="not a dfmpc_fx saved model"):
        dfmpc_fx.load(tmp_path / "x.pt")
    (tmp_path / "junk").write_bytes(b"not a zip")
    with pytest.raises(dfmpc_fx.SerializationError, match="could not be read"):
        dfmpc_fx.load(tmp_path / "junk")
    with pytest.raises(FileNotFoundError):
        dfmpc_fx.load(tmp_path / "missing")


def test_save_refuses_off_grid_model(tmp_path):
    model, _ = _model_and_input("2d")
    qmodel = dfmpc_fx.compress(model)
    with torch.no_grad():
        qmodel.get_submodule("fc1").weight.mul_(1.001)
    with pytest.raises(dfmpc_fx.SerializationError, match="fc1"):
        dfmpc_fx.save(qmodel, tmp_path / "m.dfmpc")


def test_float64_model_packs_exactly():
    model, x = _model_and_input("2d")
    model = model.double()
    for scale_dtype, stored in (("float32", torch.float64), ("auto", torch.float16)):
        # "float32" keeps the weight's own dtype; under the default budget scales are float16
        qmodel = dfmpc_fx.compress(model, scale_dtype=scale_dtype)
        packed = pack_model(qmodel)
        assert packed.get_submodule("c3").weight_scale.dtype == stored
        assert packed.get_submodule("c3").dequantize_weight().dtype == torch.float64
        with torch.no_grad():
            assert torch.equal(packed(x.double()), qmodel(x.double()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_model_on_cuda():
    model, x = _model_and_input("2d")
    qmodel = dfmpc_fx.compress(model)
    packed = pack_model(qmodel).cuda()
    with torch.no_grad():
        assert torch.equal(packed(x.cuda()).cpu(), qmodel.cuda()(x.cuda()).cpu())
    assert torch.equal(pack_model(qmodel.cuda()).get_submodule("c3").packed.cpu(), packed.get_submodule("c3").packed.cpu())
