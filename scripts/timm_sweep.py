"""Compress a sample of timm architectures (random weights) and record what happened.

    OMP_NUM_THREADS=1 python scripts/timm_sweep.py            # the sample: ~1 h on one core
    python scripts/timm_sweep.py resnet18 levit_128s          # a few names
    python scripts/timm_sweep.py --report-only                # rewrite docs/timm.md from outputs/timm/

The sample (``scripts/timm_sample.json``, rebuilt with ``--resample`` or when timm's version
changes): for every timm module (``timm.list_modules()``), its two smallest architectures of at
most 30M parameters (counted on the meta device at timm's default head: nothing is allocated or
downloaded).

Per model, in its own process with a time limit (a crash, hang or out-of-memory kill is that
model's failure): build with ``pretrained=False`` and ``num_classes=10``, run it on a 96 px input
(or, when the architecture refuses 96 px, its default input size), set its BatchNorm statistics
to those of its own activations on Gaussian inputs (``calibrate_batchnorm``; zero-initialised
heads and BatchNorm scales get random values first, ``revive_zero_init``), ``compress`` at the default
config with ``example_inputs`` (the result is run once), compress at 16 bits everywhere and
compare outputs with the float model (rel. error < 1e-3: every swapped layer computes what it
replaced), and check that every Conv1d/Conv2d/Linear module of the model is in the report,
quantized or with the reason it stayed float. Outcome of each model:

- *compressed & ran*: compressed, ran, 16-bit check passed, every conv/linear accounted for
  (a 16-bit output error above 1e-3 passes only when, compressed at 16 bits without the
  data-free mean correction, every swapped module fed its float counterpart's input reproduces
  its output within 1e-4, and the error is at most 3x that of the float model with weight noise
  of the 16-bit step and no transform (``float_noise_error``): the random network amplified the
  rounding noise, or the mean correction, predicted from meaningless fresh BatchNorm
  statistics, moved a near-zero output; the table marks those);
- *refused*: ``compress`` raised a typed ``DFMPCError`` whose message says what to do (a
  ``CompressedModelError``, the result failing on the example input, counts as *failed*);
- *failed*: anything else (an untyped exception, a time limit, a failed 16-bit check, a
  conv/linear missing from the report).

Writes one JSON per model under ``outputs/timm/`` and the table in ``docs/timm.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "scripts" / "timm_sample.json"
CACHE = REPO / "outputs" / "timm"
OUT = REPO / "docs" / "timm.md"
MAX_PARAMS = 30_000_000
PER_MODULE = 2
SIZE = 96
CHECK16_TOL = 1e-3
BITS16 = dict(low_bits=16, high_bits=16, default_bits=16, first_last_bits=16, max_bits=16)
LAYER16_TOL = 1e-4  # a swapped module against its float original, same input, at 16 bits
CONTROL_FACTOR = 3.0  # above 1e-3, the 16-bit error may be at most this many times the float control's
TIMEOUT = 300


# --------------------------------------------------------------------------------------------
# the sample
# --------------------------------------------------------------------------------------------
def build_sample(max_params: int = MAX_PARAMS, per_module: int = PER_MODULE) -> dict[str, Any]:
    """The ``per_module`` smallest architectures of at most ``max_params`` parameters of every
    timm module, counted on the meta device (ties broken by name)."""
    import timm
    import torch

    chosen: list[dict[str, Any]] = []
    unbuildable: list[dict[str, str]] = []
    for module in timm.list_modules():
        sized = []
        for name in timm.list_models(module=module):
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
                sized.append((sum(p.numel() for p in model.parameters()), name))
            except Exception as exc:  # recorded: an architecture that does not build on meta
                unbuildable.append({"model": name, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
        small = sorted(s for s in sized if s[0] <= max_params)[:per_module]
        chosen += [{"model": name, "module": module, "params": n} for n, name in small]
        print(f"{module}: {[n for _, n in small]}", flush=True)
    return {"timm": timm.__version__, "max_params": max_params, "per_module": per_module,
            "models": chosen, "unbuildable_on_meta": unbuildable}


def load_sample(resample: bool = False) -> dict[str, Any]:
    import timm

    if not resample and SAMPLE.is_file():
        data = json.loads(SAMPLE.read_text())
        if data.get("timm") == timm.__version__:
            return data
    data = build_sample()
    SAMPLE.write_text(json.dumps(data, indent=1) + "\n")
    return data


# --------------------------------------------------------------------------------------------
# one model (child process)
# --------------------------------------------------------------------------------------------
def _tensors(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _rel(a: Any, b: Any) -> float:
    import torch

    ta, tb = _tensors(a), _tensors(b)
    num = sum(float((x.double() - y.double()).norm() ** 2) for x, y in zip(ta, tb))
    den = sum(float(y.double().norm() ** 2) for y in tb)
    return (num / max(den, 1e-60)) ** 0.5


def _first_line(exc: BaseException) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line[:400]}"


def revive_zero_init(model: Any) -> int:
    """Give every conv/linear weight and BatchNorm scale that timm initialises to zero (zero
    classifier heads, zero-init last BatchNorm of residual blocks) a random value: a zero layer
    outputs the same thing whatever its quantization (a zero head makes the model output zero,
    and every check on it vacuous). Returns how many tensors were changed."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(3)
    changed = 0
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if not isinstance(w, torch.Tensor) or w.numel() == 0 or bool(w.any()):
                continue
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                fan_in = w[0].numel()
                w.copy_(torch.randn(w.shape, generator=gen) / fan_in ** 0.5)
                changed += 1
            elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                w.copy_(0.5 + torch.rand(w.shape, generator=gen))
                changed += 1
    return changed


def calibrate_batchnorm(model: Any, shape: Any, batches: int = 4, batch_size: int = 8) -> None:
    """BatchNorm running statistics set to the statistics of the random network's own
    activations on Gaussian inputs (cumulative average over ``batches``; only the BatchNorms
    in train mode, dropout and drop-path stay off).

    Fresh statistics (mean 0, variance 1) do not describe a random network's activations, which
    grow or vanish with depth; every data-free correction reads them, so a check on them tests
    meaningless statistics (a near-zero output moved by a correction sized for unit variance).
    A trained model's statistics describe its activations; this gives the random one the same
    property."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    gen = torch.Generator().manual_seed(2)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        with torch.no_grad():
            for _ in range(batches):
                model(torch.randn(batch_size, *shape, generator=gen))
    finally:
        for bn in bns:
            bn.momentum = 0.1
        model.eval()


def _cloned(value: Any) -> Any:
    """Tensors cloned (later in-place ops such as ``x += y`` must not change what was recorded)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cloned(v) for v in value)
    return value


def max_layer_error(model: Any, qmodel: Any, x: Any) -> float:
    """Worst relative error of a module ``compress`` swapped (a quantized layer or a corrected
    BatchNorm), each fed the very input its float counterpart receives in ``model(x)``."""
    import torch

    qmods = dict(qmodel.named_modules())
    swapped = {n: m for n, m in qmods.items() if n and (hasattr(m, "w_bits") or isinstance(m, torch.nn.modules.batchnorm._BatchNorm))}
    calls: list[tuple[str, tuple, Any]] = []
    hooks = []
    for name, mod in model.named_modules():
        if name in swapped:
            hooks.append(mod.register_forward_hook(
                lambda m, args, out, name=name: calls.append((name, _cloned(args), _cloned(out)))))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    worst = 0.0
    with torch.no_grad():
        for name, args, out in calls:
            worst = max(worst, _rel(swapped[name](*args), out))
    return worst


def float_noise_error(model: Any, x: Any, ref: Any, bits: int = 16, seed: int = 0) -> float:
    """The control of the 16-bit check, with no transform at all: ||f~(x) - f(x)|| / ||f(x)|| for a
    copy of the float model whose every Conv1d/Conv2d/Linear weight gets independent uniform noise
    of +-half the step of its ``bits``-bit per-channel grid (``max|w_row| / (2^(bits-1) - 1)``),
    the size of the rounding error. Of the order of the 16-bit error: the network amplifies any
    perturbation that small, and the check's threshold says nothing about the transform there."""
    import copy

    import torch
    from torch import nn

    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in noisy.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                w = m.weight
                rows = w.reshape(w.shape[0], -1)
                step = rows.abs().amax(dim=1) / qmax
                noise = (torch.rand(rows.shape, generator=gen, dtype=w.dtype) - 0.5) * step[:, None]
                w.add_(noise.reshape(w.shape))
        return _rel(noisy(x), ref)


def run_model(name: str, result_path: Path) -> None:
    import timm
    import torch
    from torch import nn

    import dfmpc_fx
    from dfmpc_fx.errors import CompressedModelError, DFMPCError

    torch.set_num_threads(1)
    res: dict[str, Any] = {"model": name, "status": "running", "stage": "build"}

    def dump() -> None:
        result_path.write_text(json.dumps(res, indent=1, default=str))

    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        res["params"] = sum(p.numel() for p in model.parameters())
        res["revived"] = revive_zero_init(model)
        x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                ref = model(x)
        except Exception:
            size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
            x = torch.randn(1, *size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                ref = model(x)
        res["input"] = "x".join(str(s) for s in x.shape[1:])
        res["stage"] = "calibrate BatchNorm"
        calibrate_batchnorm(model, x.shape[1:])
        with torch.no_grad():
            ref = model(x)
        weighted = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}
        res["conv_linear"] = len(weighted)
        res["stage"] = "compress"
        dump()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            try:
                q = dfmpc_fx.compress(model, example_inputs=x, low_bits=2, high_bits=6)  # the MP2/6 layout the table reports
            except CompressedModelError as exc:  # compress returned a model that does not run: a failure
                res.update(status="failed", error=_first_line(exc), error_type=type(exc).__name__,
                           traceback=traceback.format_exc()[-3000:])
                dump()
                return
            except DFMPCError as exc:
                res.update(status="refused", error=_first_line(exc), error_type=type(exc).__name__)
                dump()
                return
            res["seconds"] = round(time.perf_counter() - t0, 2)
            res["stage"] = "compress 16 bits"
            dump()
            q16 = dfmpc_fx.compress(model, **BITS16)
        rep = dfmpc_fx.get_report(q)
        res["stage"] = "check"
        with torch.no_grad():
            res["rel_err_16"] = _rel(q16(x), ref)
            res["rel_err_default"] = _rel(q(x), ref)
        if not res["rel_err_16"] < CHECK16_TOL:
            # Which part of the error is the transform's: each swapped module on its own, with the
            # data-free mean correction off (on random weights and fresh BatchNorm statistics its
            # predicted shift can be large next to a near-zero output, e.g. a zero-bias head).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q16b = dfmpc_fx.compress(model, **BITS16, mean_correction=False)
            with torch.no_grad():
                res["rel_err_16_no_mean_corr"] = _rel(q16b(x), ref)
            res["layer_err_16"] = max_layer_error(model, q16b, x)
            res["float_noise_16"] = float_noise_error(model, x, ref)
        res["parts"] = any("part by part" in w for w in rep.warnings)
        names = {l.name for l in rep.layers}
        res["unaccounted"] = sorted(set(weighted) - names)
        res["quantized"] = sum(l.bits is not None for l in rep.layers)
        res["in_leaf"] = sum(l.bits is not None and (l.reason or "").startswith("inside") for l in rep.layers)
        reasons: dict[str, int] = {}
        for l in rep.layers:
            if l.bits is None:
                why = l.reason or "no reason given"
                key = "inside a leaf module" if why.startswith("inside") else why.split(" (")[0]
                reasons[key] = reasons.get(key, 0) + 1
        res["float"] = reasons
        res["silent_float"] = reasons.get("no reason given", 0)
        res["pairs"] = rep.num_pairs
        res["refused_layers"] = len(rep.refusals)
        problems = []
        if not any(bool(t.any()) for t in _tensors(ref)):
            problems.append("the float output is all zeros: the checks are vacuous")
        if not res["rel_err_16"] < CHECK16_TOL:
            # A random-weight network can amplify 16-bit rounding noise past the threshold; the
            # transform is wrong only if a swapped module, fed the float model's own input,
            # does not reproduce the float module's output to 16-bit precision.
            # The float control (same-size weight noise, no transform) bounds what the network's
            # own amplification explains; one random draw, hence the factor's margin.
            if res["layer_err_16"] < LAYER16_TOL and res["rel_err_16"] <= CONTROL_FACTOR * res["float_noise_16"]:
                res["amplified"] = True
            else:
                problems.append(f"16-bit rel. error {res['rel_err_16']:.2g} >= {CHECK16_TOL:g} "
                                f"({res['rel_err_16_no_mean_corr']:.2g} without mean correction), "
                                f"worst swapped module {res['layer_err_16']:.2g}, "
                                f"float control {res['float_noise_16']:.2g}")
        if res["unaccounted"]:
            problems.append(f"{len(res['unaccounted'])} conv/linear not in the report: {res['unaccounted'][:3]}")
        if res["silent_float"]:
            problems.append(f"{res['silent_float']} layers float without a reason")
        res["status"] = "failed" if problems else "ok"
        if problems:
            res["error"] = "; ".join(problems)
        res["stage"] = "done"
    except Exception as exc:
        res.update(status="failed", error=_first_line(exc), traceback=traceback.format_exc()[-3000:])
    dump()


# --------------------------------------------------------------------------------------------
# the sweep (parent)
# --------------------------------------------------------------------------------------------
def run_child(name: str, timeout: int) -> dict[str, Any]:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}.json"
    if path.exists():
        path.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", name], env=env, timeout=timeout,
                              capture_output=True, text=True)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = None, ""
    res = json.loads(path.read_text()) if path.exists() else {"model": name, "stage": "start"}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    if rc is None:
        res.update(status="failed", error=f"time limit {timeout} s reached during {res.get('stage')}")
    elif rc != 0 and res.get("status") in (None, "running"):
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or [f"exit code {rc}"]
        res.update(status="failed", error=f"process ended ({rc}) during {res.get('stage')}: {tail[0][:300]}")
    path.write_text(json.dumps(res, indent=1, default=str))
    return res


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


DOC = """# timm models

`dfmpc_fx.compress` on a sample of [timm](https://github.com/huggingface/pytorch-image-models)
architectures: for each timm model module (the {n_modules} of timm's {all_modules} that have one of at most
30M parameters), its two smallest architectures of at most 30M parameters ({n} models), built with `pretrained=False` (random weights, nothing downloaded),
`num_classes=10`, input 96 px unless the architecture refuses it (then its default input size),
BatchNorm statistics set to those of the random network's own activations on Gaussian inputs
(fresh statistics, mean 0 and variance 1, describe nothing a random deep network computes, and
every data-free correction reads them), and conv/linear weights and BatchNorm scales that timm
initialises to zero (classifier heads of hiera, ...; last BatchNorm of residual blocks) given
random values (a zero head makes the output zero and every check on it vacuous).
Regenerate with

    OMP_NUM_THREADS=1 python scripts/timm_sweep.py

(each model in its own process, {timeout} s limit; the sample is `scripts/timm_sample.json`).

**{ok} compressed & ran** (16-bit function check, every conv/linear module in the report),
**{refused} refused with a reason**, **{failed} failed**. Of the {ok}: {strict} within 1e-3 end to
end at 16 bits; {amplified} above it ({amp_range}), where every swapped module, fed its float
counterpart's input, reproduces its output within {amp_worst:.0e} (the random deep network
amplifies the 16-bit rounding noise: the float model itself, its weights given uniform noise of
half a 16-bit step and nothing else, is off by {noise_range} on them). {float_layers} conv/linear layers in {float_models} models stay
float, each with its reason in the report (column "kept in float").

What is automatic when timm is imported: timm's registered not-traceable modules
(`timm.layers._fx._leaf_modules`: BatchNormAct2d, Conv2dSame, NormFreeBlock, MobileVitBlock, ...)
are traced as one call and its autowrapped functions (`_autowrap_functions`) are recorded as
calls; BatchNormAct2d is treated as BatchNorm then its activation; conv/linear subclasses with
their own forward (ScaledStdConv2d, Conv2dSame) are quantized, and packed, keeping their forward; conv/linear
layers inside an opaque block get plain rounding at `default_bits` (column "of which plain").
`dfmpc pairs timm:resnet18` and `dfmpc compress timm:<name> ...` take timm specs.

Columns: *conv/linear* counts every Conv1d/Conv2d/Linear module of the model; *16-bit rel. err*
is ||q(x) - f(x)|| / ||f(x)|| with every layer at 16 bits (a function check: each swapped module
computes what it replaced; where it exceeds 1e-3, the model is compressed at 16 bits again without
the data-free mean correction and each swapped module is checked on its own: fed the input its
float counterpart receives, its output must match within 1e-4, else the model *failed*; and the
float model, its conv/linear weights given uniform noise of +-half their 16-bit step, no transform,
is measured the same way, the control, and the 16-bit error may be at most {control_factor:g}x the control's);
*default rel. err* is the same at the MP2/6 layout (`low_bits=2, high_bits=6`: pairs at 2/6
bits, other layers at 8) on **random weights**, so it says nothing about accuracy; *pairs* are the compensated pairs, *refused* the layers whose
chain found no partner. *compress s* is wall time on a shared 2-core machine, one thread.
{generated}

{table}
"""


def write_markdown(rows: list[dict[str, Any]], sample: dict[str, Any], timeout: int) -> None:
    import timm
    import torch

    counts = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "refused", "failed")}
    lines = ["| model | module | params (M) | outcome | input | conv/linear | quantized (of which plain, inside a leaf block) "
             "| kept in float (why) | pairs | refused | 16-bit rel. err | default rel. err | compress s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    module = {m["model"]: m["module"] for m in sample["models"]}
    params = {m["model"]: m["params"] for m in sample["models"]}
    for r in rows:
        p = params.get(r["model"], r.get("params") or 0) / 1e6
        head = f"| {r['model']} | {module.get(r['model'], '')} | {p:.1f} |"
        if "rel_err_16" not in r:
            what = "**refused**" if r.get("status") == "refused" else "**failed**"
            lines.append(f"{head} {what}: {_cell(r.get('error', '?'))} | {r.get('input', '')} | {r.get('conv_linear', '')} | | | | | | | |")
            continue
        outcome = ("ok" + (" (part by part)" if r.get("parts") else "")
                   + (f" (above 1e-3: {r['rel_err_16_no_mean_corr']:.1e} without mean correction, "
                      f"worst swapped module {r['layer_err_16']:.1e}"
                      + (f"; float model with 16-bit-step weight noise: {r['float_noise_16']:.1e}" if "float_noise_16" in r else "")
                      + ")" if r.get("amplified") else "")
                   if r["status"] == "ok" else f"**failed**: {_cell(r.get('error'))}")
        why = "; ".join(f"{v} {k}" for k, v in r["float"].items()) or "-"
        lines.append(f"{head} {outcome} | {r['input']} | {r['conv_linear']} | {r['quantized']} ({r['in_leaf']}) | {_cell(why)} | "
                     f"{r['pairs']} | {r['refused_layers']} | {r['rel_err_16']:.1e} | {r['rel_err_default']:.3f} | {r['seconds']:.2f} |")
    generated = (f"\n<!-- generated by scripts/timm_sweep.py: timm {timm.__version__}, torch {torch.__version__}, "
                 f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')} -->")
    ok = [r for r in rows if r.get("status") == "ok"]
    amp = [r for r in ok if r.get("amplified")]
    noisy = [r for r in amp if "float_noise_16" in r]
    floats = [sum(r["float"].values()) for r in ok if r.get("float")]
    text = DOC.format(strict=len(ok) - len(amp), amplified=len(amp),
                      amp_range=(f"{min(r['rel_err_16'] for r in amp):.1e} to {max(r['rel_err_16'] for r in amp):.1e}" if amp else "-"),
                      amp_worst=max((r["layer_err_16"] for r in amp), default=0.0), control_factor=CONTROL_FACTOR,
                      noise_range=(f"{min(r['float_noise_16'] for r in noisy):.1e} to {max(r['float_noise_16'] for r in noisy):.1e}"
                                   f" ({len(noisy)} of {len(amp)} measured)" if noisy else "-"),
                      float_layers=sum(floats), float_models=len(floats),
                      n_modules=len({m["module"] for m in sample["models"]}), all_modules=len(timm.list_modules()),
                      n=len(rows), timeout=timeout,
                      ok=counts["ok"], refused=counts["refused"], failed=counts["failed"], generated=generated,
                      table="\n".join(lines))
    OUT.write_text(text)
    print(f"{len(rows)} models: {counts['ok']} compressed & ran, {counts['refused']} refused, {counts['failed']} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="default: the sample")
    parser.add_argument("--timeout", type=int, default=TIMEOUT, help="per-model time limit, seconds")
    parser.add_argument("--resample", action="store_true", help="rebuild scripts/timm_sample.json")
    parser.add_argument("--resume", action="store_true", help="reuse finished results in outputs/timm/")
    parser.add_argument("--report-only", action="store_true", help="rewrite docs/timm.md from outputs/timm/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_model(args.child, CACHE / f"{args.child}.json")
        return
    sample = load_sample(args.resample) if not args.models or args.resample else {"models": []}
    names = args.models or [m["model"] for m in sample["models"]]
    rows = []
    for name in names:
        path = CACHE / f"{name}.json"
        if (args.report_only or args.resume) and path.exists():
            res = json.loads(path.read_text())
            if args.report_only or res.get("status") in ("ok", "refused", "failed"):
                rows.append(res)
                continue
        if args.report_only:
            continue
        res = run_child(name, args.timeout)
        print(f"{name:40s} {res.get('status'):8s} {res.get('wall_s', 0):6.1f}s {res.get('error', '')[:200]}", flush=True)
        rows.append(res)
    if not args.models:
        write_markdown(rows, sample, args.timeout)
    else:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "traceback"}, default=str))


if __name__ == "__main__":
    main()
