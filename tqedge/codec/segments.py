"""The segment table: how a packed code row maps to the codec's projected domain.

A TurboQuant vector is stored as one or more *segments*. Each segment is a run of ``ndim``
codes of ``bits`` bits, packed on its own (byte-aligned) at ``byte_off`` in the code row, one
scale (float16) at ``scale_idx`` in the scale row, and a codebook of ``2**bits`` values. Its
decoded values ``scale · codebook[code]`` are coordinates ``[dim_off, dim_off + ndim)`` of the
projected domain (length ``Dp``), where the query lives after ``TurboQuant.project_query``:

- an MSE segment: the rotated coordinates of one channel part, codebook = Lloyd–Max centroids;
- a QJL segment: the 1-bit signs of ``S r``, codebook = ``±sqrt(pi/2)/n``, scale = ``‖r‖``.

So every kernel is the same loop: decode a row into ``Dp`` floats, then dot with queries
(scores), accumulate with weights (value sums) or store (dequantize). The table is plain arrays
so Numba and NumPy kernels take it alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# columns of the int64 table (S, NCOL)
BITS, BYTE_OFF, DIM_OFF, NDIM, SCALE_IDX, CB_OFF, LUT_OFF = range(7)
NCOL = 7
LUT_BITS = (1, 2, 3, 4)  # widths with a byte table (b = 3: a table of 6-bit code pairs)


@dataclass(frozen=True)
class Segment:
    """One run of codes: see the module docstring."""

    bits: int
    ndim: int
    byte_off: int
    dim_off: int
    scale_idx: int
    codebook: np.ndarray  # (2**bits,) float64


@dataclass(frozen=True)
class SegmentTable:
    """Kernel-ready arrays for a list of segments.

    ``table`` int64 (S, NCOL); ``cb`` float32 flat codebooks (``CB_OFF``); ``lut`` float32 flat
    byte tables (``LUT_OFF``, -1 if none; offsets are even so pairs of floats can be copied as
    one uint64): for b in (1, 2, 4), entry ``[byte · 8/b + k]`` is the centroid of the k-th code
    in that byte; for b = 3, entry ``[v · 2 + k]`` (v a 6-bit value) is that of its k-th 3-bit code.
    """

    table: np.ndarray
    cb: np.ndarray
    lut: np.ndarray
    dp: int  # projected dimension (sum of ndim)


def byte_lut(codebook: np.ndarray, bits: int) -> np.ndarray:
    """(256 · 8/bits,) float32: the centroids of all codes packed in each possible byte
    (b = 3: (64 · 2,), the two centroids of each 6-bit value)."""
    per = 8 // bits if bits != 3 else 2
    byte = np.arange(256 if bits != 3 else 64)[:, None]  # (V, 1)
    k = np.arange(per)[None, :]  # (1, per)
    idx = (byte >> (k * bits)) & ((1 << bits) - 1)  # (256, per)
    return np.asarray(codebook, dtype=np.float32)[idx].reshape(-1)


def build_table(segments: list[Segment]) -> SegmentTable:
    """Flatten segments (in projected-domain order) into a :class:`SegmentTable`."""
    rows, cbs, luts = [], [], []
    cb_off = lut_off = dp = 0
    for s in segments:
        lut_at = -1
        if s.bits in LUT_BITS:
            lut = byte_lut(s.codebook, s.bits)
            luts.append(lut)
            lut_at, lut_off = lut_off, lut_off + lut.size
        rows.append((s.bits, s.byte_off, s.dim_off, s.ndim, s.scale_idx, cb_off, lut_at))
        cbs.append(np.asarray(s.codebook, dtype=np.float32))
        cb_off += s.codebook.size
        dp = max(dp, s.dim_off + s.ndim)
    table = np.asarray(rows, dtype=np.int64).reshape(-1, NCOL)
    cb = np.concatenate(cbs) if cbs else np.zeros(0, np.float32)
    lut = np.concatenate(luts) if luts else np.zeros(2, np.float32)  # even: viewed as uint64
    return SegmentTable(table, cb, lut, dp)
