"""Training helpers: a Lightning classifier, a Fashion-MNIST DataModule, and a plain-torch
accuracy helper.

``evaluate_accuracy`` needs only torch; ``LitClassifier`` and ``FashionMNISTDataModule``
need ``lightning`` (imported here at module level, so import this module only where
lightning is wanted).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dfmpc_fx.examples.data import augment_collate, load_fashion_mnist

__all__ = ["FashionMNISTDataModule", "LitClassifier", "evaluate_accuracy"]


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Top-1 accuracy in percent of ``model`` on ``(images, labels)``.

    The model is put in eval mode for the evaluation and its previous mode is restored.
    Batches are moved to the device of the model's first parameter or buffer (CPU if none).
    """
    was_training = model.training
    model.eval()
    tensors = list(model.parameters()) or list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    correct = 0
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / images.shape[0]


class LitClassifier(L.LightningModule):
    """Wraps a classification network as ``self.net``; ``forward(x) = self.net(x)``.

    Cross-entropy loss; SGD (nesterov, momentum 0.9, weight decay 5e-4) with a one-cycle
    schedule stepped per batch (peak ``max_lr`` 0.2). Logs ``train_loss``, ``val_loss``,
    ``val_acc`` and ``test_acc`` (top-1 in percent, argmax, no torchmetrics).
    """

    def __init__(
        self,
        net: nn.Module,
        model_name: str = "model",
        max_lr: float = 0.2,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = 100.0 * (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{prefix}_loss", loss, on_epoch=True, prog_bar=prefix == "val")
        self.log(f"{prefix}_acc", acc, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hp.max_lr,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            nesterov=hp.nesterov,
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=hp.max_lr,
            total_steps=int(self.trainer.estimated_stepping_batches),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST from the Debian IDX files (see :mod:`dfmpc_fx.examples.data`).

    Training batches get random horizontal flip + pad-2 random crop. With
    ``val_split="test"`` (the default) validation uses the 10k test set: Fashion-MNIST has
    no official validation split, and with a fixed recipe (no early stopping, no model
    selection on ``val_acc``) this is common practice for this benchmark; ``val_acc`` is then
    just a progress readout. ``val_split="holdout"`` instead holds out the last 5,000
    training images for validation and trains on the first 55,000.
    """

    def __init__(
        self, batch_size: int = 128, num_workers: int = 0, val_split: str = "test", seed: int = 0
    ) -> None:
        super().__init__()
        if val_split not in ("test", "holdout"):
            raise ValueError(f"val_split must be 'test' or 'holdout', got {val_split!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.seed = seed
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        train_x, train_y = load_fashion_mnist("train")
        test_x, test_y = load_fashion_mnist("test")
        if self.val_split == "holdout":
            self.train_set = TensorDataset(train_x[:55000], train_y[:55000])
            self.val_set = TensorDataset(train_x[55000:], train_y[55000:])
        else:
            self.train_set = TensorDataset(train_x, train_y)
            self.val_set = TensorDataset(test_x, test_y)
        self.test_set = TensorDataset(test_x, test_y)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=generator,
            collate_fn=augment_collate,
        )

    def _eval_loader(self, dataset: TensorDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=1000, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
