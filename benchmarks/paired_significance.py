"""Is an equal-size accuracy difference real? Exact McNemar tests on the full test set.

    python benchmarks/paired_significance.py                      # resnet18_fmnist, ~1 min
    python benchmarks/paired_significance.py --model resnet20

Compares, image by image on the 10k Fashion-MNIST test images, three models of one committed
checkpoint: FP32, uniform W4 corrected (8-bit first/last, the ``uniform_corr@W4`` row of
``benchmarks/budget.py``) and the allocator at exactly its bytes (``alloc@bytes:uniform_corr@W4``).
For each pair it prints the discordant counts (A right and B wrong, B right and A wrong) and the
exact two-sided McNemar p-value (a binomial test on the discordant images). A small number of
images whose correctness differs from FP32 means the compressed model stays close to the float
function, which is what a data-free method can aim at; a gain *over* FP32 is not.
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

    def correct(cfg: dict | None) -> tuple[torch.Tensor, int | None]:
        model = load_pretrained(args.model)
        final = model if cfg is None else dfmpc_fx.compress(model, **cfg)
        size = None if cfg is None else dfmpc_fx.get_report(final).compressed_bytes
        return acc.predictions_correct(final, images, labels).bool(), size

    uniform_cfg = dict(low_bits=4, high_bits=4, default_bits=4, first_last_bits=8, max_bits=16)
    fp32, _ = correct(None)
    uniform, uniform_bytes = correct(uniform_cfg)
    alloc, alloc_bytes = correct(dict(target_bytes=uniform_bytes))
    models = {"fp32": fp32, "uniform_corr@W4": uniform, "alloc@bytes:uniform_corr@W4": alloc}
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
    return out


if __name__ == "__main__":
    main()
