"""Bad-input sweep against a real ``tqedge serve`` (subprocess, loopback, exported tiny bundle).

Every malformed, mistyped, oversized or unsupported request — raw bytes through httpx and typed
calls through the official ``openai`` client — must get a 4xx with an OpenAI error body
``{"error": {"message", "type", "param", "code"}}``: never a 500, never a traceback in the
server's log; a bad request must not cost the client its keep-alive connection; clients that
hang up mid-stream must not hurt the server; and a good request still works at the end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

import tqedge

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from _bundles import tiny_bundle  # noqa: E402, F401  (fixture)
from test_server import free_port  # noqa: E402

MiB = 1 << 20
URL = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}


def chat(**fields) -> bytes:
    return json.dumps({"messages": HI, "max_tokens": 2, **fields}).encode()


# (name, raw body, content-type, expected status, expected error param or ... for "any")
RAW = [
    ("lone surrogate in content", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', JSON, 400, None),
    ("lone low surrogate in a key", b'{"messages": [], "\\udc00": 1}', JSON, 400, None),
    ("lone surrogate in model", b'{"model": "\\ud800", "messages": []}', JSON, 400, None),
    ("array nested 100k deep", b"[" * 100_000 + b"]" * 100_000, JSON, 400, None),
    ("object nested 100k deep", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, JSON, 400, None),
    ("messages nested 70 deep", b'{"messages": ' + b"[" * 70 + b"]" * 70 + b"}", JSON, 400, None),
    ("malformed JSON", b"{not json", JSON, 400, None),
    ("truncated JSON", b'{"messages": [{"role": "user", "cont', JSON, 400, None),
    ("empty body", b"", JSON, 400, None),
    ("invalid UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', JSON, 400, None),
    ("integer of 5000 digits", b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", JSON, 400, None),
    ("JSON null", b"null", JSON, 400, None),
    ("JSON array", b"[1, 2]", JSON, 400, None),
    ("form-encoded body", b"messages=hi&model=x", {"content-type": "application/x-www-form-urlencoded"}, 400, None),
    ("text/plain non-JSON", b"hello", {"content-type": "text/plain"}, 400, None),
    ("no messages", json.dumps({"max_tokens": 2}).encode(), JSON, 400, "messages"),
    ("messages a string", json.dumps({"messages": "hi"}).encode(), JSON, 400, "messages"),
    ("messages an object", json.dumps({"messages": HI[0]}).encode(), JSON, 400, "messages"),
    ("message not an object", json.dumps({"messages": ["hi"]}).encode(), JSON, 400, "messages[0]"),
    ("content a number", json.dumps({"messages": [{"role": "user", "content": 42}]}).encode(), JSON, 400,
     "messages[0].content"),
    ("content an object", json.dumps({"messages": [{"role": "user", "content": {"a": 1}}]}).encode(), JSON, 400,
     "messages[0].content"),
    ("image content part", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}).encode(), JSON, 400, "messages[0].content"),
    ("user content null", json.dumps({"messages": [{"role": "user", "content": None}]}).encode(), JSON, 400,
     "messages[0].content"),
    ("unknown role", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), JSON, 400,
     "messages[0].role"),
    ("role a number", json.dumps({"messages": [{"role": 5, "content": "hi"}]}).encode(), JSON, 400,
     "messages[0].role"),
    ("no role", json.dumps({"messages": [{"content": "hi"}]}).encode(), JSON, 400, "messages[0].role"),
    ("temperature -1", chat(temperature=-1), JSON, 400, "temperature"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', JSON, 400,
     "temperature"),
    ("temperature Infinity", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', JSON,
     400, "temperature"),
    ("temperature a string", chat(temperature="hot"), JSON, 400, "temperature"),
    ("top_p 0", chat(top_p=0), JSON, 400, "top_p"),
    ("max_tokens 10^12", chat(max_tokens=10 ** 12), JSON, 400, "max_tokens"),
    ("max_tokens 0", chat(max_tokens=0), JSON, 400, "max_tokens"),
    ("max_tokens -5", chat(max_tokens=-5), JSON, 400, "max_tokens"),
    ("max_tokens 1.5", chat(max_tokens=1.5), JSON, 400, "max_tokens"),
    ("max_tokens a string", chat(max_tokens="10"), JSON, 400, "max_tokens"),
    ("max_tokens true", chat(max_tokens=True), JSON, 400, "max_tokens"),
    ("n 2", chat(n=2), JSON, 400, "n"),
    ("n 0", chat(n=0), JSON, 400, "n"),
    ("stream a string", chat(stream="yes"), JSON, 400, "stream"),
    ("stop 5 strings", chat(stop=list("abcde")), JSON, 400, "stop"),
    ("stop empty string", chat(stop=[""]), JSON, 400, "stop"),
    ("stop a number", chat(stop=5), JSON, 400, "stop"),
    ("seed a string", chat(seed="x"), JSON, 400, "seed"),
    ("seed 2^70", chat(seed=2 ** 70), JSON, 400, "seed"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), JSON, 400, "tools"),
    ("logprobs", chat(logprobs=True), JSON, 400, "logprobs"),
    ("model a number", chat(model=5), JSON, 400, "model"),
    ("unknown model", chat(model="gpt-4o"), JSON, 404, "model"),
    ("body over --max-body", chat(user="x" * (2 * MiB)), JSON, 413, None),
]


def assert_openai_error(r: httpx.Response, status: int, param=...):
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    assert err["type"] == ("not_found_error" if status == 404 and param is ... else "invalid_request_error")
    if param is not ...:
        assert err["param"] == param, err


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """``tqedge serve`` on an exported tiny bundle; yields (base URL, log path, bundle); on exit
    stops it with SIGINT and checks it shut down cleanly."""
    bundle, port, log = tiny_bundle, free_port(), tmp_path_factory.mktemp("fuzz") / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tqedge.cli", "serve", str(bundle), "--port", str(port),
                                 "--kv-budget", "1MiB", "--max-sessions", "1", "--kv-bits", "4,3", "--threads", "1"],
                                stdout=subprocess.DEVNULL, stderr=err)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield base, log, bundle
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI" not in text, text


def _local_port(r: httpx.Response) -> int:
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_raw_bad_requests_are_4xx_and_keep_the_connection(server):
    base, log, _ = server
    good = chat()
    with httpx.Client(base_url=base, timeout=60) as c:
        for name, body, headers, status, param in RAW:
            r = c.post(URL, content=body, headers=headers)
            assert_openai_error(r, status, param)
            if status == 413:
                continue  # the server stops reading an oversized body, so it closes that connection
            ok = c.post(URL, content=good, headers=JSON)  # the same keep-alive connection still works
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant", name
            assert _local_port(ok) == _local_port(r), f"{name}: the connection was dropped"
        # 20 MB, declared up front: refused before it is read
        r = c.post(URL, content=b'{"messages": "' + b"x" * (20 * MiB) + b'"}', headers=JSON)
        assert_openai_error(r, 413)
        assert r.json()["error"]["code"] == "request_too_large"
        # 20 MB without a Content-Length (chunked): refused once 1 MiB has arrived
        r = c.post(URL, content=iter([b'{"messages": "'] + [b"x" * MiB] * 20 + [b'"}']), headers=JSON)
        assert_openai_error(r, 413)
        for method, path, status in [("GET", URL, 405), ("POST", "/v1/models", 405), ("GET", "/v1/nothing", 404),
                                     ("DELETE", "/health", 405)]:
            assert_openai_error(c.request(method, base + path), status)
        assert_openai_error(c.get("/v1/models/gpt-4o"), 404, "model")
        assert c.get("/v1/models/default").json()["id"] == "default"
    assert "Traceback" not in log.read_text()


def test_openai_client_bad_requests(server):
    base, log, _ = server  # (the client itself refuses to send NaN or lone surrogates: see the raw test)
    with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        cases = [
            (dict(messages=HI, temperature=-0.5), openai.BadRequestError, "temperature"),
            (dict(messages=HI, temperature=2.5), openai.BadRequestError, "temperature"),  # (NaN: raw test above)
            (dict(messages=HI, max_tokens=2 ** 40), openai.BadRequestError, "max_tokens"),
            (dict(messages=HI, n=3), openai.BadRequestError, "n"),
            (dict(messages="hi"), openai.BadRequestError, "messages"),
            (dict(messages=[{"role": "user", "content": 7}]), openai.BadRequestError, "messages[0].content"),
            (dict(messages=[{"role": "robot", "content": "hi"}]), openai.BadRequestError, "messages[0].role"),
            (dict(messages=HI, frequency_penalty=1.5), openai.BadRequestError, "frequency_penalty"),
            (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
             openai.BadRequestError, "messages[0].content"),
            (dict(messages=HI, extra_body={"stream_options": "yes"}), openai.BadRequestError, "stream_options"),
        ]
        for kw, exc, param in cases:
            with pytest.raises(exc) as e:
                c.chat.completions.create(model="default", **kw)
            err = e.value.body
            assert e.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error", kw
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="tinyllama", messages=HI, max_tokens=2)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError):  # a stream fails before its first chunk
            c.chat.completions.create(model="default", messages=HI, stream=True, temperature=9)
        # a streaming client that hangs up after two chunks
        stream = c.chat.completions.create(model="default", messages=HI, max_tokens=200, stream=True, temperature=1)
        [next(iter(stream)) for _ in range(2)]
        stream.close()
    assert "Traceback" not in log.read_text()


def test_disconnects_mid_stream_then_a_good_request(server):
    base, log, bundle = server
    body = {"model": "tiny", "messages": HI, "max_tokens": 200, "temperature": 1, "seed": 1, "stream": True}
    for _ in range(3):  # hang up after the first lines, several times in a row
        with httpx.stream("POST", base + URL, json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
    deadline = time.monotonic() + 20
    while (st := httpx.get(base + "/v1/stats", timeout=10).json())["queue"]["running"]:
        assert time.monotonic() < deadline, "a generation kept running after its client left"
        time.sleep(0.1)
    assert st["requests"].get("failed", 0) == 0, st
    with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        r = c.chat.completions.create(model="tiny", messages=HI, max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 4
        assert r.model == tqedge.load(bundle, verify="size").manifest.name
    assert "Traceback" not in log.read_text()
