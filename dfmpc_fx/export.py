"""Export of compressed models to formats that load without dfmpc_fx."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from .errors import DFMPCError

PathLike = Union[str, os.PathLike]


class ExportError(DFMPCError, RuntimeError):
    """The exported artifact could not be produced or does not match the model."""


def _as_tuple(example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _check_match(reference: torch.Tensor, got: torch.Tensor, atol: float, what: str) -> float:
    if not isinstance(reference, torch.Tensor) or not isinstance(got, torch.Tensor):
        return 0.0
    diff = float((reference - got).abs().max()) if reference.numel() else 0.0
    if not diff <= atol:
        raise ExportError(f"{what} output differs from the model by {diff:.3g} (> {atol:g})")
    return diff


def export_torchscript(
    qmodel: nn.Module,
    path: PathLike,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    atol: float = 1e-5,
) -> Path:
    """Write ``qmodel`` as TorchScript to ``path`` and check the file reproduces it.

    Scripting is tried first (keeps batch size and other shapes dynamic); if the code does not
    script, tracing with ``example_inputs`` is used, with a warning. The saved file is loaded
    back and compared on ``example_inputs`` (max abs diff <= ``atol``) before returning.
    """
    inputs = _as_tuple(example_inputs)
    model = qmodel.eval()
    with torch.no_grad():
        reference = model(*inputs)
        try:
            scripted = torch.jit.script(model)
        except Exception as exc:  # scripting limits: fall back to tracing
            warnings.warn(f"torch.jit.script failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          "exporting with torch.jit.trace, whose shapes are fixed by example_inputs")
            try:
                scripted = torch.jit.trace(model, inputs)
            except Exception as exc2:
                raise ExportError(f"neither torch.jit.script nor torch.jit.trace could export the model: {exc2}") from exc2
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
        _check_match(reference, loaded(*inputs), atol, "TorchScript")
    return path
