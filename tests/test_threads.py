"""Threads: kernels launched from several Python threads at once neither abort nor differ from
the NumPy oracle; ``threads=1`` runs one thread (no Numba pool, no onnxruntime pool); the
default threading layer is Numba's workqueue (no spinning); ``threads`` < 1 is refused."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _bundles import smollm2_bundle  # noqa: F401  (fixture)

from tqedge.errors import TqedgeError

pytest.importorskip("numba")
ROOT = Path(__file__).resolve().parents[1]

_KERNELS = r"""
import json, os, sys, threading
import numpy as np
import numba
from numba.np.ufunc import parallel
from tqedge.codec import kernels, kernels_numpy as knp
from tqedge.codec.kernels_numba import PARALLEL_MIN
from tqedge.codec.quantizer import CodecConfig, TurboQuant

tq = TurboQuant(CodecConfig(dim=64, bits=4))
rng = np.random.default_rng(0)
h, g = 2, 3
n = PARALLEL_MIN // h  # H·N ≥ PARALLEL_MIN: the parallel twins
codes, scales = tq.encode(rng.standard_normal((h * n, 64)).astype(np.float32))
args = (codes.reshape(h, n, -1), scales.reshape(h, n, -1).view(np.uint16), tq.segments.table,
        tq.segments.cb, tq.segments.lut)
dp = tq.segments.dp
qp = rng.standard_normal((h, g, dp)).astype(np.float32)
p = rng.random((h, g, n)).astype(np.float32)
ref = (knp.scores(qp, *args), knp.value_sum(p, *args, dp), knp.dequantize(*args, dp))

def run():
    got = (kernels.scores(qp, *args), kernels.value_sum(p, *args, dp), kernels.dequantize(*args, dp))
    return max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in zip(got, ref))

def tasks():
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1

mode, threads = sys.argv[1], int(sys.argv[2])
before = tasks()
errors, worst = [], []
if mode == "concurrent":
    barrier = threading.Barrier(threads)
    def work():
        try:
            barrier.wait()
            for _ in range(25):
                worst.append(run())
        except Exception as e:
            errors.append(repr(e))
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
else:
    kernels.set_threads(threads)
    worst.append(run())
print(json.dumps({"errors": errors, "worst": max(worst), "pool": parallel._is_initialized,
                  "layer": numba.threading_layer() if parallel._is_initialized else None,
                  "tasks_before": before, "tasks_after": tasks()}))
"""


def _kernels(mode: str, threads: int, **env) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}, "NUMBA_NUM_THREADS": "2",
           "PYTHONPATH": str(ROOT), **env}
    r = subprocess.run([sys.executable, "-c", _KERNELS, mode, str(threads)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _two_cores() -> bool:
    return len(os.sched_getaffinity(0)) >= 2 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) >= 2


@pytest.mark.skipif(not _two_cores(), reason="parallel kernels need two cores")
def test_kernels_from_four_threads_at_once_do_not_abort():
    # workqueue aborts the process ("Nested parallel kernel launch") when two threads launch
    # parallel kernels at once; the launch lock runs the serial twin in the other threads
    r = _kernels("concurrent", 4)
    assert r["errors"] == []
    assert r["worst"] < 1e-5  # every thread's results match the NumPy oracle
    assert r["pool"] and r["layer"] == "workqueue"  # the parallel twins really ran, on workqueue


@pytest.mark.skipif(not _two_cores(), reason="parallel kernels need two cores")
def test_one_thread_starts_no_pool_and_two_do():
    one = _kernels("single", 1)
    assert one["worst"] < 1e-5
    assert not one["pool"]  # Numba's thread pool was never started
    assert one["tasks_after"] == one["tasks_before"]
    two = _kernels("single", 2)
    assert two["worst"] < 1e-5
    assert two["pool"] and two["tasks_after"] > two["tasks_before"]  # the oracle: a pool shows up


@pytest.mark.skipif(not _two_cores() or ctypes.util.find_library("gomp") is None,
                    reason="needs two cores and the system libgomp (numba's omp layer)")
def test_a_threading_layer_the_user_set_is_respected():
    assert _kernels("single", 2, NUMBA_THREADING_LAYER="omp")["layer"] == "omp"


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_threads_below_one_are_refused(bad):
    from tqedge.runtime.model import Model

    with pytest.raises(TqedgeError, match="threads"):
        Model(Path("unused"), None, threads=bad)


_MODEL = r"""
import json, os, sys
import numpy as np, numba, onnxruntime, tokenizers  # every library's own start-up threads first
import tqedge
from tqedge.data import read_text
before = len(os.listdir("/proc/self/task"))
model = tqedge.load(sys.argv[1], threads=int(sys.argv[2]), verify="none", backend=sys.argv[3])
ids = model.encode(read_text())[:1500]  # long enough for the parallel kernels (H·N ≥ 4096)
model.generate(ids, max_tokens=4, temperature=0)
print(json.dumps({"before": before, "after": len(os.listdir("/proc/self/task"))}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_model_threads_one_runs_one_thread(smollm2_bundle):
    def run(threads: int, backend: str) -> dict:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-c", _MODEL, str(smollm2_bundle), str(threads), backend], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        return out["after"] - out["before"]

    # segments: no onnxruntime pool, no Numba pool. native: its C-API session may start one
    # thread of its own whatever the pool size (+1 on the dev machine, +0 on CI), no pool.
    for backend, fixed in (("onnx", 0), ("native", 1)):
        one = run(1, backend)
        assert one <= fixed, backend
        if _two_cores():
            assert run(2, backend) > one, backend  # the oracle: with 2 threads the pools exist
