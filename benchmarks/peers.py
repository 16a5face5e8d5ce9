"""Peer tools' data-free pre-processing, followed by dfmpc-fx's identical bit assignment and
quantizer: ``compress(preprocessed_model, cfg with compensate=False)``.

- AIMET (``aimet-torch``): ``aimet_torch.cross_layer_equalization.equalize_model`` (BatchNorm
  fold, cross-layer scaling, high-bias fold), in place, with a 1x1x28x28 dummy input.
- Brevitas: ``brevitas.graph.quantize.preprocess_for_quantize`` (its fx tracer, BatchNorm
  merge, graph equalization with ``equalize_iters`` iterations), returning a GraphModule.

Each import is guarded: a peer that is not installed (or fails to import, or fails on the model)
is reported as skipped with the reason; it is never silently dropped. Install both with the
``peers`` extra (see BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import importlib
import time
import traceback
from typing import Any

import torch
from torch import nn

import dfmpc_fx

BREVITAS_EQUALIZE_ITERS = 20
DUMMY_SHAPE = (1, 1, 28, 28)
_PEERS = {"aimet": ("aimet_torch", "aimet-torch"), "brevitas": ("brevitas", "brevitas")}


def peer_version(peer: str) -> tuple[str | None, str | None]:
    """(version, None) if the peer imports, else (None, reason)."""
    module, dist = _PEERS[peer]
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything
        return None, f"{dist} not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    try:
        from importlib.metadata import version

        return version(dist), None
    except Exception:  # noqa: BLE001
        return "unknown", None


def describe() -> str:
    parts = []
    for peer in _PEERS:
        v, why = peer_version(peer)
        parts.append(f"{_PEERS[peer][1]} {v}" if v else f"{peer} skipped: {why}")
    return "; ".join(parts)


def _aimet(model: nn.Module) -> tuple[nn.Module, str]:
    from aimet_torch.cross_layer_equalization import equalize_model

    m = copy.deepcopy(model).eval()
    equalize_model(m, dummy_input=torch.zeros(DUMMY_SHAPE))
    return m, "equalize_model(model, dummy_input=zeros(1,1,28,28))"


def _brevitas(model: nn.Module) -> tuple[nn.Module, str]:
    from brevitas.graph.quantize import preprocess_for_quantize

    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        m = preprocess_for_quantize(m, equalize_iters=BREVITAS_EQUALIZE_ITERS)
    return m.eval(), f"preprocess_for_quantize(model, equalize_iters={BREVITAS_EQUALIZE_ITERS})"


def run_peer(peer: str, model: nn.Module, cfg: dfmpc_fx.DFMPCConfig) -> dict[str, Any]:
    """Pre-process ``model`` with ``peer``, then ``compress`` it with ``cfg`` (compensate=False).
    Returns {"model", "preprocess_seconds", "detail"} or {"skipped": True, "reason"}."""
    v, why = peer_version(peer)
    if v is None:
        return {"skipped": True, "reason": why}
    fn = {"aimet": _aimet, "brevitas": _brevitas}[peer]
    t0 = time.perf_counter()
    try:
        pre, detail = fn(model)
    except Exception as exc:  # noqa: BLE001 - a peer failing on a model is a result, reported
        tb = traceback.format_exc().strip().splitlines()[-1]
        return {"skipped": True, "reason": f"{_PEERS[peer][1]} {v} failed: {tb[:200]}"}
    pre_s = time.perf_counter() - t0
    if cfg.compensate:
        raise ValueError("peer rows compress with compensate=False")
    try:
        q = dfmpc_fx.compress(pre, cfg)
    except Exception as exc:  # noqa: BLE001
        return {"skipped": True, "reason": f"compress after {peer} failed: {type(exc).__name__}: {exc}"[:240]}
    return {"model": q, "preprocess_seconds": pre_s, "detail": f"{_PEERS[peer][1]} {v}: {detail}"}
