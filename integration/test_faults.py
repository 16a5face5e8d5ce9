"""The tracking server dies during a run, or is dead before it: training finishes, nothing is lost.

Both tests use the session's ``doomed_server``; the first kills it mid-run, the second needs it
dead (and kills it itself when run alone).
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from pathlib import Path

import lightning as L
import mlflow.pytorch
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from tinymodels import TinyLit, make_loader

from dfmpc_fx.callbacks import DFMPCCallback, TrackingSpec

pytestmark = pytest.mark.slow

EXPECTED_FILES = ("report.json", "report.md", "layers.png", "model.ts", "params.json", "metrics.json",
                  "fp32_state_dict.pt", "compressed_state_dict.pt", "mlflow_model/MLmodel", "TRACKING_FAILED.txt")


class KillServerAtTrainEnd(Callback):
    """Placed before DFMPCCallback: checks the run is live on the server, then kills the server."""

    def __init__(self, server, logger: MLFlowLogger) -> None:
        self.server, self.logger = server, logger
        self.metrics_before_kill: dict = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self.metrics_before_kill = MlflowClient(self.server.uri).get_run(self.logger.run_id).data.metrics
        self.server.kill()


def _trainer(tmp_path: Path, callbacks: list, logger=False) -> L.Trainer:
    return L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=str(tmp_path),
    )


def _check_local_copy(cb: DFMPCCallback, model: TinyLit, caught: list, uri: str) -> None:
    messages = [str(w.message) for w in caught if "DFMPCCallback" in str(w.message)]
    assert len(messages) == 1 and str(cb.local_path) in messages[0], messages
    folder = cb.local_path
    assert folder.parent == (Path.cwd() / "dfmpc_runs").resolve()
    for name in EXPECTED_FILES:
        assert (folder / name).exists(), name
    assert uri in (folder / "TRACKING_FAILED.txt").read_text()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"fp32/val_acc", "dfmpc/val_acc", "compression_ratio"} <= set(metrics)
    params = json.loads((folder / "params.json").read_text())
    assert params["dfmpc.low_bits"] == "2"
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.load(str(folder / "model.ts"))(x), expected)
        torch.testing.assert_close(mlflow.pytorch.load_model(str(folder / "mlflow_model"))(x), expected)
    # the trained float network is kept too
    fp32 = torch.load(folder / "fp32_state_dict.pt")
    fresh = TinyLit()
    fresh.net.load_state_dict(fp32)


def test_server_killed_during_the_run(doomed_server, tmp_path: Path) -> None:
    assert doomed_server.healthy(), "run this test before test_server_down_before_the_run"
    logger = MLFlowLogger(experiment_name=f"faults-{uuid.uuid4().hex[:6]}", tracking_uri=doomed_server.uri)
    killer = KillServerAtTrainEnd(doomed_server, logger)
    cb = DFMPCCallback(module_attr="net", tracking=TrackingSpec(http_timeout=3))
    model = TinyLit()
    trainer = _trainer(tmp_path, [killer, cb], logger=logger)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, make_loader(), make_loader(64, seed=1))  # must not raise
    elapsed = time.perf_counter() - start
    assert "train_loss" in killer.metrics_before_kill  # the run was live on the server until the kill
    assert not doomed_server.healthy()
    assert cb.compressed and cb.tracking_error is not None
    assert logger not in trainer.loggers  # detached so Lightning's finalize() does not crash the fit
    _check_local_copy(cb, model, caught, doomed_server.uri)
    assert elapsed < 180, f"a dead server must not stall the fit ({elapsed:.0f}s)"


def test_server_down_before_the_run(doomed_server, tmp_path: Path) -> None:
    doomed_server.kill()
    cb = DFMPCCallback(module_attr="net", tracking=TrackingSpec(tracking_uri=doomed_server.uri, http_timeout=3))
    model = TinyLit()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [cb]).fit(model, make_loader(), make_loader(64, seed=1))
    assert cb.compressed and cb.run_id is None
    _check_local_copy(cb, model, caught, doomed_server.uri)
    assert time.perf_counter() - start < 120
