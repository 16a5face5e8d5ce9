"""Find compensable layer pairs in a traced model, and say why every other candidate was refused.

A pair is: conv (1d/2d, any groups) or linear, then an optional BatchNorm, then only ops that
commute with a positive per-channel scale (the pattern tables below), then conv or linear.
The walk from each weighted layer follows a single-consumer chain; anything else stops it
with a recorded reason (fan-out, residual add, concat, scale-varying activation, unknown op).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .tracing import BATCHNORM_MODULES, WEIGHTED_MODULES, LeafSpec, is_batchnorm_act, own_forward, structural_copy, trace_model

__all__ = ["CompensablePair", "Refusal", "PairSearch", "find_compensable_pairs", "WEIGHTED_MODULES"]

# --- pattern tables -------------------------------------------------------------------------

#: Modules that commute with a positive per-channel scale: f(c * x) = c * f(x).
HOMOGENEOUS_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
HOMOGENEOUS_FUNCTIONS: frozenset[Any] = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.prelu, F.dropout, F.dropout1d, F.dropout2d,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
})
HOMOGENEOUS_METHODS: frozenset[str] = frozenset({"relu", "relu_", "contiguous", "clone"})

#: Shape-only ops: allowed when they flatten (N, C, ...) to (N, C * F) in channel-major order.
FLATTEN_MODULES: tuple[type, ...] = (nn.Flatten,)
FLATTEN_FUNCTIONS: frozenset[Any] = frozenset({torch.flatten})
FLATTEN_METHODS: frozenset[str] = frozenset({"flatten", "view", "reshape"})

#: Users that only read a tensor's shape; they do not count as consumers.
SHAPE_QUERY_METHODS: frozenset[str] = frozenset({"size", "dim"})

#: Activations that break the derivation (not positively homogeneous).
SCALE_VARYING_MODULES: tuple[type, ...] = (
    nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Softmax, nn.LogSoftmax, nn.Tanhshrink,
    nn.Softsign, nn.LogSigmoid, nn.Threshold,
)
SCALE_VARYING_FUNCTIONS: frozenset[Any] = frozenset({
    F.relu6, F.silu, F.gelu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.elu, F.selu, F.celu, F.softplus, F.mish, F.softmax,
    F.log_softmax, torch.softmax, torch.exp, F.logsigmoid,
})
SCALE_VARYING_METHODS: frozenset[str] = frozenset({"sigmoid", "tanh", "softmax", "log_softmax", "exp", "clamp", "clamp_"})

RESIDUAL_FUNCTIONS: dict[Any, str] = {
    operator.add: "residual add", operator.iadd: "residual add", torch.add: "residual add",
    operator.mul: "elementwise multiply (e.g. squeeze-excitation)", torch.mul: "elementwise multiply (e.g. squeeze-excitation)",
    operator.imul: "elementwise multiply (e.g. squeeze-excitation)",
    torch.cat: "concatenation", torch.concat: "concatenation", torch.stack: "concatenation",
}
RESIDUAL_METHODS: dict[str, str] = {"add": "residual add", "add_": "residual add", "mul": "elementwise multiply (e.g. squeeze-excitation)", "mul_": "elementwise multiply (e.g. squeeze-excitation)"}

# Refusal reasons (stable strings: tests and reports group by them).
FAN_OUT = "fan-out"
RESIDUAL = "residual/branch"
SCALE_VARYING = "scale-varying activation"
UNKNOWN_OP = "unknown op"
OUTPUT = "feeds model output"
BN_POSITION = "BatchNorm not directly after the layer"
CHANNEL_MAPPING = "channels do not map one to one"
REUSED = "module called more than once"
BN_NO_STATS = "BatchNorm without running statistics"
OWN_FORWARD = "layer with its own forward"


@dataclass(frozen=True)
class CompensablePair:
    """Layer ``first`` (low bits) whose output channels map one to one onto the input channels of
    layer ``second`` (high bits), through an optional BatchNorm ``bn`` and the ops in ``via``.

    ``features_per_channel`` > 1 means a flatten between a conv and a linear layer: channel j
    feeds ``features_per_channel`` consecutive input features of ``second``.
    """

    first: str
    second: str
    bn: Optional[str]
    via: tuple[str, ...]
    features_per_channel: int = 1
    activation: Optional[str] = None  # "relu", "leaky_relu:<slope>", "prelu:<module>" or None

    def describe(self) -> str:
        chain = [self.first] + ([self.bn] if self.bn else []) + list(self.via) + [self.second]
        return " -> ".join(chain)


@dataclass(frozen=True)
class Refusal:
    """A weighted layer whose chain did not reach a partner layer, and why."""

    first: str
    reason: str
    detail: str
    stopped_at: Optional[str] = None


@dataclass
class PairSearch:
    """The result of :func:`find_compensable_pairs`: pairs, refusals, and every weighted layer."""

    pairs: list[CompensablePair]
    refusals: list[Refusal]
    layers: list[str] = field(default_factory=list)  # weighted layers, in graph order

    def to_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for p in self.pairs:
            rows.append({"layer": p.first, "status": "pair", "partner": p.second, "reason": "", "detail": p.describe()})
        for r in self.refusals:
            rows.append({"layer": r.first, "status": "refused", "partner": "", "reason": r.reason, "detail": r.detail})
        order = {name: i for i, name in enumerate(self.layers)}
        rows.sort(key=lambda row: order.get(row["layer"], len(order)))
        return rows

    def refusal_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.refusals:
            counts[r.reason] = counts.get(r.reason, 0) + 1
        return counts

    def to_table(self) -> str:
        """A plain-text table, one row per weighted layer."""
        rows = self.to_rows()
        headers = ["layer", "status", "partner", "reason / chain"]
        body = [[r["layer"], r["status"], r["partner"], r["reason"] + (": " if r["reason"] else "") + r["detail"]] for r in rows]
        widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(headers[:-1])]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers[:-1], widths)) + "  " + headers[-1]]
        lines.append("-" * len(lines[0]))
        for b in body:
            lines.append("  ".join(v.ljust(w) for v, w in zip(b[:-1], widths)) + "  " + b[-1])
        lines.append(f"{len(self.pairs)} pairs, {len(self.refusals)} refusals " + str(self.refusal_counts()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()

    # The search result behaves as the sequence of its pairs.
    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    def __getitem__(self, index):
        return self.pairs[index]

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def __contains__(self, item: object) -> bool:
        return item in self.pairs


def _describe(node: Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[str(node.target)]).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{node.op} {node.target}"


def _consumers(node: Node) -> list[Node]:
    """Users of ``node`` that consume its values (shape queries such as x.size(0) do not)."""
    out = []
    for user in node.users:
        if user.op == "call_method" and user.target in SHAPE_QUERY_METHODS:
            continue
        if user.op == "call_function" and user.target is getattr and len(user.args) > 1 and user.args[1] in ("shape", "dtype", "device"):
            continue
        out.append(user)
    return out


def _flatten_start_dim(node: Node, module: Optional[nn.Module]) -> Optional[int]:
    """Return 1 when the node flattens (N, C, ...) to (N, -1), else None (unclean mapping)."""
    if module is not None:
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return 1
        return None
    args = list(node.args[1:])
    if node.op == "call_function" or node.target == "flatten":
        start = args[0] if args else node.kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
        return 1 if start == 1 and end == -1 else None
    # view / reshape: accept (N, -1), (N, K) and (-1, K) with N a size query or int
    shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if len(shape) != 2:
        return None
    first, second = shape
    if isinstance(second, int) and (second == -1 or second > 0):
        if isinstance(first, Node) or isinstance(first, int):
            return 1
    return None


def _activation_tag(node: Node, module: Optional[nn.Module]) -> Optional[str]:
    if module is not None:
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, nn.LeakyReLU):
            return f"leaky_relu:{module.negative_slope}"
        if isinstance(module, nn.PReLU):
            return f"prelu:{node.target}"
        return None
    if node.target in (F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_"):
        return "relu"
    if node.target is F.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return f"leaky_relu:{slope}"
    return None


def _walk(
    source: Node,
    modules: dict[str, nn.Module],
    call_counts: dict[str, int],
) -> Union[CompensablePair, Refusal]:
    name = str(source.target)
    src_mod = modules[name]
    out_channels = src_mod.out_features if isinstance(src_mod, nn.Linear) else src_mod.out_channels
    if call_counts[name] > 1:
        return Refusal(name, REUSED, f"{name} is called at {call_counts[name]} places; one set of coefficients cannot serve them all")
    if own_forward(src_mod):
        return Refusal(name, OWN_FORWARD, f"{name} ({type(src_mod).__name__}) overrides forward: its output "
                       "channel scales are not those of its weight, so no coefficient can be folded", source.name)
    cur = source
    bn: Optional[str] = None
    via: list[str] = []
    activation: Optional[str] = None
    flattened = False
    while True:
        users = _consumers(cur)
        if not users:
            return Refusal(name, OUTPUT, f"{_describe(cur, modules)} has no consumer", cur.name)
        if len(users) > 1:
            kinds = ", ".join(_describe(u, modules) for u in users)
            reason = RESIDUAL if any(_residual_kind(u) for u in users) else FAN_OUT
            return Refusal(name, reason if reason == RESIDUAL else FAN_OUT, f"{_describe(cur, modules)} feeds {len(users)} consumers: {kinds}", cur.name)
        user = users[0]
        mod = modules.get(str(user.target)) if user.op == "call_module" else None
        if user.op == "output":
            return Refusal(name, OUTPUT, f"{_describe(cur, modules)} is the model output", cur.name)
        if mod is not None and isinstance(mod, BATCHNORM_MODULES):
            if cur is not source or bn is not None:
                return Refusal(name, BN_POSITION, f"{user.target} follows {_describe(cur, modules)}; BatchNorm's shift breaks the scale equivalence there", user.name)
            if mod.running_mean is None or mod.running_var is None:
                return Refusal(name, BN_NO_STATS, f"{user.target} has track_running_stats=False", user.name)
            if mod.num_features != out_channels:
                return Refusal(name, CHANNEL_MAPPING, f"{user.target} has {mod.num_features} features, {name} {out_channels} outputs", user.name)
            if call_counts[str(user.target)] > 1:
                return Refusal(name, REUSED, f"{user.target} is called at {call_counts[str(user.target)]} places", user.name)
            bn = str(user.target)
            cur = user
            if is_batchnorm_act(mod):  # BatchNorm then its own activation (timm BatchNormAct2d)
                act = mod.act
                if isinstance(act, (nn.ReLU, nn.Identity, nn.LeakyReLU)):
                    tag = "relu" if isinstance(act, nn.ReLU) else (
                        f"leaky_relu:{act.negative_slope}" if isinstance(act, nn.LeakyReLU) else None)
                    activation = tag
                    via.append(f"{user.target}.act ({type(act).__name__})")
                else:
                    return Refusal(name, SCALE_VARYING, f"{user.target} ({type(mod).__name__}) applies "
                                   f"{type(act).__name__}, which is not positively homogeneous: c*f(z) != f(c*z)", user.name)
            continue
        if mod is not None and isinstance(mod, WEIGHTED_MODULES):
            return _close_pair(name, src_mod, out_channels, user, mod, bn, via, activation, flattened, call_counts, modules)
        if _matches(user, mod, HOMOGENEOUS):
            if not _first_arg_is(user, cur):
                return Refusal(name, UNKNOWN_OP, f"{_describe(user, modules)} uses the tensor as a non-input argument", user.name)
            tag = _activation_tag(user, mod)
            if tag is not None:
                if activation is not None:
                    activation = activation + "+" + tag
                else:
                    activation = tag
            via.append(_describe(user, modules))
            cur = user
            continue
        if _matches(user, mod, FLATTEN):
            if _flatten_start_dim(user, mod) is None or not _first_arg_is(user, cur):
                return Refusal(name, CHANNEL_MAPPING, f"{_describe(user, modules)} does not flatten (N, C, ...) to (N, C*F) in channel order", user.name)
            flattened = True
            via.append(_describe(user, modules))
            cur = user
            continue
        if _matches(user, mod, SCALE_VARYING_OPS):
            return Refusal(name, SCALE_VARYING, f"{_describe(user, modules)} is not positively homogeneous: c*f(z) != f(c*z)", user.name)
        residual = _residual_kind(user)
        if residual:
            return Refusal(name, RESIDUAL, f"{_describe(user, modules)}: {residual}", user.name)
        return Refusal(name, UNKNOWN_OP, f"{_describe(user, modules)} is not in the pattern table (unknown effect on channel scales)", user.name)


def _close_pair(
    name: str,
    src_mod: nn.Module,
    out_channels: int,
    user: Node,
    mod: nn.Module,
    bn: Optional[str],
    via: list[str],
    activation: Optional[str],
    flattened: bool,
    call_counts: dict[str, int],
    modules: dict[str, nn.Module],
) -> Union[CompensablePair, Refusal]:
    sink = str(user.target)
    if own_forward(mod):
        return Refusal(name, OWN_FORWARD, f"partner {sink} ({type(mod).__name__}) overrides forward: "
                       "a scale folded into its weight need not reach its output", user.name)
    if call_counts[sink] > 1:
        return Refusal(name, REUSED, f"partner {sink} is called at {call_counts[sink]} places", user.name)
    fpc = 1
    if isinstance(mod, nn.Linear):
        if flattened or isinstance(src_mod, nn.Linear):
            if mod.in_features % out_channels:
                return Refusal(name, CHANNEL_MAPPING, f"{sink} has {mod.in_features} inputs, not a multiple of {name}'s {out_channels} channels", user.name)
            fpc = mod.in_features // out_channels
            if isinstance(src_mod, nn.Linear) and not flattened and fpc != 1:
                return Refusal(name, CHANNEL_MAPPING, f"{sink} has {mod.in_features} inputs, {name} {out_channels} outputs", user.name)
        else:
            return Refusal(name, CHANNEL_MAPPING, f"{sink} (Linear) acts on the last dimension, not on {name}'s channels", user.name)
    else:
        if flattened or isinstance(src_mod, nn.Linear):
            return Refusal(name, CHANNEL_MAPPING, f"{sink} is a convolution fed by flattened or linear features", user.name)
        if mod.in_channels != out_channels:
            return Refusal(name, CHANNEL_MAPPING, f"{sink} has {mod.in_channels} input channels, {name} {out_channels} outputs", user.name)
    if not _first_arg_is(user, user.args[0] if user.args else None):
        return Refusal(name, UNKNOWN_OP, f"{sink} is called with unusual arguments", user.name)
    return CompensablePair(first=name, second=sink, bn=bn, via=tuple(via), features_per_channel=fpc, activation=activation)


def _first_arg_is(node: Node, value: Any) -> bool:
    if not node.args:
        return False
    if node.args[0] is not value:
        return False
    return all(not (isinstance(a, Node) and a is value) for a in list(node.args[1:]) + list(node.kwargs.values()))


def _matches(node: Node, mod: Optional[nn.Module], table: tuple[tuple[type, ...], frozenset[Any], frozenset[str]]) -> bool:
    """Is the node in a pattern table of (module types, functions, method names)?"""
    module_types, functions, methods = table
    if mod is not None:
        return isinstance(mod, module_types)
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


HOMOGENEOUS = (HOMOGENEOUS_MODULES, HOMOGENEOUS_FUNCTIONS, HOMOGENEOUS_METHODS)
FLATTEN = (FLATTEN_MODULES, FLATTEN_FUNCTIONS, FLATTEN_METHODS)
SCALE_VARYING_OPS = (SCALE_VARYING_MODULES, SCALE_VARYING_FUNCTIONS, SCALE_VARYING_METHODS)


def _residual_kind(node: Node) -> Optional[str]:
    if node.op == "call_function":
        return RESIDUAL_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return RESIDUAL_METHODS.get(str(node.target))
    return None


def search_graph(gm: GraphModule) -> PairSearch:
    """Find pairs in an already traced GraphModule (used by :func:`compress`)."""
    modules = dict(gm.named_modules())
    call_counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            call_counts[str(node.target)] = call_counts.get(str(node.target), 0) + 1
    pairs: list[CompensablePair] = []
    refusals: list[Refusal] = []
    layers: list[str] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], WEIGHTED_MODULES):
            continue
        name = str(node.target)
        if name in seen:
            continue
        seen.add(name)
        layers.append(name)
        result = _walk(node, modules, call_counts)
        (pairs if isinstance(result, CompensablePair) else refusals).append(result)
    return PairSearch(pairs=pairs, refusals=refusals, layers=layers)


def find_compensable_pairs(
    model: nn.Module,
    concrete_args: Optional[dict[str, Any]] = None,
    leaf_modules: Iterable[LeafSpec] = (),
) -> PairSearch:
    """Trace ``model`` with torch.fx and list its compensable pairs and the refused candidates.

    The model is not modified (a structural copy is traced, see
    :func:`~dfmpc_fx.graph.tracing.structural_copy`). ``print(result)`` shows a table with one row per weighted layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    gm = model if isinstance(model, GraphModule) else trace_model(structural_copy(model), concrete_args, leaf_modules)
    return search_graph(gm)
