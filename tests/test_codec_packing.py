"""Bit packing: round trips and the exact stream layout, against a bit-by-bit oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tqedge.codec.config import CodecConfig, bytes_per_token
from tqedge.codec.packing import pack, packed_bytes, unpack
from tqedge.errors import TqedgeError


def _oracle_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Literal reading of the spec: code j occupies stream bits [j·b, (j+1)·b), LSB first."""
    d = codes.shape[-1]
    out = np.zeros((*codes.shape[:-1], -(-d * bits // 8)), dtype=np.uint8)
    for idx in np.ndindex(codes.shape[:-1]):
        for j in range(d):
            for k in range(bits):
                i = j * bits + k
                if (int(codes[idx + (j,)]) >> k) & 1:
                    out[idx + (i >> 3,)] |= 1 << (i & 7)
    return out


@settings(max_examples=120, deadline=None)
@given(bits=st.integers(1, 8), d=st.integers(1, 70), rows=st.integers(0, 4), seed=st.integers(0, 2**32 - 1))
def test_roundtrip_and_layout(bits, d, rows, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, d), dtype=np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (rows, packed_bytes(d, bits))
    np.testing.assert_array_equal(packed, _oracle_pack(codes, bits))
    np.testing.assert_array_equal(unpack(packed, bits, d), codes)


def test_known_layouts():
    # b=4: code 2i in the low nibble of byte i
    assert pack(np.array([[0x3, 0xA]]), 4).tolist() == [[0xA3]]
    # b=3: 8 codes in 3 bytes, little-endian 24-bit word
    codes = np.arange(8)[None]
    word = sum(int(c) << (3 * j) for j, c in enumerate(range(8)))
    assert pack(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_packed_bytes_and_errors():
    assert [packed_bytes(64, b) for b in range(1, 9)] == [8, 16, 24, 32, 40, 48, 56, 64]
    assert packed_bytes(5, 3) == 2
    with pytest.raises(TqedgeError):
        pack(np.array([[4]]), 2)
    with pytest.raises(TqedgeError):
        pack(np.array([[1]]), 9)
    with pytest.raises(TqedgeError):
        unpack(np.zeros((1, 1), np.uint8), 4, 4)


def test_bytes_per_token():
    k = CodecConfig(dim=64, bits=4.0)  # 32 code bytes + 1 scale
    v = CodecConfig(dim=64, bits=3.5)  # 16 + 12 code bytes + 2 scales
    assert k.bytes_per_vector == 34 and v.bytes_per_vector == 32
    assert bytes_per_token(k, v, num_layers=30, num_kv_heads=3) == 30 * 3 * (34 + 32)
    prod = CodecConfig(dim=128, bits=3.0, qjl=True)  # 2-bit MSE (32 B) + 16 B signs + 2 scales
    assert prod.bytes_per_vector == 32 + 16 + 4
