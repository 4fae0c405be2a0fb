"""A bounded sweep of bad input over every ``tqedge`` command: each case must exit with status 2,
print exactly one ``error:`` line on stderr (nothing that looks like a traceback) and leave the
workspace as it was (no output directory, no partial, every input byte-identical).

The bundle is the tiny one-layer GGUF model exported once per module (well under a second);
broken variants of it and of its source are made from it. Commands run in-process through
click's test runner (a stray exception there would show up as exit code 1 plus
``r.exception``), and a few also as real processes. ``tqedge serve`` never starts: cases fail in
argument parsing or loading, and ``uvicorn.run`` is replaced by a function that fails the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_export import build_tiny_gguf

import tqedge
from tqedge.bundle import read_manifest, write_manifest
from tqedge.cli import cli

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def _edit_manifest(bundle: Path, edit) -> None:
    p = bundle / "manifest.json"
    data = json.loads(p.read_text())
    edit(data)
    p.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: a good bundle, its broken copies, broken sources and texts."""
    root = tmp_path_factory.mktemp("fuzz")
    gguf = build_tiny_gguf(root / "tiny.gguf")
    good = root / "good.tqe"
    tqedge.export(gguf, good)
    m = read_manifest(good, verify="none")
    m.tokenizer.chat_template = TEMPLATE  # so that chat gets past "no chat template"
    write_manifest(good, m)
    raw = gguf.read_bytes()
    (root / "trunc.gguf").write_bytes(raw[: len(raw) // 3])
    (root / "header.gguf").write_bytes(raw[:40])
    (root / "empty.gguf").write_bytes(b"")
    (root / "random.gguf").write_bytes(np.random.default_rng(0).bytes(20_000))
    (root / "hf-notok").mkdir()  # a valid config, no tokenizer.json (checked before the weights)
    (root / "hf-notok" / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    (root / "hf-gpt2").mkdir()
    (root / "hf-gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    (root / "a-file").write_text("not a directory\n")
    (root / "text.txt").write_text("the cat sat on the mat. " * 40)
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 100)
    (root / "empty-dir").mkdir()
    broken = {
        "badjson": lambda b: (b / "manifest.json").write_text("{not json"),
        "list": lambda b: (b / "manifest.json").write_text("[1, 2]"),
        "deep": lambda b: (b / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
        "wrongtype": lambda b: _edit_manifest(b, lambda d: d.update(architecture=[1])),
        "wrongfield": lambda b: _edit_manifest(b, lambda d: d["architecture"].update(num_layers="one")),
        "negative": lambda b: _edit_manifest(b, lambda d: d["architecture"].update(num_heads=-4)),
        "otherformat": lambda b: _edit_manifest(b, lambda d: d.update(format="something-else")),
        "version1": lambda b: _edit_manifest(b, lambda d: d.update(format_version=1)),
        "version99": lambda b: _edit_manifest(b, lambda d: d.update(format_version=99)),
        "notok": lambda b: (b / "tokenizer.json").unlink(),
        "truncweights": lambda b: (b / "onnx/weights.bin").write_bytes((b / "onnx/weights.bin").read_bytes()[:1000]),
        "flipped": lambda b: (b / "onnx/weights.bin").write_bytes(
            _flip((b / "onnx/weights.bin").read_bytes())),
    }
    for name, breaker in broken.items():
        b = shutil.copytree(good, root / f"{name}.tqe")
        breaker(b)
    return root


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x10
    return bytes(b)


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


STRUCTURAL = ["badjson", "list", "deep", "wrongtype", "wrongfield", "negative", "otherformat", "version1",
              "version99", "notok", "truncweights", "empty-dir", "missing"]
LOADERS = {  # commands that load the model (verify auto: a flipped byte is caught too)
    "generate": ["generate", "{b}", "-p", "hello"],
    "chat": ["chat", "{b}"],
    "eval-ppl": ["eval", "ppl", "{b}", "--text", "{ws}/text.txt"],
    "eval-needle": ["eval", "needle", "{b}", "--haystack", "{ws}/text.txt"],
    "serve": ["serve", "{b}", "--port", "0"],
}
READERS = {  # commands that read the manifest and check sizes
    "plan": ["plan", "--model", "{b}"],
    "inspect": ["inspect", "{b}"],
    "doctor": ["doctor", "--model", "{b}"],
}


def _bundle_cases():
    for variant in STRUCTURAL + ["flipped"]:
        for name, args in {**LOADERS, **READERS}.items():
            if variant == "flipped" and name in READERS:
                continue  # sizes only: see test_verified.py for inspect --verify
            b = "{ws}/" + (f"{variant}.tqe" if variant not in ("empty-dir", "missing") else
                           "empty-dir" if variant == "empty-dir" else "nothing-here.tqe")
            yield f"{name}-{variant}", [a.replace("{b}", b) for a in args]
    yield "inspect-verify-flipped", ["inspect", "{ws}/flipped.tqe", "--verify"]
    yield "generate-bundle-is-a-file", ["generate", "{ws}/a-file", "-p", "x"]


G = ["generate", "{ws}/good.tqe", "-p", "hello", "--max-tokens", "2"]
OPTION_CASES = {
    **{f"kv-budget-{v}": G + ["--kv-budget", v] for v in ("0", "-1MiB", "abc", "1KiB", "12XB", "1e400", "nan")},
    **{f"kv-bits-{v}": G + ["--kv-bits", v] for v in ("9,9", "0,3", "a,b", "4,3,2", "-1,3", "nan,3", "inf,2",
                                                      "K4V3+L99@K2V2", "K4V3+L0@", "", "exactly")},
    **{f"threads-{v}": G + ["--threads", v] for v in ("0", "-3", "x", "99999999999999999999")},
    "window-negative": G + ["--window", "-5"],
    "sinks-negative": G + ["--sinks", "-1"],
    "max-tokens-negative": G + ["--max-tokens", "-1"],
    "temperature-negative": G + ["--temperature", "-1"],
    "top-p-2": G + ["--top-p", "2"],
    "verify-bogus": G + ["--verify", "bogus"],
    "backend-bogus": G + ["--backend", "bogus"],
    "policy-bogus": G + ["--policy", "bogus"],
    "prompt-empty": ["generate", "{ws}/good.tqe", "-p", "   "],
    "chat-kv-bits": ["chat", "{ws}/good.tqe", "--kv-bits", "9,9"],
    "chat-threads": ["chat", "{ws}/good.tqe", "--threads", "0"],
    "ppl-ctx-0": ["eval", "ppl", "{ws}/good.tqe", "--text", "{ws}/text.txt", "--ctx", "0"],
    "ppl-ctx-negative": ["eval", "ppl", "{ws}/good.tqe", "--text", "{ws}/text.txt", "--ctx", "-5"],
    "ppl-windows-0": ["eval", "ppl", "{ws}/good.tqe", "--text", "{ws}/text.txt", "--windows", "0"],
    "ppl-chunk-0": ["eval", "ppl", "{ws}/good.tqe", "--text", "{ws}/text.txt", "--chunk", "0"],
    "ppl-text-missing": ["eval", "ppl", "{ws}/good.tqe", "--text", "{ws}/nothing.txt"],
    "ppl-text-empty": ["eval", "ppl", "{ws}/good.tqe", "--text", "{ws}/empty.txt"],
    "ppl-text-binary": ["eval", "ppl", "{ws}/good.tqe", "--text", "{ws}/binary.txt"],
    "ppl-kv-bits": ["eval", "ppl", "{ws}/good.tqe", "--text", "{ws}/text.txt", "--kv-bits", "9,9"],
    "ppl-kv-budget": ["eval", "ppl", "{ws}/good.tqe", "--text", "{ws}/text.txt", "--kv-budget", "-1"],
    "ppl-threads": ["eval", "ppl", "{ws}/good.tqe", "--text", "{ws}/text.txt", "--threads", "-3"],
    "needle-ctx-abc": ["eval", "needle", "{ws}/good.tqe", "--haystack", "{ws}/text.txt", "--ctx", "abc"],
    "needle-ctx-1": ["eval", "needle", "{ws}/good.tqe", "--haystack", "{ws}/text.txt", "--ctx", "1"],
    "needle-depths": ["eval", "needle", "{ws}/good.tqe", "--haystack", "{ws}/text.txt", "--depths", "2"],
    "needle-depths-abc": ["eval", "needle", "{ws}/good.tqe", "--haystack", "{ws}/text.txt", "--depths", "a,b"],
    "needle-haystack-empty": ["eval", "needle", "{ws}/good.tqe", "--haystack", "{ws}/empty.txt", "--ctx", "64"],
    "needle-haystack-binary": ["eval", "needle", "{ws}/good.tqe", "--haystack", "{ws}/binary.txt", "--ctx", "64"],
    "plan-memory-abc": ["plan", "--model", "{ws}/good.tqe", "--memory", "abc"],
    "plan-memory-negative": ["plan", "--model", "{ws}/good.tqe", "--memory", "-1GiB"],
    "plan-os-reserve": ["plan", "--model", "{ws}/good.tqe", "--os-reserve", "lots"],
    "plan-missing": ["plan"],
    "inspect-missing": ["inspect", "{ws}/nothing.tqe"],
    "doctor-missing": ["doctor", "--model", "{ws}/nothing.tqe"],
    "doctor-bogus-option": ["doctor", "--bogus"],
    **{f"export-{n}": ["export", f"{{ws}}/{n}", "-o", "{ws}/out.tqe"] for n in
       ("trunc.gguf", "header.gguf", "empty.gguf", "random.gguf", "hf-notok", "hf-gpt2", "nothing.gguf",
        "text.txt", "empty-dir")},
    "export-weights": ["export", "{ws}/tiny.gguf", "-o", "{ws}/out.tqe", "--weights", "int3"],
    "export-kv-bits": ["export", "{ws}/tiny.gguf", "-o", "{ws}/out.tqe", "--kv-bits", "9,9"],
    "export-kv-exact": ["export", "{ws}/tiny.gguf", "-o", "{ws}/out.tqe", "--kv-bits", "exact"],
    "export-kv-layers": ["export", "{ws}/tiny.gguf", "-o", "{ws}/out.tqe", "--kv-bits", "K4V3+L7@K2V2"],
    "export-format": ["export", "{ws}/tiny.gguf", "-o", "{ws}/out.tqe", "--format", "coreml"],
    "export-exists": ["export", "{ws}/tiny.gguf", "-o", "{ws}/good.tqe"],
    "export-under-a-file": ["export", "{ws}/tiny.gguf", "-o", "{ws}/a-file/out.tqe"],
    "export-onto-a-file": ["export", "{ws}/tiny.gguf", "-o", "{ws}/a-file", "--force"],
    "export-no-out": ["export", "{ws}/tiny.gguf"],
    "serve-port": ["serve", "{ws}/good.tqe", "--port", "70000"],
    "serve-threads": ["serve", "{ws}/good.tqe", "--threads", "0"],
    "serve-max-sessions": ["serve", "{ws}/good.tqe", "--max-sessions", "0"],
    "serve-kv-budget": ["serve", "{ws}/good.tqe", "--kv-budget", "abc"],
    "serve-kv-budget-tiny": ["serve", "{ws}/good.tqe", "--kv-budget", "1KiB"],
    "serve-session-budget": ["serve", "{ws}/good.tqe", "--session-budget", "-5"],
    "serve-max-body": ["serve", "{ws}/good.tqe", "--max-body", "big"],
    "serve-kv-bits": ["serve", "{ws}/good.tqe", "--kv-bits", "9,9"],
    "serve-verify": ["serve", "{ws}/good.tqe", "--verify", "bogus"],
    "serve-session-dir-file": ["serve", "{ws}/good.tqe", "--session-dir", "{ws}/a-file"],
    "unknown-command": ["fly"],
}
CASES = dict(_bundle_cases()) | OPTION_CASES


@pytest.fixture
def isolated(ws, tmp_path, monkeypatch):
    """Verified-bundle record in a temp cache dir; a server that would start fails the test."""
    monkeypatch.setenv("TQEDGE_CACHE_DIR", str(tmp_path / "cache"))
    try:
        import uvicorn

        def started(*a, **k):
            raise AssertionError("the server started: this input was accepted")

        monkeypatch.setattr(uvicorn, "run", started)
    except ImportError:
        pass
    return ws


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(isolated, name):
    ws = isolated
    args = [a.replace("{ws}", str(ws)) for a in CASES[name]]
    before = _snapshot(ws)
    r = CliRunner().invoke(cli, args, input="hello\n")
    assert r.exception is None or isinstance(r.exception, SystemExit), (name, repr(r.exception))
    assert r.exit_code == 2, (name, r.output)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, (name, r.stderr)
    progress = ("error:", "reading ", "probes", "tokens", "writing graphs")
    assert not [line for line in r.stderr.splitlines() if line and not line.startswith(progress)], (name, r.stderr)
    assert "Traceback" not in r.output
    assert _snapshot(ws) == before, name  # nothing written (no out.tqe, no partial), nothing lost


@pytest.mark.parametrize("name", ["generate-flipped", "chat-badjson", "export-trunc.gguf", "kv-bits-9,9",
                                  "serve-notok", "threads--3"])
def test_as_a_real_process(isolated, name, tmp_path):
    """The same through the console entry point: real stderr, real exit status."""
    args = [a.replace("{ws}", str(isolated)) for a in CASES[name]]
    env = {**os.environ, "TQEDGE_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "tqedge.cli", *args], input="hello\n", capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 2, (name, p.stderr)
    lines = [line for line in p.stderr.splitlines() if not line.startswith("reading ")]
    assert len(lines) == 1 and lines[0].startswith("error:"), (name, p.stderr)


def test_kv_options_sweep(isolated):
    """A deterministic hypothesis sweep of --kv-bits / --kv-budget text: exit 0, or exit 2 with
    one error line; never a traceback."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    alphabet = st.sampled_from(list("0123456789,.-+eEKVLxa@ MiBk"))
    seen = {0: 0, 2: 0}

    @hypothesis.settings(max_examples=40, derandomize=True, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(bits=st.text(alphabet, max_size=12), budget=st.text(alphabet, max_size=8))
    def check(bits, budget):
        args = [a.replace("{ws}", str(isolated)) for a in G] + ["--kv-bits", bits, "--kv-budget", budget]
        r = CliRunner().invoke(cli, args)
        assert r.exception is None or isinstance(r.exception, SystemExit), (bits, budget, repr(r.exception))
        assert r.exit_code in (0, 2), (bits, budget, r.output)
        if r.exit_code == 2:
            assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), (bits, budget, r.stderr)
        seen[r.exit_code] += 1

    check()
    assert seen[2] > 0
