"""The batcher's policy, apart from its worker thread: which batch runs next, and the
cost model behind the deadline estimate (``--degrade-steps``) and ``Retry-After``.

Earliest deadline first: the job due soonest runs first (a one-shot request is due at
its arrival plus the timeout, a stream's clip when the clip before it ends playing),
with the jobs that share its batch key, one-shot or stream, up to ``max_batch``. Clips
are due within seconds, so busy streams would hold a one-shot request back until its
timeout: after ``stream_batches`` batches of clips only have run in a row while a
one-shot request waited, the one-shot request due soonest leads the next batch. So a
one-shot request at the head of the one-shot queue waits for at most the batch running
when it came and ``stream_batches`` batches of clips; one with k batches of one-shot
requests ahead of it, for (k + 1) x (stream_batches + 1) batches and the one running.
The costs are learned from the batches run: seconds per UNet step and for the rest of a
request, by image width."""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..runtime.requests import Clip, Request, unet_calls
from .config import ServerConfig


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


class Scheduler:
    """What runs next and what it costs: plain state, no thread and no lock (its owner,
    the :class:`~.batcher.Batcher`, calls it with its own lock held)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.batch_seconds = 1.0  # running mean, for Retry-After
        # Measured costs, for the deadline estimate, by image width (the work grows faster
        # than the width: attention): seconds per UNet step and for the rest of a request
        # (text encoder, VAE, audio), each per request.
        self.costs: dict[int, tuple[float, float]] = {}
        self.running_left = 0.0  # estimated seconds left in the batch being run
        self._steps_done = 0  # UNet steps the running batch has started
        self.passed_over = 0  # batches of clips only taken in a row while a one-shot request waited

    # -- what runs next -----------------------------------------------------------

    def next_batch(self, pending: Sequence[Job], now: float, *, closing: bool) -> tuple[list[Job], float]:
        """The next batch from ``pending`` (not empty, none cancelled): the job due soonest
        (the one-shot request due soonest, once ``stream_batches`` batches of clips passed
        one over) and up to max_batch - 1 others with its key (the soonest due first); and how many
        seconds to wait for others to join it (the batch window from that job's arrival),
        0 where it runs now (full, its window over, or the server closing)."""
        waiting = [j for j in pending if not j.images_only]
        limit = self.config.stream_batches
        due = waiting if waiting and limit and self.passed_over >= limit else pending
        first = min(due, key=lambda j: (j.deadline, j.enqueued))
        same = sorted((j for j in pending if j.key == first.key and j is not first), key=lambda j: j.deadline)
        batch = [first, *same][: self.config.max_batch]
        remaining = first.enqueued + self.config.batch_window_ms / 1000 - now
        if len(batch) >= self.config.max_batch or remaining <= 0 or closing:
            return batch, 0.0
        return batch, remaining

    def taken(self, batch: Sequence[Job], pending: Sequence[Job]) -> None:
        """``batch`` leaves the queue to run; ``pending`` is what stays queued."""
        if any(not j.images_only for j in batch):
            self.passed_over = 0
        elif any(not j.images_only for j in pending):
            self.passed_over += 1

    def retry_after(self, slots: int) -> int:
        """Seconds until one more request would find a slot, where ``slots`` are taken."""
        batches = math.ceil((slots + 1) / self.config.max_batch)
        return max(1, math.ceil(batches * self.batch_seconds))

    # -- learning the costs -------------------------------------------------------

    def learn(self, timings: dict[str, float], width: int, size: int, seconds: float) -> None:
        """Update the costs at ``width`` from a batch of ``size`` clips that took ``seconds``."""
        steps = max(int(timings.get("unet_steps", 0)), 1)
        step = timings.get("unet", 0.0) / (steps * size)
        rest = max(seconds / size - step * steps, 0.0)
        if width in self.costs:
            old_step, old_rest = self.costs[width]
            step, rest = 0.7 * old_step + 0.3 * step, 0.7 * old_rest + 0.3 * rest
        self.costs[width] = (step, rest)

    def batch_started(self, jobs: Sequence[Job]) -> None:
        """``jobs`` began running as one batch."""
        self._steps_done = 0
        if self.costs:
            self.running_left = sum(self.cost(j.request) for j in jobs)

    def batch_stepped(self, jobs: Sequence[Job], total: int) -> None:
        """The running batch ``jobs`` (``total`` UNet steps) starts its next step."""
        self._steps_done += 1
        if self.costs:
            left = max(total - self._steps_done + 1, 0)
            self.running_left = sum(self.cost(j.request, left) for j in jobs)

    def batch_ran(self, timings: dict[str, float], width: int, size: int, seconds: float) -> None:
        """A batch of ``size`` clips at ``width`` ran in ``seconds`` (``timings``: the engine's)."""
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * seconds
        self.learn(timings, width, size, seconds)

    def batch_ended(self) -> None:
        """The running batch ended (answered or failed): nothing runs."""
        self.running_left = 0.0

    # -- deadlines (--degrade-steps) ----------------------------------------------

    def cost(self, request: Request, steps: int | None = None) -> float:
        """Estimated seconds to run ``request`` alone (``steps`` UNet steps of it): from the
        costs measured at its width, else at the nearest width measured, scaled by width."""
        steps = unet_calls(request) if steps is None else steps
        nearest = min(self.costs, key=lambda w: abs(w - request.width))
        step, rest = self.costs[nearest]
        return (steps * step + rest) * request.width / nearest

    def fit_steps(
        self, request: Request, queued: Sequence[Job], seconds_left: float, min_steps: int
    ) -> Request:
        """``request``, with its steps lowered (to ``min_steps`` at most) where needed so that
        the running batch, the ``queued`` jobs (not yet running, none cancelled) and its own
        run end within ``seconds_left``. Where even ``min_steps`` would not, the queued
        requests give up steps first, latest first, down to ``min_steps`` — each then ends
        sooner than planned; QueueFull only when all of that is not enough. Requests are
        costed one by one (batching only makes them cheaper), from the costs measured so far."""
        if not self.costs:
            return request
        # A fifth kept for what the estimate misses (requests arriving together slow
        # each other down: HTTP and encoding share the cores with the engine).
        budget = 0.8 * seconds_left
        floor = min(min_steps, request.steps)
        own = with_steps(request, floor)
        ahead = self.running_left + sum(self.cost(j.request) for j in queued)
        for job in reversed(queued):
            if ahead + self.cost(own) <= budget:
                break
            if job.request.steps > min_steps and not job.images_only:  # a stream's clip keeps its steps
                lower = with_steps(job.request, min_steps)
                ahead -= self.cost(job.request) - self.cost(lower)
                job.request, job.key = lower, lower.batch_key()
        for steps in range(request.steps, floor - 1, -1):
            candidate = with_steps(request, steps)
            if ahead + self.cost(candidate) <= budget:
                return candidate
        raise QueueFull(f"even {min_steps} steps would miss the server's timeout", max(1, math.ceil(ahead)))


def with_steps(request: Request, steps: int) -> Request:
    """``request`` with ``steps`` scheduler steps (itself where it has them)."""
    return request if steps == request.steps else replace(request, steps=steps)
