"""Accuracy per byte: every committed checkpoint, every method, compared at equal size.

    python benchmarks/budget.py                 # all checkpoints, full 10k test set, all CPUs
    python benchmarks/budget.py --models resnet20 --subset 2000
    python benchmarks/budget.py --render-only   # re-render from benchmarks/budget_results.json

Rows: FP32; the size-budget allocator (``target_bits`` 2.0 / 2.01 / 2.5 / 3.0 / 4.0, and
``target_bytes`` at exactly the bytes of MP2/6, uniform corrected W2/W3/W4, HQQ W2 g64 and, with
``--peers``, AIMET W3/W4: ``alloc@bytes:<row>``; a byte budget folds BatchNorms into the layers,
as AIMET does); uniform W2/W3/W4 with 8-bit first/last layers, corrected and (W3)
plain; the MP2/6 and MP3/6 pair layouts; the paper's method at MP2/6; HQQ (PyPI ``hqq``, data-free,
one scale and zero per group, no correction) at W2/W3/W4 g64 and W2 g32; and the data-aware
reference: BatchNorm re-estimated on 2,000 training images at the allocator's own widths.

Each row also records its fidelity to the float model on the same test images: top-1
agreement with FP32's predictions and the relative logit error (``accuracy.fidelity``).

Sizes: ``bits/w`` averages over every conv/linear weight (float layers count 32; scales and zero
points counted: 32 bits each for ours, fp16 scale + fp16 zero per group for HQQ, as HQQ stores
them); ``bytes`` is the whole model as ``get_report(q).compressed_bytes`` counts it (for HQQ the
same count with its codes, scales and zeros). Each model runs in its own process with one
thread (models in parallel, ``--jobs``), so the wall time is that of the slowest worker.

Writes ``benchmarks/budget_results.json``, ``benchmarks/budget_pareto.png`` and the section
between the ``<!-- budget:begin -->`` / ``<!-- budget:end -->`` markers of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "budget_results.json"
PLOT = REPO / "benchmarks" / "budget_pareto.png"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
BEGIN, END = "<!-- budget:begin -->", "<!-- budget:end -->"
BUDGETS = (2.0, 2.01, 2.5, 3.0, 4.0)  # 2.01: the nearest to 2.0 that folded scales reach (floors 2.001-2.002)
TIE = 0.1  # points: a tie within this counts as "at least as accurate"


def _uniform(bits: int, compensate: bool = True) -> dict[str, Any]:
    return dict(low_bits=bits, high_bits=bits, default_bits=bits, first_last_bits=8, max_bits=16, compensate=compensate)


PEER_FAMILY = "peers (equalization + uniform)"


def rows(peers: bool = False) -> list[dict[str, Any]]:
    """The rows of one model, in run order (``alloc@mp26`` needs the ``mp26`` row's size);
    ``peers``: AIMET / Brevitas equalization, then uniform W3/W4 (8-bit first/last) without
    correction (``benchmarks/peers.py``; skipped with the reason where not installed)."""
    out: list[dict[str, Any]] = [{"key": "fp32", "kind": "fp32", "family": "fp32"}]
    out += [{"key": f"alloc@{b}", "kind": "compress", "family": "allocator", "config": {"target_bits": b}} for b in BUDGETS]
    out += [{"key": f"uniform_corr@W{b}", "kind": "compress", "family": "uniform corrected", "config": _uniform(b)} for b in (2, 3, 4)]
    out += [{"key": "uniform_plain@W3", "kind": "compress", "family": "uniform plain", "config": _uniform(3, compensate=False)}]
    out += [{"key": "mp26", "kind": "compress", "family": "MP layout", "config": {"low_bits": 2, "high_bits": 6}},
            {"key": "mp36", "kind": "compress", "family": "MP layout", "config": {"low_bits": 3}},
            {"key": "paper@MP2/6", "kind": "compress", "family": "paper", "config": {"method": "paper"}},
            {"key": "alloc@bytes:mp26", "kind": "compress", "family": "allocator", "config": {"target_bytes": "mp26"}}]
    out += [{"key": f"hqq@W{b}g{g}", "kind": "hqq", "family": "HQQ", "bits": b, "group": g}
            for b, g in ((2, 64), (3, 64), (4, 64), (2, 32))]
    out += [{"key": "bn_ref@alloc3.0", "kind": "bn_ref", "family": "data-aware reference", "config": {"target_bits": 3.0}}]
    if peers:
        out += [{"key": f"{peer}@W{b}", "kind": "peer", "family": PEER_FAMILY, "peer": peer,
                 "config": _uniform(b, compensate=False)} for peer in ("aimet", "brevitas") for b in (3, 4)]
    # the allocator at exactly a rival's bytes (target_bytes: BatchNorms fold, as AIMET's do)
    matched = ["uniform_corr@W2", "uniform_corr@W3", "uniform_corr@W4", "hqq@W2g64"] + (["aimet@W3", "aimet@W4"] if peers else [])
    out += [{"key": f"alloc@bytes:{ref}", "kind": "compress", "family": "allocator", "config": {"target_bytes": ref}}
            for ref in matched]
    return out


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` as a module (the folder is not a package), registered as
    ``benchmarks_<name>`` (dataclasses need their module in ``sys.modules``); the one loader of
    the benchmark scripts (``paired_significance.py`` imports it from here)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _weights(model) -> list[tuple[str, Any]]:
    from torch import nn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def hqq_model(model, bits: int, group: int):
    """A copy of ``model`` with every conv/linear weight replaced by HQQ's dequantized weight
    (``Quantizer.quantize(W, nbits, group_size, axis=1, optimize=True)`` on the (C_out, K) view).
    A layer whose weight count is not a multiple of ``group`` uses one group per row. Returns
    (model, bits/w, bytes): codes, plus 16-bit scale and zero per group, as HQQ stores them."""
    import copy

    import torch
    from hqq.core.quantize import Quantizer

    q = copy.deepcopy(model)
    weight_bits, numel = 0.0, 0
    for _, mod in _weights(q):
        w = mod.weight.detach()
        rows = w.reshape(w.shape[0], -1)
        g = group if w.numel() % group == 0 else rows.shape[1]
        wq, meta = Quantizer.quantize(rows, nbits=bits, group_size=g, optimize=True, axis=1, bitpack=False,
                                      device="cpu", compute_dtype=torch.float32)
        deq = Quantizer.dequantize(wq, meta).reshape(w.shape).to(w.dtype)
        mod.weight = torch.nn.Parameter(deq, requires_grad=False)
        weight_bits += bits * w.numel() + 32 * (w.numel() // g)
        numel += w.numel()
    other = sum(t.numel() * 4 for t in q.parameters()) + sum(b.numel() * 4 for b in q.buffers() if b.is_floating_point())
    other -= 4 * numel
    return q.eval(), weight_bits / numel, int(math.ceil(weight_bits / 8) + other)


def run_model(name: str, subset: Optional[int], threads: int, peers: bool = False,
              only: tuple[str, ...] = (), known_sizes: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """One model's rows (``only``: those whose key starts with one of these prefixes).
    ``known_sizes``: bytes of rows measured by an earlier run (``--add-rows``), so that an
    ``alloc@bytes:<row>`` row can run without rerunning ``<row>`` (a peer from another venv)."""
    import torch

    import dfmpc_fx
    from dfmpc_fx.examples.data import calibration_subset, load_fashion_mnist
    from dfmpc_fx.examples.zoo import load_pretrained

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    acc = benchmark_module("accuracy")
    images, labels = load_fashion_mnist("test")
    if subset:
        images, labels = images[:subset], labels[:subset]
    out: dict[str, Any] = {"rows": []}
    sizes: dict[str, int] = dict(known_sizes or {})
    reference = acc.model_logits(load_pretrained(name), images)  # what every row is held against
    t_model = time.perf_counter()
    for row in rows(peers):
        if only and not row["key"].startswith(only):
            continue
        t0 = time.perf_counter()
        res = {k: v for k, v in row.items() if k != "config"}
        res["config"] = dict(row.get("config", {}))
        model = load_pretrained(name)
        try:
            if row["kind"] == "fp32":
                final = model
                n = sum(m.weight.numel() for _, m in _weights(model))
                res.update(bits_per_weight=32.0, bytes=sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point()))
                res["numel"] = n
            elif row["kind"] in ("compress", "bn_ref"):
                cfg = dict(res["config"])
                if isinstance(cfg.get("target_bytes"), str):  # the bytes of an earlier row
                    res["bytes_of"] = cfg["target_bytes"]
                    if res["bytes_of"] not in sizes:
                        res["skipped"] = f"row {res['bytes_of']} did not run"
                        out["rows"].append(res)
                        continue
                    cfg["target_bytes"] = sizes[res["bytes_of"]]
                    res["config"] = cfg
                final = dfmpc_fx.compress(model, **cfg)
                rep = dfmpc_fx.get_report(final)
                res.update(bits_per_weight=rep.bits_per_weight, bytes=rep.compressed_bytes,
                           compress_seconds=round(rep.compress_seconds, 3),
                           widths={l.name: (l.bits, l.group_size) for l in rep.layers})
                if row["kind"] == "bn_ref":
                    acc.reestimate_batchnorm(final, calibration_subset(2000, seed=0))
            elif row["kind"] == "peer":
                got = benchmark_module("peers").run_peer(row["peer"], model, dfmpc_fx.DFMPCConfig(**res["config"]))
                if got.get("skipped"):
                    res["skipped"] = got["reason"]
                    out["rows"].append(res)
                    print(f"{name:20s} {row['key']:20s} skipped: {res['skipped']}", flush=True)
                    continue
                final = got["model"]
                rep = dfmpc_fx.get_report(final)
                res.update(bits_per_weight=rep.bits_per_weight, bytes=rep.compressed_bytes, detail=got["detail"])
            elif row["kind"] == "hqq":
                final, bpw, nbytes = hqq_model(model, row["bits"], row["group"])
                res.update(bits_per_weight=bpw, bytes=nbytes)
            else:  # pragma: no cover
                raise ValueError(row["kind"])
        except dfmpc_fx.ConfigError as exc:
            res["skipped"] = str(exc).split(";")[0]
            out["rows"].append(res)
            print(f"{name:20s} {row['key']:20s} skipped: {res['skipped']}", flush=True)
            continue
        except ImportError as exc:
            res["skipped"] = f"{type(exc).__name__}: {exc} (pip install --no-deps hqq termcolor)"
            out["rows"].append(res)
            continue
        sizes[row["key"]] = res["bytes"]
        logits = reference if row["kind"] == "fp32" else acc.model_logits(final, images)
        res["acc"] = round(100.0 * float((logits.argmax(dim=1) == labels).float().mean()), 2)
        res["agree"], res["logit_err"] = acc.fidelity(logits, reference)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out["rows"].append(res)
        print(f"{name:20s} {row['key']:20s} {res['acc']:6.2f}% @ {res['bits_per_weight']:.3f} b/w "
              f"{res['bytes'] / 1e3:8.1f} kB  ({res['seconds']:.0f}s)", flush=True)
    out["seconds"] = round(time.perf_counter() - t_model, 1)
    out["n_test"] = int(images.shape[0])
    return out


# --------------------------------------------------------------------------- comparison


def _ok(rows_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows_ if "acc" in r]


def comparisons(mres: dict[str, Any]) -> list[dict[str, Any]]:
    """For each allocator point: the best competitor at the same or a smaller size in bytes, per
    family, and whether the allocator is at least as accurate (within TIE)."""
    rs = _ok(mres["rows"])
    fp32 = next(r["acc"] for r in rs if r["key"] == "fp32")
    out = []
    for a in [r for r in rs if r["family"] == "allocator"]:
        line = {"key": a["key"], "acc": a["acc"], "bits_per_weight": a["bits_per_weight"], "bytes": a["bytes"],
                "drop": round(fp32 - a["acc"], 2), "agree": a.get("agree"), "vs": {}}
        for fam in ("uniform corrected", "uniform plain", "MP layout", "paper", "HQQ", PEER_FAMILY):
            rivals = [r for r in rs if r["family"] == fam and r["bytes"] <= a["bytes"]]
            if rivals:
                best = max(rivals, key=lambda r: r["acc"])
                line["vs"][fam] = {"key": best["key"], "acc": best["acc"], "bytes": best["bytes"],
                                   "agree": best.get("agree"), "ok": a["acc"] >= best["acc"] - TIE}
        ref = next((r for r in rs if r["key"] == a.get("bytes_of")), None)
        if ref is not None:  # budgeted at exactly this row's bytes (its own size is at most that)
            line["vs"]["matched"] = {"key": ref["key"], "acc": ref["acc"], "bytes": ref["bytes"],
                                     "agree": ref.get("agree"), "ok": a["acc"] >= ref["acc"] - TIE and a["bytes"] <= ref["bytes"]}
        out.append(line)
    return out


def _agreement(row: dict[str, Any]) -> str:
    return f" ({row['agree']:.2f})" if row.get("agree") is not None else ""


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [BEGIN, "## Accuracy per byte (size budget)", "",
             f"Generated by `{meta['command']}` on {meta['machine']}, {meta['started_utc']}: "
             f"{meta['total_seconds'] / 60:.1f} min wall ({meta['jobs']} worker(s), one thread each); "
             f"top-1 on {meta['n_test']} Fashion-MNIST test images. `bits/w` over every conv/linear weight, "
             "scales and zero points counted; `kB` = whole model as `compressed_bytes` counts it. "
             "*agrees with FP32*: share of test images on which the row predicts what the float model "
             "predicts; *logit error*: `||z - z_fp32||^2 / ||z_fp32 - mean||^2` over the test set (a data-free "
             "method has no labels: reproducing the float model is what it can aim at). "
             "Plot: `benchmarks/budget_pareto.png`.", ""]
    for extra in meta.get("added", []):
        lines += [f"Rows added by `{extra['command']}` ({extra['started_utc']}, {extra['total_seconds'] / 60:.1f} min).", ""]
    for name, mres in results["models"].items():
        rs = mres["rows"]
        fp32 = next((r["acc"] for r in rs if r["key"] == "fp32"), None)
        lines += [f"### {name} (FP32 {fp32})", "", "| row | family | top-1 | drop | agrees with FP32 % | logit error | bits/w | kB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: r.get("bytes", 0)):
            if "acc" not in r:
                lines.append(f"| {r['key']} | {r['family']} | — | — | — | — | — | {r.get('skipped', '')} |")
                continue
            agree = f"{r['agree']:.2f}" if "agree" in r else "not measured"
            err = f"{r['logit_err']:.1e}" if "logit_err" in r else "not measured"
            lines.append(f"| {r['key']} | {r['family']} | {r['acc']:.2f} | {fp32 - r['acc']:.2f} | {agree} | {err} | "
                         f"{r['bits_per_weight']:.3f} | {r['bytes'] / 1e3:.1f} |")
        lines += ["", "Equal size: each allocator point against the most accurate row of each family at the same or "
                  f"a smaller size in bytes (tie within {TIE} point counts); in brackets, each row's agreement with "
                  "FP32's predictions (%).", "",
                  "| allocator | top-1 @ bits/w | budgeted at the bytes of | uniform corr. | uniform plain | MP layout | paper | HQQ | peers |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons(mres):
            cells = []
            for fam in ("matched", "uniform corrected", "uniform plain", "MP layout", "paper", "HQQ", PEER_FAMILY):
                v = c["vs"].get(fam)
                if v is None and fam == "matched":
                    cells.append("")
                elif v is None:
                    cells.append("none smaller" if any(r["family"] == fam and "acc" in r for r in rs) else "not run")
                else:
                    cells.append(f"{v['key']} {v['acc']:.2f} {'✔' if v['ok'] else '✘'}{_agreement(v)}")
            lines.append(f"| {c['key']} | {c['acc']:.2f} @ {c['bits_per_weight']:.3f}{_agreement(c)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_markdown(results: dict[str, Any], path: Path = BENCHMARKS_MD) -> None:
    section = render(results)
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = section + "\n" + text
    path.write_text(text)


def plot(results: dict[str, Any], path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    styles = {"allocator": ("o-", "C0"), "uniform corrected": ("s--", "C1"), "uniform plain": ("x", "C7"),
              "MP layout": ("^", "C2"), "paper": ("v", "C3"), "HQQ": ("D:", "C4"), "data-aware reference": ("*", "k"),
              PEER_FAMILY: ("P", "C5")}
    for ax, name in zip(axes[0], names):
        rs = _ok(results["models"][name]["rows"])
        fp32 = next(r["acc"] for r in rs if r["key"] == "fp32")
        for fam, (style, color) in styles.items():
            pts = sorted((r["bits_per_weight"], r["acc"]) for r in rs if r["family"] == fam)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=fam, ms=5)
        ax.axhline(fp32, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{name} (FP32 {fp32:.2f})", fontsize=9)
        ax.set_xlabel("bits per weight (scales counted)")
        ax.set_ylim(max(fp32 - 8, 0), fp32 + 1)
    axes[0][0].set_ylabel("top-1 %")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--subset", type=int, default=None, help="first N test images only")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="models evaluated in parallel")
    p.add_argument("--json", default=str(RESULTS))
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--add-rows", nargs="+", default=(), metavar="PREFIX",
                   help="run only the rows whose key starts with a PREFIX (e.g. aimet brevitas) and merge them "
                        "into the existing --json results")
    p.add_argument("--peers", action="store_true",
                   help="add AIMET / Brevitas equalization + uniform rows (pip install -e '.[peers]', a separate venv)")
    args = p.parse_args(argv)
    if args.render_only:
        results = json.loads(Path(args.json).read_text())
        write_markdown(results)
        plot(results)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dfmpc_fx.examples.zoo import MODELS, default_checkpoint_dir

    models = args.models or [m for m in MODELS if (Path(default_checkpoint_dir()) / f"{m}.pt").is_file()]
    # heaviest first, so the pool's last worker does not start a big model late
    order = ["resnet56", "resnet18_fmnist", "resnet20", "vgg_small", "mobilenetv2_fmnist"]
    models.sort(key=lambda m: order.index(m) if m in order else len(order))
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(models)))) as pool:
        known: dict[str, dict[str, int]] = {}
        if args.add_rows and Path(args.json).is_file():  # earlier rows' bytes, for alloc@bytes rows
            for m, res in json.loads(Path(args.json).read_text())["models"].items():
                known[m] = {r["key"]: r["bytes"] for r in res["rows"] if "bytes" in r and "skipped" not in r}
        futures = {m: pool.submit(run_model, m, args.subset, 1, args.peers, tuple(args.add_rows), known.get(m))
                   for m in models}
        results = {"models": {m: futures[m].result() for m in models}}
    import platform

    if args.add_rows:
        merged = json.loads(Path(args.json).read_text())
        for m, res in results["models"].items():
            old = merged["models"].setdefault(m, {"rows": [], "seconds": 0.0, "n_test": res["n_test"]})
            if old.get("n_test") != res["n_test"]:
                raise SystemExit(f"{m}: the existing results use {old.get('n_test')} test images, these {res['n_test']}")
            keys = {r["key"] for r in res["rows"]}
            old["rows"] = [r for r in old["rows"] if r["key"] not in keys] + res["rows"]
        merged["meta"].setdefault("added", []).append({
            "command": "python benchmarks/budget.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started_utc": started, "total_seconds": round(time.perf_counter() - t0, 1)})
        Path(args.json).write_text(json.dumps(merged, indent=1) + "\n")
        write_markdown(merged)
        plot(merged)
        print(f"merged {sorted(args.add_rows)} rows into {args.json}")
        return 0

    first = next(iter(results["models"].values()))
    results["meta"] = {
        "command": "python benchmarks/budget.py" + ("" if not argv and len(sys.argv) < 2 else " " + " ".join(argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "started_utc": started, "total_seconds": round(time.perf_counter() - t0, 1),
        "jobs": min(args.jobs, len(models)), "n_test": first["n_test"],
        "model_seconds": {m: r["seconds"] for m, r in results["models"].items()},
    }
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results)
    plot(results)
    print(f"wrote {args.json}, {PLOT}, {BENCHMARKS_MD} in {results['meta']['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
