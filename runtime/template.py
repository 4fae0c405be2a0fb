"""Chat templates: render a conversation to the prompt text a chat model was trained on.

The bundle carries the model's Jinja2 template (``manifest.tokenizer.chat_template``, copied
from ``tokenizer_config.json`` or the GGUF key ``tokenizer.chat_template``). It is rendered
the way Hugging Face ``transformers.apply_chat_template`` renders it, so prompts match the
Hub byte for byte: a sandboxed immutable environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that does not escape
HTML, and the globals ``raise_exception`` and ``strftime_now``. Templates are untrusted code;
the sandbox keeps them from reaching Python internals.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

from tqedge.errors import TqedgeError

ROLES = ("system", "user", "assistant", "tool")


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _generation_extension():
    """``{% generation %}…{% endgeneration %}`` (HF's assistant-mask marker) renders its body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return Generation


@functools.lru_cache(maxsize=8)
def compile_template(source: str):
    """Compile (and cache) a chat template.

    Raises:
        TqedgeError: the template is not valid Jinja2.
    """
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_extension()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise TqedgeError(f"the bundle's chat template is not valid Jinja2 (line {e.lineno}: {e.message})") from None


def check_messages(messages) -> list[dict]:
    """Validate a conversation: a list of ``{"role": ..., "content": ...}`` dicts."""
    if not isinstance(messages, (list, tuple)):
        raise TqedgeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise TqedgeError(f"message {i} must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise TqedgeError(f"message {i} has unknown role {m['role']!r} (use {', '.join(ROLES)})")
        out.append(dict(m))
    return out


def render_chat(template: str | None, messages, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, **extra) -> str:
    """Render ``messages`` with a chat template.

    Args:
        template: Jinja2 source (``manifest.tokenizer.chat_template``).
        messages: list of ``{"role", "content"}`` dicts.
        add_generation_prompt: end with the header that opens the assistant's turn.
        bos_token, eos_token: the strings templates may refer to.
        **extra: further template variables (``tools``, ``documents``, …).

    Returns:
        The prompt text (special tokens written out; tokenize it without adding BOS again).

    Raises:
        TqedgeError: no template, bad template, bad messages, or the template raised.
    """
    from jinja2.exceptions import TemplateError

    if not template:
        raise TqedgeError("this bundle has no chat template; use a raw prompt (tqedge generate --raw) "
                          "or re-export from a model with tokenizer.chat_template")
    compiled = compile_template(template)
    try:
        return compiled.render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "", **extra)
    except TemplateError as e:
        raise TqedgeError(f"chat template error: {e}") from None


def render_for(manifest, messages, add_generation_prompt: bool = True, **extra) -> str:
    """:func:`render_chat` with the template and special tokens of a bundle's manifest."""
    tok = manifest.tokenizer
    return render_chat(tok.chat_template, messages, add_generation_prompt,
                       bos_token=tok.bos_token, eos_token=tok.eos_token, **extra)
