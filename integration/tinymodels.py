"""The tiny network, LightningModule and synthetic data of the integration tests and the DDP job
script (one copy, in ``dfmpc_fx.examples.tiny``), and an independent state digest."""

from __future__ import annotations

from torch import nn

from dfmpc_fx.examples.tiny import TinyLit, TinyNet, make_loader  # noqa: F401 - re-exported for the tests and ddp_job


def state_digest(module: nn.Module) -> str:
    """An independent SHA-256 of a module's state dict (names and raw bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
