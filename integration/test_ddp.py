"""DDP on CPU (gloo, 2 processes): same compressed weights on every rank, one MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def test_ddp_two_cpu_processes(mlflow_server, tmp_path: Path) -> None:
    experiment = f"ddp-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "ddp_job.py"), "--uri", mlflow_server.uri, "--experiment", experiment,
         "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["pid"] != records[1]["pid"]
    # every rank ends with the same compressed weights
    assert records[0]["digest"] == records[1]["digest"]
    assert records[0]["callback_digest"] == records[1]["callback_digest"] is not None
    assert records[0]["quant_modules"] == records[1]["quant_modules"] and "conv2" in records[0]["quant_modules"]
    # same (synced) metrics on both ranks, but only rank 0 tracked
    assert records[0]["metrics"]["dfmpc/val_acc"] == records[1]["metrics"]["dfmpc/val_acc"]
    assert records[0]["run_id"] is not None and records[1]["run_id"] is None
    assert records[0]["local_path"] is None and records[1]["local_path"] is None
    assert "rank 1" not in proc.stderr or "differ" not in proc.stderr
    # MLflow holds one run, with the callback's values logged once
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [records[0]["run_id"]]
    run = runs[0]
    assert run.data.params["dfmpc.low_bits"] == "2"
    for key in ("fp32/val_acc", "dfmpc/val_acc", "compression_ratio"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "dfmpc")}
    assert "dfmpc/model.ts" in artifacts
    assert not (tmp_path / "dfmpc_runs").exists()
