"""Accuracy benchmark on real data: DF-MPC against plain mixed precision, the paper, peer tools
and a data-aware reference, on the committed Fashion-MNIST checkpoints.

One command regenerates the table, the plot and the machine-readable results:

    .venv/bin/python benchmarks/accuracy.py          # add --peers for the AIMET/Brevitas rows,
                                                     # --ablation for the design-choice rows

Options: ``--models resnet20 vgg_small`` (default: every model in ``dfmpc_fx.examples.zoo.MODELS`` with a
committed checkpoint; the others are listed as missing), ``--subset N`` (evaluate on the first N
test images only: quick runs, never committed), ``--peers`` (add AIMET / Brevitas rows; a peer
that is not installed is reported as skipped with the reason), ``--ablation`` (add, at MP2/6,
the paper's quantizers without compensation and the two other ``scale_rule`` values),
``--out BENCHMARKS.md``, ``--json benchmarks/results.json``, ``--plot benchmarks/accuracy_vs_size.png``,
``--threads N`` (default: every CPU). A model identical to one already evaluated (same code and
tensors, e.g. every MP row of a network with no compensable pair) reuses that evaluation.

Every row quantizes weights only (activations stay float, as in the paper). Every accuracy is
top-1 on the Fashion-MNIST test set (full 10k unless ``--subset``); the same forward pass also
gives the accuracy on the first 1000 test images, stored in the JSON for the reproduction test
(``tests/test_benchmark_reproduction.py``).
"""

from __future__ import annotations

import time

_PROCESS_T0 = time.perf_counter()  # before the heavy imports: setup time includes them

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import dfmpc_fx  # noqa: E402
from dfmpc_fx import DFMPCConfig  # noqa: E402
from dfmpc_fx.examples.data import calibration_subset, load_fashion_mnist  # noqa: E402
from dfmpc_fx.examples.zoo import MODELS, default_checkpoint_dir, load_pretrained  # noqa: E402

SETTINGS: dict[str, tuple[int, int]] = {"MP2/6": (2, 6), "MP3/6": (3, 6), "MP4/8": (4, 8)}
FIRST_N = 1000  # the reproduction test's subset: the first 1000 test images
EVAL_BATCH = 250  # divides 1000: the first-1000 figures use the very same batches
CALIB_N = 2000
CALIB_BATCH = 500
ABLATION_SETTINGS = ("MP2/6",)  # where the paper's own quantizers and the other scale rules are shown


@dataclass
class Row:
    """One line of the table: how to build the model and what it is."""

    key: str  # unique within a model, e.g. "dfmpc@MP2/6"
    method: str  # e.g. "dfmpc (batchnorm, default)"
    setting: str  # "FP32", "MP2/6", "MP3/6", "MP4/8", "W4 all"
    kind: str  # "fp32" | "compress" | "bn_reestimate" | "peer"
    config: Optional[dict[str, Any]] = None  # DFMPCConfig fields
    peer: Optional[str] = None  # "aimet" | "brevitas"
    data_free: bool = True
    ablation: bool = False  # a design-choice row, only with --ablation


def _cfg_dict(**kw: Any) -> dict[str, Any]:
    return kw


def build_rows(peers: bool = False, ablation: bool = False) -> list[Row]:
    """The benchmark's rows, in table order (the reproduction test imports this)."""
    rows = [Row("fp32", "FP32", "FP32", "fp32")]
    for setting, (lo, hi) in SETTINGS.items():
        rows += [
            Row(f"plain@{setting}", "plain MP (per-channel, no compensation)", setting, "compress",
                _cfg_dict(low_bits=lo, high_bits=hi, compensate=False)),
            Row(f"paper@{setting}", "paper (Eq. 27, lambda1=0.5)", setting, "compress",
                _cfg_dict(low_bits=lo, high_bits=hi, method="paper")),
            Row(f"dfmpc@{setting}", "dfmpc, default (scale_rule=batchnorm)", setting, "compress",
                _cfg_dict(low_bits=lo, high_bits=hi)),
        ]
        if ablation and setting in ABLATION_SETTINGS:
            # Ablations where they matter (2-bit layers).
            rows += [
                Row(f"paper_plain@{setting}", "paper's quantizers, no compensation (TWN/DoReFa, per-layer)",
                    setting, "compress", _cfg_dict(low_bits=lo, high_bits=hi, method="paper", compensate=False),
                    ablation=True),
                Row(f"dfmpc_ls@{setting}", "dfmpc, scale_rule=least_squares", setting, "compress",
                    _cfg_dict(low_bits=lo, high_bits=hi, scale_rule="least_squares"), ablation=True),
                Row(f"dfmpc_var@{setting}", "dfmpc, scale_rule=variance", setting, "compress",
                    _cfg_dict(low_bits=lo, high_bits=hi, scale_rule="variance"), ablation=True),
            ]
        if peers:
            rows += [
                Row(f"aimet@{setting}", "AIMET equalize_model + plain MP", setting, "peer",
                    _cfg_dict(low_bits=lo, high_bits=hi, compensate=False), peer="aimet"),
                Row(f"brevitas@{setting}", "Brevitas preprocess_for_quantize (equalize) + plain MP",
                    setting, "peer", _cfg_dict(low_bits=lo, high_bits=hi, compensate=False),
                    peer="brevitas"),
            ]
        rows.append(
            Row(f"bn_ref@{setting}", "data-aware reference: plain MP + BN re-estimated (2,000 train images)",
                setting, "bn_reestimate", _cfg_dict(low_bits=lo, high_bits=hi, compensate=False),
                data_free=False)
        )
    # Uniform per-channel W4 on every weighted layer. The config ranges refuse high_bits < 6
    # unless max_bits is raised, hence max_bits=16 (it only widens the allowed range).
    rows.append(
        Row("w4@all", "uniform per-channel W4, all layers (no compensation)", "W4 all", "compress",
            _cfg_dict(low_bits=4, high_bits=4, default_bits=4, first_last_bits=4, max_bits=16,
                      compensate=False))
    )
    return rows


# --------------------------------------------------------------------------- evaluation


def model_logits(model: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """The model's outputs on ``images``, ``(N, classes)``. Eval mode, inference_mode,
    channels_last copies (about 2x faster on one CPU thread; same results up to float
    rounding). The model passed in is not modified."""
    was_training = model.training
    model.eval()
    model = model.to(memory_format=torch.channels_last)  # in place on the module; same function
    out = []
    try:
        with torch.inference_mode():
            for s in range(0, images.shape[0], batch_size):
                out.append(model(images[s:s + batch_size].contiguous(memory_format=torch.channels_last)))
    finally:
        model.train(was_training)
    return torch.cat(out)


def predictions_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Boolean tensor: is each test image classified correctly (top-1)? See :func:`model_logits`."""
    return model_logits(model, images, batch_size).argmax(dim=1) == labels


def fidelity(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """How closely a compressed model reproduces the float model on the same images:
    (top-1 agreement with the reference's predictions in percent, relative logit error
    ``||z - z_ref||^2 / ||z_ref - mean(z_ref)||^2``). What a data-free method can aim at: it
    has no labels, so it can only reproduce the float model, not improve on it."""
    agree = 100.0 * float((logits.argmax(dim=1) == reference.argmax(dim=1)).float().mean())
    centred = reference - reference.mean(dim=0)
    err = float(((logits.double() - reference.double()) ** 2).sum() / (centred.double() ** 2).sum())
    return round(agree, 2), err


def accuracies(correct: torch.Tensor) -> tuple[float, float]:
    """(accuracy on everything evaluated, accuracy on the first FIRST_N images), percent."""
    full = 100.0 * float(correct.float().mean())
    first = 100.0 * float(correct[:FIRST_N].float().mean())
    return round(full, 2), round(first, 2)


# --------------------------------------------------------------------------- reference


def reestimate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = CALIB_BATCH) -> nn.Module:
    """Data-aware reference (uses training images): reset every BatchNorm's running statistics,
    momentum=None (cumulative average over the batches), forward ``images`` in train mode under
    no_grad, then eval. Modifies ``model`` in place and returns it."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            model(images[s:s + batch_size])
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


# --------------------------------------------------------------------------- one row


def layer_bits(qmodel: nn.Module) -> dict[str, Any]:
    rep = dfmpc_fx.get_report(qmodel)
    return {layer.name: layer.bits for layer in rep.layers}


def model_digest(model: nn.Module) -> str:
    """sha256 of the generated code and every tensor of ``model``: two rows whose models have the
    same digest compute the same function, so the second reuses the first's evaluation."""
    import hashlib

    h = hashlib.sha256(str(getattr(model, "code", type(model).__name__)).encode())
    for key, t in model.state_dict().items():
        h.update(key.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def run_row(row: Row, name: str, images: torch.Tensor, labels: torch.Tensor,
            calib: Optional[Callable[[], torch.Tensor]] = None,
            eval_cache: Optional[dict[str, tuple[torch.Tensor, str]]] = None) -> dict[str, Any]:
    """Build one row's model from the committed checkpoint of ``name`` and evaluate it.

    ``eval_cache`` (digest -> predictions) skips evaluating a model identical to one already
    evaluated (e.g. every MP row of a network without compensable pairs is all 8-bit)."""
    res: dict[str, Any] = {"key": row.key, "method": row.method, "setting": row.setting,
                           "kind": row.kind, "config": row.config, "data_free": row.data_free}
    model = load_pretrained(name)
    if row.kind == "fp32":
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                     if t.is_floating_point())
        res.update(size_mb=round(nbytes / 1e6, 4), seconds=0.0)
        final = model
    elif row.kind in ("compress", "bn_reestimate"):
        cfg = DFMPCConfig(**row.config)
        t0 = time.perf_counter()
        q = dfmpc_fx.compress(model, cfg)
        extra = 0.0
        if row.kind == "bn_reestimate":
            t1 = time.perf_counter()
            reestimate_batchnorm(q, calib())
            extra = time.perf_counter() - t1
        rep = dfmpc_fx.get_report(q)
        res.update(size_mb=round(rep.compressed_mb, 4), float_mb=round(rep.float_mb, 4),
                   seconds=round(rep.compress_seconds + extra, 3),
                   compress_seconds=round(rep.compress_seconds, 3), num_pairs=rep.num_pairs,
                   wall_seconds=round(time.perf_counter() - t0, 3))
        final = q
    elif row.kind == "peer":
        from benchmarks_peers import run_peer  # type: ignore  # set up in main()/_import_peers

        out = run_peer(row.peer, model, DFMPCConfig(**row.config))
        if out.get("skipped"):
            res.update(skipped=out["reason"])
            return res
        q = out["model"]
        rep = dfmpc_fx.get_report(q)
        res.update(size_mb=round(rep.compressed_mb, 4), float_mb=round(rep.float_mb, 4),
                   seconds=round(out["preprocess_seconds"] + rep.compress_seconds, 3),
                   preprocess_seconds=round(out["preprocess_seconds"], 3),
                   compress_seconds=round(rep.compress_seconds, 3), num_pairs=rep.num_pairs,
                   peer_detail=out.get("detail"))
        final = q
    else:  # pragma: no cover
        raise ValueError(row.kind)
    t0 = time.perf_counter()
    digest = model_digest(final) if eval_cache is not None else None
    if digest is not None and digest in eval_cache:
        correct, same_as = eval_cache[digest]
        res["same_model_as"] = same_as
    else:
        correct = predictions_correct(final, images, labels)
        if digest is not None:
            eval_cache[digest] = (correct, row.key)
    res["eval_seconds"] = round(time.perf_counter() - t0, 2)
    res["acc"], res["acc_first1000"] = accuracies(correct)
    res["n_test"] = int(correct.numel())
    return res


def _import_peers() -> None:
    """Make benchmarks/peers.py importable as ``benchmarks_peers`` (benchmarks/ is no package)."""
    import importlib.util

    if "benchmarks_peers" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("benchmarks_peers", Path(__file__).with_name("peers.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks_peers"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- output


def _git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""

    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "dfmpc_fx").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "dfmpc_fx_uncommitted_changes": dirty}


def _machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except Exception:  # noqa: BLE001
        mem = float("nan")
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), "
            f"{mem:.0f} GiB RAM, no GPU used; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s)")


def _fmt(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


#: Ends this script's part of BENCHMARKS.md; what follows it (the MTCNN, MiniLM and fidelity
#: sections, written from their own scripts' output) is kept when the table is rewritten.
GENERATED_END = "<!-- accuracy:end -->"


def _write_markdown(path: Path, text: str) -> None:
    """Write BENCHMARKS.md, keeping the accuracy-per-byte section benchmarks/budget.py owns
    and everything after :data:`GENERATED_END`."""
    begin, end = "<!-- budget:begin -->", "<!-- budget:end -->"
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        text = old[old.index(begin):old.index(end) + len(end)] + "\n\n" + text
    if GENERATED_END in old and text.rstrip("\n").endswith(GENERATED_END):
        text = text.rstrip("\n") + old[old.index(GENERATED_END) + len(GENERATED_END):]
    path.write_text(text)


def render_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Accuracy benchmark: DF-MPC on real data",
        "",
        "Generated by `benchmarks/accuracy.py`; do not edit by hand. Fashion-MNIST, committed "
        "checkpoints in `checkpoints/`, weights quantized only (activations float, as in the paper), "
        f"top-1 accuracy on the {'full 10k' if meta['n_test'] == 10000 else str(meta['n_test'])} test images. "
        "Size is the model as stored (`get_report(q).compressed_mb`: packed low-bit codes plus "
        "scales plus float BatchNorm/bias parameters); FP32 size is the float state dict. "
        "Time is compress time (`get_report(q).compress_seconds`), plus the peer's "
        "pre-processing, or plus the BatchNorm re-estimation for the data-aware reference row.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}",
        f"- Started {meta['started_utc']}, total wall time {meta['total_seconds'] / 60:.1f} min "
        f"(evaluation dominates; per model: "
        + ", ".join(f"{m} {s / 60:.1f} min" for m, s in meta["model_seconds"].items()) + ")",
        *( [f"- Interpreter: {meta['interpreter_note']}"] if meta.get("interpreter_note") else []),
        *( [f"- Time of the command without `--peers` and `--ablation` (setup {meta['setup_seconds']:.0f} s "
            "plus the sum of compress + evaluation over its rows): "
            + ", ".join(f"{m} {v / 60:.1f} min" for m, v in meta["seconds_default_rows"].items())
            + f"; **{meta['seconds_default_command'] / 60:.1f} min in all**"
            + "".join(f"; {label} rows: " + ", ".join(f"{m} {v / 60:.1f} min" for m, v in meta[key].items())
                      for key, label in (("seconds_peer_rows", "peer"), ("seconds_ablation_rows", "ablation"))
                      if meta.get(key))]
           if meta.get("seconds_default_rows") else []),
        f"- Code: commit `{meta['git']['commit'][:12]}`"
        + (f" with uncommitted changes in {', '.join(meta['git']['dfmpc_fx_uncommitted_changes'])}"
           if meta["git"]["dfmpc_fx_uncommitted_changes"] else ""),
        "- Rows: *plain MP* = `compress(m, DFMPCConfig(low, high, compensate=False))` (per-channel "
        "quantizers, identical bit assignment, no mean correction); *paper* = `method=\"paper\"`; "
        "*dfmpc* rows = `method=\"dfmpc\"` with each `scale_rule`; *W4 all* = "
        "`DFMPCConfig(low_bits=4, high_bits=4, default_bits=4, first_last_bits=4, max_bits=16, "
        "compensate=False)` (max_bits=16 only lifts the config's high_bits >= 6 range check); "
        "peers = the peer's data-free pre-processing, then `compress(pre, cfg, compensate=False)`; "
        "*data-aware reference* = plain MP, then every BatchNorm's statistics re-estimated on "
        f"{CALIB_N} training images (`calibration_subset(2000, seed=0)`, momentum=None, train-mode "
        "forward under no_grad): it uses data, the others do not.",
    ]
    for u in meta.get("updates", []):
        lines.append(f"- Rows {', '.join(f'`{k}`' for k in u['rows'])} re-evaluated on {u['started_utc']} "
                     f"(`{u['command']}`, commit `{u['git']['commit'][:12]}`"
                     + (f" with uncommitted changes in {', '.join(u['git']['dfmpc_fx_uncommitted_changes'])}"
                        if u["git"]["dfmpc_fx_uncommitted_changes"] else "")
                     + f", {u['total_seconds'] / 60:.1f} min, {u['threads']} thread(s)); every other row is from the "
                     "run above")
    if meta.get("missing_models"):
        lines.append("- Not in this table (no committed checkpoint when it ran): "
                     + ", ".join(meta["missing_models"]))
    if meta.get("peers_note"):
        lines.append(f"- Peers: {meta['peers_note']}")
    lines.append("")
    for name, mres in results["models"].items():
        fp = mres["rows"][0]["acc"]
        lines += [f"## {name} (FP32 {fp:.2f}%)", "",
                  "| setting | method | top-1 % | drop vs FP32 | size MB | time s |",
                  "|---|---|---|---|---|---|"]
        for r in mres["rows"]:
            if r.get("skipped"):
                lines.append(f"| {r['setting']} | {r['method']} | skipped: {r['skipped']} | | | |")
                continue
            drop = fp - r["acc"]
            meth = r["method"] if r["data_free"] else f"*{r['method']}*"
            if r.get("same_model_as"):
                meth += f" (same model as `{r['same_model_as']}`)"
            lines.append(f"| {r['setting']} | {meth} | {r['acc']:.2f} | {drop:+.2f} | "
                         f"{r['size_mb']:.3f} | {_fmt(r['seconds'])} |")
        lines.append("")
        lines += summarize_model(name, mres)
        lines.append("")
    lines += NOTES
    lines.append(GENERATED_END)
    return "\n".join(lines) + "\n"


NOTES = [
    "## Where methods lose, and why",
    "",
    "- **Plain MP2/6 collapses** because per-channel 2-bit weights shift and shrink every "
    "low-bit channel's output statistics; the following BatchNorm still normalises with the "
    "float model's statistics, and the error compounds over the pairs. The data-aware reference "
    "shows how much of the collapse is exactly that: re-estimating BatchNorm statistics alone, "
    "with the identical quantized weights, recovers nearly all of it.",
    "- **The paper's method** (`method=\"paper\"`) is compared twice: against plain MP with our "
    "per-channel quantizers, and against its own TWN/DoReFa per-layer quantizers without "
    "compensation (*paper's quantizers, no compensation*). Inside pairs it uses the paper's "
    "quantizers as published (TWN at 2 bits, tanh DoReFa above); every layer outside a pair "
    "(first/last at 8 bits, default layers) gets DoReFa's uniform grid without the tanh, since the "
    "tanh warps weights (8-bit relative weight errors of 0.3-8). At MP2/6 its Eq. 27 scale "
    "moves its own quantizers by -4.2 to +2.0 points: a per-channel scale cannot undo a mean "
    "shift, and the row stays near plain MP's collapse. Until these rows were re-run the first/last "
    "layers had the tanh form too, and the paper's MP2/6 row recovered 60-80% of plain MP's "
    "collapse: measured on resnet20 (first 1000 test images), that came from the tanh warp of "
    "the first convolution alone (a gain of about 1.45 on its small weights; 25.9% without it, "
    "76.4% with only that layer warped), an accident of the warp, not the method. At MP3/6 it "
    "is now 0.9-3.2 points below FP32 and below the default on every model with pairs (one scale "
    "per layer, no zero level); at MP4/8 it is within 0.3 points of FP32 and of the default.",
    "- **scale_rule=least_squares** minimises each channel's output error, which shrinks the "
    "channel (regression towards zero: c times the quantized output has less variance than the "
    "float output). The next BatchNorm divides by the float model's variance, so the attenuation "
    "propagates; at 2 bits, where the shrinkage is largest, it loses to `variance` and to the "
    "default `batchnorm` rule, which restore the variance (the latter around the corrected mean, "
    "with the part of each quantized filter along the float filter scaling the recorded BatchNorm "
    "variance and the rounding remainder seeing only per-channel input variances).",
    "- **Peers (AIMET cross-layer equalization, Brevitas graph equalization)** rescale output "
    "channels of a layer and the matching input channels of the next. With per-channel "
    "quantizers (used by every row here) a layer's quantization error is invariant to a scale of "
    "its *output* channels, so equalization acts only through the rescaled *input* columns of the "
    "next layer. In a ResNet basic block the low-bit conv reads the residual stream, which "
    "neither peer rescales, so only the 6-bit layer changes and the peers stay near plain MP at "
    "MP2/6; in a plain VGG chain the low-bit layers' input columns are equalized too and the "
    "peers recover part of the collapse, still far from the default. Neither corrects the "
    "BatchNorm statistics shift. Equalization was designed for per-tensor quantizers. Their "
    "sizes are a little smaller because the peers fold BatchNorm into the convolutions (fewer "
    "float parameters stored). Brevitas's `preprocess_for_quantize` also rewrites ReLU6 into "
    "ReLU by default (`relu6_to_relu=True`), which changes the float function; on "
    "MobileNetV2 that creates compensable pairs, so its rows there get 2- or 3-bit layers the "
    "other rows do not have (hence their smaller size): not the identical bit assignment, and "
    "its MP2/6 collapse there is plain low-bit quantization of layers the others keep at 8 bits.",
    "- **Uniform per-channel W4** on every layer (first and last included) is close to FP32 on "
    "these small Fashion-MNIST networks and is smaller than MP2/6 here, because MP keeps the "
    "first/last layers and layers in no pair at 8 bits. MP2/6's size advantage appears only "
    "where paired layers dominate the parameter count.",
    "",
]


def _get(mres: dict[str, Any], key: str) -> Optional[dict[str, Any]]:
    for r in mres["rows"]:
        if r["key"] == key and not r.get("skipped"):
            return r
    return None


def summarize_model(name: str, mres: dict[str, Any]) -> list[str]:
    """Plain-language checks of what the issue asks the table to show (computed, not written)."""
    fp = mres["rows"][0]["acc"]
    out = [f"What the {name} rows show:", ""]
    d26 = _get(mres, "dfmpc@MP2/6")
    if d26 is not None and d26.get("num_pairs") == 0:
        out.append(f"- **{name} has no compensable pair** (see `find_compensable_pairs`: e.g. ReLU6 is "
                   "scale-varying and refused, residual adds are never compensated), so every MP row "
                   "quantizes every layer at 8 bits (`default_bits`), no layer gets low bits, and the "
                   "MP rows compare 8-bit quantizers only, not compensation (the paper's rows: its "
                   "per-layer DoReFa grid without tanh, as every layer outside a pair gets).")
    for setting in SETTINGS:
        plain, pplain, paper, d, ref = (_get(mres, f"{k}@{setting}") for k in
                                        ("plain", "paper_plain", "paper", "dfmpc", "bn_ref"))
        if not (plain and paper and d):
            continue
        parts = [f"- {setting}: drop from FP32: plain {fp - plain['acc']:.2f}, "
                 + (f"paper's quantizers alone {fp - pplain['acc']:.2f}, " if pplain else "")
                 + f"paper {fp - paper['acc']:.2f}, "
                 f"default {fp - d['acc']:.2f}" + (f", data-aware reference {fp - ref['acc']:.2f}" if ref else "") + "."]
        if setting in ("MP2/6", "MP3/6"):
            win = d["acc"] > paper["acc"]
            parts.append(f" Default {'beats' if win else 'does NOT beat'} the paper "
                         f"({d['acc'] - paper['acc']:+.2f}).")
        plain_drop = fp - plain["acc"]
        if plain_drop > 1.0:
            rec = (paper["acc"] - plain["acc"]) / plain_drop
            parts.append((f" Paper recovers {100 * rec:.0f}% of plain MP's drop" if rec >= 0 else
                          f" Paper is {plain['acc'] - paper['acc']:.2f} points BELOW plain MP")
                         + (f" (it recovers {100 * (paper['acc'] - pplain['acc']) / max(fp - pplain['acc'], 1e-9):.0f}% "
                            "of its own quantizers' drop)" if pplain and fp - pplain["acc"] > 1.0 else "")
                         + f"; default {100 * (d['acc'] - plain['acc']) / plain_drop:.0f}%.")
        if ref:
            parts.append(f" Default is {ref['acc'] - d['acc']:+.2f} points from the data-aware reference.")
        out.append("".join(parts))
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    markers = {"MP2/6": "o", "MP3/6": "s", "MP4/8": "^", "W4 all": "D", "FP32": "*"}
    for ax, name in zip(axes[0], models):
        rows = [r for r in results["models"][name]["rows"] if not r.get("skipped")]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        cmap = plt.get_cmap("tab10")
        for i, meth in enumerate(methods):
            pts = [r for r in rows if r["method"] == meth]
            for r in pts:
                ax.scatter(r["size_mb"], r["acc"], color=cmap(i % 10), marker=markers.get(r["setting"], "x"),
                           s=90 if r["setting"] == "FP32" else 45, edgecolor="k", linewidth=0.4,
                           label=meth if r is pts[0] else None)
            mp = sorted((r for r in pts if r["setting"].startswith("MP")), key=lambda r: r["size_mb"])
            if len(mp) > 1:
                ax.plot([r["size_mb"] for r in mp], [r["acc"] for r in mp], color=cmap(i % 10), lw=0.8, alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("model size as stored (MB, log scale)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{name}: o MP2/6, s MP3/6, ^ MP4/8, D W4, * FP32")
        ax.grid(alpha=0.3)
        lo = min(r["acc"] for r in rows)
        ax.set_ylim(max(0.0, lo - 3), 100)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="default: every model with a committed checkpoint")
    p.add_argument("--subset", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--peers", action="store_true", help="add AIMET / Brevitas pre-processing rows")
    p.add_argument("--ablation", action="store_true",
                   help="add design-choice rows at MP2/6 (paper's quantizers alone, other scale rules)")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results.json"))
    p.add_argument("--plot", default=str(REPO / "benchmarks" / "accuracy_vs_size.png"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads (default: every CPU)")
    p.add_argument("--render-only", action="store_true",
                   help="re-render --out and --plot from an existing --json (no evaluation)")
    p.add_argument("--rows", nargs="+", default=None, metavar="PATTERN",
                   help="re-evaluate only the rows whose key matches a pattern (fnmatch, e.g. 'paper*') and "
                        "replace them in the existing --json, keeping every other row and recording the update "
                        "in its meta; use it after a change that affects only those rows")
    args = p.parse_args(argv)
    if args.rows:
        return update_rows(args, argv)
    if args.render_only:
        results = json.loads(Path(args.json).read_text())
        _write_markdown(Path(args.out), render_markdown(results))
        plot(results, Path(args.plot))
        print(f"re-rendered {args.out} and {args.plot} from {args.json}")
        return 0

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("once", category=dfmpc_fx.NoCompensablePairWarning)
    torch.manual_seed(0)
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    ckdir = default_checkpoint_dir()
    available = [m for m in MODELS if (Path(ckdir) / f"{m}.pt").is_file()]
    models = args.models or available
    missing = [m for m in MODELS if m not in models]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}: choose from {', '.join(MODELS)}")

    images, labels = load_fashion_mnist("test")
    if args.subset:
        images, labels = images[:args.subset], labels[:args.subset]
    calib_cache: dict[str, torch.Tensor] = {}

    def calib() -> torch.Tensor:
        if "x" not in calib_cache:
            calib_cache["x"] = calibration_subset(CALIB_N, seed=0)
        return calib_cache["x"]

    peers_note = None
    if args.peers:
        _import_peers()
        import benchmarks_peers  # type: ignore

        peers_note = benchmarks_peers.describe()
    rows = build_rows(peers=args.peers, ablation=args.ablation)
    setup_seconds = round(time.perf_counter() - _PROCESS_T0, 1)
    results: dict[str, Any] = {"models": {}}
    model_seconds: dict[str, float] = {}
    core_seconds: dict[str, float] = {}  # the rows of the plain command (the 20-minute target)
    peer_seconds: dict[str, float] = {}
    ablation_seconds: dict[str, float] = {}
    for name in models:
        tm = time.perf_counter()
        mres: dict[str, Any] = {"rows": []}
        eval_cache: dict[str, tuple[torch.Tensor, str]] = {}
        for row in rows:
            t_row = time.perf_counter()
            r = run_row(row, name, images, labels, calib, eval_cache)
            bucket = peer_seconds if row.kind == "peer" else ablation_seconds if row.ablation else core_seconds
            bucket[name] = round(bucket.get(name, 0.0) + time.perf_counter() - t_row, 1)
            mres["rows"].append(r)
            msg = r.get("skipped") or f"{r['acc']:.2f}% (first 1000: {r['acc_first1000']:.2f}) {r['size_mb']:.3f} MB {r.get('seconds', 0):.2f}s eval {r['eval_seconds']:.0f}s"
            print(f"[{time.perf_counter() - t_start:7.1f}s] {name:20s} {row.setting:7s} {row.key:22s} {msg}", flush=True)
        model_seconds[name] = round(time.perf_counter() - tm, 1)
        results["models"][name] = mres
    exe = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    cli = argv if argv is not None else sys.argv[1:]
    cmd = f"{exe} benchmarks/accuracy.py" + ("" if not cli else " " + " ".join(cli))
    results["meta"] = {
        "command": cmd,
        "machine": _machine(),
        "started_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "model_seconds": model_seconds,
        "setup_seconds": setup_seconds,
        # what the command without --peers and --ablation spends: setup plus its own rows
        "seconds_default_rows": core_seconds,
        "seconds_default_command": round(setup_seconds + sum(core_seconds.values()), 1),
        **({"seconds_peer_rows": peer_seconds} if peer_seconds else {}),
        **({"seconds_ablation_rows": ablation_seconds} if ablation_seconds else {}),
        "n_test": int(images.shape[0]),
        "first_n": FIRST_N,
        "eval": {"batch_size": EVAL_BATCH, "memory_format": "channels_last", "threads": args.threads},
        "calibration": {"n": CALIB_N, "seed": 0, "batch_size": CALIB_BATCH},
        "git": _git_state(),
        "missing_models": missing,
        "peers_note": peers_note,
        "torch": torch.__version__,
    }
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    _write_markdown(Path(args.out), render_markdown(results))
    plot(results, Path(args.plot))
    print(f"wrote {args.out}, {args.json}, {args.plot} in {results['meta']['total_seconds'] / 60:.1f} min")
    return 0


def update_rows(args: argparse.Namespace, argv: Optional[list[str]]) -> int:
    """``--rows``: re-evaluate the matching rows of the committed --json in place.

    The rows are the ones the current ``build_rows`` defines (peer rows only if the JSON has
    them and ``--peers`` is given); every other row, and the meta of the run that produced
    them, stay as they are; ``meta["updates"]`` records what was re-run, when, by which command
    at which commit, and how long it took."""
    import fnmatch

    path = Path(args.json)
    results = json.loads(path.read_text())
    if args.subset:
        raise SystemExit("--rows updates the committed full-test-set results: drop --subset")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("once", category=dfmpc_fx.NoCompensablePairWarning)
    torch.manual_seed(0)
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    if args.peers:
        _import_peers()
    rows = [r for r in build_rows(peers=args.peers, ablation=True)
            if any(fnmatch.fnmatchcase(r.key, pat) for pat in args.rows)]
    if not rows:
        raise SystemExit(f"no row key matches {args.rows}")
    models = args.models or list(results["models"])
    images, labels = load_fashion_mnist("test")
    old_acc: dict[str, dict[str, float]] = {}
    for name in models:
        mres = results["models"][name]
        keys = [r["key"] for r in mres["rows"]]
        eval_cache: dict[str, tuple[torch.Tensor, str]] = {}
        for row in rows:
            if row.key not in keys:
                continue  # e.g. an ablation row of a run made without --ablation
            r = run_row(row, name, images, labels, None, eval_cache)
            i = keys.index(row.key)
            old_acc.setdefault(name, {})[row.key] = mres["rows"][i].get("acc")
            mres["rows"][i] = r
            print(f"[{time.perf_counter() - t_start:7.1f}s] {name:20s} {row.key:22s} "
                  f"{old_acc[name][row.key]} -> {r['acc']:.2f}% (first 1000: {r['acc_first1000']:.2f})", flush=True)
    exe = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    cli = argv if argv is not None else sys.argv[1:]
    results["meta"].setdefault("updates", []).append({
        "command": f"{exe} benchmarks/accuracy.py " + " ".join(cli),
        "rows": [r.key for r in rows],
        "models": models,
        "started_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "threads": args.threads,
        "machine": _machine(),
        "git": _git_state(),
        "previous_acc": old_acc,
    })
    path.write_text(json.dumps(results, indent=1) + "\n")
    _write_markdown(Path(args.out), render_markdown(results))
    plot(results, Path(args.plot))
    print(f"updated {len(rows)} row(s) of {len(models)} model(s) in {args.json}, {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
