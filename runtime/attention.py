"""The TurboQuantAttention op: causal GQA softmax attention over a compressed KV cache.

Every key a query may see is read from exactly one of two places, by one rule shared by decode
and prefill (:class:`ReadRule`), so the result never depends on how a prompt is chunked:

- **full precision (fp16)**: sink tokens (absolute position ``p < sinks``) and the recent
  window (``t - p < window`` for a query at position ``t``);
- **compressed** (TurboQuant codes): every other visible token (``window ≤ t - p < ring``).

Keys at distance ``≥ ring`` (the cache's ring of non-sink slots) are no longer held.

The compressed part never materializes a dequantized cache in decode: the query is rotated once
(``project_query``), scores come from the codec kernel on the packed codes, the probabilities
are accumulated over the packed values in the projected domain (``value_sum``) and unprojected
once. Prefill of many query rows is flash-style: the compressed keys are streamed in tiles,
each dequantized once in the projected domain and scored for every row that can see it (BLAS
matmuls) under an online softmax, so temporaries are bounded by the chunk and the tile, never
by the context.
All heads of a GQA group share one read of their KV head's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tqedge.runtime import fp16_kernels

# Prefill tiles: compressed keys dequantized at once, and the upper bound on one score tile
# (elements, float32), which sets how many query rows are scored together.
KEY_TILE = 256
TILE_ELEMENTS = 1 << 20
MIN_BLOCK, MAX_BLOCK = 16, 256


@dataclass(frozen=True)
class ReadRule:
    """Where a query at position ``t`` reads the key at position ``p`` from.

    Attributes:
        sinks: first tokens kept in fp16 forever.
        window: recent tokens (distance ``t - p < window``) read in fp16.
        ring: non-sink slots of the cache; keys at distance ``≥ ring`` are gone.
        fp_lo: lowest non-sink position whose fp16 copy exists (above it after a ``trim``);
            older in-window keys are read compressed.
        t0: position of the first token of the step in flight.
        exact_prefill: tokens of the same step attend to each other in fp16 (not chunk-invariant).
    """

    sinks: int
    window: int
    ring: int
    fp_lo: int
    t0: int
    exact_prefill: bool = False

    def fp_mask(self, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Bool (Tq, N): query positions ``t`` (Tq,) read fp16 keys at positions ``p`` (N,).

        ``p`` must only hold keys whose fp16 copy exists (sinks, window ring, new tokens)."""
        dist = t[:, None] - p[None, :]  # (Tq, N)
        ok = (p[None, :] < self.sinks) | (dist < self.window)
        if self.exact_prefill:
            ok |= p[None, :] >= self.t0
        return ok & (dist >= 0)

    def compressed_mask(self, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Bool (Tq, N): query positions ``t`` read compressed keys at positions ``p`` (N,)."""
        dist = t[:, None] - p[None, :]  # (Tq, N)
        ok = (dist >= 0) & (dist < self.ring) & (p[None, :] >= self.sinks)
        ok &= (dist >= self.window) | (p[None, :] < self.fp_lo)
        if self.exact_prefill:
            ok &= p[None, :] < self.t0
        return ok


def decode(q: np.ndarray, scale: float, kf: np.ndarray, vf: np.ndarray, fp_bias: np.ndarray,
           tq_k, tq_v, parts: list) -> np.ndarray:
    """One query token over fp16 keys and compressed keys (codec kernels on packed codes).

    Args:
        q: (Hq, D) float32 query, RoPE applied.
        scale: softmax scale.
        kf, vf: (Hkv, Nf, D) float16 full-precision keys / values (sinks + window slots).
        fp_bias: (Nf,) float32, 0 for slots to read and -inf for the others.
        tq_k, tq_v: the layer's key / value TurboQuant codecs.
        parts: list of ``(k_codes (Hkv, N, Bk), k_scales (Hkv, N, Pk), v_codes, v_scales)``
            ranges of compressed slots, all read.

    Returns:
        (Hq, D) float32 attention output.
    """
    h, _, d = kf.shape
    g = q.shape[0] // h
    qh = q.reshape(h, g, d) * np.float32(scale)  # (Hkv, G, D)
    s_fp = fp16_kernels.scores(qh, kf, fp_bias)  # (Hkv, G, Nf)
    m = s_fp.max(axis=-1, keepdims=True, initial=-np.inf)  # (Hkv, G, 1)
    s_c = []
    if parts:
        qp = tq_k.project_query(qh.reshape(h * g, d)).reshape(h, g, -1)  # (Hkv, G, Dp)
        for kc, ks, _, _ in parts:
            s = tq_k.scores(qp, kc, ks)  # (Hkv, G, N)
            s_c.append(s)
            m = np.maximum(m, s.max(axis=-1, keepdims=True))
    p_fp = np.exp(s_fp - m)  # (Hkv, G, Nf)
    denom = p_fp.sum(axis=-1, keepdims=True)
    out = fp16_kernels.weighted_sum(p_fp, vf)  # (Hkv, G, D)
    if parts:
        acc = None
        for s, (_, _, vc, vs) in zip(s_c, parts):
            p = np.exp(s - m)  # (Hkv, G, N)
            denom += p.sum(axis=-1, keepdims=True)
            part = tq_v.value_sum(p.astype(np.float32, copy=False), vc, vs)  # (Hkv, G, Dp)
            acc = part if acc is None else acc + part
        out += tq_v.unproject(acc.reshape(h * g, -1)).reshape(h, g, d)  # (Hkv, G, D)
    out /= denom
    return out.reshape(h * g, d).astype(np.float32, copy=False)


def prefill(q: np.ndarray, t: np.ndarray, scale: float, rule: ReadRule,
            kf: np.ndarray, vf: np.ndarray, pf: np.ndarray, pc: np.ndarray, load_compressed,
            tq_k, tq_v) -> np.ndarray:
    """Many query rows (a prompt chunk): flash-style, online softmax over bounded tiles.

    The fp16 keys (sinks + window + this step's tokens, a set bounded by the chunk) are scored
    per block of rows; the compressed keys are then streamed in tiles of :data:`KEY_TILE`
    positions, each dequantized once (``load_compressed``) and folded into every row's running
    max, denominator and sums. No temporary grows with the context: the largest are the
    per-row accumulators (bounded by the chunk) and one score tile (:data:`TILE_ELEMENTS`).

    Args:
        q: (T, Hq, D) float32 queries at positions ``t`` (T,), ascending.
        scale: softmax scale.
        rule: the read rule of this step.
        kf, vf: (Hkv, Nf, D) float32 full-precision keys / values at positions ``pf`` (Nf,),
            ascending (sinks first).
        pc: (Nc,) ascending positions of the compressed keys some row reads.
        load_compressed: ``(a, b) -> (keys, values)``, entries ``a:b`` of ``pc`` dequantized in
            the projected domain, float32 (Hkv, b - a, Dp) each.
        tq_k, tq_v: the layer's key / value codecs (query projection, value unprojection).

    Returns:
        (T, Hq, D) float32 attention output.
    """
    T, hq, d = q.shape
    h = kf.shape[0]
    g = hq // h
    # (Hkv, T, G, D): a block of rows is then one (Tb·G, D) matrix per KV head (3-D BLAS batches)
    qh = np.ascontiguousarray((q * np.float32(scale)).reshape(T, h, g, d).transpose(1, 0, 2, 3))
    m = np.empty((h, T, g, 1), np.float32)  # running max, denominator and fp-domain sums per row
    denom = np.empty((h, T, g, 1), np.float32)
    o = np.empty((h, T, g, d), np.float32)
    n_sink = int(np.searchsorted(pf, rule.sinks))
    block = int(np.clip(TILE_ELEMENTS // max(1, hq * len(pf)), MIN_BLOCK, MAX_BLOCK))
    for a in range(0, T, block):
        b = min(T, a + block)
        tb = t[a:b]  # (Tb,)
        # fp16 keys: the sinks plus the range of positions this block's rows can see
        lo_p = tb[0] - rule.window + 1
        if rule.exact_prefill:
            lo_p = min(lo_p, rule.t0)
        lo = max(n_sink, int(np.searchsorted(pf, lo_p)))
        hi = int(np.searchsorted(pf, tb[-1], side="right"))
        idx = np.r_[0:n_sink, lo:hi]  # (Nb,)
        s = _masked_scores(qh[:, a:b], kf[:, idx], rule.fp_mask(tb, pf[idx]))  # (Hkv, Tb, G, Nb)
        mb = s.max(axis=-1, keepdims=True, initial=-np.inf)
        p = np.exp(s - _finite(mb))
        m[:, a:b], denom[:, a:b] = mb, p.sum(axis=-1, keepdims=True)
        o[:, a:b] = np.matmul(p.reshape(h, (b - a) * g, -1), vf[:, idx]).reshape(h, b - a, g, d)
    if len(pc):
        qp = tq_k.project_query(qh.reshape(-1, d)).reshape(h, T, g, -1)  # (Hkv, T, G, Dp)
        acc = np.zeros_like(qp)  # compressed values' sums, projected domain
        for ka in range(0, len(pc), KEY_TILE):
            kb = min(len(pc), ka + KEY_TILE)
            pt = pc[ka:kb]  # (n,)
            # rows that can see some key of the tile: causal, and within the ring
            r_lo = int(np.searchsorted(t, pt[0]))
            r_hi = int(np.searchsorted(t, pt[-1] + rule.ring - 1, side="right"))
            if r_hi <= r_lo:
                continue
            kd, vd = load_compressed(ka, kb)  # (Hkv, n, Dp) each
            rows = max(1, TILE_ELEMENTS // (hq * (kb - ka)))
            for a in range(r_lo, r_hi, rows):
                b = min(r_hi, a + rows)
                s = _masked_scores(qp[:, a:b], kd, rule.compressed_mask(t[a:b], pt))  # (Hkv, Tb, G, n)
                m_new = np.maximum(m[:, a:b], s.max(axis=-1, keepdims=True))
                shift = _finite(m_new)
                alpha = np.exp(m[:, a:b] - shift)  # rescales what was summed under the old max
                p = np.exp(s - shift)
                denom[:, a:b] = denom[:, a:b] * alpha + p.sum(axis=-1, keepdims=True)
                o[:, a:b] *= alpha
                acc[:, a:b] *= alpha
                acc[:, a:b] += np.matmul(p.reshape(h, (b - a) * g, -1), vd).reshape(h, b - a, g, -1)
                m[:, a:b] = m_new
        o += tq_v.unproject(acc.reshape(-1, acc.shape[-1])).reshape(o.shape)
    o /= denom
    return o.transpose(1, 0, 2, 3).reshape(T, hq, d)


def _finite(m: np.ndarray) -> np.ndarray:
    """The softmax shift: the running max, 0 where a row has seen no key yet (max = -inf)."""
    return np.where(np.isfinite(m), m, np.float32(0.0))


def _masked_scores(qb: np.ndarray, k: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scores (Hkv, Tb, G, N) of queries ``qb`` (Hkv, Tb, G, D) against ``k`` (Hkv, N, D),
    -inf where ``mask`` (Tb, N) is False."""
    h, tb, g, d = qb.shape
    s = np.matmul(qb.reshape(h, tb * g, d), k.transpose(0, 2, 1)).reshape(h, tb, g, -1)  # (Hkv, Tb, G, N)
    return np.where(mask[:, None, :], s, np.float32(-np.inf))
