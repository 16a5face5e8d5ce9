"""The one configuration object of dfmpc_fx, validated at construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .errors import ConfigError

Method = Literal["dfmpc", "paper"]
METHODS: tuple[str, ...] = ("dfmpc", "paper")
GRANULARITIES: tuple[str, ...] = ("per_channel", "per_tensor")
SCHEMES: tuple[str, ...] = ("auto", "symmetric", "asymmetric")
SCALE_RULES: tuple[str, ...] = ("batchnorm", "least_squares", "variance")
SCALE_DTYPE_NAMES: tuple[str, ...] = ("auto", "float32", "float16")
#: The size budget a configuration gets when it names no bit layout (``target_bits="auto"``).
DEFAULT_TARGET_BITS: float = 4.0
#: The fields that set an explicit pair layout instead of a size budget.
LAYOUT_FIELDS: tuple[str, ...] = ("low_bits", "high_bits", "default_bits", "first_last_bits")


class _Unset(int):
    """The default of a layout field, as an ``int`` that remembers it was not given: an explicit
    ``low_bits=2`` is a plain ``int`` and selects the pair layout; the default does not."""

    def __repr__(self) -> str:
        return int.__repr__(self)

    __str__ = __repr__


def _auto(value: "bool | str", when_auto: bool) -> bool:
    """An ``"auto" | True | False`` field resolved: ``when_auto`` for ``"auto"``."""
    return when_auto if value == "auto" else bool(value)


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
        scheme: ``symmetric`` (a zero level, narrow range), ``asymmetric`` (zero point), or
            ``auto`` (default): symmetric for the explicit layouts and ``method="paper"``
            (bit-identical to earlier releases). Under a size budget the allocator may also
            store a layer with one zero point per output channel (charged), wherever its scales
            do not fold into a BatchNorm (``fold_scales``, ``fold_batchnorm``: a zero point
            cannot move there), and scale groups (``group_sizes``) carry zero points (HQQ's
            layout). Those zero-point quantizers refine from min/max and from the symmetric
            solution, so they are never worse than symmetric. On all-MiniLM-L6-v2 at 4.0 bits/w,
            embedding cosine 0.926 -> 0.947; the CNN checkpoints within -0.16..+0.06 points at
            2.5-4.0 bits/w (BENCHMARKS.md).
        mean_correction: shift BatchNorm means (or biases) by the expected output error of each
            quantized layer, from data-free input moments (``method="dfmpc"`` only).
        layernorm_mean_correction: also mean-correct from input means that rest on a LayerNorm
            (its per-feature output mean taken as ``beta``, as if the normalised features had
            zero mean per feature). Off by default: on all-MiniLM-L6-v2 those means are further
            from the measured ones than zero is, and uniform W4 corrected from them falls to
            embedding cosine 0.872 against 0.927 plain. The variances are used either way.
        scale_rule: how ``method="dfmpc"`` picks c: ``batchnorm`` (default: restore each
            channel's variance around its mean, predicted from the recorded BatchNorm variance
            and the rounding noise: a data-free BatchNorm re-estimation), ``least_squares`` (the derived bound, method.md point 1) or
            ``variance`` (restore each channel's second moment under independent inputs).
        input_mean, input_std: assumed per-element statistics of the model's input (normalised
            images: 0 and 1).
        max_bits: bit widths above 8 are refused unless raised here (16 is useful to check that
            compression preserves a model's function).
        skip_layers: qualified names of layers kept in float (they count 32 bits/w in a budget).
        target_bits: a size budget: the average bits per weight over every Conv1d/Conv2d/Linear
            weight of the model (float layers count 32; scales and zero points counted). The
            allocator then picks each layer's width and scale granularity from
            ``candidate_bits`` x (per-channel, ``group_sizes``) by a data-free estimate of the
            damage left after correction. Replaces ``low_bits``/``high_bits``/
            ``default_bits``/``first_last_bits`` (pin layers with ``fixed_bits`` instead).
            ``"auto"`` (the default) is ``DEFAULT_TARGET_BITS`` = 4.0 unless a layout is named:
            any of ``low_bits``/``high_bits``/``default_bits``/``first_last_bits`` given,
            ``target_bytes``, or ``method="paper"``; ``None`` is the explicit pair layout (with
            the fields above at their defaults: the paper's MP2/6, the default of 0.1).
            After construction ``target_bits`` holds the resolved value (a number or None).
        target_bytes: the same budget as a whole-model size (``get_report(q).compressed_bytes``).
        candidate_bits: widths the allocator may choose.
        group_sizes: scale groups the allocator may choose besides one scale per output channel
            (a group is ``k`` consecutive weights of a row; each group's scale is charged).
        fixed_bits: ``{layer name: bits}`` pinned under a budget (e.g. ``{"conv1": 8}``).
        scale_dtype: storage of the quantizers' scales and zero points: ``"float32"`` (exact in
            the weight's dtype), ``"float16"`` (half their bytes; a float16 scale moves no code),
            or ``"auto"`` (default): float16 under a size budget, where every byte is spent on
            accuracy, float32 otherwise (the explicit MP layouts and ``method="paper"`` stay
            bit-identical to earlier releases).
        input_scales: per-input-channel factors ``t`` of each weight (the layer stores
            ``Q(W / t) * t``: one value per input channel, at ``scale_dtype``'s width, charged to
            the budget), chosen from the data-free input variances so that rounding spends its
            resolution on the inputs that vary most (AWQ's idea without calibration data;
            :mod:`dfmpc_fx.numerics.input_scales`). ``"auto"`` (default): on under a size
            budget, off for the explicit layouts and ``method="paper"`` (bit-identical to
            earlier releases); ``True``/``False`` force it (``method="dfmpc"`` only). Only
            layers with known input moments and ``groups=1`` get factors, and only where the
            estimate says they pay (the report's ``input_scale_exponent``).
        fold_scales: store a layer's per-channel scales in the BatchNorm that follows it: the
            codes get one scale for the whole layer and each channel's ratio to it goes into that
            BatchNorm's running statistics (and gamma, for ``eps``). The BatchNorm's output
            does not change. A layer's per-channel option then costs one scale instead of one
            per output channel, which the allocator counts; on a 3x3 depthwise filter that is
            1.8 bits per weight saved. ``"auto"`` (default): on under a size budget, off for the
            explicit layouts and ``method="paper"`` (bit-identical to earlier releases);
            ``True``/``False`` force it. Only layers whose output goes only to an affine
            BatchNorm, with the symmetric per-channel quantizer, fold (``LayerReport.scales_folded``).
        fold_batchnorm: fold the (corrected) BatchNorm that follows a quantized layer into it
            and remove it from the graph: each channel's scale is multiplied by
            ``gamma / sqrt(var + eps)`` and the layer gets the bias
            ``beta + gamma (b - mean) / sqrt(var + eps)``, so the output is unchanged (to float
            rounding) and the model stores two values per channel instead of the BatchNorm's
            four (what AIMET and torch.ao do before they quantize; here it happens after the
            correction, which needs the BatchNorm's statistics). It saves bytes but not bits
            per weight: a folded layer keeps one scale per channel, where ``fold_scales``
            stores one per layer. ``"auto"`` (default): on when the budget is in bytes
            (``target_bytes``), off otherwise; ``True``/``False`` force it. Layers whose output
            goes only to a BatchNorm with running statistics fold (``LayerReport.batchnorm_folded``);
            a zero-point quantizer folds only where every gamma is >= 0.
        mean_calibration: scale each layer's mean correction ``(Q - W) E[x]`` by the factor that
            maps the float layer's predicted output means ``W E[x]`` onto the means its
            BatchNorm recorded (one scalar per layer, clamped to 0.5..1.5;
            ``LayerReport.mean_scale``). The data-free input means overshoot where zero padding
            or a ReLU of non-Gaussian pre-activations shrinks the true ones; the recorded means
            show by how much. ``"auto"`` (default): on under a size budget, off for the explicit
            layouts and ``method="paper"`` (bit-identical to earlier releases).
    """

    low_bits: int = _Unset(2)
    high_bits: int = _Unset(6)
    default_bits: Optional[int] = _Unset(8)
    first_last_bits: Optional[int] = _Unset(8)
    method: str = "dfmpc"
    compensate: bool = True
    lambda1: float = 0.5
    lambda2: float = 0.0
    granularity: str = "per_channel"
    scheme: str = "auto"
    mean_correction: bool = True
    layernorm_mean_correction: bool = False
    scale_rule: str = "batchnorm"
    input_mean: float = 0.0
    input_std: float = 1.0
    max_bits: int = 8
    skip_layers: tuple[str, ...] = field(default_factory=tuple)
    target_bits: Optional[float] | str = "auto"
    target_bytes: Optional[int] = None
    candidate_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    group_sizes: tuple[int, ...] = ()
    fixed_bits: dict[str, int] = field(default_factory=dict, hash=False)
    scale_dtype: str = "auto"
    input_scales: bool | str = "auto"
    fold_scales: bool | str = "auto"
    fold_batchnorm: bool | str = "auto"
    mean_calibration: bool | str = "auto"

    def __post_init__(self) -> None:
        self._resolve_target()
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
        if not isinstance(self.compensate, bool) or not isinstance(self.mean_correction, bool) \
                or not isinstance(self.layernorm_mean_correction, bool):
            raise ConfigError("compensate, mean_correction and layernorm_mean_correction must be bools")
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        if self.scale_dtype not in SCALE_DTYPE_NAMES:
            raise ConfigError(f"unknown scale_dtype {self.scale_dtype!r}: use one of {', '.join(SCALE_DTYPE_NAMES)}")
        if not (isinstance(self.fold_scales, bool) or self.fold_scales == "auto"):
            raise ConfigError(f"fold_scales={self.fold_scales!r} must be 'auto', True or False")
        if self.fold_scales is True and (self.method != "dfmpc" or self.scheme == "asymmetric"
                                         or self.granularity != "per_channel"):
            raise ConfigError("fold_scales=True needs method='dfmpc', scheme='symmetric' or 'auto' and granularity='per_channel' "
                              "(a zero point or a per-layer scale cannot move into a BatchNorm): drop fold_scales or those")
        if not (isinstance(self.mean_calibration, bool) or self.mean_calibration == "auto"):
            raise ConfigError(f"mean_calibration={self.mean_calibration!r} must be 'auto', True or False")
        if not (isinstance(self.fold_batchnorm, bool) or self.fold_batchnorm == "auto"):
            raise ConfigError(f"fold_batchnorm={self.fold_batchnorm!r} must be 'auto', True or False")
        if not (isinstance(self.input_scales, bool) or self.input_scales == "auto"):
            raise ConfigError(f"input_scales={self.input_scales!r} must be 'auto', True or False")
        if self.input_scales is True and self.method != "dfmpc":
            raise ConfigError("input_scales=True needs method='dfmpc' (the paper's quantizers have no input factors): "
                              "drop input_scales or method")
        self._check_budget()

    def _resolve_target(self) -> None:
        """``target_bits="auto"``: the default size budget unless a layout is named (any of
        :data:`LAYOUT_FIELDS` given, ``target_bytes``, or ``method="paper"``)."""
        explicit = [name for name in LAYOUT_FIELDS if not isinstance(getattr(self, name), _Unset)]
        auto = isinstance(self.target_bits, str) and self.target_bits == "auto"
        object.__setattr__(self, "_budget_auto", auto)
        if auto:
            layout = explicit or self.target_bytes is not None or self.method != "dfmpc"
            object.__setattr__(self, "target_bits", None if layout else DEFAULT_TARGET_BITS)
        elif isinstance(self.target_bits, str):
            raise ConfigError(f"target_bits={self.target_bits!r} must be a number in (0, 32] (average bits per "
                              "weight), 'auto' or None")
        # The markers stay: dataclasses.replace copies them, so a layout field the user never gave
        # stays "not given" in every derived config, and one given equal to its default (an
        # explicit low_bits=2 next to a budget) is still told apart. to_dict writes plain ints.

    @property
    def budget_is_default(self) -> bool:
        """Whether the budget is the default one (``target_bits="auto"`` with no layout named):
        naming a layout field later (``compress(model, cfg, low_bits=3)``) then selects the
        pair layout instead of clashing with a budget the user never asked for."""
        return bool(getattr(self, "_budget_auto", False)) and self.target_bits is not None

    def scheme_for(self, group_size: Optional[int] = None) -> str:
        """The quantizer scheme of a layer stored with ``group_size`` (None: one scale per
        channel or per layer) unless the allocator chose one: ``scheme`` itself, or what
        ``"auto"`` means there (the per-channel zero-point option is a separate candidate,
        :attr:`offers_zero_point_option`)."""
        if self.scheme != "auto":
            return self.scheme
        if not self.has_budget or self.method != "dfmpc" or group_size is None:
            return "symmetric"
        return "asymmetric"

    @property
    def offers_zero_point_option(self) -> bool:
        """Whether the allocator also weighs a zero-point (asymmetric) per-channel option for
        the layers whose scales do not fold (``scheme="auto"`` under a size budget)."""
        return self.scheme == "auto" and self.has_budget and self.method == "dfmpc" and self.granularity == "per_channel"

    @property
    def may_use_zero_points(self) -> bool:
        """Whether some layer may get a zero-point quantizer (decisions taken before the widths
        are chosen, such as folding a BatchNorm with a negative gamma, must allow for it)."""
        return self.scheme == "asymmetric" or (self.scheme == "auto" and self.has_budget and bool(self.group_sizes))

    @property
    def scale_bits(self) -> int:
        """Width of each stored scale and varying zero point: 16 or 32 (``scale_dtype``)."""
        if self.scale_dtype == "auto":
            return 16 if self.has_budget else 32
        return 16 if self.scale_dtype == "float16" else 32

    @property
    def folds_scales(self) -> bool:
        """Whether per-channel scales move into the following BatchNorm (``fold_scales``)."""
        return _auto(self.fold_scales, self.has_budget and self.method == "dfmpc" and self.scheme != "asymmetric"
                     and self.granularity == "per_channel")

    @property
    def calibrates_means(self) -> bool:
        """Whether mean correction is scaled to the BatchNorm's recorded means (``mean_calibration``)."""
        return _auto(self.mean_calibration, self.has_budget and self.method == "dfmpc")

    @property
    def folds_batchnorm(self) -> bool:
        """Whether BatchNorms after quantized layers are folded into them (``fold_batchnorm``)."""
        return _auto(self.fold_batchnorm, self.target_bytes is not None and self.method == "dfmpc")

    @property
    def uses_input_scales(self) -> bool:
        """Whether layers may get per-input-channel factors (``input_scales``)."""
        return _auto(self.input_scales, self.has_budget and self.method == "dfmpc")

    @property
    def has_budget(self) -> bool:
        """Whether the allocator chooses the widths (``target_bits`` or ``target_bytes``)."""
        return self.target_bits is not None or self.target_bytes is not None

    def _check_budget(self) -> None:
        object.__setattr__(self, "candidate_bits", tuple(self.candidate_bits))
        object.__setattr__(self, "group_sizes", tuple(self.group_sizes))
        object.__setattr__(self, "fixed_bits", dict(self.fixed_bits))
        for b in self.candidate_bits:
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= self.max_bits:
                raise ConfigError(f"candidate_bits entry {b!r} must be an int in 2..{self.max_bits} (max_bits)")
        if not self.candidate_bits:
            raise ConfigError("candidate_bits is empty: give at least one width, e.g. (2, 3, 4, 8)")
        for g in self.group_sizes:
            if isinstance(g, bool) or not isinstance(g, int) or g < 2:
                raise ConfigError(f"group_sizes entry {g!r} must be an int >= 2 (e.g. 32, 64, 128)")
        for name, b in self.fixed_bits.items():
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= self.max_bits:
                raise ConfigError(f"fixed_bits[{name!r}]={b!r} must be an int in 2..{self.max_bits}")
        if self.target_bits is not None and self.target_bytes is not None:
            raise ConfigError("target_bits and target_bytes are two forms of one budget: drop one of them")
        if self.target_bits is not None:
            t = self.target_bits
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t <= 32) or t != t:
                raise ConfigError(f"target_bits={t!r} must be a number in (0, 32] (average bits per weight)")
        if self.target_bytes is not None:
            t = self.target_bytes
            if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
                raise ConfigError(f"target_bytes={t!r} must be a positive int (whole-model bytes)")
        if not self.has_budget:
            if self.fixed_bits:
                raise ConfigError("fixed_bits pins layers under a budget: set target_bits (or drop fixed_bits)")
            return
        if self.method != "dfmpc":
            raise ConfigError(f"a size budget needs method='dfmpc' (method={self.method!r} keeps the paper's layout): drop target_bits/target_bytes or method")
        # given at all, even equal to the default: the allocator would silently ignore it
        clashing = [name for name in LAYOUT_FIELDS if not isinstance(getattr(self, name), _Unset)]
        if clashing:
            raise ConfigError(
                f"{', '.join(clashing)} and a size budget both set bit widths: drop {', '.join(clashing)} "
                "(the allocator chooses every width; pin layers with fixed_bits={'name': bits}) or pass "
                "target_bits=None for the explicit pair layout"
            )

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable (for MLflow params and reports)."""
        d = dataclasses.asdict(self)
        for name in LAYOUT_FIELDS:  # plain ints: pickles, JSON and MLflow see no marker type
            if isinstance(d[name], _Unset):  # asdict's deep copy keeps the marker
                d[name] = int(d[name])
        d["skip_layers"] = list(self.skip_layers)
        d["candidate_bits"] = list(self.candidate_bits)
        d["group_sizes"] = list(self.group_sizes)
        d["fixed_bits"] = dict(self.fixed_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DFMPCConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown DFMPCConfig fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if d.get("target_bits") is not None or d.get("target_bytes") is not None:
            # to_dict writes every field: under a budget the layout fields are the unused defaults
            defaults = {f.name: f.default for f in dataclasses.fields(cls)}
            for name in LAYOUT_FIELDS:
                if name in d and d[name] == defaults[name]:
                    del d[name]
        return cls(**d)
