"""The generation engine: one worker thread, a bounded queue, requests interleaved per token.

Design (a 2-core device): exactly one model forward runs at a time — onnxruntime already
spreads one forward over the cores, and two concurrent forwards would only fight for them and
for memory bandwidth. The worker thread owns the model and the sessions; the event loop only
parses requests, enqueues jobs and relays events, so it never blocks on the model.

Admitted jobs (each holding its own conversation cache) are stepped round-robin, one token
(or one prefill) each, so a long reply does not hold back the first token of a short one.
Jobs wait in a FIFO queue bounded by ``max_queue`` while no cache is free; beyond that
``submit`` raises :class:`QueueFull` (the API answers 429 with ``Retry-After``). A job whose
client went away is cancelled: its generation stops at the next token and its cache is freed
for the next job (the partial reply stays in the conversation, like an interrupted Chat).
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
from tqedge.runtime.generate import stream_generate

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
        sampling: ``stream_generate`` keyword arguments.
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
    steps: object = None
    out_ids: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Worker thread + queue over a :class:`~tqedge.runtime.server.sessions.SessionManager`.

    Args:
        model: the loaded model.
        sessions: the session manager (only this engine's thread touches it).
        max_queue: jobs that may wait for a cache; more are refused with :class:`QueueFull`.
    """

    def __init__(self, model, sessions, max_queue: int = 16):
        self.model, self.sessions, self.max_queue = model, sessions, max_queue
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
            for job in list(self.running):
                self._step(job)
        for job in list(self.running):
            self._finish(job, None)

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
            try:
                acq = self.sessions.acquire(job.ids)
            except Exception as e:  # noqa: BLE001  (thread boundary, as in _step)
                if not isinstance(e, (TqedgeError, OSError)):
                    log.exception("could not prepare a session")
                log.warning("could not prepare a session: %s", e)
                self.counts["failed"] += 1
                job.emit("error", TqedgeError(str(e)))
                continue
            if acq is None:  # every cache busy after all: wait at the head of the queue
                with self.cv:
                    self.pending.appendleft(job)
                return
            job.acquired, job.out_ids = acq, list(job.ids)
            s = acq.session
            job.steps = stream_generate(self.model, acq.new, cache=s.cache, history=job.ids[: acq.cached],
                                        cached_tokens=acq.cached, **job.sampling)
            job.emit("start", {"cached": acq.cached, "prompt": len(job.ids), "restored": acq.restored})
            with self.cv:
                self.running.append(job)

    def _step(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            self._finish(job, None)
            return
        try:
            r = next(job.steps)
        except Exception as e:  # noqa: BLE001  (thread boundary: one failed request must not stop the worker)
            if not isinstance(e, (TqedgeError, StopIteration)):
                log.exception("generation failed")
            log.warning("generation failed: %s", e)
            self.counts["failed"] += 1
            job.emit("error", TqedgeError(str(e) or "generation ended without a finish reason"))
            self._finish(job, None, failed=True)
            return
        job.out_ids.append(r.token)
        self.tokens += 1
        now = time.monotonic()
        with self._rate_lock:
            self._recent.append((now, 1))
            while self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
        if r.text:
            job.emit("text", r.text)
        if r.finish_reason:
            n = r.stats.generation_tokens - (1 if r.finish_reason == "eos" else 0)
            job.emit("done", {"finish": r.finish_reason, "completion_tokens": n, "cached": job.acquired.cached,
                              "prompt": len(job.ids)})
            self.counts["completed"] += 1
            self._finish(job, r)

    def _finish(self, job: Job, last, failed: bool = False) -> None:
        """Close the job's generator and hand its session back (or drop it after a failure)."""
        if job.steps is not None:
            job.steps.close()
        with self.cv:
            if job in self.running:
                self.running.remove(job)
        self._durations.append(time.monotonic() - job.t_enqueued)
        s = job.acquired.session
        if failed:
            self.sessions.drop(s)
        else:
            self.sessions.release(s, job.out_ids, len(job.ids))
