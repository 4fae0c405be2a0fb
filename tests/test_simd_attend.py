"""The prefill tiles' IR products (``tqedge.codec.simd_attend``) against float64 NumPy written
from their definitions: every row count a call takes (1 to ``ROWS``), inputs of any length,
partial value chunks left alone, and accumulation into what ``acc`` already holds."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
from numba import njit  # noqa: E402

from tqedge.codec import simd_attend as SA  # noqa: E402


@njit
def _scores(q, kt, out):
    d = q.shape[1]
    qs, outs = q.strides[0], out.strides[0]
    r = 0
    while r + SA.ROWS <= q.shape[0]:
        SA.tile_scores(0, q.ctypes.data + r * qs, qs, kt.ctypes.data, d, out.ctypes.data + r * outs, outs)
        r += SA.ROWS
    while r < q.shape[0]:
        SA.tile_scores(1, q.ctypes.data + r * qs, qs, kt.ctypes.data, d, out.ctypes.data + r * outs, outs)
        r += 1


@njit
def _pv(p, n, v, acc, nc):
    ps, vs, accs = p.strides[0], v.strides[0], acc.strides[0]
    r = 0
    while r + SA.ROWS <= p.shape[0]:
        SA.tile_pv(0, p.ctypes.data + r * ps, ps, n, v.ctypes.data, vs, acc.ctypes.data + r * accs, accs, nc)
        r += SA.ROWS
    while r < p.shape[0]:
        SA.tile_pv(1, p.ctypes.data + r * ps, ps, n, v.ctypes.data, vs, acc.ctypes.data + r * accs, accs, nc)
        r += 1


@pytest.mark.parametrize("rows", sorted({1, 3, SA.ROWS, SA.ROWS + 1, 2 * SA.ROWS + 3}))
@pytest.mark.parametrize("d", [1, 12, 64, 80])
def test_tile_scores_are_the_dot_products(rows, d):
    rng = np.random.default_rng(rows * 100 + d)
    q = rng.standard_normal((rows, d)).astype(np.float32)
    kt = rng.standard_normal((d, SA.KEYS)).astype(np.float32)
    out = np.full((rows, SA.KEYS), np.nan, np.float32)
    _scores(q, kt, out)
    np.testing.assert_allclose(out, q.astype(np.float64) @ kt.astype(np.float64), rtol=1e-5, atol=1e-5 * np.sqrt(d))


@pytest.mark.parametrize("rows", sorted({1, 2, SA.ROWS, SA.ROWS + 1, 2 * SA.ROWS + 3}))
@pytest.mark.parametrize("n,dv", [(1, 64), (37, 64), (64, 128), (64, 80), (5, 256)])
def test_tile_pv_adds_the_weighted_value_rows(rows, n, dv):
    rng = np.random.default_rng(rows * 1000 + n * 10 + dv)
    p = rng.random((rows, SA.KEYS)).astype(np.float32)
    v = rng.standard_normal((n + 3, dv)).astype(np.float32)
    acc = rng.standard_normal((rows, dv)).astype(np.float32)
    nc = dv // SA.KEYS
    want = acc.astype(np.float64)
    want[:, :nc * SA.KEYS] += p[:, :n].astype(np.float64) @ v[:n, :nc * SA.KEYS].astype(np.float64)
    _pv(p, n, v, acc, nc)
    np.testing.assert_allclose(acc, want, rtol=1e-5, atol=1e-5 * np.sqrt(n))
    assert np.array_equal(acc[:, nc * SA.KEYS:], want[:, nc * SA.KEYS:].astype(np.float32))  # the tail untouched
