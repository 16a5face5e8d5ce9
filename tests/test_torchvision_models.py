"""Pair discovery, compress and TorchScript round trips on real torchvision architectures.

Random weights and random BatchNorm statistics (no weights can be downloaded here); the pair
counts follow from each architecture's structure, written out per model below.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import dfmpc_fx
from dfmpc_fx.graph.pairs import OUTPUT, RESIDUAL, SCALE_VARYING

from test_compress import randomize_batchnorm

# model -> (number of pairs, pairs that must be there, refusal reasons that must be reported, input size)
EXPECTED = {
    # 8 basic blocks: conv1 -> bn1 -> relu -> conv2 each; conv2/downsample feed the residual add
    "resnet18": (8, [("layer1.0.conv1", "layer1.0.conv2"), ("layer4.1.conv1", "layer4.1.conv2")],
                 {RESIDUAL: 12, OUTPUT: 1}, 64),
    # 16 bottlenecks: conv1 -> conv2 -> conv3 chains, two pairs each
    "resnet50": (32, [("layer1.0.conv1", "layer1.0.conv2"), ("layer1.0.conv2", "layer1.0.conv3")],
                 {RESIDUAL: 20, OUTPUT: 1}, 64),
    # 13 convs and 3 linears in one chain (max-pools, flatten and dropout in between)
    "vgg16_bn": (15, [("features.0", "features.3"), ("features.40", "classifier.0"), ("classifier.0", "classifier.3")],
                 {OUTPUT: 1}, 32),
    # ReLU6 everywhere; only projection -> next expansion without a residual pairs up
    "mobilenet_v2": (2, [("features.1.conv.1", "features.2.conv.0.0")], {SCALE_VARYING: 35, RESIDUAL: 15}, 64),
    # 58 dense layers: conv1 (1x1) -> norm2 -> relu2 -> conv2 (3x3); concat ends the rest
    "densenet121": (58, [("features.denseblock1.denselayer1.conv1", "features.denseblock1.denselayer1.conv2")],
                    {RESIDUAL: 62, OUTPUT: 1}, 64),
    # SiLU everywhere, squeeze-excitation multiplies
    "efficientnet_b0": (2, [("features.7.0.block.3.0", "features.8.0")], {SCALE_VARYING: 65}, 64),
    # 16 Y-blocks: a -> b (grouped 3x3) and the SE's fc1 -> relu -> fc2
    "regnet_y_400mf": (32, [("trunk_output.block1.block1-0.f.a.0", "trunk_output.block1.block1-0.f.b.0"),
                            ("trunk_output.block1.block1-0.f.se.fc1", "trunk_output.block1.block1-0.f.se.fc2")],
                       {SCALE_VARYING: 16}, 64),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_pairs_compress_and_torchscript_round_trip(name: str, tmp_path: Path) -> None:
    n_pairs, must_pairs, must_reasons, size = EXPECTED[name]
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.get_model(name, weights=None).eval())
    search = dfmpc_fx.find_compensable_pairs(model)
    pairs = {(p.first, p.second) for p in search.pairs}
    assert len(search.pairs) == n_pairs, search.to_table()
    for pair in must_pairs:
        assert pair in pairs, pair
    counts = search.refusal_counts()
    for reason, n in must_reasons.items():
        assert counts.get(reason, 0) == n, counts
    assert all(r.reason and r.detail for r in search.refusals)
    assert {p.first for p in search.pairs} | {r.first for r in search.refusals} == set(search.layers)

    q = dfmpc_fx.compress(model, dfmpc_fx.DFMPCConfig(low_bits=2, high_bits=6))
    report = dfmpc_fx.get_report(q)
    assert report.num_pairs >= 1
    low = [l for l in report.layers if l.role == "low"]
    assert low and all(l.bits == 2 for l in low)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = q(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    path = dfmpc_fx.export_torchscript(q, tmp_path / f"{name}.ts", example_inputs=(x,))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert float((loaded(x) - out).abs().max()) < 1e-5


def fold_random_scales(model: torch.nn.Module, search: dfmpc_fx.PairSearch, seed: int = 0) -> None:
    """For every pair: scale the first layer's output channels by random c > 0 (through its
    BatchNorm, or its weights and bias) and the second layer's input channels by 1/c. This is
    function-preserving exactly when the pair is real, whatever c is."""
    from dfmpc_fx.numerics.compensation import fold_input_scale

    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for p in search.pairs:
            first, second = modules[p.first], modules[p.second]
            n = first.weight.shape[0]
            c = torch.rand(n, generator=g, dtype=first.weight.dtype) * 1.5 + 0.25
            if p.bn is not None:
                bn = modules[p.bn]
                bn.weight.mul_(c)
                bn.bias.mul_(c)
            else:
                first.weight.mul_(c.view((-1,) + (1,) * (first.weight.dim() - 1)))
                if first.bias is not None:
                    first.bias.mul_(c)
            second.weight.copy_(fold_input_scale(second.weight, 1 / c, getattr(second, "groups", 1), p.features_per_channel))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11_bn", "densenet121", "regnet_y_400mf", "mobilenet_v2",
                                  "efficientnet_b0", "shufflenet_v2_x0_5", "mnasnet0_5", "squeezenet1_1"])
def test_every_pair_found_is_scale_equivalent(name: str) -> None:
    """The strongest check of pair discovery: random per-channel rescaling across each pair
    leaves the network's function unchanged (float64, random BatchNorm statistics)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.get_model(name, weights=None).eval()).double()
    search = dfmpc_fx.find_compensable_pairs(model)
    assert search.pairs
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        fold_random_scales(model, search)
        out = model(x)
    assert float((out - ref).norm() / ref.norm()) < 1e-9
