"""The bounded queue and the batcher: a worker thread that runs queued requests through
the engine in batches, with the server's Prometheus metrics.

One scheduler serves one-shot requests and streams' clips: the job due soonest runs
first (earliest deadline first: a one-shot request is due at its arrival plus the
timeout, a stream's clip when the clip before it ends playing), with the jobs that share
its batch key, one-shot or stream, up to ``max_batch``. Only one-shot requests take
queue slots (``max_queue``); streams are bounded by their own count and buffers."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..runtime.pipeline import Cancelled, Clip, Engine, Request, unet_calls
from .api import ServerConfig

log = logging.getLogger(__name__)


# -- metrics --------------------------------------------------------------------------


# Request latency buckets (seconds), at a server and at a cluster's ingress.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


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
            buckets=LATENCY_BUCKETS,
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
        self.steps = Histogram(
            "riffusion_inference_steps",
            "Scheduler steps run per answered request (fewer than asked when degraded)",
            buckets=(1, 2, 4, 8, 10, 15, 20, 25, 30, 40, 50, 75, 100, 250, 1000),
            registry=self.registry,
        )
        self.degraded = Counter(
            "riffusion_degraded_requests",
            "Requests run with fewer steps than asked to meet the timeout (--degrade-steps)",
            registry=self.registry,
        )
        self.streams_open = Gauge("riffusion_streams_open", "Streams open", registry=self.registry)
        self.streams_refused = Counter(
            "riffusion_streams_refused",
            "Streams refused: the server's limit was reached",
            registry=self.registry,
        )
        self.stream_clips = Counter("riffusion_stream_clips", "Clips sent to streams", registry=self.registry)
        self.stream_underruns = Counter(
            "riffusion_stream_underruns",
            "Stream clips ready after they were due to start playing",
            registry=self.registry,
        )
        self.stream_margin = Histogram(
            "riffusion_stream_margin",
            "A stream's real-time margin at each clip: audio seconds made per wall second (>= 1 keeps up)",
            buckets=(0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10, 20),
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
    released: bool = False  # its queue slot has been given back (a stream's job takes none)
    deadline: float = math.inf  # monotonic time it is due: the soonest runs first
    images_only: bool = False  # a stream's clip: its result is the image row; the stream makes the audio


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
        # Measured costs, for the deadline estimate (--degrade-steps), by image width (the
        # work grows faster than the width: attention): seconds per UNet step and for the
        # rest of a request (text encoder, VAE, audio), each per request.
        self._costs: dict[int, tuple[float, float]] = {}
        self._running_left = 0.0  # estimated seconds left in the batch being run
        self._steps_done = 0  # UNet steps the running batch has started
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
                batches = math.ceil((self._slots + 1) / self.config.max_batch)
                reason = "the server is shutting down" if self._closing else "the queue is full"
                raise QueueFull(reason, max(1, math.ceil(batches * self._batch_seconds)))
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
        """The next batch: the job due soonest and up to max_batch - 1 others with its key
        (the soonest due first), waiting up to the batch window from that job's arrival.
        None once closed and empty."""
        window = self.config.batch_window_ms / 1000
        with self._cond:
            while True:
                self._pending = deque(j for j in self._pending if not j.cancelled)
                if not self._pending:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                first = min(self._pending, key=lambda j: (j.deadline, j.enqueued))
                same = sorted((j for j in self._pending if j.key == first.key), key=lambda j: j.deadline)
                batch = same[: self.config.max_batch]
                remaining = first.enqueued + window - time.monotonic()
                if len(batch) >= self.config.max_batch or remaining <= 0 or self._closing:
                    for job in batch:
                        self._pending.remove(job)
                    return batch
                self._cond.wait(remaining)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    # -- deadlines (--degrade-steps) ----------------------------------------------

    def measure(self, request: Request) -> None:
        """Run ``request`` (not queued) to learn the costs the estimate uses: twice, the
        first run paying one-time costs (allocations, kernel selection)."""
        self.engine.run([request])
        begin = time.perf_counter()
        clips = self.engine.run([request])
        self._learn(clips[0].timings, request.width, 1, time.perf_counter() - begin)

    def _learn(self, timings: dict[str, float], width: int, size: int, seconds: float) -> None:
        """Update the costs at ``width`` from a batch of ``size`` clips that took ``seconds``."""
        steps = max(int(timings.get("unet_steps", 0)), 1)
        step = timings.get("unet", 0.0) / (steps * size)
        rest = max(seconds / size - step * steps, 0.0)
        with self._cond:
            if width in self._costs:
                old_step, old_rest = self._costs[width]
                step, rest = 0.7 * old_step + 0.3 * step, 0.7 * old_rest + 0.3 * rest
            self._costs[width] = (step, rest)

    def _cost(self, request: Request, steps: int | None = None) -> float:
        """Estimated seconds to run ``request`` alone (``steps`` UNet steps of it): from the
        costs measured at its width, else at the nearest width measured, scaled by width."""
        steps = unet_calls(request) if steps is None else steps
        nearest = min(self._costs, key=lambda w: abs(w - request.width))
        step, rest = self._costs[nearest]
        return (steps * step + rest) * request.width / nearest

    def fit_steps(self, request: Request, seconds_left: float, min_steps: int) -> Request:
        """``request``, with its steps lowered (to ``min_steps`` at most) where needed so that
        the work queued ahead of it and its own run end within ``seconds_left``. Where even
        ``min_steps`` would not, the requests queued (not yet running) give up steps first,
        latest first, down to ``min_steps`` — each then ends sooner than planned; QueueFull
        only when all of that is not enough. Requests are costed one by one (batching only
        makes them cheaper), from the costs measured so far."""
        with self._cond:
            if not self._costs:
                return request
            # A fifth kept for what the estimate misses (requests arriving together slow
            # each other down: HTTP and encoding share the cores with the engine).
            budget = 0.8 * seconds_left
            queued = [j for j in self._pending if not j.cancelled]
            floor = min(min_steps, request.steps)
            own = self._with_steps(request, floor)
            ahead = self._running_left + sum(self._cost(j.request) for j in queued)
            for job in reversed(queued):
                if ahead + self._cost(own) <= budget:
                    break
                if job.request.steps > min_steps and not job.images_only:  # a stream's clip keeps its steps
                    lower = self._with_steps(job.request, min_steps)
                    ahead -= self._cost(job.request) - self._cost(lower)
                    job.request, job.key = lower, lower.batch_key()
            for steps in range(request.steps, floor - 1, -1):
                candidate = self._with_steps(request, steps)
                if ahead + self._cost(candidate) <= budget:
                    return candidate
            retry = max(1, math.ceil(ahead))
        raise QueueFull(f"even {min_steps} steps would miss the server's timeout", retry)

    @staticmethod
    def _with_steps(request: Request, steps: int) -> Request:
        return request if steps == request.steps else replace(request, steps=steps)

    def _progress(self, jobs: Sequence[Job], total: int) -> bool:
        """Called before each UNet step of a batch: counts the work left; True stops it."""
        with self._cond:
            self._progress_at = time.monotonic()
            self._steps_done += 1
            if self._costs:
                left = max(total - self._steps_done + 1, 0)
                self._running_left = sum(self._cost(j.request, left) for j in jobs)
        return all(j.cancelled for j in jobs)

    def _run(self, jobs: Sequence[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        begin = time.perf_counter()
        total = unet_calls(jobs[0].request)
        with self._cond:
            self._progress_at = time.monotonic()
            self._steps_done = 0
            if self._costs:
                self._running_left = sum(self._cost(j.request) for j in jobs)
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
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self._learn(timings, jobs[0].request.width, len(jobs), seconds)
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.batch_seconds.observe(seconds)
        self._finish(jobs, results=results)

    def _finish(
        self, jobs: Sequence[Job], *, results: Sequence[Any] | None = None, error: BaseException | None = None
    ) -> None:
        with self._cond:
            self._running_left = 0.0
            self._progress_at = None
            for i, job in enumerate(jobs):
                self._release(job)
                if results is not None:
                    job.future.set_result(results[i])
                else:
                    job.future.set_exception(error)  # type: ignore[arg-type]
