"""``DFMPCCallback``: compress a LightningModule's network after training, evaluate, track.

.. code-block:: python

    import lightning as L
    from dfmpc_fx.callbacks import DFMPCCallback

    trainer = L.Trainer(callbacks=[DFMPCCallback(DFMPCConfig(low_bits=2, high_bits=6), module_attr="net")])
    trainer.fit(lit_model, datamodule)   # afterwards lit_model.net is compressed
    trainer.test(lit_model, datamodule)  # tests the compressed network

What happens, in order (all in ``on_train_end``, after the last training and validation step):

1. The validation loop of the Trainer runs once on the float network (or ``eval_fn`` is
   called); every metric it logs, e.g. ``val_acc``, is kept as ``fp32/val_acc``.
2. :func:`dfmpc_fx.compress` compresses the network (the whole LightningModule, or the
   attribute named by ``module_attr``) and :func:`dfmpc_fx.swap_compressed_modules` swaps the
   compressed modules into it by qualified name. ``forward`` is never patched.
3. The validation loop runs again: ``dfmpc/val_acc``.
4. On global rank zero only, everything is tracked in MLflow (see :mod:`dfmpc_fx.integrations.tracking`):
   the run of the Trainer's ``MLFlowLogger`` if there is one, else a new run in
   ``tracking_uri`` / ``$MLFLOW_TRACKING_URI`` / ``sqlite:///<cwd>/mlflow.db``. If tracking
   fails, everything is written to ``dfmpc_runs/<timestamp>/`` and a warning names the folder.

Every rank does steps 1-3 (the same deterministic work, so DDP ranks end with identical
weights; this is checked by broadcasting a digest); only rank zero logs and writes files.
During the extra validation runs the Trainer's loggers and its checkpoint / early-stopping
callbacks are detached, so they neither log nor react to the post-hoc evaluations.

Checkpoints saved afterwards (``trainer.save_checkpoint``) carry a ``"dfmpc"`` entry (the
config, the network attribute and the list of swapped modules). With this callback in the
Trainer, ``trainer.test/validate/predict(model, ckpt_path=...)`` restores the compressed
modules automatically; elsewhere use :func:`restore_compressed` (on a module you built) or
:func:`load_compressed_checkpoint` (builds it from the checkpoint's hyper-parameters).
Training further from a compressed checkpoint is refused with a clear error.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

import dfmpc_fx
from dfmpc_fx.integrations import tracking as _tracking
from dfmpc_fx.errors import ConfigError
from dfmpc_fx.artifacts.export import EXPORT_SUFFIXES

__all__ = ["CHECKPOINT_KEY", "DEPRECATED_KEYWORDS", "DFMPCCallback", "ExportSpec", "TrackingSpec", "load_compressed_checkpoint", "restore_compressed"]

#: top-level key of a Lightning checkpoint holding the compression state
CHECKPOINT_KEY = "dfmpc"
_STAGES = ("fit", "test", "predict")
_CONFIG_ARGS = ("low_bits", "high_bits", "default_bits", "first_last_bits", "method", "compensate")
_CONFIG_DEFAULTS: dict[str, Any] = {
    "low_bits": 2,
    "high_bits": 6,
    "default_bits": 8,
    "first_last_bits": 8,
    "method": "dfmpc",
    "compensate": True,
}

EvalFn = Callable[["pl.LightningModule"], Mapping[str, float]]


def _get_submodule(root: nn.Module, attr: Optional[str]) -> nn.Module:
    if not attr:
        return root
    try:
        module = root.get_submodule(attr)
    except AttributeError as exc:
        raise ConfigError(
            f"module_attr={attr!r}: {type(root).__name__} has no submodule {attr!r} "
            f"(its direct children are: {', '.join(n for n, _ in root.named_children()) or 'none'})"
        ) from exc
    return module


def _state_digest(module: nn.Module) -> str:
    """SHA-256 over the names, shapes and bytes of a module's state dict (CPU copies)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _first_tensor(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return _first_tensor(batch[0])
    if isinstance(batch, Mapping) and batch:
        return _first_tensor(next(iter(batch.values())))
    return None


def _as_float(value: Any) -> Optional[float]:
    try:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return None
            return float(value.detach().cpu().item())
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What :class:`DFMPCCallback` exports after compression.

    Args:
        formats: any of ``"torchscript"`` (``model.ts``), ``"program"`` (``torch.export``,
            ``model.pt2``) and ``"onnx"`` (``model.onnx``, needs onnx/onnxscript/onnxruntime);
            each is reloaded and checked against the model. ``()``: no export.
        packed: bit-packed low-bit weights, about the theoretical size (default); ``False``
            exports the fake-quant float weights (same outputs, float-sized file).
        example_input: input for the export; default: the module's ``example_input_array`` or
            one sample of the validation/training data.
        torchscript_path: also copy the TorchScript file here (rank zero).
    """

    formats: tuple[str, ...] = ("torchscript",)
    packed: bool = True
    example_input: Any = None
    torchscript_path: Optional[Union[str, os.PathLike]] = None


@dataclasses.dataclass(frozen=True)
class TrackingSpec:
    """Where :class:`DFMPCCallback` records the run.

    Args:
        enabled: log to MLflow (``False``: only write the local folder).
        use_logger: reuse the run of the Trainer's ``MLFlowLogger`` when there is one (then
            its experiment, run name, tags and tracking URI apply).
        tracking_uri: MLflow store/server when no logger is reused; default
            ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``.
        experiment_name, run_name, tags: for a run this callback creates itself.
        log_model: log the compressed network with ``mlflow.pytorch.log_model``.
        local_dir: where local copies go (``<local_dir>/<timestamp>/``) when tracking fails,
            when disabled or when ``keep_local=True``.
        keep_local: keep the local folder even when tracking worked.
        http_timeout: seconds per HTTP request to a tracking server (no retries are made).
    """

    enabled: bool = True
    use_logger: bool = True
    tracking_uri: Optional[str] = None
    experiment_name: str = _tracking.DEFAULT_EXPERIMENT
    run_name: Optional[str] = None
    tags: Optional[Mapping[str, str]] = None
    log_model: bool = True
    local_dir: Union[str, os.PathLike] = _tracking.DEFAULT_LOCAL_DIR
    keep_local: bool = False
    http_timeout: float = _tracking.DEFAULT_HTTP_TIMEOUT


#: keywords of the previous DFMPCCallback signature -> (where they went, field)
DEPRECATED_KEYWORDS: dict[str, tuple[str, str]] = {
    **{name: ("config", name) for name in _CONFIG_ARGS},
    "export_formats": ("export", "formats"),
    "packed_export": ("export", "packed"),
    "example_input": ("export", "example_input"),
    "torchscript_path": ("export", "torchscript_path"),
    "export_torchscript": ("export", "formats"),
    "use_logger": ("tracking", "use_logger"),
    "tracking_uri": ("tracking", "tracking_uri"),
    "experiment_name": ("tracking", "experiment_name"),
    "run_name": ("tracking", "run_name"),
    "tags": ("tracking", "tags"),
    "log_model": ("tracking", "log_model"),
    "local_dir": ("tracking", "local_dir"),
    "keep_local": ("tracking", "keep_local"),
    "http_timeout": ("tracking", "http_timeout"),
}
_SPEC_CLASS = {"config": "DFMPCConfig", "export": "ExportSpec", "tracking": "TrackingSpec"}


def _replacement(old: str) -> str:
    spec, fld = DEPRECATED_KEYWORDS[old]
    if old == "export_torchscript":
        return "export=ExportSpec(formats=...) (leave 'torchscript' out of formats)"
    return f"{spec}={_SPEC_CLASS[spec]}({fld}=...)"


def _resolve_legacy(
    config: Any, export: Any, tracking: Any, target_bits: Optional[float], legacy: dict[str, Any]
) -> tuple["dfmpc_fx.DFMPCConfig", ExportSpec, TrackingSpec]:
    """The config and specs from the new arguments and the old keywords (warned, checked)."""
    config_fields = {f.name for f in dataclasses.fields(dfmpc_fx.DFMPCConfig)}
    by_spec: dict[str, dict[str, Any]] = {"config": {}, "export": {}, "tracking": {}}
    config_extra: dict[str, Any] = {}
    for name, value in legacy.items():
        if name in DEPRECATED_KEYWORDS:
            warnings.warn(
                f"DFMPCCallback({name}=...) is deprecated and will be removed in the next release; "
                f"use {_replacement(name)}",
                DeprecationWarning,
                stacklevel=3,  # the caller of DFMPCCallback(...)
            )
            by_spec[DEPRECATED_KEYWORDS[name][0]][name] = value
        elif name in config_fields:
            config_extra[name] = value  # a DFMPCConfig field, forwarded by name
        else:
            raise ConfigError(
                f"DFMPCCallback got an unexpected keyword {name!r} (neither a callback argument, "
                f"a deprecated keyword nor a DFMPCConfig field)"
            )
    if target_bits is not None:
        config_extra["target_bits"] = target_bits

    # config
    cfg_kwargs = {**by_spec["config"], **config_extra}
    if config is not None:
        if not isinstance(config, dfmpc_fx.DFMPCConfig):
            raise ConfigError(
                f"config must be a dfmpc_fx.DFMPCConfig, got {type(config).__name__} "
                "(the bit widths are DFMPCConfig(low_bits=..., high_bits=...) now)"
            )
        if cfg_kwargs:
            raise ConfigError(
                f"pass either config=DFMPCConfig(...) or {', '.join(sorted(cfg_kwargs))}, not both "
                "(put them into the DFMPCConfig)"
            )
    else:
        try:
            config = dfmpc_fx.DFMPCConfig(**cfg_kwargs)  # raises ConfigError on bad values
        except TypeError as exc:
            raise ConfigError(f"DFMPCConfig does not take {sorted(config_extra)}: {exc}") from exc

    # export
    old = by_spec["export"]
    if export is False:
        export = ExportSpec(formats=())
    elif export is True:
        export = ExportSpec()
    if export is not None:
        if not isinstance(export, ExportSpec):
            raise ConfigError(f"export must be an ExportSpec (or False), got {type(export).__name__}")
        if old:
            raise ConfigError(f"pass either export=ExportSpec(...) or {', '.join(sorted(old))}, not both")
    else:
        fields: dict[str, Any] = {}
        if "export_formats" in old:
            formats = old["export_formats"]
            fields["formats"] = (formats,) if isinstance(formats, str) else tuple(formats)
        if "export_torchscript" in old:
            if not isinstance(old["export_torchscript"], bool):
                raise ConfigError(f"export_torchscript must be True or False, got {old['export_torchscript']!r}")
            if not old["export_torchscript"]:
                fields["formats"] = tuple(f for f in fields.get("formats", ExportSpec.formats) if f != "torchscript")
        for name, fld in (("packed_export", "packed"), ("example_input", "example_input"), ("torchscript_path", "torchscript_path")):
            if name in old:
                fields[fld] = old[name]
        export = ExportSpec(**fields)

    # tracking
    old = by_spec["tracking"]
    if tracking is None or tracking is True:
        spec = TrackingSpec()
    elif tracking is False:
        spec = TrackingSpec(enabled=False)
    elif isinstance(tracking, TrackingSpec):
        spec = tracking
        if old:
            raise ConfigError(f"pass either tracking=TrackingSpec(...) or {', '.join(sorted(old))}, not both")
    else:
        raise ConfigError(f"tracking must be a TrackingSpec, True or False, got {tracking!r}")
    if old:
        spec = dataclasses.replace(spec, **old)  # the keyword names are the TrackingSpec fields
    return config, export, spec


class DFMPCCallback(Callback):
    """Compress the trained network with DF-MPC, evaluate it before/after, and track the run.

    .. code-block:: python

        DFMPCCallback(DFMPCConfig(low_bits=2, high_bits=6), module_attr="net",
                      export=ExportSpec(formats=("torchscript", "onnx")),
                      tracking=TrackingSpec(experiment_name="cifar"))

    Args:
        config: the :class:`dfmpc_fx.DFMPCConfig` (default: MP2/6).
        module_attr: dotted name of the network inside the LightningModule (``"net"``);
            ``None`` compresses the LightningModule itself (its ``forward`` is traced).
        apply_on: when to compress: ``"fit"`` (default; at the end of training), ``"test"``
            / ``"predict"`` (at the start of those stages, if not compressed yet), or several.
        evaluate: run the validation loop before and after compression (``fit`` only).
        eval_fn: ``eval_fn(lightning_module) -> {name: value}`` used instead of the
            validation loop (also usable before ``test``/``predict``). Called on every rank.
        monitor: metric names to keep from the evaluation (default: all it logs).
        concrete_args, leaf_modules: passed to :func:`dfmpc_fx.compress` for models that
            torch.fx cannot trace as they are.
        export: an :class:`ExportSpec` (which files, packed or float weights, example input);
            ``False`` or ``ExportSpec(formats=())`` writes none.
        tracking: a :class:`TrackingSpec` (MLflow run, local folder, timeouts); ``False``:
            only write the local folder; ``True`` (default): ``TrackingSpec()``.
        check_ranks: broadcast a digest of the compressed weights from rank zero and warn if
            any rank differs (distributed runs only).
        target_bits: passed to :class:`dfmpc_fx.DFMPCConfig` (an average bit budget), when
            the installed version has that field.

    The keywords of the previous release (``low_bits``, ``high_bits``, ``default_bits``,
    ``first_last_bits``, ``method``, ``compensate``; ``export_torchscript``,
    ``torchscript_path``, ``export_formats``, ``packed_export``, ``example_input``;
    ``use_logger``, ``tracking_uri``, ``experiment_name``, ``run_name``, ``tags``,
    ``log_model``, ``local_dir``, ``keep_local``, ``http_timeout``) still work for one
    release, with a ``DeprecationWarning`` that names the replacement (see
    :data:`DEPRECATED_KEYWORDS`); passing one together with the spec it belongs to is a
    :class:`dfmpc_fx.ConfigError`. Any other :class:`DFMPCConfig` field name is forwarded to
    the config.

    After compression the callback exposes ``compressed`` (bool), ``qmodel`` (the
    :class:`torch.fx.GraphModule` from :func:`dfmpc_fx.compress`), ``report``, ``metrics``
    (``fp32/...``, ``dfmpc/...``, sizes, ratio), ``swapped`` (module names), ``run_id``,
    ``model_uri``, ``local_path`` (a ``Path`` if a local folder was kept) and
    ``weights_digest``.
    """

    def __init__(
        self,
        config: Optional["dfmpc_fx.DFMPCConfig"] = None,
        *,
        module_attr: Optional[str] = None,
        apply_on: Union[str, Sequence[str]] = "fit",
        evaluate: bool = True,
        eval_fn: Optional[EvalFn] = None,
        monitor: Optional[Sequence[str]] = None,
        concrete_args: Optional[dict[str, Any]] = None,
        leaf_modules: Optional[Sequence[type]] = None,
        export: Union[ExportSpec, bool, None] = None,
        tracking: Union[TrackingSpec, bool, None] = None,
        check_ranks: bool = True,
        target_bits: Optional[float] = None,
        **legacy: Any,
    ) -> None:
        super().__init__()
        config, export, tracking = _resolve_legacy(config, export, tracking, target_bits, legacy)
        export_formats = export.formats
        packed_export = export.packed
        example_input = export.example_input
        torchscript_path = export.torchscript_path
        use_logger = tracking.use_logger
        tracking_uri = tracking.tracking_uri
        experiment_name = tracking.experiment_name
        run_name = tracking.run_name
        tags = tracking.tags
        log_model = tracking.log_model
        local_dir = tracking.local_dir
        keep_local = tracking.keep_local
        http_timeout = tracking.http_timeout
        self.config = config
        self.export_spec = export
        self.tracking_spec = tracking

        if module_attr is not None and (not isinstance(module_attr, str) or not module_attr.strip(".")):
            raise ConfigError(f"module_attr must be None or an attribute name such as 'net', got {module_attr!r}")
        stages = (apply_on,) if isinstance(apply_on, str) else tuple(apply_on)
        bad = [s for s in stages if s not in _STAGES]
        if not stages or bad:
            raise ConfigError(f"apply_on must be one or more of {_STAGES}, got {apply_on!r}")
        if eval_fn is not None and not callable(eval_fn):
            raise ConfigError(f"eval_fn must be callable, got {type(eval_fn).__name__}")
        if monitor is not None:
            monitor = (monitor,) if isinstance(monitor, str) else tuple(monitor)
            if not all(isinstance(m, str) and m for m in monitor):
                raise ConfigError(f"monitor must be metric names, got {monitor!r}")
        if concrete_args is not None and not isinstance(concrete_args, Mapping):
            raise ConfigError("concrete_args must be a dict of argument name -> value")
        if leaf_modules is not None:
            leaf_modules = tuple(leaf_modules)
            if not all(isinstance(m, type) and issubclass(m, nn.Module) for m in leaf_modules):
                raise ConfigError("leaf_modules must be nn.Module subclasses")
        if example_input is not None and not isinstance(example_input, (torch.Tensor, tuple)):
            raise ConfigError("example_input must be a tensor or a tuple of tensors")
        if tracking_uri is not None:
            if not isinstance(tracking_uri, str) or not tracking_uri:
                raise ConfigError(f"tracking_uri must be a non-empty string, got {tracking_uri!r}")
            try:
                _tracking.resolve_tracking_uri(tracking_uri)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ConfigError("experiment_name must be a non-empty string")
        if isinstance(http_timeout, bool) or not isinstance(http_timeout, (int, float)) or not http_timeout > 0:
            raise ConfigError(f"http_timeout must be a number of seconds > 0, got {http_timeout!r}")
        for name, value in (
            ("evaluate", evaluate),
            ("packed_export", packed_export),
            ("tracking", tracking.enabled),
            ("use_logger", use_logger),
            ("log_model", log_model),
            ("keep_local", keep_local),
            ("check_ranks", check_ranks),
        ):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r}")

        self.module_attr = module_attr.strip(".") if module_attr else None
        self.apply_on = stages
        self.evaluate = evaluate
        self.eval_fn = eval_fn
        self.monitor = monitor
        self.concrete_args = dict(concrete_args) if concrete_args is not None else None
        self.leaf_modules = leaf_modules
        self.example_input = example_input
        if isinstance(export_formats, str):
            export_formats = (export_formats,)
        formats = tuple(export_formats)
        unknown = [f for f in formats if f not in EXPORT_SUFFIXES]
        if unknown:
            raise ConfigError(f"export_formats must be among {tuple(EXPORT_SUFFIXES)}, got {unknown}")
        self.export_formats = tuple(dict.fromkeys(formats))
        self.packed_export = packed_export
        self.export_torchscript = "torchscript" in self.export_formats
        self.torchscript_path = Path(torchscript_path) if torchscript_path is not None else None
        self.tracking = tracking.enabled
        self.use_logger = use_logger
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.log_model = log_model
        self.local_dir = Path(local_dir)
        self.keep_local = keep_local
        self.http_timeout = float(http_timeout)
        self.check_ranks = check_ranks

        # results
        self.compressed = False
        self.qmodel: Optional[nn.Module] = None
        self.report: Any = None
        self.metrics: dict[str, float] = {}
        self.swapped: list[str] = []
        self.run_id: Optional[str] = None
        self.model_uri: Optional[str] = None
        self.local_path: Optional[Path] = None
        self.weights_digest: Optional[str] = None
        self.tracking_error: Optional[str] = None
        self._strict_saved: Optional[bool] = None

    # ------------------------------------------------------------------ Lightning API

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module_attr=self.module_attr)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Fail before training if the network cannot be found or traced; prepare restoring a
        compressed checkpoint given as ``ckpt_path``."""
        net = _get_submodule(pl_module, self.module_attr)
        # A compressed checkpoint holds Quant* modules with extra buffers (weight_scale, ...), and
        # Lightning loads `ckpt_path` strictly before any callback sees it. Loosen that one load
        # and finish it in the stage's start hook (_finish_restore), strictly.
        if not self.compressed and isinstance(getattr(pl_module, "strict_loading", None), bool):
            self._strict_saved = pl_module.strict_loading
            pl_module.strict_loading = False
        if self.compressed or stage != "fit" or "fit" not in self.apply_on:
            return
        search = dfmpc_fx.find_compensable_pairs(
            net, concrete_args=self.concrete_args, leaf_modules=self._leaf_modules_arg()
        )  # raises TraceError now rather than after hours of training
        if not search.pairs and not self.config.has_budget:
            rank_zero_warn(
                f"DFMPCCallback: no compensable layer pairs in {type(net).__name__}; layers will get "
                f"default_bits={self.config.default_bits} without compensation "
                f"({len(search.refusals)} layers without a partner; see dfmpc_fx.find_compensable_pairs)"
            )

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._finish_restore(trainer, pl_module, "fit")

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._finish_restore(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == "validate":
            self._finish_restore(trainer, pl_module, "validate")

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._strict_saved is not None:  # the stage ended before its start hook
            pl_module.strict_loading = self._strict_saved
            self._strict_saved = None

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if "fit" in self.apply_on and not self.compressed:
            self._apply(trainer, pl_module, stage="fit")

    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._finish_restore(trainer, pl_module, "test")
        if "test" in self.apply_on and not self.compressed:
            self._apply(trainer, pl_module, stage="test")

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._finish_restore(trainer, pl_module, "predict")
        if "predict" in self.apply_on and not self.compressed:
            self._apply(trainer, pl_module, stage="predict")

    def state_dict(self) -> dict[str, Any]:
        return self._checkpoint_entry()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the network itself is restored from the checkpoint's "dfmpc" entry (see _finish_restore)
        self.loaded_state = dict(state_dict)

    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        if self.compressed:
            checkpoint[CHECKPOINT_KEY] = self._checkpoint_entry()

    # ------------------------------------------------------------------ internals

    def _finish_restore(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Complete the loosened ``ckpt_path`` load: recreate compressed modules for a compressed
        checkpoint, or redo the strict key check Lightning would have made."""
        if self._strict_saved is None:
            return
        strict, self._strict_saved = self._strict_saved, None
        pl_module.strict_loading = strict
        path = trainer.ckpt_path
        if not path:
            return
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        entry = checkpoint.get(CHECKPOINT_KEY)
        if entry and entry.get("compressed"):
            if stage == "fit":
                raise dfmpc_fx.DFMPCError(
                    f"{path} holds a network already compressed by DFMPCCallback: training it further is "
                    "not supported (its weights would leave the quantization grid). Fine-tune from the "
                    "float checkpoint instead, or evaluate this one with trainer.test/validate(ckpt_path=...)"
                )
            self.swapped = restore_compressed(
                pl_module, checkpoint, concrete_args=self.concrete_args, leaf_modules=self.leaf_modules
            )
            self.config = dfmpc_fx.DFMPCConfig.from_dict(entry["config"])
            self.compressed = True
            rank_zero_info(f"DFMPCCallback: restored {len(self.swapped)} compressed modules from {path}")
        elif strict and "state_dict" in checkpoint and set(checkpoint["state_dict"]) != set(pl_module.state_dict()):
            pl_module.load_state_dict(checkpoint["state_dict"], strict=True)  # raises the usual error

    def _leaf_modules_arg(self) -> list[type]:
        return list(self.leaf_modules) if self.leaf_modules is not None else []

    def _checkpoint_entry(self) -> dict[str, Any]:
        return {
            "version": 1,
            "compressed": self.compressed,
            "config": self.config.to_dict(),
            "module_attr": self.module_attr,
            "swapped": list(self.swapped),
            "concrete_args_keys": sorted(self.concrete_args) if self.concrete_args else [],
            "weights_digest": self.weights_digest,
        }

    def _apply(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        start = time.perf_counter()
        net = _get_submodule(pl_module, self.module_attr)
        device = next((t.device for t in [*net.parameters(), *net.buffers()]), torch.device("cpu"))
        do_eval = self.eval_fn is not None or (self.evaluate and stage == "fit")

        fp32: dict[str, float] = self._evaluate(trainer, pl_module, stage) if do_eval else {}
        fp32_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()} if trainer.is_global_zero else None

        was_training = net.training
        try:
            with torch.no_grad():
                qmodel = dfmpc_fx.compress(
                    net, self.config, concrete_args=self.concrete_args, leaf_modules=self._leaf_modules_arg()
                )
                self.swapped = list(dfmpc_fx.swap_compressed_modules(net, qmodel))
        except Exception as exc:
            if fp32_state is not None:  # rank zero: keep the trained weights before failing
                self.local_path = self._save_trained_weights(fp32_state, exc)
                exc.add_note(f"DFMPCCallback: the trained float weights were saved to {self.local_path}")
                warnings.warn(
                    f"DFMPCCallback: compression failed ({exc.__class__.__name__}); the trained float "
                    f"weights were saved to {self.local_path}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            raise
        net.to(device)
        net.train(was_training)
        self.qmodel = qmodel
        self.compressed = True
        self.report = dfmpc_fx.get_report(qmodel)
        self.weights_digest = _state_digest(net)
        self._check_ranks(trainer)

        after: dict[str, float] = self._evaluate(trainer, pl_module, stage) if do_eval else {}
        metrics: dict[str, float] = {}
        for key, value in fp32.items():
            metrics[f"fp32/{key}"] = value
        for key, value in after.items():
            metrics[f"dfmpc/{key}"] = value
            if key in fp32:
                metrics[f"delta/{key}"] = value - fp32[key]
        metrics.update(_tracking.report_metrics(self.report))
        self.metrics = metrics
        if do_eval and not fp32:
            rank_zero_warn(
                "DFMPCCallback: no validation metrics were produced (no val dataloader, "
                "limit_val_batches=0 or validation_step logs nothing); pass eval_fn=... to measure "
                "the network before and after compression"
            )

        if trainer.is_global_zero:
            self._publish(trainer, pl_module, net, fp32_state, stage)
        trainer.strategy.barrier("dfmpc_callback_done")
        rank_zero_info(
            f"DFMPCCallback: compressed {len(self.swapped)} modules "
            f"({self.report.num_pairs} pairs, x{float(self.report.compression_ratio):.2f} smaller) "
            f"in {time.perf_counter() - start:.1f}s"
            + "".join(f"; {k}={v:.4g}" for k, v in metrics.items() if k.startswith(("fp32/", "dfmpc/")))
        )

    def _save_trained_weights(self, fp32_state: dict[str, torch.Tensor], exc: BaseException) -> Path:
        """Rank zero, compression failed: keep the trained float weights in the local folder."""
        bundle = _tracking.RunBundle()
        torch.save(fp32_state, bundle.file("fp32_state_dict.pt"))
        bundle.params.update({f"dfmpc.{k}": str(v) for k, v in self.config.to_dict().items()})
        bundle.write_text("COMPRESSION_FAILED.txt", f"{exc.__class__.__name__}: {exc}\n")
        return bundle.persist(self.local_dir)

    def _check_ranks(self, trainer: "pl.Trainer") -> None:
        if not self.check_ranks or trainer.world_size <= 1:
            return
        reference = trainer.strategy.broadcast(self.weights_digest, src=0)
        if reference != self.weights_digest:
            warnings.warn(
                f"DFMPCCallback: rank {trainer.global_rank} compressed weights differ from rank 0 "
                f"(digest {self.weights_digest[:12]} vs {str(reference)[:12]}); the ranks did not "
                "start from identical weights",
                RuntimeWarning,
                stacklevel=2,
            )

    # evaluation ---------------------------------------------------------------

    def _evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> dict[str, float]:
        if self.eval_fn is not None:
            raw = dict(self.eval_fn(pl_module))
        else:
            raw = self._run_validation_loop(trainer)
        out: dict[str, float] = {}
        for key, value in raw.items():
            if self.monitor is not None and key not in self.monitor:
                continue
            number = _as_float(value)
            if number is not None:
                out[str(key)] = number
        if self.monitor is not None:
            missing = [m for m in self.monitor if m not in out]
            if missing:
                rank_zero_warn(f"DFMPCCallback: monitored metrics {missing} were not logged by the evaluation")
        return out

    def _run_validation_loop(self, trainer: "pl.Trainer") -> dict[str, Any]:
        """Run the Trainer's own fit-time validation loop once (the way the training epoch
        loop does), with loggers and checkpoint/early-stopping callbacks detached."""
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        source = getattr(val_loop, "_data_source", None)
        if source is not None and hasattr(source, "is_defined") and not source.is_defined():
            return {}  # no val_dataloader: nothing to run (the caller warns)
        saved_stage = trainer.state.stage
        saved_loggers = list(trainer.loggers)
        saved_callbacks = list(trainer.callbacks)
        connector = trainer._logger_connector
        first_loop_iter = getattr(connector, "_first_loop_iter", None)
        trainer.loggers = []
        trainer.callbacks = [
            cb for cb in saved_callbacks if cb is not self and not isinstance(cb, (Checkpoint, EarlyStopping))
        ]
        try:
            trainer.validating = True
            outputs = val_loop.run()
        finally:
            trainer.loggers = saved_loggers
            trainer.callbacks = saved_callbacks
            trainer.state.stage = saved_stage
            if first_loop_iter is not None:
                connector._first_loop_iter = first_loop_iter
        merged: dict[str, Any] = {}
        for per_loader in outputs or []:
            merged.update(per_loader)
        return merged

    # publishing -----------------------------------------------------------------

    def _example_input(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Any:
        if self.example_input is not None:
            return self.example_input
        array = getattr(pl_module, "example_input_array", None)
        if array is not None:
            return array
        for attr in ("val_dataloaders", "train_dataloader", "test_dataloaders", "predict_dataloaders"):
            try:
                loaders = getattr(trainer, attr, None)
            except Exception:  # noqa: BLE001 - some properties raise outside their stage
                loaders = None
            if loaders is None:
                continue
            if isinstance(loaders, (list, tuple)):
                loaders = loaders[0] if loaders else None
            elif isinstance(loaders, Mapping):
                loaders = next(iter(loaders.values()), None)
            if loaders is None:
                continue
            try:
                batch = next(iter(loaders))
            except (StopIteration, TypeError):
                continue
            tensor = _first_tensor(batch)
            if tensor is not None:
                return tensor[:1].detach().cpu()
        return None

    def _publish(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        net: nn.Module,
        fp32_state: Optional[dict[str, torch.Tensor]],
        stage: str,
    ) -> None:
        """Rank zero: write the bundle, upload it, fall back to a local folder on failure."""
        bundle = _tracking.RunBundle()
        bundle.metrics.update(self.metrics)
        bundle.add_report(self.report)
        bundle.params.update(
            {
                "dfmpc.module_attr": str(self.module_attr),
                "dfmpc.stage": stage,
                "dfmpc.num_swapped_modules": str(len(self.swapped)),
            }
        )
        if fp32_state is not None:
            torch.save(fp32_state, bundle.file("fp32_state_dict.pt"))
        bundle.save_state_dict("compressed_state_dict.pt", net)
        export_model = copy.deepcopy(self.qmodel).cpu().eval()
        bundle.model = export_model
        if self.export_formats:
            self._export(trainer, pl_module, bundle, export_model)
            bundle.metrics.update(_tracking.artifact_metrics(export_model))
        bundle.flush()

        if not self.tracking:
            self.local_path = bundle.persist(self.local_dir)
            rank_zero_info(f"DFMPCCallback: tracking disabled; results written to {self.local_path}")
            return

        target: Optional[_tracking.TrackingTarget] = None
        logger = self._mlflow_logger(trainer)
        uri = None
        try:
            with _tracking.short_http_timeouts(self.http_timeout):
                if logger is not None:
                    uri = _tracking.logger_tracking_uri(logger)
                    target = _tracking.target_from_logger(logger)
                else:
                    uri = _tracking.resolve_tracking_uri(self.tracking_uri)
                    tags = {"dfmpc.stage": stage, **self.tags}
                    target = _tracking.start_run(uri, self.experiment_name, self.run_name, tags)
                self.run_id = target.run_id
                step = trainer.global_step if stage == "fit" else None
                info = _tracking.upload_bundle(target, bundle, log_model=self.log_model, step=step)
                self.model_uri = info.get("model_uri")
                target.finish("FINISHED")
        except Exception as exc:  # noqa: BLE001 - any tracking failure must not lose the results
            self.tracking_error = f"{exc.__class__.__name__}: {exc}"
            reason = (
                f"MLflow tracking at {uri or self.tracking_uri or 'the default store'} failed "
                f"(run id {self.run_id}): {self.tracking_error}"
            )
            self.local_path = bundle.persist(self.local_dir, reason=reason)
            if target is not None and target.owns_run:
                try:
                    with _tracking.short_http_timeouts(min(self.http_timeout, 3.0)):
                        target.finish("FAILED")
                except Exception:  # noqa: BLE001
                    pass
            if logger is not None and _tracking.is_http(uri or ""):
                # Lightning would call finalize() on this logger at the end of fit and crash the
                # run against the dead server: detach it from the Trainer.
                trainer.loggers = [lg for lg in trainer.loggers if lg is not logger]
                reason += "; the Trainer's MLFlowLogger was detached so that training can finish"
            warnings.warn(
                f"DFMPCCallback: {reason}. Everything (report, plot, TorchScript, MLflow model, fp32 "
                f"and compressed state dicts, params.json, metrics.json) was saved to {self.local_path}",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if self.keep_local:
            self.local_path = bundle.persist(self.local_dir)
        else:
            bundle.discard()

    def _mlflow_logger(self, trainer: "pl.Trainer") -> Any:
        if not self.use_logger:
            return None
        from lightning.pytorch.loggers import MLFlowLogger

        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                return logger
        return None

    def _export(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        bundle: _tracking.RunBundle,
        model: nn.Module,
    ) -> None:
        example = self._example_input(trainer, pl_module)
        if example is None:
            rank_zero_warn(
                "DFMPCCallback: no example input for the TorchScript export (set example_input=..., "
                "or the module's example_input_array); skipping it"
            )
            return
        example_inputs = example if isinstance(example, tuple) else (example,)
        example_inputs = tuple(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in example_inputs)
        for fmt in self.export_formats:
            path = bundle.file("model" + EXPORT_SUFFIXES[fmt])
            try:
                dfmpc_fx.export_as(model, path, example_inputs, fmt, packed=self.packed_export)
            except Exception as exc:  # noqa: BLE001 - an export failure must not lose the rest
                if path.exists():
                    path.unlink()
                bundle.write_text(f"{path.name}_FAILED.txt", f"{exc.__class__.__name__}: {exc}\n")
                rank_zero_warn(f"DFMPCCallback: {fmt} export failed ({exc}); the rest is still tracked")
                continue
            if fmt == "torchscript" and self.torchscript_path is not None:
                self.torchscript_path.parent.mkdir(parents=True, exist_ok=True)
                self.torchscript_path.write_bytes(path.read_bytes())


# ---------------------------------------------------------------------- checkpoints


def restore_compressed(
    pl_module: nn.Module,
    checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
    concrete_args: Optional[dict[str, Any]] = None,
    leaf_modules: Optional[Sequence[type]] = None,
) -> list[str]:
    """Turn a freshly built module into the compressed one saved in ``checkpoint``.

    ``checkpoint`` is a Lightning checkpoint (path or loaded dict) saved after
    :class:`DFMPCCallback` compressed the network. The network is compressed with the saved
    config (to recreate the compressed module types), then the checkpoint's state dict is
    loaded strictly, so the module holds exactly the saved compressed weights and statistics.
    Returns the names of the swapped modules.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    entry = checkpoint.get(CHECKPOINT_KEY)
    if not entry or not entry.get("compressed"):
        raise dfmpc_fx.DFMPCError(
            "this checkpoint holds no compressed network (no 'dfmpc' entry): it was saved before "
            "DFMPCCallback ran, so load it the usual way"
        )
    config = dfmpc_fx.DFMPCConfig.from_dict(entry["config"])
    net = _get_submodule(pl_module, entry.get("module_attr"))
    state = checkpoint["state_dict"]
    device = next((t.device for t in [*net.parameters(), *net.buffers()]), torch.device("cpu"))
    # load what fits first, so that compression sees sensible weights, then swap, then load all
    pl_module.load_state_dict(state, strict=False)
    with torch.no_grad():
        qmodel = dfmpc_fx.compress(
            net, config, concrete_args=concrete_args, leaf_modules=list(leaf_modules or ())
        )
        swapped = list(dfmpc_fx.swap_compressed_modules(net, qmodel))
    net.to(device)
    pl_module.load_state_dict(state, strict=True)
    return swapped


def load_compressed_checkpoint(
    module_cls: type,
    checkpoint_path: Union[str, os.PathLike],
    map_location: Any = "cpu",
    **init_kwargs: Any,
) -> "pl.LightningModule":
    """Build ``module_cls`` from the checkpoint's hyper-parameters (``init_kwargs`` override or
    complete them, e.g. ``net=build_model("resnet20")`` when ``net`` was not saved) and
    restore the compressed network into it. The module is returned in eval mode."""
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    hparams = {k: v for k, v in dict(checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    hparams.update(init_kwargs)
    module = module_cls(**hparams)
    restore_compressed(module, checkpoint)
    return module.eval()
