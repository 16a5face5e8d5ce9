"""``compress``: the graph transform that turns a float model into a mixed-precision GraphModule.

Orchestration only: tracing, pair finding and bit assignment come from their modules, and
every number is computed by the pure functions of :mod:`dfmpc_fx.numerics.quant` and
:mod:`dfmpc_fx.numerics.compensation`. The graph itself is never rewritten: layers are swapped for
``Quant*`` modules and BatchNorm statistics are corrected, under their original qualified names.
"""
from __future__ import annotations

import contextvars
import copy
import dataclasses
import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..numerics import compensation as cmath
from ..graph.bits import BitPlan, assign_bits, budget_roles
from ..numerics.allocation import LayerCost
from ..numerics.compensation import ChannelMoments
from ..config import LAYOUT_FIELDS, DFMPCConfig
from ..errors import CompressedModelError, ConfigError, InvalidModelError, TraceError
from .apply import apply_plans
from .budget import BudgetChoice, DefaultBudgetWarning, choose_widths, layer_costs, reserve_input_factors, solve_widths
from .hf_conv1d import is_hf_conv1d, with_linear_for_conv1d
from .input_scaling import assign_input_scales
from .modules import is_quant_module, quantized_layer_bits, quantized_layer_bytes, to_quant_module
from .plan import BatchNormState, LayerInputs, LayerPlan, adds_bias, plan_layer, quantize_for
from ..graph.moments import MomentEstimate, estimate_moments
from ..graph.sensitivity import output_noise_gains
from ..graph.pairs import BATCHNORM_MODULES, WEIGHTED_MODULES, _consumers, search_graph
from ..graph.ties import tied_layers, weight_holders
from .report import REPORT_KEY, CompressionReport, LayerReport, get_report, stored_report
from ..graph.tracing import LeafSpec, structural_copy, trace_model, trace_with_example

__all__ = ["compress", "swap_compressed_modules", "NoCompensablePairWarning", "DefaultBudgetWarning"]


class NoCompensablePairWarning(UserWarning):
    """The model has no compensable pair: it is quantized with plain (default) bit widths."""


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    tensors = [(kind, name, t.detach()) for kind, items in (("parameter", model.named_parameters()),
                                                              ("buffer", model.named_buffers()))
               for name, t in items if torch.is_floating_point(t) and t.numel() > 0]
    meta = next(((kind, name) for kind, name, t in tensors if t.is_meta), None)
    if meta is not None:
        raise InvalidModelError(
            f"{meta[0]} {meta[1]!r} is on the meta device (it has a shape but no values): load the model's "
            "weights first (e.g. `model.to_empty(device='cpu')` then `load_state_dict(...)`, or "
            "`load_state_dict(..., assign=True)`), then compress"
        )
    # One amax and one amin per tensor (NaN propagates, Inf shows as an extreme; two plain
    # reductions are 6x faster than one aminmax on CPU) and one check for all of them: a sync
    # per tensor costs more than the passes on a large model.
    extremes: dict[torch.dtype, list[torch.Tensor]] = {}
    for _, _, t in tensors:
        extremes.setdefault(t.dtype, []).extend((t.amax(), t.amin()))
    if all(bool(torch.isfinite(torch.stack(vals)).all()) for vals in extremes.values()):
        return
    for kind, name, t in tensors:
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InvalidModelError(
                f"{kind} {name!r} contains {bad} NaN/Inf values: the model is broken (diverged "
                "training or a bad checkpoint); fix or reload it before compressing"
            )


def _following_batchnorm(node: Node, modules: dict[str, nn.Module], call_counts: dict[str, int]) -> Optional[str]:
    users = _consumers(node)
    if len(users) == 1 and users[0].op == "call_module":
        target = str(users[0].target)
        mod = modules[target]
        if isinstance(mod, BATCHNORM_MODULES) and mod.running_mean is not None and call_counts[target] == 1:
            return target
    return None


def _copy_sharing_layer_weights(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` whose conv/linear weights are shared, not copied.

    Those weights are only read and are then replaced by new tensors (quantized, or cloned for
    layers kept in float), so copying them first would only cost time and memory.
    """
    keep = [mod.weight for mod in model.modules()
            if isinstance(mod, WEIGHTED_MODULES) and isinstance(mod.weight, nn.Parameter)]
    return structural_copy(model, copy_tensors=True, keep=keep)


def _is_plain_torch_leaf(mod: nn.Module) -> bool:
    """A childless module of ``torch.nn`` itself with plain Parameters and tensor buffers: its
    ``__dict__`` holds only those, hook dicts and immutable settings, so a field-wise copy is a
    faithful deep copy at a fraction of ``copy.deepcopy``'s cost."""
    return (type(mod).__module__.startswith("torch.nn.modules.") and not mod._modules
            and all(p is None or type(p) is nn.Parameter for p in mod._parameters.values())
            and all(b is None or type(b) is torch.Tensor for b in mod._buffers.values()))


def _copy_leaf(mod: nn.Module, shared: set[int]) -> nn.Module:
    """Copy of one leaf module: new parameters and buffers, except those in ``shared`` (conv
    and linear weights, which are only read and then replaced)."""
    if not _is_plain_torch_leaf(mod):
        return copy.deepcopy(mod, {i: t for t in mod.parameters() if (i := id(t)) in shared})
    new = type(mod).__new__(type(mod))
    state: dict[str, Any] = {}
    for key, value in mod.__dict__.items():
        if key == "_parameters":
            value = {n: p if p is None or id(p) in shared
                     else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for n, p in value.items()}
        elif key == "_buffers":
            value = {n: None if b is None else b.detach().clone() for n, b in value.items()}
        elif isinstance(value, (dict, set, list)):  # hook registries, non-persistent buffer names
            value = copy.copy(value)
        elif not isinstance(value, (bool, int, float, str, tuple, type(None), torch.dtype, torch.device)):
            value = copy.deepcopy(value)
        state[key] = value
    new.__dict__.update(state)
    return new


def _traced_working_copy(
    model: nn.Module, concrete_args: Optional[dict[str, Any]], leaf_modules: Iterable[LeafSpec],
    example: Optional[dict[str, Any]] = None,
) -> GraphModule:
    """A GraphModule of ``model`` in eval mode that shares nothing with ``model`` but the
    conv/linear weights (only read, then replaced).

    A model already in eval mode is traced as a structural copy (modules and Python state
    copied, tensors shared: tracing only reads tensors) and then only the modules and tensors the graph uses are copied, leaf by leaf; that skips
    ``copy.deepcopy`` of the whole model, a tenth of the compress time of a ResNet-50. A model
    with any submodule in train mode is deep-copied and set to eval first, since ``forward``
    code may branch on ``self.training`` while being traced.
    """
    def trace(m: nn.Module) -> GraphModule:
        if example is not None:
            return trace_with_example(m, example, leaf_modules)
        return trace_model(m, concrete_args, leaf_modules)

    if any(m.training for m in model.modules()):
        return trace(_copy_sharing_layer_weights(model).eval())
    # A structural copy (tensors shared): forward code that caches on ``self`` while traced
    # (timm's attention-bias cache) writes into the copy, not into the user's model.
    gm = trace(structural_copy(model))
    shared = {id(m.weight) for m in model.modules()
              if isinstance(m, WEIGHTED_MODULES) and isinstance(m.weight, nn.Parameter)}
    copies: set[int] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            target = str(node.target)
            mod = gm.get_submodule(target)
            if id(mod) not in copies:
                new = _copy_leaf(mod, shared)
                gm.set_submodule(target, new)
                copies.add(id(new))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner_name, _, field = str(node.target).rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            if id(owner) in copies:
                continue  # an attribute of a leaf copied above
            value = getattr(owner, field)
            if isinstance(value, nn.Parameter):
                setattr(owner, field, nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))
            elif isinstance(value, torch.Tensor):
                owner._buffers[field] = value.detach().clone()
            else:
                setattr(owner, field, copy.deepcopy(value))
    return gm


def _own_every_tensor(gm: nn.Module, model: nn.Module) -> None:
    """Give ``gm`` its own copy of every tensor it still shares with ``model`` (the weights of
    layers kept in float, an embedding whose weight a layer holds too): one copy per tensor, so a
    tie inside the model is a tie inside the copy."""
    theirs = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    copies: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if t is None or id(t) not in theirs:
                    continue
                if id(t) not in copies:
                    copies[id(t)] = (nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                                     if isinstance(t, nn.Parameter) else t.detach().clone())
                store[key] = copies[id(t)]


#: Set while :func:`_compress_by_parts` visits a copy of the model: every parameter's holders in
#: the whole model (a part alone does not see that its layer's weight is tied to a module outside it).
_WEIGHT_HOLDERS: contextvars.ContextVar[Optional[dict[int, list[str]]]] = contextvars.ContextVar(
    "dfmpc_weight_holders", default=None)


def _naming_tied_layers(exc: ConfigError, tied: list[str]) -> ConfigError:
    """``exc`` (a budget out of reach), naming the layers kept in float for their tied weights."""
    if not tied:
        return exc
    shown = ", ".join(tied[:5]) + (f" and {len(tied) - 5} more" if len(tied) > 5 else "")
    return ConfigError(f"{exc}. Kept in float because their weights are tied (each counts 32 bits/w): {shown}; "
                       "untie them to quantize them (`layer.weight = nn.Parameter(layer.weight.detach().clone())`)")


def _unwrapped(model: nn.Module) -> tuple[nn.Module, Optional[str]]:
    """The model inside ``torch.compile``'s wrapper and ``DataParallel`` /
    ``DistributedDataParallel`` (which fx cannot trace), with a note saying so."""
    inner, names = model, []
    while True:
        if isinstance(inner, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            names.append(f"{type(inner).__name__} (.module)")
            inner = inner.module
        elif type(inner).__name__ == "OptimizedModule" and isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            names.append("torch.compile's OptimizedModule (._orig_mod)")
            inner = inner._orig_mod
        else:
            break
    if not names:
        return model, None
    return inner, (f"compressed the {type(inner).__name__} inside {' inside '.join(names)}: the result is not "
                   "wrapped; wrap or torch.compile it again if you need to")


def _layer_size(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _float_bytes(model: nn.Module) -> int:
    total = sum(p.numel() * 4 for p in model.parameters())
    total += sum(b.numel() * 4 for b in model.buffers() if torch.is_floating_point(b))
    return total


_KEPT_BY_PLAN = "kept in float by the bit plan (skip_layers, or default_bits=None)"
_FUNCTIONAL = "weight used through a functional call (get_attr), kept in float"
_NOT_REACHED = "not reached by forward"
_HF_CONV1D = ("Hugging Face Conv1D whose weight is tied or whose forward is its own: not compressed as a Linear "
              "(see the CHANGELOG), kept in float, and not in bits_per_weight")


def _unsupported_layer_reports(model: nn.Module, seen: set[str]) -> list[LayerReport]:
    """Float reports for the weighted layers of types we do not quantize (Hugging Face Conv1D),
    so that none is left out silently."""
    return [LayerReport(name=name, kind=type(mod).__name__, role="float", bits=None,
                        numel=mod.weight.numel(), reason=_HF_CONV1D)
            for name, mod in model.named_modules()
            if name not in seen and is_hf_conv1d(mod) and isinstance(getattr(mod, "weight", None), torch.Tensor)]


class _BareLayer(nn.Module):
    """Container that lets a bare conv/linear layer be traced (the root itself cannot be a leaf)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _account_all_layers(model: nn.Module, gm: GraphModule, reports: list[LayerReport],
                        holders: dict[int, list[str]]) -> list[LayerReport]:
    """One report per conv/linear module of ``model``: the layers ``compress`` saw (in graph
    order), then those it could not (weight read via ``get_attr``, inside a declared leaf,
    never called), kept in float with the reason, in module order."""
    seen = {r.name for r in reports}
    for r in reports:
        if r.bits is None and r.reason is None:
            r.reason = _KEPT_BY_PLAN
    attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    out = list(reports)
    modules = dict(model.named_modules())
    unseen = [name for name, mod in modules.items() if name not in seen and isinstance(mod, WEIGHTED_MODULES)
              and isinstance(getattr(mod, "weight", None), torch.Tensor)]
    tied = tied_layers(modules, unseen, holders)
    for name in unseen:
        mod = modules[name]
        leaf = next((c for c in called if name.startswith(c + ".")), None)
        if name in tied:
            reason = tied[name]
        elif any(a.startswith(name + ".") for a in attrs):
            reason = _FUNCTIONAL
        elif leaf is not None:
            reason = f"inside {leaf!r}, traced as one call (leaf module), kept in float"
        else:
            reason = _NOT_REACHED
        out.append(LayerReport(name=name, kind=type(mod).__name__, role="float", bits=None,
                               numel=mod.weight.numel(), reason=reason))
    return out + _unsupported_layer_reports(model, seen)


def _other_float_matrices(model: nn.Module) -> Optional[str]:
    """A report note naming the weight matrices that are not conv/linear layers and so stay
    float (``nn.MultiheadAttention``'s ``in_proj_weight``, recurrent layers, embeddings): they
    are in the model's bytes but neither quantized nor in ``bits_per_weight``."""
    found = [(name, type(mod).__name__, sum(p.numel() for p in mod._parameters.values() if p is not None and p.dim() >= 2))
             for name, mod in model.named_modules()
             if not isinstance(mod, (*WEIGHTED_MODULES, torch.nn.utils.parametrize.ParametrizationList))
             and not is_hf_conv1d(mod) and any(p is not None and p.dim() >= 2 for p in mod._parameters.values())]
    if not found:
        return None
    shown = ", ".join(f"{n or type(model).__name__} ({kind}, {k:,} weights)" for n, kind, k in found[:4])
    more = f" and {len(found) - 4} more" if len(found) > 4 else ""
    return (f"{sum(k for _, _, k in found):,} weights in matrices that are not Conv1d/Conv2d/Linear layers stay "
            f"float (counted in the bytes, not in bits_per_weight): {shown}{more}")


def _layers_inside_leaves(gm: GraphModule, seen: Iterable[str], holders: dict[int, list[str]]) -> list[tuple[str, str]]:
    """``(qualified name, leaf name)`` of the conv/linear layers inside modules traced as one
    call (timm registers whole blocks such as NormFreeBlock and MobileVitBlock as not traceable;
    fx keeps ``torch.nn`` containers such as ``nn.TransformerEncoder`` whole), but tied ones."""
    seen = set(seen)
    out: list[tuple[str, str]] = []
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for leaf_name in sorted(called):
        leaf = gm.get_submodule(leaf_name)
        if isinstance(leaf, WEIGHTED_MODULES):
            continue
        for sub_name, sub in leaf.named_modules():
            name = f"{leaf_name}.{sub_name}"
            if not sub_name or name in seen or not isinstance(sub, WEIGHTED_MODULES) or is_quant_module(sub):
                continue
            if not isinstance(getattr(sub, "weight", None), nn.Parameter):
                continue
            if len(holders.get(id(sub.weight), [])) > 1:
                continue  # tied: left to _account_all_layers, which gives the reason
            seen.add(name)
            out.append((name, leaf_name))
    return out


def _inside_leaf_reason(leaf_name: str, budget: bool) -> str:
    how = "width chosen by the size budget" if budget else "plain rounding at default_bits"
    return f"inside {leaf_name!r}, traced as one call: {how}, no compensation or correction (no input moments)"


def _quantize_inside_leaves(gm: GraphModule, inside: list[tuple[str, str]], cfg: DFMPCConfig) -> list[LayerReport]:
    """Plain rounding (default bits, no compensation or BatchNorm correction) of the layers
    ``inside`` leaf modules (:func:`_layers_inside_leaves`): their forward is opaque, so nothing
    is derived, but their weights need not stay in float. (Under a size budget the allocator
    chooses their widths instead: :func:`_leaf_layer_inputs`.)"""
    if cfg.default_bits is None:
        return []
    reports: list[LayerReport] = []
    for name, leaf_name in inside:
        sub = gm.get_submodule(name)
        ref = sub.weight.detach()
        qw = quantize_for(ref.float(), cfg.default_bits, cfg, role="default")
        q = qw.dequantize().to(ref.dtype)
        qw.scale, qw.zero_point = qw.scale.to(ref.dtype), qw.zero_point.to(ref.dtype)
        bias = None if sub.bias is None else sub.bias.detach()
        gm.set_submodule(name, to_quant_module(sub, q, bias, qw, "default"))
        reports.append(LayerReport(
            name=name, kind=type(sub).__name__, role="default", bits=cfg.default_bits, numel=ref.numel(),
            scheme=qw.scheme, weight_rel_error=float(torch.dist(q, ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)),
            reason=_inside_leaf_reason(leaf_name, budget=False)))
    return reports


def _leaf_layer_inputs(gm: GraphModule, name: str, leaf_name: str, cfg: DFMPCConfig) -> LayerInputs:
    """A layer inside a leaf module as the allocator's: no input moments, no BatchNorm, no
    pair (the leaf's forward is opaque), so it is scored and quantized without correction."""
    layer = gm.get_submodule(name)
    ref, bias = _working_weight_and_bias(layer)
    return LayerInputs(
        name=name, kind=type(layer).__name__, role="budget", bits=max(cfg.candidate_bits), weight=ref, bias=bias,
        groups=getattr(layer, "groups", 1), in_moments=None, bn=None, bn_name=None, partner=None,
        provenance=f"inside {leaf_name!r}, traced as one call",
    )


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def _example_kwargs(model: nn.Module, example_inputs: Any) -> Optional[dict[str, Any]]:
    """Keyword inputs to trace ``model`` on (a Hugging Face model): ``example_inputs`` (a dict
    of keywords, or positional arguments matched to ``forward``'s parameters), else the
    model's own ``dummy_inputs``; None when there are none."""
    params = inspect.signature(model.forward).parameters
    if isinstance(example_inputs, dict):
        out = dict(example_inputs)
    elif example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        names = [p for p in params][:len(args)]
        if len(names) != len(args):
            return None
        out = dict(zip(names, args))
    else:
        try:
            dummy = getattr(model, "dummy_inputs", None)
        except Exception:  # a property that fails for this configuration
            return None
        if not isinstance(dummy, dict) or not dummy:
            return None
        out = dict(dummy)
    if "use_cache" in params and "use_cache" not in out:
        # the graph only serves the analysis: a key/value cache object (DynamicCache) does not trace
        out["use_cache"] = False
    return out


@dataclass
class _PartsBudget:
    """One size budget shared by the parts of a model compressed part by part. The first pass
    collects every part's layer costs under their qualified names; :func:`solve_widths` then
    allocates once over all of them; the second pass hands each part its layers' choices."""

    part: str = ""  # qualified name of the part being compressed
    bare: bool = False  # the part is a bare conv/linear layer (its one layer is the part)
    costs: list[LayerCost] = field(default_factory=list)
    raw: dict[str, list[float]] = field(default_factory=dict)
    gains: dict[str, float] = field(default_factory=dict)
    inputs: list[LayerInputs] = field(default_factory=list)  # first pass: for the input-factor step
    names: list[str] = field(default_factory=list)  # their qualified names
    extra_bits: float = 0.0  # biases the plans add, less folded BatchNorms (_planned_extra_bits)
    choices: Optional[dict[str, BudgetChoice]] = None
    reserved: set[str] = field(default_factory=set)  # layers whose input factors are charged

    def qualified(self, local: str) -> str:
        return self.part if self.bare else f"{self.part}.{local}"


#: Set while :func:`_compress_by_parts` runs under a size budget.
_PARTS_BUDGET: contextvars.ContextVar[Optional[_PartsBudget]] = contextvars.ContextVar("dfmpc_parts_budget", default=None)


def _compress_by_parts(model: nn.Module, cfg: DFMPCConfig, leaf_modules: tuple, reason: str) -> nn.Module:
    """A copy of ``model`` in which every largest submodule that traces is compressed on its own
    (its ``forward`` code stays the model's), and conv/linear layers directly under a module
    that does not trace are compressed as bare layers. For models that fx cannot trace as a
    whole (Hugging Face transformers 5 has no fx tracer of its own); pairs can only form
    inside a part. The report lists every layer, with the part it was compressed in."""
    start = time.perf_counter()
    result = structural_copy(model, copy_tensors=True).eval()
    reports: list[LayerReport] = []
    refusals: list[dict[str, str]] = []
    pairs: list[str] = []
    excluded: list[str] = []
    report_warnings = [f"{type(model).__name__} was compressed part by part: {reason}"]
    part_cfg = cfg
    if cfg.has_budget:
        pass  # one knapsack over the layers of every part: the two passes below
    elif cfg.first_last_bits is not None:
        # "first" and "last" of a part are not the model's: the rule would pin every part's
        # ends (every lone layer) and exclude the pairs that end a part.
        report_warnings.append("first_last_bits is not applied part by part: every layer follows the pair/default rule")
        part_cfg = dataclasses.replace(cfg, first_last_bits=None)

    def visit(mod: nn.Module, prefix: str) -> None:
        if not prefix:  # the whole model's copy: each part sees which of its weights are tied outside it
            token = _WEIGHT_HOLDERS.set(weight_holders(mod))
            try:
                visit(mod, ".")
            finally:
                _WEIGHT_HOLDERS.reset(token)
            return
        prefix = prefix.lstrip(".")
        for child_name, child in list(mod.named_children()):
            name = f"{prefix}{child_name}"
            if not any(isinstance(m, WEIGHTED_MODULES) for m in child.modules()):
                continue
            pool = _PARTS_BUDGET.get()
            if pool is not None:
                pool.part, pool.bare = name, isinstance(child, WEIGHTED_MODULES)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NoCompensablePairWarning)
                    part = compress(child, part_cfg, leaf_modules=leaf_modules, output="module", untraceable="raise")
            except (TraceError, InvalidModelError):
                visit(child, name + ".")
                continue
            if pool is not None and pool.choices is None:
                continue  # collecting costs: the part is compressed in the second pass
            mod.set_submodule(child_name, part)
            rep = get_report(part)
            for layer in rep.layers:
                layer.name = f"{name}.{layer.name}" if layer.name else name
                layer.partner = f"{name}.{layer.partner}" if layer.partner else None
                reports.append(layer)
            refusals.extend({**r, "layer": f"{name}.{r['layer']}" if r["layer"] else name} for r in rep.refusals)
            pairs.extend(f"{name}: {p}" for p in rep.pairs)
            excluded.extend(f"{name}: {e}" for e in rep.excluded_pairs)

    if cfg.has_budget:
        pool = _PartsBudget()
        token = _PARTS_BUDGET.set(pool)
        try:
            visit(structural_copy(model).eval(), "")  # first pass: every part's layer costs
            quantized = sum(c.numel for c in pool.costs)
            weight_count = _weight_count(model)
            fixed_weight_bits = 32.0 * (weight_count - quantized)
            other_bits = 8.0 * _float_bytes(model) - 32.0 * weight_count + pool.extra_bits
            try:
                choices = solve_widths(pool.costs, pool.raw, pool.gains, cfg, fixed_weight_bits, weight_count,
                                       other_bits, report_warnings)
            except ConfigError as exc:
                modules = dict(model.named_modules())
                weighted = [n for n, m in modules.items() if isinstance(m, WEIGHTED_MODULES)]
                raise _naming_tied_layers(exc, list(tied_layers(modules, weighted, weight_holders(model)))) from None
            pool.choices, pool.reserved = reserve_input_factors(
                pool.inputs, pool.names, pool.costs, pool.raw, choices, pool.gains, cfg, fixed_weight_bits,
                weight_count, other_bits, report_warnings)
            pool.inputs = []  # the first pass's weights are no longer needed
            visit(result, "")  # second pass: each part with its layers' share of the one allocation
        finally:
            _PARTS_BUDGET.reset(token)
        report_warnings.append(f"size budget allocated over the {len(pool.costs)} layers of all parts at once")
    else:
        visit(result, "")
    order = {n: i for i, (n, m) in enumerate(model.named_modules()) if isinstance(m, WEIGHTED_MODULES)}
    reports.sort(key=lambda r: order.get(r.name, len(order)))
    done = {r.name for r in reports}
    for name, mod in model.named_modules():
        if isinstance(mod, WEIGHTED_MODULES) and name not in done:
            reports.insert(order[name], LayerReport(name=name, kind=type(mod).__name__, role="float", bits=None,
                                                    numel=mod.weight.numel(), reason="in no part that traces"))
    reports += _unsupported_layer_reports(model, {r.name for r in reports})
    other = _other_float_matrices(model)
    if other is not None:
        report_warnings.append(other)
    float_bytes = _float_bytes(model)
    report = CompressionReport(
        config=cfg.to_dict(), layers=reports, pairs=pairs, excluded_pairs=excluded, refusals=refusals,
        float_bytes=float_bytes, compressed_bytes=_compressed_bytes(result),
        bits_per_weight=_bits_per_weight(result, _weight_count(model)), target_bits=cfg.target_bits,
        target_bytes=cfg.target_bytes, compress_seconds=time.perf_counter() - start, torch_version=torch.__version__, warnings=report_warnings,
    )
    setattr(result, REPORT_KEY, report.to_dict())
    return result


def _check_runs(qmodel: nn.Module, example_inputs: Any) -> None:
    """Run ``qmodel`` once so that a compressed model that cannot run fails here, typed
    (``example_inputs``: a tensor, a tuple of arguments, or a dict of keyword arguments)."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = example_inputs if isinstance(example_inputs, dict) else None
    try:
        with torch.no_grad():
            qmodel(**kwargs) if kwargs is not None else qmodel(*args)
    except Exception as exc:
        raise CompressedModelError(
            f"the compressed {type(qmodel).__name__} failed on example_inputs: {type(exc).__name__}: {exc}. "
            "Keep the failing layer in float (skip_layers=[...]) or opaque (leaf_modules=[...]), and report it"
        ) from exc


def compress(
    model: nn.Module,
    config: Optional[DFMPCConfig] = None,
    *,
    concrete_args: Optional[dict[str, Any]] = None,
    leaf_modules: Iterable[LeafSpec] = (),
    example_inputs: Any = None,
    output: str = "graph",
    untraceable: str = "auto",
    **overrides: Any,
) -> nn.Module:
    """Compress ``model`` with DF-MPC and return a mixed-precision ``torch.fx.GraphModule``.

    The input model is never modified (a copy is traced; BatchNorm in train mode is read from
    an eval-mode copy's running statistics). Keyword ``overrides`` replace config fields, e.g.
    ``compress(model, low_bits=3)``. :func:`dfmpc_fx.get_report` reads what was done.

    ``output="module"`` returns instead a deep copy of ``model`` (in eval mode) with the
    compressed layers and BatchNorms swapped in: its own ``forward`` and signature stay
    (a GraphModule traced with ``concrete_args`` loses those arguments), so it can replace the
    original anywhere. A bare conv/linear layer comes back as its compressed layer.
    ``example_inputs`` (a tensor or a tuple of arguments): the result is run once on it.
    ``untraceable="parts"`` (the default, ``"auto"``, does it for Hugging Face
    ``PreTrainedModel``s, ``"raise"`` never): a model that does not trace as a whole is
    compressed part by part, each largest traceable submodule on its own, and comes back as
    ``output="module"`` does.

    Raises:
        ConfigError: invalid configuration. TraceError: the model does not trace (the message
        names the code and the remedies). InvalidModelError: NaN/Inf weights, or no conv/linear.
        CompressedModelError: the result failed on ``example_inputs``.
    """
    if output not in ("graph", "module"):
        raise ConfigError(f"output must be 'graph' (a GraphModule) or 'module' (the model's own class), got {output!r}")
    inner, note = _unwrapped(model) if isinstance(model, nn.Module) else (model, None)
    if note is not None:
        warnings.warn(note, UserWarning, stacklevel=2)
    else:
        inner, converted = with_linear_for_conv1d(model) if isinstance(model, nn.Module) else (model, [])
        if converted:
            note = (f"{len(converted)} Hugging Face Conv1D layers ({', '.join(n or '(the model)' for n in converted[:3])}"
                    f"{', ...' if len(converted) > 3 else ''}) were compressed as nn.Linear (the same function, the "
                    "weight transposed): the result holds Linear layers in their place")
    if note is not None:
        result = compress(inner, config, concrete_args=concrete_args, leaf_modules=leaf_modules,
                          example_inputs=example_inputs, output=output, untraceable=untraceable, **overrides)
        report = stored_report(result)
        if report is not None:
            report.setdefault("warnings", []).append(note)
        return result
    if untraceable not in ("auto", "parts", "raise"):
        raise ConfigError(f"untraceable must be 'auto', 'parts' or 'raise', got {untraceable!r}")
    if isinstance(model, WEIGHTED_MODULES) and not isinstance(model, GraphModule):
        # The root cannot be a leaf of its own trace: compress it inside a container.
        wrapped = compress(_BareLayer(model), config, leaf_modules=leaf_modules, untraceable="raise", **overrides)
        layer = wrapped.layer
        report = get_report(wrapped)
        for r in report.layers:
            r.name = r.name.partition(".")[2]  # "layer" -> "" (the root, as in named_modules())
            r.partner = r.partner.partition(".")[2] if r.partner else r.partner
        layer.dfmpc_report = report.to_dict()
        if example_inputs is not None:
            _check_runs(layer, example_inputs)
        return layer
    if config is not None and not isinstance(config, DFMPCConfig):
        raise ConfigError(f"config must be a DFMPCConfig, got {type(config).__name__}")
    cfg = config or DFMPCConfig()
    if overrides:
        names_layout = (any(k in overrides for k in (*LAYOUT_FIELDS, "target_bytes"))
                        or overrides.get("method", "dfmpc") != "dfmpc")
        if cfg.budget_is_default and "target_bits" not in overrides and names_layout:
            overrides = {"target_bits": None, **overrides}  # a layout named now replaces the default budget
        try:
            cfg = dataclasses.replace(cfg, **overrides)
        except TypeError as exc:
            raise ConfigError(f"{exc}; valid fields: {[f.name for f in dataclasses.fields(DFMPCConfig)]}") from None
    start = time.perf_counter()
    _check_model(model)
    float_bytes = _float_bytes(model)

    report_warnings: list[str] = []
    try:
        gm = _traced_working_copy(model, concrete_args, leaf_modules)
    except TraceError as exc:
        if untraceable == "raise" or (untraceable == "auto" and not _is_transformers_model(model)):
            raise
        gm = None
        reason = str(exc).splitlines()[0]
        example = _example_kwargs(model, example_inputs) if untraceable == "auto" else None
        if example is not None:
            # One graph of the whole model, recorded while it runs on an example input: shapes
            # and branches are the example's, so it serves the analysis (pairs, moments, the
            # budget) and the result is the model's own class with the layers swapped in.
            try:
                gm = _traced_working_copy(model, None, leaf_modules, example)
            except TraceError as exc2:
                reason += f"; traced on its example input: {str(exc2).splitlines()[0]}"
        if gm is None:
            result = _compress_by_parts(model, cfg, tuple(leaf_modules), reason)
            if example_inputs is not None:
                _check_runs(result, example_inputs)
            return result
        output = "module"
        report_warnings.append(
            f"{type(model).__name__} does not trace symbolically ({reason}); it was traced on an example input "
            f"({', '.join(f'{k}: {tuple(v.shape)}' if isinstance(v, torch.Tensor) else k for k, v in example.items())}) "
            "and is returned as its own class with the compressed layers swapped in")
    search = search_graph(gm)
    if not search.layers:
        raise InvalidModelError(
            f"{type(model).__name__} has no Conv1d/Conv2d/Linear module reached by its forward: nothing to quantize"
        )
    modules = dict(gm.named_modules())
    holders = _WEIGHT_HOLDERS.get() or weight_holders(model)  # every parameter's holders, for ties
    tied = tied_layers(modules, search.layers, holders)
    plan = budget_roles(search, cfg, tied) if cfg.has_budget else assign_bits(search, cfg, tied)
    if not plan.active_pairs and not cfg.has_budget:
        msg = (f"{type(model).__name__} has no compensable pair ({len(search.refusals)} candidates refused: "
               f"{search.refusal_counts()}); quantizing every layer at its default bit width without compensation")
        warnings.warn(msg, NoCompensablePairWarning, stacklevel=2)
        report_warnings.append(msg)

    moments = estimate_moments(gm, cfg.input_mean, cfg.input_std) if cfg.method == "dfmpc" else MomentEstimate()
    weight_count = _weight_count(model)
    inside = _layers_inside_leaves(gm, search.layers, holders)
    # under a size budget the layers inside leaves are the allocator's too (plain rounding)
    leaf_inputs = [_leaf_layer_inputs(gm, name, leaf, cfg) for name, leaf in inside] if cfg.has_budget else []
    try:
        plans = _plan_layers(gm, plan, search.layers, moments, cfg, report_warnings, weight_count, float_bytes,
                             leaf_inputs)
    except ConfigError as exc:
        raise _naming_tied_layers(exc, list(tied)) from None
    apply_plans(gm, plans)
    layer_reports = [p.report for p in plans]
    leaf_of = dict(inside)
    for r in layer_reports:
        if r.name in tied:
            r.reason = tied[r.name]
        elif r.name in leaf_of:
            r.reason = _inside_leaf_reason(leaf_of[r.name], budget=True)
    if not cfg.has_budget:
        layer_reports += _quantize_inside_leaves(gm, inside, cfg)
    if _WEIGHT_HOLDERS.get() is None:
        # (part by part, ``model`` is a part of the copy _compress_by_parts made: it owns its
        # tensors, and a copy here would untie a layer of this part from a module outside it)
        _own_every_tensor(gm, model)
    layer_reports = _account_all_layers(model, gm, layer_reports, holders)
    other = _other_float_matrices(model)
    if other is not None:
        report_warnings.append(other)
    gm.eval()
    compressed_bytes = _compressed_bytes(gm)
    bits_per_weight = _bits_per_weight(gm, weight_count)
    active = plan.active_pairs if cfg.compensate else []
    excluded = [f"{p.first} -> {p.second}: {why}" for p, why in plan.excluded_pairs]
    if not cfg.compensate:
        excluded += [f"{p.first} -> {p.second}: compensate=False" for p in plan.active_pairs]
    report = CompressionReport(
        config=cfg.to_dict(),
        layers=layer_reports,
        pairs=[p.describe() for p in active],
        excluded_pairs=excluded,
        refusals=[{"layer": r.first, "reason": r.reason, "detail": r.detail} for r in search.refusals],
        float_bytes=float_bytes,
        compressed_bytes=compressed_bytes,
        compress_seconds=time.perf_counter() - start,
        torch_version=torch.__version__,
        warnings=report_warnings,
        theoretical_bytes=compressed_bytes,
        bits_per_weight=bits_per_weight,
        target_bits=cfg.target_bits,
        target_bytes=cfg.target_bytes,
    )
    gm.meta[REPORT_KEY] = report.to_dict()
    result: nn.Module = gm
    if output == "module":
        result = structural_copy(model, copy_tensors=True).eval()
        swap_compressed_modules(result, gm)
        setattr(result, REPORT_KEY, report.to_dict())
    if example_inputs is not None:
        _check_runs(result, example_inputs)
    return result


def _working_weight_and_bias(layer: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A layer's weight and bias in the dtype plans compute in (float64 stays, anything else is
    float32)."""
    dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
    return layer.weight.detach().to(dtype), None if layer.bias is None else layer.bias.detach().to(dtype)


def _layer_inputs(
    name: str,
    modules: dict[str, nn.Module],
    call_counts: dict[str, int],
    node: Node,
    plan: BitPlan,
    moments: MomentEstimate,
    incoming: Optional[tuple[torch.Tensor, int]],
    cfg: DFMPCConfig,
) -> LayerInputs:
    """Graph side of one layer's plan: what follows it, which pair it starts, its input moments,
    and its float weight with the scale its predecessor in a pair handed over (``incoming``)."""
    layer = modules[name]
    groups = getattr(layer, "groups", 1)
    ref, bias = _working_weight_and_bias(layer)
    dtype = ref.dtype
    in_m: Optional[ChannelMoments] = None
    mean_trusted = True
    if cfg.method == "dfmpc":
        src = node.args[0] if node.args else None
        key = src.name if isinstance(src, Node) else None
        if call_counts[name] != 1:
            provenance = "module called more than once"
        elif key is None:
            provenance = "input is not a graph value"
        else:
            provenance = moments.reasons.get(key, "unknown")
        est = moments.moments.get(key) if key is not None and call_counts[name] == 1 else None
        if est is not None:
            est = cmath.expand_moments(est, _layer_size(layer))
            if est is None:
                provenance = f"input moments of another size than the layer's {_layer_size(layer)} inputs"
        if est is not None:
            in_m = ChannelMoments(est.mean.to(dtype), est.var.to(dtype))
            provenance = moments.source.get(key, "propagated")
            if key in moments.assumed:
                mean_trusted = cfg.layernorm_mean_correction
                provenance += f" (mean rests on LayerNorm {moments.assumed[key]}'s beta" + \
                    ("" if mean_trusted else ": no mean correction, layernorm_mean_correction=False") + ")"
    else:
        provenance = f"method={cfg.method!r}"
    if incoming is not None:
        c, fpc = incoming
        ref = cmath.fold_input_scale(ref, c.to(dtype), groups, fpc)
        if in_m is not None:
            c_in = c.to(dtype).repeat_interleave(fpc) if fpc > 1 else c.to(dtype)
            in_m = cmath.scale_input_moments(in_m, c_in)
    pair = plan.pair_from(name)
    bn_name = None
    if plan.bits[name] is not None and call_counts[name] == 1:
        bn_name = pair.bn if pair is not None else _following_batchnorm(node, modules, call_counts)
    fold_bn = cfg.folds_batchnorm and bn_name is not None and _can_fold_batchnorm(layer, modules[bn_name], cfg)
    return LayerInputs(
        name=name, kind=type(layer).__name__, role=plan.roles[name], bits=plan.bits[name], weight=ref,
        bias=bias, groups=groups, in_moments=in_m,
        bn=_batchnorm_state(modules[bn_name], dtype) if bn_name else None, bn_name=bn_name,
        partner=pair.second if pair is not None else None,
        features_per_channel=pair.features_per_channel if pair is not None else 1,
        mean_trusted=mean_trusted, provenance=provenance,
        fold_scales=cfg.folds_scales and bn_name is not None and modules[bn_name].weight is not None and not fold_bn,
        fold_batchnorm=fold_bn,
    )


def _can_fold_batchnorm(layer: nn.Module, bn: nn.Module, cfg: DFMPCConfig) -> bool:
    """Whether ``fold_batchnorm`` may fold ``bn`` into ``layer`` (decided before any width is
    chosen, so that a size budget counts the bytes it saves): the BatchNorm normalises the
    layer's output channels; the layer's ``forward`` adds its bias (torch's own, or it has one
    already); a zero-point scheme sees no negative gamma (its codes cannot be negated); float16
    scales stay far from overflow once multiplied by ``gamma / sqrt(var + eps)``."""
    out = layer.weight.shape[0]
    if bn.num_features != out or bn.running_var is None:
        return False
    if layer.bias is None and type(layer).forward not in {nn.Conv1d.forward, nn.Conv2d.forward, nn.Linear.forward}:
        return False
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(out)
    if cfg.may_use_zero_points and bool((gamma < 0).any()):
        return False
    if cfg.scale_bits == 16 or cfg.method == "paper":
        m = gamma.abs().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        peak = layer.weight.detach().reshape(out, -1).abs().amax(dim=1).double()
        if float((m * peak).max()) * 16 > float(torch.finfo(torch.float16).max):
            return False
    return True


def _planned_extra_bits(inp: LayerInputs, modules: dict[str, nn.Module], cfg: DFMPCConfig) -> float:
    """Bits the plan adds outside the weights: a bias the layer gains (float32 per output
    channel), less the floats of a BatchNorm folded into it."""
    extra = 32.0 * inp.weight.shape[0] if adds_bias(inp, cfg) else 0.0
    if inp.fold_batchnorm:
        extra -= 8.0 * _float_bytes(modules[inp.bn_name])
    return extra


def _plan_under_budget(
    modules: dict[str, nn.Module],
    call_counts: dict[str, int],
    first_node: dict[str, Node],
    plan: BitPlan,
    layers: list[str],
    moments: MomentEstimate,
    cfg: DFMPCConfig,
    weight_count: int,
    float_bytes: int,
    gains: dict[str, float],
    notes: list[str],
    leaf_inputs: list[LayerInputs] = [],
) -> list[LayerPlan]:
    """``leaf_inputs``: the layers inside leaf modules (:func:`_leaf_layer_inputs`), allocated
    with the others and planned after them."""
    inputs = [_layer_inputs(name, modules, call_counts, first_node[name], plan, moments, None, cfg) for name in layers]
    inputs += leaf_inputs
    quantizable = [inp for inp in inputs if inp.bits is not None]
    fixed_weight_bits = 32.0 * (weight_count - sum(inp.weight.numel() for inp in quantizable))
    # biases the corrections add, less BatchNorms folded into their layers (fold_batchnorm)
    fixed_other_bits = 8.0 * float_bytes - 32.0 * weight_count + sum(
        _planned_extra_bits(inp, modules, cfg) for inp in quantizable)
    pool = _PARTS_BUDGET.get()
    if pool is None:
        choices = choose_widths(quantizable, cfg, fixed_weight_bits, weight_count, fixed_other_bits, gains, notes)
    elif pool.choices is None:  # a part, first pass: its costs join the model's one knapsack
        names = [pool.qualified(inp.name) for inp in quantizable]
        costs, raw = layer_costs(quantizable, cfg, gains, names)
        pool.costs += costs
        pool.raw.update(raw)
        pool.gains.update((q, gains.get(inp.name, 1.0)) for q, inp in zip(names, quantizable))
        pool.inputs += quantizable
        pool.names += names
        pool.extra_bits += sum(_planned_extra_bits(inp, modules, cfg) for inp in quantizable)
        choices = {}
    else:
        choices = {inp.name: pool.choices[pool.qualified(inp.name)] for inp in quantizable}
        for inp in quantizable:
            inp.input_scale_reserved = pool.qualified(inp.name) in pool.reserved
    plans = []
    upstream_noise = 0.0  # estimated noise-to-signal of the layers planned so far, summed (graph order)
    for inp in inputs:
        choice = choices.get(inp.name)
        if choice is not None:
            inp.bits, inp.group_size, inp.scheme = choice.option.bits, choice.option.group_size, choice.option.scheme
            assign_input_scales([inp], cfg)  # at the chosen width, within the bits reserved for them
        inp.input_signal_fraction = 1.0 / (1.0 + upstream_noise)
        layer_plan = plan_layer(inp, cfg)
        if choice is not None:
            rep = layer_plan.report
            rep.group_size = choice.option.group_size
            rep.estimated_damage = choice.estimate[choice.option.label()]
            upstream_noise += rep.estimated_damage
            rep.noise_gain = choice.gain
            rep.estimates = choice.estimate
        plans.append(layer_plan)
    return plans


def _weight_count(model: nn.Module) -> int:
    """Conv1d/Conv2d/Linear weights of the model (subclasses included; shared ones once): what a
    size budget in bits per weight is an average over."""
    seen: set[int] = set()
    total = 0
    for mod in model.modules():
        if isinstance(mod, WEIGHTED_MODULES) and isinstance(getattr(mod, "weight", None), torch.Tensor):
            if id(mod.weight) not in seen:
                seen.add(id(mod.weight))
                total += mod.weight.numel()
    return total


def _bits_per_weight(gm: GraphModule, weight_count: int) -> float:
    """Average bits per conv/linear weight of the compressed model: quantized weights at their
    width plus their scales and zero points, every other conv/linear weight at 32."""
    bits, quantized = 0.0, 0
    for mod in gm.modules():
        if is_quant_module(mod):
            bits += quantized_layer_bits(mod)
            quantized += mod.weight.numel()
    bits += 32.0 * max(weight_count - quantized, 0)
    return bits / max(weight_count, 1)


def _batchnorm_state(bn: nn.Module, dtype: torch.dtype) -> BatchNormState:
    return BatchNormState(
        mean=bn.running_mean.detach().to(dtype).clone(), var=bn.running_var.detach().to(dtype), eps=bn.eps,
        weight=bn.weight.detach().to(dtype) if bn.weight is not None else None,
        bias=bn.bias.detach().to(dtype) if bn.bias is not None else None,
        stats_dtype=bn.running_mean.dtype,
    )


def _plan_layers(
    gm: GraphModule,
    plan: BitPlan,
    layers: list[str],
    moments: MomentEstimate,
    cfg: DFMPCConfig,
    report_warnings: list[str],
    weight_count: int,
    float_bytes: int,
    leaf_inputs: list[LayerInputs] = [],
) -> list[LayerPlan]:
    """One :class:`LayerPlan` per weighted layer, in graph order (a pair's scale reaches its
    partner before the partner is planned; under a size budget the allocator first chooses
    every layer's width from the same inputs, ``leaf_inputs`` included)."""
    modules = dict(gm.named_modules())
    call_counts: dict[str, int] = {}
    first_node: dict[str, Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            call_counts[str(node.target)] = call_counts.get(str(node.target), 0) + 1
            first_node.setdefault(str(node.target), node)
    if cfg.has_budget:
        gains = output_noise_gains(gm, moments.moments)
        for inp in leaf_inputs:  # a layer inside a leaf takes the leaf's gain
            leaf = max((k for k in gains if inp.name.startswith(k + ".")), key=len, default=None)
            if leaf is not None:
                gains.setdefault(inp.name, gains[leaf])
        return _plan_under_budget(modules, call_counts, first_node, plan, layers, moments, cfg, weight_count, float_bytes, gains,
                                  report_warnings, leaf_inputs)
    incoming: dict[str, tuple[torch.Tensor, int]] = {}
    plans: list[LayerPlan] = []
    for name in layers:
        inputs = _layer_inputs(name, modules, call_counts, first_node[name], plan, moments, incoming.pop(name, None), cfg)
        assign_input_scales([inputs], cfg)
        layer_plan = plan_layer(inputs, cfg)
        rep = layer_plan.report
        if rep.degenerate_channels:
            report_warnings.append(f"{name}: {rep.degenerate_channels} channels quantized to all zeros; c = 1 there")
        if layer_plan.partner_scale is not None:
            incoming[inputs.partner] = layer_plan.partner_scale
        plans.append(layer_plan)
    return plans


def _compressed_bytes(gm: GraphModule) -> int:
    """Theoretical size: bits x weights / 8 for quantized weights, scales, float32 for the rest."""
    total = 0.0
    counted: set[int] = set()
    for mod in gm.modules():
        if is_quant_module(mod):
            total += quantized_layer_bytes(mod)
            counted.update({id(mod.weight), id(mod.weight_scale), id(mod.weight_zero_point)})
    for p in list(gm.parameters()) + [b for b in gm.buffers() if torch.is_floating_point(b)]:
        if id(p) not in counted:
            total += 4 * p.numel()
    return int(total)


def swap_compressed_modules(target: nn.Module, qmodel: GraphModule) -> list[str]:
    """Put the modules ``compress`` changed into ``target`` in place, by qualified name.

    Used where the model object must stay the same (a LightningModule inside a Trainer):
    its ``forward`` is untouched; only layers (-> ``Quant*``) and BatchNorms (corrected
    statistics) are replaced. Returns the swapped names.
    """
    report = get_report(qmodel)
    names: list[str] = []
    q_modules = dict(qmodel.named_modules())
    t_modules = dict(target.named_modules())
    for layer in report.layers:
        if layer.bits is None:
            continue
        names.append(layer.name)
    for name, mod in q_modules.items():
        if isinstance(mod, BATCHNORM_MODULES):
            names.append(name)
    swapped = []
    for layer in report.layers:
        if layer.batchnorm_folded and layer.batchnorm_folded in t_modules:
            # folded into its layer (fold_batchnorm): the structure's forward still calls it
            target.set_submodule(layer.batchnorm_folded, nn.Identity())
            swapped.append(layer.batchnorm_folded)
    for name in names:
        if name not in t_modules:
            raise InvalidModelError(
                f"{name!r} exists in the compressed model but not in {type(target).__name__}: swap into "
                "the same architecture that was compressed"
            )
        new = copy.deepcopy(q_modules[name])
        new.train(t_modules[name].training)
        target.set_submodule(name, new)
        swapped.append(name)
    return swapped
