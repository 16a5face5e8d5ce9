#!/usr/bin/env python
"""The packed artifact, measured: speed, size, memory of compress, reproducibility.

    OMP_NUM_THREADS=1 python benchmarks/bench_artifact.py [--model resnet18] [--batch 32] [--reps 5]

Prints, measured side by side in one run:

1. forward time of the packed TorchScript artifact (``export_torchscript(packed=True)``, loaded
   with ``torch.jit.load``) over the float model's, at batch 32 (target <= 1.25). The two are
   timed alternately, after warm-up, and the medians compared, so that load from other processes
   affects both alike. The fake-quant TorchScript and a float TorchScript are shown too.
2. artifact size on disk over the theoretical size (sum of bits x weights / 8, scales, zero
   points of asymmetric schemes, every other float parameter and buffer) for the model and for
   resnet50 (target <= 1.25), and the ``dfmpc_fx.save`` file and packed ``.pt2``/ONNX sizes.
3. peak memory of ``compress`` on resnet50 above the process baseline, over the model's float
   weight bytes (target <= 2.5): a fresh subprocess builds the model, resets the kernel's peak
   RSS counter (``/proc/self/clear_refs``), records the baseline, compresses, and reads ``VmHWM``.
4. byte-identical artifacts: two fresh processes (different ``PYTHONHASHSEED``) compress the
   same model and export it; the sha256 of every artifact is compared. The ``dfmpc_fx.save``
   file embeds the report, whose ``compress_seconds`` is a wall-clock measurement, so it is
   compared a second time with that field zeroed.

Random weights (``weights=None``) with random BatchNorm statistics: the numbers measure the
artifact, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_COMMON = textwrap.dedent("""
    import torch, torchvision, warnings
    warnings.simplefilter("ignore")

    def build(name):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)
        gen = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                m.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
        return model.eval()
""")

_MEMORY_SCRIPT = _COMMON + textwrap.dedent("""
    import gc, json, sys
    import dfmpc_fx

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    torch.set_num_threads(1)
    model = build(sys.argv[1])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)  # warm up allocator and kernels outside the measured window
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    baseline = status("VmRSS")
    qmodel = dfmpc_fx.compress(model, low_bits=2, high_bits=6)  # the MP2/6 layout the docs quote
    peak = status("VmHWM")
    print(json.dumps({"weight_bytes": weight_bytes, "baseline": baseline, "peak": peak,
                      "hwm_reset": status("VmHWM") >= baseline}))
""")

_REPRO_SCRIPT = _COMMON + textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    import dfmpc_fx

    torch.set_num_threads(1)
    out = Path(sys.argv[2])
    model = build(sys.argv[1])
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    qmodel = dfmpc_fx.compress(model, low_bits=2, high_bits=6)  # the MP2/6 layout the docs quote
    dfmpc_fx.export_torchscript(qmodel, out / "m.ts", x, packed=True)
    program = dfmpc_fx.export_program(qmodel, x, packed=True, path=out / "m.pt2")
    dfmpc_fx.export_onnx(qmodel, out / "m.onnx", x, packed=True, program=program)
    dfmpc_fx.save(qmodel, out / "m.dfmpc")
    qmodel.meta["dfmpc_report"]["compress_seconds"] = 0.0  # the one field that is a measurement
    dfmpc_fx.save(qmodel, out / "m0.dfmpc")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    print(json.dumps({name: digest(out / name) for name in ("m.ts", "m.pt2", "m.onnx", "m.dfmpc", "m0.dfmpc")}))
""")


def _run(script: str, *args: str, seed: str = "0", timeout: int = 1800) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED=seed)
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_speed_and_size(name: str, batch: int, reps: int, tmp: Path) -> dict:
    import torch

    import dfmpc_fx

    ns: dict = {}
    exec(_COMMON, ns)
    model = ns["build"](name)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    x1 = x[:1]
    qmodel = dfmpc_fx.compress(model, low_bits=2, high_bits=6)  # the MP2/6 layout the docs quote
    report = dfmpc_fx.get_report(qmodel)
    ts_packed = dfmpc_fx.export_torchscript(qmodel, tmp / f"{name}.packed.ts", x1, packed=True)
    artifact_bytes = dfmpc_fx.get_report(qmodel).artifact_bytes
    ts_fq = dfmpc_fx.export_torchscript(qmodel, tmp / f"{name}.fq.ts", x1)
    float_ts = tmp / f"{name}.float.ts"
    torch.jit.save(torch.jit.script(model), str(float_ts))
    saved = dfmpc_fx.save(qmodel, tmp / f"{name}.dfmpc")
    runners = {
        "float (eager)": model,
        "float (TorchScript)": torch.jit.load(str(float_ts)),
        "fake-quant (TorchScript)": torch.jit.load(str(ts_fq)),
        "packed artifact (TorchScript)": torch.jit.load(str(ts_packed)),
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.no_grad():
        ref = model(x1)
        assert torch.equal(runners["packed artifact (TorchScript)"](x1), qmodel(x1))
        for _ in range(2):  # warm up (TorchScript profiles and optimizes on the first calls)
            for fn in runners.values():
                fn(x)
        for _ in range(reps):
            for key, fn in runners.items():
                t0 = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name, "batch": batch, "reps": reps, "median_s": med,
        "theoretical_bytes": report.theoretical_bytes, "artifact_bytes": artifact_bytes,
        "float_bytes": report.float_bytes, "fake_quant_ts_bytes": ts_fq.stat().st_size,
        "saved_bytes": saved.stat().st_size, "ref_finite": bool(torch.isfinite(ref).all()),
    }


def size_only(name: str, tmp: Path) -> dict:
    import torch

    import dfmpc_fx

    ns: dict = {}
    exec(_COMMON, ns)
    model = ns["build"](name)
    x = torch.randn(1, 3, 64, 64)
    qmodel = dfmpc_fx.compress(model, low_bits=2, high_bits=6)  # the MP2/6 layout the docs quote
    dfmpc_fx.export_torchscript(qmodel, tmp / f"{name}.packed.ts", x, packed=True)
    report = dfmpc_fx.get_report(qmodel)
    saved = dfmpc_fx.save(qmodel, tmp / f"{name}.dfmpc")
    return {"model": name, "theoretical_bytes": report.theoretical_bytes, "artifact_bytes": report.artifact_bytes,
            "float_bytes": report.float_bytes, "saved_bytes": saved.stat().st_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="model timed at batch --batch (resnet18 or resnet50)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--memory-model", default="resnet50")
    ap.add_argument("--repro-model", default="resnet18")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f})")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench_artifact_") as tmp_dir:
        tmp = Path(tmp_dir)

        print(f"\n== 1. forward time, {args.model}, batch {args.batch}x3x224x224, median of {args.reps} alternating runs")
        sp = bench_speed_and_size(args.model, args.batch, args.reps, tmp)
        base = sp["median_s"]["float (eager)"]
        for key, t in sp["median_s"].items():
            print(f"  {key:32s} {t * 1000:9.1f} ms   x{t / base:.3f} of float (eager)")
        ratio = sp["median_s"]["packed artifact (TorchScript)"] / base
        ok &= ratio <= 1.25
        print(f"  packed artifact / float model: {ratio:.3f}  (target <= 1.25: {'PASS' if ratio <= 1.25 else 'FAIL'})")

        print("\n== 2. artifact size on disk vs theoretical size")
        rows = [sp, size_only(args.memory_model, tmp)] if args.memory_model != args.model else [sp]
        for r in rows:
            rs = r["artifact_bytes"] / r["theoretical_bytes"]
            ok &= rs <= 1.25
            print(f"  {r['model']:10s} float {r['float_bytes'] / 1e6:8.2f} MB | theoretical {r['theoretical_bytes'] / 1e6:7.3f} MB | "
                  f"packed TorchScript {r['artifact_bytes'] / 1e6:7.3f} MB = x{rs:.3f} ({'PASS' if rs <= 1.25 else 'FAIL'}) | "
                  f"dfmpc_fx.save {r['saved_bytes'] / 1e6:7.3f} MB = x{r['saved_bytes'] / r['theoretical_bytes']:.3f}")
        print(f"  ({sp['model']} fake-quant TorchScript for comparison: {sp['fake_quant_ts_bytes'] / 1e6:.2f} MB)")

        print(f"\n== 3. peak memory of compress, {args.memory_model}, fresh process (VmHWM after resetting it)")
        mem = _run(_MEMORY_SCRIPT, args.memory_model)
        extra = mem["peak"] - mem["baseline"]
        rm = extra / mem["weight_bytes"]
        ok &= rm <= 2.5
        print(f"  model weights+buffers {mem['weight_bytes'] / 1e6:.1f} MB; baseline RSS {mem['baseline'] / 1e6:.1f} MB; "
              f"peak RSS {mem['peak'] / 1e6:.1f} MB; above baseline {extra / 1e6:.1f} MB = x{rm:.2f} of the weights "
              f"(target <= 2.5: {'PASS' if rm <= 2.5 else 'FAIL'})")

        print(f"\n== 4. byte-identical artifacts, {args.repro_model}: two fresh processes (PYTHONHASHSEED 1 and 2)")
        digests = []
        for seed in ("1", "2"):
            out = tmp / f"repro{seed}"
            out.mkdir()
            digests.append(_run(_REPRO_SCRIPT, args.repro_model, str(out), seed=seed))
        labels = {"m.ts": "packed TorchScript", "m.pt2": "packed .pt2", "m.onnx": "packed ONNX",
                  "m.dfmpc": "dfmpc_fx.save", "m0.dfmpc": "dfmpc_fx.save, report's compress_seconds zeroed"}
        for name, label in labels.items():
            same = digests[0][name] == digests[1][name]
            note = ""
            if name == "m.dfmpc":
                note = "  (the embedded report records the compress wall time)" if not same else ""
            else:
                ok &= same
            print(f"  {label:48s} {'identical' if same else 'DIFFERENT'}  {digests[0][name][:16]} / {digests[1][name][:16]}{note}")
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
