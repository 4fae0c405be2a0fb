"""The sliding-window branch of the native TurboQuantAttention op (nopython, no GIL).

A sliding layer of a :class:`~tqedge.runtime.sliding_cache.LayeredKVCache` (Gemma 3's local
layers) keeps the keys/values of its last ``W`` positions in a fixed ring (position ``p`` in slot
``p % W``; float32 beside an exact cache, float16 beside a TurboQuant one) and a query at ``t``
reads exactly the keys at ``0 ≤ t - p < W`` — no sinks, nothing compressed — as
:meth:`WindowKVCache.attend <tqedge.runtime.sliding_cache.WindowKVCache.attend>` does between
segments. New keys/values are rounded to the ring's precision before anyone reads them, so a
result does not depend on how a prompt is chunked.

- decode (one token): store it in its slot (which held the position ``t - W``, out of reach), then
  one pass over the ring's valid slots;
- prefill (any number of tokens, longer than ``W`` too): the old in-window positions and the new
  tokens go through the flash-style tiles of the compressed branch
  (:func:`~tqedge.runtime.native_prefill.run_items`, parallel when threads allow) under the
  read rule ``sinks=0, window=W``, with no compressed keys; then the last ``min(T, W)`` new
  tokens are stored.

:func:`compute` returns 0, or 1 when the descriptor is out of range (checked before any buffer
is touched).
"""

from __future__ import annotations

import numpy as np
from numba import carray

from tqedge.codec.fastexp import exp_sub
from tqedge.codec.kernels_fused import f16_row_to_f32, f32_row_to_f16
from tqedge.codec.numba_runtime import njit
from tqedge.runtime import kv_descriptor as KD
from tqedge.runtime.native_prefill import run_items
from tqedge.runtime.ort_numba import as_ptr

_OPTS = dict(warm=False, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp", "afn"})
NO_RING = 1 << 62  # the read rule's compressed ring: none


@njit(**_OPTS)
def _load(src, dst, half):
    """A ring row (float16 bits when ``half``, else float32) into float32 ``dst``."""
    if half:
        f16_row_to_f32(src, dst)
    else:
        for x in range(dst.shape[0]):
            dst[x] = src[x]


@njit(**_OPTS)
def _store(src, dst, half):
    """A float32 row into a ring row (rounded to float16 bits when ``half``)."""
    if half:
        f32_row_to_f16(src, dst)
    else:
        for x in range(src.shape[0]):
            dst[x] = src[x]


@njit(**_OPTS)
def _decode(q, k, v, scale, keys, values, t0, half, out):
    """One token at position ``t0`` over the ring (Hkv, W, D), stored first."""
    hq, d = q.shape
    hkv, w, _ = keys.shape
    g = hq // hkv
    slot = t0 % w
    for h in range(hkv):
        _store(k[h], keys[h, slot], half)
        _store(v[h], values[h, slot], half)
    n = min(w, t0 + 1)  # valid slots: [0, n) (all once t0 ≥ W - 1)
    s = np.empty((g, n), np.float32)
    scratch = np.empty(n, np.int32)
    row = np.empty(d, np.float32)
    acc = np.empty((g, d), np.float32)
    for h in range(hkv):
        qh = q[h * g:(h + 1) * g]
        m = np.full(g, -np.inf, np.float32)
        for j in range(n):
            _load(keys[h, j], row, half)
            for gg in range(g):
                a = np.float32(0.0)
                for x in range(d):
                    a += qh[gg, x] * row[x]
                a *= scale
                s[gg, j] = a
                m[gg] = max(m[gg], a)
        acc[:] = 0.0
        den = np.zeros(g, np.float32)
        for gg in range(g):
            den[gg] = exp_sub(s[gg], m[gg], scratch)
        for j in range(n):
            _load(values[h, j], row, half)
            for gg in range(g):
                p = s[gg, j]
                for x in range(d):
                    acc[gg, x] += p * row[x]
        for gg in range(g):
            inv = np.float32(1.0) / den[gg]
            for x in range(d):
                out[h * g + gg, x] = acc[gg, x] * inv


@njit(**_OPTS)
def _prefill(q, k, v, scale, keys, values, t0, half, threads, lock, pool, item_fn, ort_pool, out):
    """``T`` tokens at positions ``t0 …``: attend (old in-window slots + the new tokens, causal,
    distance < W), then store the last ``min(T, W)`` of them."""
    t, hq, d = q.shape
    hkv, w, _ = keys.shape
    g = hq // hkv
    lo = max(0, t0 - w + 1)  # oldest position the first new token sees
    n_old = t0 - lo
    nf = n_old + t
    kf = np.empty((hkv, nf, d), np.float32)
    vf = np.empty((hkv, nf, d), np.float32)
    pf = np.empty(nf, np.int64)
    for j in range(n_old):
        pf[j] = lo + j
        for h in range(hkv):
            _load(keys[h, (lo + j) % w], kf[h, j], half)
            _load(values[h, (lo + j) % w], vf[h, j], half)
    bits = np.empty(d, np.uint16)
    for i in range(t):  # the new tokens at the ring's precision
        pf[n_old + i] = t0 + i
        for h in range(hkv):
            if half:
                f32_row_to_f16(k[i, h], bits)
                f16_row_to_f32(bits, kf[h, n_old + i])
                f32_row_to_f16(v[i, h], bits)
                f16_row_to_f32(bits, vf[h, n_old + i])
            else:
                kf[h, n_old + i] = k[i, h]
                vf[h, n_old + i] = v[i, h]
    qs = np.empty((hkv, t * g, d), np.float32)
    for h in range(hkv):
        for i in range(t):
            for gg in range(g):
                for x in range(d):
                    qs[h, i * g + gg, x] = q[i, h * g + gg, x] * scale
    rule = np.array([0, w, NO_RING, 0, 0], np.int64)  # sinks, window, ring, fp_lo, exact
    none = np.empty((hkv, 0, 1), np.float32)  # no compressed keys or values
    res = np.empty((hkv, t * g, d), np.float32)
    run_items(qs, qs, g, kf, vf, pf, none, none, np.empty(0, np.int64), np.zeros((1, d), np.float32), t0, rule,
              res, threads, lock, pool, item_fn, ort_pool)
    for h in range(hkv):
        for i in range(t):
            for gg in range(g):
                out[i, h * g + gg] = res[h, i * g + gg]
    for i in range(max(0, t - w), t):  # after attending: these slots held positions earlier rows read
        slot = (t0 + i) % w
        for h in range(hkv):
            _store(kf[h, n_old + i], keys[h, slot], half)
            _store(vf[h, n_old + i], values[h, slot], half)


@njit(**_OPTS)
def _run(q, k, v, scale, keys, values, t0, half, threads, lock, pool, item_fn, ort_pool, out):
    if q.shape[0] == 1:
        _decode(q[0], k[0], v[0], scale, keys, values, t0, half, out[0])
    else:
        _prefill(q, k, v, scale, keys, values, t0, half, threads, lock, pool, item_fn, ort_pool, out)


@njit(**_OPTS)
def compute(desc, nd, j, q, k, v, scale, out, ort_pool):
    """Sliding layer ``j`` (its index among the sliding layers) of a layered descriptor: 0 ok,
    1 descriptor out of range. ``ort_pool``: the op's parallel-for record or 0."""
    hkv, d, t0 = desc[KD.HKV], desc[KD.DIM], desc[KD.T0]
    w, esize, ns = desc[KD.LY_W], desc[KD.LY_ESIZE], desc[KD.LY_NS]
    if w < 1 or t0 < 0 or j < 0 or j >= ns or desc[KD.LY_KEYS] == 0 or desc[KD.LY_VALUES] == 0 \
            or (esize != 2 and esize != 4) or desc[KD.LY_PAR_PREFILL] == 0:
        return 1
    threads, lock, pool, item_fn = desc[KD.THREADS], desc[KD.LY_LOCK], desc[KD.LY_POOL], desc[KD.LY_PAR_PREFILL]
    if esize == 2:
        keys = carray(as_ptr(desc[KD.LY_KEYS], np.uint16), (ns, hkv, w, d))[j]
        values = carray(as_ptr(desc[KD.LY_VALUES], np.uint16), (ns, hkv, w, d))[j]
        _run(q, k, v, scale, keys, values, t0, True, threads, lock, pool, item_fn, ort_pool, out)
    else:
        keys32 = carray(as_ptr(desc[KD.LY_KEYS], np.float32), (ns, hkv, w, d))[j]
        values32 = carray(as_ptr(desc[KD.LY_VALUES], np.float32), (ns, hkv, w, d))[j]
        _run(q, k, v, scale, keys32, values32, t0, False, threads, lock, pool, item_fn, ort_pool, out)
    return 0
