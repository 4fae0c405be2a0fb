"""Continuous batching (runtime/batch.py, the server engine): rows of several sequences in one forward.

Oracles: the same sequences run one at a time (``model.forward`` / ``model.generate``, whole
prompts, the unbatched code path). On the real SmolLM2 (fp32 weights): the dense rows are
computed independently of the other rows, so batched logits equal single logits bit for bit;
greedy replies under batching equal one-at-a-time replies except at near-ties (top-2 logit gap
< 1e-3, computed); a resent request reuses its cached prefix and still gets the same logits and
reply (chunks aligned to absolute positions), alone or batched with other conversations.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from _bundles import TinyLM, smollm2_bundle, smollm2_model  # noqa: F401  (fixtures)

from tqedge.errors import TqedgeError
from tqedge.runtime.batch import PROMPT_CHUNK, Batcher, BatchStream, BatchView, forward_batch
from tqedge.runtime.generate import generate_step
from tqedge.runtime.template import render_for

QUESTIONS = ["What is the capital of France?", "Write three short sentences about owls.",
             "Name three colours of the rainbow.", "Why is the sky blue?", "Give me a short tip for learning Python.",
             "What do bees make?", "How many legs does a spider have?", "Tell me a fun fact about the moon."]
OWLS = QUESTIONS[1]


def chat_ids(model, question: str) -> list[int]:
    text = render_for(model.manifest, [{"role": "user", "content": question}], add_generation_prompt=True)
    return model.encode(text, add_special_tokens=False)


def test_forward_batch_routes_rows_to_their_caches():
    lm = TinyLM()
    seqs = [lm.encode(t) for t in ("Hello, world!", "The rain in Spain", "tea")]
    singles = []
    for ids in seqs:
        c = lm.new_cache()
        singles.append((lm.forward(ids[:-1], c), lm.forward(ids[-1:], c)))
    caches = [lm.new_cache() for _ in seqs]
    first = forward_batch(lm, [(ids[:-1], c, i != 1) for i, (ids, c) in enumerate(zip(seqs, caches))])
    assert first[1] is None  # a non-final chunk gets no logits row
    last = forward_batch(lm, [(ids[-1:], c, True) for ids, c in zip(seqs, caches)])
    for (want0, want1), got0, got1, ids, c in zip(singles, first, last, seqs, caches):
        assert c.offset == len(ids)
        np.testing.assert_allclose(got1, want1, atol=1e-5)
        if got0 is not None:
            np.testing.assert_allclose(got0, want0, atol=1e-5)
    with pytest.raises(TqedgeError, match="only once"):
        BatchView([caches[0], caches[0]], [1, 1])


def test_batcher_budget_chunks_and_fairness():
    lm = TinyLM()
    long_ids = lm.encode("One two three four five six seven eight nine ten. " * 4)
    short = [BatchStream(lm, lm.encode("Hello"), lm.new_cache(), temperature=0, max_tokens=50, chunk=8)
             for _ in range(3)]
    b = Batcher(lm, step_tokens=12, chunk=8)
    for s in short:
        b.add(s)
    b.step()  # the three short prompts: one chunk each (the first may exceed the budget alone)
    assert all(not s.prefilling for s in short)
    late = BatchStream(lm, long_ids, lm.new_cache(), temperature=0, max_tokens=4, chunk=8)
    b.add(late)
    sizes = []
    while late.prefilling:
        rows, _ = b.plan()
        assert sum(len(t) for s, t in rows if s is not late) == 3  # every decoding stream gets its row
        sizes += [len(t) for s, t in rows if s is late]
        b.step()
    assert sum(sizes) == len(long_ids) and max(sizes) <= 8 and len(sizes) >= len(long_ids) // 8
    assert late.cache.offset == len(long_ids) and late.n_gen == 1


@pytest.fixture(scope="module")
def smol(smollm2_bundle):
    """fp32 weights, exact cache by default, on the segment backend."""
    import tqedge

    return tqedge.load(smollm2_bundle, backend="onnx", kv_bits="exact", kv_budget="64MiB", verify="size")


@pytest.mark.parametrize("kv_bits", ["exact", "4,3"])
def test_native_batch_routes_each_row_range_to_its_own_cache(smollm2_bundle, kv_bits):
    """The native op under a batch descriptor: whole prompts of three conversations in one Run,
    then a step mixing decode rows with a prompt chunk; every sequence's logits equal the same
    sequence run alone on the same backend, bit for bit (attention rows never mix)."""
    import tqedge

    m = tqedge.load(smollm2_bundle, backend="native", kv_bits=kv_bits, kv_budget="64MiB", verify="size",
                    threads=2, batched=True)  # as the server: onnxruntime on 2 threads, whatever the rows
    assert m.backend_name == "native" and m.backend.ort_threads == 2
    seqs = [chat_ids(m, q) for q in QUESTIONS[:3]]
    ref = []
    for ids in seqs:
        c = m.new_cache(kv_budget="8MiB")
        ref.append((m.forward(ids, c), m.forward([7], c), m.forward(ids[:5], c)))
    caches = [m.new_cache(kv_budget="8MiB") for _ in seqs]
    pre = m.forward_batch([(ids, c, True) for ids, c in zip(seqs, caches)])
    dec = m.forward_batch([([7], c, True) for c in caches[:2]] + [([7], caches[2], True)])
    mixed = m.forward_batch([(ids[:5], c, True) for ids, c in zip(seqs, caches)])  # 5-row chunks
    for (p, d, x), p2, d2, x2, ids, c in zip(ref, pre, dec, mixed, seqs, caches):
        assert c.offset == len(ids) + 6
        assert np.array_equal(p, p2) and np.array_equal(d, d2) and np.array_equal(x, x2)
    one = m.forward_batch([([9], caches[0], True), (seqs[1][:3], caches[1], False)])
    assert one[1] is None and caches[1].offset == len(seqs[1]) + 9


def test_batched_rows_equal_single_rows_bit_for_bit(smol):
    seqs = [chat_ids(smol, q) for q in QUESTIONS[:4]]
    ref = []
    for ids in seqs:
        c = smol.new_cache(kv_bits="4,3", kv_budget="8MiB")
        ref.append((smol.forward(ids, c), smol.forward([7], c)))
    caches = [smol.new_cache(kv_bits="4,3", kv_budget="8MiB") for _ in seqs]
    pre = forward_batch(smol, [(ids, c, True) for ids, c in zip(seqs, caches)])  # 4 whole prompts, one forward
    dec = forward_batch(smol, [([7], c, True) for c in caches])  # 4 decode rows, one forward
    for (p, d), p2, d2 in zip(ref, pre, dec):
        assert np.array_equal(p, p2) and np.array_equal(d, d2)


def test_greedy_replies_under_batching_equal_one_at_a_time(smol):
    """Exact cache, fp32: ≥ 7 of 8 replies identical; any difference starts at a near-tie."""
    n_new = 12
    prompts = [chat_ids(smol, q) for q in QUESTIONS]
    b = Batcher(smol)
    streams = [BatchStream(smol, ids, smol.new_cache(kv_budget="8MiB"), temperature=0, max_tokens=n_new,
                           repetition_penalty=1.0) for ids in prompts]
    EOS = set(smol.manifest.tokenizer.eos_token_ids)
    got = {id(s): [] for s in streams}
    for s in streams:
        b.add(s)
    while b.streams:
        responses, failed = b.step()
        assert not failed
        for s, r in responses:
            got[id(s)].append(r.token)
    same = 0
    for s, ids in zip(streams, prompts):
        want, gaps = [], []
        for tok, logits in generate_step(smol, smol.new_cache(kv_budget="8MiB"), ids):  # alone, whole prompt
            top2 = np.sort(logits)[-2:]
            want.append(tok)
            gaps.append(float(top2[1] - top2[0]))
            if tok in EOS or len(want) == n_new:
                break
        mine = got[id(s)]
        if mine == want:
            same += 1
            continue
        k = next(i for i, (x, y) in enumerate(zip(mine, want)) if x != y)
        assert gaps[k] < 1e-3, f"reply differs at a clear choice (top-2 gap {gaps[k]:.2e})"
    assert same >= 7


def _engine(smol):
    from tqedge.runtime.server.engine import Engine, Job
    from tqedge.runtime.server.sessions import SessionManager

    sessions = SessionManager(smol, "32MiB", max_sessions=4, kv_bits="4,3")
    engine = Engine(smol, sessions, max_queue=8)
    engine.start()

    def ask(ids_list):
        done = [threading.Event() for _ in ids_list]
        out = [{"text": [], "cached": None} for _ in ids_list]
        for i, ids in enumerate(ids_list):
            def emit(kind, payload, i=i):
                if kind == "text":
                    out[i]["text"].append(payload)
                elif kind == "start":
                    out[i]["cached"] = payload["cached"]
                elif kind in ("done", "error"):
                    out[i]["end"] = payload
                    done[i].set()
            engine.submit(Job(list(ids), {"temperature": 0, "max_tokens": 16, "repetition_penalty": 1.0}, emit))
        assert all(d.wait(300) for d in done)
        return [("".join(o["text"]), o["cached"]) for o in out]

    return engine, sessions, ask


def test_resent_request_and_batch_composition_give_the_same_reply(smol):
    """Default (TurboQuant) cache: the owls request alone, sent again (its prefix reused, cut
    back to a chunk boundary), and together with three other conversations: same reply."""
    owls = chat_ids(smol, OWLS)
    assert len(owls) > PROMPT_CHUNK  # so a resend really reuses cached tokens
    engine, sessions, ask = _engine(smol)
    try:
        ((first, c1),) = ask([owls])
        ((again, c2),) = ask([owls])
        mixed = ask([chat_ids(smol, q) for q in QUESTIONS[2:5]] + [owls])
    finally:
        engine.stop()
        sessions.close()
    assert c1 == 0 and c2 == (len(owls) - 1) // PROMPT_CHUNK * PROMPT_CHUNK > 0
    assert first and again == first and mixed[-1][0] == first
