"""The LLVM IR kernels of :mod:`tqedge.codec.simd`: the permute decode (16 codes of 1–4 bits →
their centroids, bit for bit, in every mode this CPU can run, against a packer written here from
the spec: a little-endian bit stream, code ``j`` at bit ``j·b``); the block kernels (dot products
and weighted sums of decoded codes or float16 rows) against float64 NumPy; and the kernels with
the permute off (``TQEDGE_SIMD=off``, a child process) against the same kernels with it on:
dequantized rows bit for bit, scores and value sums to float32 summation order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from tqedge.codec import simd
from tqedge.errors import TqedgeError


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(N, n) codes → (N, n·bits/8) bytes: bit ``j·bits + i`` of the row is bit ``i`` of code ``j``."""
    n, m = codes.shape
    stream = ((codes[:, :, None] >> np.arange(bits)) & 1).reshape(n, m * bits).astype(np.uint8)
    return np.packbits(stream, axis=1, bitorder="little")


def _modes_here() -> list[str]:
    import llvmlite.binding as llvm

    f = llvm.get_host_cpu_features()
    return [m for m, need in (("avx512", "avx512f"), ("avx2", "avx2")) if f.get(need)] + ["off"]


def test_host_mode_rule():
    assert simd.host_mode({"avx512f": True, "avx2": True}, "auto") == "avx512"
    assert simd.host_mode({"avx512f": False, "avx2": True}, "auto") == "avx2"
    assert simd.host_mode({"neon": True}, "auto") == "off"
    assert simd.host_mode({"avx512f": True}, "off") == "off"
    with pytest.raises(TqedgeError, match="TQEDGE_SIMD must be auto or off"):
        simd.host_mode({}, "avx9")
    assert simd.PERMUTE == (simd.MODE != "off")
    assert simd.MODE == simd.host_mode()


@pytest.mark.parametrize("mode", _modes_here())
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_decode16_is_the_codebook(mode, bits):
    dec = simd.make_decode16(bits, mode)

    @njit
    def run(packed, table, out):
        for r in range(packed.shape[0]):
            for k in range(out.shape[1] // 16):
                dec(packed.ctypes.data + r * packed.shape[1] + 2 * bits * k, table.ctypes.data,
                    out.ctypes.data + (r * out.shape[1] + 16 * k) * 4)

    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(257, 64))
    table = np.zeros(16, np.float32)
    table[: 1 << bits] = rng.standard_normal(1 << bits)
    table[1 << bits:] = np.nan  # padding a wrong index would pick
    packed = np.ascontiguousarray(_pack(codes, bits))
    out = np.empty((257, 64), np.float32)
    run(packed, table, out)
    np.testing.assert_array_equal(out.view(np.uint32), table[codes].view(np.uint32))


def test_make_decode16_refuses_other_widths():
    with pytest.raises(TqedgeError, match="no permute decode for 5 bits"):
        simd.make_decode16(5, "avx512")


def _block_runner(mode, bits, rows, nk):
    scores, values = simd.make_scores_block(mode), simd.make_values_block(mode)
    literal = nk is not None

    @njit
    def run(packed, table, q, sh, w, acc, out):
        rs, g = packed.shape[1], q.shape[0]
        k = q.shape[1] // 16
        for r0 in range(0, packed.shape[0], rows):
            src = np.int64(packed.ctypes.data) + r0 * rs
            sa = np.int64(sh.ctypes.data) + 2 * r0
            if literal:  # the group count a compile-time constant (unrolled), as the kernels pass 4, 8, 16
                scores(bits, rows, src, rs, table.ctypes.data, q.ctypes.data, q.strides[0], g, nk, sa, 2,
                       out.ctypes.data + 4 * r0, out.strides[0], 1)
                values(bits, rows, src, rs, table.ctypes.data, w.ctypes.data + 4 * r0, w.strides[0], g, nk, sa, 2,
                       acc.ctypes.data, acc.strides[0])
            else:
                scores(bits, rows, src, rs, table.ctypes.data, q.ctypes.data, q.strides[0], g, k, sa, 2,
                       out.ctypes.data + 4 * r0, out.strides[0], 1)
                values(bits, rows, src, rs, table.ctypes.data, w.ctypes.data + 4 * r0, w.strides[0], g, k, sa, 2,
                       acc.ctypes.data, acc.strides[0])

    return run


@pytest.mark.parametrize("mode", _modes_here())
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("rows", [1, simd.ROWS])
@pytest.mark.parametrize("ng,nk", [(1, None), (3, 4), (3, None), (simd.GMAX, 8)])
def test_block_kernels_against_numpy(mode, bits, rows, ng, nk):
    rng = np.random.default_rng(bits * 100 + rows * 10 + ng)
    n, d = 64, 16 * (nk or (3 if bits % 2 else 5))
    codes = rng.integers(0, 1 << bits, size=(n, d))
    table = np.full(16, np.nan, np.float32)
    table[: 1 << bits] = rng.standard_normal(1 << bits)
    q = rng.standard_normal((ng, d)).astype(np.float32)
    sh = rng.uniform(0.5, 2, n).astype(np.float16)
    w = rng.random((ng, n)).astype(np.float32)
    acc = np.zeros((ng, d), np.float32)
    out = np.full((ng, n), np.nan, np.float32)  # written, not added to (first = 1)
    _block_runner(mode, bits, rows, nk)(np.ascontiguousarray(_pack(codes, bits)), table, q, sh.view(np.uint16), w,
                                        acc, out)
    dec = table[codes].astype(np.float64) * sh.astype(np.float64)[:, None]  # scale · centroids
    want_s, want_v = q.astype(np.float64) @ dec.T, w.astype(np.float64) @ dec
    assert np.abs(out - want_s).max() <= 1e-5 * np.abs(want_s).max()
    assert np.abs(acc - want_v).max() <= 1e-5 * np.abs(want_v).max()


def test_block_kernels_refuse_runtime_bits():
    scores = simd.make_scores_block(simd.MODE)

    @njit
    def run(bits):
        scores(bits, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)

    with pytest.raises(Exception, match="block kernels need constant bits"):
        run(4)


_KERNELS = """
import hashlib, json, sys, numpy as np
from tqedge.codec import kernels_numba as K, simd
from tqedge.codec.quantizer import CodecConfig, TurboQuant
out = {"mode": simd.MODE}
for bits in (1, 2, 3, 4, 3.5, 2.5):
    tq = TurboQuant(CodecConfig(dim=64, bits=bits))
    rng = np.random.default_rng(int(bits * 10))
    codes, scales = (a.reshape(2, 300, -1) for a in tq.encode(rng.standard_normal((600, 64)).astype(np.float32)))
    t, s16 = tq.segments, scales.view(np.uint16)
    qp = tq.project_query(rng.standard_normal((2, 3, 64)).astype(np.float32))
    p = rng.random((2, 3, 300)).astype(np.float32)
    deq = K.dequantize(codes, s16, t.table, t.cb, t.lut, t.dp)
    out[str(bits)] = dict(scores=K.scores(qp, codes, s16, t.table, t.cb, t.lut).tolist(),
                          value_sum=K.value_sum(p, codes, s16, t.table, t.cb, t.lut, t.dp).tolist(),
                          dequantize=hashlib.sha256(np.ascontiguousarray(deq).tobytes()).hexdigest())
print(json.dumps(out))
"""


def test_kernels_with_the_permute_off_agree():
    def run(simd):
        env = dict(os.environ, TQEDGE_SIMD=simd)
        res = subprocess.run([sys.executable, "-c", _KERNELS], capture_output=True, text=True, env=env, check=True)
        return json.loads(res.stdout)

    on, off = run("auto"), run("off")
    assert off.pop("mode") == "off" and on.pop("mode") == simd.MODE
    assert on.keys() == off.keys()
    for bits in on:
        assert on[bits]["dequantize"] == off[bits]["dequantize"], bits  # the same centroids
        for kind in ("scores", "value_sum"):
            a, b = np.asarray(on[bits][kind]), np.asarray(off[bits][kind])
            assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max(), (bits, kind)


@pytest.mark.parametrize("d", [64, 48, 256])
@pytest.mark.parametrize("ng", [1, 3, simd.GMAX])
def test_float16_block_kernels_against_numpy(d, ng):
    """runtime/fp16_kernels on the IR blocks (any CPU): unread slots (bias -inf, weight 0) hold
    NaN bits here and must neither be read into a score nor into a sum."""
    from tqedge.runtime import fp16_kernels as F

    rng = np.random.default_rng(d + ng)
    h, n = 2, 23  # 5 blocks of 4 rows and 3 single rows
    q = rng.standard_normal((h, ng, d)).astype(np.float32)
    k = rng.standard_normal((h, n, d)).astype(np.float16)
    v = rng.standard_normal((h, n, d)).astype(np.float16)
    bias = rng.standard_normal(n).astype(np.float32)
    unread = np.array([1, 6, 7, 8, 9, 22])
    bias[unread] = -np.inf
    k[:, unread] = np.nan
    v[:, unread] = np.nan
    p = rng.random((h, ng, n)).astype(np.float32)
    p[:, :, unread] = 0.0
    s = F.scores(q, k, bias)
    want = q.astype(np.float64) @ k.astype(np.float64).transpose(0, 2, 1) + bias
    read = np.setdiff1d(np.arange(n), unread)
    assert np.all(s[:, :, unread] == -np.inf)
    np.testing.assert_allclose(s[:, :, read], want[:, :, read], rtol=0, atol=1e-5 * np.abs(want[:, :, read]).max())
    o = F.weighted_sum(p, v)
    want_o = p[:, :, read].astype(np.float64) @ v[:, read].astype(np.float64)
    assert np.isfinite(o).all()
    np.testing.assert_allclose(o, want_o, rtol=0, atol=1e-5 * np.abs(want_o).max())
