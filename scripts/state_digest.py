"""Hash the compressed state dicts of the committed checkpoints under a few configurations.

A refactor of the transform must leave these digests unchanged: run this before and after and
diff the output (``python scripts/state_digest.py > before.txt``; add ``tv:resnet50`` for a
torchvision model with random weights).
"""
from __future__ import annotations

import hashlib
import sys
import warnings

import torch

import dfmpc_fx
from dfmpc_fx.examples.zoo import MODELS, load_pretrained  # noqa: E402

CONFIGS = {
    "mp26": {"low_bits": 2, "high_bits": 6},
    "mp36": {"low_bits": 3},
    "uniform3": {"low_bits": 3, "high_bits": 3, "default_bits": 3, "max_bits": 16},
    "plain": {"low_bits": 2, "high_bits": 6, "compensate": False},
    "paper": {"method": "paper"},
    "tb2.01": {"target_bits": 2.01},
    "tb2.5": {"target_bits": 2.5},
    "tb3": {"target_bits": 3.0},
    "tb4": {"target_bits": 4.0},
}


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _load(name: str) -> torch.nn.Module:
    """A committed checkpoint, or ``tv:<name>``: a torchvision model with seeded random weights
    (large layers, where the quantizers take their large-tensor paths)."""
    if name.startswith("tv:"):
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.get_model(name[3:], weights=None).eval()
    return load_pretrained(name)


def main(models: list[str]) -> None:
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    for name in models:
        model = _load(name)
        for tag, overrides in CONFIGS.items():
            q = dfmpc_fx.compress(model, **overrides)
            print(f"{name:20s} {tag:10s} {digest(q)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(MODELS))
