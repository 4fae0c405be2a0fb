"""Cooperative worker threads: nopython code splits a job into items that the calling thread and
``n - 1`` workers claim one at a time; the caller never waits for a worker to *start*.

Why not Numba's ``prange``: a parallel launch hands every worker its share up front and waits for
all of them, so a worker that the OS has not scheduled stalls the whole launch for a time slice.
Measured on the 2-core development machine with two other busy processes: an empty 2-thread
``prange`` took 8.0 ms per launch (1.5 µs on one thread); the native op makes 30 such calls per
decode step. Here the caller claims items too, so a worker that does not get a core simply claims
nothing and the job runs at serial speed; the caller waits only for items a worker has claimed
and not yet finished.

Between jobs a worker spins on the sequence word (``pause``, an acquire load that leaves the
line shared) for at most :func:`spin_us` (20 µs; ``TQEDGE_SPIN_US``), then sleeps on a condition
variable; a caller whose worker still runs an item spins as long for it before sleeping. A decode
step is ~120 jobs a few to tens of µs apart, and a worker that slept after each had to be woken
(a futex round trip) for every one. Round 36 (SmolLM2 int4, 2 threads, AMD Zen 5,
benchmarks/ab_step.py, 3 rounds): a decode step 7.8 → 6.0 ms at 512 tokens and 10.9 → 7.3 at 2K,
for +10 % CPU time at 512 (−7 % at 2K); beside one busy process (benchmarks/threads.py, 2K) it
keeps 66 % of its idle speed, and its busy speed is no lower than before (83 vs 79 tok/s). A
200 µs bound kept 54 %: the bound is what leaves a busy neighbour its share (round 37: 20 µs by
default, :data:`SPIN_US`).

The protocol lives in one int64 control block (:data:`WORDS` words, then room for a
``pthread_mutex_t`` and two ``pthread_cond_t``) and uses libc's pthread functions through their
addresses, stored in the block, so the compiled code holds no address (Numba's disk cache stays
valid). A job: ``(fn, block, n)``; ``fn`` is a C function ``int64 fn(int64 block, int64 item)``
(a ``cfunc`` address). Items are claimed by compare-and-swap on the word ``(job id << 32) |
next item``: a worker that woke late sees another job id and claims nothing of it. A new job
first closes that word (its own id, next item :data:`CLOSED`) and only then writes its item
count, function and block, then opens the word at item 0: a late worker that read the old word
and then the new count fails its compare-and-swap instead of claiming an item that was never
the old job's (before round 35 it could, and the caller waited forever: a hang within about a
thousand jobs whose item counts differ; ``tests/test_coop_pool.py``).

:func:`run_items` is the entry for nopython callers: onnxruntime's intra-op pool when the
calling op was handed one (``KernelContext_ParallelFor``: the session's own threads, which also
claim items dynamically and revoke the ones no thread started), else this pool when it can have
it, this thread alone otherwise. :func:`run` must be called by one thread at a time (the caller
holds the process-wide launch lock, :data:`tqedge.codec.numba_runtime.LOCK_ADDRESS`).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

import numpy as np
from numba import carray

from tqedge.codec.numba_runtime import _cas64, cpu_relax, load_acquire, njit, release, try_acquire
from tqedge.errors import TqedgeError
from tqedge.runtime.ort_numba import PAR_WORDS, as_ptr, ccall

# control block words
W_JOB, W_N, W_FN, W_BLOCK, W_DONE, W_STOP, W_SEQ = range(7)
W_LOCK, W_UNLOCK, W_WAIT, W_BROADCAST, W_SIGNAL = range(7, 12)
W_MUTEX, W_WORK_CV, W_DONE_CV = 12, 13, 14  # addresses of the pthread objects (inside the block)
W_CLOCK, W_CLOCK_ID, W_SPIN_NS = 15, 16, 17  # clock_gettime, its monotonic clock, the spin bound
WORDS = 18
# the default bound of a spin; ``TQEDGE_SPIN_US`` overrides it (0: sleep at once). Decode at 2K
# beside one busy process (benchmarks/threads.py, 3 rounds, medians): 0 / 20 / 50 µs → idle 57 /
# 82 / 85 tok/s, busy 49 / 54 / 45 (Xeon, round 37); Zen 5 (round 36): idle 87 / 123 / 127, busy
# 79 / 87 / 83. 20 keeps the most beside a neighbour on both for ~4 % idle.
SPIN_US = 20
CLOSED = 0xFFFFFFFF  # the job word's item field while a job is being set up: ≥ any item count
PTHREAD_BYTES = 128  # room for one pthread_mutex_t / pthread_cond_t on every libc we run on (≤ 64)
_OPTS = dict(warm=False, nogil=True)


@njit(inline="always", **_OPTS)
def _load(addr):
    """Atomic (seq_cst) read of the int64 at ``addr``: a compare-and-swap that changes nothing."""
    return _cas64(addr, 0, 0)


@njit(inline="always", **_OPTS)
def _add(addr, k):
    """Atomic fetch-and-add; returns the new value."""
    while True:
        old = _cas64(addr, 0, 0)
        if _cas64(addr, old, old + k) == old:
            return old + k


@njit(inline="always", **_OPTS)
def _store(addr, v):
    """Atomic (seq_cst) write: compare-and-swap until it takes."""
    while True:
        old = _cas64(addr, 0, 0)
        if _cas64(addr, old, v) == old:
            return


@njit(**_OPTS)
def _now_ns(ctl, ts):
    ccall(ctl[W_CLOCK], (ctl[W_CLOCK_ID], ts.ctypes.data))
    return ts[0] * 1_000_000_000 + ts[1]


@njit(**_OPTS)
def _spin_while(ctl, addr, value, ts):
    """Spin (``pause``) while the word at ``addr`` equals ``value``, at most the control block's
    spin bound (the block's ``W_SPIN_NS``, from :func:`spin_us`); returns the word's last value read."""
    w = load_acquire(addr)
    if w != value or ctl[W_SPIN_NS] <= 0:
        return w
    end = _now_ns(ctl, ts) + ctl[W_SPIN_NS]
    while True:
        for _ in range(64):
            cpu_relax()
            w = load_acquire(addr)
            if w != value:
                return w
        if _now_ns(ctl, ts) >= end:
            return w


@njit(**_OPTS)
def _claim_and_run(ctl_addr, job):
    """Claim items of job ``job`` until none is left (or another job is published); run them."""
    ctl = carray(as_ptr(ctl_addr, np.int64), (WORDS,))
    w_job = ctl_addr + 8 * W_JOB
    while True:
        w = _load(w_job)
        if (w >> 32) != job:
            return
        n = _load(ctl_addr + 8 * W_N)
        i = w & 0xFFFFFFFF
        if i >= n:
            return
        if _cas64(w_job, w, w + 1) != w:
            continue
        ccall(ctl[W_FN], (ctl[W_BLOCK], i))
        if _add(ctl_addr + 8 * W_DONE, 1) == n:  # the last item: wake a caller waiting for it
            ccall(ctl[W_LOCK], (ctl[W_MUTEX],))
            ccall(ctl[W_SIGNAL], (ctl[W_DONE_CV],))
            ccall(ctl[W_UNLOCK], (ctl[W_MUTEX],))


@njit(**_OPTS)
def worker_loop(ctl_addr):
    """A worker: spin a little, then sleep until a job is published (or stop), help with it, repeat."""
    ctl = carray(as_ptr(ctl_addr, np.int64), (WORDS,))
    ts = np.zeros(2, np.int64)
    seen = _load(ctl_addr + 8 * W_SEQ)
    while True:
        if _spin_while(ctl, ctl_addr + 8 * W_SEQ, seen, ts) == seen:  # nothing new within the bound: sleep
            ccall(ctl[W_LOCK], (ctl[W_MUTEX],))
            while _load(ctl_addr + 8 * W_SEQ) == seen and _load(ctl_addr + 8 * W_STOP) == 0:
                ccall(ctl[W_WAIT], (ctl[W_WORK_CV], ctl[W_MUTEX]))
            ccall(ctl[W_UNLOCK], (ctl[W_MUTEX],))
        if _load(ctl_addr + 8 * W_STOP) != 0:
            return 0
        seen = _load(ctl_addr + 8 * W_SEQ)
        _claim_and_run(ctl_addr, seen)


@njit(**_OPTS)
def run(ctl_addr, fn, block, n):
    """Run items ``0 .. n-1`` of ``fn(block, item)`` on this thread and any idle workers;
    returns when every item has finished. One caller at a time."""
    ctl = carray(as_ptr(ctl_addr, np.int64), (WORDS,))
    ccall(ctl[W_LOCK], (ctl[W_MUTEX],))
    job = _load(ctl_addr + 8 * W_SEQ) + 1
    w_job = ctl_addr + 8 * W_JOB
    _store(w_job, (job << 32) | CLOSED)  # closed: no claim of the last job can succeed from here
    _store(ctl_addr + 8 * W_N, n)
    _store(ctl_addr + 8 * W_FN, fn)
    _store(ctl_addr + 8 * W_BLOCK, block)
    _store(ctl_addr + 8 * W_DONE, 0)
    _store(w_job, job << 32)  # open: items claimable from here on
    _store(ctl_addr + 8 * W_SEQ, job)
    ccall(ctl[W_BROADCAST], (ctl[W_WORK_CV],))
    ccall(ctl[W_UNLOCK], (ctl[W_MUTEX],))
    _claim_and_run(ctl_addr, job)
    done = _load(ctl_addr + 8 * W_DONE)
    if done < n:  # a worker still runs an item it claimed: spin a little for it
        ts = np.zeros(2, np.int64)
        while done < n and _spin_while(ctl, ctl_addr + 8 * W_DONE, done, ts) != done:
            done = _load(ctl_addr + 8 * W_DONE)
    if _load(ctl_addr + 8 * W_DONE) < n:  # still running: sleep until its last item signals
        ccall(ctl[W_LOCK], (ctl[W_MUTEX],))
        while _load(ctl_addr + 8 * W_DONE) < n:
            ccall(ctl[W_WAIT], (ctl[W_DONE_CV], ctl[W_MUTEX]))
        ccall(ctl[W_UNLOCK], (ctl[W_MUTEX],))
    return 0


@njit(**_OPTS)
def run_items(ort_pool, ctl_addr, lock, threads, fn, block, n, min_items):
    """Items ``0 .. n-1`` of ``fn(block, item)`` (a ``cfunc`` address) when there are
    ``min_items`` items or more: on onnxruntime's intra-op pool when ``ort_pool`` ≠ 0 (the
    address of an op's parallel-for record, :func:`tqedge.runtime.ort_numba.parallel_record`;
    ``fn`` is called as ``void fn(void*, size_t)``, the same registers and an ignored result on
    the x86-64 and AArch64 C ABIs); else with this pool's idle workers (:func:`run`) when
    ``threads`` > 1, a pool exists (``ctl_addr`` ≠ 0) and the process-wide launch ``lock`` is
    free; else one after another on this thread. Every way calls ``fn``: one machine-code copy
    of the item, the same bits."""
    if n >= min_items and ort_pool != 0:
        rec = carray(as_ptr(ort_pool, np.int64), (PAR_WORDS,))
        st = ccall(rec[0], (rec[1], fn, n, 0, block))
        if st == 0:
            return 0
        ccall(rec[2], (st,))  # not run (onnxruntime refused the call): run them here
        for i in range(n):
            ccall(fn, (block, i))
        return 0
    if n >= min_items and threads > 1 and ctl_addr != 0 and try_acquire(lock):
        run(ctl_addr, fn, block, n)
        release(lock)
    else:
        for i in range(n):
            ccall(fn, (block, i))
    return 0


def spin_us(env: str | None = None) -> int:
    """The spin bound in µs: ``TQEDGE_SPIN_US`` (an integer ≥ 0; 0 sleeps at once, as before
    round 36) or :data:`SPIN_US`."""
    env = os.environ.get("TQEDGE_SPIN_US") if env is None else env
    if env is None or env == "":
        return SPIN_US
    if not (env.isascii() and env.isdigit()):
        raise TqedgeError(f"TQEDGE_SPIN_US must be an integer number of microseconds >= 0, got {env!r}")
    return int(env)


def _libc_fn(libc, name: str) -> int:
    return ctypes.cast(getattr(libc, name), ctypes.c_void_p).value


class CoopPool:
    """``workers`` sleeping threads and the control block :func:`run` reads (``address``).

    Start it once per process (:func:`pool`); it lives as long as the process. In a forked child
    every pool gets fresh pthread objects and no workers: jobs then run on the caller alone, and
    :func:`pool` starts the child's own pools."""

    def __init__(self, workers: int):
        libc = ctypes.CDLL(None)
        self._mem = np.zeros(WORDS + 3 * PTHREAD_BYTES // 8, np.int64)
        self.ctl = self._mem[:WORDS]
        self.address = self._mem.ctypes.data
        base = self.address + 8 * WORDS
        self.ctl[W_MUTEX], self.ctl[W_WORK_CV], self.ctl[W_DONE_CV] = base, base + PTHREAD_BYTES, base + 2 * PTHREAD_BYTES
        self._init_sync(libc)
        self.ctl[W_CLOCK] = _libc_fn(libc, "clock_gettime")
        self.ctl[W_CLOCK_ID] = time.CLOCK_MONOTONIC
        self.ctl[W_SPIN_NS] = spin_us() * 1000
        for word, name in ((W_LOCK, "pthread_mutex_lock"), (W_UNLOCK, "pthread_mutex_unlock"),
                           (W_WAIT, "pthread_cond_wait"), (W_BROADCAST, "pthread_cond_broadcast"),
                           (W_SIGNAL, "pthread_cond_signal")):
            self.ctl[word] = _libc_fn(libc, name)
        self.workers = [threading.Thread(target=worker_loop, args=(self.address,), daemon=True,
                                         name=f"tqedge-coop-{i}") for i in range(workers)]
        for t in self.workers:
            t.start()

    def _init_sync(self, libc) -> None:
        base = int(self.ctl[W_MUTEX])
        if libc.pthread_mutex_init(ctypes.c_void_p(base), None) or any(
                libc.pthread_cond_init(ctypes.c_void_p(base + k * PTHREAD_BYTES), None) for k in (1, 2)):
            raise OSError("pthread_mutex_init / pthread_cond_init failed")

    def _after_fork(self) -> None:
        """In a forked child: the workers did not come along and a copied mutex may be held;
        fresh pthread objects and no workers (its jobs then run on the caller alone)."""
        self._init_sync(ctypes.CDLL(None))
        self.ctl[W_STOP] = 0
        self.workers = []

    def close(self) -> None:
        """Stop and join the workers (tests; the process pool is never closed)."""
        libc = ctypes.CDLL(None)
        libc.pthread_mutex_lock(ctypes.c_void_p(int(self.ctl[W_MUTEX])))
        self.ctl[W_STOP] = 1
        libc.pthread_cond_broadcast(ctypes.c_void_p(int(self.ctl[W_WORK_CV])))
        libc.pthread_mutex_unlock(ctypes.c_void_p(int(self.ctl[W_MUTEX])))
        for t in self.workers:
            t.join()
        self.workers = []


_POOLS: dict = {}  # (pid, workers) → pool; never closed: descriptors hold their addresses
_POOLS_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _POOLS_LOCK
    _POOLS_LOCK = threading.Lock()
    for p in _POOLS.values():  # descriptors made before the fork still hold these addresses
        p._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def pool(threads: int) -> CoopPool:
    """The process's pool for ``threads`` threads (``threads - 1`` workers), started on first use."""
    key = (os.getpid(), max(0, int(threads) - 1))
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = CoopPool(key[1])
        return _POOLS[key]
