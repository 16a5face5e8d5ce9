#!/usr/bin/env python
"""Sweep every torchvision classification model (up to 100M parameters) through dfmpc_fx.

For each model (random weights, ``weights=None``, and random BatchNorm statistics so that the
compensation has something to do): trace and find pairs, compress (default config), check that
compressing at 16 bits preserves the function, pack, and export the packed model to TorchScript,
``torch.export`` (saved ``.pt2`` reloaded) and ONNX (run in onnxruntime), comparing every
artifact's output with the compressed model. Each model runs in its own subprocess with a time
limit, so a crash, a hang or an out-of-memory kill is recorded as that model's failure.

Writes ``docs/zoo.md`` (the table, from every result so far) and keeps one JSON result per model
under ``outputs/zoo/`` (``--resume`` skips finished models, ``--models`` reruns some, and
``--report-only`` rewrites the table). One command::

    OMP_NUM_THREADS=1 python scripts/zoo_sweep.py            # every model, ~hours on one core
    python scripts/zoo_sweep.py --models resnet18,vit_b_16   # a few, for a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "zoo.md"
DEFAULT_CACHE = REPO / "outputs" / "zoo"
MAX_PARAMS = 100_000_000
CHECK16_TOL = 1e-3  # relative output error of a 16-bit compression: above it the transform changed the function


# --------------------------------------------------------------------------------------------
# one model (runs in a child process)
# --------------------------------------------------------------------------------------------
def _num_params(name: str) -> Optional[int]:
    """Parameter count from torchvision's weight metadata (no download), else from a meta-device build."""
    import torch
    import torchvision

    try:
        weights = list(torchvision.models.get_model_weights(name))
        if weights and "num_params" in weights[0].meta:
            return int(weights[0].meta["num_params"])
    except Exception:
        pass
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torchvision.models.get_model(name, weights=None)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def _randomize_batchnorm(model: Any, seed: int = 0) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
            n = mod.running_mean.numel()
            mod.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            mod.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
            if mod.weight is not None:
                mod.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
                mod.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


def _rel(a: Any, b: Any) -> float:
    import torch

    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line[:300]}"


def run_model(name: str, image_size: int, result_path: Path, formats: list[str]) -> None:
    """Run every stage for ``name``, writing ``result_path`` after each stage."""
    import torch
    import torchvision

    import dfmpc_fx
    from dfmpc_fx.errors import DFMPCError

    torch.set_num_threads(1)
    res: dict[str, Any] = {"model": name, "status": "running", "stage": "build", "formats": {}, "times": {}}

    def dump() -> None:
        result_path.write_text(json.dumps(res, indent=1, default=str))

    def stage(label: str) -> None:
        res["stage"] = label
        dump()

    def timed(label: str, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            res["times"][label] = round(time.perf_counter() - t0, 2)

    try:
        res["params"] = _num_params(name)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torchvision.models.get_model(name, weights=None)
        _randomize_batchnorm(model)
        model.eval()
        x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = model(x)

        stage("trace + find pairs")
        try:
            search = timed("pairs", lambda: dfmpc_fx.find_compensable_pairs(model))
        except DFMPCError as exc:
            res.update(status="failed", error=_first_line(exc), error_kind="documented")
            dump()
            return
        res["layers"] = len(search.layers)
        res["pairs_found"] = len(search.pairs)
        res["refusals"] = search.refusal_counts()

        stage("compress")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qmodel = timed("compress", lambda: dfmpc_fx.compress(model, dfmpc_fx.DFMPCConfig(low_bits=2, high_bits=6)))
        res["warnings"] = sorted({type(w.message).__name__ for w in caught if issubclass(w.category, dfmpc_fx.NoCompensablePairWarning)})
        report = dfmpc_fx.get_report(qmodel)
        res["compress_s"] = round(report.compress_seconds, 2)
        res["pairs_used"] = report.num_pairs
        res["theoretical_bytes"] = report.theoretical_bytes
        res["float_bytes"] = report.float_bytes
        with torch.no_grad():
            yq = qmodel(x)
        res["finite"] = bool(torch.isfinite(yq).all())
        res["rel_err_vs_float"] = _rel(yq, y)

        stage("16-bit check")
        cfg16 = dfmpc_fx.DFMPCConfig(low_bits=16, high_bits=16, default_bits=16, first_last_bits=16, max_bits=16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q16 = timed("compress16", lambda: dfmpc_fx.compress(model, cfg16))
        with torch.no_grad():
            res["check16_rel"] = _rel(q16(x), y)
        del q16

        stage("pack")
        packed = timed("pack", lambda: dfmpc_fx.pack_model(qmodel))
        with torch.no_grad():
            res["packed_max_diff"] = float((packed(x) - yq).abs().max())

        with tempfile.TemporaryDirectory(prefix=f"zoo_{name}_") as tmp:
            tmp_path = Path(tmp)
            programs: list[Any] = []  # the ExportedProgram, reused by the ONNX export (one torch.export, not two)

            def to_program():
                programs.append(dfmpc_fx.export_program(qmodel, x, packed=True, path=tmp_path / "m.pt2"))

            exporters = {
                "torchscript": lambda: dfmpc_fx.export_torchscript(qmodel, tmp_path / "m.ts", x, packed=True),
                "program": to_program,
                "onnx": lambda: dfmpc_fx.export_onnx(qmodel, tmp_path / "m.onnx", x, packed=True,
                                                     program=programs[0] if programs else None),
            }
            for fmt in formats:
                stage(f"export {fmt}")
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        timed(fmt, exporters[fmt])
                    res["formats"][fmt] = "ok"
                except dfmpc_fx.ExportError as exc:
                    res["formats"][fmt] = "ExportError: " + str(exc).splitlines()[0][:300]
                except Exception as exc:  # not a documented error: reported as such
                    res["formats"][fmt] = "UNDOCUMENTED " + _first_line(exc)
                art = qmodel.meta.get("dfmpc_artifacts", {}).get(fmt)
                if art and res["formats"][fmt] == "ok":
                    res.setdefault("artifact_bytes", {})[fmt] = art["bytes"]
                    res.setdefault("max_abs_diff", {})[fmt] = art.get("max_abs_diff")
                dump()
        res["status"] = "ok"
        res["stage"] = "done"
    except Exception as exc:
        res.update(status="failed", error=_first_line(exc), error_kind="undocumented",
                   traceback=traceback.format_exc()[-2000:])
    dump()


# --------------------------------------------------------------------------------------------
# the sweep (parent process)
# --------------------------------------------------------------------------------------------
def _run_child(name: str, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    result_path = cache / f"{name}.json"
    if result_path.exists():
        result_path.unlink()
    cmd = [sys.executable, __file__, "--child", name, "--image-size", str(args.image_size),
           "--result", str(result_path), "--formats", ",".join(args.formats)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.timeout, capture_output=True, text=True)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stderr = None, (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    wall = round(time.perf_counter() - t0, 1)
    res: dict[str, Any] = json.loads(result_path.read_text()) if result_path.exists() else {"model": name, "formats": {}, "times": {}}
    res["wall_s"] = wall
    if rc is None:
        res.update(status="failed", error_kind="timeout", error=f"time limit {args.timeout} s reached during {res.get('stage', 'start')}")
    elif rc != 0 and res.get("status") != "failed":
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {rc}"]
        killed = rc < 0 or rc == 137
        res.update(status="failed", error_kind="crash",
                   error=f"process {'killed (signal ' + str(-rc) + ', likely out of memory)' if killed else 'exited ' + str(rc)} during {res.get('stage')}: {tail[0][:300]}")
    result_path.write_text(json.dumps(res, indent=1, default=str))
    return res


def _fmt_bytes_ratio(res: dict[str, Any]) -> str:
    art = (res.get("artifact_bytes") or {}).get("torchscript")
    theo = res.get("theoretical_bytes")
    return f"{art / theo:.3f}" if art and theo else ""


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_markdown(results: list[dict[str, Any]], skipped: list[tuple[str, Optional[int]]], args: argparse.Namespace,
                   out: Path, in_scope: Optional[int] = None) -> None:
    import torch
    import torchvision

    ok = [r for r in results if r.get("status") == "ok"]
    failed = [r for r in results if r.get("status") != "ok"]
    fmt_ok = {f: sum(1 for r in ok if r["formats"].get(f) == "ok") for f in args.formats}
    all_ok = [r for r in ok if all(r["formats"].get(f) == "ok" for f in args.formats)]
    wrong16 = [r for r in ok if not (r.get("check16_rel", 0.0) < CHECK16_TOL)]
    lines = [
        "# Model zoo sweep",
        "",
        "Generated by `OMP_NUM_THREADS=1 python scripts/zoo_sweep.py` (do not edit by hand).",
        "",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} CPU, 1 thread; generated {time.strftime('%Y-%m-%d')}.",
        f"- Every `torchvision.models.list_models(module=torchvision.models)` classification model with at most "
        f"{MAX_PARAMS / 1e6:.0f}M parameters; `weights=None` (random weights) and random BatchNorm statistics "
        "(running mean, running variance, weight, bias); input 1x3x{0}x{0}.".format(args.image_size),
        "- Config: `DFMPCConfig(low_bits=2, high_bits=6)` (2/6 bits in pairs, 8 bits elsewhere and for the first and last layers).",
        "- Columns: *layers* = Conv/Linear modules reached by the traced forward; *pairs* = compensable pairs found "
        "(those used after bit assignment in brackets); *refusals* = refused candidates by reason; *16-bit* = relative "
        f"output error of a compression at 16 bits against the float model (function preserved if < {CHECK16_TOL:g}); "
        "*packed* = max abs difference between the packed and the fake-quant model (must be 0); exports are of the packed "
        "model, checked against the compressed model (TorchScript reloaded with `torch.jit.load`, `.pt2` reloaded with "
        "`torch.export.load`, ONNX run in onnxruntime with max abs diff <= 1e-4 + 1e-5 x max|output|); *size* = "
        "packed TorchScript file / theoretical size.",
        f"- Per-model time limit {args.timeout} s, each model in its own process.",
        "",
        "## Summary",
        "",
        f"- {len(results)} models swept"
        + (f" of {in_scope} in scope ({in_scope - len(results)} not run yet)" if in_scope and in_scope != len(results) else "")
        + f", {len(skipped)} skipped (over {MAX_PARAMS / 1e6:.0f}M parameters).",
        f"- {len(ok)} compressed and packed; {len(all_ok)} exported to every format; "
        + ", ".join(f"{f}: {n}/{len(results)}" for f, n in fmt_ok.items()) + ".",
        f"- {len(failed)} failed before export: "
        + (", ".join(f"{r['model']} ({r.get('error_kind')})" for r in failed) if failed else "none") + ".",
        f"- 16-bit function check above {CHECK16_TOL:g}: " + (", ".join(f"{r['model']} ({r['check16_rel']:.2g})" for r in wrong16) if wrong16 else "none") + ".",
        "",
        "## Table",
        "",
        "| model | params (M) | layers | pairs | refusals by reason | compress (s) | 16-bit rel. err | packed | "
        + " | ".join({"torchscript": "TorchScript", "program": "torch.export", "onnx": "ONNX"}[f] for f in args.formats)
        + " | size |",
        "|" + "---|" * (9 + len(args.formats)),
    ]
    for r in sorted(results, key=lambda r: (r.get("params") or 0, r["model"])):
        refusals = ", ".join(f"{k}: {v}" for k, v in sorted((r.get("refusals") or {}).items(), key=lambda kv: -kv[1]))
        pairs = "" if "pairs_found" not in r else f"{r['pairs_found']}" + (f" ({r['pairs_used']})" if "pairs_used" in r else "")
        c16 = f"{r['check16_rel']:.1e}" if "check16_rel" in r else ""
        packed = "" if "packed_max_diff" not in r else ("0" if r["packed_max_diff"] == 0 else f"{r['packed_max_diff']:.1e}")
        fmts = []
        for f in args.formats:
            v = r.get("formats", {}).get(f)
            fmts.append("" if v is None else ("yes" if v == "ok" else "no (see below)"))
        if r.get("status") != "ok":
            fmts = [f"failed: {r.get('error_kind')}"] + fmts[1:]
        lines.append(
            f"| {r['model']} | {(r.get('params') or 0) / 1e6:.1f} | {r.get('layers', '')} | {pairs} | {_cell(refusals)} | "
            f"{r.get('compress_s', '')} | {c16} | {packed} | " + " | ".join(fmts) + f" | {_fmt_bytes_ratio(r)} |"
        )
    problems = [(r["model"], "model", r.get("error")) for r in failed]
    problems += [(r["model"], f, v) for r in results for f, v in r.get("formats", {}).items() if v != "ok"]
    if problems:
        lines += ["", "## Failures and their errors", "", "| model | stage | error |", "|---|---|---|"]
        lines += [f"| {m} | {s} | {_cell(e)} |" for m, s, e in problems]
    lines += ["", "## Skipped (over the parameter limit)", "",
              ", ".join(f"{n} ({(p or 0) / 1e6:.0f}M)" for n, p in skipped) or "none", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated subset (default: every model up to --max-params)")
    ap.add_argument("--max-params", type=float, default=MAX_PARAMS)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--timeout", type=int, default=1800, help="per-model time limit in seconds")
    ap.add_argument("--formats", default="torchscript,program,onnx")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="one JSON result per model")
    ap.add_argument("--resume", action="store_true", help="reuse finished results from --cache")
    ap.add_argument("--report-only", action="store_true", help="only rewrite --out from the results in --cache")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    if args.child:
        run_model(args.child, args.image_size, args.result, args.formats)
        return 0

    import torchvision

    all_names = torchvision.models.list_models(module=torchvision.models)
    names = all_names
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = sorted(set(wanted) - set(all_names))
        if unknown:
            ap.error(f"unknown models {unknown}")
        names = wanted
    sized = sorted(((n, _num_params(n)) for n in all_names), key=lambda t: (t[1] or 0, t[0]))
    in_scope = [(n, p) for n, p in sized if p is not None and p <= args.max_params]
    skipped = [(n, p) for n, p in sized if p is None or p > args.max_params]
    todo = [(n, p) for n, p in in_scope if n in names] if not args.report_only else []
    args.cache.mkdir(parents=True, exist_ok=True)

    def finished(name: str) -> dict[str, Any] | None:
        cached = args.cache / f"{name}.json"
        if cached.exists():
            res = json.loads(cached.read_text())
            if res.get("status") in ("ok", "failed") and "wall_s" in res:
                return res
        return None

    def collect() -> list[dict[str, Any]]:
        """Every finished result in scope (the table always covers the whole zoo run so far)."""
        out = []
        for name, params in in_scope:
            res = finished(name)
            if res is not None:
                res.setdefault("params", params)
                out.append(res)
        return out

    for i, (name, params) in enumerate(todo, 1):
        if args.resume and finished(name) is not None:
            continue
        print(f"[{i}/{len(todo)}] {name} ({(params or 0) / 1e6:.1f}M) ...", flush=True)
        res = _run_child(name, args, args.cache)
        print(f"    {res.get('status')} in {res.get('wall_s')} s; pairs {res.get('pairs_found')}; "
              f"formats {res.get('formats')}; {res.get('error', '')}", flush=True)
        write_markdown(collect(), skipped, args, args.out, len(in_scope))
    write_markdown(collect(), skipped, args, args.out, len(in_scope))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
