"""The TurboQuantAttention op (runtime/attention.py) against dense NumPy references built from
``tq.decode``: decode over packed codes, blocked prefill, GQA, and the read rule itself."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tqedge.bundle import KVSpec
from tqedge.runtime import attention
from tqedge.runtime.attention import ReadRule
from tqedge.runtime.cache import build_codecs

D = 64


def _codecs(bits=(4.0, 3.0)):
    (tk,), (tv,) = build_codecs(KVSpec(), 1, D, bits)
    return tk, tv


def _softmax_ref(q, keys, vals, scale):
    """q (G, D), keys/vals (N, D) → (G, D): plain softmax attention."""
    s = q @ keys.T * scale
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ vals


@settings(max_examples=60, deadline=None)
@given(sinks=st.integers(0, 4), window=st.integers(0, 6), extra=st.integers(1, 8), fp_lo=st.integers(0, 20),
       t0=st.integers(0, 20), exact=st.booleans())
def test_read_rule_reads_each_visible_key_exactly_once(sinks, window, extra, fp_lo, t0, exact):
    ring = max(1, window) + extra
    fp_lo = min(fp_lo, t0)
    rule = ReadRule(sinks, window, ring, fp_lo, t0, exact)
    t = np.arange(t0, t0 + 5)
    p = np.arange(0, t0 + 5)
    has_fp = (p < sinks) | (p >= fp_lo)  # the fp mask is only ever given keys with an fp16 copy
    fp = rule.fp_mask(t, p) & has_fp[None]
    comp = rule.compressed_mask(t, p)
    for i, ti in enumerate(t):
        for pj in p:
            # a step's own tokens are all held until it ends, so exact prefill sees them all
            visible = pj <= ti and (pj < sinks or ti - pj < ring or (exact and pj >= t0))
            in_fp = pj < sinks or (ti - pj < window and pj >= fp_lo) or (exact and pj >= t0)
            assert fp[i, pj] == (visible and in_fp), (ti, pj)
            assert comp[i, pj] == (visible and not in_fp), (ti, pj)


def test_decode_over_packed_codes_matches_dense_reference():
    rng = np.random.default_rng(0)
    tk, tv = _codecs()
    h, g, nf, nc = 3, 3, 12, 50
    q = rng.standard_normal((h * g, D)).astype(np.float32)
    kf = rng.standard_normal((h, nf, D)).astype(np.float16)
    vf = rng.standard_normal((h, nf, D)).astype(np.float16)
    bias = np.where(rng.random(nf) < 0.7, 0.0, -np.inf).astype(np.float32)
    bias[0] = 0.0
    kx = (rng.standard_normal((h * nc, D)) * 3).astype(np.float32)
    vx = rng.standard_normal((h * nc, D)).astype(np.float32)
    kc, ks = tk.encode(kx)
    vc, vs = tv.encode(vx)
    kc, ks, vc, vs = (a.reshape(h, nc, -1) for a in (kc, ks, vc, vs))
    kd = tk.decode(kc.reshape(h * nc, -1), ks.reshape(h * nc, -1)).reshape(h, nc, D)
    vd = tv.decode(vc.reshape(h * nc, -1), vs.reshape(h * nc, -1)).reshape(h, nc, D)
    scale = 0.125
    # two ranges of slots, as when the ring wraps
    parts = [(kc[:, a:b], ks[:, a:b], vc[:, a:b], vs[:, a:b]) for a, b in ((30, 50), (0, 30))]
    out = attention.decode(q, scale, kf, vf, bias, tk, tv, parts)
    keep = bias == 0
    for hq in range(h * g):
        hk = hq // g
        keys = np.concatenate([kf[hk, keep].astype(np.float32), kd[hk]])
        vals = np.concatenate([vf[hk, keep].astype(np.float32), vd[hk]])
        ref = _softmax_ref(q[hq][None], keys, vals, scale)[0]
        np.testing.assert_allclose(out[hq], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tile_elements,key_tile", [(1, 7), (1 << 22, 1 << 20)])
def test_tiled_prefill_matches_dense_reference(monkeypatch, tile_elements, key_tile):
    monkeypatch.setattr(attention, "TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(attention, "KEY_TILE", key_tile)
    rng = np.random.default_rng(1)
    tk, tv = _codecs((3.0, 3.0))
    h, g, T, t0 = 2, 2, 90, 60
    rule = ReadRule(sinks=2, window=10, ring=100, fp_lo=55, t0=t0)
    pos = np.arange(t0, t0 + T)
    pf = np.concatenate([np.arange(2), np.arange(55, t0 + T)])  # sinks, window, new
    pc = np.arange(2, t0 + T - 10)  # every non-sink position old enough to be read compressed
    q = rng.standard_normal((T, h * g, D)).astype(np.float32)
    kf = rng.standard_normal((h, len(pf), D)).astype(np.float32)
    vf = rng.standard_normal((h, len(pf), D)).astype(np.float32)
    kc, ks = tk.encode(rng.standard_normal((h * len(pc), D)).astype(np.float32))
    vc, vs = tv.encode(rng.standard_normal((h * len(pc), D)).astype(np.float32))
    kd, vd = tk.decode(kc, ks).reshape(h, -1, D), tv.decode(vc, vs).reshape(h, -1, D)
    kp = tk.dequantize_projected(kc.reshape(h, len(pc), -1), ks.reshape(h, len(pc), -1))
    vp = tv.dequantize_projected(vc.reshape(h, len(pc), -1), vs.reshape(h, len(pc), -1))
    out = attention.prefill(q, pos, 0.2, rule, kf, vf, pf, pc, lambda a, b: (kp[:, a:b], vp[:, a:b]), tk, tv)
    fpm, cm = rule.fp_mask(pos, pf), rule.compressed_mask(pos, pc)
    for i in range(0, T, 7):
        for hq in range(h * g):
            hk = hq // g
            keys = np.concatenate([kf[hk, fpm[i]], kd[hk, cm[i]]])
            vals = np.concatenate([vf[hk, fpm[i]], vd[hk, cm[i]]])
            ref = _softmax_ref(q[i, hq][None], keys, vals, 0.2)[0]
            np.testing.assert_allclose(out[i, hq], ref, rtol=1e-4, atol=1e-5)


_KERNEL_SCRIPT = """
import numpy as np, sys
from tqedge.bundle import KVSpec
from tqedge.runtime.cache import build_codecs
from tqedge.runtime.compressed_cache import CompressedKVCache
tk, tv = build_codecs(KVSpec(), 2, 64, (4.0, 3.0))
rng = np.random.default_rng(0)
n = 80
q = rng.standard_normal((2, n, 4, 64)).astype(np.float32)
k = rng.standard_normal((2, n, 2, 64)).astype(np.float32)
v = rng.standard_normal((2, n, 2, 64)).astype(np.float32)
c = CompressedKVCache(tk, tv, 2, 64, ring=64, sinks=2, window=8)
out = np.zeros_like(q); s = 0
for t in [40] + [1] * 40:
    c.prepare(t)
    for l in range(2):
        out[l, s:s + t] = c.attend(l, q[l, s:s + t], k[l, s:s + t], v[l, s:s + t], 0.125)
    c.commit(); s += t
np.save(sys.argv[1], out)
"""


def test_numba_and_numpy_kernels_give_the_same_outputs(tmp_path):
    outs = []
    for kernels in ("numba", "numpy"):
        path = tmp_path / f"{kernels}.npy"
        env = {**os.environ, "TQEDGE_KERNELS": kernels}
        subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT, str(path)], env=env, check=True, timeout=300)
        outs.append(np.load(path))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
