"""A tiny conv network, its LightningModule and synthetic data: the one copy that the unit
tests, the integration tests and the DDP job use (a whole fit takes seconds on one CPU core)."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["TinyNet", "BranchyNet", "TinyLit", "make_loader"]


class TinyNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BranchyNet(TinyNet):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return super().forward(x)
        return super().forward(-x)


class TinyLit(L.LightningModule):
    """``TinyNet`` (or ``BranchyNet``) as ``self.net``; ``sync_dist`` for DDP metrics."""

    def __init__(self, branchy: bool = False, lr: float = 0.05, sync_dist: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = BranchyNet() if branchy else TinyNet()
        self.example_input_array = torch.zeros(1, 1, 8, 8)
        self.train_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.train_steps += 1
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _eval(self, batch, prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y), sync_dist=self.hparams.sync_dist)
        self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean(), sync_dist=self.hparams.sync_dist)

    def validation_step(self, batch, batch_idx):
        self._eval(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def make_loader(n: int = 128, seed: int = 0, batch_size: int = 32) -> DataLoader:
    """Synthetic 1x8x8 images whose 4 classes depend on two quadrant means."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)
