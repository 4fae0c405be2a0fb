"""Chat templates rendered like transformers' ``apply_chat_template`` (the oracle)."""

from __future__ import annotations

import pytest
from _bundles import SMOL_TEMPLATE, smollm2_tokenizer  # noqa: F401  (fixture)

from tqedge.errors import TqedgeError
from tqedge.runtime.template import render_chat

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Say 😀 and 東京"}],
    [{"role": "user", "content": "  spaces \n and\nnewlines  "}, {"role": "assistant", "content": ""}],
]

# exercises tojson (no HTML escaping), raise_exception, loop controls, {% generation %},
# bos/eos variables, whitespace control
FANCY = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{% if m['content'] == 'skip' %}{% continue %}{% endif %}\n"
    "  {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}\n"
    "  {% else %}{{ m['role'] }}: {{ m['content'] | tojson }}\n  {% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_smollm2_template_matches_transformers(smollm2_tokenizer, conv, gen):
    _, hf = smollm2_tokenizer
    assert hf.chat_template == SMOL_TEMPLATE  # the template string the tests use is SmolLM2's
    want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert render_chat(hf.chat_template, conv, gen, bos_token=hf.bos_token, eos_token=hf.eos_token) == want


@pytest.mark.parametrize("conv", CONVERSATIONS + [[{"role": "user", "content": "skip"},
                                                  {"role": "user", "content": "<b>&\"x\"</b>"}]])
def test_fancy_template_matches_transformers(smollm2_tokenizer, conv):
    _, hf = smollm2_tokenizer
    want = hf.apply_chat_template(conv, chat_template=FANCY, tokenize=False, add_generation_prompt=True)
    got = render_chat(FANCY, conv, True, bos_token=hf.bos_token, eos_token=hf.eos_token)
    assert got == want


def test_template_exception_is_tqedge_error():
    with pytest.raises(TqedgeError, match="bad role"):
        render_chat("{{ raise_exception('bad role') }}", [{"role": "user", "content": "x"}])


def test_missing_template_is_clear():
    with pytest.raises(TqedgeError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "x"}])


def test_bad_template_and_messages():
    with pytest.raises(TqedgeError, match="not valid Jinja2"):
        render_chat("{% for %}", [])
    with pytest.raises(TqedgeError, match="unknown role"):
        render_chat(SMOL_TEMPLATE, [{"role": "wizard", "content": "x"}])
    with pytest.raises(TqedgeError, match="must be a dict"):
        render_chat(SMOL_TEMPLATE, ["hello"])


def test_sandbox_blocks_python_internals():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TqedgeError, match="unsafe"):  # jinja2's SecurityError, reported as ours
        render_chat(evil, [{"role": "user", "content": "x"}])


def test_strftime_now_available():
    out = render_chat("{{ strftime_now('%Y') }}", [])
    assert out.isdigit() and len(out) == 4
