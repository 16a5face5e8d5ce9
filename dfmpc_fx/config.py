"""The one configuration object of dfmpc_fx, validated at construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .errors import ConfigError

Method = Literal["dfmpc", "paper"]
METHODS: tuple[str, ...] = ("dfmpc", "paper")
GRANULARITIES: tuple[str, ...] = ("per_channel", "per_tensor")
SCHEMES: tuple[str, ...] = ("symmetric", "asymmetric")
SCALE_RULES: tuple[str, ...] = ("batchnorm", "least_squares", "variance")


@dataclass(frozen=True)
class DFMPCConfig:
    """How to compress a model.

    Attributes:
        low_bits: bit width of the first layer of each compensable pair (2-4).
        high_bits: bit width of the second layer of each pair, which absorbs the compensation
            coefficients (6-8, and at least ``low_bits``).
        default_bits: bit width of layers in no pair; ``None`` keeps them in float.
        first_last_bits: bit width forced on the first and last weighted layers (the paper's
            practice keeps them at 8 bits); ``None`` treats them like any other layer.
        method: ``"dfmpc"`` (default: derived coefficients from data-free input moments, mean
            correction, per-channel MSE quantizers) or ``"paper"`` (Eq. 27 with ``lambda1``,
            ``lambda2``, TWN for 2 bits, DoReFa for k bits, per-layer scales), for reproduction.
        compensate: ``False`` gives plain mixed precision with the identical bit assignment.
        lambda1, lambda2: Eq. 27 weights, used by ``method="paper"`` only.
        granularity: quantizer scales for ``method="dfmpc"`` (``per_channel`` or ``per_tensor``).
        scheme: ``symmetric`` (a zero level, narrow range) or ``asymmetric`` (zero point).
        mean_correction: shift BatchNorm means (or biases) by the expected output error of each
            quantized layer, from data-free input moments (``method="dfmpc"`` only).
        scale_rule: how ``method="dfmpc"`` picks c: ``batchnorm`` (default: restore each
            channel's variance around its mean, predicted from the recorded BatchNorm variance
            and the rounding noise: a data-free BatchNorm re-estimation), ``least_squares`` (the derived bound, method.md point 1) or
            ``variance`` (restore each channel's second moment under independent inputs).
        input_mean, input_std: assumed per-element statistics of the model's input (normalised
            images: 0 and 1).
        max_bits: bit widths above 8 are refused unless raised here (16 is useful to check that
            compression preserves a model's function).
    """

    low_bits: int = 2
    high_bits: int = 6
    default_bits: Optional[int] = 8
    first_last_bits: Optional[int] = 8
    method: str = "dfmpc"
    compensate: bool = True
    lambda1: float = 0.5
    lambda2: float = 0.0
    granularity: str = "per_channel"
    scheme: str = "symmetric"
    mean_correction: bool = True
    scale_rule: str = "batchnorm"
    input_mean: float = 0.0
    input_std: float = 1.0
    max_bits: int = 8
    skip_layers: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        def check_bits(name: str, value: Any, lo: int, hi: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
            if not lo <= value <= hi:
                raise ConfigError(f"{name}={value} is out of range: use {lo}..{hi}")

        if isinstance(self.max_bits, bool) or not isinstance(self.max_bits, int) or not 8 <= self.max_bits <= 16:
            raise ConfigError(f"max_bits={self.max_bits!r} must be an int in 8..16")
        top = self.max_bits
        check_bits("low_bits", self.low_bits, 2, 4 if top == 8 else top)
        check_bits("high_bits", self.high_bits, 2 if top > 8 else 6, top)
        if self.low_bits > self.high_bits:
            raise ConfigError(
                f"low_bits={self.low_bits} > high_bits={self.high_bits}: the first layer of a pair "
                "gets the low bit width and the second the high one; swap them"
            )
        if self.default_bits is not None:
            check_bits("default_bits", self.default_bits, 2, top)
        if self.first_last_bits is not None:
            check_bits("first_last_bits", self.first_last_bits, 2, top)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}: use one of {', '.join(GRANULARITIES)}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown scheme {self.scheme!r}: use one of {', '.join(SCHEMES)}")
        if self.scale_rule not in SCALE_RULES:
            raise ConfigError(f"unknown scale_rule {self.scale_rule!r}: use one of {', '.join(SCALE_RULES)}")
        for name in ("lambda1", "lambda2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value != value or value == float("inf"):
                raise ConfigError(f"{name}={value!r} must be a finite number >= 0")
        if not isinstance(self.input_std, (int, float)) or not self.input_std > 0:
            raise ConfigError(f"input_std={self.input_std!r} must be > 0")
        if not isinstance(self.compensate, bool) or not isinstance(self.mean_correction, bool):
            raise ConfigError("compensate and mean_correction must be bools")
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable (for MLflow params and reports)."""
        d = dataclasses.asdict(self)
        d["skip_layers"] = list(self.skip_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DFMPCConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown DFMPCConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
