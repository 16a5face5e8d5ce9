"""Compress-time and forward-time ratios for torchvision resnet50, measured side by side.

    python benchmarks/bench_compress.py [--model resnet50] [--repeats 9] [--batch 32]

Prints (1) compress time as a ratio to plain per-channel rounding of all weights (target <= 5x)
and (2) the compressed model's forward time as a ratio to the float model (target <= 1.10).
Both sides of each ratio are measured alternately in the same process and the medians are
compared, so machine noise affects both alike; absolute times are printed for reference only.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
import warnings

import torch
import torchvision

import dfmpc_fx


def plain_per_channel_rounding(model: torch.nn.Module, bits: int = 8) -> dict[str, torch.Tensor]:
    """The cheapest possible weight quantizer: max-abs per output channel, round, dequantize."""
    qmax = 2 ** (bits - 1) - 1
    out = {}
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        w = p.detach()
        shape = (-1,) + (1,) * (w.dim() - 1)
        scale = (w.reshape(w.shape[0], -1).abs().amax(dim=1) / qmax).clamp_min(1e-12).view(shape)
        out[name] = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
    return out


def _time(fn, *args) -> float:
    # the compressed models discarded by earlier calls hold reference cycles (fx graphs), so their
    # weights wait for the cyclic collector, which would otherwise run inside a later timed call
    gc.collect()
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--target-bits", type=float, default=3.0, help="the size-budget row's target_bits")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    cfg = dfmpc_fx.DFMPCConfig(low_bits=2, high_bits=6)
    budget = dfmpc_fx.DFMPCConfig(target_bits=args.target_bits)
    dfmpc_fx.compress(model, cfg)  # warm-up (imports, allocator)
    dfmpc_fx.compress(model, budget)
    plain_per_channel_rounding(model)

    # A model with modules in train mode takes the deep-copy path (see compress); timed too.
    train_model = copy.deepcopy(model).train()
    # The budget row is compared to a plain series of its own, each pass timed right before it
    # (this machine's memory state moves both by up to 1.5x within a minute).
    plain_t, comp_t, comp_train_t, plain_b_t, budget_t = [], [], [], [], []
    for _ in range(args.repeats):
        plain_t.append(_time(plain_per_channel_rounding, model))
        comp_t.append(_time(dfmpc_fx.compress, model, cfg))
        comp_train_t.append(_time(dfmpc_fx.compress, train_model, cfg))
        plain_b_t.append(_time(plain_per_channel_rounding, model))
        budget_t.append(_time(dfmpc_fx.compress, model, budget))
    qmodel = dfmpc_fx.compress(model, cfg)

    x = torch.randn(args.batch, 3, args.size, args.size)
    float_t, quant_t = [], []
    with torch.inference_mode():
        model(x), qmodel(x)  # warm-up
        for i in range(args.repeats):
            pair = [(model, float_t), (qmodel, quant_t)]
            for m, sink in (pair if i % 2 == 0 else pair[::-1]):
                sink.append(_time(m, x))

    med = statistics.median
    res = {
        "plain_rounding_s": med(plain_t),
        "compress_s": med(comp_t),
        "compress_ratio": med(comp_t) / med(plain_t),
        "compress_train_mode_s": med(comp_train_t),
        "compress_train_mode_ratio": med(comp_train_t) / med(plain_t),
        "compress_budget_s": med(budget_t),
        "compress_budget_ratio": med(budget_t) / med(plain_b_t),
        "float_forward_s": med(float_t),
        "compressed_forward_s": med(quant_t),
        "forward_ratio": med(quant_t) / med(float_t),
    }
    print(f"model {args.model}, {torch.get_num_threads()} threads, {args.repeats} alternating repeats, medians")
    print(f"compress: {res['compress_s']:.3f} s vs plain per-channel rounding {res['plain_rounding_s']:.3f} s "
          f"-> ratio {res['compress_ratio']:.2f}x (target <= 5x)")
    print(f"  (fastest of {args.repeats}: compress {min(comp_t):.3f} s vs {min(plain_t):.3f} s -> "
          f"{min(comp_t) / min(plain_t):.2f}x; the target is judged on the medians)")
    print(f"  (the same model in train mode, deep-copied first: {res['compress_train_mode_s']:.3f} s -> "
          f"{res['compress_train_mode_ratio']:.2f}x)")
    print(f"compress with target_bits={args.target_bits}: {res['compress_budget_s']:.3f} s vs plain rounding "
          f"{med(plain_b_t):.3f} s (timed next to it) -> ratio {res['compress_budget_ratio']:.2f}x (target <= 5x)")
    print(f"forward batch {args.batch}: compressed {res['compressed_forward_s']:.3f} s vs float "
          f"{res['float_forward_s']:.3f} s -> ratio {res['forward_ratio']:.3f} (target <= 1.10)")
    return res


if __name__ == "__main__":
    main()
