"""Greedy replies under batching and prefix reuse: what differs, where, and at which top-2 gap.

1. The owls case (issue 15): one request, then the same request again reusing its cached
   prompt. "old": the previous server path (whole-prompt prefill, then the resend re-feeds the
   last prompt token alone); "new": prompt chunks aligned to multiples of PROMPT_CHUNK and the
   reused prefix cut back to a chunk boundary (runtime/batch.py, server/sessions.py). Also the
   logit difference of whole vs chunked prefill alone.
2. Eight chat prompts generated together (Batcher) vs one at a time (whole prompts,
   runtime/generate.py): how many greedy replies are identical and, for the others, the top-2
   logit gap of the one-at-a-time run where they first differ.

    python benchmarks/batch_determinism.py --bundle fp32.tqe --bundle int8.tqe [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OWLS = "Write three short sentences about owls."
QUESTIONS = ["What is the capital of France?", OWLS, "Name three colours of the rainbow.", "Why is the sky blue?",
             "Give me a short tip for learning Python.", "What do bees make?", "How many legs does a spider have?",
             "Tell me a fun fact about the moon."]


def chat_ids(m, q):
    from tqedge.runtime.template import render_for

    return m.encode(render_for(m.manifest, [{"role": "user", "content": q}], add_generation_prompt=True),
                    add_special_tokens=False)


def greedy(m, cache, logits, n):
    """Greedy tokens from ``logits`` on, and the top-2 gap at each."""
    eos = set(m.manifest.tokenizer.eos_token_ids)
    toks, gaps = [], []
    while True:
        top2 = np.sort(logits)[-2:]
        toks.append(int(np.argmax(logits)))
        gaps.append(float(top2[1] - top2[0]))
        if toks[-1] in eos or len(toks) == n:
            return toks, gaps
        logits = m.forward([toks[-1]], cache)


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def aligned_prefill(m, cache, toks, chunk):
    logits = None
    while toks:
        n = min(len(toks), chunk - cache.offset % chunk)
        logits, toks = m.forward(toks[:n], cache), toks[n:]
    return logits


def owls_case(m, kv, n):
    from tqedge.runtime.batch import PROMPT_CHUNK
    from tqedge.runtime.generate import prefill

    ids = chat_ids(m, OWLS)
    c = m.new_cache(kv_bits=kv)
    whole = m.forward(ids, c)
    t1, g1 = greedy(m, c, whole, n)
    c.trim(c.offset - (len(ids) - 1))
    refed = m.forward(ids[-1:], c)
    t2, g2 = greedy(m, c, refed, n)
    k = first_diff(t1, t2)
    chunked = prefill(m, m.new_cache(kv_bits=kv), ids, chunk=5)
    cn = m.new_cache(kv_bits=kv)
    a = aligned_prefill(m, cn, list(ids), PROMPT_CHUNK)
    n1, _ = greedy(m, cn, a, n)
    cn.trim(cn.offset - (len(ids) - 1) // PROMPT_CHUNK * PROMPT_CHUNK)
    b = aligned_prefill(m, cn, list(ids[cn.offset:]), PROMPT_CHUNK)
    n2, _ = greedy(m, cn, b, n)
    return {"prompt_tokens": len(ids),
            "whole_vs_chunk5_prefill_logits_max_abs_diff": float(np.abs(whole - chunked).max()),
            "old": {"first_logits_max_abs_diff": float(np.abs(whole - refed).max()), "replies_equal": t1 == t2,
                    "first_divergence": k, "top2_gap_fresh": g1[k] if k is not None else None,
                    "top2_gap_resent": g2[k] if k is not None else None,
                    "fresh": m.tokenizer.decode(t1), "resent": m.tokenizer.decode(t2)},
            "new": {"first_logits_bit_equal": bool(np.array_equal(a, b)), "replies_equal": n1 == n2,
                    "reply": m.tokenizer.decode(n1)}}


def batched_vs_single(m, kv, n):
    from tqedge.runtime.batch import Batcher, BatchStream

    prompts = [chat_ids(m, q) for q in QUESTIONS]
    b = Batcher(m)
    streams = [BatchStream(m, p, m.new_cache(kv_bits=kv), temperature=0, max_tokens=n, repetition_penalty=1.0)
               for p in prompts]
    got = {id(s): [] for s in streams}
    for s in streams:
        b.add(s)
    while b.streams:
        responses, failed = b.step()
        assert not failed, failed
        for s, r in responses:
            got[id(s)].append(r.token)
    rows = []
    for s, p in zip(streams, prompts):
        c = m.new_cache(kv_bits=kv)
        want, gaps = greedy(m, c, m.forward(p, c), n)
        k = first_diff(got[id(s)], want)
        rows.append({"identical": got[id(s)] == want, "first_divergence": k,
                     "top2_gap_one_at_a_time": gaps[k] if k is not None else None})
    return {"identical": sum(r["identical"] for r in rows), "of": len(rows), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", action="append", required=True)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--out", default=str(HERE / "out" / "batch_determinism.json"))
    a = p.parse_args()
    import tqedge

    report = {"loadavg_before": os.getloadavg(), "tokens": a.tokens, "bundles": {}}
    for bundle in a.bundle:
        m = tqedge.load(bundle, kv_budget="8MiB", verify="none")
        rep = {"weights": m.manifest.weights.format}
        for kv in (None, "exact"):
            name = kv or "default"
            rep[name] = {"owls": owls_case(m, kv, a.tokens), "batched_vs_one_at_a_time": batched_vs_single(m, kv, a.tokens)}
            print(Path(bundle).name, name, json.dumps(rep[name])[:600], flush=True)
        report["bundles"][Path(bundle).name] = rep
    report["loadavg_after"] = os.getloadavg()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
