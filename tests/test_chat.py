"""Chat: multi-turn cache reuse on TinyLM (oracle: a fresh generation from the whole rendered
conversation), sliding and error policies, and the same on SmolLM2 once a bundle exports."""

from __future__ import annotations

import numpy as np
import pytest
from _bundles import TinyLM, smollm2_bundle, smollm2_model  # noqa: F401  (fixtures)

from tqedge.errors import TqedgeError
from tqedge.runtime import generate as G
from tqedge.runtime.chat import Chat, common_prefix
from tqedge.runtime.template import render_for

GREEDY = dict(temperature=0, max_tokens=12)


@pytest.fixture
def lm():
    return TinyLM()


def _rendered_ids(model, messages):
    return model.encode(render_for(model.manifest, messages), add_special_tokens=False)


def test_turn_two_prefills_only_the_new_tokens_and_matches_fresh_generation(lm):
    chat = Chat(lm, system="Be brief.", kv_bits="exact", **GREEDY)
    chat.send("Hello there")
    held = chat.cached_ids
    assert len(held) == chat.cache.offset
    msgs = chat.messages + [{"role": "user", "content": "What is the capital of France?"}]
    ids = _rendered_ids(lm, msgs)
    lm.calls.clear()
    reply2 = chat.send("What is the capital of France?")
    expected_prefill = len(ids) - common_prefix(held, ids)
    assert lm.calls[0] == expected_prefill < len(ids) // 2
    assert chat.stats.prompt_tokens == expected_prefill
    assert chat.stats.cached_tokens == len(ids) - expected_prefill
    # oracle: a fresh cache fed the whole rendered conversation gives the same reply
    assert reply2 == G.generate(lm, ids, kv_bits="exact", **GREEDY)
    assert chat.messages[-1] == {"role": "assistant", "content": reply2}
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_trim_after_stop_string_keeps_cache_exact(lm):
    chat = Chat(lm, kv_bits="exact", **GREEDY)
    full = chat.send("Hello")
    chat.reset()
    stop = full[4:6]
    cut = chat.send("Hello", stop=[stop])
    assert cut == full[: full.index(stop)]
    ids = _rendered_ids(lm, chat.messages + [{"role": "user", "content": "Again"}])
    # cache holds tokens beyond the cut reply → the next turn must trim them away
    assert common_prefix(chat.cached_ids, ids) < len(chat.cached_ids)
    assert chat.send("Again") == G.generate(lm, ids, kv_bits="exact", **GREEDY)


def test_stream_reply_joins_conversation(lm):
    chat = Chat(lm, kv_bits="exact", **GREEDY)
    pieces = list(chat.send("Hi", stream=True))
    assert chat.messages[-1]["content"] == "".join(pieces)
    chat2 = Chat(lm, kv_bits="exact", **GREEDY)
    assert chat2.send("Hi") == "".join(pieces)


def test_interrupted_stream_keeps_partial_reply_and_next_turn_is_exact(lm):
    chat = Chat(lm, kv_bits="exact", **GREEDY)
    stream = chat.send("Hello", stream=True)
    got = [next(stream) for _ in range(3)]
    stream.close()
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(got)}
    ids = _rendered_ids(lm, chat.messages + [{"role": "user", "content": "Go on"}])
    assert chat.send("Go on") == G.generate(lm, ids, kv_bits="exact", **GREEDY)


def test_reset_and_stats(lm):
    chat = Chat(lm, system="S", kv_bits="exact", **GREEDY)
    chat.send("one")
    assert chat.stats.generation_tokens >= 1 and chat.cache.offset > 0
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "S"}]
    assert chat.cache.offset == 0 and chat.stats is None and chat.cached_ids == []


def test_sliding_cache_keeps_conversation_going(lm):
    chat = Chat(lm, kv_bits="exact", kv_budget=96 * 256, policy="slide", **GREEDY)  # 96 tokens
    for i in range(8):
        chat.send(f"Tell me about the rain in Spain, part {i}.")
        if chat.cache.evicted:
            lm.calls.clear()
            chat.send("And then?")
            # no re-prefill of the whole conversation: only the new turn's tokens
            assert lm.calls[0] < 40 and chat.stats.evicted > 0
            break
    else:
        pytest.fail("the cache never slid")
    assert chat.cache.length == chat.cache.capacity == 96


def test_error_policy_reports_budget_and_keeps_history(lm):
    chat = Chat(lm, kv_bits="exact", kv_budget=200 * 256, policy="error", **GREEDY)
    done = []
    with pytest.raises(TqedgeError, match=r"cache holds 200 tokens.*budget of at least"):
        for i in range(10):
            chat.send(f"Tell me about the rain in Spain, please ({i}).")
            done.append(i)
    assert len(done) >= 1  # the first turns fit; a later one overflowed
    roles = [m["role"] for m in chat.messages]
    assert roles[-1] == "assistant" and roles.count("user") in (len(done), len(done) + 1)


def test_failed_prompt_leaves_messages_unchanged(lm):
    chat = Chat(lm, kv_bits="exact", kv_budget=20 * 256, policy="error", **GREEDY)
    with pytest.raises(TqedgeError, match="the prompt needs"):
        chat.send("x " * 50)
    assert chat.messages == []


def test_bad_chat_options(lm):
    with pytest.raises(TqedgeError, match="no chat template"):
        Chat(TinyLM(chat_template=None), kv_bits="exact")
    with pytest.raises(TqedgeError, match="unknown chat option"):
        Chat(lm, kv_bits="exact", temprature=0)
    chat = Chat(lm, kv_bits="exact")
    with pytest.raises(TqedgeError, match="unknown sampling option"):
        chat.send("x", topk=3)
    with pytest.raises(TqedgeError, match="string"):
        chat.send(42)


def test_model_chat_wrapper(lm):
    chat = lm.chat(system="S", kv_bits="exact", **GREEDY)
    assert isinstance(chat, Chat) and chat.send("hi") == Chat(lm, system="S", kv_bits="exact", **GREEDY).send("hi")


# -- SmolLM2 (real model) ---------------------------------------------------------------------

def test_smollm2_turn_two_reuses_cache(smollm2_model):
    m = smollm2_model
    chat = m.chat(kv_bits="exact", kv_budget="64MiB", temperature=0, max_tokens=24)
    r1 = chat.send("What is the capital of France?")
    assert "Paris" in r1
    msg = "And of Germany?"
    chat.send(msg)
    n_msg = len(m.encode(msg, add_special_tokens=False))
    # only the new message plus the template's few tokens (and a possibly re-tokenized reply tail)
    assert chat.stats.prompt_tokens <= n_msg + 12
    assert chat.stats.cached_tokens > 40


@pytest.mark.slow
def test_smollm2_long_conversation_under_16mib(smollm2_model, wikitext):
    m = smollm2_model
    words = wikitext.split()
    turns = [" ".join(words[i * 450:(i + 1) * 450]) + "\nSummarize." for i in range(5)]  # ~3000 tokens
    chat = m.chat(kv_bits="exact", kv_budget="16MiB", policy="slide", temperature=0, max_tokens=8)
    fed = 0
    for t in turns:
        chat.send(t)
        fed += chat.stats.prompt_tokens + chat.stats.generation_tokens
        # every turn, evicted or not, prefills about its own message only (+ the template and,
        # on the first turn, the default system prompt)
        assert chat.stats.prompt_tokens <= len(m.encode(t, add_special_tokens=False)) + 40
    assert fed > 3000 and chat.cache.evicted > 0
    assert chat.cache.length == chat.cache.capacity < 800
    strict = m.chat(kv_bits="exact", kv_budget="16MiB", policy="error", temperature=0, max_tokens=8)
    with pytest.raises(TqedgeError, match=rf"holds {strict.cache.capacity} tokens .*budget of at least"):
        for t in turns:
            strict.send(t)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix(np.arange(5), np.arange(3)) == 3
