"""The app-backend server, driven by the official ``openai`` client over loopback.

The server runs in-process (uvicorn.Server in a thread, random free port) on TinyLM — a real
tiny transformer whose fresh generation is the oracle — and once as ``tqedge serve`` in a
subprocess on an exported tiny bundle. Checked: JSON and SSE replies equal a direct greedy
generation; turn 2 of a conversation prefills only the new tokens; a conversation evicted to
disk and restored continues with the same tokens as one never evicted; a corrupt session file
is recomputed; 400/401/413/429 bodies and headers; a client disconnect frees the slot.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from _bundles import TinyLM

from tqedge.runtime import generate as G
from tqedge.runtime.batch import PROMPT_CHUNK as CHUNK
from tqedge.runtime.chat import common_prefix
from tqedge.runtime.template import render_for

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from tqedge.runtime.server.app import ServerConfig, create_app  # noqa: E402

Q1, Q2 = "Hello there, how are you?", "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model, **cfg):
    """Run the app on 127.0.0.1:<free port> in a thread; yields (base_url, app); stops cleanly."""
    app = create_app(model, ServerConfig(**cfg))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "server did not shut down"
        assert not app.state.engine.thread.is_alive(), "engine thread still running"


@contextlib.contextmanager
def client(base, key="none"):
    c = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
    try:
        yield c
    finally:
        c.close()


def prompt_ids(model, messages):
    return model.encode(render_for(model.manifest, messages), add_special_tokens=False)


def oracle(model, messages, session_budget, kv_bits, **sampling) -> str:
    """A fresh cache configured like the server's sessions, fed the whole rendered prompt."""
    cache = model.new_cache(kv_budget=session_budget, kv_bits=kv_bits)
    return G.generate(model, prompt_ids(model, messages), cache=cache, **sampling)


@pytest.fixture
def lm():
    return TinyLM()


CFG = dict(kv_budget="256KiB", max_sessions=2, kv_bits="4,3")  # sessions of 128 KiB, TurboQuant 4,3


def test_chat_json_and_stream_match_direct_generation(lm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q1}]
    want = oracle(lm, msgs, "128KiB", "4,3", temperature=0, max_tokens=12)
    with serve(lm, **CFG) as (base, app), client(base) as c:
        r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12)
        assert r.object == "chat.completion" and r.model == "tiny"
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
        assert r.choices[0].finish_reason in ("length", "stop")
        n_prompt = len(prompt_ids(lm, msgs))
        assert r.usage.prompt_tokens == n_prompt and r.usage.prompt_tokens_details.cached_tokens == 0
        assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
        chunks = list(c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_completion_tokens=12,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        # the same prompt again reuses the conversation: all but the last prompt token, cut back to
        # a prompt-chunk boundary (so the rest is fed in the same chunks as the first time)
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n_prompt - 1) // CHUNK * CHUNK
        assert [m.id for m in c.models.list()] == ["tiny", "default"]  # the bundle name and the alias
        assert c.models.retrieve("default").id == "default"
        with pytest.raises(openai.NotFoundError) as e:
            c.models.retrieve("gpt-4o")
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="tiny2", messages=msgs, max_tokens=2)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        assert httpx.get(base + "/health").json()["status"] == "ok"
        st = httpx.get(base + "/v1/stats").json()
        assert st["requests"]["completed"] == 2 and st["tokens_generated"] >= 2
        assert st["sessions"]["kv_bytes_total"] == 256 * 1024 and 0 < st["sessions"]["kv_bytes_used"]
        assert st["sessions"]["kv_bytes_used"] <= st["sessions"]["kv_bytes_allocated"] <= 256 * 1024


def test_turn_two_prefills_only_the_new_tokens(lm):
    # exact cache: incremental and fresh prefill are the same computation, so the oracle is exact
    with serve(lm, kv_budget="1MiB", max_sessions=2, kv_bits="exact") as (base, app), client(base) as c:
        m1 = [{"role": "user", "content": Q1}]
        r1 = c.chat.completions.create(model="tiny", messages=m1, temperature=0, max_tokens=10)
        m2 = m1 + [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": Q2}]
        ids1, ids2 = prompt_ids(lm, m1), prompt_ids(lm, m2)
        lm.calls.clear()
        r2 = c.chat.completions.create(model="tiny", messages=m2, temperature=0, max_tokens=10)
        cached = r2.usage.prompt_tokens_details.cached_tokens
        assert r2.usage.prompt_tokens == len(ids2)
        assert common_prefix(ids1, ids2) == len(ids1)  # the new prompt extends the old one
        assert cached >= len(ids1)  # … and all of the old prompt (plus some of the reply) is reused
        fed = list(itertools.accumulate(lm.calls))  # prompt chunks end on multiples of CHUNK
        assert len(ids2) - cached in fed and max(lm.calls) <= CHUNK  # prefill fed only the uncached tail
        assert len(ids2) - cached <= len(ids2) - len(ids1)  # ≈ the new message and its template
        assert r2.choices[0].message.content == oracle(lm, m2, "512KiB", "exact", temperature=0, max_tokens=10)


def _conversation(c, name, extra=None):
    msgs = [{"role": "user", "content": f"{name}: {Q1}"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8)
    msgs += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": Q2}]
    return msgs


def test_evicted_conversation_restores_bit_exactly(lm, tmp_path):
    """max_sessions=1: A's TurboQuant cache goes to disk when B arrives and comes back for A's
    turn 2, which must equal turn 2 on a server that never evicted A."""
    def run(max_sessions, session_dir=None):
        with serve(lm, kv_budget=f"{128 * max_sessions}KiB", max_sessions=max_sessions, kv_bits="4,3",
                   session_dir=session_dir) as (base, app), client(base) as c:
            a = _conversation(c, "Alice")
            _conversation(c, "Bob")
            files = sorted(p.name for p in tmp_path.glob("*.tqs")) if session_dir else []
            r = c.chat.completions.create(model="tiny", messages=a, temperature=0, max_tokens=12)
            gone = session_dir is None or not (tmp_path / files[0]).exists()  # restored files are removed
            return r, files, app.state.sessions.snapshot(), gone

    evicted, files, st, gone = run(1, str(tmp_path))
    kept, _, st_kept, _ = run(2)
    assert len(files) == 1 and st["evicted"] == 2 and st["restored"] == 1 and st["discarded"] == 0 and gone
    assert st_kept["evicted"] == 0
    assert evicted.choices[0].message.content == kept.choices[0].message.content
    assert evicted.usage.prompt_tokens_details.cached_tokens == kept.usage.prompt_tokens_details.cached_tokens > 0


def test_conversations_survive_a_restart_with_a_session_dir(lm, tmp_path):
    cfg = dict(kv_budget="128KiB", max_sessions=1, kv_bits="4,3")
    with serve(lm, **cfg, session_dir=str(tmp_path)) as (base, app), client(base) as c:
        a = _conversation(c, "Alice")
    assert len(list(tmp_path.glob("*.tqs"))) == 1  # the idle conversation was saved at shutdown
    (tmp_path / "junk.tqs").write_bytes(b"not a session")  # ignored by the index, left alone
    with serve(lm, **cfg, session_dir=str(tmp_path)) as (base, app), client(base) as c:
        assert app.state.sessions.snapshot()["on_disk"] == 1
        r = c.chat.completions.create(model="tiny", messages=a, temperature=0, max_tokens=12)
        assert app.state.sessions.snapshot()["restored"] == 1
    with serve(lm, **cfg) as (base, app), client(base) as c:  # oracle: one server, never restarted
        assert _conversation(c, "Alice") == a
        want = c.chat.completions.create(model="tiny", messages=a, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == want.choices[0].message.content
    assert r.usage.prompt_tokens_details.cached_tokens == want.usage.prompt_tokens_details.cached_tokens > 0
    assert (tmp_path / "junk.tqs").exists()


def test_corrupt_session_file_is_recomputed(lm, tmp_path, caplog):
    with serve(lm, kv_budget="128KiB", max_sessions=1, kv_bits="4,3", session_dir=str(tmp_path)) as (base, app), \
            client(base) as c:
        a = _conversation(c, "Alice")
        _conversation(c, "Bob")
        (f,) = tmp_path.glob("*.tqs")
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        with caplog.at_level("WARNING"):
            r = c.chat.completions.create(model="tiny", messages=a, temperature=0, max_tokens=12)
        assert r.usage.prompt_tokens_details.cached_tokens == 0  # recomputed from the messages
        assert r.choices[0].message.content == oracle(lm, a, "128KiB", "4,3", temperature=0, max_tokens=12)
        assert any("checksum mismatch" in m and "recomputing" in m for m in caplog.messages)
        assert app.state.sessions.snapshot()["discarded"] == 1 and not f.exists()
        assert c.chat.completions.create(model="tiny", messages=a, max_tokens=3).choices[0].message is not None


def test_auth(lm):
    with serve(lm, **CFG, api_key="s3cret") as (base, app):
        for key in ("wrong", ""):
            with client(base, key or "x") as c, pytest.raises(openai.AuthenticationError) as e:
                c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        r = httpx.get(base + "/v1/models")
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(base + "/health").status_code == 200
        with client(base, "s3cret") as c:
            assert c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2).choices


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi " * 5000}]}, "messages"),  # longer than a session
])
def test_bad_requests_are_400_with_openai_error_body(lm, body, param):
    with serve(lm, **CFG) as (base, app), client(base) as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", **body)
        err = e.value.body
        assert e.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"
        assert err["message"] and "\n" not in err["message"]


def test_malformed_json_and_oversized_body(lm):
    with serve(lm, **CFG, max_body_bytes=2048) as (base, app):
        r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 4096}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = httpx.get(base + "/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert httpx.post(base + "/v1/chat/completions", json=[1, 2]).status_code == 400
        assert httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                          ).status_code == 200  # still serving


class Gated:
    """TinyLM whose forward waits for ``gate`` (and takes ``delay`` s): makes queueing deterministic."""

    def __init__(self, lm, delay=0.0):
        self.lm, self.delay = lm, delay
        self.gate, self.entered = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.lm, name)

    @property
    def backend(self):
        def forward(*args):
            self.entered.set()
            assert self.gate.wait(30)
            time.sleep(self.delay)
            return self.lm.backend.forward(*args)

        return SimpleNamespace(forward=forward)


def test_full_queue_is_429_with_retry_after(lm):
    model = Gated(lm)
    with serve(model, kv_budget="128KiB", max_sessions=1, kv_bits="4,3", max_queue=1) as (base, app):
        msgs = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        results = []
        post = lambda: results.append(httpx.post(base + "/v1/chat/completions", json=msgs, timeout=60))  # noqa: E731
        a = threading.Thread(target=post)
        a.start()
        assert model.entered.wait(10)  # A holds the only session, inside a forward
        b = threading.Thread(target=post)
        b.start()
        deadline = time.monotonic() + 10
        while app.state.engine.stats()["queue"]["pending"] < 1:  # B waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(base + "/v1/chat/completions", json=msgs)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        model.gate.set()
        a.join(30), b.join(30)
        assert [x.status_code for x in results] == [200, 200]


def test_client_disconnect_stops_generation_and_frees_the_slot(lm):
    model = Gated(lm, delay=0.02)
    model.gate.set()
    with serve(model, kv_budget="128KiB", max_sessions=1, kv_bits="4,3") as (base, app):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few SSE lines, then hang up
        assert any(x.startswith("data: {") for x in got)
        deadline = time.monotonic() + 10
        while app.state.engine.stats()["queue"]["running"]:
            assert time.monotonic() < deadline, "generation kept running after the client left"
            time.sleep(0.05)
        st = app.state.engine.stats()
        assert st["requests"]["cancelled"] == 1 and st["tokens_generated"] < 500
        r = httpx.post(base + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


class Broken(Gated):
    """TinyLM whose tokenizer call fails on "boom": an unexpected server-side error."""

    def encode(self, text, **kw):
        if "boom" in text:
            raise RuntimeError("boom")
        return self.lm.encode(text, **kw)


def test_unexpected_error_is_a_logged_500_that_keeps_the_connection(lm, caplog):
    model = Broken(lm)
    model.gate.set()
    with serve(model, **CFG) as (base, app), httpx.Client(base_url=base, timeout=30) as c, \
            caplog.at_level("ERROR", logger="tqedge"):
        bad = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "boom"}]})
        assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
        good = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert good.status_code == 200
        port = [r.extensions["network_stream"].get_extra_info("client_addr")[1] for r in (bad, good)]
        assert port[0] == port[1]  # the same keep-alive connection
    errors = [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info[0] is RuntimeError
