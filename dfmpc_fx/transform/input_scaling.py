"""Which layers get per-input-channel factors (``DFMPCConfig.input_scales``): the graph-free
decision over :class:`~dfmpc_fx.transform.plan.LayerInputs`; the math is
:mod:`dfmpc_fx.numerics.input_scales`, the quantizer :func:`~dfmpc_fx.transform.plan.quantize_for`.

Under a size budget (:func:`dfmpc_fx.transform.budget.choose_widths`) the allocator first
chooses widths without factors; the layers whose factors pay at those widths are marked
(``input_scale_reserved``), the knapsack is solved again with their bytes charged, and the
factors are chosen at each marked layer's final width. The allocator's estimate does not see
the factors: scored with them, it rests on the same uncorrelated-input model they are
optimized for and overrates them (on mobilenetv2_fmnist at 3.0 bits/w such an allocation
reached 87.26% against 88.04% for widths chosen without them). Reserving bytes for every
eligible layer up front wastes them where no factor pays (2.92 instead of 3.0 bits/w).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..config import DFMPCConfig
from ..numerics.input_scales import InputFactors, choose_input_factors
from .plan import LayerInputs, quantize_for, quantizes_row_by_row

__all__ = ["assign_input_scales", "input_factors_for"]


def _eligible(inp: LayerInputs) -> bool:
    """Known input variances, one per input channel (``groups=1``), and a weight to quantize."""
    return (inp.in_moments is not None and inp.groups == 1 and inp.weight.dim() >= 2
            and inp.in_moments.var.numel() == inp.weight.shape[1] and inp.weight.shape[1] > 1)


def input_factors_for(inp: LayerInputs, cfg: DFMPCConfig, bits: int, group_size: Optional[int],
                      scheme: Optional[str] = None) -> Optional[InputFactors]:
    """The factors an eligible layer would get at ``bits`` / ``group_size`` / ``scheme`` (None:
    the configuration's) (None: not eligible)."""
    if not _eligible(inp):
        return None
    store = torch.float16 if cfg.scale_bits == 16 else inp.weight.dtype

    def quantize(w: torch.Tensor) -> torch.Tensor:
        return quantize_for(w, bits, cfg, group_size, inp.role, scheme=scheme).dequantize()

    return choose_input_factors(inp.weight, inp.in_moments.var, quantize, store,
                                inp.bn.var if inp.bn is not None else None,
                                row_wise=quantizes_row_by_row(cfg, group_size))


def assign_input_scales(inputs: Iterable[LayerInputs], cfg: DFMPCConfig) -> None:
    """Set ``input_scale`` / ``input_scale_exponent`` of every eligible layer of ``inputs`` at
    its width (under a budget: only the layers whose factors' bytes the allocator charged)."""
    if not cfg.uses_input_scales:
        return
    for inp in inputs:
        if inp.bits is None or (cfg.has_budget and not inp.input_scale_reserved):
            continue
        got = input_factors_for(inp, cfg, inp.bits, inp.group_size, inp.scheme)
        if got is not None:
            inp.input_scale, inp.input_scale_exponent = got.factors, got.alpha
