"""tqedge.runtime.eval_needle: scoring, prompt construction, and a real retrieval on SmolLM2."""

from __future__ import annotations

import pytest

from _bundles import smollm2_bundle, smollm2_model  # noqa: F401  (fixtures)
from tqedge.errors import TqedgeError
from tqedge.runtime.eval_needle import (NEEDLE, RAW_QUESTION, NeedleCase, build_prompt, needle_value, run_needle,
                                       score_reply)
from tqedge.runtime.eval_ppl import KVConfig


@pytest.mark.parametrize("reply,found", [
    ("48613", True), ("The secret code is 48613.", True), ("48,613", True), (" 48613\n", True),
    ("486130", False), ("4861", False), ("148613", False), ("", False), ("The code is 48612.", False),
])
def test_score_reply(reply, found):
    assert score_reply(reply, "48613") is found


def test_needle_values_are_fixed_and_five_digits():
    assert needle_value(1024, 0.5) == needle_value(1024, 0.5)
    vals = {needle_value(c, d) for c in (1024, 2048) for d in (0, 0.25, 0.5, 0.75, 1)}
    assert len(vals) >= 9 and all(len(v) == 5 and v.isdigit() for v in vals)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_length_and_depth(smollm2_model, wikitext, depth):
    filler = smollm2_model.tokenizer.encode(wikitext[:20000], add_special_tokens=False).ids
    case = NeedleCase(400, depth, "31337")
    ids = build_prompt(smollm2_model, filler, case)
    assert 380 <= len(ids) <= 400
    text = smollm2_model.tokenizer.decode(ids, skip_special_tokens=False)
    body = text[text.index("<|im_start|>user"):text.index("What is the secret code")]
    at = body.index(NEEDLE.format(value="31337")) / len(body)
    assert abs(at - depth) < 0.1
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_prompt_too_short(smollm2_model):
    with pytest.raises(TqedgeError, match="too short"):
        build_prompt(smollm2_model, [1] * 100, NeedleCase(40, 0.5, "12345"))


def test_retrieval_at_300_tokens(smollm2_model, wikitext):
    r = run_needle(smollm2_model, wikitext, [300], [0.5], KVConfig("k4v3", "4,3", window=32))
    case = r["cases"][0]
    assert case["prompt_tokens"] <= 300
    assert r["grid"][300][0.5] == score_reply(case["reply"], case["value"])
    assert r["prompt"] == "chat"  # the bundle has a template: asked through it by default
    assert r["accuracy"] == 1.0, case["reply"]


def _without_template(model):
    """The same loaded model as a base model would be: a manifest without a chat template."""
    import copy
    import dataclasses

    base = copy.copy(model)
    tok = dataclasses.replace(model.manifest.tokenizer, chat_template=None)
    base.manifest = dataclasses.replace(model.manifest, tokenizer=tok)
    return base


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_raw_prompt_has_no_template(smollm2_model, wikitext, depth):
    """Raw: BOS as the bundle says, haystack, question, then the answer's opening to complete."""
    filler = smollm2_model.tokenizer.encode(wikitext[:20000], add_special_tokens=False).ids
    ids = build_prompt(smollm2_model, filler, NeedleCase(400, depth, "31337"), chat=False)
    assert 380 <= len(ids) <= 400
    tok = smollm2_model.manifest.tokenizer
    assert (ids[0] == tok.bos_token_id) == bool(tok.add_bos_token and tok.bos_token_id is not None)
    text = smollm2_model.tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>" not in text and text.endswith(RAW_QUESTION)
    body = text[: text.index("Question:")]
    at = body.index(NEEDLE.format(value="31337")) / len(body)
    assert abs(at - depth) < 0.1


def test_raw_is_the_default_without_a_chat_template(smollm2_model, wikitext):
    base = _without_template(smollm2_model)
    with pytest.raises(TqedgeError, match="no chat template"):
        run_needle(base, wikitext, [300], [0.5], chat=True)
    r = run_needle(base, wikitext, [300], [0.5], KVConfig("k4v3", "4,3", window=32))
    case = r["cases"][0]
    assert r["prompt"] == "raw" and case["prompt_tokens"] <= 300
    assert r["accuracy"] == 1.0, case["reply"]
