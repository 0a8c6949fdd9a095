"""The bounded queue and the batcher: a worker thread that runs queued requests through
the engine in batches, in the order and with the costs its :class:`~.scheduler.Scheduler`
decides.

One scheduler serves one-shot requests and streams' clips, earliest deadline first
(:mod:`.scheduler`). Only one-shot requests take queue slots (``max_queue``); streams
are bounded by their own count and buffers."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from ..runtime.pipeline import Engine
from ..runtime.requests import Cancelled, Request, unet_calls
from .config import ServerConfig
from .metrics import Metrics
from .scheduler import Job, QueueFull, Scheduler

log = logging.getLogger(__name__)


class Batcher:
    """A worker thread that runs queued requests through the engine in batches."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics or Metrics(config.max_batch)
        self.scheduler = Scheduler(config)  # read and changed with the lock held
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._slots = 0
        self._closing = False
        self._progress_at: float | None = None  # when the running batch last moved on; None: idle
        self._thread = threading.Thread(target=self._loop, name="riffusion-batcher", daemon=True)

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self._slots

    def start(self) -> None:
        self._thread.start()

    def stalled(self, limit_s: float) -> str | None:
        """Why this batcher is stuck, or None: its worker died, or the running batch has
        not reached its next UNet step (or its end) for more than ``limit_s`` seconds."""
        if self._thread.ident is not None and not self._thread.is_alive() and not self._closing:
            return "the batcher's worker thread has died"
        since = self._progress_at
        if since is not None and time.monotonic() - since > limit_s:
            return f"the running batch has made no progress for {time.monotonic() - since:.0f} s"
        return None

    def submit(self, request: Request) -> Job:
        """Queue ``request``; QueueFull if every slot is taken or the server is closing."""
        with self._cond:
            if self._closing or self._slots >= self.config.max_queue:
                reason = "the server is shutting down" if self._closing else "the queue is full"
                raise QueueFull(reason, self.scheduler.retry_after(self._slots))
            job = Job(request, request.batch_key())
            job.deadline = job.enqueued + self.config.timeout_s
            self._slots += 1
            self.metrics.queue_depth.set(self._slots)
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def submit_images(self, requests: Sequence[Request], deadlines: Sequence[float]) -> list[Job]:
        """Queue a stream's clips, due at ``deadlines``; their futures give image rows.
        QueueFull only when the server is closing."""
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down", 1)
            jobs = [
                Job(r, r.batch_key(), released=True, deadline=d, images_only=True)
                for r, d in zip(requests, deadlines, strict=True)
            ]
            self._pending.extend(jobs)
            self._cond.notify_all()
        return jobs

    def cancel(self, job: Job) -> None:
        """Drop ``job`` (timed out): its slot frees now; its batch stops once all its jobs are dropped."""
        with self._cond:
            job.cancelled = True
            self._release(job)
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued requests, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _release(self, job: Job) -> None:
        # Called with the lock held.
        if not job.released:
            job.released = True
            self._slots -= 1
            self.metrics.queue_depth.set(self._slots)

    def _take(self) -> list[Job] | None:
        """The next batch the scheduler picks, once it says to run it (waiting for others to
        join it up to the batch window). None once closed and empty."""
        with self._cond:
            while True:
                self._pending = deque(j for j in self._pending if not j.cancelled)
                if not self._pending:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                now = time.monotonic()
                batch, wait = self.scheduler.next_batch(self._pending, now, closing=self._closing)
                if wait <= 0:
                    for job in batch:
                        self._pending.remove(job)
                    self.scheduler.taken(batch, self._pending)
                    return batch
                self._cond.wait(wait)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)
            release_free_memory()

    # -- deadlines (--degrade-steps) ----------------------------------------------

    def measure(self, request: Request) -> None:
        """Run ``request`` (not queued) to learn the costs the estimate uses: twice, the
        first run paying one-time costs (allocations, kernel selection)."""
        self.engine.run([request])
        begin = time.perf_counter()
        clips = self.engine.run([request])
        seconds = time.perf_counter() - begin
        with self._cond:
            self.scheduler.learn(clips[0].timings, request.width, 1, seconds)

    def estimate(self, request: Request) -> float | None:
        """Seconds to make ``request`` alone, from the costs measured so far (None: none yet)."""
        with self._cond:
            return self.scheduler.cost(request) if self.scheduler.costs else None

    def fit_steps(self, request: Request, seconds_left: float, min_steps: int) -> Request:
        """``request`` with as many of its steps as end within ``seconds_left`` after the work
        ahead of it, the queued requests giving up steps where needed
        (:meth:`.Scheduler.fit_steps`); QueueFull when even ``min_steps`` would not."""
        with self._cond:
            queued = [j for j in self._pending if not j.cancelled]
            return self.scheduler.fit_steps(request, queued, seconds_left, min_steps)

    def _progress(self, jobs: Sequence[Job], total: int) -> bool:
        """Called before each UNet step of a batch: counts the work left; True stops it."""
        with self._cond:
            self._progress_at = time.monotonic()
            self.scheduler.batch_stepped(jobs, total)
        return all(j.cancelled for j in jobs)

    def _run(self, jobs: Sequence[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        begin = time.perf_counter()
        total = unet_calls(jobs[0].request)
        with self._cond:
            self._progress_at = time.monotonic()
            self.scheduler.batch_started(jobs)
        timings: dict[str, float] = {}
        try:
            images = self.engine.images(
                [j.request for j in jobs], timings=timings, should_stop=lambda: self._progress(jobs, total)
            )
            results = [
                image if job.images_only else self.engine.to_clip(image, dict(timings))
                for job, image in zip(jobs, images, strict=True)
            ]
        except Cancelled as exc:
            self._finish(jobs, error=exc)
            return
        except Exception as exc:
            if len(jobs) > 1:
                log.warning("a batch of %d failed (%s); running its requests one at a time", len(jobs), exc)
                for job in jobs:
                    self._run([job])
                return
            self._finish(jobs, error=exc)
            return
        seconds = time.perf_counter() - begin
        with self._cond:
            self.scheduler.batch_ran(timings, jobs[0].request.width, len(jobs), seconds)
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.batch_seconds.observe(seconds)
        self._finish(jobs, results=results)

    def _finish(
        self, jobs: Sequence[Job], *, results: Sequence[Any] | None = None, error: BaseException | None = None
    ) -> None:
        with self._cond:
            self.scheduler.batch_ended()
            self._progress_at = None
            for i, job in enumerate(jobs):
                self._release(job)
                if results is not None:
                    job.future.set_result(results[i])
                else:
                    job.future.set_exception(error)  # type: ignore[arg-type]


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (another C library, another system)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim() if sys.platform.startswith("linux") else None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system after a batch. NumPy's and torch's
    large temporaries (spectrograms, Griffin-Lim's transforms) are freed into glibc's
    heaps once its mmap threshold has risen past their size, and the heaps of the
    server's many threads keep them: a long-running server's RSS crept up without it
    (``benchmarks/soak.py``). ``malloc_trim(0)`` trims every heap."""
    if _TRIM is not None:
        _TRIM(0)
