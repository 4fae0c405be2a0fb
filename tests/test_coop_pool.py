"""The cooperative pool runs every item of every job exactly once, on the caller and its
workers, with results equal to a plain loop; workers really take part on a multi-core machine;
stopping joins them; a caller with no workers runs the job alone; an op's parallel-for record
sends the job to onnxruntime's pool instead."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")
from numba import carray, cfunc, types  # noqa: E402

from tqedge.errors import TqedgeError  # noqa: E402
from tqedge.runtime import coop_pool  # noqa: E402
from tqedge.runtime.ort_numba import as_ptr, ccall  # noqa: E402

B_OUT, B_COUNT, B_WHO, B_N, B_WORK, B_SELF = range(6)


@cfunc(types.int64(types.int64, types.int64), nogil=True)
def _item(block, i):
    """Item ``i``: a little arithmetic (so items overlap in time), its result, a tally, its thread."""
    b = carray(as_ptr(block, np.int64), (6,))
    n = b[B_N]
    out = carray(as_ptr(b[B_OUT], np.int64), (n,))
    count = carray(as_ptr(b[B_COUNT], np.int64), (n,))
    who = carray(as_ptr(b[B_WHO], np.int64), (n,))
    s = 0
    for k in range(b[B_WORK]):
        s = (s * 31 + k + i) % 1000003
    out[i] = s
    count[i] += 1
    who[i] = ccall(b[B_SELF], ())
    return 0


def _expected(n: int, work: int) -> np.ndarray:
    out = np.zeros(n, np.int64)
    for i in range(n):
        s = 0
        for k in range(work):
            s = (s * 31 + k + i) % 1000003
        out[i] = s
    return out


def _job(pool, n: int, work: int):
    arrays = [np.zeros(n, np.int64) for _ in range(3)]
    self_fn = ctypes.cast(ctypes.CDLL(None).pthread_self, ctypes.c_void_p).value
    block = np.array([arrays[0].ctypes.data, arrays[1].ctypes.data, arrays[2].ctypes.data, n, work, self_fn],
                     np.int64)
    coop_pool.run(pool.address, _item.address, block.ctypes.data, n)
    return arrays


def test_every_item_once_with_the_plain_loops_result():
    pool = coop_pool.CoopPool(workers=2)
    try:
        want = _expected(37, 300)
        threads = set()
        for _ in range(300):  # many jobs: a late worker must never run an item of the next one twice
            out, count, who = _job(pool, 37, 300)
            assert (count == 1).all()
            np.testing.assert_array_equal(out, want)
            threads |= set(who.tolist())
        if len(os.sched_getaffinity(0)) > 1:
            assert len(threads) > 1  # the workers took items, not only the caller
    finally:
        pool.close()
    assert all(not t.is_alive() for t in pool.workers) and pool.workers == []


_VARYING = """
import sys
import numpy as np
from numba import carray, cfunc, njit, types
from tqedge.runtime import coop_pool
from tqedge.runtime.ort_numba import as_ptr

@cfunc(types.int64(types.int64, types.int64), nogil=True)
def item(block, i):
    b = carray(as_ptr(block, np.int64), (32,))
    b[i] += 1
    return 0

@njit(nogil=True)
def jobs(ctl, fn, reps):
    block = np.zeros(32, np.int64)
    want = np.zeros(32, np.int64)
    for r in range(reps):
        n = (5, 8, 24, 2)[r % 4]
        coop_pool.run(ctl, fn, block.ctypes.data, n)
        want[:n] += 1
    return (block == want).all()

pool = coop_pool.CoopPool(workers=int(sys.argv[1]))
print(jobs(pool.address, item.address, int(sys.argv[2])))
"""


@pytest.mark.parametrize("workers", [1, 3])
def test_jobs_of_different_sizes_never_hang(workers):
    """A late worker that read the last job's word and then this job's larger item count must
    not claim an item (it did before round 35: the caller then waited forever, within about a
    thousand jobs). A subprocess with a timeout, so a hang fails the test instead of the run."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _VARYING, str(workers), "20000"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == "True"  # every item of every job ran exactly once


def _thread_cpu_seconds(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread CPU times from Linux's /proc")
def test_idle_workers_spin_briefly_then_sleep():
    """Between the jobs of a step a worker spins (at most :data:`coop_pool.SPIN_US`) instead of
    going to sleep at once; with no job coming it must then sleep: a second with no jobs costs it
    next to no CPU (an unbounded spin would cost the whole second)."""
    pool = coop_pool.CoopPool(workers=1)
    try:
        for _ in range(50):
            out, count, _ = _job(pool, 16, 200)
            assert (count == 1).all()
        tid = pool.workers[0].native_id
        before = _thread_cpu_seconds(tid)
        time.sleep(1.0)
        assert _thread_cpu_seconds(tid) - before < 0.1
    finally:
        pool.close()


def test_spin_bound_from_the_environment():
    assert coop_pool.spin_us("") == coop_pool.SPIN_US and coop_pool.spin_us("0") == 0
    assert coop_pool.spin_us("120") == 120
    for bad in ("-5", "fast", "1.5", "²"):
        with pytest.raises(TqedgeError, match="TQEDGE_SPIN_US must be an integer"):
            coop_pool.spin_us(bad)


def test_no_workers_runs_on_the_caller():
    pool = coop_pool.CoopPool(workers=0)
    out, count, who = _job(pool, 5, 10)
    assert (count == 1).all() and len(set(who.tolist())) == 1
    np.testing.assert_array_equal(out, _expected(5, 10))
    pool.close()


def test_one_process_pool_per_thread_count():
    a = coop_pool.pool(2)
    assert len(a.workers) == 1 and coop_pool.pool(2) is a
    assert len(coop_pool.pool(3).workers) == 2 and a.workers  # the first pool lives on
    out, count, _ = _job(a, 64, 50)
    assert (count == 1).all()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_jobs_on_a_pool_made_before_the_fork():
    pool = coop_pool.pool(2)
    _job(pool, 8, 10)
    pid = os.fork()
    if pid == 0:  # the child: no workers came along; the job must still complete, correctly
        ok = False
        try:
            out, count, _ = _job(pool, 16, 100)
            ok = pool.workers == [] and (count == 1).all() and (out == _expected(16, 100)).all()
            fresh = coop_pool.pool(2)
            out2, count2, _ = _job(fresh, 16, 100)
            ok = ok and fresh is not pool and (count2 == 1).all()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


L_CALLS, L_N, L_BATCH, L_REFUSE, L_RELEASED = range(5)  # words of the stand-in's log (its "context")


@cfunc(types.int64(types.int64, types.int64, types.int64, types.int64, types.int64), nogil=True)
def _fake_parallel_for(ctx, fn, n, batch, block):
    """Stands in for ``KernelContext_ParallelFor``; ``ctx`` is the address of its log. Logs the
    call, then runs the items backwards (another order than a loop's) and returns NULL, or, when
    the log says refuse, returns a "status" (the log's address) without running them."""
    log = carray(as_ptr(ctx, np.int64), (5,))
    log[L_CALLS] += 1
    log[L_N], log[L_BATCH] = n, batch
    if log[L_REFUSE] != 0:
        return ctx
    for i in range(n - 1, -1, -1):
        ccall(fn, (block, i))
    return 0


@cfunc(types.int64(types.int64), nogil=True)
def _fake_release(status):
    carray(as_ptr(status, np.int64), (5,))[L_RELEASED] += 1
    return 0


@pytest.mark.parametrize("refuse", [False, True])
def test_items_go_to_onnxruntimes_parallel_for_when_the_op_has_one(refuse):
    """``run_items`` with an op's parallel-for record hands the job to it (the cooperative pool
    untouched); a refused call (non-NULL status) is released and the items run here; either way
    every item once, with the loop's result. Below ``min_items`` the record is not used."""
    n, work = 9, 2000
    arrays = [np.zeros(n, np.int64) for _ in range(3)]
    self_fn = ctypes.cast(ctypes.CDLL(None).pthread_self, ctypes.c_void_p).value
    block = np.array([arrays[0].ctypes.data, arrays[1].ctypes.data, arrays[2].ctypes.data, n, work, self_fn],
                     np.int64)
    log = np.zeros(5, np.int64)
    log[L_REFUSE] = int(refuse)
    rec = np.array([_fake_parallel_for.address, log.ctypes.data, _fake_release.address], np.int64)
    coop_pool.run_items(rec.ctypes.data, 0, 0, 2, _item.address, block.ctypes.data, n, 2)
    assert (log[L_CALLS], log[L_N], log[L_BATCH], log[L_RELEASED]) == (1, n, 0, int(refuse))
    assert np.array_equal(arrays[0], _expected(n, work)) and np.all(arrays[1] == 1)
    coop_pool.run_items(rec.ctypes.data, 0, 0, 2, _item.address, block.ctypes.data, 1, 2)  # below min_items
    assert log[L_CALLS] == 1 and arrays[1][0] == 2 and np.all(arrays[1][1:] == 1)
