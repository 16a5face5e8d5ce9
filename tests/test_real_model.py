"""A real trained network on real data: ResNet-20 on the full Fashion-MNIST test set.

The checkpoint is committed (recipe: ``python recipes/train.py --model resnet20 --epochs 4``);
the data come from the Debian package ``dataset-fashion-mnist`` that ``scripts/setup.sh``
installs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dfmpc_fx
from dfmpc_fx.examples.data import load_fashion_mnist
from dfmpc_fx.examples.training import evaluate_accuracy
from dfmpc_fx.examples.zoo import load_pretrained

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.fixture(scope="module")
def resnet20_and_test_set():
    model = load_pretrained("resnet20")
    images, labels = load_fashion_mnist("test")
    assert len(labels) == 10_000
    return model, images, labels


def test_default_method_is_far_above_plain_mixed_precision_at_mp2_6(resnet20_and_test_set) -> None:
    model, images, labels = resnet20_and_test_set
    recorded = json.loads((CHECKPOINTS / "resnet20.json").read_text())
    fp32 = evaluate_accuracy(model, images, labels)
    assert fp32 == pytest.approx(recorded["test_acc"], abs=0.01)

    acc = {}
    for tag, cfg in {
        "plain": dfmpc_fx.DFMPCConfig(low_bits=2, high_bits=6, compensate=False),
        "paper": dfmpc_fx.DFMPCConfig(low_bits=2, high_bits=6, method="paper"),
        "dfmpc": dfmpc_fx.DFMPCConfig(low_bits=2, high_bits=6),
    }.items():
        acc[tag] = evaluate_accuracy(dfmpc_fx.compress(model, cfg), images, labels)
    # plain MP2/6 collapses; the default recovers most of it without data and beats the paper
    assert acc["plain"] < fp32 - 30, acc
    assert acc["dfmpc"] > acc["plain"] + 40, acc
    assert acc["dfmpc"] > acc["paper"] + 3, acc
    assert acc["dfmpc"] > fp32 - 10, acc


def test_default_method_at_mp3_6_is_within_a_point_of_fp32(resnet20_and_test_set) -> None:
    model, images, labels = resnet20_and_test_set
    fp32 = evaluate_accuracy(model, images, labels)
    plain = evaluate_accuracy(dfmpc_fx.compress(model, low_bits=3, compensate=False), images, labels)
    ours = evaluate_accuracy(dfmpc_fx.compress(model, low_bits=3), images, labels)
    assert ours > plain + 2 and ours > fp32 - 1.0, (fp32, plain, ours)
