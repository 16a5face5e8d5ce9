"""Mean correction scaled to the BatchNorm's recorded means (``DFMPCConfig.mean_calibration``):
the pure fit, the config's auto rule, and, on a network whose BatchNorm statistics are those of
real activations on small zero-padded maps, a corrected mean that matches the quantized model's
measured one better than the uncalibrated correction does."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dfmpc_fx
from dfmpc_fx.numerics.compensation import recorded_mean_scale

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=dfmpc_fx.NoCompensablePairWarning)

W3 = dict(low_bits=3, high_bits=3, default_bits=3, first_last_bits=3, max_bits=16)


def test_recorded_mean_scale_fits_clamps_and_degrades_to_one():
    p = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    assert recorded_mean_scale(p, 0.8 * p) == pytest.approx(0.8)
    assert recorded_mean_scale(p, 0.8 * p + torch.tensor([0.01, -0.01, 0.0, 0.0], dtype=torch.float64)) == pytest.approx(0.8, abs=0.01)
    assert recorded_mean_scale(p, 5.0 * p) == 1.5 and recorded_mean_scale(p, -p) == 0.5
    assert recorded_mean_scale(torch.zeros(4), p) == 1.0


def test_auto_follows_the_budget():
    C = dfmpc_fx.DFMPCConfig
    assert C().calibrates_means and C(target_bytes=10_000).calibrates_means
    assert not C(**W3).calibrates_means and not C(method="paper").calibrates_means
    assert C(**W3, mean_calibration=True).calibrates_means
    with pytest.raises(dfmpc_fx.ConfigError, match="mean_calibration"):
        C(mean_calibration="sometimes")


class Net(nn.Module):
    """Three 3x3 zero-padded convs on 4x4 maps, each followed by BatchNorm and ReLU: a border
    output sees only part of the kernel, so data-free input means overshoot."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(8, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return torch.relu(self.b3(self.c3(x)))


def _data() -> torch.Tensor:
    return torch.randn(4096, 8, 4, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for c in (model.c1, model.c2, model.c3):
            c.weight.add_(0.05)  # filters with a nonzero mean: the shifts the correction moves are real
        for b in (model.b1, model.b2, model.b3):
            b.weight.uniform_(0.5, 1.5)
            b.bias.uniform_(-0.5, 0.5)
            b.momentum = None  # cumulative average: the recorded statistics are those of the data
        model.train()
        model(_data())
    return model.eval()


def _batchnorm_input_mean_error(q: nn.Module, x: torch.Tensor, name: str) -> float:
    """Median over channels of |measured mean of the BatchNorm's input - its running mean| / std."""
    seen = {}
    hook = q.get_submodule(name).register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    with torch.no_grad():
        q(x)
    hook.remove()
    t = seen["x"].transpose(0, 1).reshape(seen["x"].shape[1], -1)
    bn = q.get_submodule(name)
    return float(((t.mean(1) - bn.running_mean).abs() / t.std(1)).median())


def test_calibrated_mean_correction_matches_the_measured_mean_better(net):
    x = _data()
    off = dfmpc_fx.compress(net, **W3)
    on = dfmpc_fx.compress(net, **W3, mean_calibration=True)
    scales = {l.name: l.mean_scale for l in dfmpc_fx.get_report(on).layers}
    assert all(s is None for s in (l.mean_scale for l in dfmpc_fx.get_report(off).layers))
    assert scales["c2"] < 0.95 and scales["c3"] < 0.95  # padding: the true input means are smaller
    for bn in ("b2", "b3"):
        err_off, err_on = _batchnorm_input_mean_error(off, x, bn), _batchnorm_input_mean_error(on, x, bn)
        assert err_on < 0.7 * err_off, (bn, err_on, err_off)
