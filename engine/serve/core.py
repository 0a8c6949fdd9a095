"""One engine serving Riffusion's API: its seed images, batcher, streams and metrics, and
the answer to a request body. The single-process server (:mod:`.app`) and each replica
of the cluster (:mod:`.cluster`) are this, behind different front ends, so both answer
every request the same way."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ...kernels.errors import RiffusionError
from ..runtime.defaults import SEED_IMAGE, WIDTH
from ..runtime.pipeline import Engine
from ..runtime.requests import PromptInput, Request
from ..runtime.seeds import SeedLibrary, crop_width
from .api import ApiError, encode_output, engine_request, parse_input
from .batcher import Batcher
from .config import ServerConfig
from .metrics import Metrics
from .scheduler import QueueFull
from .streams import StreamHub

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """An HTTP answer: status, JSON body, extra headers (plain data: it crosses processes)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, message: str, headers: dict[str, str] | None = None) -> Answer:
        return cls(status, {"detail": message}, dict(headers or {}))


def check_max_batch(config: ServerConfig, limit: int | None, *, exported: bool = True) -> None:
    """``config.max_batch`` within ``limit``, the most clips the engine takes in one call
    (None: any); ``exported``: the limit is an export's, set when it was made."""
    if limit is not None and config.max_batch > limit:
        fix = "serve with a smaller one"
        fix = f"export with a larger --max-batch or {fix}" if exported else fix
        raise RiffusionError(
            f"--max-batch {config.max_batch} is more than this model's "
            f"{'export' if exported else 'engine'} takes in one call ({limit}); {fix}"
        )


class EngineServer:
    """``engine`` serving the API: ``start`` (seed images, the batcher), then ``infer``
    per request body, ``hub`` for streams, ``close``."""

    def __init__(self, engine: Engine, config: ServerConfig, *, model: str = "") -> None:
        check_max_batch(config, engine.shape.max_batch, exported=engine.backend.name != "torch")
        self.engine, self.config, self.model = engine, config, model
        engine.backend.shrink_after_runs()  # a server's memory must not keep every shape's peak
        self.seeds = SeedLibrary(config.seed_images, engine.params)
        self.metrics = Metrics(config.max_batch)
        self.batcher = Batcher(engine, config, self.metrics)
        self.hub = StreamHub(engine, self.batcher, self.seeds, config, self.metrics)
        self.warm_up_s: float | None = None  # what start's warm-up took

    def start(self) -> None:
        """Make the built-in seed images, warm up (unless the config says not to), measure
        the per-step cost where the deadline estimate needs it, start the batcher
        (blocking: call it off the event loop)."""
        self.seeds.build()
        if self.config.warm_up:
            self.warm_up_s = self.warm_up()
            log.info("warmed up in %.1f s", self.warm_up_s)
        if self.config.degrade_steps is not None:
            # The deadline estimate needs the per-step cost before the first request.
            self.batcher.measure(Request(PromptInput("warm-up"), steps=self.config.degrade_steps))
        self.batcher.start()
        log.info(
            "serving %s on the %s backend (%s)",
            self.model or "a model",
            self.engine.backend.name,
            self.engine.backend.device,
        )

    def warm_up(self) -> float:
        """Run once every shape the server will run, before it says it is ready, so its
        first request costs what its tenth does: the whole chain at the seed images' width
        and at the player page's 256 where the engine takes it, and on a GPU at every batch
        size up to ``max_batch`` too (on the CPU every stage runs a clip at a time whatever
        the batch, see ``Engine._in_parts``). Returns the seconds it took."""
        began = time.monotonic()
        engine = self.engine
        widths = []
        for width in (WIDTH, 256):
            try:
                engine.check_width(width)
            except RiffusionError:
                continue
            widths.append(width)
        # One UNet call per batch: DDIM, one step, all of it denoised from the seed image.
        start = PromptInput("warm-up", guidance=engine.guidance, denoising=1.0)
        image = self.seeds.get(SEED_IMAGE)
        for width in widths:
            cropped = crop_width(image, width)
            seeded = Request(start, steps=1, width=width, scheduler="ddim", seed_image=cropped)
            batches = range(1, self.config.max_batch + 1) if engine.backend.device != "cpu" else (1,)
            for batch in batches if width == widths[0] else (1,):
                try:
                    engine.run([seeded] * batch)
                except RiffusionError as exc:  # a shape requests will meet the same way
                    log.warning("warm-up at %d px, batch %d: %s", width, batch, exc)
        return time.monotonic() - began

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued requests, then stop the batcher (blocking, ``timeout`` at most)."""
        self.batcher.close(timeout)

    async def infer(self, body: bytes, seconds_left: float | None = None) -> Answer:
        """The answer to ``POST /run_inference/`` with ``body``, within ``seconds_left``
        (default: the server's timeout; 504 past it)."""
        arrived = time.monotonic()
        config, batcher, metrics = self.config, self.batcher, self.metrics
        budget = config.timeout_s if seconds_left is None else seconds_left
        answer = Answer.error(500, "inference failed")
        try:
            inputs = parse_input(body)
            job_request = await asyncio.to_thread(engine_request, inputs, self.engine, self.seeds, config)
            asked = job_request.steps  # the body's, or the default where it left them out
            try:
                if config.degrade_steps is not None:
                    left = budget - (time.monotonic() - arrived)
                    job_request = batcher.fit_steps(job_request, left, config.degrade_steps)
                job = batcher.submit(job_request)
            except QueueFull as exc:
                raise ApiError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
            left = budget - (time.monotonic() - arrived)
            waiter = asyncio.wrap_future(job.future)
            try:
                clip = await asyncio.wait_for(asyncio.shield(waiter), max(left, 0.0))
            except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
                # TimeoutError from 3.11 (its own class on 3.10); cancelled: the caller gave up.
                batcher.cancel(job)
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits now
                if isinstance(exc, asyncio.CancelledError):
                    answer = Answer.error(499, "the caller gave up")  # nginx's code, for the metrics
                    raise
                raise ApiError(
                    504, f"no answer within the server's timeout of {config.timeout_s:g} s"
                ) from None
            payload = await asyncio.to_thread(encode_output, clip, inputs.format)
            ran = job.request.steps  # the batcher may have lowered them while it waited
            metrics.steps.observe(ran)
            answer = Answer(200, payload, {"X-Inference-Steps": str(ran)})
            if ran != asked:
                metrics.degraded.inc()
                answer.headers["X-Requested-Steps"] = str(asked)
        except ApiError as exc:
            answer = Answer.error(exc.status, str(exc), exc.headers)
        except RiffusionError as exc:  # found by the engine while running
            answer = Answer.error(422, str(exc))
        except Exception as exc:
            log.exception("inference failed")
            answer = Answer.error(500, f"inference failed: {type(exc).__name__}: {exc}")
        finally:
            metrics.requests.labels(str(answer.status)).inc()
            metrics.latency.observe(time.monotonic() - arrived)
        return answer

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` says about this engine."""
        config = self.config
        return {
            "status": "ok",
            "model": self.model,
            "backend": self.engine.backend.name,
            "device": self.engine.backend.device,
            "queue_depth": self.batcher.depth,
            "max_queue": config.max_queue,
            "max_batch": config.max_batch,
            "max_steps": config.max_steps,
            "streams_open": self.hub.open,
            "max_streams": config.max_streams,
            "image_ids": self.seeds.ids(),
        }
