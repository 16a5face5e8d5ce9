"""Bit-packing arithmetic of low-bit codes, as plain tensor functions (no modules, no fx).

Storage layout (dense for every bit width 1..16): a ``b``-bit code ``u`` (``0 <= u < 2**b``) is
split into bit fields whose widths are powers of two, the binary decomposition of ``b`` greatest
first, with 16 = 8 + 8 (2 -> [2], 3 -> [2, 1], 4 -> [4], 6 -> [4, 2], 8 -> [8]). Each field width
``f`` is a *plane*: ``8 // f`` fields per byte, code ``i`` (row-major order) in byte
``i // (8 // f)`` at bit ``f * (i % (8 // f))``. :mod:`dfmpc_fx.artifacts.packed` documents the
modules built on it. ``_unpack`` is TorchScript-compatible: the packed modules call it in
``forward``.
"""
import math
from typing import List

import torch
from torch import Tensor

from ..errors import PackError

__all__ = ["pack_codes", "unpack_codes", "plane_layout", "packed_nbytes"]


# --- layout ----------------------------------------------------------------------------------
def plane_layout(bits: int) -> list[tuple[int, int]]:
    """``[(field width f, bit offset o), ...]`` of the planes that store a ``bits``-bit code."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits} out of range 1..16")
    planes: list[tuple[int, int]] = []
    offset, left = 0, bits
    for width in (8, 8, 4, 2, 1):
        if left >= width:
            planes.append((width, offset))
            offset += width
            left -= width
    return planes


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of the packed buffer for ``numel`` codes of ``bits`` bits."""
    return sum(math.ceil(numel / (8 // f)) for f, _ in plane_layout(bits))


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned integer ``codes`` (any shape, values in ``[0, 2**bits)``) into ``uint8``.

    Row-major order of ``codes``; see the module docstring for the layout.
    """
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise PackError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits, got [{int(flat.min())}, {int(flat.max())}]")
    out = []
    for width, offset in plane_layout(bits):
        per_byte = 8 // width
        field = (flat >> offset) & ((1 << width) - 1)
        pad = (-field.numel()) % per_byte
        if pad:
            field = torch.cat([field, field.new_zeros(pad)])
        field = field.view(-1, per_byte)
        shifts = torch.arange(per_byte, dtype=torch.int64, device=flat.device) * width
        out.append((field << shifts).sum(dim=1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8, device=flat.device)


def _plane_tables(bits: int, numel: int) -> tuple[list[int], list[int], list[int], list[float]]:
    """Per plane: byte count and fields per byte; flattened: bit masks and power-of-two factors."""
    nbytes: list[int] = []
    fields: list[int] = []
    masks: list[int] = []
    factors: list[float] = []
    for width, offset in plane_layout(bits):
        per_byte = 8 // width
        nbytes.append(math.ceil(numel / per_byte))
        fields.append(per_byte)
        for j in range(per_byte):
            masks.append(((1 << width) - 1) << (width * j))
            factors.append(2.0 ** (offset - width * j))  # (byte & mask) * factor = field << offset
    return nbytes, fields, masks, factors


def _unpack(packed: Tensor, nbytes: List[int], fields: List[int], masks: Tensor, factors: Tensor,
            numel: int) -> Tensor:
    """Unsigned codes, ``numel`` of them in row-major order, as floats (dtype of ``factors``).

    Exact: every field is masked out of its byte, cast, and scaled by a power of two, and the
    planes are summed (integers < 2**16). Slices that would be no-ops are skipped, which keeps
    exported graphs small (single-plane layers: and, cast, mul, reshape).
    """
    out = factors  # placeholder (TorchScript needs a value of the type); overwritten on plane 0
    start = 0
    k = 0
    for i in range(len(nbytes)):
        n = fields[i]
        seg = packed
        if nbytes[i] != packed.shape[0]:
            seg = packed[start:start + nbytes[i]]
        start += nbytes[i]
        m = masks
        s = factors
        if n != masks.shape[0]:
            m = masks[k:k + n]
            s = factors[k:k + n]
        k += n
        vals = torch.bitwise_and(seg.unsqueeze(1), m).to(factors.dtype) * s
        if len(nbytes) > 1 or nbytes[i] * n != numel:  # (one plane without padding: the caller reshapes)
            vals = vals.reshape(-1)
            if vals.shape[0] != numel:
                vals = vals[:numel]
        if i == 0:
            out = vals
        else:
            out = out + vals
    return out


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: flat ``int64`` codes."""
    nbytes, fields, masks, factors = _plane_tables(bits, numel)
    return _unpack(packed, nbytes, fields, torch.tensor(masks, dtype=torch.uint8, device=packed.device),
                   torch.tensor(factors, dtype=torch.float64, device=packed.device), numel).reshape(-1).to(torch.int64)
