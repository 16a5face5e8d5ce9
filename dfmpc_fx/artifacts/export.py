"""Export of compressed models to formats that load without dfmpc_fx.

Three formats, each written, loaded back and checked against the model before returning:

- :func:`export_torchscript`: a TorchScript file (``torch.jit.load``).
- :func:`export_program`: a ``torch.export.ExportedProgram`` (optionally saved as ``.pt2``,
  reloaded with ``torch.export.load``).
- :func:`export_onnx`: an ONNX file, checked in onnxruntime.

By default (``packed=True``) the exported artifact is the *packed* model (:func:`dfmpc_fx.pack_model`):
quantized weights stored as bit-packed ``uint8`` codes plus scales, dequantized inside the
graph, so the file is about the theoretical compressed size. The file's size is then written
to the report (``get_report(qmodel).artifact_bytes``). With the opt-in ``packed=False`` the
fake-quant float weights are exported (same outputs, float-sized file).

Files written here are byte-identical for the same input model (in a fresh process; TorchScript
mangles class names when the same classes are scripted twice in one process): the random
``.data/serialization_id`` record that torch writes into its zip archives is replaced by a
digest of the archive's content, and archives are written through a file object so that their
inner folder name does not depend on the file name.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import DFMPCError

PathLike = Union[str, os.PathLike]

__all__ = ["ExportError", "export_torchscript", "export_program", "export_onnx", "EXPORT_SUFFIXES",
           "export_format_for", "export_as"]

ARTIFACTS_KEY = "dfmpc_artifacts"
_SERIALIZATION_ID = ".data/serialization_id"


class ExportError(DFMPCError, RuntimeError):
    """The exported artifact could not be produced or does not match the model."""


def _as_tuple(example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple, list, dict, namedtuple), in order."""
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _check_match(reference: Any, got: Any, atol: float, what: str, rtol: float = 0.0) -> float:
    """Max abs difference over all output tensors; :class:`ExportError` when an output's max abs
    difference exceeds ``atol + rtol * max|reference|`` (the tolerance grows with the output's
    scale: float32 kernels that sum in another order differ relative to the magnitude)."""
    ref, out = _leaves(reference), _leaves(got)
    if len(ref) != len(out):
        raise ExportError(f"{what} returns {len(out)} tensors, the model {len(ref)}")
    worst = 0.0
    for i, (r, g) in enumerate(zip(ref, out)):
        g = torch.as_tensor(g)
        if tuple(r.shape) != tuple(g.shape):
            raise ExportError(f"{what} output {i} has shape {tuple(g.shape)}, the model's {tuple(r.shape)}")
        if not r.numel():
            continue
        scale = 0.0
        if r.is_floating_point():
            finite = torch.isfinite(r)
            if not torch.equal(finite, torch.isfinite(g.to(r.dtype))):
                raise ExportError(f"{what} output {i} has NaN/Inf where the model's has none (or the reverse)")
            if bool(finite.any()):
                rf, gf = r[finite].double(), g.to(r.dtype)[finite].double()
                diff, scale = float((rf - gf).abs().max()), float(rf.abs().max())
            else:
                diff = 0.0
        else:
            diff = float((r.double() - g.double()).abs().max())
        tol = atol + rtol * scale
        if not diff <= tol:
            extra = f" = {atol:g} + {rtol:g} x max|output| {scale:.3g}" if rtol and scale else ""
            raise ExportError(f"{what} output differs from the model by {diff:.3g} (> {tol:.3g}{extra})")
        worst = max(worst, diff)
    return worst


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line[:400]}"


def _prepare(qmodel: nn.Module, packed: bool) -> nn.Module:
    """The module to export: ``qmodel`` itself, or its packed copy."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(qmodel).__name__}")
    if not packed:
        return qmodel.eval()
    from .packed import PackError, is_packed, pack_model

    if is_packed(qmodel):
        return qmodel.eval()
    try:
        return pack_model(qmodel).eval()
    except PackError as exc:
        raise ExportError(f"cannot pack the model for export: {exc}") from exc


def _record_artifact(qmodel: nn.Module, fmt: str, paths: Sequence[Path], model: nn.Module, max_abs_diff: float) -> int:
    """Write the artifact's size into ``qmodel.meta`` (the report's ``artifact_bytes`` for a
    packed artifact, and ``meta['dfmpc_artifacts'][fmt]`` in every case). Returns the size."""
    from .packed import is_packed

    packed = is_packed(model)
    size = sum(p.stat().st_size for p in paths if p.exists())
    meta = getattr(qmodel, "meta", None)
    if isinstance(meta, dict):
        meta.setdefault(ARTIFACTS_KEY, {})[fmt] = {"path": str(paths[0]), "bytes": size, "packed": packed,
                                                   "max_abs_diff": max_abs_diff}
        report = meta.get("dfmpc_report")
        if packed and isinstance(report, dict):
            report["artifact_bytes"] = size
    return size


_FINAL_LINE = re.compile(rb"^  [A-Za-z_][A-Za-z0-9_]* : Final\[.*$")


def _sorted_final_runs(code: bytes) -> bytes:
    """TorchScript declares module constants (``  name : Final[T] = v`` lines) in Python set
    order, which changes with the string hash seed; sort each run of such lines (same bytes,
    same length, meaning unchanged)."""
    lines = code.split(b"\n")
    out: list[bytes] = []
    run: list[bytes] = []
    for line in lines:
        if _FINAL_LINE.match(line):
            run.append(line)
            continue
        out.extend(sorted(run))
        run = []
        out.append(line)
    out.extend(sorted(run))
    return b"\n".join(out)


_ALIGN = 64  # torch aligns stored records to 64 bytes (what torch.load(mmap=True) needs)


def make_zip_deterministic(path: PathLike) -> None:
    """Rewrite a torch zip archive so that its bytes depend on its content only.

    torch's archives vary between runs of the same program in two places: the
    ``.data/serialization_id`` record (random), and in TorchScript code records the order of
    the ``Final`` constant declarations (Python set order, which follows the per-process string
    hash seed). This rewrites the archive with the same records in the same order, the code
    constant declarations sorted, the id replaced by a digest of the other records, fixed
    timestamps, the same compression per record, and stored records aligned to 64 bytes as torch
    writes them. Files that are not zip archives are left alone.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as zf:
        records = [(info, zf.read(info)) for info in zf.infolist()]
    digest = hashlib.sha256()
    normalized = []
    for info, content in records:
        if "/code/" in info.filename and info.filename.endswith(".py"):
            content = _sorted_final_runs(content)
        if not info.filename.endswith(_SERIALIZATION_ID):
            digest.update(info.filename.encode() + b"\0" + hashlib.sha256(content).digest())
        normalized.append((info, content))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", allowZip64=True) as out:
        for info, content in normalized:
            if info.filename.endswith(_SERIALIZATION_ID):
                n = max(len(content), 1)
                content = str(int(digest.hexdigest(), 16) % 10**n).zfill(n).encode()
            zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = info.compress_type
            zi.external_attr = info.external_attr
            if info.compress_type == zipfile.ZIP_STORED:
                name_len = len(info.filename.encode("utf-8"))
                start = buf.tell() + 30 + name_len + 4
                pad = (-start) % _ALIGN
                zi.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            out.writestr(zi, content)
    path.write_bytes(buf.getvalue())


def export_torchscript(
    qmodel: nn.Module,
    path: PathLike,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    atol: float = 1e-5,
    packed: bool = True,
    rtol: float = 1e-6,
) -> Path:
    """Write ``qmodel`` as TorchScript to ``path`` and check the file reproduces it.

    Scripting is tried first (keeps batch size and other shapes dynamic); if the code does not
    script, tracing with ``example_inputs`` is used, with a warning. The saved file is loaded
    back and compared on ``example_inputs`` (max abs diff <= ``atol + rtol * max|output|``)
    before returning.

    ``packed=True`` (the default) exports the packed model (bit-packed integer codes, dequantized in
    ``forward``): the file loads with plain ``torch.jit.load`` (no dfmpc_fx needed), is about the
    theoretical compressed size, and its size is recorded as the report's ``artifact_bytes``.
    """
    inputs = _as_tuple(example_inputs)
    model = _prepare(qmodel, packed)
    with torch.no_grad():
        reference = qmodel.eval()(*inputs)
        try:
            scripted = torch.jit.script(model)
        except Exception as exc:  # scripting limits: fall back to tracing
            warnings.warn(f"torch.jit.script failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "exporting with torch.jit.trace, whose shapes are fixed by example_inputs")
            try:
                scripted = torch.jit.trace(model, inputs)
            except Exception as exc2:
                raise ExportError(f"neither torch.jit.script nor torch.jit.trace could export the model: {exc2}") from exc2
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: the archive's inner folder is "archive", not the file name
            torch.jit.save(scripted, f)
        make_zip_deterministic(path)
        loaded = torch.jit.load(str(path), map_location="cpu")
        diff = _check_match(reference, loaded(*inputs), atol, "TorchScript", rtol)
    _record_artifact(qmodel, "torchscript", [path], model, diff)
    return path


def _dynamic_batch_shapes(inputs: tuple) -> Any:
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in inputs)


def export_program(
    qmodel: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    packed: bool = True,
    path: Optional[PathLike] = None,
    dynamic_batch: bool = False,
    strict: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-6,
) -> "torch.export.ExportedProgram":
    """``torch.export`` the model and check the program reproduces it on ``example_inputs``.

    ``path``: also save the program (``torch.export.save``, conventionally ``.pt2``), load it
    back with ``torch.export.load`` and check that too. ``dynamic_batch``: mark dim 0 of every
    input dynamic (otherwise the shapes of ``example_inputs`` are baked in). ``packed``: export
    the packed model (uint8 codes are constants of the program; see :func:`export_torchscript`).

    Raises:
        ExportError: the model does not export (the message names the torch.export error) or
            the program's outputs differ by more than ``atol + rtol * max|output|``.
    """
    inputs = _as_tuple(example_inputs)
    model = _prepare(qmodel, packed)
    with torch.no_grad():
        reference = qmodel.eval()(*inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(
                model, inputs, dynamic_shapes=_dynamic_batch_shapes(inputs) if dynamic_batch else None, strict=strict
            )
    except Exception as exc:
        raise ExportError(
            f"torch.export could not export {type(qmodel).__name__}: {_first_line(exc)}"
            + ("; try dynamic_batch=False" if dynamic_batch else "")
        ) from exc
    try:
        with torch.no_grad():
            diff = _check_match(reference, program.module()(*inputs), atol, "ExportedProgram", rtol)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"the ExportedProgram of {type(qmodel).__name__} does not run: {_first_line(exc)}") from exc
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _strip_provenance(program)
            with open(path, "wb") as f:
                torch.export.save(program, f)
            make_zip_deterministic(path)
            loaded = torch.export.load(str(path))
            with torch.no_grad():
                got = loaded.module()(*inputs)
        except Exception as exc:
            raise ExportError(f"saving/reloading the ExportedProgram at {path} failed: {_first_line(exc)}") from exc
        diff = _check_match(reference, got, atol, f"ExportedProgram reloaded from {path}", rtol)
        _record_artifact(qmodel, "program", [path], model, diff)
    return program


def _strip_provenance(program: "torch.export.ExportedProgram") -> None:
    """Drop node provenance metadata that records Python object ids (``from_node``: graph_id),
    so that a saved ``.pt2`` is the same bytes for the same model."""
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            for node in graph.nodes:
                node.meta.pop("from_node", None)


def export_onnx(
    qmodel: nn.Module,
    path: PathLike,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    packed: bool = True,
    dynamic_batch: bool = False,
    opset_version: Optional[int] = None,
    atol: float = 1e-4,
    program: Optional["torch.export.ExportedProgram"] = None,
    rtol: float = 1e-5,
) -> Path:
    """Write ``qmodel`` as ONNX (torch.export-based exporter) and check it in onnxruntime.

    The file is a single ``.onnx`` (weights inside, no external data file) as long as it stays
    under protobuf's 2 GB limit. The model is run in onnxruntime (CPU) on ``example_inputs`` and
    compared with ``qmodel``: max abs diff <= ``atol + rtol * max|output|`` (1e-4 for outputs of
    order 1; models whose outputs are huge, e.g. random weights blowing up to 1e12, are compared
    relative to that scale, since onnxruntime's float32 kernels sum in another order).
    ``packed=True`` exports the packed model:
    unpacking is ``BitwiseAnd`` on uint8 (opset >= 18), cast and multiply, and the file stays about
    the compressed size (the graph is exported without the exporter's constant folding, which
    would store small layers as float again; onnxruntime folds the unpacking when it loads the
    model, so inference does not unpack on every call). Node debug metadata (Python stack traces
    with local paths, fx node text) is dropped: it would be about a third of a packed file.

    ``program``: the :class:`torch.export.ExportedProgram` that :func:`export_program` returned
    for the same model, ``packed`` flag and inputs; it is converted instead of exporting again
    (torch.export is the slow half of an ONNX export). ``dynamic_batch`` is then the program's.

    Raises:
        ExportError: onnx/onnxruntime missing, the exporter fails (the message names the
            unsupported operator or the torch.export error), or outputs differ by more than the
            tolerance.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError("export_onnx needs onnx, onnxscript and onnxruntime: pip install onnx onnxscript onnxruntime") from exc
    inputs = _as_tuple(example_inputs)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ExportError("export_onnx supports tensor inputs only")
    model = _prepare(qmodel, packed)
    with torch.no_grad():
        reference = qmodel.eval()(*inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    if data_path.exists():
        data_path.unlink()
    big = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) > 1_800_000_000
    packed_graph = _is_packed(model)
    kwargs: dict[str, Any] = dict(dynamo=True, verbose=False, optimize=not packed_graph)
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    if dynamic_batch and program is None:
        kwargs["dynamic_shapes"] = _dynamic_batch_shapes(inputs)
    if program is not None and not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"program must be a torch.export.ExportedProgram, got {type(program).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program if program is not None else model, inputs, **kwargs)
            if packed_graph:
                _optimize_keeping_packed(onnx_program)
            _drop_node_metadata(onnx_program)
            onnx_program.save(str(path), external_data=big)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {type(qmodel).__name__}: {_onnx_reason(exc)}") from exc
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
        got = [torch.from_numpy(a) for a in session.run(None, feeds)]
    except Exception as exc:
        raise ExportError(f"onnxruntime could not run the exported {path}: {_first_line(exc)}") from exc
    diff = _check_match(reference, got, atol, "ONNX (onnxruntime)", rtol)
    _record_artifact(qmodel, "onnx", [path, data_path], model, diff)
    return path


def _drop_node_metadata(onnx_program: Any) -> None:
    """Remove per-node debug metadata (stack traces, fx node text, name scopes)."""
    try:
        graphs = [onnx_program.model.graph] + [f for f in onnx_program.model.functions.values()]
        for graph in graphs:
            for node in graph:
                node.metadata_props.clear()
    except Exception:  # pragma: no cover - onnx_ir layout changed: keep the metadata
        return


def _optimize_keeping_packed(program: Any) -> None:
    """The exporter's optimizer, except that the unpacking of packed layers is not folded.

    Its constant folding would evaluate ``BitwiseAnd(packed, mask) -> Cast -> Mul ...`` for every
    layer whose packed buffer is small (<= 8192 bytes) and store the float weight instead. Here
    ``BitwiseAnd`` is never folded, so everything downstream of it stays computed; onnxruntime
    folds it in memory when it creates a session, so inference does not unpack on every call.
    Without a usable optimizer the graph is left unoptimized (larger file, same outputs).
    """
    try:
        from onnxscript.optimizer import optimize_ir
    except ImportError:  # pragma: no cover - onnxscript layout changed
        return
    try:
        optimize_ir(program.model, should_fold=lambda node: False if node.op_type == "BitwiseAnd" else None)
    except TypeError:  # pragma: no cover - no should_fold in this onnxscript
        return


def _is_packed(model: nn.Module) -> bool:
    from .packed import is_packed

    return is_packed(model)


def _onnx_reason(exc: BaseException) -> str:
    """The informative line of a torch.onnx error (the missing operator, or the export error)."""
    text = str(exc)
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("<class") and ("DispatchError" in s or "Unsupported" in s or "TorchExportError" in s):
            return s[:400]
    for line in text.splitlines():
        if "No ONNX function" in line or "Unsupported" in line:
            return line.strip()[:400]
    cause = exc.__cause__
    if cause is not None:
        return _first_line(cause)
    return _first_line(exc)


# The export formats and their conventional file suffixes (the CLI and the callback use both).
EXPORT_SUFFIXES: dict[str, str] = {"torchscript": ".ts", "program": ".pt2", "onnx": ".onnx"}


def export_format_for(path: PathLike) -> str:
    """The format a file name asks for: ``.pt2`` -> program, ``.onnx`` -> onnx, else torchscript."""
    suffix = Path(path).suffix.lower()
    return next((fmt for fmt, sfx in EXPORT_SUFFIXES.items() if sfx == suffix), "torchscript")


def export_as(
    qmodel: nn.Module,
    path: PathLike,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    fmt: str,
    *,
    packed: bool = True,
) -> float:
    """Write ``qmodel`` to ``path`` in ``fmt`` (a key of :data:`EXPORT_SUFFIXES`) with the matching
    exporter, which reloads the file and raises :class:`ExportError` if it does not match.
    Returns the max abs difference the exporter measured."""
    inputs = _as_tuple(example_inputs)
    if fmt == "torchscript":
        export_torchscript(qmodel, path, inputs, packed=packed)
    elif fmt == "program":
        export_program(qmodel, inputs, packed=packed, path=path)
    elif fmt == "onnx":
        export_onnx(qmodel, path, inputs, packed=packed)
    else:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_SUFFIXES)}")
    record = ((getattr(qmodel, "meta", None) or {}).get(ARTIFACTS_KEY) or {}).get(fmt) or {}
    return float(record.get("max_abs_diff", float("nan")))
