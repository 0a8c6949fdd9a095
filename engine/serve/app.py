"""Riffusion's HTTP API over an :class:`~riffusion_engine.engine.runtime.pipeline.Engine`.

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
  ``/openapi.json`` (pages at ``/docs``);
- ``/stream``, an endless stream over a WebSocket (:mod:`.streams`), sharing the
  batcher (earliest deadline first), and at ``/`` a page that plays it.

Bad input is answered 400 (not JSON, unknown image id), 413 (body over the limit) or
422 (a field of the wrong type or out of range), each with a message naming the
field; never 500, which is kept for the engine failing on valid input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi import Request as HttpRequest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...kernels.errors import RiffusionError
from ..runtime.pipeline import Engine
from ..runtime.seeds import SeedLibrary
from .api import ApiError, InferenceInput, InferenceOutput
from .config import ServerConfig, default_steps
from .core import Answer, EngineServer

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"  # the player page: static files, no build step


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


def request_schema(config: ServerConfig, seeds: SeedLibrary) -> dict[str, Any]:
    """The JSON schema of the request body with every constraint this server enforces
    (its steps cap, its image ids, non-blank prompts), so generated clients and fuzzers
    produce requests it accepts."""
    schema = _inline_refs(InferenceInput.model_json_schema())
    fields = schema["properties"]
    fields["num_inference_steps"].update(maximum=config.max_steps, default=default_steps(config))
    ids = seeds.ids()
    fields["seed_image_id"] = {**fields["seed_image_id"], "enum": ids}
    fields["seed_image_id"].pop("pattern", None)
    fields["mask_image_id"]["anyOf"] = [{"type": "string", "enum": ids}, {"type": "null"}]
    for end in ("start", "end"):
        prompt = fields[end]["properties"]["prompt"]
        prompt.update(minLength=1, pattern=r"\S")  # an empty or blank prompt is refused
    return schema


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


# An over-limit body is read and dropped for up to this long and this many bytes before
# the 413 (a lingering close bounded by time, as nginx bounds it: a client that sends its
# whole body before reading gets the answer instead of a reset connection); past either
# bound, the server answers and closes.
DRAIN_S = 10.0
DRAIN_BYTES = 64 * 1024 * 1024


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    """The body; 413 (and the connection closed) once it is known to exceed ``limit`` bytes,
    after reading the rest of it for up to ``DRAIN_S`` seconds and ``DRAIN_BYTES`` bytes."""
    length = request.headers.get("content-length")
    declared = int(length) if length is not None and length.isdigit() else None
    body = bytearray()
    received = 0
    over = declared is not None and declared > limit
    drain_until = time.monotonic() + DRAIN_S if over else None
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit and not over:
            over, drain_until = True, time.monotonic() + DRAIN_S
        if over:
            assert drain_until is not None
            if received > max(DRAIN_BYTES, limit) or time.monotonic() > drain_until:
                break
            continue
        body += chunk
    if over:
        size = f"{declared} bytes" if declared is not None else f"over {limit} bytes"
        raise ApiError(413, f"body: {size} is over the limit of {limit}", {"Connection": "close"})
    return bytes(body)


def create_app(
    engine: Engine,
    config: ServerConfig | None = None,
    *,
    model: str = "",
    on_event: Callable[[str, EngineServer], None] | None = None,
) -> FastAPI:
    """The FastAPI application serving ``engine`` (its options checked here).
    ``on_event("starting" | "ready", server)`` is called as it starts (warms up) and
    once it has, before the first request is taken."""
    server = EngineServer(engine, config or ServerConfig(), model=model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if on_event is not None:
            on_event("starting", server)
        await asyncio.to_thread(server.start)
        if on_event is not None:
            on_event("ready", server)
        yield
        await asyncio.to_thread(server.close)

    app = api_app(server.config, server.seeds, lifespan)
    app.state.batcher = server.batcher
    app.state.metrics = server.metrics
    metrics = server.metrics

    async def run_inference(request: HttpRequest) -> Response:
        try:
            body = await _read_body(request, server.config.max_body_bytes)
        except ApiError as exc:
            metrics.requests.labels(str(exc.status)).inc()
            return _error(exc.status, str(exc), exc.headers)
        return _respond(await server.infer(body))

    add_inference_routes(app, run_inference, server.config, server.seeds)

    @app.websocket("/stream")
    async def stream(socket: WebSocket) -> None:
        await server.hub.serve(socket)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return server.health()

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics (text exposition format)",
    )
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def api_app(config: ServerConfig, seeds: SeedLibrary, lifespan: Any) -> FastAPI:
    """A FastAPI application with the server's title, CORS policy and the player page;
    the front end adds the inference route, ``/stream``, ``/health`` and ``/metrics``."""
    app = FastAPI(
        title="riffusion-engine",
        summary="Riffusion's inference API: prompts in, spectrogram image and audio out.",
        lifespan=lifespan,
    )
    if config.cors_origins:
        # Browsers calling from these origins get CORS headers; preflights are answered.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
            max_age=600,
        )

    @app.get("/", include_in_schema=False)
    def player() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/player.js", include_in_schema=False)
    def player_script() -> FileResponse:
        return FileResponse(STATIC / "player.js", media_type="text/javascript")

    return app


def _respond(answer: Answer) -> JSONResponse:
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)


def add_inference_routes(app: FastAPI, endpoint: Any, config: ServerConfig, seeds: SeedLibrary) -> None:
    """``POST /run_inference/`` (and without the slash) to ``endpoint``, documented with
    the request schema this server enforces and every answer it gives."""
    body_schema = request_schema(config, seeds)
    extra = {"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}}
    responses: dict[int | str, dict[str, Any]] = {
        200: {
            "model": InferenceOutput,
            "description": "the clip; X-Inference-Steps says the steps run (fewer than asked, with "
            "X-Requested-Steps, when the server degraded the request to meet its timeout)",
        },
        400: {"description": "body not JSON, or an unknown seed image / mask id"},
        413: {"description": "body over the size limit"},
        422: {"description": "a field of the wrong type or out of range (the message names it)"},
        503: {
            "description": "queue full, or (with degrade_steps) even the fewest steps would miss the "
            "timeout; retry after the Retry-After header's seconds"
        },
        504: {"description": "not answered within the server's timeout"},
    }
    for path in ("/run_inference/", "/run_inference"):
        app.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            summary="Generate a clip (Riffusion's API)",
            openapi_extra=extra,
            responses=responses,
            include_in_schema=path.endswith("/"),
        )


@contextlib.contextmanager
def background(app: FastAPI, *, host: str = "127.0.0.1", start_timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``app`` on a free port of ``host`` in a background thread; yields its base URL.
    Leaving the block shuts the server down (requests in flight finish first)."""
    import uvicorn

    sock = bind(host, 0)
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


def bind(host: str, port: int) -> socket.socket:
    """A socket listening address for the server, bound now: a bad port or one in use is
    one clear error before anything is loaded."""
    if not 0 <= port <= 65535:
        raise RiffusionError(f"port must be 0..65535, got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RiffusionError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(
    engine: Engine,
    config: ServerConfig | None = None,
    *,
    sock: socket.socket,
    model: str = "",
    log_level: str = "info",
    on_event: Callable[[str, EngineServer], None] | None = None,
) -> None:
    """Serve ``engine`` on ``sock`` (from :func:`bind`) until interrupted; on SIGINT/SIGTERM
    the requests in flight finish first. ``on_event``: as :func:`create_app`'s."""
    import uvicorn

    app = create_app(engine, config, model=model, on_event=on_event)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None))
    server.run(sockets=[sock])
