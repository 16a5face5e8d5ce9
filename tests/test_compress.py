"""compress: function preservation, immutability of the input, bad input, report, export."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfmpc_fx
from dfmpc_fx import ConfigError, DFMPCConfig, InvalidModelError, TraceError

HIGH = dict(low_bits=16, high_bits=16, default_bits=16, first_last_bits=16, max_bits=16)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random, non-trivial BatchNorm statistics (random-weight models have mean 0, var 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 16, 1, bias=False)
        self.fc1 = nn.Linear(16 * 7 * 7, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = F.relu(self.conv4(x))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


@pytest.fixture
def small_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(SmallNet().eval())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method, tol", [("dfmpc", 1e-4), ("paper", 5e-3)])
@torch.no_grad()
def test_sixteen_bits_preserve_the_function(small_net: nn.Module, method: str, tol: float) -> None:
    """At 16 bits compensation and correction must not change the function. The paper's DoReFa
    quantizer bends weights through tanh (|w| ~ 0.1 -> 0.3% relative), hence its looser bound."""
    x = torch.randn(8, 1, 28, 28)
    q = dfmpc_fx.compress(small_net, DFMPCConfig(method=method, **HIGH))
    ref = small_net(x)
    rel = float((q(x) - ref).norm() / ref.norm())
    assert rel < tol, rel


class ScaledNet(SmallNet):
    """SmallNet plus graph-level tensors (get_attr nodes) and a layer kept in float."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.register_buffer("offset", torch.randn(1, 8, 1, 1) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)) * self.scale + self.offset)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = F.relu(self.conv4(x))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("net_type", [SmallNet, ScaledNet])
def test_input_model_is_bit_identical_after_compress(net_type: type, mode: str) -> None:
    """Train-mode models are deep-copied before tracing; eval-mode ones are traced as they are
    and copied leaf by leaf: neither may touch or share anything of the input."""
    torch.manual_seed(0)
    net = randomize_batchnorm(net_type()).train(mode == "train")  # train-mode BN must not be updated or used
    before = _state(net)
    q = dfmpc_fx.compress(net, DFMPCConfig(skip_layers=("fc1",)))
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert net.training == (mode == "train") and not q.training
    assert all(type(m).__name__.startswith(("Conv", "Linear", "BatchNorm", net_type.__name__)) for m in net.modules())
    # nothing shared: no module object, no tensor storage
    assert not {id(m) for m in net.modules()} & {id(m) for m in q.modules()}
    storages = {t.untyped_storage().data_ptr() for t in list(net.parameters()) + list(net.buffers())}
    assert not storages & {t.untyped_storage().data_ptr() for t in list(q.parameters()) + list(q.buffers())}
    # the compressed model owns its tensors: changing them does not touch the input model
    for t in list(q.parameters()) + [b for b in q.buffers() if b.is_floating_point()]:
        t.data.add_(1.0)
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k


@pytest.mark.parametrize("net_type", [SmallNet, ScaledNet])
def test_eval_and_train_mode_inputs_give_the_same_model(net_type: type) -> None:
    """The eval-mode fast path (trace the input, copy leaves) and the deep-copy path agree."""
    torch.manual_seed(0)
    net = randomize_batchnorm(net_type())
    q_eval = dfmpc_fx.compress(net.eval(), DFMPCConfig(low_bits=2, high_bits=6))
    q_train = dfmpc_fx.compress(net.train(), DFMPCConfig(low_bits=2, high_bits=6))
    assert q_eval.code == q_train.code
    s_eval, s_train = q_eval.state_dict(), q_train.state_dict()
    assert s_eval.keys() == s_train.keys()
    for k in s_eval:
        assert torch.equal(s_eval[k], s_train[k]), k
    assert [type(m).__name__ for m in q_eval.modules()] == [type(m).__name__ for m in q_train.modules()]


def test_train_mode_batchnorm_uses_running_statistics(small_net: nn.Module) -> None:
    x = torch.randn(4, 1, 28, 28)
    q_eval = dfmpc_fx.compress(small_net.eval())
    q_train = dfmpc_fx.compress(small_net.train())
    assert torch.equal(q_eval(x), q_train(x))


def test_graph_and_modules_show_the_quantization(small_net: nn.Module) -> None:
    q = dfmpc_fx.compress(small_net, DFMPCConfig(low_bits=2, high_bits=6))
    assert isinstance(q, torch.fx.GraphModule)
    conv2 = q.get_submodule("conv2")
    assert isinstance(conv2, dfmpc_fx.QuantConv2d) and conv2.w_bits == 2 and conv2.role == "low"
    assert "w_bits=2" in str(q)
    # 2-bit symmetric per-channel: at most 3 distinct values per output channel
    for row in conv2.weight.detach().reshape(conv2.out_channels, -1):
        assert row.unique().numel() <= 3
    report = dfmpc_fx.get_report(q)
    roles = {l.name: (l.role, l.bits) for l in report.layers}
    assert roles["conv1"] == ("first_last", 8) and roles["fc2"] == ("first_last", 8)
    assert roles["conv2"] == ("low", 2) and roles["conv3"] == ("high", 6)
    low = next(l for l in report.layers if l.name == "conv2")
    assert low.coeff_mean is not None and low.partner == "conv3" and low.weight_rel_error > 0
    assert report.compressed_bytes < report.float_bytes / 3
    assert report.num_pairs >= 2
    md = report.to_markdown()
    assert "| conv2 | Conv2d | low | 2 |" in md
    assert dfmpc_fx.get_report(__import__("copy").deepcopy(q)).to_dict() == report.to_dict()


def test_compensate_false_keeps_the_bit_assignment(small_net: nn.Module) -> None:
    comp = dfmpc_fx.get_report(dfmpc_fx.compress(small_net, DFMPCConfig()))
    plain = dfmpc_fx.get_report(dfmpc_fx.compress(small_net, DFMPCConfig(compensate=False)))
    assert comp.bits_per_layer() == plain.bits_per_layer()
    assert plain.num_pairs == 0 and all(l.coeff_mean is None for l in plain.layers)


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Make BatchNorm statistics describe ``x`` (what training leaves behind)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for chunk in x.split(128):
            model(chunk)
    return model.eval()


def test_mean_correction_repairs_channel_means(small_net: nn.Module) -> None:
    """The data-free correction must bring the quantized network's BN-output means back."""
    torch.manual_seed(1)
    x = torch.randn(512, 1, 28, 28)
    calibrate_batchnorm(small_net, x)
    feats: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(_m, _i, out):
            feats[name] = out.mean(dim=(0, 2, 3))
        return hook

    means = {}
    for tag, cfg in (("float", None), ("plain", DFMPCConfig(compensate=False)), ("dfmpc", DFMPCConfig())):
        m = small_net if cfg is None else dfmpc_fx.compress(small_net, cfg)
        h = m.get_submodule("bn2").register_forward_hook(grab(tag))
        with torch.no_grad():
            m(x)
        h.remove()
        means[tag] = feats[tag]
    plain_err = (means["plain"] - means["float"]).abs().mean()
    ours_err = (means["dfmpc"] - means["float"]).abs().mean()
    assert ours_err < 0.5 * plain_err, (float(ours_err), float(plain_err))


# --- bad input ------------------------------------------------------------------------------

class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor, flag: bool = True) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return self.conv(-x)


def test_untraceable_model_names_the_code_and_remedies() -> None:
    with pytest.raises(TraceError) as info:
        dfmpc_fx.compress(Untraceable())
    msg = str(info.value)
    assert "test_compress.py" in msg and "x.sum() > 0" in msg
    assert "concrete_args" in msg and "leaf_modules" in msg


def test_leaf_modules_and_concrete_args_rescue_tracing() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Untraceable()
            self.conv_a, self.conv_b = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
            y = self.conv_b(F.relu(self.conv_a(x)))
            if double:
                y = y * 2
            return y + self.inner(x)

    m = Wrapper().eval()
    q = dfmpc_fx.compress(m, leaf_modules=[Untraceable], concrete_args={"double": False})
    x = torch.randn(2, 1, 8, 8)
    assert q(x).shape == m(x).shape
    search = dfmpc_fx.find_compensable_pairs(m, leaf_modules=["inner"], concrete_args={"double": False})
    assert [(p.first, p.second) for p in search.pairs] == [("conv_a", "conv_b")]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(low_bits=1), "low_bits=1 is out of range"),
        (dict(low_bits=5), "low_bits=5 is out of range"),
        (dict(high_bits=9), "high_bits=9 is out of range"),
        (dict(low_bits=4, high_bits=6, max_bits=16, default_bits=3, first_last_bits=None), None),
        (dict(low_bits=8, high_bits=6, max_bits=16), "swap them"),
        (dict(method="magic"), "unknown method 'magic'"),
        (dict(default_bits=1), "default_bits=1"),
        (dict(low_bits=2.5), "must be an int"),
        (dict(lambda1=-1.0), "lambda1"),
        (dict(granularity="per_row"), "granularity"),
        (dict(scale_rule="guess"), "scale_rule"),
        (dict(max_bits=32), "max_bits"),
    ],
)
def test_invalid_configs_fail_at_construction(kwargs: dict, match: str | None) -> None:
    if match is None:
        DFMPCConfig(**kwargs)
        return
    with pytest.raises(ConfigError, match=match):
        DFMPCConfig(**kwargs)


def test_compress_rejects_bad_arguments(small_net: nn.Module) -> None:
    with pytest.raises(ConfigError, match="valid fields"):
        dfmpc_fx.compress(small_net, not_a_field=3)
    with pytest.raises(ConfigError):
        dfmpc_fx.compress(small_net, {"low_bits": 2})
    with pytest.raises(ConfigError):
        dfmpc_fx.compress(small_net, low_bits=7)
    with pytest.raises(TypeError):
        dfmpc_fx.compress("resnet18")
    with pytest.raises(ConfigError, match="skip_layers"):
        dfmpc_fx.compress(small_net, skip_layers=("nope",))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused(small_net: nn.Module, bad: float) -> None:
    with torch.no_grad():
        small_net.conv2.weight[0, 0, 0, 0] = bad
    with pytest.raises(InvalidModelError, match="conv2.weight"):
        dfmpc_fx.compress(small_net)


def test_model_without_layers_is_refused() -> None:
    with pytest.raises(InvalidModelError, match="no Conv1d/Conv2d/Linear"):
        dfmpc_fx.compress(nn.Sequential(nn.ReLU()))


def test_no_compensable_pair_warns_and_still_quantizes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.GELU(), nn.Conv2d(8, 4, 1)).eval()
    with pytest.warns(dfmpc_fx.NoCompensablePairWarning, match="no compensable pair"):
        q = dfmpc_fx.compress(model, first_last_bits=None, default_bits=4)
    report = dfmpc_fx.get_report(q)
    assert report.num_pairs == 0 and {l.bits for l in report.layers} == {4}
    assert report.warnings
    x = torch.randn(1, 3, 8, 8)
    assert not torch.equal(q(x), model(x))


def test_skip_layers_stay_float(small_net: nn.Module) -> None:
    q = dfmpc_fx.compress(small_net, skip_layers=("conv4",))
    assert type(q.get_submodule("conv4")) is nn.Conv2d
    assert torch.equal(q.get_submodule("conv4").weight, small_net.conv4.weight)


def test_get_report_on_a_plain_model_says_what_to_do(small_net: nn.Module) -> None:
    with pytest.raises(dfmpc_fx.DFMPCError, match="dfmpc_fx.compress"):
        dfmpc_fx.get_report(small_net)


def test_swap_compressed_modules_into_the_original_tree(small_net: nn.Module) -> None:
    import copy

    target = copy.deepcopy(small_net)
    q = dfmpc_fx.compress(small_net)
    swapped = dfmpc_fx.swap_compressed_modules(target, q)
    assert "conv2" in swapped and "bn2" in swapped
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(target(x), q(x))
    assert type(target).forward is SmallNet.forward


# --- export -----------------------------------------------------------------------------------

def test_torchscript_loads_without_dfmpc_fx(small_net: nn.Module, tmp_path: Path) -> None:
    q = dfmpc_fx.compress(small_net, DFMPCConfig(low_bits=2, high_bits=6))
    x = torch.randn(5, 1, 28, 28)
    path = dfmpc_fx.export_torchscript(q, tmp_path / "model.ts", example_inputs=(x,))
    torch.save({"x": x, "y": q(x).detach()}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(path)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "d = (m(io['x']) - io['y']).abs().max().item()\n"
        "assert 'dfmpc_fx' not in sys.modules, 'dfmpc_fx was imported'\n"
        "print(d)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-I", "-W", "ignore", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1e-5


def test_export_detects_a_mismatch(small_net: nn.Module, tmp_path: Path) -> None:
    q = dfmpc_fx.compress(small_net)
    with pytest.raises(dfmpc_fx.ExportError, match="differs"):
        dfmpc_fx.export_torchscript(q, tmp_path / "m.ts", torch.randn(2, 1, 28, 28), atol=-1.0, packed=False)


@torch.no_grad()
def test_negative_gamma_and_layers_without_batchnorm(small_net: nn.Module) -> None:
    """Guards from method.md: negative BatchNorm gamma is harmless, c stays >= 0, and layers
    without BatchNorm (conv4, fc1) are corrected through their bias."""
    small_net.bn2.weight[:4] *= -1
    x = torch.randn(4, 1, 28, 28)
    q16 = dfmpc_fx.compress(small_net, DFMPCConfig(**HIGH))
    assert float((q16(x) - small_net(x)).norm() / small_net(x).norm()) < 1e-4
    for rule in ("batchnorm", "least_squares", "variance"):
        q = dfmpc_fx.compress(small_net, DFMPCConfig(scale_rule=rule))
        report = dfmpc_fx.get_report(q)
        assert all(l.coeff_min is None or l.coeff_min >= 0 for l in report.layers)
        assert torch.isfinite(q(x)).all()
    q = dfmpc_fx.compress(small_net)
    assert q.get_submodule("conv4").bias is not None  # mean correction created a bias
    assert small_net.conv4.bias is None
