"""CompressedKVCache against an independent NumPy oracle: keep every token, decode the codes with
``tq.decode``, and do plain softmax attention under the documented read rule (sinks and the
recent window in fp16, older tokens compressed, tokens beyond the ring gone)."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

from tqedge.bundle import KVSpec
from tqedge.errors import TqedgeError
from tqedge.runtime.cache import ExactKVCache, build_codecs, check_cache_options, layer_seed, make_cache
from tqedge.runtime.compressed_cache import MIN_COMPRESSED, CompressedKVCache

L, HKV, HQ, D = 2, 2, 6, 64
SCALE = 1.0 / np.sqrt(D)


def codecs(bits=(4.0, 3.0), layers=L, **kw):
    return build_codecs(KVSpec(**kw), layers, D, bits)


def sequence(n, seed=0):
    """Random q, k, v for ``n`` tokens and every layer: (L, n, H, D) each."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((L, n, HQ, D)).astype(np.float32)
    k = (rng.standard_normal((L, n, HKV, D)) * 2 + rng.standard_normal(D)).astype(np.float32)
    v = rng.standard_normal((L, n, HKV, D)).astype(np.float32)
    return q, k, v


def feed(cache, q, k, v, chunks):
    """Run the sequence through ``cache`` in steps of ``chunks`` tokens; (L, n, Hq, D) outputs."""
    outs, start = np.zeros_like(q), 0
    for t in chunks:
        cache.prepare(t)
        for layer in range(L):
            sl = slice(start, start + t)
            outs[layer, sl] = cache.attend(layer, q[layer, sl], k[layer, sl], v[layer, sl], SCALE)
        cache.commit()
        start += t
    assert start == q.shape[1]
    return outs


def reference(q, k, v, tq_k, tq_v, sinks, window, ring, fp_lo=0, exact_steps=None):
    """Plain softmax attention with the read rule, keys decoded by tq.decode. (L, n, Hq, D)."""
    n, g = q.shape[1], HQ // HKV
    out = np.zeros_like(q)
    for layer in range(L):
        k16 = k[layer].astype(np.float16).astype(np.float32)  # (n, Hkv, D)
        v16 = v[layer].astype(np.float16).astype(np.float32)
        kd = tq_k[layer].decode(*tq_k[layer].encode(k16.reshape(-1, D))).reshape(n, HKV, D)
        vd = tq_v[layer].decode(*tq_v[layer].encode(v16.reshape(-1, D))).reshape(n, HKV, D)
        for t in range(n):
            for hq in range(HQ):
                h = hq // g
                keys, vals = [], []
                for p in range(t + 1):
                    if p >= sinks and t - p >= ring:
                        continue  # evicted
                    same_step = exact_steps is not None and exact_steps[p] == exact_steps[t]
                    fp = p < sinks or (t - p < window and p >= fp_lo) or same_step
                    keys.append(k16[p, h] if fp else kd[p, h])
                    vals.append(v16[p, h] if fp else vd[p, h])
                s = np.array(keys) @ q[layer, t, hq] * SCALE
                w = np.exp(s - s.max())
                out[layer, t, hq] = (w / w.sum()) @ np.array(vals)
    return out


CHUNKINGS = {
    "decode": [1] * 40,
    "prefill": [40],
    "mixed": [7, 1, 1, 13, 1, 2, 15],
    "blocks": [16, 16, 8],
}


@pytest.mark.parametrize("name", list(CHUNKINGS))
def test_matches_reference_without_eviction(name):
    q, k, v = sequence(40)
    tk, tv = codecs()
    cache = CompressedKVCache(tk, tv, HKV, D, ring=60, sinks=3, window=8)
    out = feed(cache, q, k, v, CHUNKINGS[name])
    ref = reference(q, k, v, tk, tv, sinks=3, window=8, ring=60)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunks", [[1] * 70, [20, 20, 20, 10], [23, 1, 1, 1, 17, 1, 16, 10]])
def test_slide_eviction_matches_reference_in_any_chunking(chunks):
    q, k, v = sequence(70, seed=1)
    tk, tv = codecs((3.0, 2.0))
    cache = CompressedKVCache(tk, tv, HKV, D, ring=24, sinks=2, window=6, policy="slide")
    out = feed(cache, q, k, v, chunks)
    assert cache.evicted == 70 - 26 and cache.length == cache.capacity == 26
    ref = reference(q, k, v, tk, tv, sinks=2, window=6, ring=24)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_chunkings_agree_with_each_other():
    q, k, v = sequence(40, seed=2)
    tk, tv = codecs()
    outs = [feed(CompressedKVCache(tk, tv, HKV, D, ring=36, sinks=4, window=5), q, k, v, c)
            for c in CHUNKINGS.values()]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-5, rtol=1e-5)


def test_window_covering_everything_equals_exact_cache():
    q, k, v = sequence(40, seed=3)
    tk, tv = codecs((2.0, 2.0))  # coarse codes: any compressed read would show
    comp = CompressedKVCache(tk, tv, HKV, D, ring=64, sinks=4, window=64)
    exact = ExactKVCache(L, HKV, D, capacity=64)
    for chunks in ([1] * 40, [25, 15]):
        comp.reset()
        exact.reset()
        np.testing.assert_allclose(feed(comp, q, k, v, chunks), feed(exact, q, k, v, chunks), atol=2e-3)


def test_no_window_and_no_sinks_reads_everything_compressed():
    q, k, v = sequence(20, seed=4)
    tk, tv = codecs()
    ref = reference(q, k, v, tk, tv, sinks=0, window=0, ring=40)
    for chunks in ([1] * 20, [9, 11]):
        out = feed(CompressedKVCache(tk, tv, HKV, D, ring=40, sinks=0, window=0), q, k, v, chunks)
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_exact_prefill_reads_a_steps_own_tokens_in_fp16():
    q, k, v = sequence(30, seed=5)
    tk, tv = codecs()
    chunks = [18, 1, 1, 10]
    cache = CompressedKVCache(tk, tv, HKV, D, ring=40, sinks=2, window=4, exact_prefill=True)
    out = feed(cache, q, k, v, chunks)
    steps = np.repeat(np.arange(len(chunks)), chunks)
    ref = reference(q, k, v, tk, tv, sinks=2, window=4, ring=40, exact_steps=steps)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_trim_reads_lost_window_tokens_compressed():
    q, k, v = sequence(40, seed=6)
    tk, tv = codecs()
    cache = CompressedKVCache(tk, tv, HKV, D, ring=60, sinks=2, window=8)
    feed(cache, q[:, :30], k[:, :30], v[:, :30], [20, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    cache.trim(5)
    assert cache.offset == cache.length == 25
    out = feed(cache, q[:, 25:], k[:, 25:], v[:, 25:], [1] * 5 + [10])
    ref = reference(q, k, v, tk, tv, sinks=2, window=8, ring=60, fp_lo=30 - 8)
    np.testing.assert_allclose(out, ref[:, 25:], atol=1e-4, rtol=1e-4)


def test_state_round_trip_continues_bit_exactly():
    q, k, v = sequence(50, seed=7)
    tk, tv = codecs()
    a = CompressedKVCache(tk, tv, HKV, D, ring=32, sinks=2, window=6)
    feed(a, q[:, :37], k[:, :37], v[:, :37], [30, 1, 1, 1, 1, 1, 1, 1])
    state = {key: (val.copy() if isinstance(val, np.ndarray) else val) for key, val in a.state().items()}
    assert all(isinstance(val, (np.ndarray, int)) for val in state.values())
    b = CompressedKVCache(tk, tv, HKV, D, ring=32, sinks=2, window=6)
    b.load_state(state)
    rest = (q[:, 37:], k[:, 37:], v[:, 37:])
    np.testing.assert_array_equal(feed(a, *rest, [1] * 13), feed(b, *rest, [1] * 13))
    with pytest.raises(TqedgeError, match="window"):
        CompressedKVCache(tk, tv, HKV, D, ring=32, sinks=2, window=7).load_state(state)


def test_budget_sizes_ring_and_never_exceeds_it():
    tk, tv = codecs()
    fixed, per = CompressedKVCache.layout_bytes(tk, tv, HKV, D, sinks=4, window=16)
    # independent count: fp16 sinks + window for K and V, codes + fp16 scales per token
    assert fixed == 2 * L * HKV * 20 * D * 2
    assert per == HKV * sum(c.code_bytes + 2 * c.num_scales for c in tk + tv)
    for budget in (fixed + 48 * per, fixed + 1000 * per + per - 1, 10 * 2**20):
        cache = CompressedKVCache.from_budget(budget, tk, tv, HKV, D, sinks=4, window=16)
        assert cache.nbytes <= budget < cache.nbytes + per
        assert cache.capacity == 4 + (budget - fixed) // per


def test_too_small_budget_is_refused_with_the_minimum():
    tk, tv = codecs()
    fixed, per = CompressedKVCache.layout_bytes(tk, tv, HKV, D, sinks=4, window=16)
    minimum = fixed + (16 + MIN_COMPRESSED) * per
    CompressedKVCache.from_budget(minimum, tk, tv, HKV, D, sinks=4, window=16)
    with pytest.raises(TqedgeError, match=f"minimum is .*{minimum} bytes"):
        CompressedKVCache.from_budget(minimum - 1, tk, tv, HKV, D, sinks=4, window=16)


def test_error_policy_names_capacity_and_needed_budget():
    tk, tv = codecs()
    fixed, per = CompressedKVCache.layout_bytes(tk, tv, HKV, D, sinks=2, window=8)
    cache = CompressedKVCache.from_budget(fixed + 40 * per, tk, tv, HKV, D, sinks=2, window=8, policy="error")
    q, k, v = sequence(50, seed=8)
    feed(cache, q[:, :42], k[:, :42], v[:, :42], [42])
    with pytest.raises(TqedgeError, match=r"capacity of 42 tokens.*50 tokens need a budget of") as e:
        cache.prepare(8)
    need = fixed + 48 * per
    from tqedge.units import format_bytes
    assert format_bytes(need) in str(e.value)


def test_make_cache_dispatch_and_per_layer_bits():
    m = _manifest(layer_bits={"1": [2.0, 2.0]})
    exact = make_cache(m, "4MiB", kv_bits="exact")
    assert isinstance(exact, ExactKVCache) and exact.nbytes <= 4 * 2**20
    default = make_cache(m, "4MiB")
    assert isinstance(default, CompressedKVCache) and default.nbytes <= 4 * 2**20
    assert default.k_codes[1].shape[-1] < default.k_codes[0].shape[-1]  # layer 1 override: 2 bits
    uniform = make_cache(m, "4MiB", kv_bits="4,3", window=16, sinks=2)
    assert uniform.k_codes[1].shape == uniform.k_codes[0].shape and uniform.window == 16
    assert make_cache(m, "4MiB", kv_bits=3).capacity > make_cache(m, "4MiB", kv_bits=(4, 4)).capacity
    with pytest.raises(TqedgeError, match="kv bits"):
        make_cache(m, "4MiB", kv_bits="fast")
    with pytest.raises(TqedgeError, match="minimum"):
        make_cache(m, "100KiB")


def _sliding_manifest():
    """Gemma-3-like: layers 0 and 2 slide over 8 tokens, layer 1 is full (runtime/sliding_cache.py)."""
    m = _manifest()
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    arch = dataclasses.replace(m.architecture, name="gemma3", num_layers=3, layer_types=types, sliding_window=8,
                               rope_local_theta=1e4)
    return dataclasses.replace(m, architecture=arch)


BAD_CACHE_OPTIONS = [
    dict(kv_budget="abc"), dict(kv_budget="-1MiB"), dict(kv_budget="0"), dict(kv_budget="40KiB"),
    dict(kv_budget="8KiB", kv_bits="exact"), dict(kv_budget="4MiB", kv_bits="fast"),
    dict(kv_budget="4MiB", kv_bits="9,9"), dict(kv_budget="4MiB", kv_bits="K4V3+L7@K2V2"),
    dict(kv_budget="4MiB", kv_bits="3.01"), dict(kv_budget="4MiB", window=-1), dict(kv_budget="4MiB", sinks=-1),
    dict(kv_budget="4MiB", sinks="x"), dict(kv_budget="4MiB", policy="drop"),
    dict(kv_budget="4MiB", rotation="spiral"), dict(kv_budget="4MiB", kv_bits="exact", sinks=-3),
]
GOOD_CACHE_OPTIONS = [
    dict(kv_budget="4MiB"), dict(kv_budget="4MiB", kv_bits="exact", policy="error"),
    dict(kv_budget="4MiB", kv_bits="K4V3+L1@K2V2", window=0, sinks=0), dict(kv_budget=2**20, kv_bits="3.5"),
]


@pytest.mark.parametrize("sliding", [False, True], ids=["uniform", "sliding"])
def test_check_cache_options_refuses_what_make_cache_refuses(sliding):
    m = _sliding_manifest() if sliding else _manifest()
    for opts in BAD_CACHE_OPTIONS:
        with pytest.raises(TqedgeError) as built:
            make_cache(m, **opts)
        with pytest.raises(TqedgeError) as checked:
            check_cache_options(m, **opts)
        assert str(checked.value) == str(built.value), opts
    for opts in GOOD_CACHE_OPTIONS:
        make_cache(m, **opts)
        check_cache_options(m, **opts)
    # the budget boundary is the same: the smallest cache fits, one byte less does not
    kv, (n_sliding, n_full) = KVSpec(), ((2, 1) if sliding else (0, L))
    for bits in ("exact", None):
        rings = 2 * n_sliding * HKV * 8 * D * (4 if bits == "exact" else 2)  # fp32 / fp16 rings of 8 tokens
        if bits == "exact":  # sinks + 2 fp32 tokens of the full layers' keys and values
            full = (kv.sinks + 2) * 2 * n_full * HKV * D * 4
        else:  # fp16 sinks + window, and window + MIN_COMPRESSED compressed slots
            fixed, per = CompressedKVCache.layout_bytes(*build_codecs(kv, n_full, D), HKV, D, kv.sinks, kv.window)
            full = fixed + (kv.window + MIN_COMPRESSED) * per
        make_cache(m, rings + full, kv_bits=bits)
        check_cache_options(m, rings + full, kv_bits=bits)
        with pytest.raises(TqedgeError):
            make_cache(m, rings + full - 1, kv_bits=bits)
        with pytest.raises(TqedgeError):
            check_cache_options(m, rings + full - 1, kv_bits=bits)


@pytest.mark.parametrize("sliding", [False, True], ids=["uniform", "sliding"])
def test_check_cache_options_allocates_nothing(sliding):
    """200 GiB of cache options are checked instantly: nothing allocated (tracemalloc sees numpy's
    buffers, as the 16 MiB cache built below shows)."""
    m = _sliding_manifest() if sliding else _manifest()
    for bits in (None, "exact", "K4V3+L1@K2V2"):
        tracemalloc.start()
        check_cache_options(m, "200GiB", kv_bits=bits)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 2**20, (bits, peak)
    tracemalloc.start()
    cache = make_cache(m, "16MiB", kv_bits="exact")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak >= cache.nbytes > 12 * 2**20


def test_layer_seeds_differ_and_are_stable():
    seeds = {layer_seed(0, layer, kind) for layer in range(4) for kind in "kv"}
    assert len(seeds) == 8 and layer_seed(0, 2, "k") == layer_seed(0, 2, "k") != layer_seed(1, 2, "k")


def _manifest(**kv):
    from tqedge.bundle import ArchSpec, Manifest, TokenizerSpec, WeightSpec
    arch = ArchSpec(name="llama", vocab_size=10, hidden_size=HQ * D, intermediate_size=8, num_layers=L,
                    num_heads=HQ, num_kv_heads=HKV, head_dim=D, rms_norm_eps=1e-5, rope_theta=1e4,
                    max_position_embeddings=4096, tie_word_embeddings=True)
    return Manifest(name="t", architecture=arch, tokenizer=TokenizerSpec(), weights=WeightSpec(), kv=KVSpec(**kv))


# -- the real model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_model(smollm2_gguf, tmp_path_factory):
    from tqedge.exporters.export import export
    from tqedge.runtime.model import load

    out = tmp_path_factory.mktemp("bundle") / "smol.tqe"
    export(smollm2_gguf, out, weights="fp32")
    return load(out, verify="none")


def _feed_all(model, cache, ids, chunk=256):
    """Teacher-forced logits (n, vocab) of ``ids`` through ``cache`` in chunks."""
    return np.concatenate([model.forward(ids[s:s + chunk], cache, logits="all")
                           for s in range(0, len(ids), chunk)])


@pytest.mark.slow
def test_real_model_slides_through_3000_tokens_in_16mib(smol_model, wikitext):
    ids = smol_model.encode(wikitext[:40000])[:3000]
    assert len(ids) == 3000
    cache = smol_model.new_cache(kv_budget="16MiB")
    assert isinstance(cache, CompressedKVCache) and cache.nbytes <= 16 * 2**20
    for s in range(0, 3000, 256):
        logits = smol_model.forward(ids[s:s + 256], cache)
    assert cache.offset == 3000 and cache.evicted == 3000 - cache.capacity > 0
    assert np.isfinite(logits).all()


@pytest.mark.slow
def test_real_model_compressed_predictions_track_exact(smol_model, wikitext):
    ids = smol_model.encode(wikitext[2000:8000])[:400]
    exact = _feed_all(smol_model, smol_model.new_cache(kv_bits="exact"), ids)
    tq = _feed_all(smol_model, smol_model.new_cache(window=16, sinks=4), ids)  # K4V3, most reads compressed
    agree = np.mean(exact.argmax(-1) == tq.argmax(-1))
    assert agree >= 0.9, agree


def test_kv_presets_are_named_bit_pairs():
    from tqedge.runtime.kv_spec import KV_PRESETS, parse_kv_bits

    assert parse_kv_bits("balanced") == (4.0, 3.0)
    assert parse_kv_bits(" Quality ") == (4.0, 4.0)
    assert parse_kv_bits("tiny") == (3.0, 2.0)
    assert parse_kv_bits("exact") is None
    # presets are ordered by size: quality ≥ balanced ≥ tiny in total bits
    sizes = [sum(KV_PRESETS[n]) for n in ("quality", "balanced", "tiny")]
    assert sizes == sorted(sizes, reverse=True)
    with pytest.raises(TqedgeError, match="preset"):
        parse_kv_bits("huge")


def test_kv_spec_with_per_layer_overrides():
    from tqedge.runtime.kv_spec import parse_kv_spec

    assert parse_kv_spec("4,3") == ((4.0, 3.0), None)
    assert parse_kv_spec("exact") == (None, None)
    assert parse_kv_spec("k4v3+L1,2@K4V2+L0@k8v4") == ((4.0, 3.0), {"1": [4.0, 2.0], "2": [4.0, 2.0], "0": [8.0, 4.0]})
    for bad in ("K4V3+L1@K4V2+L1@K8V4", "K4V3+L1@K9V2", "K4V3+L@K4V2"):
        with pytest.raises(TqedgeError):
            parse_kv_spec(bad)
    m = _manifest()
    spec = make_cache(m, "4MiB", kv_bits="K4V3+L1@K2V2")
    uniform = make_cache(m, "4MiB", kv_bits="4,3")
    low = make_cache(m, "4MiB", kv_bits="2,2")
    # layer 1 stores exactly what a uniform K2V2 cache stores per token; the others K4V3's
    assert spec.k_codes[1].shape[-1] == low.k_codes[1].shape[-1] < spec.k_codes[0].shape[-1]
    assert spec.v_codes[0].shape[-1] == uniform.v_codes[0].shape[-1]
    per = [c.bytes_per_token for c in (spec, uniform, low)]
    assert per[0] == per[1] - (per[1] - per[2]) // L  # one of L layers at the low rate
    with pytest.raises(TqedgeError, match="layer"):
        make_cache(m, "4MiB", kv_bits=f"K4V3+L{L}@K2V2")


# -- bounded prefill temporaries -----------------------------------------------------------------
def _cache(kind, ring):
    if kind == "exact":
        return ExactKVCache(1, 3, D, capacity=ring + 4)
    (tk,), (tv,) = build_codecs(KVSpec(), 1, D, (4.0, 3.0))
    return CompressedKVCache([tk], [tv], 3, D, ring=ring, sinks=4, window=32)


def _fill(cache, n, rng, chunk=512):
    for s in range(0, n, chunk):
        t = min(chunk, n - s)
        cache.prepare(t)
        cache.attend(0, *(rng.standard_normal((t, h, D)).astype(np.float32) for h in (9, 3, 3)), SCALE)
        cache.commit()


@pytest.mark.parametrize("kind", ["exact", "turboquant"])
def test_tiled_prefill_equals_untiled(monkeypatch, kind):
    """Tiles of 16 keys / tiny score tiles give the single-tile result, over old and new tokens."""
    from tqedge.runtime import attention

    outs = []
    for key_tile, elements in ((16, 1), (1 << 20, 1 << 30)):
        monkeypatch.setattr(attention, "KEY_TILE", key_tile)
        monkeypatch.setattr(attention, "TILE_ELEMENTS", elements)
        rng = np.random.default_rng(11)
        cache = _cache(kind, ring=300)
        _fill(cache, 250, rng, chunk=100)
        q, k, v = (rng.standard_normal((70, h, D)).astype(np.float32) for h in (9, 3, 3))
        cache.prepare(70)  # 320 tokens: the ring of 300 slides
        outs.append(cache.attend(0, q, k, v, SCALE))
        cache.commit()
    np.testing.assert_allclose(outs[0], outs[1], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["exact", "turboquant"])
def test_prefill_temporaries_do_not_grow_with_context(kind):
    """Python-heap peak of one 256-token prefill step at 2,048 tokens of context is within a
    small margin of the peak at 1,024: no temporary is sized by the context (the untiled op
    held scores and dequantized keys of ~2-5 KB per context token here)."""
    import tracemalloc

    peaks = []
    for n in (1024, 2048):
        rng = np.random.default_rng(12)
        cache = _cache(kind, ring=n + 256)
        _fill(cache, n, rng)
        q, k, v = (rng.standard_normal((256, h, D)).astype(np.float32) for h in (9, 3, 3))
        cache.prepare(256)
        tracemalloc.start()
        cache.attend(0, q, k, v, SCALE)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        cache.commit()
    assert peaks[1] - peaks[0] < 64 * (2048 - 1024), peaks  # < 64 B per extra context token
