"""The ``dfmpc`` command: list compensable layer pairs, compress a model, export and track it.

Run ``dfmpc --help`` (or ``python -m dfmpc_fx.integrations.cli --help``) for the full text.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

EXIT_OK = 0
EXIT_ERROR = 1  # unexpected failure (a bug: please report it with --debug output)
EXIT_USAGE = 2  # bad arguments: unknown option, bad bit widths, bad model spec or input shape
EXIT_FILE = 3  # a file is missing, unreadable, or does not fit the model; output not writable
EXIT_MODEL = 4  # the model cannot be traced by torch.fx or cannot be compressed

DESCRIPTION = """\
dfmpc: data-free mixed-precision compression (DF-MPC) of trained PyTorch networks.

DF-MPC needs no data. By default `compress` meets a size budget of 4 bits per weight
(--target-bits, scales counted): each layer's width is chosen from a data-free estimate of the
damage left after the BatchNorm statistics correction. Naming a pair layout instead
(--low-bits/--high-bits/--default-bits/--first-last-bits, or --method paper) quantizes the first
layer of every compensable pair to very few bits and the second to more bits, with coefficients
that compensate the error of the first (the paper's MP2/6: --low-bits 2 --high-bits 6).
"""

EPILOG = """\
MODEL is one of:
  torchvision:<name>        a torchvision architecture with random weights (nothing is
                            downloaded), e.g. torchvision:resnet18, torchvision:mobilenet_v2
  timm:<name>               a timm architecture with random weights (pretrained=False),
                            e.g. timm:resnet18, timm:efficientnet_b0
  zoo:<name>                a model of dfmpc_fx.examples.zoo, e.g. zoo:resnet20 (Fashion-MNIST, 1x28x28)
  package.module:factory    any function or class returning an nn.Module, imported from the
                            current directory or the installed packages, e.g. mymodels:make_net
Use --weights FILE to load trained weights (a state dict saved with torch.save, a
.safetensors file, or a Lightning checkpoint).

examples:
  dfmpc pairs torchvision:resnet18
  dfmpc compress torchvision:resnet18 --target-bits 3 --out resnet18_3bit.ts
  dfmpc compress torchvision:resnet18 --low-bits 2 --high-bits 6 --out resnet18_mp26.ts
  dfmpc compress zoo:resnet20 --weights checkpoints/resnet20.pt --out r20.ts \\
        --report r20.json --markdown r20.md --mlflow-uri sqlite:///mlflow.db

exit codes:
  0 success | 1 unexpected error | 2 bad arguments (bits, model spec, shape) |
  3 missing or unsuitable file | 4 model cannot be traced or compressed
"""


class CLIError(Exception):
    """A user-facing failure with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


# --------------------------------------------------------------------------- parsing


def _bits(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of bits, got {value!r}") from None


def _bits_or_none(value: str) -> Optional[int]:
    if value.lower() in ("none", "float", "fp32"):
        return None
    return _bits(value)


def _shape(value: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 1,3,224,224, got {value!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {value!r}")
    return dims


def _json_dict(value: str) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {value!r}") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"num_classes\": 10}'")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfmpc",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the dfmpc-fx version and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", metavar="MODEL", help="torchvision:<name>, timm:<name>, zoo:<name> or package.module:factory")
        p.add_argument("--weights", metavar="FILE", help="trained weights: state dict (.pt/.pth), .safetensors or Lightning .ckpt")
        p.add_argument(
            "--model-kwargs",
            metavar="JSON",
            type=_json_dict,
            default={},
            help="keyword arguments for the model factory, e.g. '{\"num_classes\": 10}'",
        )
        p.add_argument(
            "--leaf-module",
            metavar="pkg.mod:Class",
            action="append",
            default=[],
            help="a module class torch.fx should keep opaque (repeatable); use it when tracing fails inside it",
        )

    pairs = sub.add_parser(
        "pairs",
        help="list the compensable layer pairs of a model and the candidate pairs refused",
        description="Trace MODEL with torch.fx and print which consecutive layers DF-MPC can pair up "
        "(and why other candidates were refused). Nothing is written.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(pairs)
    pairs.add_argument("--json", action="store_true", help="print the pairs and refusals as JSON instead of tables")

    comp = sub.add_parser(
        "compress",
        help="compress a model, write TorchScript and a report, optionally log to MLflow",
        description="Compress MODEL with DF-MPC and write it as a TorchScript file that plain "
        "torch.jit.load can open (no dfmpc_fx needed to run it).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(comp)
    comp.add_argument("--out", metavar="FILE", required=True,
                      help="where to write the exported model (model.ts, model.pt2 or model.onnx)")
    comp.add_argument("--format", default=None, metavar="FORMAT",
                      help="torchscript (torch.jit.load), program (torch.export .pt2) or onnx (onnxruntime); "
                           "default: from the --out suffix (.pt2 -> program, .onnx -> onnx, else torchscript)")
    comp.add_argument("--packed", dest="packed", action="store_true", default=True,
                      help="store low-bit weights bit-packed (integer codes + scales, about the theoretical size; the default)")
    comp.add_argument("--float-weights", "--no-packed", dest="packed", action="store_false",
                      help="export the fake-quant float weights instead (same outputs, float-sized file)")
    comp.add_argument("--target-bits", type=float, default=None, metavar="B",
                      help="size budget: average bits per conv/linear weight, scales counted; the widths are chosen per layer "
                           "(default 4 unless a pair layout is named with --low-bits/--high-bits/--default-bits/--first-last-bits)")
    comp.add_argument("--target-bytes", type=int, default=None, metavar="N",
                      help="size budget as whole-model bytes (the report's compressed_bytes)")
    # not given: absent from the namespace (SUPPRESS), so that naming any of them selects the layout
    comp.add_argument("--low-bits", type=_bits, default=argparse.SUPPRESS, metavar="N",
                      help="pair layout: bits of the first layer of each pair (2-4, default 2)")
    comp.add_argument("--high-bits", type=_bits, default=argparse.SUPPRESS, metavar="N",
                      help="pair layout: bits of the second layer of each pair (6-8, default 6)")
    comp.add_argument("--default-bits", type=_bits_or_none, default=argparse.SUPPRESS, metavar="N",
                      help="pair layout: bits of layers in no pair (default 8; 'none' keeps them float)")
    comp.add_argument("--first-last-bits", type=_bits_or_none, default=argparse.SUPPRESS, metavar="N",
                      help="pair layout: bits of the first and last layer (default 8; 'none': no special case)")
    for flag, what in (("--fold-batchnorm", "fold each corrected BatchNorm into the quantized layer before it "
                                            "(default auto: with --target-bytes)"),
                       ("--fold-scales", "keep one scale per layer and move the per-channel ratios into the BatchNorm "
                                         "that follows (default auto: under a budget)"),
                       ("--input-scales", "per-input-channel factors from the data-free input variances "
                                          "(default auto: under a budget)")):
        comp.add_argument(flag, choices=("auto", "on", "off"), default="auto", help=what)
    comp.add_argument("--method", choices=("dfmpc", "paper"), default="dfmpc", help="'dfmpc' (default) or 'paper' (the published formulas, for reproduction)")
    comp.add_argument("--no-compensate", action="store_true", help="plain mixed precision, same bits, no compensation")
    comp.add_argument("--input-shape", type=_shape, metavar="N,C,H,W", help="example input shape for the export (default 1,3,224,224; zoo models 1,1,28,28)")
    comp.add_argument("--report", metavar="FILE", help="write the compression report as JSON")
    comp.add_argument("--markdown", metavar="FILE", help="write the compression report as Markdown")
    comp.add_argument("--plot", metavar="FILE", help="write a per-layer PNG plot (bits and weight error)")
    comp.add_argument("--mlflow-uri", metavar="URI", help="log params, metrics and artifacts to MLflow (sqlite:///mlflow.db or http://host:port)")
    comp.add_argument("--experiment", default="dfmpc", help="MLflow experiment name (default: dfmpc)")
    comp.add_argument("--run-name", help="MLflow run name")
    comp.add_argument("--local-dir", default="dfmpc_runs", help="where results go if MLflow cannot be reached (default: dfmpc_runs)")
    return parser


# --------------------------------------------------------------------------- models


def _import_object(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CLIError(f"{what} {spec!r} must look like package.module:name")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import {module_name!r} for {what} {spec!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{module_name!r} has no attribute {attr!r} (from {what} {spec!r})")
        obj = getattr(obj, part)
    return obj


def build_model(spec: str, kwargs: Optional[dict[str, Any]] = None) -> tuple[Any, tuple[int, ...]]:
    """Return ``(model, default_input_shape)`` for a MODEL spec (see the help text)."""
    from torch import nn

    kwargs = dict(kwargs or {})
    prefix, sep, name = spec.partition(":")
    if not sep or not name:
        raise CLIError(
            f"model {spec!r} is not a model spec",
            hint="use torchvision:<name>, timm:<name>, zoo:<name> or package.module:factory (see dfmpc --help)",
        )
    if prefix == "torchvision":
        import torchvision

        available = set(torchvision.models.list_models())
        if name not in available:
            close = sorted(n for n in available if name.lower()[:4] in n)[:8]
            raise CLIError(
                f"torchvision has no model {name!r}",
                hint="some names: " + ", ".join(close or sorted(available)[:8]),
            )
        kwargs.setdefault("weights", None)  # never download
        if kwargs.get("weights") is not None:
            raise CLIError("weights must stay None for torchvision models: use --weights FILE instead")
        try:
            model = torchvision.models.get_model(name, **kwargs)
        except TypeError as exc:
            raise CLIError(f"torchvision:{name} does not accept {kwargs}: {exc}") from exc
        shape = (1, 3, 299, 299) if name == "inception_v3" else (1, 3, 224, 224)
        return model, shape
    if prefix == "timm":
        try:
            import timm
        except ImportError as exc:
            raise CLIError("timm is not installed", hint="pip install 'dfmpc-fx[timm]'") from exc
        if not timm.is_model(name):
            close = timm.list_models(f"*{name[:4].lower()}*")[:8]
            raise CLIError(f"timm has no model {name!r}", hint="some names: " + ", ".join(close or timm.list_models()[:8]))
        if kwargs.pop("pretrained", False):
            raise CLIError("pretrained must stay False for timm models (nothing is downloaded): use --weights FILE instead")
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            raise CLIError(f"timm:{name} does not accept {kwargs}: {exc}") from exc
        size = model.pretrained_cfg.get("input_size", (3, 224, 224)) if hasattr(model, "pretrained_cfg") else (3, 224, 224)
        return model, (1, *size)
    if prefix == "zoo":
        # Looked up by name, as a user's package.module:factory is: the examples are not a
        # layer of the library and no library module imports them.
        zoo = importlib.import_module("dfmpc_fx.examples.zoo")

        if kwargs:
            raise CLIError("zoo models take no --model-kwargs")
        try:
            model = zoo.build_model(name)
        except (KeyError, ValueError) as exc:
            raise CLIError(f"dfmpc_fx.examples.zoo has no model {name!r}: {exc}") from exc
        return model, (1, zoo.IN_CHANNELS, 28, 28)
    factory = _import_object(spec, "model factory")
    if not callable(factory):
        raise CLIError(f"{spec!r} is not callable")
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise CLIError(f"calling {spec} with {kwargs} failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model, (1, 3, 224, 224)


def _strip_common_prefix(state: dict[str, Any], wanted: set[str]) -> Optional[dict[str, Any]]:
    keys = list(state)
    if not keys:
        return None
    head = keys[0].split(".", 1)[0] + "."
    if all(k.startswith(head) for k in keys):
        stripped = {k[len(head):]: v for k, v in state.items()}
        if set(stripped) == wanted:
            return stripped
    # keep only the keys under one prefix (e.g. a Lightning module holding net.* and more)
    for prefix in sorted({k.split(".", 1)[0] + "." for k in keys}):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(sub) == wanted:
            return sub
    return None


def load_weights(model: Any, path: str) -> None:
    """Load a state dict / safetensors / Lightning checkpoint into ``model`` (strict)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"weights file not found: {p}", EXIT_FILE, hint="check the path given to --weights")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a file error
        raise CLIError(
            f"cannot read weights from {p}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            EXIT_FILE,
            hint="--weights expects a state dict saved with torch.save(model.state_dict(), FILE), "
            "a .safetensors file, or a Lightning checkpoint",
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIError(f"{p} does not hold a state dict of tensors", EXIT_FILE)
    wanted = set(model.state_dict())
    state = obj if set(obj) == wanted else (_strip_common_prefix(obj, wanted) or obj)
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted)
    if missing or unexpected:
        raise CLIError(
            f"{p} does not fit the model: {len(missing)} missing keys"
            + (f" (e.g. {', '.join(missing[:3])})" if missing else "")
            + f", {len(unexpected)} unexpected keys"
            + (f" (e.g. {', '.join(unexpected[:3])})" if unexpected else ""),
            EXIT_FILE,
            hint="is it the state dict of the same architecture?",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CLIError(f"{p} does not fit the model: {str(exc).splitlines()[0]}", EXIT_FILE) from exc


def _leaf_modules(specs: Sequence[str]) -> Optional[list[type]]:
    from torch import nn

    if not specs:
        return None
    out = []
    for spec in specs:
        cls = _import_object(spec, "leaf module")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise CLIError(f"--leaf-module {spec!r} is not an nn.Module class")
        out.append(cls)
    return out


def _check_writable(path: Optional[str], what: str) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise CLIError(f"{what} {p} is a directory; give a file name", EXIT_FILE)
    if not parent.is_dir():
        raise CLIError(f"cannot write {what} {p}: folder {parent} does not exist", EXIT_FILE)
    if not os.access(parent, os.W_OK):
        raise CLIError(f"cannot write {what} {p}: folder {parent} is not writable", EXIT_FILE)
    return p


# --------------------------------------------------------------------------- commands


class _Steps:
    """A rich progress display of named steps on stderr (plain lines when not a terminal)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
        )

    def __enter__(self) -> "_Steps":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def run(self, description: str, fn: Callable[[], Any]) -> Any:
        task = self.progress.add_task(description, total=1)
        start = time.perf_counter()
        try:
            result = fn()
        except BaseException:
            self.progress.update(task, description=f"[red]{description} (failed)")
            raise
        self.progress.update(task, completed=1, description=f"{description} [dim]{time.perf_counter() - start:.1f}s")
        return result


def _load_model(args: argparse.Namespace, steps: _Steps) -> tuple[Any, tuple[int, ...]]:
    model, shape = steps.run(f"building {args.model}", lambda: build_model(args.model, args.model_kwargs))
    if args.weights:
        steps.run(f"loading weights {args.weights}", lambda: load_weights(model, args.weights))
    model.eval()
    return model, shape


def cmd_pairs(args: argparse.Namespace, out: Any, err: Any) -> int:
    import dfmpc_fx
    from rich.table import Table

    leaf = _leaf_modules(args.leaf_module)
    with _Steps(err) as steps:
        model, _ = _load_model(args, steps)
        search = steps.run("tracing and finding pairs", lambda: dfmpc_fx.find_compensable_pairs(model, leaf_modules=leaf or ()))
    if args.json:
        pairs = [
            {"first": p.first, "second": p.second, "bn": p.bn, "via": list(p.via), "chain": p.describe()}
            for p in search.pairs
        ]
        refusals = [
            {"layer": r.first, "reason": r.reason, "detail": r.detail, "stopped_at": r.stopped_at}
            for r in search.refusals
        ]
        out.print_json(json.dumps({"model": args.model, "pairs": pairs, "refusals": refusals}))
        return EXIT_OK
    table = Table(title=f"compensable pairs of {args.model}: {len(search.pairs)}")
    table.add_column("#", justify="right")
    table.add_column("first (low bits)")
    table.add_column("second (high bits)")
    table.add_column("BatchNorm")
    table.add_column("via")
    for i, pair in enumerate(search.pairs, 1):
        table.add_row(str(i), pair.first, pair.second, str(pair.bn or "-"), ", ".join(pair.via) or "-")
    out.print(table)
    if search.refusals:
        ref = Table(title=f"layers without a partner: {len(search.refusals)}")
        ref.add_column("layer")
        ref.add_column("reason")
        ref.add_column("detail")
        for r in search.refusals:
            ref.add_row(str(r.first), str(r.reason), str(r.detail))
        out.print(ref)
    counts = ", ".join(f"{k}: {v}" for k, v in search.refusal_counts().items()) or "none"
    out.print(f"{len(search.pairs)} pairs over {len(search.layers)} weighted layers; refusals by reason: {counts}")
    return EXIT_OK


def _layout(cfg: Any) -> str:
    if cfg.target_bits is not None:
        return f"budget {cfg.target_bits:g} bits/w"
    if cfg.target_bytes is not None:
        return f"budget {cfg.target_bytes} bytes"
    return f"MP{cfg.low_bits}/{cfg.high_bits}"


def cmd_compress(args: argparse.Namespace, out: Any, err: Any) -> int:
    import torch

    import dfmpc_fx

    from . import tracking

    try:
        layout = {name: getattr(args, name) for name in ("low_bits", "high_bits", "default_bits", "first_last_bits")
                  if hasattr(args, name)}
        cfg = dfmpc_fx.DFMPCConfig(
            **layout,
            method=args.method,
            compensate=not args.no_compensate,
            target_bits="auto" if args.target_bits is None else args.target_bits,
            target_bytes=args.target_bytes,
            **{name: {"auto": "auto", "on": True, "off": False}[getattr(args, name)]
               for name in ("fold_batchnorm", "fold_scales", "input_scales")},
        )
    except dfmpc_fx.ConfigError as exc:
        raise CLIError(f"bad bit widths or options: {exc}", EXIT_USAGE, hint="see dfmpc compress --help") from exc
    out_path = _check_writable(args.out, "--out")
    from ..artifacts.export import EXPORT_SUFFIXES, export_format_for

    fmt = args.format or export_format_for(out_path)
    if fmt not in EXPORT_SUFFIXES:
        raise CLIError(f"unknown --format {fmt!r}: use one of {', '.join(EXPORT_SUFFIXES)}", EXIT_USAGE)
    report_path = _check_writable(args.report, "--report")
    md_path = _check_writable(args.markdown, "--markdown")
    plot_path = _check_writable(args.plot, "--plot")
    mlflow_uri = None
    if args.mlflow_uri:
        try:
            mlflow_uri = tracking.resolve_tracking_uri(args.mlflow_uri)
        except ValueError as exc:
            raise CLIError(str(exc), EXIT_USAGE) from exc
    leaf = _leaf_modules(args.leaf_module)

    with _Steps(err) as steps:
        model, default_shape = _load_model(args, steps)
        shape = args.input_shape or default_shape
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        qmodel = steps.run(
            f"compressing ({_layout(cfg)}, {cfg.method})",
            lambda: dfmpc_fx.compress(model, cfg, leaf_modules=leaf or ()),
        )

        def export() -> float:
            try:
                return dfmpc_fx.export_as(qmodel, out_path, (example,), fmt, packed=args.packed)
            except dfmpc_fx.ExportError as exc:
                raise CLIError(
                    f"the {fmt} export failed for input shape {tuple(shape)}: {str(exc).splitlines()[0]}",
                    EXIT_MODEL,
                    hint="check the input size (--input-shape N,C,H,W); for onnx: pip install onnx onnxscript onnxruntime",
                ) from exc
            except (RuntimeError, TypeError, ValueError) as exc:
                if isinstance(exc, dfmpc_fx.DFMPCError):
                    raise
                raise CLIError(
                    f"the {fmt} export failed for input shape {tuple(shape)}: {str(exc).splitlines()[0]}",
                    EXIT_MODEL,
                    hint="give the right input size with --input-shape N,C,H,W",
                ) from exc

        max_diff = steps.run(f"exporting {fmt}{' (packed)' if args.packed else ''} to {out_path}", export)
        report = dfmpc_fx.get_report(qmodel)  # now with artifact_bytes when the export was packed
        if report_path:
            report_path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        if md_path:
            md_path.write_text(report.to_markdown())
        if plot_path:
            tracking.plot_layers(report, plot_path, title=args.model)
        logged = None
        if mlflow_uri:
            logged = steps.run(f"logging to MLflow {mlflow_uri}", lambda: _log_mlflow(args, mlflow_uri, report, qmodel, out_path))

    _print_summary(out, args, report, out_path, fmt, max_diff)
    if logged:
        if logged.get("run_id"):
            out.print(f"MLflow run [bold]{logged['run_id']}[/] in experiment '{args.experiment}' at {mlflow_uri}")
        if logged.get("local_path"):
            err.print(f"[yellow]warning:[/] MLflow failed ({logged['error']}); results saved to {logged['local_path']}")
    return EXIT_OK


def _log_mlflow(args: argparse.Namespace, uri: str, report: Any, qmodel: Any, ts_path: Path) -> dict[str, Any]:
    import shutil

    from . import tracking

    bundle = tracking.RunBundle()
    bundle.add_report(report)
    bundle.params["dfmpc.model"] = args.model
    bundle.params["dfmpc.weights"] = str(args.weights)
    shutil.copyfile(ts_path, bundle.file("model" + (ts_path.suffix or ".ts")))
    bundle.metrics.update(tracking.artifact_metrics(qmodel))
    bundle.model = qmodel
    target = None
    try:
        with tracking.short_http_timeouts():
            target = tracking.start_run(uri, args.experiment, args.run_name, {"dfmpc.source": "cli"})
            info = tracking.upload_bundle(target, bundle)
            target.finish()
        bundle.discard()
        return info
    except Exception as exc:  # noqa: BLE001 - never lose the results for a tracking failure
        error = f"{exc.__class__.__name__}: {exc}"
        path = bundle.persist(args.local_dir, reason=f"MLflow tracking at {uri} failed: {error}")
        warnings.warn(f"MLflow tracking at {uri} failed ({error}); results saved to {path}", RuntimeWarning, stacklevel=2)
        return {"run_id": None, "local_path": str(path), "error": error}


def _print_summary(out: Any, args: argparse.Namespace, report: Any, out_path: Path, fmt: str, max_diff: float) -> None:
    from rich.table import Table

    layers = Table(title=f"{args.model}: per-layer bits")
    for col, justify in (("layer", "left"), ("kind", "left"), ("role", "left"), ("bits", "right"), ("params", "right"), ("rel. weight error", "right")):
        layers.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for layer in report.layers:
        err = layer.weight_rel_error
        layers.add_row(
            layer.name,
            layer.kind,
            layer.role,
            "float" if layer.bits is None else str(layer.bits),
            f"{layer.numel:,}",
            "-" if err is None else f"{float(err):.4f}",
        )
    out.print(layers)
    summary = Table(title="summary", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("compensable pairs", str(report.num_pairs))
    summary.add_row("size fp32", f"{report.float_bytes / 1e6:.3f} MB")
    summary.add_row("size compressed", f"{report.compressed_bytes / 1e6:.3f} MB")
    summary.add_row("compression ratio", f"x{float(report.compression_ratio):.2f}")
    summary.add_row("compress time", f"{float(report.compress_seconds):.2f} s")
    summary.add_row(f"{fmt} file{' (packed)' if args.packed else ''}", f"{out_path} ({out_path.stat().st_size / 1e6:.3f} MB)")
    summary.add_row(f"{fmt} reloaded vs in-memory (max abs diff)", f"{max_diff:.2e}")
    out.print(summary)


# --------------------------------------------------------------------------- entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    from rich.console import Console
    from rich.markup import escape as rich_escape

    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    if args.version:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"dfmpc-fx {version('dfmpc-fx')}")
        except PackageNotFoundError:
            out.print("dfmpc-fx (not installed as a distribution)")
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        import dfmpc_fx

        handler = {"pairs": cmd_pairs, "compress": cmd_compress}[args.command]
        return handler(args, out, err)
    except CLIError as exc:
        err.print(f"[bold red]error:[/] {rich_escape(str(exc))}", soft_wrap=True)
        if exc.hint:
            err.print(f"hint: {exc.hint}", soft_wrap=True)
        return exc.code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - map library errors to exit codes
        code, hint = EXIT_ERROR, "run again with --debug for the full traceback and report it"
        if isinstance(exc, getattr(dfmpc_fx, "TraceError", ())):
            code = EXIT_MODEL
            hint = (
                "torch.fx could not trace the model; mark the offending submodule class opaque with "
                "--leaf-module package.module:Class, or compress it from Python with concrete_args=..."
            )
        elif isinstance(exc, getattr(dfmpc_fx, "InvalidModelError", ())):
            code, hint = EXIT_MODEL, None
        elif isinstance(exc, getattr(dfmpc_fx, "ConfigError", ())):
            code, hint = EXIT_USAGE, "see dfmpc compress --help"
        elif isinstance(exc, getattr(dfmpc_fx, "DFMPCError", ())):
            code, hint = EXIT_MODEL, None
        if args.debug:
            err.print_exception()
        text = str(exc).strip()
        if code == EXIT_ERROR and text:
            text = text.splitlines()[0]
        err.print(f"[bold red]error:[/] {exc.__class__.__name__}: {rich_escape(text)}", soft_wrap=True)
        if hint:
            err.print(f"hint: {hint}", soft_wrap=True)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
