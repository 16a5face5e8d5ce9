"""``dfmpc_fx.save`` / ``dfmpc_fx.load``: the compressed model in one small file, round trip exact.

Format (version 1)
------------------
One file written by ``torch.save`` (a zip archive) holding a dict::

    {"format": "dfmpc_fx.saved_model", "version": 1, "torch_version": ..., "dfmpc_fx_version": ...,
     "packed": <was the saved model packed>, "model": <packed GraphModule>, "meta": {report, artifacts}}

The model is stored *packed* (:func:`dfmpc_fx.pack_model`): quantized weights as bit-packed
uint8 codes plus scales, so the file is about the theoretical compressed size, not the float
size. :func:`load` unpacks it back to the ``Quant*`` (fake-quant) modules when the saved model
was not packed; packing is exact, so the loaded model has the same state dict, the same report
(``get_report`` works on it) and bit-identical outputs.

Why ``torch.save`` and not safetensors
--------------------------------------
A compressed model is a ``torch.fx.GraphModule``: generated Python code plus an arbitrary
module tree (user leaf modules, torchvision blocks, any ``call_function`` target). Rebuilding
that from tensors alone needs the module classes and the graph, which only pickle (what
``torch.save`` of a module uses) restores in general. safetensors would keep the tensors safe
but the structure would still need pickle or executed code, so it adds a second file and no
safety. The consequence, stated plainly: :func:`load` calls ``torch.load(weights_only=False)``,
which unpickles and executes code from the file. **Load only files you trust.** To ship a
model to untrusted consumers or to runtimes without dfmpc_fx, use the exported artifacts
instead: :func:`dfmpc_fx.export_torchscript` (``packed=True``), :func:`dfmpc_fx.export_program`
(``.pt2``) or :func:`dfmpc_fx.export_onnx`. Loading needs dfmpc_fx (the packed module classes)
and every custom module class of the model importable, as for any pickled module.

The file is byte-identical for the same model, whatever its name (torch's random serialization
id is replaced by a content digest).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import DFMPCError
from .export import make_zip_deterministic
from .packed import PackError, is_packed, pack_model, unpack_model
from ..transform.report import REPORT_KEY

__all__ = ["save", "load", "SerializationError", "FORMAT", "FORMAT_VERSION"]

PathLike = Union[str, os.PathLike]
FORMAT = "dfmpc_fx.saved_model"
FORMAT_VERSION = 1


class SerializationError(DFMPCError, RuntimeError):
    """The model could not be saved, or the file is not a dfmpc_fx saved model."""


def save(qmodel: nn.Module, path: PathLike) -> Path:
    """Save a compressed model (the result of :func:`dfmpc_fx.compress`, packed or not) to ``path``.

    Quantized layers are stored bit-packed; the compression report travels with the model.
    Returns the path. Raises :class:`SerializationError` if a layer cannot be packed exactly
    (its weight was changed after compress) or the model does not pickle.
    """
    from .._version import __version__

    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(qmodel).__name__}")
    was_packed = is_packed(qmodel)
    try:
        stored = pack_model(qmodel)  # a copy (also of an already packed model): its meta is ours to clear
    except PackError as exc:
        raise SerializationError(f"cannot store the model packed: {exc}") from exc
    if isinstance(getattr(stored, "meta", None), dict):
        stored.meta = {}  # unpickling a GraphModule drops meta anyway; the report travels in the payload
    meta = getattr(qmodel, "meta", None)
    # the report travels; the record of earlier exports (local paths) does not
    kept = {k: meta[k] for k in (REPORT_KEY,) if isinstance(meta, dict) and k in meta}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        "dfmpc_fx_version": __version__,
        "packed": was_packed,
        "model": stored,
        "meta": kept,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as f:  # a file object: the archive's inner folder does not depend on the name
            torch.save(payload, f)
    except Exception as exc:
        raise SerializationError(f"torch.save could not pickle {type(qmodel).__name__}: {type(exc).__name__}: {exc}") from exc
    make_zip_deterministic(path)
    return path


def load(path: PathLike, *, packed: Optional[bool] = None, map_location: Any = "cpu") -> nn.Module:
    """Load a model written by :func:`save`.

    ``packed``: ``None`` returns the model in the form it was saved (fake-quant ``Quant*``
    modules, or packed); ``True`` returns the packed form, ``False`` the fake-quant form.
    The report is restored (``dfmpc_fx.get_report`` works on the result).

    Security: this unpickles the file (``torch.load(weights_only=False)``); load only files you
    trust. See the module docstring.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        payload = torch.load(str(path), map_location=map_location, weights_only=False)
    except Exception as exc:
        raise SerializationError(f"{path} could not be read by torch.load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SerializationError(f"{path} is not a dfmpc_fx saved model (write it with dfmpc_fx.save)")
    if int(payload.get("version", 0)) > FORMAT_VERSION:
        raise SerializationError(
            f"{path} has format version {payload['version']}; this dfmpc_fx reads up to {FORMAT_VERSION}: upgrade dfmpc_fx"
        )
    model = payload["model"]
    want_packed = payload.get("packed", False) if packed is None else packed
    if not want_packed:
        model = unpack_model(model)
    elif not is_packed(model):  # pragma: no cover - save always stores packed
        model = pack_model(model)
    kept = payload.get("meta") or {}
    if kept:
        meta = getattr(model, "meta", None)
        if not isinstance(meta, dict):
            meta = {}
            model.meta = meta
        for key, value in kept.items():
            meta[key] = value
    return model
