"""torch.fx tracing with leaf modules, concrete_args and failures that say what to do."""
from __future__ import annotations

import copy
import linecache
import operator
import os
import sys
import traceback
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from torch.fx import GraphModule, Node, Proxy, Tracer

from ..errors import TraceError

LeafSpec = Union[str, type]

#: The layers DF-MPC quantizes. Every instance, subclasses included, is traced as one call so
#: that it is quantized as a whole (a subclass traced through would leave its weight in float,
#: read by a functional call).
WEIGHTED_MODULES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
BATCHNORM_MODULES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


def own_forward(mod: nn.Module) -> bool:
    """Does ``mod`` (a conv/linear/BatchNorm subclass) override its torch parent's ``forward``?

    Such a layer (TF 'same' padding, weight standardization, BatchNorm fused with an
    activation) must keep its own ``forward`` when compressed, and its channel scales are not
    those of its weight, so it is never part of a compensable pair.
    """
    for base in WEIGHTED_MODULES + BATCHNORM_MODULES:
        if isinstance(mod, base):
            return type(mod).forward is not base.forward
    return False


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """timm's registered leaf modules and autowrapped functions, when timm is already imported
    (a timm model was built): its models rely on them to trace."""
    fx = sys.modules.get("timm.layers._fx")
    if fx is None:
        return (), ()
    mods = tuple(m for m in getattr(fx, "_leaf_modules", ()) if isinstance(m, type))
    fns = tuple(f for f in getattr(fx, "_autowrap_functions", ()) if callable(f))
    return mods, fns


def is_batchnorm_act(mod: nn.Module) -> bool:
    """A BatchNorm fused with its activation (timm's BatchNormAct2d family: a BatchNorm
    subclass whose own ``forward`` applies ``self.act`` after normalizing). Traced as one call
    so it is still seen, and corrected, as a BatchNorm; pairs treat it as BatchNorm then ``act``."""
    return isinstance(mod, BATCHNORM_MODULES) and own_forward(mod) and isinstance(getattr(mod, "act", None), nn.Module)


def structural_copy(model: nn.Module, *, copy_tensors: bool = False, keep: Iterable[torch.Tensor] = ()) -> nn.Module:
    """A copy of ``model``'s modules and Python state that shares its parameters and buffers.

    Tracing runs ``forward`` with Proxies; code that caches values on ``self`` (timm's attention
    bias cache keyed by ``str(device)``) would leave Proxies in the user's model. Tracing this
    copy leaves the user's model untouched; tensors are not copied (tracing only reads them).
    With ``copy_tensors`` it is a full deep copy (but for the tensors in ``keep``) that also
    copies cached non-leaf tensors, which ``copy.deepcopy`` refuses.
    """
    memo: dict[int, Any] = {id(t): t for t in keep}

    def cached(value: Any, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            if id(value) not in memo:
                memo[id(value)] = value.detach().clone() if copy_tensors else value
        elif depth < 4 and isinstance(value, (dict, list, tuple, set)):
            for v in (value.values() if isinstance(value, dict) else value):
                cached(v, depth + 1)

    for mod in model.modules():
        for key, value in vars(mod).items():
            if key in ("_parameters", "_buffers"):
                if not copy_tensors:
                    memo.update((id(t), t) for t in value.values() if t is not None)
            elif key != "_modules":
                cached(value)
    return copy.deepcopy(model, memo)


_TORCH_DIR = os.path.dirname(torch.__file__)
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the dfmpc_fx package


class _InplaceAddProxy(Proxy):
    """Records ``a += b`` as ``operator.iadd`` (fx's Proxy falls back to ``a + b``).

    ResNets write ``out += identity``: in place in eager mode, a fresh activation-sized buffer
    per block after a plain fx trace. At batch 32 that made the traced resnet50 7% slower than
    the eager one; recording the in-place add keeps it within 2% and the code is the user's own
    (fx renders it as ``a += b``, which TorchScript and torch.export accept).
    """

    def __iadd__(self, other: Any) -> Proxy:
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


class _LeafTracer(Tracer):
    """Standard fx tracer that also keeps user-listed module types or qualified names opaque."""

    def proxy(self, node: Node) -> Proxy:
        return _InplaceAddProxy(node, self)

    def __init__(self, leaf_modules: Iterable[LeafSpec] = ()) -> None:
        timm_leaves, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=timm_functions)
        self.leaf_types = tuple(x for x in leaf_modules if isinstance(x, type)) + timm_leaves
        self.leaf_names = {x for x in leaf_modules if isinstance(x, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if isinstance(m, WEIGHTED_MODULES) or is_batchnorm_act(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _offending_frame(exc: BaseException) -> Optional[str]:
    """The deepest frame of the user's code (not torch's, not ours) in the traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path.startswith(_TORCH_DIR) or path.startswith(_PKG_DIR):
            continue
        line = frame.line or linecache.getline(frame.filename, frame.lineno).strip()
        return f'{frame.filename}:{frame.lineno} in {frame.name}: "{line}"'
    return None


def literal_defaults(model: nn.Module) -> dict[str, Any]:
    """``forward``'s parameters whose default is ``None`` or a plain literal (bool, int, float,
    str): ``mask=None``, ``is_causal=False``, ``embed=False``.

    fx would trace them as Proxies, so ``if mask is not None:`` takes the branch the default
    call never takes, and the traced model then fails on the very call it was traced for
    (timm's Hiera: ``'NoneType' object has no attribute 'view'``), and ``if flag:`` cannot be
    traced at all. Traced as their defaults instead, they stay in the signature, and fx inserts
    a check that fails loudly if a caller passes another value (use ``output="module"`` to keep
    the model's own forward for such calls)."""
    import inspect

    try:
        params = inspect.signature(type(model).forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and (p.default is None or type(p.default) in (bool, int, float, str))}


def trace_model(
    model: nn.Module,
    concrete_args: Optional[dict[str, Any]] = None,
    leaf_modules: Iterable[LeafSpec] = (),
) -> GraphModule:
    """Symbolically trace ``model`` (standard modules stay leaves) into a GraphModule.

    The GraphModule keeps the qualified names of the model's submodules, which is what lets the
    compressed modules be swapped back into the original module tree. Parameters of ``forward``
    that default to ``None`` or a literal are traced at their default (see
    :func:`literal_defaults`) unless ``concrete_args`` says otherwise.

    Raises:
        TraceError: naming the offending line and the two remedies (``concrete_args`` for
            control flow on inputs, ``leaf_modules`` for submodules that cannot be traced).
    """
    leaf_modules = tuple(leaf_modules or ())
    for spec in leaf_modules:
        if not isinstance(spec, (str, type)):
            raise TypeError(f"leaf_modules entries must be module types or qualified names, got {spec!r}")
    tracer = _LeafTracer(leaf_modules)
    concrete_args = {**literal_defaults(model), **(concrete_args or {})} or None
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, AttributeError...
        where = _offending_frame(exc)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            + (f"  offending code: {where}\n" if where else "")
            + "  Remedies: (1) pass concrete_args={'arg_name': value} to fix arguments that drive "
            "Python control flow; (2) pass leaf_modules=[SubmoduleType or 'qualified.name'] so the "
            "untraceable submodule is kept as one opaque call (it is then left unquantized)."
        ) from exc
    for node in graph.nodes:
        # fx renders annotations such as ``x: torch.Tensor`` as aliases (``_torch_Tensor_``)
        # that TorchScript cannot resolve; every value here is a Tensor or a plain Python value.
        node.type = None
    name = type(model).__name__
    return GraphModule(tracer.root, graph, name)
