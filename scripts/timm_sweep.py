"""Compress a sample of timm architectures (random weights) and record what happened.

    OMP_NUM_THREADS=1 python scripts/timm_sweep.py [--size 96] [--out docs/timm.md] [model ...]

Per model: build with pretrained=False, compress at the default config (run once on an example
input), compress at 16 bits everywhere and compare outputs to the float model (a function check:
rel. error < 1e-3 means every swapped layer computes what it replaced), and count quantized,
float-kept and refused layers. Writes a markdown table.
"""
from __future__ import annotations

import argparse
import time
import traceback
import warnings

import torch

import dfmpc_fx

MODELS = ["resnet18", "mobilenetv2_035", "efficientnet_b0", "nf_regnet_b0", "levit_128s", "efficientformer_l1",
          "vit_tiny_patch16_224", "convnext_atto", "mobilevit_xxs", "regnetx_002", "tf_efficientnet_b0",
          "resnet18d", "ghostnet_050"]
FIXED_SIZE = {"levit_128s": 224, "efficientformer_l1": 224, "vit_tiny_patch16_224": 224, "mobilevit_xxs": 256}
BITS16 = dfmpc_fx.DFMPCConfig(low_bits=16, high_bits=16, default_bits=16, first_last_bits=16, max_bits=16)


def run(name: str, size: int) -> dict:
    import timm

    row = {"model": name}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    size = FIXED_SIZE.get(name, size)
    x = torch.randn(1, 3, size, size)
    row["size"] = size
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        q = dfmpc_fx.compress(model, example_inputs=x)
        row["seconds"] = time.perf_counter() - t
        q16 = dfmpc_fx.compress(model, BITS16)
    rep = dfmpc_fx.get_report(q)
    with torch.no_grad():
        row["rel_err_16"] = float((q16(x) - ref).norm() / ref.norm())
        row["rel_err_default"] = float((q(x) - ref).norm() / ref.norm())
    row["layers"] = len(rep.layers)
    row["quantized"] = sum(l.bits is not None for l in rep.layers)
    row["in_leaf"] = sum(l.bits is not None and bool(l.reason) for l in rep.layers)
    reasons: dict[str, int] = {}
    for l in rep.layers:
        if l.bits is None:
            key = "inside a leaf module" if (l.reason or "").startswith("inside") else (l.reason or "?").split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    row["float"] = "; ".join(f"{v} {k}" for k, v in reasons.items())
    row["pairs"] = rep.num_pairs
    row["refused"] = len(rep.refusals)
    return row


DOC = """# timm models

`dfmpc_fx.compress` on a sample of small [timm](https://github.com/huggingface/pytorch-image-models)
architectures, built with `pretrained=False` (random weights, nothing downloaded), input
{size} px unless the architecture fixes its size. Regenerate with

    OMP_NUM_THREADS=1 python scripts/timm_sweep.py --size {size}

What is automatic when timm is imported: timm's registered not-traceable modules
(`timm.layers._fx._leaf_modules`: BatchNormAct2d, Conv2dSame, NormFreeBlock, MobileVitBlock, ...)
are traced as one call and its autowrapped functions (`_autowrap_functions`) are recorded as
calls; BatchNormAct2d is treated as BatchNorm then its activation; conv/linear subclasses with
their own forward (ScaledStdConv2d, Conv2dSame) are quantized keeping their forward; conv/linear
layers inside an opaque block get plain rounding at `default_bits` (column "of which plain").
`dfmpc pairs timm:resnet18` and `dfmpc compress timm:<name> ...` take timm specs.

Columns: *conv/linear* counts every Conv1d/Conv2d/Linear module of the model, all of which
appear in `get_report(q).layers`; *16-bit rel. err* is ||q(x) - f(x)|| / ||f(x)|| with every
layer at 16 bits (a function check: each swapped module computes what it replaced); *default
rel. err* is the same at the default config (pairs at 2/6 bits, other layers at 8) on **random
weights and freshly initialised BatchNorm statistics**, so it says nothing about accuracy: it
mostly reflects how many 2-bit layers a model gets and how a random deep net amplifies their
noise (efficientnet_b0's 0.66 comes from its 2 pairs, pointwise convs through a
BatchNormAct2d with Identity act into the next pointwise conv, at 2/6 bits: 0.15 at 4/8 bits,
0.67 without compensation; its 16-bit check passes);
*pairs* are the compensated pairs, *refused* the layers whose chain found no partner (transformers,
ConvNeXt: LayerNorm/GELU/attention everywhere, so DF-MPC degenerates to plain per-channel
rounding there). *compress s* is wall time on a shared 2-core machine, one thread.

{table}

Not covered: pretrained accuracy (no weights or data are downloaded here); models outside this
sample (the script takes names: `python scripts/timm_sweep.py convnext_nano ...`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--out", default="docs/timm.md")
    args = parser.parse_args()
    import timm

    rows = []
    for name in args.models:
        try:
            row = run(name, args.size)
        except Exception as exc:  # recorded, not hidden
            row = {"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            traceback.print_exc()
        print(row, flush=True)
        rows.append(row)
    lines = [
        f"| model | input | conv/linear | quantized (of which plain, inside a leaf block) | kept in float (why) | pairs | refused | 16-bit rel. err | default rel. err | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | **failed**: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['size']} | {r['layers']} | {r['quantized']} ({r['in_leaf']}) | {r['float'] or '-'} | "
                         f"{r['pairs']} | {r['refused']} | {r['rel_err_16']:.1e} | {r['rel_err_default']:.3f} | {r['seconds']:.2f} |")
    table = "\n".join(lines)
    header = (f"<!-- generated by scripts/timm_sweep.py (timm {timm.__version__}, torch {torch.__version__}, "
              f"--size {args.size}) -->\n")
    with open(args.out, "w") as f:
        f.write(header + DOC.format(table=table, size=args.size))
    print(table)


if __name__ == "__main__":
    main()
