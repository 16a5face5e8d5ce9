"""What compress did, per layer and for the whole model; stored in ``GraphModule.meta``."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from ..errors import DFMPCError

REPORT_KEY = "dfmpc_report"


@dataclass
class LayerReport:
    name: str
    kind: str
    role: str  # low, high, default, first_last, float
    bits: Optional[int]  # None: kept in float
    numel: int
    scheme: str = "float"
    weight_rel_error: float = 0.0  # ||Q - W|| / ||W|| against the (compensated) float weights
    coeff_mean: Optional[float] = None  # compensation coefficients, for the first layer of a pair
    coeff_min: Optional[float] = None
    coeff_max: Optional[float] = None
    degenerate_channels: int = 0  # all-zero quantized channels given c = 1
    mean_shift: Optional[float] = None  # mean |E[(Q-W)x]| corrected, in units of the output std
    partner: Optional[str] = None
    mean_scale: Optional[float] = None  # mean_calibration: the factor on the mean shift (recorded / predicted means)
    group_size: Optional[int] = None  # weights per scale within a row (None: one per output channel)
    estimated_damage: Optional[float] = None  # size budget: predicted output noise-to-signal of the choice
    estimates: Optional[dict[str, float]] = None  # size budget: every option's prediction (label -> ratio)
    noise_gain: Optional[float] = None  # size budget: share of this layer's output noise reaching the model output
    input_moments: Optional[str] = None  # where the data-free input moments came from, or why there are none
    batchnorm_folded: Optional[str] = None  # fold_batchnorm: the BatchNorm folded into this layer (and removed)
    scales_folded: bool = False  # fold_scales: the per-channel scales live in the following BatchNorm
    input_scale_exponent: Optional[float] = None  # input_scales: alpha of the factors Var(x)^(-alpha/2) (0: none; None: not considered)
    reason: Optional[str] = None  # why kept in float (bits None); or how a layer the graph does not see was handled


@dataclass
class CompressionReport:
    config: dict[str, Any]
    layers: list[LayerReport]
    pairs: list[str]
    excluded_pairs: list[str]
    refusals: list[dict[str, str]]
    float_bytes: int
    compressed_bytes: int
    compress_seconds: float
    torch_version: str
    warnings: list[str] = field(default_factory=list)
    theoretical_bytes: Optional[int] = None
    artifact_bytes: Optional[int] = None
    bits_per_weight: Optional[float] = None  # over every conv/linear weight: float 32, scales counted
    target_bits: Optional[float] = None  # the budget asked for, when one was
    target_bytes: Optional[int] = None

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    @property
    def compression_ratio(self) -> float:
        return self.float_bytes / max(self.compressed_bytes, 1)

    @property
    def float_mb(self) -> float:
        return self.float_bytes / 1e6

    @property
    def compressed_mb(self) -> float:
        return self.compressed_bytes / 1e6

    def bits_per_layer(self) -> dict[str, Optional[int]]:
        return {layer.name: layer.bits for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(num_pairs=self.num_pairs, compression_ratio=self.compression_ratio,
                 float_mb=self.float_mb, compressed_mb=self.compressed_mb)
        return d

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompressionReport":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["layers"] = [LayerReport(**layer) for layer in d["layers"]]
        return cls(**kwargs)

    def to_markdown(self) -> str:
        cfg = self.config
        lines = [
            "# DF-MPC compression report",
            "",
            f"- method: `{cfg.get('method')}`, compensate: `{cfg.get('compensate')}`, "
            f"bits low/high/default/first-last: {cfg.get('low_bits')}/{cfg.get('high_bits')}/"
            f"{cfg.get('default_bits')}/{cfg.get('first_last_bits')}",
            f"- pairs compensated: {self.num_pairs}; refused candidates: {len(self.refusals)}",
            f"- size: {self.float_mb:.3f} MB float32 -> {self.compressed_mb:.3f} MB "
            f"({self.compression_ratio:.2f}x)",
            f"- compress time: {self.compress_seconds:.2f} s (torch {self.torch_version})",
            "",
            "| layer | kind | role | bits | weights | rel. error | c mean | c min | c max | partner |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        for l in self.layers:
            lines.append(
                f"| {l.name} | {l.kind} | {l.role} | {l.bits if l.bits is not None else 'fp32'} | {l.numel} | "
                f"{l.weight_rel_error:.4f} | {fmt(l.coeff_mean)} | {fmt(l.coeff_min)} | {fmt(l.coeff_max)} | {l.partner or ''} |"
            )
        noted = [l for l in self.layers if l.reason]
        if noted:
            lines += ["", "## Layers outside the plan", "", "| layer | bits | reason |", "|---|---|---|"]
            lines += [f"| {l.name} | {l.bits if l.bits is not None else 'fp32'} | {l.reason} |" for l in noted]
        if self.refusals:
            lines += ["", "## Refused candidates", "", "| layer | reason | detail |", "|---|---|---|"]
            lines += [f"| {r['layer']} | {r['reason']} | {r['detail']} |" for r in self.refusals]
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def stored_report(qmodel: nn.Module) -> Optional[dict[str, Any]]:
    """The report dict :func:`dfmpc_fx.compress` stored on ``qmodel`` (itself, not a copy), or
    None: in a GraphModule's ``meta``, else as an attribute (a module returned by
    ``compress(..., output="module")``, or a compressed bare layer)."""
    meta = getattr(qmodel, "meta", None)
    if isinstance(meta, dict) and REPORT_KEY in meta:
        return meta[REPORT_KEY]
    stored = getattr(qmodel, REPORT_KEY, None)
    return stored if isinstance(stored, dict) else None


def get_report(qmodel: nn.Module) -> CompressionReport:
    """The :class:`CompressionReport` that :func:`dfmpc_fx.compress` stored on ``qmodel``."""
    stored = stored_report(qmodel)
    if stored is None:
        raise DFMPCError(
            f"{type(qmodel).__name__} carries no DF-MPC report: pass the GraphModule returned by "
            "dfmpc_fx.compress (or one loaded with dfmpc_fx.load)"
        )
    return CompressionReport.from_dict(stored)
