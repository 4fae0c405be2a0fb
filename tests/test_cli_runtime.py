"""``tqedge generate`` / ``tqedge chat``: option plumbing and output on TinyLM (the loader is
swapped for the tiny model), then end to end on an exported SmolLM2 bundle, against the
Python API as the oracle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _bundles import TinyLM, smollm2_bundle, smollm2_model  # noqa: F401  (fixtures)
from click.testing import CliRunner

from tqedge.cli import cli
from tqedge.runtime import cli as rcli
from tqedge.runtime import generate as G
from tqedge.runtime.chat import Chat
from tqedge.runtime.template import render_for

QUESTION = "What is the capital of France?"


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """TinyLM behind the CLI: returns (model, bundle dir, recorded load options)."""
    lm = TinyLM()
    seen = {}

    def fake_load(bundle, backend, threads, verify, cache_opts, memory=None, spin=False):
        seen.update(backend=backend, threads=threads, verify=verify, memory=memory, spin=spin, **cache_opts)
        lm.cache_defaults.update({k: v for k, v in cache_opts.items() if v is not None})
        return lm

    monkeypatch.setattr(rcli, "_load", fake_load)
    return lm, str(tmp_path), seen


def _run(args, stdin=None):
    return CliRunner().invoke(cli, args, input=stdin, catch_exceptions=False)


def test_generate_json_matches_python_api(tiny):
    lm, bundle, seen = tiny
    r = _run(["generate", bundle, "-p", QUESTION, "--json", "--temperature", "0", "--max-tokens", "9",
              "--kv-budget", "128KiB", "--kv-bits", "exact", "--threads", "1", "--policy", "error"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"text", "tokens", "prompt_ids", "finish_reason", "chat_template", "stats"}
    assert {"prompt_tokens", "generation_tokens", "prefill_tps", "decode_tps", "kv_bytes_used",
            "kv_capacity_bytes", "kv_tokens", "kv_capacity_tokens", "evicted"} <= set(out["stats"])
    assert seen == dict(backend=None, threads=1, verify="auto", memory=None, spin=False, kv_budget="128KiB",
                        kv_bits="exact", window=None, sinks=None, policy="error")
    # chat template is the default for a bundle that has one
    ids = lm.encode(render_for(lm.manifest, [{"role": "user", "content": QUESTION}]), add_special_tokens=False)
    assert out["chat_template"] is True and out["prompt_ids"] == ids
    rs = list(G.stream_generate(lm, ids, max_tokens=9, temperature=0))
    assert out["tokens"] == [x.token for x in rs] and out["text"] == "".join(x.text for x in rs)
    assert out["finish_reason"] == rs[-1].finish_reason == "length"
    assert out["stats"]["kv_capacity_bytes"] == 128 * 1024


def test_generate_raw_stream_and_stop(tiny):
    lm, bundle, _ = tiny
    full = G.generate(lm, QUESTION, max_tokens=20, temperature=0)
    r = _run(["generate", bundle, "-p", QUESTION, "--raw", "--temperature", "0", "--max-tokens", "20"])
    assert r.exit_code == 0 and r.stdout == full + "\n"
    assert "tok/s" in r.stderr and "KV" in r.stderr
    stop = full[5:8]
    r = _run(["generate", bundle, "-p", QUESTION, "--raw", "--temperature", "0", "--max-tokens", "20",
              "--stop", "never!", "--stop", stop])
    assert r.stdout == full[: full.index(stop)] + "\n"


def test_generate_defaults_to_greedy_and_system_message(tiny):
    lm, bundle, _ = tiny
    r = _run(["generate", bundle, "-p", QUESTION, "--json", "--max-tokens", "6", "--system", "Be brief."])
    out = json.loads(r.stdout)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    ids = lm.encode(render_for(lm.manifest, msgs), add_special_tokens=False)
    assert out["prompt_ids"] == ids  # bundle default temperature is 0.7; the CLI's is greedy
    assert out["tokens"] == [x.token for x in G.stream_generate(lm, ids, max_tokens=6, temperature=0)]
    r = _run(["generate", bundle, "-p", QUESTION, "--raw", "--system", "x"])
    assert r.exit_code == 2 and "--system" in r.stderr


def test_generate_prompt_from_stdin_and_errors(tiny):
    lm, bundle, _ = tiny
    r = _run(["generate", bundle, "--raw", "--temperature", "0", "--max-tokens", "5"], stdin=QUESTION)
    assert r.exit_code == 0 and r.stdout == G.generate(lm, QUESTION, max_tokens=5, temperature=0) + "\n"
    r = _run(["generate", bundle, "-p", "  "])
    assert r.exit_code == 2 and r.stderr.startswith("error: the prompt is empty")
    r = _run(["generate", bundle, "-p", "x " * 400, "--raw", "--kv-budget", "64KiB", "--policy", "error"])
    assert r.exit_code == 2 and "holds 256 tokens" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _run(["generate", bundle, "-p", "x", "--temperature", "-1"])
    assert r.exit_code == 2 and "temperature" in r.stderr


def test_chat_scripted_over_stdin(tiny):
    lm, bundle, seen = tiny
    opts = dict(temperature=0, max_tokens=8)
    ref = Chat(lm, system="Be brief.", kv_bits="exact", **opts)
    want1, want2 = ref.send("Hello"), ref.send("And then?")
    stdin = "Hello\n/stats\n\nAnd then?\n/reset\n/exit\nnever sent\n"
    r = _run(["chat", bundle, "--system", "Be brief.", "--temperature", "0", "--max-tokens", "8",
              "--kv-bits", "exact", "--spin"], stdin=stdin)
    assert r.exit_code == 0, r.output
    assert seen["spin"] is True
    lines = r.stdout.splitlines()
    assert lines[0] == want1 and lines[3] == want2 and lines[4] == "[conversation reset]"
    assert lines[1].startswith("[prompt") and "cache:" in lines[2] and "3 messages" in lines[2]  # system, user, assistant
    assert r.stderr.count("[prompt") == 2  # one stats line per reply


def test_chat_scripted_error_exits_2(tiny):
    _, bundle, _ = tiny
    r = _run(["chat", bundle, "--kv-budget", "16KiB", "--kv-bits", "exact", "--policy", "error"], stdin="hi\n")
    assert r.exit_code == 2 and "KV cache full" in r.stderr


def test_interactive_repl_survives_errors_and_interrupts(monkeypatch, capsys):
    lm = TinyLM()
    chat = Chat(lm, kv_bits="exact", kv_budget=120 * 256, policy="error", temperature=0, max_tokens=4)
    lines = iter(["/help", "hi", "x " * 80, "/stats", "/exit", "unreached"])

    def fake_input(prompt=""):
        return next(lines)

    monkeypatch.setattr("builtins.input", fake_input)
    rcli.ChatRepl(chat, interactive=True).run(None)
    out, err = capsys.readouterr()
    assert "/reset" in out and "error: KV cache full" in err  # the error is shown, the loop goes on
    assert "cache:" in out and next(lines) == "unreached"
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]  # the failed turn left no trace

    def interrupting():
        yield "partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "send", lambda text, stream: interrupting())
    repl = rcli.ChatRepl(chat, interactive=True)
    repl.handle("tell me")
    assert "partial [interrupted]" in capsys.readouterr().out and repl.running


UTF8_WARNING = "warning: input is not valid UTF-8; undecodable bytes were replaced with U+FFFD"


def test_invalid_utf8_in_prompt_argument_becomes_fffd_with_one_warning(tiny, monkeypatch):
    """Python hands undecodable argv bytes over as lone surrogates (surrogateescape)."""
    lm, bundle, _ = tiny
    monkeypatch.setattr(rcli, "_warned_utf8", False)
    r = _run(["generate", bundle, "-p", "Hi \udcff there", "--raw", "--json", "--max-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["prompt_ids"] == lm.encode("Hi \ufffd there")
    assert r.stderr.count("warning:") == 1 and UTF8_WARNING in r.stderr
    r = _run(["generate", bundle, "--raw", "--json", "--max-tokens", "3"], stdin=b"caf\xc3 \xff\xfe")
    assert r.exit_code == 0 and json.loads(r.stdout)["prompt_ids"] == lm.encode("caf\ufffd \ufffd\ufffd")
    assert "warning:" not in r.stderr  # once per process


def test_invalid_utf8_on_chat_stdin_keeps_the_conversation_going(tiny, monkeypatch):
    lm, bundle, _ = tiny
    monkeypatch.setattr(rcli, "_warned_utf8", False)
    ref = Chat(lm, kv_bits="exact", temperature=0, max_tokens=8)
    want = [ref.send("Hi \ufffd"), ref.send("And \ufffd\ufffd then?"), ref.send("Bye")]
    stdin = b"Hi \xff\nAnd \xed\xa0 then?\nBye\n"
    r = _run(["chat", bundle, "--temperature", "0", "--max-tokens", "8", "--kv-bits", "exact"], stdin=stdin)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == want
    assert r.stderr.count("warning:") == 1 and r.stderr.count("[prompt") == 3


def test_threads_must_be_at_least_one(tiny):
    _, bundle, _ = tiny
    for bad in ("0", "-3", "two"):
        for cmd in (["generate", bundle, "-p", "x"], ["chat", bundle], ["eval", "needle", bundle]):
            r = _run([*cmd, "--threads", bad])
            assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--threads" in r.stderr, r.output
    import tqedge
    from tqedge.errors import TqedgeError

    for bad in (0, -3, 1.5, True, "2"):
        with pytest.raises(TqedgeError, match="threads must be an integer >= 1"):
            tqedge.load("/no/such/bundle", threads=bad)  # checked before anything is read


# -- SmolLM2 end to end ----------------------------------------------------------------------

def _tqedge(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "tqedge.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_smollm2_generate_json_greedy_equals_python_api(smollm2_bundle, smollm2_model):
    p = _tqedge("generate", str(smollm2_bundle), "-p", QUESTION, "--json", "--temperature", "0",
                "--max-tokens", "16", "--kv-bits", "exact")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    m = smollm2_model
    ids = m.encode(render_for(m.manifest, [{"role": "user", "content": QUESTION}]), add_special_tokens=False)
    rs = list(G.stream_generate(m, ids, max_tokens=16, temperature=0, kv_bits="exact"))
    assert out["prompt_ids"] == ids and out["tokens"] == [r.token for r in rs]
    assert "Paris" in out["text"] and out["finish_reason"] in ("eos", "length")


def test_smollm2_chat_two_turns_and_stats(smollm2_bundle):
    stdin = "What is the capital of France?\nAnd of Italy?\n/stats\n"
    p = _tqedge("chat", str(smollm2_bundle), "--temperature", "0", "--max-tokens", "20", "--kv-budget", "16MiB",
                stdin=stdin)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "Paris" in lines[0] and "Rome" in lines[1]
    assert lines[2].startswith("[prompt") and "cached" in lines[2] and "cache:" in lines[3]
    assert p.stderr.count("[prompt") == 2


def test_smollm2_generate_stop_string(smollm2_bundle):
    p = _tqedge("generate", str(smollm2_bundle), "-p", "The capital of France is", "--raw", "--temperature", "0",
                "--max-tokens", "20", "--kv-bits", "exact", "--stop", "Paris", "--json")
    out = json.loads(p.stdout)
    assert out["finish_reason"] == "stop" and "Paris" not in out["text"] and out["text"].strip() == ""


def test_smollm2_invalid_utf8_on_stdin_and_in_argv(smollm2_bundle):
    """The reported case: `printf 'Hi \\xff\\n...' | tqedge chat B` died with a traceback."""
    cmd = [sys.executable, "-m", "tqedge.cli", "chat", str(smollm2_bundle), "--temperature", "0",
           "--max-tokens", "20", "--kv-budget", "16MiB"]
    p = subprocess.run(cmd, input=b"Hi \xff\nWhat is the capital of France?\n", capture_output=True, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err, err
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 2 and "Paris" in lines[1]
    assert err.count("warning:") == 1 and UTF8_WARNING in err and err.count("[prompt") == 2
    p = subprocess.run([sys.executable.encode(), b"-m", b"tqedge.cli", b"generate", bytes(smollm2_bundle),
                        b"-p", b"What is the capital of France? \xff", b"--max-tokens", b"20"],
                       capture_output=True, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err and err.count("warning:") == 1, err
    assert "Paris" in p.stdout.decode()
