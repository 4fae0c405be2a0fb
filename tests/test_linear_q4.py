"""The Q4_1 linear kernel (tqedge.codec.simd_linear via kernels_linear.q4_1_gemv) against NumPy
written from the spec: GGUF Q4_1 blocks (float16 d, float16 m, 16 bytes of nibbles: input j low,
j + 16 high), the input quantized to int8 per block of 32 (dx = max|x| / 127, xq = rint(x / dx))
with each block's exact sum kept for the m term. Integer sums are exact, so only float32
summation order separates kernel and reference."""

import numpy as np
import pytest

from tqedge.codec import simd_linear as L
from tqedge.codec.kernels_linear import interleave_q4_1, q4_1_gemv, q4_1_gemv_x4, quantize_row_q8
from tqedge.codec.numba_runtime import njit

Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])


def random_q4_1(rng, n, k):
    blocks = np.zeros((n, k // 32), Q4_1)
    blocks["d"] = rng.uniform(0.001, 0.05, blocks.shape)
    blocks["m"] = rng.uniform(-0.4, 0.0, blocks.shape)
    blocks["qs"] = rng.integers(0, 256, blocks.shape + (16,))
    return blocks.view(np.uint8).reshape(n, -1)


def reference(w, x):
    """float64 of the formula, from the bytes."""
    blocks = w.reshape(-1).view(Q4_1).reshape(w.shape[0], -1)
    nb = blocks.shape[1]
    qs = blocks["qs"].astype(np.int64)
    q = np.concatenate([qs & 15, qs >> 4], axis=2)  # (N, nb, 32): input j, then j + 16
    xb = x.reshape(nb, 32)
    amax = np.abs(xb).max(1)
    dx = (amax / np.float32(127)).astype(np.float32)
    safe = np.where(amax > 0, dx, np.float32(1))
    xq = np.where(amax[:, None] > 0, np.rint(xb / safe[:, None]), 0).astype(np.int64)
    sx = xb.sum(1, dtype=np.float64)
    isum = (q * xq[None]).sum(2)  # exact
    d, m = blocks["d"].astype(np.float64), blocks["m"].astype(np.float64)
    terms = d * dx.astype(np.float64) * isum + m * sx
    exact = (d[..., None] * q + m[..., None]).reshape(w.shape[0], -1) @ x.astype(np.float64)
    return terms.sum(1), np.abs(terms).sum(1), exact, xq.reshape(-1), dx


def inputs(n, k, seed=0):
    rng = np.random.default_rng(seed)
    w = random_q4_1(rng, n, k)
    x = rng.standard_normal(k).astype(np.float32)
    x[64:96] = 0.0  # an all-zero block (where there is a third block)
    x[min(100, k - 1)] = 40.0  # a block with an outlier
    return w, x


def test_quantize_row_matches_the_spec():
    w, x = inputs(3, 576)
    xq, dx, sx = np.empty(576, np.int8), np.empty(18, np.float32), np.empty(18, np.float32)
    quantize_row_q8(x, xq, dx, sx)
    _, _, _, rq, rdx = reference(w, x)
    assert np.array_equal(xq, rq) and np.array_equal(dx, rdx)
    np.testing.assert_allclose(sx, x.reshape(18, 32).sum(1, dtype=np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k", [(37, 576), (8, 1536), (1, 32)])
def test_q4_1_gemv_host_mode(n, k):
    w, x = inputs(n, k)
    out = np.full(n, np.nan, np.float32)
    q4_1_gemv(w, x, out, 0, n)
    ref, mag, exact, _, _ = reference(w, x)
    assert np.all(np.abs(out - ref) <= 1e-5 * mag + 1e-6)
    # and the int8 input costs what a blockwise int8 quantization should: ~0.4 % of |W||x|
    assert np.all(np.abs(out - exact) <= 2e-2 * mag + 1e-3)


def test_q4_1_gemv_partial_rows_write_nothing_else():
    w, x = inputs(13, 576, seed=1)
    out = np.full(13, 7.0, np.float32)
    q4_1_gemv(w, x, out, 3, 10)
    ref, mag, _, _, _ = reference(w, x)
    assert np.all(out[:3] == 7.0) and np.all(out[10:] == 7.0)
    assert np.all(np.abs(out[3:10] - ref[3:10]) <= 1e-5 * mag[3:10] + 1e-6)


portable = L.make_q4_1_rows("off")


@njit(warm=False)
def _portable_gemv(w, xq, dx, sx, out):
    n, ws, nb = w.shape[0], w.strides[0], dx.shape[0]
    r = 0
    while r + 4 <= n:
        portable(4, w.ctypes.data + r * ws, ws, 20, nb, xq.ctypes.data, dx.ctypes.data, sx.ctypes.data,
                 out.ctypes.data + 4 * r)
        r += 4
    while r < n:
        portable(1, w.ctypes.data + r * ws, ws, 20, nb, xq.ctypes.data, dx.ctypes.data, sx.ctypes.data,
                 out.ctypes.data + 4 * r)
        r += 1


def test_portable_ir_agrees_with_the_host_path():
    """The IR other CPUs (AArch64) compile: the same integer sums, so the same result."""
    w, x = inputs(23, 576, seed=2)
    xq, dx, sx = np.empty(576, np.int8), np.empty(18, np.float32), np.empty(18, np.float32)
    quantize_row_q8(x, xq, dx, sx)
    out = np.empty(23, np.float32)
    _portable_gemv(w, xq, dx, sx, out)
    host = np.empty(23, np.float32)
    q4_1_gemv(w, x, host, 0, 23)
    ref, mag, _, _, _ = reference(w, x)
    assert np.all(np.abs(out - ref) <= 1e-5 * mag + 1e-6)
    np.testing.assert_array_equal(out, host)


def test_interleaved_rows_give_the_same_bits():
    w, x = inputs(40, 1536, seed=3)
    plain, inter = np.empty(40, np.float32), np.full(40, np.nan, np.float32)
    q4_1_gemv(w, x, plain, 0, 40)
    q4_1_gemv_x4(interleave_q4_1(w), x, inter, 0, 40)
    np.testing.assert_array_equal(inter, plain)
