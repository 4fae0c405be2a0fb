"""b-bit code packing (b = 1..8) and exact byte accounting.

Layout of one packed row of ``d`` codes of ``b`` bits: a little-endian bit stream of
``packed_bytes(d, b) = ceil(d·b/8)`` bytes. Code ``j`` occupies stream bits ``[j·b, (j+1)·b)``,
least significant bit first, and stream bit ``i`` is ``(byte[i >> 3] >> (i & 7)) & 1``. Unused
high bits of the last byte are zero. So b=4 puts code 2i in the low nibble of byte i, b=2 puts
code 4i+k in bits 2k..2k+1, b=8 is one code per byte, and b=3 packs 8 codes into 3 bytes.

Implemented with ``numpy.packbits`` / ``numpy.unpackbits`` (``bitorder="little"``).
"""

from __future__ import annotations

import numpy as np

from tqedge.errors import TqedgeError


def _check_bits(bits: int) -> int:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise TqedgeError(f"code width must be an integer number of bits in 1..8, got {bits!r}")
    return int(bits)


def packed_bytes(dim: int, bits: int) -> int:
    """Bytes of one packed row of ``dim`` codes of ``bits`` bits: ``ceil(dim·bits/8)``."""
    bits = _check_bits(bits)
    if dim < 0:
        raise TqedgeError(f"number of codes must be non-negative, got {dim}")
    return (int(dim) * bits + 7) // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes into the little-endian bit stream.

    Args:
        codes: integer array (..., d), every value < 2**bits.
        bits: code width 1..8.

    Returns:
        uint8 array (..., ceil(d·bits/8)).
    """
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise TqedgeError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    c = codes.astype(np.uint8, copy=False)
    lead, d = c.shape[:-1], c.shape[-1]
    shifts = np.arange(bits, dtype=np.uint8)  # (b,)
    stream = ((c[..., None] >> shifts) & 1).reshape(*lead, d * bits)  # (..., d·b) bits, LSB first
    return np.packbits(stream, axis=-1, bitorder="little")  # (..., B)


def unpack(packed: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Inverse of :func:`pack`.

    Args:
        packed: uint8 array (..., B) with B ≥ ceil(dim·bits/8).
        bits: code width 1..8.
        dim: number of codes per row.

    Returns:
        uint8 array (..., dim).
    """
    bits = _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    need = packed_bytes(dim, bits)
    if packed.shape[-1] < need:
        raise TqedgeError(f"packed rows have {packed.shape[-1]} bytes, {dim} codes of {bits} bits need {need}")
    lead = packed.shape[:-1]
    stream = np.unpackbits(packed[..., :need], axis=-1, count=dim * bits, bitorder="little")  # (..., d·b)
    weights = (1 << np.arange(bits)).astype(np.uint16)  # (b,)
    return (stream.reshape(*lead, dim, bits) @ weights).astype(np.uint8)  # (..., d)
