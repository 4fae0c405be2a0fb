"""Past one machine: conversations continue on any replica through Redis; Ray Serve replicas.

A real ``redis-server`` is started on loopback for this module (installed by ``.ci/run``).
Replicas are real server apps on the real SmolLM2 bundle with the default compressed cache:
first two in-process apps sharing the store (turns forced onto alternating replicas), then
``tqedge serve --replicas 2`` on Ray Serve with a replica killed between turns.
The oracle is one process serving the whole conversation.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _bundles import smollm2_bundle, smollm2_model  # noqa: F401 - fixtures
from test_server import serve

from tqedge.runtime import session_file as SF
from tqedge.runtime.server.ray_app import affinity_key
from tqedge.runtime.server.store import ROOT_TOKENS, RedisStore, ids_hash

redis = pytest.importorskip("redis")

TURNS = ["Name three colours.", "Which of them is the colour of the sky?", "And of grass?"]
SYSTEM = "You are a concise assistant. Answer in one short sentence."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed (.ci/run installs Debian's redis-server)"
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def fresh_redis(redis_url):
    redis.Redis.from_url(redis_url).flushall()
    return redis_url


def chat_turns(bases, n_turns=3, max_tokens=12):
    """Run a conversation; turn i goes to ``bases[i % len(bases)]``. Returns [(reply, usage)]."""
    messages = [{"role": "system", "content": SYSTEM}]
    out = []
    with httpx.Client(timeout=120) as c:
        for i, q in enumerate(TURNS[:n_turns]):
            messages.append({"role": "user", "content": q})
            base = bases[i % len(bases)]
            r = c.post(base + "/v1/chat/completions",
                       json={"model": model_id(base), "messages": messages, "max_tokens": max_tokens, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            reply = body["choices"][0]["message"]["content"]
            out.append((reply, body["usage"]))
            messages.append({"role": "assistant", "content": reply})
    return out


def model_id(base: str) -> str:
    return httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]


def cached(usage) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


# -- the store alone ---------------------------------------------------------------------------
def test_store_finds_the_longest_stored_prefix(fresh_redis):
    st = RedisStore(fresh_redis, "f" * 64)
    base = list(range(100, 100 + ROOT_TOKENS))
    a, b = base + [1, 2, 3], base + [1, 2, 3, 4, 5, 6]
    other = base + [9, 9, 9, 9]  # same root, another conversation
    for ids, blob in ((a, b"A"), (b, b"B"), (other, b"O")):
        assert st.put(ids, blob)
    assert not st.put(base[:5], b"short")  # below ROOT_TOKENS: not stored
    st.flush()
    assert st.longest_prefix(b + [7, 8]) == (len(b), b"B")
    assert st.longest_prefix(a + [4, 9]) == (len(a), b"A")  # b does not prefix it
    assert st.longest_prefix(b) == (len(a), b"A")  # a proper prefix only: a cache must leave ≥ 1 token
    assert st.longest_prefix(base + [5, 5, 5, 5, 5]) is None
    r = redis.Redis.from_url(fresh_redis)
    key = f"tqedge:blob:{'f' * 64}:{ids_hash(b)}"
    assert r.get(key) == b"B" and 0 < r.ttl(key) <= 7 * 24 * 3600
    other_fp = RedisStore(fresh_redis, "e" * 64)  # another bundle/config never sees these
    assert other_fp.longest_prefix(b + [7]) is None
    st.close()
    other_fp.close()


def test_store_down_is_a_miss_not_an_error(redis_url):
    st = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "f" * 64)  # nothing listens there
    ids = list(range(ROOT_TOKENS + 4))
    assert st.longest_prefix(ids) is None and st.counters["read_errors"] == 1
    st.put(ids, b"x")
    st.flush()
    assert st.counters["write_errors"] == 1
    st.close()


def test_affinity_key_is_stable_across_turns():
    m1 = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}]
    m3 = m1 + [{"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    k = affinity_key(httpx.Request("POST", "/", json={"messages": m1}).content, {})
    assert k and k == affinity_key(httpx.Request("POST", "/", json={"messages": m3}).content, {})
    assert k != affinity_key(httpx.Request("POST", "/", json={"messages": m1[:1] + [m3[3]]}).content, {})
    assert affinity_key(b'{"messages": [], "user": "alice"}', {}).startswith("u:")
    assert affinity_key(b"not json", {"x-session-id": "abc"}).startswith("s:")
    assert affinity_key(b"[" * 100000, {}) == ""


# -- replicas sharing the store (in-process) ---------------------------------------------------
@pytest.mark.slow
def test_turns_on_alternating_replicas_equal_one_process(smollm2_model, fresh_redis):
    cfg = dict(kv_budget="64MiB", max_sessions=2)
    with serve(smollm2_model, **cfg) as (one, _):
        ref = chat_turns([one])
    with serve(smollm2_model, store=fresh_redis, **cfg) as (a, app_a), \
            serve(smollm2_model, store=fresh_redis, **cfg) as (b, app_b):
        got = chat_turns([a, b])  # turn 1 on A, turn 2 on B, turn 3 on A
        stats_a, stats_b = app_a.state.sessions.snapshot(), app_b.state.sessions.snapshot()
    assert [r for r, _ in got] == [r for r, _ in ref]
    for (_, u), (_, u_ref) in zip(got, ref):  # each turn prefills only its new tokens
        assert u["prompt_tokens"] == u_ref["prompt_tokens"] and cached(u) == cached(u_ref)
    assert cached(got[1][1]) > 0 and cached(got[2][1]) > cached(got[1][1])
    assert stats_b["from_store"] == 1 and stats_a["from_store"] == 1  # turn 3: A's own turn 1 is shorter


@pytest.mark.slow
def test_replica_gone_between_turns_continues_from_store(smollm2_model, fresh_redis):
    cfg = dict(kv_budget="64MiB", max_sessions=2, store=fresh_redis)
    with serve(smollm2_model, **cfg) as (a, _):
        first = chat_turns([a], n_turns=1)
    with serve(smollm2_model, **cfg) as (b, app_b):  # A is gone; B never saw the conversation
        with serve(smollm2_model, kv_budget="64MiB", max_sessions=2) as (one, _):
            ref = chat_turns([one], n_turns=2)
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]},
                {"role": "assistant", "content": first[0][0]}, {"role": "user", "content": TURNS[1]}]
        r = httpx.post(b + "/v1/chat/completions", timeout=120,
                       json={"model": model_id(b), "messages": msgs, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert app_b.state.sessions.snapshot()["from_store"] == 1
    assert first[0][0] == ref[0][0]
    assert r.json()["choices"][0]["message"]["content"] == ref[1][0]
    assert cached(r.json()["usage"]) == cached(ref[1][1]) > 0


@pytest.mark.slow
def test_blob_of_another_configuration_is_refused_and_recomputed(smollm2_model, fresh_redis):
    cfg = dict(kv_budget="64MiB", max_sessions=2, store=fresh_redis)
    with serve(smollm2_model, **cfg) as (a, app_a):
        first = chat_turns([a], n_turns=1)
        app_a.state.sessions.store.flush()
        fp = app_a.state.sessions.fingerprint
    r = redis.Redis.from_url(fresh_redis)
    keys = r.keys(f"tqedge:blob:{fp}:*")
    assert len(keys) == 1
    # overwrite the stored state with one from another cache configuration (exact cache)
    exact = smollm2_model.new_cache(kv_budget="16MiB", kv_bits="exact")
    smollm2_model.forward([1, 2, 3], exact)
    r.set(keys[0], SF.encode_session(SF.fingerprint(smollm2_model.manifest, exact), exact, {}))
    with serve(smollm2_model, **cfg) as (b, app_b):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]},
                {"role": "assistant", "content": first[0][0]}, {"role": "user", "content": TURNS[1]}]
        resp = httpx.post(b + "/v1/chat/completions", timeout=120,
                          json={"model": model_id(b), "messages": msgs, "max_tokens": 12, "temperature": 0})
        snap = app_b.state.sessions.snapshot()
    with serve(smollm2_model, kv_budget="64MiB", max_sessions=2) as (one, _):
        ref = chat_turns([one], n_turns=2)
    assert resp.status_code == 200 and snap["discarded"] == 1 and snap["from_store"] == 0
    assert cached(resp.json()["usage"]) == 0  # recomputed
    assert resp.json()["choices"][0]["message"]["content"] == ref[1][0]


# -- Ray Serve ---------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_serve(bundle, store, port):
    cmd = [sys.executable, "-m", "tqedge.cli", "serve", str(bundle), "--replicas", "2", "--store", store,
           "--port", str(port), "--threads", "1", "--kv-budget", "64MiB", "--max-sessions", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "Ray Serve did not come up"
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)


@pytest.mark.slow
def test_ray_replicas_kill_the_warm_one_between_turns(smollm2_bundle, smollm2_model, fresh_redis):
    pytest.importorskip("ray")
    with serve(smollm2_model, kv_budget="64MiB", max_sessions=2) as (one, _):
        ref = chat_turns([one], n_turns=3)
    port = free_port()
    with ray_serve(smollm2_bundle, fresh_redis, port) as base:
        messages = [{"role": "system", "content": SYSTEM}]
        replies, served = [], []
        for i, q in enumerate(TURNS):
            messages.append({"role": "user", "content": q})
            r = httpx.post(base + "/v1/chat/completions", timeout=180,
                           json={"model": model_id(base), "messages": messages, "max_tokens": 12, "temperature": 0})
            assert r.status_code == 200, r.text
            replies.append(r.json()["choices"][0]["message"]["content"])
            served.append((r.headers["x-tqedge-replica"], cached(r.json()["usage"])))
            messages.append({"role": "assistant", "content": replies[-1]})
            if i == 0:  # kill the replica that holds the conversation warm
                pid = int(served[0][0].rsplit(":", 1)[1])
                time.sleep(1.0)  # let its write-through reach Redis
                subprocess.run(["kill", "-9", str(pid)], check=True)
    assert replies == [r for r, _ in ref]
    assert served[1][0] != served[0][0]  # turn 2 answered by the other replica …
    assert served[1][1] == cached(ref[1][1]) > 0  # … from the stored state, not recomputed


def test_app_builder_refuses_unknown_options():
    from tqedge.errors import TqedgeError
    from tqedge.runtime.server.ray_app import app_builder

    pytest.importorskip("ray")
    with pytest.raises(TqedgeError, match="needs args.bundle"):
        app_builder({"replicas": 2})
    with pytest.raises(TqedgeError, match="unknown server option.*kv_budgett"):
        app_builder({"bundle": "x.tqe", "kv_budgett": "1MiB"})
