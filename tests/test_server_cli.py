"""``tqedge serve`` end to end: a subprocess serving an exported tiny bundle (real ONNX model)
on a free loopback port, with an API key and one in-memory conversation, checked against the
Python API (``Chat``, ``chat.save`` / ``model.chat_from``) as the oracle; SIGINT stops it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import pytest

import tqedge

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from _bundles import tiny_bundle as bundle  # noqa: E402, F401  (fixture)
from test_server import free_port  # noqa: E402

A1 = "hello world the cat sat on the mat and the dog ran to a cat " * 3  # > one prompt chunk (32 tokens)
A2, B1 = " the dog sat on a mat", "a dog ran"  # the template only concatenates
GREEDY = dict(temperature=0, max_tokens=8)


def test_serve_cli_restores_an_evicted_conversation_like_the_python_api(bundle, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "tqedge.cli", "serve", str(bundle), "--port", str(port), "--kv-budget", "1MiB",
           "--max-sessions", "1", "--kv-bits", "4,3", "--api-key", "k3y", "--session-dir", str(tmp_path / "s"),
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=base + "/v1", api_key="k3y", max_retries=0, timeout=60)
        names = [m.id for m in c.models.list()]  # the bundle's name, then its folder stem and "default"
        assert names == list(dict.fromkeys([tqedge.load(bundle, verify="size").manifest.name, "tiny", "default"]))
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="x", messages=[{"role": "user", "content": A1}], **GREEDY)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        a = [{"role": "user", "content": A1}]
        r1 = c.chat.completions.create(model="tiny", messages=a, **GREEDY)
        assert r1.model == names[0]
        c.chat.completions.create(model="default", messages=[{"role": "user", "content": B1}], **GREEDY)  # evicts A
        a += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": A2}]
        r2 = c.chat.completions.create(model=names[0], messages=a, **GREEDY)
        st = httpx.get(base + "/v1/stats", headers={"Authorization": "Bearer k3y"}).json()
        assert st["sessions"]["restored"] == 1 and st["sessions"]["evicted"] == 2
        assert r2.usage.prompt_tokens_details.cached_tokens > 0
        c.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, proc.stderr.read()

    # oracle: the Python API with the same per-conversation cache (1 MiB, 4,3), saved and restored
    model = tqedge.load(bundle, verify="size")
    chat = model.chat(kv_bits="4,3", kv_budget="1MiB", **GREEDY)
    assert chat.send(A1) == r1.choices[0].message.content
    chat.save(tmp_path / "a.tqs")
    restored = model.chat_from(tmp_path / "a.tqs", kv_bits="4,3", kv_budget="1MiB")  # the chat's own cache
    assert restored.send(A2) == r2.choices[0].message.content == chat.send(A2)
