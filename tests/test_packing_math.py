"""Bit packing: layout, density, exact round trip for every bit width."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfmpc_fx.artifacts.packed import PackError, pack_codes, packed_nbytes, plane_layout, unpack_codes


def test_plane_layout_is_binary_decomposition():
    assert plane_layout(2) == [(2, 0)]
    assert plane_layout(3) == [(2, 0), (1, 2)]
    assert plane_layout(4) == [(4, 0)]
    assert plane_layout(6) == [(4, 0), (2, 4)]
    assert plane_layout(8) == [(8, 0)]
    assert plane_layout(16) == [(8, 0), (8, 8)]
    for bits in range(1, 17):
        assert sum(w for w, _ in plane_layout(bits)) == bits
    with pytest.raises(ValueError):
        plane_layout(17)


def test_four_2bit_codes_per_byte_little_endian():
    codes = torch.tensor([1, 2, 3, 0, 3])
    packed = pack_codes(codes, 2)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 3]


def test_two_4bit_codes_per_byte():
    assert pack_codes(torch.tensor([0xA, 0x5, 0xF]), 4).tolist() == [0x5A, 0x0F]


@pytest.mark.parametrize("bits", range(1, 17))
def test_dense_size(bits):
    numel = 1000
    assert packed_nbytes(numel, bits) == sum(math.ceil(numel / (8 // w)) for w, _ in plane_layout(bits))
    assert packed_nbytes(numel, bits) <= math.ceil(numel * bits / 8) + len(plane_layout(bits))
    assert pack_codes(torch.zeros(numel, dtype=torch.int64), bits).numel() == packed_nbytes(numel, bits)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 16), numel=st.integers(0, 70), seed=st.integers(0, 2**31 - 1))
def test_round_trip(bits, numel, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (numel,), generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_nbytes(numel, bits)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_extremes_round_trip():
    for bits in range(1, 17):
        codes = torch.tensor([0, 2**bits - 1] * 9)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.numel()), codes)


def test_out_of_range_codes_refused():
    with pytest.raises(PackError, match="must lie in"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(PackError):
        pack_codes(torch.tensor([-1]), 8)
