"""Generation loop on TinyLM (a real tiny transformer over the real exact cache): chunked
prefill vs one-shot forward, greedy tokens vs recomputing every step from scratch, stop
rules, stats, and overflow policies."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from _bundles import TinyLM, smollm2_bundle, smollm2_model  # noqa: F401  (fixtures)

from tqedge.bundle import GenerationSpec
from tqedge.errors import TqedgeError
from tqedge.runtime import generate as G

PROMPT = "The quick brown fox jumps over the lazy dog. What is the capital of France?"


@pytest.fixture(scope="module")
def lm():
    return TinyLM()


def _greedy(lm, prompt, n, **kw):
    rs = list(G.stream_generate(lm, prompt, max_tokens=n, temperature=0, kv_bits="exact", **kw))
    return [r.token for r in rs], rs


@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_chunked_prefill_equals_one_shot(lm, chunk):
    ids = lm.encode(PROMPT * 3)
    cache = lm.new_cache()
    lm.calls.clear()
    out = G.prefill(lm, cache, ids, chunk=chunk)
    assert max(lm.calls) <= chunk and sum(lm.calls) == len(ids)
    np.testing.assert_allclose(out, lm.reference_logits(ids), rtol=1e-4, atol=1e-4)
    assert cache.offset == len(ids)


def test_prefill_chunk_capped_by_ring(lm):
    cache = lm.new_cache(kv_budget=40 * 256)  # 40 slots, 4 sinks → ring of 36
    lm.calls.clear()
    G.prefill(lm, cache, list(range(3, 103)), chunk=256)
    assert max(lm.calls) == 36 and cache.evicted == 100 - 40


def test_greedy_tokens_equal_recompute_oracle(lm):
    ids = lm.encode(PROMPT)
    toks, _ = _greedy(lm, PROMPT, 12)
    seq = list(ids)
    for t in toks:
        assert t == int(np.argmax(lm.reference_logits(seq)))
        seq.append(t)


def test_stream_text_is_decode_of_tokens_and_length_finish(lm):
    toks, rs = _greedy(lm, PROMPT, 20)
    assert len(toks) == 20 and rs[-1].finish_reason == "length"
    assert all(r.finish_reason is None for r in rs[:-1])
    assert "".join(r.text for r in rs) == lm.tokenizer.decode(toks)
    st = rs[-1].stats
    n_prompt = len(lm.encode(PROMPT))
    assert (st.prompt_tokens, st.generation_tokens) == (n_prompt, 20)
    assert st.kv_tokens == n_prompt + 19  # the last token is never fed
    assert st.kv_capacity_tokens == 1024 and st.kv_capacity_bytes == 256 * 1024
    assert st.prefill_tps > 0 and st.decode_tps > 0 and st.evicted == 0


def test_eos_stops_and_is_not_text():
    base = TinyLM()
    toks, _ = _greedy(base, PROMPT, 6)
    eos = toks[3]
    first = toks.index(eos)
    lm = TinyLM(eos=(eos,))
    got, rs = _greedy(lm, PROMPT, 50)
    assert got == toks[: first + 1] and rs[-1].finish_reason == "eos"
    assert "".join(r.text for r in rs) == lm.tokenizer.decode(toks[:first])


def test_stop_string_cuts_text_and_never_emits_it(lm):
    toks, _ = _greedy(lm, PROMPT, 30)
    full = lm.tokenizer.decode(toks)
    stop = full[10:13]
    cut = full[: full.index(stop)]
    _, rs = _greedy(lm, PROMPT, 30, stop=["zzzz-never", stop])
    assert rs[-1].finish_reason == "stop"
    assert "".join(r.text for r in rs) == cut
    assert G.generate(lm, PROMPT, max_tokens=30, temperature=0, kv_bits="exact", stop=stop) == cut


def test_text_held_for_a_possible_stop_is_released_at_the_end():
    toks, _ = _greedy(TinyLM(), PROMPT, 10)
    full = TinyLM().tokenizer.decode(toks)
    _, rs = _greedy(TinyLM(), PROMPT, 10, stop=[full[-2:] + "\x00never"])
    assert "".join(r.text for r in rs) == full and rs[-1].finish_reason == "length"
    lm = TinyLM(eos=(toks[6],))  # ends on an EOS while text is held back
    cut = lm.tokenizer.decode(toks[: toks.index(toks[6])])
    _, rs = _greedy(lm, PROMPT, 50, stop=[cut[-2:] + "\x00never"])
    assert "".join(r.text for r in rs) == cut and rs[-1].finish_reason == "eos"


def test_stop_matcher_holds_back_partial_matches():
    m = G.StopMatcher(["STOP", "END!"])
    assert m.feed("abc S") == ("abc ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("x E") == ("STx ", False)
    assert m.feed("ND") == ("", False)
    assert m.feed("!tail") == ("", True)
    m2 = G.StopMatcher("STOP")
    assert m2.feed("xxST") == ("xx", False) and m2.flush() == "ST"
    assert G.StopMatcher(None).feed("STOP") == ("STOP", False)


def _first_stop_cut(text, stops):
    """Oracle: scan end positions; cut before the first stop string that is complete."""
    for e in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:e].endswith(s)]
        if done:
            return text[: e - max(map(len, done))], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(st.text("abc", max_size=30), st.lists(st.text("abc", min_size=1, max_size=4), max_size=3),
       st.lists(st.integers(0, 30), max_size=8))
def test_stop_matcher_equals_oracle_for_any_split(text, stops, cuts):
    bounds = sorted(set([0, len(text)] + [c for c in cuts if c <= len(text)]))
    m, out, hit = G.StopMatcher(stops), [], False
    for a, b in zip(bounds, bounds[1:]):
        piece, hit = m.feed(text[a:b])
        out.append(piece)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    assert ("".join(out), hit) == _first_stop_cut(text, stops)


def test_seeded_sampling_reproducible(lm):
    kw = dict(max_tokens=25, temperature=1.0, top_p=0.95, kv_bits="exact")
    a = G.generate(lm, PROMPT, seed=7, **kw)
    assert a == G.generate(lm, PROMPT, seed=7, **kw)
    assert a != G.generate(lm, PROMPT, seed=8, **kw)


def test_defaults_come_from_manifest():
    lm = TinyLM(generation=GenerationSpec(temperature=0.0, max_tokens=5))
    rs = list(G.stream_generate(lm, PROMPT, kv_bits="exact"))
    assert len(rs) == 5 and rs[-1].finish_reason == "length"
    toks, _ = _greedy(TinyLM(), PROMPT, 5)
    assert [r.token for r in rs] == toks


def test_repetition_penalty_changes_greedy_path(lm):
    plain = G.generate(lm, PROMPT, max_tokens=30, temperature=0, kv_bits="exact")
    pen = G.generate(lm, PROMPT, max_tokens=30, temperature=0, kv_bits="exact", repetition_penalty=5.0)
    assert plain != pen


def test_policy_error_names_capacity_and_budget(lm):
    cache = lm.new_cache(kv_budget=64 * 256, policy="error")  # 64 tokens
    with pytest.raises(TqedgeError, match=r"holds 64 tokens.*budget of at least 25.0 KiB"):
        list(G.stream_generate(lm, list(range(3, 103)), max_tokens=5, cache=cache))
    cache.reset()
    with pytest.raises(TqedgeError, match="the reply needs 65 tokens"):
        list(G.stream_generate(lm, list(range(3, 53)), max_tokens=100, temperature=0, cache=cache))


def test_policy_slide_keeps_going(lm):
    cache = lm.new_cache(kv_budget=64 * 256, policy="slide")
    rs = list(G.stream_generate(lm, list(range(3, 103)), max_tokens=80, temperature=0, cache=cache))
    assert rs[-1].finish_reason == "length" and len(rs) == 80
    assert rs[-1].stats.evicted == 100 + 79 - 64 and rs[-1].stats.kv_tokens == 64


def test_bad_inputs(lm):
    with pytest.raises(TqedgeError, match="max_tokens"):
        G.generate(lm, PROMPT, max_tokens=0, kv_bits="exact")
    with pytest.raises(TqedgeError, match="empty"):
        G.generate(lm, [], kv_bits="exact")


def test_smollm2_chats_in_threads_share_the_model(smollm2_model):
    """Two threads generating on one real ONNX model give the sequential results (no lock)."""
    m = smollm2_model
    prompts = ["The capital of France is", "One, two, three, four,"]
    kw = dict(max_tokens=8, temperature=0, kv_bits="exact", kv_budget="8MiB")
    want = [G.generate(m, p, **kw) for p in prompts]
    got = [None, None]

    def run(i):
        got[i] = G.generate(m, prompts[i], **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want and "Paris" in want[0]
