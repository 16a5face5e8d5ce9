"""torch.fx tracing with leaf modules, concrete_args and failures that say what to do."""
from __future__ import annotations

import copy
import copyreg
import linecache
import operator
import os
import sys
import traceback
from collections import OrderedDict
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
    return _copy_module(model, memo)


#: Values a deep copy returns as they are.
_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format)


def _copies_by_default(cls: type) -> bool:
    """Whether ``copy.deepcopy`` of a ``cls`` instance is the default protocol (``__new__``, a
    copy of ``Module.__getstate__``'s dict, ``__setstate__``): nothing overridden, no slots."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and not copyreg._slotnames(cls))


def _copy_value(value: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(value, memo)``, with modules, plain dicts and atoms copied here."""
    if isinstance(value, _ATOMS):
        return value
    hit = memo.get(id(value), memo)
    if hit is not memo:
        return hit
    if isinstance(value, nn.Module):
        return _copy_module(value, memo)
    if type(value) in (dict, OrderedDict):
        out = type(value)()
        memo[id(value)] = out
        for k, v in value.items():
            out[k if isinstance(k, _ATOMS) else copy.deepcopy(k, memo)] = _copy_value(v, memo)
        return out
    if type(value) is set and not value:
        return set()
    return copy.deepcopy(value, memo)


def _copy_module(mod: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(mod, memo)`` for the module tree, equal to it in result: modules that copy
    by the default protocol are rebuilt field by field (``copy.deepcopy`` spent a tenth of a
    ResNet-50's compress time in its generic reduce machinery, 160 modules of ~25 fields each);
    any other module, and every value this does not recognise, goes to ``copy.deepcopy``."""
    hit = memo.get(id(mod), memo)
    if hit is not memo:
        return hit
    cls = type(mod)
    if not _copies_by_default(cls):
        return copy.deepcopy(mod, memo)
    new = cls.__new__(cls)
    memo[id(mod)] = new
    copy._keep_alive(mod, memo)  # as deepcopy does: the original outlives the memo's ids
    new.__setstate__({k: _copy_value(v, memo) for k, v in mod.__getstate__().items()})
    return new


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


# --- Tracing with an example input (an analysis graph, specialised to the example's shapes) ---

#: ``node.meta`` key of the shape a node's value had on the example input.
EXAMPLE_SHAPE_KEY = "example_shape"
_CONCRETE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout", "is_sparse"})


def _value_of(a: Any) -> Any:
    """The concrete value a (possibly nested) argument holds during an example trace."""
    if isinstance(a, _ProbeProxy):
        return a.value
    if isinstance(a, tuple):
        return tuple(_value_of(x) for x in a)
    if isinstance(a, list):
        return [_value_of(x) for x in a]
    if isinstance(a, dict):
        return {k: _value_of(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_value_of(a.start), _value_of(a.stop), _value_of(a.step))
    return a


class _ProbeProxy(_InplaceAddProxy):
    """A Proxy that also holds the value its node takes on the example input.

    Shapes, dtypes, lengths, truth values and integer conversions are answered from that value
    (so shape arithmetic and control flow resolve as they would on the example, and the graph
    is specialised to it); tensor ops are still recorded."""

    value: Any = None

    def __getattr__(self, k: str) -> Any:
        if k in _CONCRETE_ATTRIBUTES and isinstance(self.value, torch.Tensor):
            return getattr(self.value, k)
        return super().__getattr__(k)

    def size(self, dim: Optional[int] = None) -> Any:
        return self.value.size() if dim is None else self.value.size(dim)

    def dim(self) -> int:
        return self.value.dim()

    def numel(self) -> int:
        return self.value.numel()

    def __bool__(self) -> bool:
        return bool(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def __index__(self) -> int:
        return int(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __iter__(self) -> Any:
        return iter([self[i] for i in range(len(self.value))])

    def __contains__(self, item: Any) -> bool:
        return item in self.value

    def keys(self) -> Any:
        return self.value.keys()

    def item(self) -> Any:
        return self.value.item()

    def tolist(self) -> Any:
        return self.value.tolist()


class _ExampleTracer(_LeafTracer):
    """:class:`_LeafTracer` that runs every recorded op on the example input as it records it."""

    def __init__(self, leaf_modules: Iterable[LeafSpec], inputs: dict[str, Any]) -> None:
        super().__init__(leaf_modules)
        self.inputs = inputs
        self._evaluating = 0

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._evaluating:  # computing a leaf's value: run it, record nothing
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: Node) -> Proxy:
        return _ProbeProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Optional[str] = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        vargs, vkwargs = _value_of(args), _value_of(kwargs)
        if kind == "placeholder":
            value = self.inputs.get(str(target).lstrip("*"))
        else:
            self._evaluating += 1
            try:
                value = self._evaluate(kind, target, vargs, vkwargs)
            finally:
                self._evaluating -= 1
        if isinstance(proxy, _ProbeProxy):
            proxy.value = value
        if isinstance(value, torch.Tensor):
            proxy.node.meta[EXAMPLE_SHAPE_KEY] = tuple(value.shape)
        return proxy

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "get_attr":
            value: Any = self.root
            for part in str(target).split("."):
                value = getattr(value, part)
            return value
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return self.root.get_submodule(target)(*args, **kwargs)
        return None

    def to_bool(self, obj: Proxy) -> bool:
        return bool(_value_of(obj))

    def iter(self, obj: Proxy) -> Any:
        return iter(_value_of(obj))


class _Entry(nn.Module):
    """Root for an example trace: ``model``'s submodules under their own names, and a forward
    that calls ``model``'s forward with the traced inputs as keywords."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        object.__setattr__(self, "_target", model)
        object.__setattr__(self, "_names", names)

    def forward(self, *inputs: Any) -> Any:
        out = type(self._target).forward(self._target, **dict(zip(self._names, inputs)))
        if isinstance(out, dict):  # a ModelOutput: its tensors
            return tuple(v for v in out.values() if v is not None)
        return out


def trace_with_example(
    model: nn.Module, example: dict[str, Any], leaf_modules: Iterable[LeafSpec] = (),
) -> GraphModule:
    """An fx graph of ``model`` called as ``model(**example)``, for analysis only.

    Every op runs on the example while it is recorded, so code that reads shapes, branches on
    values or indexes buffers by a sequence length (Hugging Face models) traces; the graph is
    specialised to the example's shapes and is not a replacement for ``model``. Qualified module
    names are ``model``'s. Raises :class:`TraceError` as :func:`trace_model` does.
    """
    names = tuple(example)
    root = _Entry(model, names)
    tracer = _ExampleTracer(leaf_modules, dict(example))
    # placeholders named after the keywords
    code = "def forward(self, {0}):\n    return _Entry.forward(self, {0})\n".format(", ".join(names))
    scope: dict[str, Any] = {"_Entry": _Entry}
    exec(code, scope)  # noqa: S102 - a fixed template over the example's keyword names
    fwd = scope["forward"]
    entry_type = type(f"{type(model).__name__}Entry", (_Entry,), {"forward": fwd})
    root.__class__ = entry_type
    try:
        with torch.no_grad():
            graph = tracer.trace(root)
    except Exception as exc:
        where = _offending_frame(exc)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__} on its example input: {type(exc).__name__}: {exc}\n"
            + (f"  offending code: {where}\n" if where else "")
        ) from exc
    for node in graph.nodes:
        node.type = None
    return GraphModule(tracer.root, graph, type(model).__name__)
