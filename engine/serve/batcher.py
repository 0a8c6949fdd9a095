"""The bounded queue and the batcher: a worker thread that runs queued requests through
the engine in batches, with the server's Prometheus metrics."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..pipeline import Cancelled, Clip, Engine, Request
from .api import ServerConfig

log = logging.getLogger(__name__)


# -- metrics --------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "riffusion_requests",
            "Inference requests answered, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "riffusion_request_seconds",
            "Inference request latency, arrival to answer",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "riffusion_queue_depth", "Requests waiting or running", registry=self.registry
        )
        self.batch_size = Histogram(
            "riffusion_batch_size",
            "Requests per engine batch",
            buckets=tuple(range(1, max_batch + 1)),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "riffusion_batch_seconds",
            "Engine time per batch",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
            registry=self.registry,
        )


# -- the queue and the batcher --------------------------------------------------------


class QueueFull(Exception):
    """No slot left; ``retry_after`` seconds is an estimate of when one frees."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(f"{reason}; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request in the queue."""

    request: Request
    key: tuple[Any, ...]
    future: concurrent.futures.Future[Clip] = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # timed out: drop it, or stop its batch if all of the batch did
    released: bool = False  # its queue slot has been given back


class Batcher:
    """A worker thread that runs queued requests through the engine in batches."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics or Metrics(config.max_batch)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._slots = 0
        self._closing = False
        self._batch_seconds = 1.0  # running mean, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="riffusion-batcher", daemon=True)

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self._slots

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> Job:
        """Queue ``request``; QueueFull if every slot is taken or the server is closing."""
        with self._cond:
            if self._closing or self._slots >= self.config.max_queue:
                batches = math.ceil((self._slots + 1) / self.config.max_batch)
                reason = "the server is shutting down" if self._closing else "the queue is full"
                raise QueueFull(reason, max(1, math.ceil(batches * self._batch_seconds)))
            job = Job(request, request.batch_key())
            self._slots += 1
            self.metrics.queue_depth.set(self._slots)
            self._pending.append(job)
            self._cond.notify_all()
        return job

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
        """The next batch: the oldest job and up to max_batch - 1 later ones with its key,
        waiting up to the batch window from the oldest job's arrival. None once closed and empty."""
        window = self.config.batch_window_ms / 1000
        with self._cond:
            while True:
                self._pending = deque(j for j in self._pending if not j.cancelled)
                if not self._pending:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                first = self._pending[0]
                batch = [j for j in self._pending if j.key == first.key][: self.config.max_batch]
                remaining = first.enqueued + window - time.monotonic()
                if len(batch) >= self.config.max_batch or remaining <= 0 or self._closing:
                    for job in batch:
                        self._pending.remove(job)
                    return batch
                self._cond.wait(remaining)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, jobs: Sequence[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        begin = time.perf_counter()
        try:
            clips = self.engine.run(
                [j.request for j in jobs], should_stop=lambda: all(j.cancelled for j in jobs)
            )
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
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.batch_seconds.observe(seconds)
        self._finish(jobs, clips=clips)

    def _finish(
        self, jobs: Sequence[Job], *, clips: Sequence[Clip] | None = None, error: BaseException | None = None
    ) -> None:
        with self._cond:
            for i, job in enumerate(jobs):
                self._release(job)
                if clips is not None:
                    job.future.set_result(clips[i])
                else:
                    job.future.set_exception(error)  # type: ignore[arg-type]
