"""How much of a layer's output noise reaches the model's output, estimated data-free.

The allocator's damage of a layer is the noise-to-signal ratio it adds to its own output;
what matters is the ratio that survives to the model's output. Walking the graph backwards
from the output, each op maps a relative noise at its input to one at its output:

- a residual add of branches with variances ``V_a`` and ``V_b``: noise on one branch is
  diluted by ``V_a / (V_a + V_b)`` (independent branches); where a variance is unknown (after a
  leaf module, whose output has no moments), by 1/2. Passing the add's gain to both in full,
  as before, doubled the gain at every residual block of such a stretch: 2^29 at the stem of
  timm's convit_tiny, whose attention blocks are leaves;
- ``scaled_dot_product_attention(q, k, v)``: the output is linear in ``v``; noise on ``q`` or
  ``k`` only reweights value rows, so they get ``QUERY_KEY_GAIN`` of ``v``'s share (the three
  shares sum to one: q, k, v projected from one tensor pass that tensor's gain on unchanged);
- eager attention, ``softmax(q k^T / s, dim=-1) @ v``: the weights get ``QUERY_KEY_GAIN`` of
  ``v``'s share, which ``q k^T`` passes on to q and to k each (so q, k, v get what SDPA gives);
- everything else (layers, normalisations, activations, pooling, reshapes) passes the ratio on
  at unit gain; fan-out adds the paths' gains.

Measured on the committed ResNet-20 (each layer alone at 2 bits, logits' relative error on 500
test images), the residual dilution lifts the rank correlation of estimate and measurement from
0.26 to 0.42. A per-layer "coherence" factor (trained filters sum correlated inputs, so the
recorded output variance exceeds the independent-input one and relative noise shrinks) was
tried and dropped: compounded over depth it over-shrinks early layers (ResNet-20 0.58 at half
strength, VGG-small 0.79 -> -0.05). So was an activation gain, the factor by which an
activation scales a small relative noise on its Gaussian input (``sum E[f'(x)^2] Var(x) /
sum Var(f(x))``, 1.47 for a zero-mean ReLU, more for sparse units): compounded along the path it
gave the stem conv of ResNet-20 316x the classifier's gain; applied once, for the activation
right after each layer, it lowered the rank correlation (each layer alone at 2 bits) on every
CNN checkpoint (ResNet-20 0.58 -> 0.46, VGG-small 0.86 -> 0.83, MobileNetV2 0.75 -> 0.57,
ResNet-18 0.31 -> 0.26) and moved all-MiniLM-L6-v2 at ``target_bits=4.0`` only from cosine 0.947
to 0.950.

The result weights each layer's ratio in the knapsack objective (see
:mod:`dfmpc_fx.numerics.allocation`). It is a ranking device, not a calibrated prediction.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..numerics.compensation import ChannelMoments
from .moments import eager_attention_operands
from .pairs import WEIGHTED_MODULES

__all__ = ["output_noise_gains", "QUERY_KEY_GAIN"]

#: Share of a relative noise on the queries or keys of ``scaled_dot_product_attention`` that
#: reaches its output, against the values' (the output is linear in them). Noise on q or k moves
#: the attention logits, and the softmax turns that into a reweighting of value rows that mostly
#: look alike. A heuristic, not derived: on all-MiniLM-L6-v2 (each Linear alone at 3 bits,
#: embedding cosine on 320 sentences, ``benchmarks/minilm.py --per-layer``) a query projection
#: costs 0.03-0.78 (median 0.25) of the value projection of the same layer, a key 0.1-1.7
#: (median 0.39); 0.1 and 0.5 here gave cosine 0.914 / 0.913 at ``target_bits=4.0`` against
#: 0.917 for 0.25 (measured with float32 scales).
QUERY_KEY_GAIN = 0.25

_ADDS = (operator.add, torch.add, operator.iadd, "add", "add_")


def _mean_var(m: Optional[ChannelMoments]) -> Optional[float]:
    return None if m is None else float(m.var.mean())


def output_noise_gains(gm: GraphModule, moments: dict[str, Optional[ChannelMoments]]) -> dict[str, float]:
    """``{module name: gain}``: the share of a relative noise at the output of each conv/linear
    layer, and of each other module called once (a leaf: the layers inside it take its gain),
    that reaches the model's output (see the module docstring). ``moments`` are
    :func:`dfmpc_fx.graph.moments.propagate_moments`'s estimates."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    gain: dict[Node, float] = {n: 0.0 for n in nodes}
    for n in nodes:
        if n.op == "output":
            gain[n] = 1.0
    for n in reversed(nodes):
        g = gain[n]
        if g == 0.0 or n.op == "placeholder":
            continue
        inputs = n.all_input_nodes
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention and len(n.args) >= 3:
            # Normalised so that q, k and v computed from one tensor pass it ``g`` in all (the
            # fork into three projections and their join here neither amplify nor lose noise).
            q, k, v = n.args[:3]
            total = 1.0 + 2.0 * QUERY_KEY_GAIN
            for x, share in ((q, QUERY_KEY_GAIN), (k, QUERY_KEY_GAIN), (v, 1.0)):
                if isinstance(x, Node):
                    gain[x] += g * share / total
            continue
        if (operands := eager_attention_operands(n, modules)) is not None:
            probs, v = operands
            total = 1.0 + 2.0 * QUERY_KEY_GAIN
            # the weights' share reaches q and k each in full through q k^T (a plain fan-out)
            for x, share in ((probs, QUERY_KEY_GAIN), (v, 1.0)):
                if isinstance(x, Node):
                    gain[x] += g * share / total
            continue
        if n.op == "call_function" or n.op == "call_method":
            if n.target in _ADDS and len(inputs) == 2:
                va, vb = (_mean_var(moments.get(x.name)) for x in inputs)
                if va is not None and vb is not None and va + vb > 0:
                    gain[inputs[0]] += g * va / (va + vb)
                    gain[inputs[1]] += g * vb / (va + vb)
                else:
                    gain[inputs[0]] += g / 2
                    gain[inputs[1]] += g / 2
                continue
        for x in inputs:
            gain[x] += g
    calls: dict[str, int] = {}
    for n in nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    return {str(n.target): gain[n] for n in nodes if n.op == "call_module"
            and (isinstance(modules[str(n.target)], WEIGHTED_MODULES) or calls[str(n.target)] == 1)}
