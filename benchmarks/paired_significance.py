"""Is an equal-size accuracy difference real? Exact McNemar tests on the full test set.

    python benchmarks/paired_significance.py                      # resnet18_fmnist, ~1 min
    python benchmarks/paired_significance.py --model resnet20
    python benchmarks/paired_significance.py --other-sets         # + 4 more image sets, ~2.5 min

Compares, image by image on the 10k Fashion-MNIST test images, three models of one committed
checkpoint: FP32, uniform W4 corrected (8-bit first/last, the ``uniform_corr@W4`` row of
``benchmarks/budget.py``) and the allocator at exactly its bytes (``alloc@bytes:uniform_corr@W4``).
For each pair it prints the discordant counts (A right and B wrong, B right and A wrong) and the
exact two-sided McNemar p-value (a binomial test on the discordant images). A small number of
images whose correctness differs from FP32 means the compressed model stays close to the float
function, which is what a data-free method can aim at; a gain *over* FP32 is not.

``--other-sets``: the same three models on four more image sets (the test images flipped, shifted
by one pixel either way, and the first 20k training images), top-1 and agreement with FP32's
predictions on each: is a lead one model has on the test images a property of the model or of
those 10k images?
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def exact_mcnemar(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value for ``a_only`` and ``b_only`` discordant pairs."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_fmnist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--other-sets", action="store_true", help="also flipped / shifted test images and 20k training images")
    args = parser.parse_args(argv)
    import torch
    from budget import benchmark_module  # this folder, sys.path[0] when run as a script

    import dfmpc_fx
    from dfmpc_fx.examples.data import load_fashion_mnist
    from dfmpc_fx.examples.zoo import load_pretrained

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    acc = benchmark_module("accuracy")
    images, labels = load_fashion_mnist("test")

    def build(cfg: dict | None):
        model = load_pretrained(args.model)
        final = model if cfg is None else dfmpc_fx.compress(model, **cfg)
        size = None if cfg is None else dfmpc_fx.get_report(final).compressed_bytes
        return final, size

    uniform_cfg = dict(low_bits=4, high_bits=4, default_bits=4, first_last_bits=8, max_bits=16)
    fp32_model, _ = build(None)
    uniform_model, uniform_bytes = build(uniform_cfg)
    alloc_model, alloc_bytes = build(dict(target_bytes=uniform_bytes))
    built = {"fp32": fp32_model, "uniform_corr@W4": uniform_model, "alloc@bytes:uniform_corr@W4": alloc_model}
    test_predictions = {k: acc.model_logits(m, images).argmax(dim=1) for k, m in built.items()}
    models = {k: p == labels for k, p in test_predictions.items()}  # each test image right or wrong
    fp32, uniform, alloc = models.values()
    print(f"{args.model}, {images.shape[0]} test images: fp32 {100 * fp32.float().mean():.2f}, "
          f"uniform_corr@W4 {100 * uniform.float().mean():.2f} ({uniform_bytes / 1e3:.1f} kB), "
          f"alloc@bytes:uniform_corr@W4 {100 * alloc.float().mean():.2f} ({alloc_bytes / 1e3:.1f} kB)")
    out = []
    for a, b in (("uniform_corr@W4", "alloc@bytes:uniform_corr@W4"), ("uniform_corr@W4", "fp32"),
                 ("alloc@bytes:uniform_corr@W4", "fp32")):
        a_only = int((models[a] & ~models[b]).sum())
        b_only = int((models[b] & ~models[a]).sum())
        p = exact_mcnemar(a_only, b_only)
        out.append(dict(a=a, b=b, a_only=a_only, b_only=b_only, p=p))
        print(f"  {a} right, {b} wrong: {a_only:4d} | {b} right, {a} wrong: {b_only:4d} | exact McNemar p = {p:.3f}")
    if args.other_sets:
        for set_name, (x, y) in other_image_sets(images, labels, load_fashion_mnist("train")).items():
            preds = test_predictions if x is images else {k: acc.model_logits(m, x).argmax(dim=1) for k, m in built.items()}
            cells = [f"{k} {100 * float((p == y).float().mean()):.2f} (agrees {100 * float((p == preds['fp32']).float().mean()):.2f})"
                     for k, p in preds.items()]
            out.append(dict(set=set_name, **{k: float((p == y).float().mean()) for k, p in preds.items()}))
            print(f"  {set_name:22s} " + " | ".join(cells))
    return out


def other_image_sets(images, labels, train):
    """``{name: (images, labels)}``: the test images flipped left-right and shifted by one pixel
    down-right and up-left (background fill; the checkpoints were trained with flips and
    pad-2 crops, so these are images of the same distribution), and the first 20k training images."""
    import torch
    import torch.nn.functional as F

    background = float(images.min())
    return {
        "test": (images, labels),
        "test flipped": (torch.flip(images, dims=[3]), labels),
        "test shifted (+1, +1)": (F.pad(images, (1, 0, 1, 0), value=background)[..., :-1, :-1], labels),
        "test shifted (-1, -1)": (F.pad(images, (0, 1, 0, 1), value=background)[..., 1:, 1:], labels),
        "train (first 20k)": (train[0][:20000], train[1][:20000]),
    }


if __name__ == "__main__":
    main()
