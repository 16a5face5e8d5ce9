"""Pair discovery: pattern tables, functional forms, refusals with reasons, bit assignment."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfmpc_fx
from dfmpc_fx.graph.bits import assign_bits
from dfmpc_fx.graph.pairs import (
    BN_POSITION,
    CHANNEL_MAPPING,
    FAN_OUT,
    OUTPUT,
    RESIDUAL,
    REUSED,
    SCALE_VARYING,
    UNKNOWN_OP,
)


def _pairs(model: nn.Module) -> set[tuple[str, str]]:
    return {(p.first, p.second) for p in dfmpc_fx.find_compensable_pairs(model).pairs}


def _refusal(model: nn.Module, layer: str) -> str:
    search = dfmpc_fx.find_compensable_pairs(model)
    return next(r.reason for r in search.refusals if r.first == layer)


class FunctionalForms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 4, 1)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 10)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)  # 12x12 -> 6x6? (see input size)
        x = self.c3(x).relu()
        x = F.adaptive_avg_pool2d(F.leaky_relu(self.c4(x), 0.2), 4)
        x = x.view(x.size(0), -1)
        x = self.drop(F.relu(self.fc1(x)))
        x = torch.flatten(self.fc2(x), 1)
        return self.fc3(x)


def test_functional_and_method_forms_are_followed() -> None:
    model = FunctionalForms().eval()
    pairs = _pairs(model)
    assert pairs == {("c1", "c2"), ("c2", "c3"), ("c3", "c4"), ("c4", "fc1"), ("fc1", "fc2"), ("fc2", "fc3")}
    search = dfmpc_fx.find_compensable_pairs(model)
    by_first = {p.first: p for p in search.pairs}
    assert by_first["c1"].bn == "b1" and by_first["c3"].bn is None
    assert by_first["c4"].features_per_channel == 16  # 4x4 spatial positions per channel
    assert by_first["c4"].activation.startswith("leaky_relu")
    assert _refusal(model, "fc3") == OUTPUT


class ModuleForms(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6), nn.PReLU(6), nn.Dropout(0.0), nn.AvgPool1d(2),
            nn.Conv1d(6, 6, 3, groups=3), nn.BatchNorm1d(6), nn.ReLU(), nn.AdaptiveMaxPool1d(2), nn.Flatten(),
            nn.Linear(12, 5), nn.ReLU(), nn.Identity(), nn.Linear(5, 3),
        )


def test_module_forms_conv1d_grouped_prelu_flatten() -> None:
    model = ModuleForms().eval()
    pairs = _pairs(model)
    assert ("0", "5") in pairs  # PReLU, dropout, avg-pool in between; grouped partner
    assert ("5", "10") in pairs  # grouped source, adaptive max pool, nn.Flatten
    assert ("10", "13") in pairs  # linear -> relu -> identity -> linear
    p = next(p for p in dfmpc_fx.find_compensable_pairs(model).pairs if p.first == "5")
    assert p.features_per_channel == 2


class Refusals(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)
        self.bn_late = nn.BatchNorm2d(8)
        self.e = nn.Conv2d(8, 8, 1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.f = nn.Conv2d(8, 8, 1)
        self.g = nn.Conv2d(8, 8, 1)
        self.h = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # fan-out: feeds a and the residual add
        y = self.a(x)
        x = x + self.b(F.relu(y))  # b: residual add
        x = F.relu6(self.c(x))  # c: scale-varying activation
        x = torch.sigmoid(self.d(x)) * x  # d: scale-varying (sigmoid)
        x = self.e(self.bn_late(F.relu(x)))  # no pair into e: BN after activation is refused for d's chain
        x = self.shared(self.shared(x))  # reused module
        x = torch.cat([self.f(x), x], dim=1)  # concat
        x = self.h(x)
        x = torch.abs(self.g(x))  # unknown op
        return self.head(x.mean(dim=(2, 3)))


def test_refusals_carry_a_reason_each() -> None:
    model = Refusals().eval()
    search = dfmpc_fx.find_compensable_pairs(model)
    reasons = {r.first: r.reason for r in search.refusals}
    assert reasons["stem"] == RESIDUAL  # stem output feeds conv a and the residual add
    assert ("a", "b") in _pairs(model)
    assert reasons["b"] == RESIDUAL
    assert reasons["c"] == SCALE_VARYING
    assert reasons["d"] == SCALE_VARYING
    assert reasons["shared"] == REUSED
    assert reasons["f"] == RESIDUAL and "concatenation" in next(r.detail for r in search.refusals if r.first == "f")
    assert reasons["e"] == REUSED  # its partner is called twice
    assert ("h", "g") in _pairs(model)
    assert reasons["g"] == UNKNOWN_OP  # torch.abs is in no pattern table
    # every weighted layer is either in a pair (as first) or refused, never silently dropped
    firsts = {p.first for p in search.pairs} | set(reasons)
    assert firsts == set(search.layers)
    table = search.to_table()
    assert "scale-varying activation" in table and "pairs" in table


def test_fan_out_to_two_convs_is_refused() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            return self.b(y) + self.c(y).sum()

    assert _refusal(TwoHeads(), "a") == FAN_OUT


def test_batchnorm_after_activation_and_channel_mismatch_refused() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
            self.c, self.fc = nn.Conv1d(4, 4, 1), nn.Linear(7, 3)

        def forward(self, x):
            x = self.b(self.bn(F.relu(self.a(x))))
            return self.fc(F.relu(self.c(x.mean(dim=2))))  # Linear on the last dim, not channels

    search = dfmpc_fx.find_compensable_pairs(Odd())
    reasons = {r.first: r.reason for r in search.refusals}
    assert reasons["a"] == BN_POSITION
    assert reasons["c"] == CHANNEL_MAPPING


def test_bit_assignment_follows_the_paper() -> None:
    import torchvision

    cfg = dfmpc_fx.DFMPCConfig(low_bits=2, high_bits=6)
    r18 = dfmpc_fx.find_compensable_pairs(torchvision.models.resnet18(weights=None))
    plan = assign_bits(r18, cfg)
    assert plan.roles["layer1.0.conv1"] == "low" and plan.roles["layer1.0.conv2"] == "high"
    assert plan.roles["conv1"] == "first_last" and plan.roles["fc"] == "first_last"
    assert plan.roles["layer2.0.downsample.0"] == "default" and plan.bits["layer2.0.downsample.0"] == 8

    r50 = dfmpc_fx.find_compensable_pairs(torchvision.models.resnet50(weights=None))
    plan = assign_bits(r50, cfg)
    for block in ("layer1.0", "layer3.2"):  # bottleneck 1x1-3x3-1x1: high-low-high
        assert [plan.roles[f"{block}.conv{i}"] for i in (1, 2, 3)] == ["high", "low", "high"]
    assert all(plan.roles[p.first] == "low" and plan.roles[p.second] == "high" for p in plan.active_pairs)

    # plain chain (VGG): alternate, and every low layer has a high partner downstream
    vgg = dfmpc_fx.find_compensable_pairs(torchvision.models.vgg11_bn(weights=None))
    plan = assign_bits(vgg, cfg)
    lows = [n for n, r in plan.roles.items() if r == "low"]
    assert lows and all(plan.pair_from(n) is not None for n in lows)

    floats = assign_bits(r18, dfmpc_fx.DFMPCConfig(default_bits=None, first_last_bits=None))
    assert floats.bits["layer2.0.downsample.0"] is None and floats.roles["conv1"] == "float"


def test_pair_search_behaves_as_the_sequence_of_its_pairs() -> None:
    from dfmpc_fx.graph.pairs import PairSearch

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    search = dfmpc_fx.find_compensable_pairs(model)
    assert isinstance(search, PairSearch)
    assert len(search) == len(search.pairs) >= 1
    assert list(search) == search.pairs
    assert search[0] is search.pairs[0] and search[-1] is search.pairs[-1]
    assert search[:1] == search.pairs[:1]
    assert bool(search) and search.pairs[0] in search
    assert isinstance(search.refusals, list) and "pairs" in search.to_table()
    empty = PairSearch(pairs=[], refusals=[])
    assert not empty and len(empty) == 0 and list(empty) == []
    with pytest.raises(IndexError):
        empty[0]
