"""MLflow tracking for compression runs, with a local fallback that never loses results.

Used by :class:`dfmpc_fx.callbacks.DFMPCCallback` and by ``dfmpc compress --mlflow-uri``.
The flow is always the same:

1. :class:`RunBundle` writes everything a run produces into one local folder first
   (params/metrics as JSON, the report as JSON and Markdown, a per-layer PNG plot, the
   TorchScript file, state dicts).
2. :func:`upload_bundle` sends that folder to MLflow (params, metrics, artifacts, and the
   model through :func:`mlflow.pytorch.log_model`).
3. If the tracking server is unreachable or fails half-way, :meth:`RunBundle.persist` moves
   the folder to ``dfmpc_runs/<timestamp>/`` (adding an MLflow-format model directory that
   :func:`mlflow.pytorch.load_model` can open), and the caller warns with that path and
   goes on.

HTTP calls to a tracking server are made with short timeouts and no retries (see
:func:`short_http_timeouts`) so that a dead server costs seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_LOCAL_DIR",
    "RunBundle",
    "TrackingTarget",
    "TrackingUnavailable",
    "check_server",
    "default_tracking_uri",
    "mb",
    "plot_layers",
    "report_metrics",
    "report_params",
    "resolve_tracking_uri",
    "short_http_timeouts",
    "start_run",
    "target_from_logger",
    "upload_bundle",
]

DEFAULT_EXPERIMENT = "dfmpc"
DEFAULT_LOCAL_DIR = "dfmpc_runs"
#: default seconds for one HTTP request to a tracking server on the tracking path
DEFAULT_HTTP_TIMEOUT = 10.0
# files of a bundle that are uploaded as run artifacts (the rest stays local)
UPLOADED_FILES = ("report.json", "report.md", "layers.png", "model.ts", "params.json", "metrics.json")


class TrackingUnavailable(RuntimeError):
    """The tracking server could not be reached or refused a request."""


# --------------------------------------------------------------------------- URIs


def default_tracking_uri(cwd: str | os.PathLike[str] | None = None) -> str:
    """The embedded default store: ``sqlite:///<cwd>/mlflow.db`` as an absolute path."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    return "sqlite:///" + (base.resolve() / "mlflow.db").as_posix()


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`.

    MLflow 3 refuses the old ``file:`` / plain-path store; such URIs are rejected here with
    a clear message instead of failing later.
    """
    resolved = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    lowered = resolved.lower()
    if lowered.startswith("file:") or "://" not in resolved and not lowered.startswith("databricks"):
        raise ValueError(
            f"tracking URI {resolved!r} names a file store, which MLflow 3 refuses; use "
            "'sqlite:///path/to/mlflow.db' for a local store or 'http://host:port' for a server"
        )
    return resolved


def is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


@contextlib.contextmanager
def short_http_timeouts(timeout: float = DEFAULT_HTTP_TIMEOUT, retries: int = 0) -> Iterator[None]:
    """Temporarily make MLflow's HTTP client fail fast (no retries, short timeout).

    Values the user set in the environment are kept; only unset variables are filled in and
    removed again afterwards. MLflow reads these variables on every request.
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(retries)),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, math.ceil(timeout)))),
    }
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def check_server(uri: str, timeout: float = 3.0) -> None:
    """Raise :class:`TrackingUnavailable` unless an HTTP tracking server answers ``/health``.

    Non-HTTP URIs (sqlite, databricks, ...) are not checked here.
    """
    if not is_http(uri):
        return
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable ({exc.__class__.__name__}: {exc})") from exc
    if response.status_code != 200:
        raise TrackingUnavailable(f"MLflow tracking server {uri} answered {url} with HTTP {response.status_code}")


@contextlib.contextmanager
def _use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (used by ``mlflow.pytorch.log_model``) at ``uri`` for a while."""
    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri as use
    except ImportError:  # pragma: no cover - older/newer MLflow layouts
        use = None
    if use is not None:
        with use(uri):
            yield
        return
    previous = mlflow.get_tracking_uri()  # pragma: no cover
    mlflow.set_tracking_uri(uri)  # pragma: no cover
    try:  # pragma: no cover
        yield
    finally:  # pragma: no cover
        mlflow.set_tracking_uri(previous)


# --------------------------------------------------------------------------- runs


@dataclass
class TrackingTarget:
    """Where a bundle goes: a client, a run in it, and whether we created (and must end) it."""

    client: "MlflowClient"
    run_id: str
    tracking_uri: str
    owns_run: bool = False
    experiment_id: str | None = None

    def finish(self, status: str = "FINISHED") -> None:
        if self.owns_run:
            self.client.set_terminated(self.run_id, status)


def start_run(
    tracking_uri: str,
    experiment_name: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    artifact_location: str | None = None,
) -> TrackingTarget:
    """Create (or reuse) the experiment and start a new run through :class:`MlflowClient`."""
    from mlflow import MlflowClient

    check_server(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        experiment_id = client.create_experiment(experiment_name, artifact_location=artifact_location)
    elif experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
        experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    return TrackingTarget(client, run.info.run_id, tracking_uri, owns_run=True, experiment_id=experiment_id)


def logger_tracking_uri(logger: Any) -> str | None:
    """The tracking URI of a Lightning ``MLFlowLogger`` (it keeps it in a private field)."""
    uri = getattr(logger, "_tracking_uri", None)
    if uri:
        return str(uri)
    client = getattr(logger, "_mlflow_client", None)
    tracking_client = getattr(client, "_tracking_client", None)
    return getattr(tracking_client, "tracking_uri", None)


def target_from_logger(logger: Any) -> TrackingTarget:
    """The run of a Lightning ``MLFlowLogger`` (rank zero only: other ranks hold a dummy)."""
    uri = logger_tracking_uri(logger) or resolve_tracking_uri(None)
    check_server(uri)
    client = logger.experiment  # creates the experiment and run if the logger was never used
    return TrackingTarget(client, logger.run_id, uri, owns_run=False, experiment_id=logger.experiment_id)


# --------------------------------------------------------------------------- content


def mb(num_bytes: float) -> float:
    """Bytes to megabytes (10**6), rounded to 6 decimals."""
    return round(float(num_bytes) / 1e6, 6)


def _metric_key(name: str) -> str:
    # MLflow allows alphanumerics, _ - . / and spaces in keys
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def report_params(report: Any) -> dict[str, str]:
    """MLflow params of a compression report: every config field as ``dfmpc.<field>``, the
    number of pairs, and ``bits.<layer>`` for each weighted layer (``float`` if kept)."""
    params: dict[str, str] = {}
    for key, value in dict(report.config).items():
        params[f"dfmpc.{key}"] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    params["dfmpc.num_pairs"] = str(report.num_pairs)
    for layer in report.layers:
        params[_metric_key(f"bits.{layer.name}")] = "float" if layer.bits is None else str(layer.bits)
    return params


def report_metrics(report: Any) -> dict[str, float]:
    """MLflow metrics of a report: sizes in MB, ratio, compress time, per-layer weight error."""
    metrics: dict[str, float] = {
        "size_mb/fp32": mb(report.float_bytes),
        "size_mb/dfmpc": mb(report.compressed_bytes),
        "compression_ratio": float(report.compression_ratio),
        "compress_seconds": float(report.compress_seconds),
        "num_pairs": float(report.num_pairs),
    }
    # the theoretical compressed size (bits x weights / 8 + scales + float parameters) and the
    # size of the packed artifact on disk, once one was exported
    for key in ("theoretical_bytes", "artifact_bytes", "bits_per_weight"):
        value = getattr(report, key, None)
        if value is not None:
            metrics[key] = float(value)
    for layer in report.layers:
        err = layer.weight_rel_error
        if err is not None and math.isfinite(float(err)):
            metrics[_metric_key(f"weight_rel_error/{layer.name}")] = float(err)
    return metrics


def artifact_metrics(model: Any) -> dict[str, float]:
    """MLflow metrics of the artifacts exported from ``model`` (recorded in its ``meta`` by the
    exporters): ``artifact_bytes/<format>`` for each, and ``artifact_bytes`` for the packed one."""
    meta = getattr(model, "meta", None) or {}
    metrics = {f"artifact_bytes/{fmt}": float(record["bytes"])
               for fmt, record in (meta.get("dfmpc_artifacts") or {}).items()}
    packed_bytes = (meta.get("dfmpc_report") or {}).get("artifact_bytes")
    if packed_bytes is not None:
        metrics["artifact_bytes"] = float(packed_bytes)
    return metrics


_ROLE_COLOURS = {
    "low": "#d62728",
    "high": "#1f77b4",
    "first_last": "#9467bd",
    "default": "#7f7f7f",
    "float": "#2ca02c",
}


def plot_layers(report: Any, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Per-layer PNG: bit width (top) and relative weight error (bottom), coloured by role.

    Uses matplotlib's Agg canvas directly, so no GUI backend is touched and the global
    ``pyplot`` state is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layers = list(report.layers)
    n = max(len(layers), 1)
    fig = Figure(figsize=(max(6.0, 0.32 * n + 2.0), 6.0), dpi=100)
    FigureCanvasAgg(fig)
    ax_bits, ax_err = fig.subplots(2, 1, sharex=True)
    xs = list(range(len(layers)))
    colours = [_ROLE_COLOURS.get(getattr(layer, "role", "default"), "#7f7f7f") for layer in layers]
    bits = [float(layer.bits) if layer.bits is not None else 32.0 for layer in layers]
    errs = [
        float(layer.weight_rel_error)
        if layer.weight_rel_error is not None and math.isfinite(float(layer.weight_rel_error))
        else 0.0
        for layer in layers
    ]
    ax_bits.bar(xs, bits, color=colours)
    ax_bits.set_ylabel("bits (32 = float)")
    ax_err.bar(xs, errs, color=colours)
    ax_err.set_ylabel("relative weight error")
    ax_err.set_xticks(xs)
    ax_err.set_xticklabels([layer.name for layer in layers], rotation=90, fontsize=7)
    ax_bits.legend(
        handles=[Patch(color=c, label=r) for r, c in _ROLE_COLOURS.items()],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    ratio = getattr(report, "compression_ratio", None)
    heading = title or "DF-MPC per-layer summary"
    if ratio is not None:
        heading += f"  (compression x{float(ratio):.2f}, {report.num_pairs} pairs)"
    ax_bits.set_title(heading, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass
class RunBundle:
    """A local folder holding everything one compression run produced.

    Created in a temporary directory; :meth:`persist` moves it to a lasting place, and
    :meth:`discard` deletes it once it was uploaded.
    """

    path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dfmpc-bundle-")))
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    model: nn.Module | None = None  # the model handed to mlflow.pytorch.log_model / save_model
    persisted: bool = False

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: Any) -> Path:
        out = self.file(name)
        out.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")
        return out

    def write_text(self, name: str, text: str) -> Path:
        out = self.file(name)
        out.write_text(text)
        return out

    def save_state_dict(self, name: str, module: nn.Module) -> Path:
        out = self.file(name)
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, out)
        return out

    def add_report(self, report: Any) -> None:
        """Report JSON + Markdown + PNG plot, and the params/metrics derived from it."""
        self.write_json("report.json", report.to_dict())
        self.write_text("report.md", report.to_markdown())
        plot_layers(report, self.file("layers.png"))
        self.params.update(report_params(report))
        self.metrics.update(report_metrics(report))

    def flush(self) -> None:
        """(Re)write ``params.json`` and ``metrics.json`` from the in-memory dicts."""
        self.write_json("params.json", self.params)
        self.write_json("metrics.json", self.metrics)

    def save_mlflow_model(self, name: str = "mlflow_model") -> Path | None:
        """Write the model in MLflow's format, loadable with ``mlflow.pytorch.load_model(dir)``."""
        if self.model is None:
            return None
        import mlflow.pytorch

        out = self.file(name)
        if out.exists():
            shutil.rmtree(out)
        mlflow.pytorch.save_model(
            self.model, str(out), pip_requirements=_pip_requirements(), serialization_format="pickle"
        )
        return out

    def persist(self, local_dir: str | os.PathLike[str] = DEFAULT_LOCAL_DIR, reason: str | None = None) -> Path:
        """Move the bundle to ``<local_dir>/<timestamp>/`` and make it self-contained.

        Adds ``mlflow_model/`` (best effort) and, with ``reason``, ``TRACKING_FAILED.txt``.
        Returns the new path. Calling it twice returns the same path.
        """
        if self.persisted:
            return self.path
        self.flush()
        if reason:
            self.write_text("TRACKING_FAILED.txt", reason.rstrip() + "\n")
        try:
            self.save_mlflow_model()
        except Exception as exc:  # noqa: BLE001 - the rest of the bundle must still be kept
            self.write_text("mlflow_model_FAILED.txt", f"{exc.__class__.__name__}: {exc}\n")
        root = Path(local_dir)
        root.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = root / stamp
        suffix = 1
        while dest.exists():
            dest = root / f"{stamp}-{suffix}"
            suffix += 1
        shutil.move(str(self.path), str(dest))
        self.path = dest.resolve()
        self.persisted = True
        return self.path

    def discard(self) -> None:
        if not self.persisted:
            shutil.rmtree(self.path, ignore_errors=True)


def _pip_requirements() -> list[str]:
    # explicit requirements: skips MLflow's slow requirement inference (it reloads the model)
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        from importlib.metadata import version

        reqs.append(f"dfmpc-fx=={version('dfmpc-fx')}")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        reqs.append("dfmpc-fx")
    return reqs


def upload_bundle(
    target: TrackingTarget,
    bundle: RunBundle,
    artifact_dir: str = "dfmpc",
    model_name: str = "model",
    log_model: bool = True,
    step: int | None = None,
) -> dict[str, Any]:
    """Send a bundle to MLflow: params + metrics in batches, the files in :data:`UPLOADED_FILES`
    as artifacts under ``artifact_dir``, and ``bundle.model`` through
    :func:`mlflow.pytorch.log_model` (``name=model_name``, linked to the run).

    Returns ``{"run_id", "model_uri", "artifact_uri"}``. Any failure propagates: the caller
    decides to fall back to :meth:`RunBundle.persist`.
    """
    from mlflow.entities import Metric, Param

    client, run_id = target.client, target.run_id
    bundle.flush()
    now = int(time.time() * 1000)
    step_value = int(step or 0)
    params = [Param(k, str(v)[:6000]) for k, v in sorted(bundle.params.items())]
    metrics = [Metric(k, float(v), now, step_value) for k, v in sorted(bundle.metrics.items()) if math.isfinite(float(v))]
    client.log_batch(run_id, metrics=metrics, params=params)
    for name in UPLOADED_FILES:
        path = bundle.file(name)
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_dir)
    info: dict[str, Any] = {"run_id": run_id, "model_uri": None}
    if log_model and bundle.model is not None:
        import mlflow.pytorch

        # Create the LoggedModel in the run's experiment ourselves: without an active fluent
        # run, MLflow would put it in the default experiment, where `runs:/<run>/model` and
        # the UI of the run cannot find it.
        experiment_id = target.experiment_id or client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(
            experiment_id,
            name=model_name,
            source_run_id=run_id,
            params={k: v for k, v in bundle.params.items() if k.startswith("dfmpc.")},
            tags={"dfmpc.flavor": "pytorch"},
        )
        with _use_tracking_uri(target.tracking_uri):
            model_info = mlflow.pytorch.log_model(
                bundle.model,
                name=model_name,
                model_id=logged.model_id,
                run_id=run_id,
                pip_requirements=_pip_requirements(),
                serialization_format="pickle",
                step=step_value,
            )
        client.finalize_logged_model(logged.model_id, "READY")
        info["model_uri"] = model_info.model_uri
        info["runs_model_uri"] = f"runs:/{run_id}/{model_name}"
        client.set_tag(run_id, "dfmpc.model_uri", model_info.model_uri)
    info["artifact_uri"] = client.get_run(run_id).info.artifact_uri
    return info
