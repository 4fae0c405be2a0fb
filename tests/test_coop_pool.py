"""The cooperative pool runs every item of every job exactly once, on the caller and its
workers, with results equal to a plain loop; workers really take part on a multi-core machine;
stopping joins them; a caller with no workers runs the job alone."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

pytest.importorskip("numba")
from numba import carray, cfunc, types  # noqa: E402

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
