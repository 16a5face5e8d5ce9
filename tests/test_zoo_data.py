"""Tests for the model zoo, the Fashion-MNIST loaders and the committed checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.fx

from dfmpc_fx.examples import zoo
from dfmpc_fx.examples.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNISTNotFoundError,
    augment_batch,
    fashion_mnist_dir,
    fashion_mnist_loaders,
    load_fashion_mnist,
)

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO / "checkpoints"
COMMITTED = sorted(p.stem for p in CHECKPOINTS.glob("*.json") if (CHECKPOINTS / f"{p.stem}.pt").is_file())

HAVE_FMNIST = all(
    (fashion_mnist_dir() / f).is_file()
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
)
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST,
    reason=f"Fashion-MNIST IDX files not in {fashion_mnist_dir()} "
    "(apt-get install dataset-fashion-mnist, or set DFMPC_FASHION_MNIST_DIR)",
)


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_model_builds_traces_and_outputs_logits(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.build_model(name).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    graph_module = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        traced_out = graph_module(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(traced_out, out)


def test_resnet20_size_and_checkpoint_budget() -> None:
    counts = {n: sum(p.numel() for p in zoo.build_model(n).parameters()) for n in zoo.MODELS}
    assert 0.26e6 < counts["resnet20"] < 0.28e6
    assert counts["resnet56"] > 3 * counts["resnet20"]
    for name, n in counts.items():
        assert n * 4 < 12e6, f"{name} float32 weights would exceed 12 MB"


def test_mobilenetv2_uses_relu6_and_depthwise() -> None:
    model = zoo.build_model("mobilenetv2_fmnist")
    assert any(isinstance(m, torch.nn.ReLU6) for m in model.modules())
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.modules())


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        zoo.build_model("resnet1000")


def test_load_pretrained_missing_checkpoint_names_recipe(tmp_path: Path) -> None:
    with pytest.raises(zoo.CheckpointNotFoundError) as info:
        zoo.load_pretrained("resnet20", checkpoint_dir=tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "recipes/train.py --model resnet20" in message
    assert str(tmp_path / "resnet20.pt") in message


def test_load_pretrained_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = zoo.build_model("vgg_small")
    torch.save(model.state_dict(), tmp_path / "vgg_small.pt")
    monkeypatch.setenv("DFMPC_CHECKPOINT_DIR", str(tmp_path))
    loaded = zoo.load_pretrained("vgg_small")
    assert not loaded.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_missing_dataset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FashionMNISTNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    monkeypatch.setenv("DFMPC_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="DFMPC_FASHION_MNIST_DIR"):
        load_fashion_mnist("train")
    with pytest.raises(ValueError):
        load_fashion_mnist("validation")


def test_augment_batch_is_flip_plus_shift() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(16, 1, 28, 28)
    out = augment_batch(images, generator=g)
    assert out.shape == images.shape
    background = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), value=background)
    padded_flipped = torch.nn.functional.pad(images.flip(-1), (2, 2, 2, 2), value=background)
    for i in range(images.shape[0]):
        candidates = [
            src[i, :, dy : dy + 28, dx : dx + 28]
            for src in (padded, padded_flipped)
            for dy in range(5)
            for dx in range(5)
        ]
        assert any(torch.equal(out[i], c) for c in candidates)


@needs_fmnist
def test_test_split_shapes_and_normalisation() -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) == set(range(10))
    assert torch.bincount(labels).tolist() == [1000] * 10
    # The stated mean/std are those of the training set; the test set is close to them.
    assert abs(images.mean().item()) < 0.02
    assert abs(images.std().item() - 1.0) < 0.02
    assert images.min().item() == pytest.approx(-FASHION_MNIST_MEAN / FASHION_MNIST_STD, abs=1e-5)


@needs_fmnist
def test_loaders_shapes_and_train_statistics() -> None:
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 1, 28, 28) and labels.shape == (60000,)
    assert abs(images.mean().item()) < 1e-3
    assert abs(images.std().item() - 1.0) < 1e-3
    train, test = fashion_mnist_loaders(batch_size=64)
    x, y = next(iter(train))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,) and y.dtype == torch.int64
    assert len(train.dataset) == 60000 and len(test.dataset) == 10000
    tx, ty = next(iter(test))
    torch.testing.assert_close(tx, load_fashion_mnist("test")[0][: tx.shape[0]])


@needs_fmnist
def test_calibration_subset_is_seeded() -> None:
    from dfmpc_fx.examples.data import calibration_subset

    a = calibration_subset(100, seed=3)
    b = calibration_subset(100, seed=3)
    c = calibration_subset(100, seed=4)
    assert a.shape == (100, 1, 28, 28)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_evaluate_accuracy_counts_and_restores_mode() -> None:
    from dfmpc_fx.examples.training import evaluate_accuracy

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(x.view(-1).long(), 10).float()

    model = Fixed().train()
    images = torch.tensor([0, 1, 2, 3]).view(4, 1)
    labels = torch.tensor([0, 1, 9, 3])
    assert evaluate_accuracy(model, images, labels, batch_size=3) == 75.0
    assert model.training


@needs_fmnist
@pytest.mark.parametrize("name", COMMITTED)
def test_committed_checkpoint_reproduces_first_1000(name: str) -> None:
    """The recorded accuracy on the first 1000 test images is reproduced (1-image slack for
    thread-count-dependent float rounding)."""
    from dfmpc_fx.examples.training import evaluate_accuracy

    record = json.loads((CHECKPOINTS / f"{name}.json").read_text())
    assert record["model"] == name
    assert (CHECKPOINTS / f"{name}.pt").stat().st_size < 12e6
    model = zoo.load_pretrained(name)
    assert not model.training
    images, labels = load_fashion_mnist("test")
    acc = evaluate_accuracy(model, images[:1000], labels[:1000])
    assert abs(acc - record["test_acc_first_1000"]) <= 0.1 + 1e-6


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("DFMPC_FULL_CHECKPOINT_TESTS") != "1",
    reason="full 10k-image evaluation takes 0.5-2 min per model on one loaded core; "
    "set DFMPC_FULL_CHECKPOINT_TESTS=1 to run it",
)
@needs_fmnist
@pytest.mark.parametrize("name", COMMITTED)
def test_committed_checkpoint_reproduces_full_test_accuracy(name: str) -> None:
    """The JSON's full-test accuracy is reproduced by evaluate_accuracy (2-image slack)."""
    from dfmpc_fx.examples.training import evaluate_accuracy

    record = json.loads((CHECKPOINTS / f"{name}.json").read_text())
    images, labels = load_fashion_mnist("test")
    acc = evaluate_accuracy(zoo.load_pretrained(name), images, labels)
    assert abs(acc - record["test_acc"]) <= 0.02 + 1e-6
