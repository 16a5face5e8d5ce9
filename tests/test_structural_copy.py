"""``structural_copy`` rebuilds modules field by field (the fast path) and must give what
``copy.deepcopy`` gives with the tensors shared: a separate module tree and Python state,
shared references kept shared, custom copy protocols honoured."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from dfmpc_fx.graph.tracing import structural_copy


class _Custom(nn.Module):
    """A module with its own ``__deepcopy__`` (must go through it)."""

    def __init__(self) -> None:
        super().__init__()
        self.copied = False

    def __deepcopy__(self, memo):
        new = _Custom()
        new.copied = True
        return new


class _Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.shared = nn.ReLU()
        self.seq = nn.Sequential(self.shared, nn.Conv2d(4, 4, 1))
        self.alias = self.seq  # a second name for a submodule (in _modules twice)
        self.custom = _Custom()
        self.config = {"sizes": [1, 2, 3], "name": "x", "nested": {"k": (4, 5)}}
        self.cache = {"t": torch.arange(3.0)}  # a cached tensor in Python state
        self.register_buffer("running", torch.zeros(4))
        self.register_forward_hook(lambda mod, args, out: None)

    def forward(self, x):
        return self.seq(self.conv(x))


def test_structural_copy_matches_deepcopy_with_shared_tensors():
    m = _Stateful().eval()
    c = structural_copy(m)
    assert type(c) is _Stateful and c is not m
    # tensors shared, modules and Python containers not
    assert c.conv.weight is m.conv.weight and c.running is m.running and c.cache["t"] is m.cache["t"]
    assert c.conv is not m.conv and c.seq is not m.seq
    assert c.config == m.config and c.config is not m.config and c.config["sizes"] is not m.config["sizes"]
    c.config["sizes"].append(4)
    assert m.config["sizes"] == [1, 2, 3]
    # shared references stay shared inside the copy, as deepcopy keeps them
    assert c.alias is c.seq and c.seq[0] is c.shared
    # a custom protocol is used
    assert c.custom.copied and not m.custom.copied
    # hooks and training flags carried over; the copy runs like the original
    assert len(c._forward_hooks) == 1 and c.training is False and c._forward_hooks is not m._forward_hooks
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(c(x), m(x))
    # same attributes as a plain deepcopy
    d = copy.deepcopy(m)
    for a, b in zip(c.modules(), d.modules()):
        assert type(a) is type(b) and sorted(vars(a)) == sorted(vars(b))


def test_structural_copy_with_tensors_copies_them():
    m = _Stateful().eval()
    c = structural_copy(m, copy_tensors=True)
    assert c.conv.weight is not m.conv.weight and torch.equal(c.conv.weight, m.conv.weight)
    assert type(c.conv.weight) is nn.Parameter and c.cache["t"] is not m.cache["t"]
    with torch.no_grad():
        c.conv.weight.add_(1.0)
    assert not torch.equal(c.conv.weight, m.conv.weight)
