"""The native op's prefill attention kernel (``kernels_fused.prefill_attend``) against a dense
NumPy masked softmax whose masks come from the segment path's ``attention.ReadRule``: over
fp16-slot keys and compressed (projected) keys. Sizes span several query and key tiles, odd
row counts (G = 3), partial key quads, tiles wholly masked and wholly visible."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from tqedge.codec import kernels_fused as KF  # noqa: E402
from tqedge.runtime.attention import ReadRule  # noqa: E402


def _reference(qs, qp, g, kf, vf, pf, kd, vd, pc, um, t0, rule):
    sinks, window, ring, fp_lo, exact = (int(x) for x in rule)
    read = ReadRule(sinks, window, ring, fp_lo, t0, bool(exact))  # the segment path's rule
    out = np.zeros_like(qs, dtype=np.float64)
    for r in range(qs.shape[0]):
        tp = np.array([t0 + r // g])
        mf, mc = read.fp_mask(tp, pf)[0], read.compressed_mask(tp, pc)[0]
        s = np.concatenate([kf[mf] @ qs[r].astype(np.float64), kd[mc] @ qp[r].astype(np.float64)])
        w = np.exp(s - s.max())
        w /= w.sum()
        nf = int(mf.sum())
        out[r] = w[:nf] @ vf[mf] + (w[nf:] @ vd[mc]) @ um
    return out


def _tiles(k):
    out = np.full((-(-k.shape[0] // KF.TK_KEYS), k.shape[1], KF.TK_KEYS), np.nan, np.float32)
    KF.key_tiles(k, out)
    return out


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_key_tiles_are_the_keys_transposed_and_zero_padded(n):
    k = np.random.default_rng(n).standard_normal((n, 12)).astype(np.float32)
    padded = np.zeros((-(-n // KF.TK_KEYS) * KF.TK_KEYS, 12), np.float32)
    padded[:n] = k
    want = padded.reshape(-1, KF.TK_KEYS, 12).transpose(0, 2, 1)
    assert np.array_equal(_tiles(k), want)


@pytest.mark.parametrize("exact", [0, 1])
@pytest.mark.parametrize("t,t0,n_old", [(77, 0, 0), (53, 300, 211), (5, 90, 61)])
def test_prefill_attend_matches_numpy(t, t0, n_old, exact):
    rng = np.random.default_rng(t + t0 + exact)
    g, d, dpk, dpv = 3, 16, 12, 10
    sinks, window, ring = 4, 24, 400
    # fp slots: sinks, the last `window` old positions, then the step's tokens
    old_fp = [p for p in range(t0) if p < sinks or p >= t0 - window]
    pf = np.array(old_fp + list(range(t0, t0 + t)), np.int64)
    # compressed: old positions past the sinks (ring order: rotated), then the step's own
    old_c = [p for p in range(sinks, t0)][-n_old:] if n_old else []
    old_c = old_c[len(old_c) // 3:] + old_c[:len(old_c) // 3]
    pc = np.array(old_c + [p for p in range(t0, t0 + t) if p >= sinks], np.int64)
    qs = rng.standard_normal((t * g, d)).astype(np.float32)
    qp = rng.standard_normal((t * g, dpk)).astype(np.float32)
    kf, vf = (rng.standard_normal((len(pf), d)).astype(np.float32) for _ in range(2))
    kd = rng.standard_normal((len(pc), dpk)).astype(np.float32)
    vd = rng.standard_normal((len(pc), dpv)).astype(np.float32)
    um = rng.standard_normal((dpv, d)).astype(np.float32)
    rule = np.array([sinks, window, ring, t0 - window if t0 > window else 0, exact], np.int64)
    out = np.full((t * g, d), np.nan, np.float32)
    kft, kdt = _tiles(kf), _tiles(kd)
    KF.prefill_attend(qs, qp, g, kft, vf, pf, kdt, vd, pc, um, t0, 0, rule, out)
    want = _reference(qs, qp, g, kf, vf, pf, kd, vd, pc, um, t0, rule)
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4)
    # the same rows in two calls (a work item starts at token i_first): the same result
    half = (t // 2) * g
    split = np.full_like(out, np.nan)
    KF.prefill_attend(qs[:half], qp[:half], g, kft, vf, pf, kdt, vd, pc, um, t0, 0, rule, split[:half])
    KF.prefill_attend(qs[half:], qp[half:], g, kft, vf, pf, kdt, vd, pc, um, t0, t // 2, rule, split[half:])
    np.testing.assert_allclose(split, out, rtol=1e-5, atol=1e-6)
    assert len(pf) > KF.TK_KEYS or len(pc) > KF.TK_KEYS or t < KF.TQ_ROWS  # the oracle sees several tiles


def test_matvec_matches_numpy():
    rng = np.random.default_rng(0)
    x, m = rng.standard_normal(37).astype(np.float32), rng.standard_normal((37, 11)).astype(np.float32)
    out = np.empty(11, np.float32)
    KF.matvec(x, m, out)
    np.testing.assert_allclose(out, x @ m, rtol=1e-5, atol=1e-5)


def test_f16_rows_match_numpy_on_every_half():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(halves.shape, np.float32)
    KF.f16_row_to_f32(halves, out)
    want = halves.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))  # bit for bit, ±0 too


def test_f32_rows_round_like_numpy():
    rng = np.random.default_rng(0)
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e9, np.inf, -np.inf, np.nan,
                      2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.5, 3 * 2.0 ** -26, 1e-30,
                      1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 2049.0, 2051.0], np.float32)
    # every half, its neighbours and the midpoints between halves (the rounding ties)
    h = np.arange(0, 0x7C00, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    mids = ((h[1:] + h[:-1]) / 2).astype(np.float32)
    near = [np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(1e6))]
    wide = (rng.standard_normal(20000) * 10.0 ** rng.integers(-8, 6, 20000)).astype(np.float32)
    x = np.concatenate([edges, -edges, mids, -mids, *near, wide])
    out = np.empty(x.shape, np.uint16)
    KF.f32_row_to_f16(x, out)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(out[~nan], want[~nan])
    assert (out[nan] & 0x7FFF == 0x7E00).all()
