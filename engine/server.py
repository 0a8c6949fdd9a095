"""Riffusion's HTTP API over an :class:`~riffusion_engine.engine.pipeline.Engine`.

``POST /run_inference/`` takes the original server's request and answers with its
response, so Riffusion's web app and its clients work unchanged. Around it:

- a bounded queue: at most ``max_queue`` requests wait or run; one more answers 503
  with ``Retry-After``;
- batching: the oldest waiting request waits up to ``batch_window_ms`` for others that
  share its batch key (steps, size, seed-image step) and runs with up to ``max_batch``
  of them as one UNet batch;
- a deadline: a request still unanswered after ``timeout_s`` answers 504 and leaves
  the queue; a batch whose requests have all timed out stops at its next step;
- isolation: when a batch fails, its requests are run one at a time, so an exception
  fails only the request that raised it;
- ``GET /health``, ``GET /metrics`` (Prometheus text) and the OpenAPI schema at
  ``/openapi.json`` (pages at ``/docs``).

Bad input is answered 400 (not JSON, unknown image id), 413 (body over the limit) or
422 (a field of the wrong type or out of range), each with a message naming the
field; never 500, which is kept for the engine failing on valid input.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from riffusion_engine.kernels.audio import encode_audio
from riffusion_engine.kernels.errors import RiffusionError

from .pipeline import MAX_SEED, Cancelled, Clip, Engine, PromptInput, Request
from .prompts import MAX_PROMPT_CHARS
from .seeds import ID_PATTERN, SeedLibrary

log = logging.getLogger(__name__)

MAX_GUIDANCE = 100.0
AUDIO_MIME = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac"}


# -- the original's request and response ------------------------------------------


class ApiPromptInput(BaseModel):
    """One end of the interpolation (the original's ``PromptInput``)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="text prompt; (word:1.3) sets emphasis")
    seed: int = Field(ge=0, le=MAX_SEED, description="seed of the noise")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="what to avoid")
    denoising: float = Field(0.75, ge=0, le=1, allow_inf_nan=False, description="share of the steps run")
    guidance: float = Field(7.0, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False, description="guidance scale")


class InferenceInput(BaseModel):
    """The body of ``POST /run_inference/`` (the original's ``InferenceInput``)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    alpha: float = Field(ge=0, le=1, allow_inf_nan=False, description="position between start and end")
    num_inference_steps: int = Field(50, ge=1, description="scheduler steps (at most the server's max)")
    seed_image_id: str = Field("og_beat", pattern=ID_PATTERN.pattern, description="seed image to start from")
    mask_image_id: str | None = Field(
        None, pattern=ID_PATTERN.pattern, description="mask (white = regenerate)"
    )
    start: ApiPromptInput
    end: ApiPromptInput
    format: Literal["mp3", "wav", "flac"] = Field("mp3", description="audio format of the response")


class InferenceOutput(BaseModel):
    """The response of ``POST /run_inference/`` (the original's ``InferenceOutput``)."""

    image: str = Field(description="data:image/jpeg;base64,... the spectrogram, parameters in its EXIF")
    audio: str = Field(description="data:audio/mpeg;base64,... (or audio/wav, audio/flac)")
    duration_s: float = Field(description="length of the audio in seconds")


class ApiError(Exception):
    """An HTTP error answer: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class ServerConfig:
    """Limits and batching of the server."""

    max_batch: int = 4  # most requests in one UNet batch (the UNet sees twice this with guidance)
    batch_window_ms: float = 20.0  # how long the oldest request waits for others to batch with
    max_queue: int = 32  # most requests waiting or running; one more answers 503
    timeout_s: float = 300.0  # a request unanswered after this answers 504 and leaves the queue
    max_steps: int = 100  # largest num_inference_steps accepted
    max_body_bytes: int = 64 * 1024  # larger bodies answer 413
    seed_images: Path | None = None  # a directory of ID.png seed images and masks (adds to the built-ins)

    def __post_init__(self) -> None:
        checks = (
            ("max_batch", self.max_batch >= 1),
            ("batch_window_ms", math.isfinite(self.batch_window_ms) and self.batch_window_ms >= 0),
            ("max_queue", self.max_queue >= 1),
            ("timeout_s", math.isfinite(self.timeout_s) and self.timeout_s > 0),
            ("max_steps", 1 <= self.max_steps <= 1000),
            ("max_body_bytes", self.max_body_bytes >= 1024),
        )
        for name, ok in checks:
            if not ok:
                raise RiffusionError(f"server option {name} out of range: {getattr(self, name)!r}")


def parse_input(body: bytes) -> InferenceInput:
    """The request body as :class:`InferenceInput` (JSON whatever the Content-Type)."""
    try:
        return InferenceInput.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise ApiError(400, f"body is not JSON: {errors[0]['msg']}") from None
        lines = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:8]]
        raise ApiError(422, "; ".join(lines)) from None


def engine_request(
    inputs: InferenceInput, engine: Engine, seeds: SeedLibrary, config: ServerConfig
) -> Request:
    """The engine request for ``inputs``, every field checked (ApiError naming the field)."""
    if inputs.num_inference_steps > config.max_steps:
        raise ApiError(
            422, f"num_inference_steps: at most {config.max_steps}, got {inputs.num_inference_steps}"
        )

    def image(field_name: str, image_id: str, mode: str) -> Any:
        try:
            return seeds.get(image_id, field=field_name, mode=mode)
        except RiffusionError as exc:
            raise ApiError(400, str(exc)) from None

    def checked(name: str, check: Callable[[], Any]) -> Any:
        try:
            return check()
        except RiffusionError as exc:
            raise ApiError(422, f"{name}: {exc}") from None

    seed_image = image("seed_image_id", inputs.seed_image_id, "RGB")
    mask = image("mask_image_id", inputs.mask_image_id, "L") if inputs.mask_image_id else None
    ends = []
    for name, end in (("start", inputs.start), ("end", inputs.end)):
        checked(f"{name}.prompt", lambda e=end: engine.check_text(e.prompt))
        if end.negative_prompt is not None:
            checked(
                f"{name}.negative_prompt", lambda e=end: engine.check_text(e.negative_prompt, negative=True)
            )
        ends.append(PromptInput(end.prompt, end.seed, end.negative_prompt, end.guidance, end.denoising))
    request = checked(
        "seed_image_id",
        lambda: Request(
            ends[0],
            ends[1],
            inputs.alpha,
            inputs.num_inference_steps,
            seed_image.width,
            seed_image=seed_image,
            mask=mask,
        ),
    )
    # The prompts were checked above, field by field.
    checked("seed_image_id" if mask is None else "mask_image_id", lambda: engine.check_images(request))
    return request


def encode_output(clip: Clip, fmt: str) -> dict[str, Any]:
    """The original's response: JPEG image (EXIF kept) and audio as data URLs."""
    jpeg = io.BytesIO()
    clip.image.convert("RGB").save(jpeg, format="JPEG", exif=clip.image.getexif())
    audio = encode_audio(clip.audio, clip.sample_rate, fmt)
    return {
        "image": "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode(),
        "audio": f"data:{AUDIO_MIME[fmt]};base64," + base64.b64encode(audio).decode(),
        "duration_s": clip.duration_s,
    }


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


# -- the application ------------------------------------------------------------------


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its ``$defs`` references written out (for the OpenAPI body)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"body: {length} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body: over the limit of {limit} bytes")
    return bytes(body)


def create_app(engine: Engine, config: ServerConfig | None = None, *, model: str = "") -> FastAPI:
    """The FastAPI application serving ``engine``."""
    config = config or ServerConfig()
    if engine.shape.max_batch is not None and config.max_batch > engine.shape.max_batch:
        raise RiffusionError(
            f"max_batch {config.max_batch} is more than this model's export takes "
            f"({engine.shape.max_batch}); export with a larger --max-batch or serve with a smaller one"
        )
    seeds = SeedLibrary(config.seed_images, engine.params)
    metrics = Metrics(config.max_batch)
    batcher = Batcher(engine, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(seeds.build)  # the built-ins, made once, up front
        batcher.start()
        log.info(
            "serving %s on the %s backend (%s)",
            model or "a model",
            engine.backend.name,
            engine.backend.device,
        )
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(
        title="riffusion-engine",
        summary="Riffusion's inference API: prompts in, spectrogram image and audio out.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.metrics = metrics
    body_schema = _inline_refs(InferenceInput.model_json_schema())

    async def run_inference(request: HttpRequest) -> Response:
        arrived = time.monotonic()
        status = 500
        try:
            body = await _read_body(request, config.max_body_bytes)
            inputs = parse_input(body)
            job_request = await asyncio.to_thread(engine_request, inputs, engine, seeds, config)
            try:
                job = batcher.submit(job_request)
            except QueueFull as exc:
                raise ApiError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
            left = config.timeout_s - (time.monotonic() - arrived)
            waiter = asyncio.wrap_future(job.future)
            try:
                clip = await asyncio.wait_for(asyncio.shield(waiter), max(left, 0.0))
            except asyncio.TimeoutError:  # TimeoutError from 3.11; its own class on 3.10
                batcher.cancel(job)
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits now
                raise ApiError(
                    504, f"no answer within the server's timeout of {config.timeout_s:g} s"
                ) from None
            payload = await asyncio.to_thread(encode_output, clip, inputs.format)
            status = 200
            return JSONResponse(payload)
        except ApiError as exc:
            status = exc.status
            return _error(exc.status, str(exc), exc.headers)
        except RiffusionError as exc:  # found by the engine while running
            status = 422
            return _error(422, str(exc))
        except Exception as exc:
            log.exception("inference failed")
            return _error(500, f"inference failed: {type(exc).__name__}: {exc}")
        finally:
            metrics.requests.labels(str(status)).inc()
            metrics.latency.observe(time.monotonic() - arrived)

    extra = {"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}}
    responses: dict[int | str, dict[str, Any]] = {
        200: {"model": InferenceOutput, "description": "the clip"},
        400: {"description": "body not JSON, or an unknown seed image / mask id"},
        413: {"description": "body over the size limit"},
        422: {"description": "a field of the wrong type or out of range (the message names it)"},
        503: {"description": "queue full; retry after the Retry-After header's seconds"},
        504: {"description": "not answered within the server's timeout"},
    }
    for path in ("/run_inference/", "/run_inference"):
        app.add_api_route(
            path,
            run_inference,
            methods=["POST"],
            summary="Generate a clip (Riffusion's API)",
            openapi_extra=extra,
            responses=responses,
            include_in_schema=path.endswith("/"),
        )

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model,
            "backend": engine.backend.name,
            "device": engine.backend.device,
            "queue_depth": batcher.depth,
            "max_queue": config.max_queue,
            "max_batch": config.max_batch,
            "max_steps": config.max_steps,
            "image_ids": seeds.ids(),
        }

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


@contextlib.contextmanager
def background(app: FastAPI, *, host: str = "127.0.0.1", start_timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``app`` on a free port of ``host`` in a background thread; yields its base URL.
    Leaving the block shuts the server down (requests in flight finish first)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="riffusion-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RiffusionError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(start_timeout_s)
        sock.close()


def serve(
    engine: Engine,
    config: ServerConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 3013,
    model: str = "",
    log_level: str = "info",
) -> None:
    """Serve ``engine`` until interrupted; on SIGINT/SIGTERM the requests in flight finish first."""
    import uvicorn

    app = create_app(engine, config, model=model)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
