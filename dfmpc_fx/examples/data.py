"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (offline, no downloads).

The IDX ``.gz`` files are read with numpy and returned as normalised torch tensors. Nothing
here imports lightning; the ``FashionMNISTDataModule`` lives in :mod:`dfmpc_fx.examples.training`.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "machine_sentences",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FashionMNISTNotFoundError",
    "augment_batch",
    "augment_collate",
    "calibration_subset",
    "fashion_mnist_dir",
    "fashion_mnist_loaders",
    "load_fashion_mnist",
]

FASHION_MNIST_DIR: Path = Path(
    os.environ.get("DFMPC_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)
FASHION_MNIST_MEAN: float = 0.2860
FASHION_MNIST_STD: float = 0.3530

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# (directory, split) -> (images, labels); the files are read once per process.
_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


class FashionMNISTNotFoundError(FileNotFoundError):
    """The Fashion-MNIST IDX files are not where they were looked for."""


def fashion_mnist_dir() -> Path:
    """Directory holding the IDX files: ``$DFMPC_FASHION_MNIST_DIR`` if set (read at call
    time), else :data:`FASHION_MNIST_DIR`."""
    env = os.environ.get("DFMPC_FASHION_MNIST_DIR")
    return Path(env) if env else FASHION_MNIST_DIR


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(
    split: str, root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split (``"train"``: 60k, ``"test"``: 10k) of Fashion-MNIST.

    Returns ``(images, labels)``: float32 images of shape ``(N, 1, 28, 28)`` normalised with
    mean 0.2860 and std 0.3530, and int64 labels of shape ``(N,)``. The tensors are cached
    per process; callers must not modify them in place (clone first).

    Raises:
        ValueError: unknown split.
        FashionMNISTNotFoundError: the IDX files are missing (install the Debian package
            ``dataset-fashion-mnist`` or set ``DFMPC_FASHION_MNIST_DIR``).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = Path(root) if root is not None else fashion_mnist_dir()
    key = (str(directory), split)
    if key in _CACHE:
        return _CACHE[key]
    img_name, lbl_name = _FILES[split]
    img_path, lbl_path = directory / img_name, directory / lbl_name
    missing = [str(p) for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise FashionMNISTNotFoundError(
            f"Fashion-MNIST {split} files not found: {', '.join(missing)}. "
            "Install them with `apt-get update && apt-get install -y dataset-fashion-mnist` "
            "(files land in /usr/share/datasets/fashion-mnist/) or point the environment "
            "variable DFMPC_FASHION_MNIST_DIR at a directory holding the IDX .gz files."
        )
    raw_images = _read_idx(img_path, 16).reshape(-1, 1, 28, 28)
    raw_labels = _read_idx(lbl_path, 8)
    if raw_images.shape[0] != raw_labels.shape[0]:
        raise ValueError(
            f"{img_path} holds {raw_images.shape[0]} images but {lbl_path} holds "
            f"{raw_labels.shape[0]} labels"
        )
    images = torch.from_numpy(raw_images.astype(np.float32) / 255.0)
    images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    labels = torch.from_numpy(raw_labels.astype(np.int64))
    _CACHE[key] = (images, labels)
    return images, labels


def augment_batch(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip (p=0.5) and pad-2 random 28x28 crop of a ``(B, C, H, W)`` batch,
    done with tensor ops. Padding uses the normalised value of a black pixel."""
    b, c, h, w = images.shape
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.where(flip.view(b, 1, 1, 1), images.flip(-1), images)
    pad = 2
    background = (0.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    padded = torch.nn.functional.pad(out, (pad, pad, pad, pad), value=background)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    cropped = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, c, h, w)
    return cropped.gather(3, cols)


def augment_collate(
    batch: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn``: stack ``(image, label)`` samples and augment the whole batch
    at once with :func:`augment_batch`."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.stack([b[1] for b in batch])
    return augment_batch(images), labels


def fashion_mnist_loaders(
    batch_size: int = 128,
    num_workers: int = 0,
    augment: bool = True,
    seed: int | None = 0,
    test_batch_size: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and test DataLoaders over the full splits.

    The train loader shuffles (seeded by ``seed`` if given) and, when ``augment`` is set,
    applies random horizontal flip + pad-2 random crop per batch with tensor ops. The test
    loader is unshuffled and unaugmented.
    """
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    train = DataLoader(
        TensorDataset(train_x, train_y),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        generator=generator,
        collate_fn=augment_collate if augment else None,
    )
    test = DataLoader(
        TensorDataset(test_x, test_y),
        batch_size=test_batch_size or max(batch_size, 1000),
        shuffle=False,
        num_workers=num_workers,
    )
    return train, test


def calibration_subset(n: int = 2000, seed: int = 0) -> torch.Tensor:
    """``n`` training images (no labels, no augmentation) drawn without replacement with a
    fixed seed, shape ``(n, 1, 28, 28)``; for data-aware reference methods only."""
    images, _ = load_fashion_mnist("train")
    if not 0 < n <= images.shape[0]:
        raise ValueError(f"n must be in 1..{images.shape[0]}, got {n}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    index = torch.randperm(images.shape[0], generator=generator)[:n]
    return images[index].clone()


def machine_sentences(n: int) -> list[str]:
    """Up to ``n`` English sentences (20-300 characters) cut from the license texts every Debian
    system carries (``/usr/share/common-licenses``, ``/usr/share/doc/*/copyright``), in a fixed
    order: text that is on the machine, for checking sentence embeddings offline."""
    import glob

    out: list[str] = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(glob.glob("/usr/share/doc/*/copyright")):
        try:
            text = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError):
            continue
        out += [s.strip() for s in text.replace("\n", " ").split(". ") if 20 < len(s.strip()) < 300]
        if len(out) >= n:
            break
    return out[:n]
