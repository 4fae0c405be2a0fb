"""The generation engine: one worker thread, a bounded queue, continuous batching.

Design (a 2-core device): exactly one model forward runs at a time — onnxruntime already
spreads one forward over the cores. The worker thread owns the model and the sessions; the
event loop only parses requests, enqueues jobs and relays events, so it never blocks on the model.

Admitted jobs (each holding its own conversation cache) are stepped together by a
:class:`~tqedge.runtime.batch.Batcher`: every step is ONE forward holding the next token of
every conversation that is replying plus prompt chunks of new ones, under a per-step token
budget (``step_tokens``), so the weights are read once for all streams and a long prompt does
not freeze the others. Jobs wait in a FIFO queue bounded by ``max_queue`` while no cache is
free; beyond that ``submit`` raises :class:`QueueFull` (the API answers 429 with
``Retry-After``). A job whose client went away is cancelled: it leaves the batch before the
next step and its cache is freed for the next job (the partial reply stays in the
conversation, like an interrupted Chat).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqedge.errors import TqedgeError
from tqedge.runtime.batch import STEP_TOKENS, Batcher, BatchStream

log = logging.getLogger(__name__)

RATE_WINDOW_S = 30.0  # tok/s in /v1/stats is measured over this many recent seconds


class QueueFull(Exception):
    """The queue is at its bound; ``retry_after`` is a seconds estimate."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One chat-completion request as the worker sees it.

    Args:
        ids: the rendered prompt's token ids.
        sampling: ``stream_generate`` keyword arguments (those :class:`BatchStream` takes).
        emit: called from the worker thread with ``(kind, payload)`` events: ("start", {cached,
            prompt}), ("text", str), ("done", {finish, completion_tokens, cached, prompt}),
            ("error", TqedgeError). Must be thread-safe and must not block.
    """

    ids: list[int]
    sampling: dict
    emit: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_enqueued: float = field(default_factory=time.monotonic)
    # set by the worker
    acquired: object = None
    stream: object = None
    out_ids: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Worker thread + queue over a :class:`~tqedge.runtime.server.sessions.SessionManager`.

    Args:
        model: the loaded model.
        sessions: the session manager (only this engine's thread touches it).
        max_queue: jobs that may wait for a cache; more are refused with :class:`QueueFull`.
        step_tokens: rows per batched forward (decode rows + prompt chunks).
    """

    def __init__(self, model, sessions, max_queue: int = 16, step_tokens: int = STEP_TOKENS):
        self.model, self.sessions, self.max_queue = model, sessions, max_queue
        self.batcher = Batcher(model, step_tokens)
        self.pending: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.cv = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="tqedge-engine", daemon=True)
        # fixed keys, so /v1/stats can copy them from another thread while the worker counts
        self.counts = dict.fromkeys(("submitted", "rejected", "completed", "cancelled", "failed"), 0)
        self._rate_lock = threading.Lock()
        self.tokens = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
        self._durations: collections.deque[float] = collections.deque(maxlen=32)

    # -- control ----------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker: running jobs are cancelled at their next token."""
        with self.cv:
            self._stop = True
            for job in [*self.pending, *self.running]:
                job.cancel()
            self.cv.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` when ``max_queue`` jobs already wait."""
        with self.cv:
            if len(self.pending) >= self.max_queue or self._stop:
                self.counts["rejected"] += 1
                raise QueueFull(self.retry_after())
            self.pending.append(job)
            self.counts["submitted"] += 1
            self.cv.notify()

    def retry_after(self) -> int:
        """Seconds until a queue place is likely free (from recent request durations)."""
        avg = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return int(min(60, max(1, math.ceil(avg * (len(self.pending) + 1) / max(1, self.sessions.slots)))))

    def stats(self) -> dict:
        now = time.monotonic()
        with self._rate_lock:
            recent = sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S)
        return {"queue": {"pending": len(self.pending), "running": len(self.running), "max": self.max_queue},
                "requests": dict(self.counts), "tokens_generated": self.tokens,
                "tokens_per_second": round(recent / RATE_WINDOW_S, 2)}

    # -- the worker -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self._stop and not self.pending and not self.running:
                    self.cv.wait()
                if self._stop:
                    break
            self._admit()
            for job in [j for j in self.running if j.cancelled.is_set()]:  # free their rows now
                self.counts["cancelled"] += 1
                self._finish(job)
            if self.running:
                self._step()
        for job in list(self.running):
            self._finish(job)

    def _admit(self) -> None:
        """Start waiting jobs (FIFO) while a cache can be had."""
        while True:
            with self.cv:
                if not self.pending:
                    return
                job = self.pending[0]
                if job.cancelled.is_set():
                    self.pending.popleft()
                    self.counts["cancelled"] += 1
                    continue
                if not self.sessions.can_admit():
                    return
                self.pending.popleft()
            acq = None
            try:
                acq = self.sessions.acquire(job.ids, align=self.batcher.chunk)
                if acq is not None:
                    s = acq.session
                    job.stream = BatchStream(self.model, acq.new, s.cache, history=job.ids[: acq.cached],
                                             cached_tokens=acq.cached, chunk=self.batcher.chunk, **job.sampling)
            except Exception as e:  # noqa: BLE001  (thread boundary, as in _step)
                if not isinstance(e, (TqedgeError, OSError)):
                    log.exception("could not prepare a session")
                log.warning("could not prepare a session: %s", e)
                self.counts["failed"] += 1
                job.emit("error", TqedgeError(str(e)))
                if acq is not None:
                    self.sessions.drop(acq.session)
                continue
            if acq is None:  # every cache busy after all: wait at the head of the queue
                with self.cv:
                    self.pending.appendleft(job)
                return
            job.acquired, job.out_ids = acq, list(job.ids)
            self.batcher.add(job.stream)
            job.emit("start", {"cached": acq.cached, "prompt": len(job.ids), "restored": acq.restored})
            with self.cv:
                self.running.append(job)

    def _step(self) -> None:
        """One batched forward; relay each job's token, finish the jobs that are done."""
        by_stream = {id(j.stream): j for j in self.running}
        try:
            responses, failed = self.batcher.step()
        except Exception as e:  # noqa: BLE001  (thread boundary: a failed step must not stop the worker)
            if not isinstance(e, TqedgeError):
                log.exception("batched step failed")
            log.warning("batched step failed: %s", e)
            failed = [(j.stream, e) for j in self.running]
            responses = []
        for stream, e in failed:
            job = by_stream[id(stream)]
            self.counts["failed"] += 1
            job.emit("error", TqedgeError(str(e) or "generation failed"))
            self._finish(job, failed=True)
        now = time.monotonic()
        if responses:
            with self._rate_lock:
                self._recent.append((now, len(responses)))
                while self._recent[0][0] < now - RATE_WINDOW_S:
                    self._recent.popleft()
        for stream, r in responses:
            job = by_stream[id(stream)]
            job.out_ids.append(r.token)
            self.tokens += 1
            if r.text:
                job.emit("text", r.text)
            if r.finish_reason:
                n = r.stats.generation_tokens - (1 if r.finish_reason == "eos" else 0)
                job.emit("done", {"finish": r.finish_reason, "completion_tokens": n, "cached": job.acquired.cached,
                                  "prompt": len(job.ids)})
                self.counts["completed"] += 1
                self._finish(job)

    def _finish(self, job: Job, failed: bool = False) -> None:
        """Take the job out of the batch and hand its session back (or drop it after a failure)."""
        self.batcher.remove(job.stream)
        with self.cv:
            if job in self.running:
                self.running.remove(job)
        self._durations.append(time.monotonic() - job.t_enqueued)
        s = job.acquired.session
        if failed:
            self.sessions.drop(s)
        else:
            self.sessions.release(s, job.out_ids, len(job.ids))
