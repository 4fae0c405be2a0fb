"""The OpenAI chat-completions wire format: request validation and response bodies.

Only what this server can honour is accepted; anything it would have to silently ignore
(``n`` > 1, tools, logprobs, penalties other than 0, non-text content) is a 400 with an
OpenAI-style error body, so a client never gets a reply computed differently from what it asked.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from tqedge.runtime.template import ROLES

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours → OpenAI finish_reason
MAX_STOPS = 4
# fields accepted only at their neutral value (the official client sends them only when set)
_NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,),
            "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",),
            "parallel_tool_calls": (False, True), "functions": ([],)}
_IGNORED = {"model", "user", "metadata", "store", "service_tier", "stream_options", "reasoning_effort"}
MAX_DEPTH = 64  # JSON nesting accepted in a request body (a chat request needs about 5)
DEFAULT_MODEL = "default"  # the model alias every server answers to (besides the bundle's names)


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: HTTP status.
        message: one line for the client.
        type_: OpenAI error type ("invalid_request_error", "authentication_error", …).
        param: the offending request field, if any.
        code: short machine-readable code, if any.
        headers: extra response headers (e.g. Retry-After).
    """

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """A 400 invalid_request_error naming ``param``."""
    return APIError(400, message, "invalid_request_error", param, code)


def decode_json(data: bytes):
    """Parse a request body: JSON text nested at most :data:`MAX_DEPTH` deep whose strings are
    valid Unicode (no lone UTF-16 surrogates such as ``"\\ud800"``, which no tokenizer or UTF-8
    encoder accepts).

    Raises:
        APIError: 400 ``invalid_json`` naming the problem.
    """
    try:
        obj = json.loads(data)
    except RecursionError:
        raise bad(f"the request body is nested more than {MAX_DEPTH} levels deep", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer over 4300 digits
        raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    stack = [(obj, 0)]
    while stack:  # iterative: a deep body must not recurse here either
        o, depth = stack.pop()
        if isinstance(o, str):
            if not o.isascii():
                try:
                    o.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise bad(f"the request body has a string with a lone UTF-16 surrogate "
                              f"({o[e.start]!r}), which is not valid Unicode", code="invalid_json") from None
        elif isinstance(o, (dict, list)):
            if depth >= MAX_DEPTH:
                raise bad(f"the request body is nested more than {MAX_DEPTH} levels deep", code="invalid_json")
            items = [*o.keys(), *o.values()] if isinstance(o, dict) else o
            stack.extend((x, depth + 1) for x in items)
    return obj


def check_model(body, names: list[str]) -> None:
    """``model``, when given, must be one of ``names`` (the OpenAI API answers others with 404).

    Raises:
        APIError: 400 when ``model`` is not a string, 404 ``model_not_found`` for another name.
    """
    if not isinstance(body, dict) or body.get("model") is None:
        return
    name = body["model"]
    if not isinstance(name, str):
        raise bad("model must be a string", "model")
    if name not in names:
        raise APIError(404, f"the model {name!r} does not exist on this server (it serves {', '.join(names)})",
                       "invalid_request_error", "model", "model_not_found")


@dataclass
class ChatRequest:
    """A validated chat-completions request."""

    messages: list[dict]
    stream: bool = False
    include_usage: bool = False
    sampling: dict = field(default_factory=dict)  # stream_generate keyword arguments


def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v <= hi if lo_open else lo <= v <= hi):
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad(f"{name} must be a number in {span}, not {v!r}", name)
    return float(v)


def _int(body: dict, name: str, lo: int, hi: int):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(f"{name} must be an integer in [{lo}, {hi}], not {v!r}", name)
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None and m.get("role") == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_messages(raw) -> list[dict]:
    """Validate ``messages``: a non-empty list of {role, content} with text content."""
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {m.get('role')!r}",
                      f"messages[{i}].role")
        out.append({"role": role, "content": _content(m, i)})
    return out


def parse_chat_request(body, max_tokens_limit: int, default_max_tokens: int) -> ChatRequest:
    """Validate a parsed JSON body against what this server supports.

    Args:
        body: the decoded JSON.
        max_tokens_limit: the largest ``max_tokens`` accepted.
        default_max_tokens: used when the request sets none (capped at the limit).

    Returns:
        A :class:`ChatRequest`.

    Raises:
        APIError: 400 naming the first bad field.
    """
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise bad("model must be a string", "model")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad("n > 1 is not supported by this server (one choice per request)", "n", "unsupported_value")
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] is not None and body[name] not in neutral:
            raise bad(f"{name} is not supported by this server", name, "unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise bad("only response_format {\"type\": \"text\"} is supported", "response_format", "unsupported_value")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options")
    mt = _int(body, "max_completion_tokens", 1, max_tokens_limit)
    mt = _int(body, "max_tokens", 1, max_tokens_limit) if mt is None else mt
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS
                             or not all(isinstance(s, str) and s for s in stop)):
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    sampling = {"temperature": _number(body, "temperature", 0.0, 2.0),
                "top_p": _number(body, "top_p", 0.0, 1.0, lo_open=True),
                "max_tokens": mt or min(default_max_tokens, max_tokens_limit),
                "seed": _int(body, "seed", -(2 ** 63), 2 ** 64 - 1), "stop": stop}
    if sampling["seed"] is not None:
        sampling["seed"] %= 2 ** 63  # numpy seeds must be non-negative
    return ChatRequest(parse_messages(body.get("messages")), bool(stream), bool(opts.get("include_usage")),
                       {k: v for k, v in sampling.items() if v is not None})


# -- responses --------------------------------------------------------------------------------
def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int, cached: int) -> dict:
    """The ``usage`` object (cached prompt tokens under ``prompt_tokens_details``)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion(cid: str, model: str, text: str, finish: str, use: dict, created: int | None = None) -> dict:
    """A non-streamed ``chat.completion`` body."""
    return {"id": cid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": FINISH.get(finish, finish)}],
            "usage": use}


def chunk(cid: str, model: str, created: int, delta: dict | None, finish: str | None = None,
          use: dict | None = None) -> dict:
    """A ``chat.completion.chunk``; ``delta=None`` makes the usage-only final chunk."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": FINISH.get(finish, finish) if finish else None}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
