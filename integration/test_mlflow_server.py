"""A real Trainer.fit with DFMPCCallback against a real MLflow tracking server over HTTP."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import lightning as L
import mlflow
import mlflow.pytorch
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from tinymodels import TinyLit, make_loader

import dfmpc_fx
from dfmpc_fx import DFMPCConfig
from dfmpc_fx.callbacks import DFMPCCallback, TrackingSpec

pytestmark = pytest.mark.slow


def fit(tmp_path: Path, callback: DFMPCCallback, logger=False, epochs: int = 1) -> TinyLit:
    model = TinyLit()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, make_loader(), make_loader(64, seed=1))
    return model


def test_fit_logs_params_metrics_artifacts_and_model_in_the_loggers_run(mlflow_server, tmp_path: Path) -> None:
    experiment = f"it-logger-{uuid.uuid4().hex[:8]}"
    logger = MLFlowLogger(experiment_name=experiment, tracking_uri=mlflow_server.uri, run_name="fit+dfmpc")
    cb = DFMPCCallback(DFMPCConfig(low_bits=2, high_bits=6), module_attr="net")
    model = fit(tmp_path, cb, logger=logger, epochs=2)
    assert cb.tracking_error is None and cb.local_path is None
    assert cb.run_id == logger.run_id

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "the callback must reuse the logger's run"
    run = client.get_run(logger.run_id)
    params, metrics = run.data.params, run.data.metrics

    # params: the whole config, the number of pairs, bits per layer
    config = dfmpc_fx.DFMPCConfig(low_bits=2, high_bits=6).to_dict()
    for key in config:
        assert f"dfmpc.{key}" in params
    assert params["dfmpc.low_bits"] == "2" and params["dfmpc.high_bits"] == "6"
    assert int(params["dfmpc.num_pairs"]) == cb.report.num_pairs >= 1
    for layer in cb.report.layers:
        assert params[f"bits.{layer.name}"] == ("float" if layer.bits is None else str(layer.bits))
    # metrics: before/after, sizes, ratio, per-layer error, time; and the logger's own training metrics
    for key in ("fp32/val_acc", "dfmpc/val_acc", "fp32/val_loss", "dfmpc/val_loss", "size_mb/fp32",
                "size_mb/dfmpc", "compression_ratio", "compress_seconds", "train_loss", "val_acc"):
        assert key in metrics, key
    assert metrics["size_mb/fp32"] > metrics["size_mb/dfmpc"] > 0
    assert metrics["compression_ratio"] == pytest.approx(cb.report.compression_ratio)
    assert metrics["dfmpc/val_acc"] == pytest.approx(cb.metrics["dfmpc/val_acc"])
    for layer in cb.report.layers:
        assert f"weight_rel_error/{layer.name}" in metrics
    # the logger's val_acc history holds only the 2 epochs (the callback's evaluations are separate)
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 2

    # artifacts
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "dfmpc")}
    assert {"dfmpc/report.json", "dfmpc/report.md", "dfmpc/layers.png", "dfmpc/model.ts"} <= paths
    dl = tmp_path / "downloaded"
    dl.mkdir()
    local = Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="dfmpc", dst_path=str(dl), tracking_uri=mlflow_server.uri
    ))
    report = json.loads((local / "report.json").read_text())
    assert report["config"]["low_bits"] == 2 and report["num_pairs"] == cb.report.num_pairs
    assert "|" in (local / "report.md").read_text()
    assert (local / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the TorchScript artifact matches the in-memory compressed network
    x = torch.randn(7, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.load(str(local / "model.ts"))(x), expected)

    # the model logged with mlflow.pytorch.log_model loads back, by model URI and by run URI
    mlflow.set_tracking_uri(mlflow_server.uri)
    try:
        for uri in (cb.model_uri, f"runs:/{run.info.run_id}/model"):
            dst = tmp_path / uri.replace(":", "_").replace("/", "_")
            dst.mkdir()
            loaded = mlflow.pytorch.load_model(uri, dst_path=str(dst))
            with torch.no_grad():
                torch.testing.assert_close(loaded.eval()(x), expected)
    finally:
        mlflow.set_tracking_uri(None)


def test_without_logger_the_callback_starts_and_finishes_its_own_run(
    mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = f"it-own-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # no tracking_uri argument: the env var
    cb = DFMPCCallback(module_attr="net", tracking=TrackingSpec(experiment_name=experiment, run_name="own",
                                                                tags={"team": "tests"}, log_model=False, keep_local=True))
    fit(tmp_path, cb)
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [cb.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "own"
    assert run.data.tags["team"] == "tests" and run.data.tags["dfmpc.stage"] == "fit"
    assert {"fp32/val_acc", "dfmpc/val_acc"} <= set(run.data.metrics)
    assert not (tmp_path / "mlflow.db").exists()  # the env var won over the sqlite default
    # keep_local: the same files are also on disk
    assert (cb.local_path / "model.ts").is_file() and not (cb.local_path / "TRACKING_FAILED.txt").exists()
