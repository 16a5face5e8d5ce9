"""Predicted (data-free) vs measured per-channel moments of every conv/linear input.

``python scripts/moments_vs_data.py [model] [n_images]``: for each layer, the median over
channels of |mean_pred - mean_meas| / std_meas and |var_pred - var_meas| / var_meas, measured
on the first n Fashion-MNIST test images (the zoo's models).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from dfmpc_fx.examples.data import load_fashion_mnist
from dfmpc_fx.examples.zoo import load_pretrained
from dfmpc_fx.graph.moments import estimate_moments, layer_input_moments
from dfmpc_fx.graph.tracing import trace_model


def measured_input_moments(gm: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean/var (over batch and positions) of each conv/linear input."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, mod in gm.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            def hook(m, inp, _o, name=name):
                t = inp[0].detach().to(torch.float64)
                t = t.movedim(-1, 0) if isinstance(m, nn.Linear) else t.movedim(1, 0)
                t = t.reshape(t.shape[0], -1)
                out[name] = (t.mean(1), t.var(1))
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        gm(x)
    for h in hooks:
        h.remove()
    return out


def compare(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float, str]]:
    """layer -> (median mean error / std, median relative var error, source)."""
    model = model.eval()
    gm = trace_model(model)
    est = estimate_moments(gm)
    pred = layer_input_moments(gm, est)
    meas = measured_input_moments(gm, x)
    res = {}
    for name, (m, src) in pred.items():
        if m is None or name not in meas:
            continue
        mm_, mv = meas[name]
        n = mm_.numel()
        pm = m.mean.expand(n) if m.mean.numel() == 1 else m.mean
        pv = m.var.expand(n) if m.var.numel() == 1 else m.var
        if pm.numel() != n:
            continue
        e_mean = ((pm - mm_).abs() / mv.clamp_min(1e-12).sqrt()).median().item()
        e_var = ((pv - mv).abs() / mv.clamp_min(1e-12)).median().item()
        res[name] = (e_mean, e_var, src)
    return res


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "mobilenetv2_fmnist"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    x = load_fashion_mnist("test")[0][:n]
    res = compare(load_pretrained(name), x)
    for layer, (em, ev, src) in res.items():
        print(f"{layer:32s} mean_err/std {em:7.3f}  var_rel_err {ev:7.3f}  ({src})")
    ems = torch.tensor([r[0] for r in res.values()])
    evs = torch.tensor([r[1] for r in res.values()])
    print(f"{name}: {len(res)} layers, median over layers: mean_err/std {ems.median():.3f}, var_rel_err {evs.median():.3f}")


if __name__ == "__main__":
    main()
