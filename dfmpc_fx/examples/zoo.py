"""Small BatchNorm networks for 1x28x28 inputs (Fashion-MNIST), 10 classes.

Every model is torch.fx-traceable: no data-dependent control flow, only structural Python
branches fixed at construction. ReLUs are separate ``nn.ReLU`` modules (one per site) so the
graph shows conv -> BN -> ReLU -> conv chains plainly.

Checkpoints trained by ``recipes/train.py`` live in ``checkpoints/<name>.pt`` (bare state
dict, float32) next to ``checkpoints/<name>.json`` (accuracy, epochs, command).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointNotFoundError",
    "MODELS",
    "BasicBlock",
    "InvertedResidual",
    "CifarResNet",
    "ResNet18FMNIST",
    "VGGSmall",
    "MobileNetV2FMNIST",
    "build_model",
    "default_checkpoint_dir",
    "load_pretrained",
    "mobilenetv2_fmnist",
    "resnet18_fmnist",
    "resnet20",
    "resnet56",
    "vgg_small",
]

NUM_CLASSES = 10
IN_CHANNELS = 1

CHECKPOINT_DIR: Path = Path(__file__).resolve().parents[2] / "checkpoints"


class CheckpointNotFoundError(FileNotFoundError):
    """A pretrained checkpoint is not on disk; the message names the recipe that makes it."""


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU. The shortcut is the identity, or a
    1x1 conv + BN projection when the stride or the width changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet (depth 6n+2, widths 16-32-64) with projection shortcuts,
    adapted to 1-channel 28x28 inputs (28 -> 28 -> 14 -> 7, global average pool)."""

    def __init__(self, depth: int, num_classes: int = NUM_CLASSES, in_channels: int = IN_CHANNELS) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(16, 16, n, 1)
        self.layer2 = _make_stage(16, 32, n, 2)
        self.layer3 = _make_stage(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class ResNet18FMNIST(nn.Module):
    """torchvision-style ResNet-18 (BasicBlock, [2, 2, 2, 2]) for 1x28x28: 3x3 stride-1 stem,
    no max-pool, base width 32 (32-64-128-256), projection shortcuts."""

    def __init__(
        self,
        width: int = 32,
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = NUM_CLASSES,
        in_channels: int = IN_CHANNELS,
    ) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(w, w, layers[0], 1)
        self.layer2 = _make_stage(w, 2 * w, layers[1], 2)
        self.layer3 = _make_stage(2 * w, 4 * w, layers[2], 2)
        self.layer4 = _make_stage(4 * w, 8 * w, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


VGG_SMALL_CFG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, 128, "M")


class VGGSmall(nn.Module):
    """VGG-16-style plain chain of conv3x3-BN-ReLU with max-pools, scaled down for
    Fashion-MNIST: 32-32-M-64-64-M-128-128-128-M (28 -> 14 -> 7 -> 3), flatten, linear."""

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG_SMALL_CFG,
        num_classes: int = NUM_CLASSES,
        in_channels: int = IN_CHANNELS,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, 28
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(c * size * size, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6 (skipped when t=1), 3x3 depthwise-BN-ReLU6,
    1x1 linear projection-BN; residual add when stride 1 and widths match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:  # fixed at construction, not data-dependent
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s), as in Sandler et al. but
# narrower and shorter for 28x28 inputs (28 -> 14 -> 7 -> 4).
MOBILENETV2_FMNIST_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 3, 2),
    (6, 96, 2, 1),
)


class MobileNetV2FMNIST(nn.Module):
    """Small MobileNetV2 for 1x28x28 with ReLU6 as in the original paper. ReLU6 is not
    positively homogeneous, so DF-MPC pair search is expected to refuse its pairs."""

    def __init__(
        self,
        cfg: Sequence[tuple[int, int, int, int]] = MOBILENETV2_FMNIST_CFG,
        stem: int = 16,
        last: int = 256,
        num_classes: int = NUM_CLASSES,
        in_channels: int = IN_CHANNELS,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6())
        ]
        c = stem
        for t, out, n, s in cfg:
            for i in range(n):
                features.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        features.append(nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def resnet20() -> CifarResNet:
    """CIFAR-style ResNet-20 (0.27M parameters) for 1x28x28."""
    return CifarResNet(20)


def resnet56() -> CifarResNet:
    """CIFAR-style ResNet-56 (0.86M parameters) for 1x28x28."""
    return CifarResNet(56)


def vgg_small() -> VGGSmall:
    """Scaled-down VGG-16-style plain chain (32-32-M-64-64-M-128-128-128-M, linear)."""
    return VGGSmall()


def resnet18_fmnist() -> ResNet18FMNIST:
    """ResNet-18 (BasicBlock) with base width 32, 3x3 stride-1 stem, no max-pool."""
    return ResNet18FMNIST()


def mobilenetv2_fmnist() -> MobileNetV2FMNIST:
    """Small MobileNetV2 (inverted residuals, depthwise convs, ReLU6)."""
    return MobileNetV2FMNIST()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg_small": vgg_small,
    "resnet18_fmnist": resnet18_fmnist,
    "mobilenetv2_fmnist": mobilenetv2_fmnist,
}


def build_model(name: str) -> nn.Module:
    """A freshly initialised model from :data:`MODELS` (train mode)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return factory()


def default_checkpoint_dir() -> Path:
    """``$DFMPC_CHECKPOINT_DIR`` if set, else the repository's ``checkpoints/``."""
    env = os.environ.get("DFMPC_CHECKPOINT_DIR")
    return Path(env) if env else CHECKPOINT_DIR


def load_pretrained(name: str, checkpoint_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """Build ``name`` and load ``<checkpoint_dir>/<name>.pt`` (default: the repository's
    ``checkpoints/``, or ``$DFMPC_CHECKPOINT_DIR``). Returns the model in eval mode.

    Raises:
        ValueError: unknown model name.
        CheckpointNotFoundError: the file is missing; the message gives the recipe command.
    """
    model = build_model(name)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir()
    path = directory / f"{name}.pt"
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"no checkpoint for {name!r} at {path}. Train it with "
            f"`python recipes/train.py --model {name} --out {directory}` "
            "(see recipes/README.md for the epochs used)."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
