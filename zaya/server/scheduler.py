"""Continuous batching: one thread owns the `Engine` and every HTTP request shares it.

Requests wait in a bounded FIFO queue. At every token boundary the scheduler thread applies
cancellations, admits queued requests from the head while their rows fit in ``max_batch``
(strict FIFO, so a big request is never starved by small ones behind it), then runs one
`Engine.step()` for all active rows and hands each request its events. A request with n samples
is one `Request`: the engine prefills it once and forks the cache n ways.

Consumers live on other threads (the asyncio loop, RSA workers), so results leave through a
``deliver`` callback per job: a list of `TokenEvent`s, an exception, or `DONE`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable

from zaya.engine import Request
from zaya.errors import ZayaError
from zaya.sampling import SamplingParams

log = logging.getLogger("zaya.server")
DONE = object()  # delivered once, after a job's last events


class QueueFull(ZayaError):
    """The wait queue is at its bound; the client should retry later."""


class ShuttingDown(ZayaError):
    """The server is stopping and takes no new work."""


class Job:
    def __init__(self, request: Request, deliver: Callable[[object], None]):
        self.request, self.deliver = request, deliver
        self.submitted = time.monotonic()
        self.admitted: float | None = None
        self.done = False


class Scheduler:
    def __init__(self, engine_factory: Callable[[], object], *, max_batch: int = 16, max_queue: int = 64,
                 metrics=None):
        self.engine_factory = engine_factory
        self.engine = engine_factory()
        self.max_batch, self.max_queue, self.metrics = max_batch, max_queue, metrics
        self._ids = itertools.count()
        self._pending: deque[Job] = deque()
        self._active: dict[int, Job] = {}
        self._cancels: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="zaya-scheduler", daemon=True)

    # -- called from any thread -----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise ContextLengthError (or ZayaError) if the request can never run."""
        self.engine.check(prompt_len, params)

    def submit(self, prompt_ids: list[int], params: SamplingParams, deliver: Callable[[object], None], *,
               bypass_limit: bool = False) -> Job:
        job = Job(Request(prompt_ids, params, prompt_index=next(self._ids)), deliver)
        job.request.tag = job
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if not bypass_limit and len(self._pending) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Forget a job (its client went away): dropped from the queue, or its rows freed."""
        with self._cond:
            if job.done:
                return
            try:
                self._pending.remove(job)
            except ValueError:
                self._cancels.append(job)
            else:
                job.done = True
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_rows(self) -> int:
        return self.engine.active

    @property
    def active_requests(self) -> int:
        return len(self._active)

    # -- the scheduler thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._pending or self._cancels or self.engine.active):
                    self._cond.wait()
                if self._stopping:
                    break
                cancels, self._cancels = self._cancels, []
                admit, rows = [], self.engine.active
                while self._pending and (rows == 0 or rows + self._pending[0].request.params.n <= self.max_batch):
                    job = self._pending.popleft()
                    admit.append(job)
                    rows += job.request.params.n
            for job in cancels:
                self._cancel(job)
            for job in admit:
                self._admit(job)
            if self.engine.active:
                self._step()
        self._shutdown()

    def _cancel(self, job: Job) -> None:
        if self._active.pop(job.request.prompt_index, None) is not None:
            try:
                self.engine.cancel(job.request)
            except Exception:  # noqa: BLE001 - a broken engine is replaced in _step
                log.exception("cancel failed")
            if self.metrics:
                self.metrics.cancelled.inc()
        job.done = True

    def _admit(self, job: Job) -> None:
        job.admitted = time.monotonic()
        try:
            self.engine.add(job.request)
        except Exception as exc:  # noqa: BLE001 - the job gets the error, the server lives on
            if not isinstance(exc, ZayaError):
                log.exception("prefill failed")
            self._finish(job, exc)
            return
        self._active[job.request.prompt_index] = job

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            log.exception("decode step failed; failing %d request(s) and resetting the engine", len(self._active))
            for job in list(self._active.values()):
                self._finish(job, exc)
            self._active.clear()
            try:  # give its blocks back to the shared cache before it is replaced
                self.engine.reset()
            except Exception:  # noqa: BLE001 - the replacement is what matters
                log.exception("resetting the failed engine failed")
            self.engine = self.engine_factory()
            return
        if self.metrics:
            self.metrics.batch_rows.observe(len(events))
            self.metrics.generation_tokens.inc(sum(e.token_id is not None for e in events))
        by_job: dict[int, list] = {}
        for ev in events:
            by_job.setdefault(ev.prompt_index, []).append(ev)
        for key, evs in by_job.items():
            job = self._active.get(key)
            if job is None:
                continue
            self._send(job, evs)
            if job.request.finished:
                del self._active[key]
                self._finish(job, DONE)

    def _send(self, job: Job, item) -> None:
        try:
            job.deliver(item)
        except Exception:  # noqa: BLE001 - the consumer is gone (e.g. its event loop closed)
            if not job.done and job.request.prompt_index in self._active:
                self._cancel(job)

    def _finish(self, job: Job, item) -> None:
        job.done = True
        self._send(job, item)

    def _shutdown(self) -> None:
        gone = ShuttingDown("the server shut down before this request finished")
        for job in list(self._active.values()) + list(self._pending):
            self._finish(job, gone)
        self._active.clear()
        self._pending.clear()
