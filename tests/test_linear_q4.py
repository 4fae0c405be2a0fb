"""The Q4_1 linear kernels (tqedge.codec.simd_linear via kernels_linear) against NumPy
written from the spec: GGUF Q4_1 blocks (float16 d, float16 m, 16 bytes of nibbles: input j low,
j + 16 high), the input quantized to int8 per block of 32 (dx = max|x| / 127, xq = rint(x · 127 / max|x|), as
onnxruntime's MLAS quantizes MatMulNBits' input)
with each block's exact sum kept for the m term. Integer sums are exact, so only float32
summation order separates kernel and reference."""

import numpy as np
import pytest

from tqedge.codec import simd_linear as L
from tqedge.codec.kernels_linear import group_q4_1, q4_1_gemm, q4_1_gemv, quantize_row_q8, quantize_rows_q8
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
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.rint(xb * inv[:, None]).astype(np.int64)  # float32 product, ties to even
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
    w, x = inputs(4, 576)
    xq, dx, sx = np.empty(18 * 32, np.int8), np.empty(18, np.float32), np.empty(18, np.float32)
    quantize_row_q8(x, xq, dx, sx)
    _, _, _, rq, rdx = reference(w, x)
    assert np.array_equal(xq, rq) and np.array_equal(dx, rdx)
    np.testing.assert_allclose(sx, x.reshape(18, 32).sum(1, dtype=np.float64), rtol=1e-5, atol=1e-5)


def test_group_blocks_hold_the_file_bytes():
    rng = np.random.default_rng(5)
    w = random_q4_1(rng, 32, 64)
    g = group_q4_1(w).reshape(2, 2, 320)  # (group, block, bytes)
    blocks = w.reshape(32, 2, 20)
    for r in range(32):
        for b in range(2):
            gb = g[r // 16, b]
            i = r % 16
            assert bytes(gb[2 * i:2 * i + 2]) == bytes(blocks[r, b, 0:2])  # d
            assert bytes(gb[32 + 2 * i:34 + 2 * i]) == bytes(blocks[r, b, 2:4])  # m
            for p in range(4):  # code dword p: bytes 4p..4p+3 of each of the 16 rows in turn
                assert bytes(gb[64 + 64 * p + 4 * i:64 + 64 * p + 4 * i + 4]) == bytes(blocks[r, b, 4 + 4 * p:8 + 4 * p])


@pytest.mark.parametrize("n,k", [(48, 576), (16, 1536), (16, 32)])
def test_q4_1_gemv_host_mode(n, k):
    w, x = inputs(n, k)
    out = np.full(n, np.nan, np.float32)
    q4_1_gemv(group_q4_1(w), x, out, 0, n)
    ref, mag, exact, _, dx = reference(w, x)
    assert np.all(np.abs(out - ref) <= 1e-5 * mag + 1e-6)
    # and the int8 input costs no more than rounding allows: |x - dx·xq| ≤ dx / 2 per input
    blocks = w.reshape(-1).view(Q4_1).reshape(n, -1)
    qs = blocks["qs"].astype(np.float64)
    q = np.concatenate([qs % 16, qs // 16], axis=2)
    wabs = np.abs(blocks["d"].astype(np.float64)[..., None] * q + blocks["m"].astype(np.float64)[..., None])
    assert np.all(np.abs(out - exact) <= (wabs.sum(2) * dx / 2).sum(1) * (1 + 1e-5) + 1e-5)


def test_q4_1_gemv_partial_rows_write_nothing_else():
    w, x = inputs(48, 576, seed=1)
    out = np.full(48, 7.0, np.float32)
    q4_1_gemv(group_q4_1(w), x, out, 16, 32)
    ref, mag, _, _, _ = reference(w, x)
    assert np.all(out[:16] == 7.0) and np.all(out[32:] == 7.0)
    assert np.all(np.abs(out[16:32] - ref[16:32]) <= 1e-5 * mag[16:32] + 1e-6)


def _one_row_gemm(dot):
    """The tile one input row at a time, its integer sums formed by ``dot``."""
    tile = L.make_q4_1_tile(dot)

    @njit(warm=False)
    def gemm(w4, xq, dx, sx, out):
        t, nb = xq.shape[0], dx.shape[1]
        for g in range(w4.shape[0]):
            for j in range(t):
                tile(1, w4.ctypes.data + g * w4.strides[0], nb, xq.ctypes.data + j * xq.strides[0], 0,
                     dx.ctypes.data + j * dx.strides[0], sx.ctypes.data + j * sx.strides[0], 0,
                     out.ctypes.data + j * out.strides[0] + 4 * L.ROWS * g, 0)

    return gemm


# every dot product this CPU can run: the host's and the narrower ones below it, and the portable IR
VARIANTS = {dot: _one_row_gemm(dot) for dot in L.DOTS[L.DOTS.index(L.DOT):] + ("off",)}


def test_host_dot_follows_the_features():
    assert L.host_dot("off", {"avx512f": True, "avx512vnni": True, "avx512vl": True}) == "off"
    assert L.host_dot("avx512", {"avx512f": True, "avx512vnni": True, "avx512vl": True}) == "avx512vnni"
    assert L.host_dot("avx512", {"avx512f": True, "avx512vl": True}) == "avx2"
    assert L.host_dot("avx2", {"avx2": True, "avxvnni": True}) == "avxvnni"
    assert L.host_dot("avx2", {"avx2": True}) == "avx2"


@pytest.mark.parametrize("t", [1, 6, 11])
def test_prompt_rows_give_each_rows_bits(t):
    """The tile (NXMAX inputs at a time, the rest one by one) = the one-row kernel on every row, and
    every dot product this CPU can run, and the portable IR other CPUs (AArch64) compile, give
    the same bits (the same integer sums, summed in the same order)."""
    rng = np.random.default_rng(4)
    w = random_q4_1(rng, 48, 576)
    w4 = group_q4_1(w)
    x = rng.standard_normal((t, 576)).astype(np.float32)
    nb = 18
    xq, dx, sx = np.empty((t, nb * 32), np.int8), np.empty((t, nb), np.float32), np.empty((t, nb), np.float32)
    quantize_rows_q8(x, xq, dx, sx)
    out = np.full((t, 48), np.nan, np.float32)
    q4_1_gemm(w4, xq, dx, sx, out, 0, 48)
    for dot, gemm in VARIANTS.items():
        other = np.full((t, 48), np.nan, np.float32)
        gemm(w4, xq, dx, sx, other)
        np.testing.assert_array_equal(other, out, err_msg=dot)
    for i in range(t):
        one = np.empty(48, np.float32)
        q4_1_gemv(w4, x[i], one, 0, 48)
        np.testing.assert_array_equal(out[i], one)
        ref, mag, _, _, _ = reference(w, x[i])
        assert np.all(np.abs(out[i] - ref) <= 1e-5 * mag + 1e-6)
