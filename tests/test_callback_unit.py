"""Unit tests of DFMPCCallback and dfmpc_fx.integrations.tracking without a tracking server.

Real Lightning Trainers on a tiny network and synthetic data (1-2 epochs, a few batches);
MLflow only through its embedded sqlite store. The tests with a real HTTP tracking server live
in ``integration/``.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

import dfmpc_fx
from dfmpc_fx.integrations import tracking
from dfmpc_fx.callbacks import (
    CHECKPOINT_KEY,
    DFMPCCallback,
    ExportSpec,
    TrackingSpec,
    load_compressed_checkpoint,
    restore_compressed,
)
from dfmpc_fx.examples.tiny import TinyLit, TinyNet, make_loader
from dfmpc_fx.integrations.lightning import DEPRECATED_KEYWORDS

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- fixtures


def make_trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    options = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def is_quant(module: nn.Module) -> bool:
    return isinstance(module, (dfmpc_fx.QuantConv2d, dfmpc_fx.QuantLinear))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_env_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(low_bits=1), "low_bits"),
        (dict(low_bits=5), "low_bits"),
        (dict(high_bits=9), "high_bits"),
        (dict(low_bits=4, high_bits=3), "high_bits"),  # old keywords (deprecated) still validated
        (dict(method="magic"), "method"),
        (dict(config=dfmpc_fx.DFMPCConfig(), low_bits=3), "either config"),
        (dict(config=2), "DFMPCConfig"),
        (dict(export=ExportSpec(), packed_export=False), "either export"),
        (dict(tracking=TrackingSpec(), run_name="x"), "either tracking"),
        (dict(export="torchscript"), "ExportSpec"),
        (dict(tracking="yes"), "TrackingSpec"),
        (dict(no_such_argument=1), "unexpected keyword"),
        (dict(export=ExportSpec(formats=("tflite",))), "export_formats"),
        (dict(export=ExportSpec(packed="yes")), "packed_export"),
        (dict(export=ExportSpec(example_input=[1, 2])), "example_input"),
        (dict(tracking=TrackingSpec(tracking_uri="mlruns")), "file store"),
        (dict(tracking=TrackingSpec(http_timeout=0)), "http_timeout"),
        (dict(tracking=TrackingSpec(experiment_name="")), "experiment_name"),
        (dict(tracking=TrackingSpec(enabled="yes")), "tracking"),
        (dict(config={"low_bits": 2}), "DFMPCConfig"),
        (dict(module_attr=""), "module_attr"),
        (dict(module_attr=3), "module_attr"),
        (dict(apply_on="train"), "apply_on"),
        (dict(apply_on=()), "apply_on"),
        (dict(eval_fn="val_acc"), "eval_fn"),
        (dict(monitor=[""]), "monitor"),
        (dict(leaf_modules=["Conv2d"]), "leaf_modules"),
        (dict(example_input=[1, 2]), "example_input"),
        (dict(tracking_uri="file:./mlruns"), "MLflow 3 refuses"),
        (dict(tracking_uri="mlruns"), "file store"),
        (dict(http_timeout=0), "http_timeout"),
        (dict(experiment_name=""), "experiment_name"),
        (dict(export_formats=("torchscript", "tflite")), "export_formats"),
        (dict(packed_export="yes"), "packed_export"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict, match: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(dfmpc_fx.ConfigError, match=match):
            DFMPCCallback(**kwargs)


def test_signature_reads_at_a_glance() -> None:
    import inspect

    params = [p for p in inspect.signature(DFMPCCallback).parameters.values() if p.kind is not p.VAR_KEYWORD]
    assert len(params) <= 12, [p.name for p in params]
    assert params[0].name == "config"
    assert DFMPCCallback().packed_export is True  # the default export is the packed artifact


_OLD_VALUES: dict = {
    "low_bits": 3, "high_bits": 7, "default_bits": None, "first_last_bits": None, "method": "paper",
    "compensate": False, "export_formats": ("program",), "packed_export": False,
    "example_input": torch.zeros(1, 1, 8, 8), "torchscript_path": "m.ts", "export_torchscript": False,
    "use_logger": False, "tracking_uri": "sqlite:///x.db", "experiment_name": "e", "run_name": "r",
    "tags": {"a": "b"}, "log_model": False, "local_dir": "somewhere", "keep_local": True, "http_timeout": 7.0,
}


@pytest.mark.parametrize("old", sorted(DEPRECATED_KEYWORDS))
def test_each_old_keyword_still_works_and_warns(old: str) -> None:
    spec, fld = DEPRECATED_KEYWORDS[old]
    replacement = {"config": "DFMPCConfig", "export": "ExportSpec", "tracking": "TrackingSpec"}[spec]
    with pytest.warns(DeprecationWarning, match=rf"{old}=.*deprecated.*{spec}={replacement}"):
        cb = DFMPCCallback(**{old: _OLD_VALUES[old]})
    value = _OLD_VALUES[old]
    if old == "export_torchscript":
        assert cb.export_spec.formats == () and not cb.export_torchscript
    elif spec == "config":
        assert getattr(cb.config, fld) == value
    elif spec == "export":
        got = getattr(cb.export_spec, fld)
        assert got is value if isinstance(value, torch.Tensor) else got == value
    else:
        assert getattr(cb.tracking_spec, fld) == value
    assert set(_OLD_VALUES) == set(DEPRECATED_KEYWORDS)


def test_new_specs_set_the_same_attributes() -> None:
    cb = DFMPCCallback(
        dfmpc_fx.DFMPCConfig(low_bits=3),
        export=ExportSpec(formats=("torchscript", "onnx"), packed=False),
        tracking=TrackingSpec(experiment_name="e", http_timeout=4, keep_local=True),
    )
    assert cb.config.low_bits == 3 and cb.export_formats == ("torchscript", "onnx") and cb.packed_export is False
    assert cb.experiment_name == "e" and cb.http_timeout == 4.0 and cb.keep_local and cb.tracking
    assert not DFMPCCallback(tracking=False).tracking
    assert DFMPCCallback(export=False).export_formats == ()


def test_config_fields_and_target_bits_are_forwarded_by_name() -> None:
    cb = DFMPCCallback(granularity="per_tensor")  # any DFMPCConfig field, no warning
    assert cb.config.granularity == "per_tensor"
    fields = {f.name for f in __import__("dataclasses").fields(dfmpc_fx.DFMPCConfig)}
    if "target_bits" in fields:
        assert DFMPCCallback(target_bits=3.0).config.target_bits == 3.0
    else:
        with pytest.raises(dfmpc_fx.ConfigError, match="target_bits"):
            DFMPCCallback(target_bits=3.0)


def test_defaults_are_mp2_6_after_fit() -> None:
    cb = DFMPCCallback()
    assert (cb.config.low_bits, cb.config.high_bits, cb.config.default_bits) == (2, 6, 8)
    assert cb.apply_on == ("fit",)
    cfg = dfmpc_fx.DFMPCConfig(low_bits=3, high_bits=8)
    assert DFMPCCallback(config=cfg, apply_on=["fit", "test"]).config is cfg
    assert not cb.compressed


def test_missing_attribute_fails_before_training(tmp_path: Path) -> None:
    model = TinyLit()
    trainer = make_trainer(tmp_path, [DFMPCCallback(module_attr="backbone", tracking=False)])
    with pytest.raises(dfmpc_fx.ConfigError, match="no submodule 'backbone'.*net"):
        trainer.fit(model, make_loader())
    assert model.train_steps == 0


def test_untraceable_network_fails_before_training(tmp_path: Path) -> None:
    model = TinyLit(branchy=True)
    trainer = make_trainer(tmp_path, [DFMPCCallback(module_attr="net", tracking=False)])
    with pytest.raises(dfmpc_fx.TraceError):
        trainer.fit(model, make_loader())
    assert model.train_steps == 0


# ----------------------------------------------------------------------------- hooks


class Recorder(Callback):
    """Records (hook, is the network compressed?) for the hooks around the callback's work."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bool]] = []

    def _rec(self, name: str, pl_module: L.LightningModule) -> None:
        self.events.append((name, is_quant(pl_module.net.conv2)))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._rec("train_batch_end", pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._rec("validation_end", pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._rec("train_end", pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._rec("fit_end", pl_module)

    def on_test_batch_start(self, trainer, pl_module, *args) -> None:
        self._rec("test_batch_start", pl_module)

    def on_predict_batch_start(self, trainer, pl_module, *args) -> None:
        self._rec("predict_batch_start", pl_module)


def test_hook_order_and_compressed_network_left_in_place(tmp_path: Path) -> None:
    model = TinyLit()
    recorder = Recorder()
    cb = DFMPCCallback(module_attr="net", tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "runs"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max", save_top_k=-1)
    trainer = make_trainer(
        tmp_path,
        [cb, recorder, ckpt],
        max_epochs=2,
        logger=CSVLogger(tmp_path / "logs"),
        enable_checkpointing=True,
    )
    conv2_class = type(model.net.conv2)
    trainer.fit(model, make_loader(), make_loader(64, seed=1))

    names = [n for n, _ in recorder.events]
    # everything during training saw the float network
    assert all(not q for n, q in recorder.events if n == "train_batch_end")
    # end-of-epoch validations (2) + the callback's float and compressed evaluations
    vals = [q for n, q in recorder.events if n == "validation_end"]
    assert vals == [False, False, False, True]
    assert names.index("train_end") > names.index("train_batch_end")
    assert ("train_end", True) in recorder.events and ("fit_end", True) in recorder.events
    # modules swapped, forward untouched
    assert conv2_class is nn.Conv2d and is_quant(model.net.conv2) and is_quant(model.net.conv1)
    assert "forward" not in vars(model) and "forward" not in vars(model.net)
    assert type(model).forward is TinyLit.forward
    assert cb.compressed and cb.swapped and "conv2" in cb.swapped
    assert {"fp32/val_acc", "dfmpc/val_acc", "fp32/val_loss", "dfmpc/val_loss", "delta/val_acc"} <= set(cb.metrics)
    assert cb.metrics["compression_ratio"] > 1
    # the Trainer's logger and checkpointing did not see the callback's extra evaluations
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val_acc")]
    assert len(rows) == 2
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 2
    # tracking=False: the local folder holds everything
    folder = cb.local_path
    assert folder is not None and folder.parent == (tmp_path / "runs").resolve()
    for name in ("report.json", "report.md", "layers.png", "model.ts", "params.json", "metrics.json",
                 "fp32_state_dict.pt", "compressed_state_dict.pt", "mlflow_model/MLmodel"):
        assert (folder / name).exists(), name
    # the TorchScript file is the network now in the LightningModule
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(folder / "model.ts"))(x), model(x))
    # test and predict use the compressed network
    trainer.test(model, make_loader(64, seed=2), verbose=False)
    trainer.predict(model, make_loader(32, seed=3))
    assert [q for n, q in recorder.events if n in ("test_batch_start", "predict_batch_start")]
    assert all(q for n, q in recorder.events if n in ("test_batch_start", "predict_batch_start"))


def test_apply_before_test_with_eval_fn(tmp_path: Path) -> None:
    calls: list[bool] = []
    held_out = make_loader(64, seed=5)

    def eval_fn(pl_module: L.LightningModule) -> dict[str, float]:
        calls.append(is_quant(pl_module.net.conv2))
        correct = total = 0
        pl_module.eval()
        with torch.no_grad():
            for x, y in held_out:
                correct += int((pl_module(x).argmax(1) == y).sum())
                total += len(y)
        return {"acc": correct / total, "ignored": "text"}

    model = TinyLit()
    cb = DFMPCCallback(module_attr="net", apply_on="test", eval_fn=eval_fn, export=False,
                       tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "runs"))
    recorder = Recorder()
    trainer = make_trainer(tmp_path, [cb, recorder])
    trainer.fit(model, make_loader())
    assert not cb.compressed and not is_quant(model.net.conv2) and calls == []
    trainer.test(model, make_loader(64, seed=2), verbose=False)
    assert cb.compressed and calls == [False, True]
    assert set(k for k in cb.metrics if "/acc" in k) == {"fp32/acc", "dfmpc/acc", "delta/acc"}
    assert all(q for n, q in recorder.events if n == "test_batch_start")
    assert not (cb.local_path / "model.ts").exists()


def test_whole_lightning_module_is_compressed_when_no_attribute(tmp_path: Path) -> None:
    model = TinyLit()
    cb = DFMPCCallback(tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "runs"), evaluate=False)
    make_trainer(tmp_path, [cb]).fit(model, make_loader())
    assert "net.conv2" in cb.swapped and is_quant(model.net.conv2)
    assert cb.metrics and not any(k.startswith("fp32/") for k in cb.metrics)


class BreakWeightsAtEpochEnd(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        with torch.no_grad():
            pl_module.net.conv2.weight[0, 0, 0, 0] = float("nan")


def test_compression_failure_keeps_the_trained_weights(tmp_path: Path) -> None:
    model = TinyLit()
    cb = DFMPCCallback(module_attr="net", tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "runs"))
    trainer = make_trainer(tmp_path, [BreakWeightsAtEpochEnd(), cb])
    with pytest.warns(RuntimeWarning, match="compression failed"), pytest.raises(dfmpc_fx.InvalidModelError):
        trainer.fit(model, make_loader(), make_loader(64, seed=1))
    assert not cb.compressed and not is_quant(model.net.conv2)
    saved = torch.load(cb.local_path / "fp32_state_dict.pt")
    assert torch.isnan(saved["conv2.weight"][0, 0, 0, 0])
    torch.testing.assert_close(saved["conv1.weight"], model.net.conv1.weight.detach())
    assert "InvalidModelError" in (cb.local_path / "COMPRESSION_FAILED.txt").read_text()


def test_without_validation_data_it_compresses_and_says_so(tmp_path: Path) -> None:
    model = TinyLit()
    cb = DFMPCCallback(module_attr="net", tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "runs"))
    with pytest.warns(UserWarning, match="no validation metrics"):
        make_trainer(tmp_path, [cb]).fit(model, make_loader())
    assert cb.compressed and is_quant(model.net.conv2)
    assert not any(k.startswith(("fp32/", "dfmpc/")) for k in cb.metrics) and "compression_ratio" in cb.metrics


# ----------------------------------------------------------------------------- ranks


class NotRankZero(SingleDeviceStrategy):
    """A single-process strategy that reports itself as a non-zero rank."""

    @property
    def is_global_zero(self) -> bool:
        return False


def test_non_zero_rank_compresses_but_neither_logs_nor_writes(tmp_path: Path) -> None:
    model = TinyLit()
    db = tmp_path / "rank.db"
    cb = DFMPCCallback(module_attr="net", tracking=TrackingSpec(tracking_uri=f"sqlite:///{db}", local_dir=tmp_path / "runs", keep_local=True))
    trainer = make_trainer(tmp_path, [cb], strategy=NotRankZero(device="cpu"))
    assert not trainer.is_global_zero
    trainer.fit(model, make_loader(), make_loader(64, seed=1))
    assert cb.compressed and is_quant(model.net.conv2) and "dfmpc/val_acc" in cb.metrics
    assert cb.weights_digest is not None
    assert cb.run_id is None and cb.local_path is None
    assert not db.exists() and not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_same_weights_give_same_digest_on_every_process(tmp_path: Path) -> None:
    """The work is deterministic: two independent runs from the same weights agree bit for bit."""
    torch.manual_seed(0)
    base = TinyLit()
    digests = []
    for _ in range(2):
        model = TinyLit()
        model.load_state_dict(base.state_dict())
        cb = DFMPCCallback(module_attr="net", evaluate=False, export=False,
                           tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "runs"))
        make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=0).fit(model, make_loader())
        digests.append(cb.weights_digest)
    assert digests[0] == digests[1]


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = TinyLit(lr=0.03)
    cb = DFMPCCallback(dfmpc_fx.DFMPCConfig(low_bits=3, high_bits=7), module_attr="net",
                       tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "runs"))
    trainer = make_trainer(tmp_path, [cb])
    trainer.fit(model, make_loader(), make_loader(64, seed=1))
    path = tmp_path / "compressed.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    entry = saved[CHECKPOINT_KEY]
    assert entry["compressed"] and entry["config"]["low_bits"] == 3 and entry["module_attr"] == "net"
    assert "net.conv2.weight_scale" in saved["state_dict"]

    x = torch.randn(6, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)

    # 1. build from the checkpoint's hyper-parameters
    loaded = load_compressed_checkpoint(TinyLit, path)
    assert loaded.hparams.lr == 0.03 and is_quant(loaded.net.conv2) and is_quant(loaded.net.fc)
    assert loaded.net.conv2.w_bits == model.net.conv2.w_bits
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)

    # 2. into a module built by hand
    fresh = TinyLit()
    swapped = restore_compressed(fresh, str(path))
    assert set(swapped) == set(entry["swapped"])
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)

    # 3. trainer.test(ckpt_path=...) with the callback in the Trainer restores the compressed modules
    test_model = TinyLit()
    cb2 = DFMPCCallback(module_attr="net", tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "runs2"))
    recorder = Recorder()
    tester = make_trainer(tmp_path, [cb2, recorder])
    results = tester.test(test_model, make_loader(64, seed=2), ckpt_path=str(path), verbose=False)
    assert cb2.compressed and is_quant(test_model.net.conv2) and results[0]["test_acc"] >= 0
    assert all(q for n, q in recorder.events if n == "test_batch_start")
    assert test_model.strict_loading is True

    # 4. training further from a compressed checkpoint is refused clearly
    with pytest.raises(dfmpc_fx.DFMPCError, match="already compressed"):
        make_trainer(tmp_path, [DFMPCCallback(module_attr="net", tracking=False)], max_epochs=2).fit(
            TinyLit(), make_loader(), ckpt_path=str(path)
        )


def test_plain_checkpoint_still_loads_strictly(tmp_path: Path) -> None:
    model = TinyLit()
    trainer = make_trainer(tmp_path, [])
    trainer.fit(model, make_loader())
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    cb = DFMPCCallback(module_attr="net", apply_on="test", evaluate=False, tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "r"))
    other = TinyLit()
    other.net.extra = nn.Linear(2, 2)  # keys the checkpoint lacks: Lightning's strict error must surface
    with pytest.raises(RuntimeError, match="Missing key"):
        make_trainer(tmp_path, [cb]).test(other, make_loader(32), ckpt_path=str(path), verbose=False)
    with pytest.raises(dfmpc_fx.DFMPCError, match="no compressed network"):
        restore_compressed(TinyLit(), path)


# ----------------------------------------------------------------------------- tracking


def test_unreachable_server_falls_back_to_local_folder(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    model = TinyLit()
    cb = DFMPCCallback(module_attr="net", tracking=TrackingSpec(tracking_uri=uri, local_dir=tmp_path / "runs", http_timeout=2))
    trainer = make_trainer(tmp_path, [cb])
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="saved to") as caught:
        trainer.fit(model, make_loader(), make_loader(64, seed=1))
    assert time.perf_counter() - start < 120
    folder = cb.local_path
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "DFMPCCallback" in str(w.message)]
    assert folder is not None and len(messages) == 1 and str(folder) in messages[0]
    assert uri in (folder / "TRACKING_FAILED.txt").read_text()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"fp32/val_acc", "dfmpc/val_acc", "compression_ratio"} <= set(metrics)
    # the trained float weights and the compressed network are both kept
    fp32 = torch.load(folder / "fp32_state_dict.pt")
    compressed = torch.load(folder / "compressed_state_dict.pt")
    assert "conv2.weight" in fp32 and "conv2.weight_scale" in compressed
    import mlflow.pytorch

    reloaded = mlflow.pytorch.load_model(str(folder / "mlflow_model"))
    x = torch.randn(3, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
        torch.testing.assert_close(torch.jit.load(str(folder / "model.ts"))(x), model(x))


def test_default_store_is_sqlite_in_working_directory(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cb = DFMPCCallback(module_attr="net", tracking=TrackingSpec(experiment_name="unit-default", log_model=False))
    make_trainer(tmp_path, [cb]).fit(TinyLit(), make_loader(), make_loader(64, seed=1))
    assert (tmp_path / "mlflow.db").is_file() and cb.tracking_error is None
    client = MlflowClient(tracking.default_tracking_uri(tmp_path))
    run = client.get_run(cb.run_id)
    assert run.info.status == "FINISHED"
    # the default is the size budget of 4 bits per weight
    assert run.data.params["dfmpc.target_bits"] == "4.0" and run.data.params["bits.conv2"] in {"2", "3", "4", "5", "6", "8"}
    assert run.data.metrics["bits_per_weight"] <= 4.0
    assert "dfmpc/val_acc" in run.data.metrics and "weight_rel_error/conv2" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(cb.run_id, "dfmpc")}
    assert {"dfmpc/report.json", "dfmpc/model.ts", "dfmpc/layers.png", "dfmpc/report.md"} <= artifacts
    assert not (tmp_path / "dfmpc_runs").exists()


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert tracking.resolve_tracking_uri("http://h:1") == "http://h:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    assert tracking.resolve_tracking_uri(None) == "sqlite:////tmp/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    with pytest.raises(ValueError, match="sqlite"):
        tracking.resolve_tracking_uri("./mlruns")


def test_short_http_timeouts_keep_user_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    with tracking.short_http_timeouts(3.2):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"


def test_report_params_metrics_and_plot(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = dfmpc_fx.get_report(dfmpc_fx.compress(TinyNet().eval(), dfmpc_fx.DFMPCConfig()))
    params = tracking.report_params(report)
    assert params["dfmpc.high_bits"] == "6" and params["dfmpc.num_pairs"] == str(report.num_pairs)
    assert {f"bits.{layer.name}" for layer in report.layers} <= set(params)
    metrics = tracking.report_metrics(report)
    assert metrics["size_mb/fp32"] > metrics["size_mb/dfmpc"] > 0
    png = tracking.plot_layers(report, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exports_every_requested_format_packed(tmp_path: Path) -> None:
    """export_formats=torchscript+program+onnx, packed: each file is written after a real fit,
    reloads with its own runtime (torch.jit, torch.export, onnxruntime) and matches the
    compressed network now in the LightningModule."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = TinyLit()
    cb = DFMPCCallback(module_attr="net", evaluate=False, tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "runs"),
                       export=ExportSpec(formats=("torchscript", "program", "onnx")))
    make_trainer(tmp_path, [cb]).fit(model, make_loader(), make_loader(64, seed=1))
    folder = cb.local_path
    x = torch.randn(1, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.load(str(folder / "model.ts"))(x), want)
        torch.testing.assert_close(torch.export.load(str(folder / "model.pt2")).module()(x), want)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)
    # packed: the TorchScript file is far smaller than the float network's
    float_bytes = sum(p.numel() * 4 for p in model.net.parameters())
    assert (folder / "model.ts").stat().st_size < float_bytes + 64_000
    assert not list(folder.glob("*_FAILED.txt"))


def test_export_torchscript_false_drops_it_from_the_formats() -> None:
    with pytest.warns(DeprecationWarning, match="ExportSpec"):
        cb = DFMPCCallback(export_torchscript=False, export_formats=("torchscript", "program"))
    assert cb.export_formats == ("program",) and not cb.export_torchscript


def test_metrics_give_theoretical_and_artifact_bytes(tmp_path: Path) -> None:
    import json

    model = TinyLit()
    cb = DFMPCCallback(module_attr="net", evaluate=False, tracking=TrackingSpec(enabled=False, local_dir=tmp_path / "runs"),
                       export=ExportSpec(formats=("torchscript",)))
    make_trainer(tmp_path, [cb]).fit(model, make_loader(), make_loader(64, seed=1))
    metrics = json.loads((cb.local_path / "metrics.json").read_text())
    size = (cb.local_path / "model.ts").stat().st_size
    assert metrics["artifact_bytes"] == size == metrics["artifact_bytes/torchscript"]
    assert 0 < metrics["theoretical_bytes"] <= size
