"""Per-layer cache layout (runtime/sliding_cache.py) against a NumPy oracle written from the rule:
a sliding layer's query at t sees keys at p with 0 ≤ t − p < W (nothing else, no sinks); a full
layer sees every earlier key. Plus the byte budget: rings fixed, full layers per token."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tqedge.bundle import ArchSpec, KVSpec, Manifest, TokenizerSpec, WeightSpec
from tqedge.errors import TqedgeError
from tqedge.runtime.cache import ExactKVCache, make_cache
from tqedge.runtime.compressed_cache import CompressedKVCache
from tqedge.runtime.sliding_cache import LayeredKVCache

W, HKV, HQ, D = 8, 1, 4, 32
TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
SCALE = 0.2


def manifest(layer_types=TYPES, window=W) -> Manifest:
    a = ArchSpec(name="gemma3", vocab_size=10, hidden_size=16, intermediate_size=16, num_layers=len(layer_types or TYPES),
                 num_heads=HQ, num_kv_heads=HKV, head_dim=D, rms_norm_eps=1e-6, rope_theta=1e6,
                 max_position_embeddings=4096, tie_word_embeddings=True, layer_types=layer_types,
                 sliding_window=window, rope_local_theta=1e4)
    return Manifest(name="t", architecture=a, tokenizer=TokenizerSpec(), weights=WeightSpec(), kv=KVSpec())


def oracle(q, k, v, window):
    """(T, Hq, D) plain softmax attention, causal, limited to distance < window (None: all)."""
    t = np.arange(len(q))
    dist = t[:, None] - t[None, :]
    ok = (dist >= 0) & ((dist < window) if window else True)
    g = HQ // HKV
    kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # (T, Hq, D)
    s = np.einsum("thd,shd->hts", q.astype(np.float64), kk) * SCALE
    s = np.where(ok[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, vv)


def run(cache, q, k, v, chunks):
    out, start = np.zeros(q.shape, np.float32), 0
    for n in chunks:
        cache.prepare(n)
        for layer in range(q.shape[0]):
            sl = slice(start, start + n)
            out[layer, sl] = cache.attend(layer, q[layer, sl], k[layer, sl], v[layer, sl], SCALE)
        cache.commit()
        start += n
    return out


def qkv(n, layers=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((layers, n, HQ, D)).astype(np.float32),
            rng.standard_normal((layers, n, HKV, D)).astype(np.float32),
            rng.standard_normal((layers, n, HKV, D)).astype(np.float32))


@pytest.mark.parametrize("chunks", [[40], [3, 13, 1, 1, 22], [1] * 40])
def test_exact_layers_read_their_window_only(chunks):
    q, k, v = qkv(40)
    cache = make_cache(manifest(), "1MiB", kv_bits="exact")
    assert isinstance(cache, LayeredKVCache) and isinstance(cache.full, ExactKVCache)
    out = run(cache, q, k, v, chunks)
    for layer, t in enumerate(TYPES):
        ref = oracle(q[layer], k[layer], v[layer], W if t == "sliding_attention" else None)
        np.testing.assert_allclose(out[layer], ref, atol=2e-5, rtol=0)


def test_turboquant_rings_are_fp16_and_chunk_invariant():
    q, k, v = qkv(30, seed=1)
    a = run(make_cache(manifest(), "1MiB", kv_bits="4,3"), q, k, v, [30])
    b = run(make_cache(manifest(), "1MiB", kv_bits="4,3"), q, k, v, [7, 1, 1, 21])
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    for layer in (0, 2):  # sliding layers: fp16 copies of the window, no codes
        h = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
        ref = oracle(q[layer], h(k[layer]), h(v[layer]), W)
        np.testing.assert_allclose(a[layer], ref, atol=1e-3, rtol=0)


def test_budget_pays_rings_then_full_layers_per_token():
    m = manifest()
    cache = make_cache(m, "1MiB", kv_bits="4,3")
    rings = 2 * 2 * HKV * W * D * 2  # K and V, two sliding layers, fp16
    assert cache.rings.nbytes == rings and cache.nbytes <= 2**20
    assert isinstance(cache.full, CompressedKVCache) and cache.full.num_layers == 1
    alone = CompressedKVCache.from_budget(2**20 - rings, cache.full.tq_k, cache.full.tq_v, HKV, D)
    assert cache.capacity == alone.capacity  # the tokens it holds are set by the full layer alone
    assert cache.bytes_per_token == alone.bytes_per_token
    with pytest.raises(TqedgeError, match="fixed 8-token rings"):
        make_cache(m, rings, kv_bits="exact")


def test_codecs_keep_their_layer_seeds():
    cache = make_cache(manifest(), "1MiB", kv_bits="K4V3+L1@K8V4")
    assert (cache.full.tq_k[0].config.bits, cache.full.tq_v[0].config.bits) == (8.0, 4.0)  # layer 1 is the full one


def test_trim_until_the_rings_wrap():
    q, k, v = qkv(12)
    cache = make_cache(manifest(), "1MiB", kv_bits="exact")
    run(cache, q[:, :6], k[:, :6], v[:, :6], [6])
    assert cache.evicted == 0
    cache.trim(2)
    out = run(cache, q[:, 4:12], k[:, 4:12], v[:, 4:12], [8])  # rewritten after the trim
    np.testing.assert_allclose(out[0, -1], oracle(q[0], k[0], v[0], W)[-1], atol=2e-5, rtol=0)
    assert cache.evicted == 12 - W
    with pytest.raises(TqedgeError, match="cannot trim"):
        cache.trim(1)


def test_all_global_models_keep_the_uniform_cache():
    m = manifest(layer_types=None)
    assert isinstance(make_cache(m, "1MiB", kv_bits="exact"), ExactKVCache)
    assert isinstance(make_cache(m, "1MiB"), CompressedKVCache)
    m.architecture = dataclasses.replace(m.architecture, layer_types=["full_attention"] * 3)
    assert isinstance(make_cache(m, "1MiB"), CompressedKVCache)


def test_manifest_validates_layer_types():
    m = manifest(layer_types=["sliding_attention", "global"])
    with pytest.raises(TqedgeError, match="layer_types must list 2"):
        m.validate()
    with pytest.raises(TqedgeError, match="sliding_window"):
        manifest(window=None).validate()


def test_session_state_round_trips(tmp_path):
    from tqedge.runtime.session_file import cache_options, decode_session, encode_session

    q, k, v = qkv(20)
    for bits in ("exact", "4,3"):
        cache = make_cache(manifest(), "1MiB", kv_bits=bits)
        run(cache, q[:, :12], k[:, :12], v[:, :12], [12])
        again = make_cache(manifest(), **cache_options(cache))
        again.load_state(decode_session(encode_session("fp", cache)).state)
        a = run(cache, q[:, 12:], k[:, 12:], v[:, 12:], [1] * 8)
        b = run(again, q[:, 12:], k[:, 12:], v[:, 12:], [1] * 8)
        np.testing.assert_array_equal(a, b)
