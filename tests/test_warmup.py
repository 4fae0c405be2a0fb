"""Cold start: the warm-up compiles every kernel signature a real generate uses, its marker
makes later loads skip it, ``tqedge doctor --warmup`` runs it, compiled kernels are cached
in the user's cache directory, never next to the installed sources, and the first run after an
install computes exactly what every later run does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _bundles import smollm2_bundle  # noqa: F401  (fixture)
from click.testing import CliRunner

pytest.importorskip("numba")
ROOT = Path(__file__).resolve().parents[1]

_GENERATE = r"""
import json, sys
import tqedge
from tqedge.bundle import read_manifest
from tqedge.codec import numba_runtime
from tqedge.data import read_text
from tqedge.runtime.warmup import Shape, warmup

def signatures():
    return {f"{d.py_func.__module__}.{d.py_func.__name__}": set(map(str, d.signatures))
            for d in numba_runtime.DISPATCHERS}

warmup(Shape.of(read_manifest(sys.argv[1], verify="none")))
before = signatures()
model = tqedge.load(sys.argv[1], verify="none")
ids = model.encode(read_text())[:2000]  # 4 prefill chunks: the last dequantizes > 4096 head·keys
model.generate(ids, max_tokens=40, temperature=0, window=16)  # backlog encodes every 16 steps
chat = model.chat()  # short context: the serial twins; a second turn reuses the cache
chat.send("Name a colour.", max_tokens=20, temperature=0)
chat.send("And another one?", max_tokens=20, temperature=0)
model.generate("Once upon a time", max_tokens=8, seed=0)  # the bundle's default sampling
after = signatures()
print(json.dumps({"new": {k: sorted(after[k] - before[k]) for k in after if after[k] - before[k]},
                  "warm": sorted(k for k, v in before.items() if v)}))
"""


@pytest.mark.slow
def test_warmup_compiles_every_signature_a_real_generate_uses(smollm2_bundle):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _GENERATE, str(smollm2_bundle)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["new"] == {}  # the generate and chat compiled nothing the warm-up had not
    entry_points = {"quantize", "pack_into", "_scores_impl_serial", "_value_sum_impl_serial",
                    "_dequantize_impl_serial", "_scores_numba", "_weighted_sum_numba", "sample"}
    if len(os.sched_getaffinity(0)) > 1:
        # the parallel twins (prefill dequantizes tiles of KEY_TILE keys: below the parallel threshold)
        entry_points |= {"_scores_impl", "_value_sum_impl"}
    assert entry_points <= {k.rsplit(".", 1)[1] for k in out["warm"]}


@pytest.fixture
def marker_dir(tmp_path, monkeypatch):
    from tqedge.codec import numba_runtime
    from tqedge.runtime import compressed_cache  # noqa: F401  (kernels bind their cache dir at import)

    monkeypatch.setattr(numba_runtime, "_CACHE_DIR", tmp_path)  # markers only: kernels keep their cache
    return tmp_path


def test_ensure_warm_runs_once_per_shape(marker_dir):
    from tqedge.runtime.warmup import Shape, ensure_warm, marker_path

    shape = Shape()
    short = marker_path(shape)
    assert not short.exists()
    first = ensure_warm()  # what load does: the short-chat part
    assert isinstance(first, float) and first > 0
    assert short.is_file() and short.parent == marker_dir
    assert ensure_warm() is None  # warm: nothing to do
    assert isinstance(ensure_warm(full=True), float)  # doctor --warmup: the rest too
    assert ensure_warm(full=True) is None and ensure_warm() is None
    assert isinstance(ensure_warm(force=True), float)
    one_head = Shape(num_kv_heads=1)
    assert marker_path(one_head) != short  # other layouts, another warm-up
    for marker in marker_dir.glob("warm-*.json"):  # a cleared cache directory warms up again
        marker.unlink()
    assert isinstance(ensure_warm(), float)


def test_doctor_warmup(marker_dir):
    from tqedge.runtime.doctor import doctor_cmd

    r = CliRunner().invoke(doctor_cmd, ["--warmup", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["warmup_seconds"] > 0
    assert any(marker_dir.glob("warm-*.json"))
    text = CliRunner().invoke(doctor_cmd, ["--warmup"]).output
    assert "kernels compiled in" in text


_COMPILE = ("import numpy as np; from tqedge.codec import kernels_numba as k; "
            "print(k.halves_to_float(np.array([15360], np.uint16))[0])")


def test_kernels_are_cached_in_the_user_cache_dir_not_beside_the_sources(tmp_path):
    sources = ROOT / "tqedge" / "codec"
    before = {p: p.stat().st_mtime_ns for p in sources.rglob("*.nb[ic]")}
    env = {**{k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"},
           "TQEDGE_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "1.0"
    assert any((tmp_path / "numba").rglob("kernels_numba.halves_to_float-*.nbi"))
    assert {p: p.stat().st_mtime_ns for p in sources.rglob("*.nb[ic]")} == before
    # a user-set NUMBA_CACHE_DIR wins
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert any((tmp_path / "mine").rglob("kernels_numba.halves_to_float-*.nbi"))


_FIRST_TOKEN = r"""
import hashlib, json, sys
import numpy as np
import tqedge
from tqedge.runtime import native_op  # before load: on a cold cache its kernels compile in a child
from tqedge.runtime.template import render_for

def logits(model):
    text = render_for(model.manifest, [{"role": "user", "content": "What is the capital of France?"}])
    return model.forward(model.encode(text), model.new_cache())

if sys.argv[2] == "others-first":  # kernels the op also links, loaded standalone before the op runs
    from tqedge.codec.fastexp import exp_sub
    exp_sub(np.zeros(8, np.float32), np.float32(0), np.empty(8, np.int32))
    logits(tqedge.load(sys.argv[1], backend="onnx", verify="none"))
model = tqedge.load(sys.argv[1], verify="none")
lg = logits(model)
top = np.argsort(lg)[::-1][:2]
print(json.dumps({"backend": model.backend_name, "digest": hashlib.sha256(lg.tobytes()).hexdigest(),
                  "top": [[int(t), float(lg[t])] for t in top],
                  "op_from_cache": native_op.attention_compute.cache_hits > 0}))
"""


@pytest.mark.slow
def test_first_run_after_install_computes_what_later_runs_do(smollm2_bundle, tmp_path):
    """A fresh kernel cache (a new install): importing the native op and the first load compile
    in child processes, and this process loads the kernels from the cache like every later run,
    so the README prompt's logits are bit-equal on the first and a later run — also when the later process loaded kernels the op links (the
    segment path, a standalone kernel) before it. Measured before the fix: the first token flipped
    between 'L' (24.896 vs 24.879) on a fresh install and 'The' (25.122 vs 25.053) on a warm one."""
    env = {**{k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"},
           "TQEDGE_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    script = tmp_path / "first_token.py"
    script.write_text(_FIRST_TOKEN)
    # run from another checkout, as the README's user does: a child that put the working
    # directory first on sys.path would import that tqedge (here: one that cannot be imported)
    checkout = tmp_path / "checkout" / "tqedge"
    checkout.mkdir(parents=True)
    (checkout / "__init__.py").write_text("raise ImportError('the checkout in the working directory')\n")

    def run(mode):
        r = subprocess.run([sys.executable, str(script), str(smollm2_bundle), mode], env=env, cwd=checkout.parent,
                           capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr

    first, log = run("alone")
    assert "compiling the native op's kernels" in log  # a cold cache: a child at the op's import
    assert first["backend"] == "native" and first["op_from_cache"]  # compiled by the child, loaded here
    for mode in ("alone", "others-first"):
        later, log = run(mode)
        assert "compiling the" not in log
        assert later == first, (mode, first["top"], later["top"])
