"""BatchNorm folded into the quantized layer before it (``DFMPCConfig.fold_batchnorm``): the
function is unchanged, the BatchNorm leaves the graph and the byte count, a byte budget spends
what it saved, negative gammas and zero-point schemes are handled, every stored and exported
form reproduces, the user's model is untouched, and nothing folds unless asked (or a byte
budget is set)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dfmpc_fx
from dfmpc_fx.transform.modules import is_quant_module

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=dfmpc_fx.NoCompensablePairWarning)

BN = (nn.BatchNorm1d, nn.BatchNorm2d)
W4 = dict(low_bits=4, high_bits=4, default_bits=4, first_last_bits=8, max_bits=16)


class Net(nn.Module):
    """conv (bias) -> BN with some negative gammas, depthwise -> BN, a BN without affine, a conv
    whose raw output has a second consumer (its BN cannot fold), Linear -> BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=True), nn.BatchNorm2d(16)
        self.dw, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw, self.bn2 = nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24, affine=False)
        self.side, self.bn3 = nn.Conv2d(24, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.fc1, self.bn4 = nn.Linear(24, 32), nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        x = torch.relu(self.bn2(self.pw(x)))
        s = self.side(x)
        x = torch.relu(self.bn3(s)) + s
        x = torch.relu(self.bn4(self.fc1(x.mean((2, 3)))))
        return self.fc2(x)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for bn in (model.bn0, model.bn1, model.bn2, model.bn3, model.bn4):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.05, 3.0)
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.3)
        model.bn0.weight[::3] *= -1.0  # negative gammas: codes are negated, scales stay positive
    return model.eval()


def _x() -> torch.Tensor:
    return torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _bn_names(q: nn.Module) -> set[str]:
    return {n for n, m in q.named_modules() if isinstance(m, BN)}


def test_config_validates_and_auto_follows_a_byte_budget():
    C = dfmpc_fx.DFMPCConfig
    assert C(target_bytes=10_000).folds_batchnorm
    assert not C().folds_batchnorm and not C(target_bits=3.0).folds_batchnorm and not C(**W4).folds_batchnorm
    assert C(fold_batchnorm=True).folds_batchnorm and not C(target_bytes=10_000, fold_batchnorm=False).folds_batchnorm
    with pytest.raises(dfmpc_fx.ConfigError, match="fold_batchnorm"):
        C(fold_batchnorm="yes")


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_fold_keeps_the_function_and_drops_the_batchnorm_bytes(net, scale_dtype):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = _x()
    plain = dfmpc_fx.compress(net, **W4, scale_dtype=scale_dtype)
    folded = dfmpc_fx.compress(net, **W4, scale_dtype=scale_dtype, fold_batchnorm=True)
    with torch.no_grad():
        # float32 scales: float rounding only; float16 ones: the product scale * gamma / std is
        # rounded once more to 11 significant bits
        assert _rel(folded(x), plain(x)) < (1e-5 if scale_dtype == "float32" else 2e-3)
    rep = dfmpc_fx.get_report(folded)
    by_name = {l.name: l for l in rep.layers}
    assert {l.batchnorm_folded for l in rep.layers if l.batchnorm_folded} == {"bn0", "bn1", "bn2", "bn4"}
    assert by_name["side"].batchnorm_folded is None  # its raw output has a second consumer
    assert _bn_names(folded) == {"bn3"} and _bn_names(plain) == {"bn0", "bn1", "bn2", "bn3", "bn4"}
    # bytes: each folded BN's floats go; layers without a bias gain one (dw, pw: 16 + 24 floats)
    bn_floats = sum(t.numel() for n in ("bn0", "bn1", "bn2", "bn4") for t in
                    [*net.get_submodule(n).parameters(), *net.get_submodule(n).buffers()] if t.is_floating_point())
    saved = dfmpc_fx.get_report(plain).compressed_bytes - rep.compressed_bytes
    assert saved == 4 * (bn_floats - 16 - 24)
    assert rep.bits_per_weight == pytest.approx(dfmpc_fx.get_report(plain).bits_per_weight)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # user's model untouched
    for name in ("stem", "dw", "pw", "fc1"):
        layer = folded.get_submodule(name)
        assert is_quant_module(layer) and layer.bias is not None
        assert bool((layer.weight_scale > 0).all())  # negative gammas negated the codes instead


def test_folded_model_reproduces_in_every_artifact(net, tmp_path, artifacts_reproduce):
    q = dfmpc_fx.compress(net, **W4, fold_batchnorm=True)
    artifacts_reproduce(q, _x(), tmp_path)


def test_module_output_replaces_folded_batchnorms_with_identity(net):
    x = _x()
    gm = dfmpc_fx.compress(net, **W4, fold_batchnorm=True)
    mod = dfmpc_fx.compress(net, **W4, fold_batchnorm=True, output="module")
    assert type(mod) is Net and isinstance(mod.bn0, nn.Identity) and isinstance(mod.bn3, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(mod(x), gm(x))
    assert isinstance(net.bn0, nn.BatchNorm2d)


def test_zero_point_scheme_folds_only_nonnegative_gammas(net):
    x = _x()
    plain = dfmpc_fx.compress(net, **W4, scheme="asymmetric")
    folded = dfmpc_fx.compress(net, **W4, scheme="asymmetric", fold_batchnorm=True)
    rep = dfmpc_fx.get_report(folded)
    by_name = {l.name: l.batchnorm_folded for l in rep.layers}
    assert by_name["stem"] is None and by_name["dw"] == "bn1"  # bn0 has negative gammas
    with torch.no_grad():
        assert _rel(folded(x), plain(x)) < 1e-5


def test_byte_budget_spends_the_folded_bytes(net):
    """Under ``target_bytes`` folding is on by default: the same byte budget buys more bits per
    weight than without it, and a budget below the unfolded floor is reachable."""
    ref = dfmpc_fx.get_report(dfmpc_fx.compress(net, **W4)).compressed_bytes
    target = int(ref * 0.9)
    auto = dfmpc_fx.get_report(dfmpc_fx.compress(net, target_bytes=target))
    off = dfmpc_fx.get_report(dfmpc_fx.compress(net, target_bytes=target, fold_batchnorm=False))
    assert auto.compressed_bytes <= target and off.compressed_bytes <= target
    assert any(l.batchnorm_folded for l in auto.layers) and not any(l.batchnorm_folded for l in off.layers)
    assert auto.bits_per_weight > off.bits_per_weight
    with pytest.raises(dfmpc_fx.ConfigError) as info:
        dfmpc_fx.compress(net, target_bytes=1, fold_batchnorm=False)
    floor_off = int(str(info.value).split("target_bytes=")[1].split(";")[0])
    with pytest.raises(dfmpc_fx.ConfigError) as info:
        dfmpc_fx.compress(net, target_bytes=1)
    floor_on = int(str(info.value).split("target_bytes=")[1].split(";")[0])
    assert floor_on < floor_off
    q = dfmpc_fx.compress(net, target_bytes=floor_on)
    assert dfmpc_fx.get_report(q).compressed_bytes <= floor_on


@pytest.mark.slow
def test_mobilenetv2_at_a_peer_size_that_only_folding_reaches():
    """The committed mobilenetv2 at AIMET W3's bytes (195,446: AIMET folds BN): unreachable
    without folding; with it, within 2 points of FP32 on 2,000 test images."""
    from dfmpc_fx.examples.data import load_fashion_mnist
    from dfmpc_fx.examples.training import evaluate_accuracy
    from dfmpc_fx.examples.zoo import load_pretrained

    model = load_pretrained("mobilenetv2_fmnist")
    with pytest.raises(dfmpc_fx.ConfigError, match="target_bytes="):
        dfmpc_fx.compress(model, target_bytes=195_446, fold_batchnorm=False)
    q = dfmpc_fx.compress(model, target_bytes=195_446)
    assert dfmpc_fx.get_report(q).compressed_bytes <= 195_446
    x, y = load_fashion_mnist("test")
    x, y = x[:2000], y[:2000]
    assert evaluate_accuracy(model, x, y) - evaluate_accuracy(q, x, y) <= 2.0
