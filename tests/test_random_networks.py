"""Property-based: random traceable networks go through compress without crashing.

The generator builds chains of Conv1d/Conv2d (grouped, depthwise, biased or not) and Linear
layers with BatchNorm, positively homogeneous and scale-varying activations (modules and
functions), pooling, flatten/view, residual adds, concatenations, elementwise gates, reused
modules, ops outside the pattern tables, BatchNorm without running statistics, and layers
feeding the output. For every network:

- ``compress`` returns a model (the only warning allowed is ``NoCompensablePairWarning``),
- every weighted layer is either the first layer of a pair or refused with a known reason and a
  non-empty detail,
- compression at 16 bits preserves the function (relative output error < 1e-4),
- the packed model reproduces the fake-quant model exactly.

``DFMPC_RANDOM_NETWORKS=500 pytest tests/test_random_networks.py`` runs a longer search.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dfmpc_fx
from dfmpc_fx.graph import pairs as pairs_mod
from dfmpc_fx.artifacts.packed import pack_model

REASONS = {
    pairs_mod.FAN_OUT, pairs_mod.RESIDUAL, pairs_mod.SCALE_VARYING, pairs_mod.UNKNOWN_OP, pairs_mod.OUTPUT,
    pairs_mod.BN_POSITION, pairs_mod.CHANNEL_MAPPING, pairs_mod.REUSED, pairs_mod.BN_NO_STATS,
}
CFG16 = dfmpc_fx.DFMPCConfig(low_bits=16, high_bits=16, default_bits=16, first_last_bits=16, max_bits=16)

ACTIVATIONS = {
    # positively homogeneous (pairs may pass through them)
    "relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "prelu": nn.PReLU, "identity": nn.Identity,
    "dropout": lambda: nn.Dropout(0.3),
    # scale-varying (pairs must be refused there)
    "relu6": nn.ReLU6, "silu": nn.SiLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "hardswish": nn.Hardswish, "elu": nn.ELU,
}
FUNCTIONS = {"f_relu": F.relu, "f_relu6": F.relu6, "f_silu": F.silu, "t_tanh": torch.tanh}


@dataclass(frozen=True)
class Step:
    kind: str
    arg: object = None


@st.composite
def network_specs(draw):
    dims = draw(st.sampled_from([1, 2]))
    c0 = draw(st.integers(1, 4))
    size = draw(st.sampled_from([8, 12]))
    n_blocks = draw(st.integers(1, 6))
    body = []
    for _ in range(n_blocks):
        kind = draw(st.sampled_from(["conv", "conv", "conv", "bn", "act", "func", "pool", "residual", "concat", "gate", "reuse",
                                            "roll", "bn_batch_stats"]))
        if kind == "conv":
            arg = (draw(st.integers(1, 8)), draw(st.sampled_from([1, 3])), draw(st.sampled_from(["plain", "grouped", "depthwise"])),
                   draw(st.booleans()))
        elif kind == "act":
            arg = draw(st.sampled_from(sorted(ACTIVATIONS)))
        elif kind == "func":
            arg = draw(st.sampled_from(sorted(FUNCTIONS)))
        elif kind == "pool":
            arg = draw(st.sampled_from(["max", "avg"]))
        else:
            arg = draw(st.sampled_from(sorted(ACTIVATIONS)))
        body.append(Step(kind, arg))
    head = draw(st.sampled_from(["flatten", "gap", "view"]))
    fcs = draw(st.lists(st.tuples(st.integers(2, 12), st.sampled_from(sorted(ACTIVATIONS)), st.booleans()), max_size=3))
    return dims, c0, size, tuple(body), head, tuple(fcs)


class RandomNet(nn.Module):
    """A network interpreted from a spec; torch.fx unrolls the Python loop over steps."""

    def __init__(self, spec, seed: int):
        super().__init__()
        dims, c0, size, body, head, fcs = spec
        torch.manual_seed(seed)
        Conv = nn.Conv1d if dims == 1 else nn.Conv2d
        BN = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.dims, self.steps, self.mods = dims, [], nn.ModuleDict()
        c, s = c0, size
        last_conv = None

        def add(name, module):
            key = f"m{len(self.mods)}_{name}"
            self.mods[key] = module
            return key

        for step in body:
            if step.kind == "conv":
                out, k, style, bias = step.arg
                groups = 1
                if style == "grouped" and c % 2 == 0 and out % 2 == 0:
                    groups = 2
                elif style == "depthwise":
                    out, groups = c, c
                last_conv = add("conv", Conv(c, out, k, padding=k // 2, groups=groups, bias=bias))
                self.steps.append(("mod", last_conv))
                c = out
            elif step.kind == "bn":
                self.steps.append(("mod", add("bn", BN(c))))
            elif step.kind == "act":
                self.steps.append(("mod", add(step.arg, ACTIVATIONS[step.arg]())))
            elif step.kind == "func":
                self.steps.append(("func", step.arg))
            elif step.kind == "pool":
                if s >= 4:
                    pool = (nn.MaxPool1d if dims == 1 else nn.MaxPool2d) if step.arg == "max" else (nn.AvgPool1d if dims == 1 else nn.AvgPool2d)
                    self.steps.append(("mod", add("pool", pool(2))))
                    s //= 2
            elif step.kind == "residual":  # x + conv(act(bn(conv(x))))
                keys = (add("rconv", Conv(c, c, 3, padding=1, bias=False)), add("rbn", BN(c)),
                        add(step.arg, ACTIVATIONS[step.arg]()), add("rconv", Conv(c, c, 1)))
                self.steps.append(("residual", keys))
            elif step.kind == "concat":  # cat([conv_a(x), act(conv_b(x))])
                keys = (add("cconv", Conv(c, 2, 1)), add("cconv", Conv(c, 3, 3, padding=1)), add(step.arg, ACTIVATIONS[step.arg]()))
                self.steps.append(("concat", keys))
                c = 5
            elif step.kind == "gate":  # squeeze-excitation style x * sigmoid(conv(mean(x)))
                keys = (add("gconv", Conv(c, c, 1)),)
                self.steps.append(("gate", keys))
            elif step.kind == "reuse":  # one conv called twice in a row
                key = add("shared", Conv(c, c, 3, padding=1))
                self.steps += [("mod", key), ("mod", add(step.arg, ACTIVATIONS[step.arg]())), ("mod", key)]
            elif step.kind == "roll":  # an op outside the pattern tables
                self.steps.append(("roll", None))
            elif step.kind == "bn_batch_stats":  # BatchNorm without running statistics
                self.steps.append(("mod", add("bnb", BN(c, track_running_stats=False))))
        if head == "gap":
            self.steps.append(("mod", add("gap", nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1))))
            s = 1
        self.steps.append((head if head != "gap" else "flatten", None))
        f = c * (s ** dims)
        for out, act, bn in fcs:
            self.steps.append(("mod", add("fc", nn.Linear(f, out))))
            if bn:
                self.steps.append(("mod", add("bn1d", nn.BatchNorm1d(out))))
            self.steps.append(("mod", add(act, ACTIVATIONS[act]())))
            f = out
        self.steps.append(("mod", add("fc", nn.Linear(f, 3))))
        gen = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                m.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
        self.input_shape = (2, c0) + (size,) * dims

    def forward(self, x):
        for kind, arg in self.steps:
            if kind == "mod":
                x = self.mods[arg](x)
            elif kind == "func":
                x = FUNCTIONS[arg](x)
            elif kind == "residual":
                a, b, act, d = arg
                x = x + self.mods[d](self.mods[act](self.mods[b](self.mods[a](x))))
            elif kind == "concat":
                a, b, act = arg
                x = torch.cat([self.mods[a](x), self.mods[act](self.mods[b](x))], dim=1)
            elif kind == "gate":
                (g,) = arg
                pooled = x.mean(dim=-1, keepdim=True) if self.dims == 1 else x.mean(dim=(2, 3), keepdim=True)
                x = x * torch.sigmoid(self.mods[g](pooled))
            elif kind == "roll":
                x = torch.roll(x, 1, -1)
            elif kind == "flatten":
                x = torch.flatten(x, 1)
            elif kind == "view":
                x = x.view(x.size(0), -1)
        return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


@settings(max_examples=int(os.environ.get("DFMPC_RANDOM_NETWORKS", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=network_specs(), seed=st.integers(0, 10_000), method=st.sampled_from(["dfmpc", "paper"]),
       compensate=st.booleans())
def test_random_network(spec, seed, method, compensate):
    model = RandomNet(spec, seed).eval()
    x = torch.randn(model.input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x)

    search = dfmpc_fx.find_compensable_pairs(model)
    assert len(search.pairs) + len(search.refusals) == len(search.layers)
    assert {p.first for p in search.pairs} | {r.first for r in search.refusals} == set(search.layers)
    for r in search.refusals:
        assert r.reason in REASONS, r
        assert r.detail.strip(), r

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", dfmpc_fx.NoCompensablePairWarning)
        warnings.simplefilter("ignore", dfmpc_fx.DefaultBudgetWarning)  # tiny nets: the default 4 bits/w out of reach
        warnings.simplefilter("ignore", FutureWarning)
        qmodel = dfmpc_fx.compress(model, dfmpc_fx.DFMPCConfig(method=method, compensate=compensate))
        q16 = dfmpc_fx.compress(model, CFG16)
    report = dfmpc_fx.get_report(qmodel)
    assert all(r["reason"] in REASONS and r["detail"] for r in report.refusals)
    with torch.no_grad():
        yq = qmodel(x)
        assert yq.shape == y.shape and bool(torch.isfinite(yq).all())
        y16 = q16(x)
        assert _rel(y16, y) < 1e-4, (spec, _rel(y16, y))
        assert torch.equal(pack_model(qmodel)(x), yq)
