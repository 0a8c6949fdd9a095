"""Riffusion's API on a Ray Serve cluster: the routes and answers of the single-process
server (:mod:`.app`), with engine replicas spread over GPUs and machines.

Two deployments:

- ``Ingress`` (FastAPI, one replica, no engine): ``/run_inference/`` (and without the
  slash), ``/health``, ``/metrics``, ``/stream``, the OpenAPI schema and the player
  page. It reads the body (413 over the limit) and hands it to an engine replica; the
  replica parses and validates it with the single-process server's own code
  (:class:`~.core.EngineServer`), so every answer, 4xx included, is the same. When
  every replica holds ``max_ongoing_requests`` and ``max_queue`` more wait at the
  ingress, one more answers 503 with ``Retry-After``. A replica that dies mid-request
  gets the request retried once on another; if that fails too, 503. A replica that does
  not answer within the timeout gets 504. A stream stays on one replica for its life:
  its control messages travel in a Ray queue, its events and audio come back as the
  replica's streamed answer.
- ``EngineReplica``: one :class:`~riffusion_engine.engine.runtime.pipeline.Engine` loaded from a
  prebuilt export directory that every replica can read (nothing is exported or built
  at replica start), behind the project's batcher (earliest deadline first, batch
  keys, cancellation of timed-out requests; ``@serve.batch`` has none of these, and on
  requests sharing one key it measured the same throughput, 0.97x-1.03x:
  ``benchmarks/bench_serve.py --ray --serve-batch``). Its health
  check fails, and Ray replaces it, when its worker thread died or its running batch
  has made no progress for longer than the request timeout.

Metrics: each replica pushes its Prometheus registry to a small named actor every
``METRICS_PERIOD_S``; the ingress's ``/metrics`` shows every live replica's series with a
``replica`` label, plus its own ``riffusion_ingress_*`` series (answers by status and by
the replica that gave them).

Nothing leaves the machine unasked: :func:`connect` turns Ray's usage-stats reporting off
(``RAY_USAGE_STATS_ENABLED=0``) unless the environment sets it, and a local Ray started
here binds its dashboard to the serving host (127.0.0.1 by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request as HttpRequest
from fastapi import WebSocket
from fastapi.responses import JSONResponse, Response

from ...kernels.errors import RiffusionError
from .api import ApiError, ServerConfig

log = logging.getLogger(__name__)

APP_NAME = "riffusion"
NAMESPACE = "riffusion-engine"  # where the metrics actor lives
METRICS_PERIOD_S = 2.0  # how often a replica pushes its metrics
METRICS_MAX_AGE_S = 30.0  # a replica silent this long (gone) drops out of /metrics
INGRESS_MAX_ONGOING = 1024  # the ingress only waits: it bounds nothing itself
REPLY_GRACE_S = 5.0  # how much past the timeout the ingress waits for a replica's own 504


@dataclass(frozen=True)
class ClusterConfig:
    """Replicas, their resources and their limits."""

    replicas: int | None = 1  # a fixed count; None: autoscale between min and max
    min_replicas: int = 1
    max_replicas: int = 1
    # Autoscaling's target of ongoing requests per replica. None: max_batch (a replica
    # running full batches with the next batch waiting is busy, not behind).
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int = 8  # requests one replica holds (running or batching) at once
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    health_check_period_s: float = 10.0
    test_hooks: bool = False  # EngineReplica.stall (tests only)

    def __post_init__(self) -> None:
        checks = (
            ("replicas", self.replicas is None or self.replicas >= 1),
            ("min_replicas", self.min_replicas >= 0),
            ("max_replicas", self.max_replicas >= max(self.min_replicas, 1)),
            ("target_ongoing_requests", (self.target_ongoing_requests or 1) > 0),
            ("max_ongoing_requests", self.max_ongoing_requests >= 1),
            ("gpus_per_replica", math.isfinite(self.gpus_per_replica) and self.gpus_per_replica >= 0),
            ("cpus_per_replica", math.isfinite(self.cpus_per_replica) and self.cpus_per_replica >= 0),
            ("health_check_period_s", self.health_check_period_s > 0),
        )
        for name, ok in checks:
            if not ok:
                raise RiffusionError(f"cluster option {name} out of range: {getattr(self, name)!r}")

    def engine_options(self, server: ServerConfig) -> dict[str, Any]:
        """The engine deployment's options."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests,
            # Requests waiting at the ingress for a replica's slot; one more: BackPressureError.
            "max_queued_requests": server.max_queue,
            "health_check_period_s": self.health_check_period_s,
            # A replica whose event loop cannot answer the check in time is as stuck as one whose
            # engine stopped: at least one request timeout.
            "health_check_timeout_s": max(server.timeout_s, 2 * self.health_check_period_s),
            "graceful_shutdown_timeout_s": server.timeout_s,
            # A replica that fails to start (a node without the export, a broken device) fails
            # the same way again: give up after a few tries instead of Ray's 20.
            "max_constructor_retry_count": 3,
        }
        if self.replicas is not None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or server.max_batch,
            }
        return options


@dataclass(frozen=True)
class EngineSpec:
    """What every replica loads: an export directory, its backend and device."""

    artifacts: str
    backend: str
    device: str
    model: str  # what /health names

    def check(self, config: ServerConfig | None = None) -> None:
        """The directory holds an export (on this node: every node needs it at this path)
        whose batch size takes ``config``'s."""
        import json

        manifest = Path(self.artifacts) / "manifest.json"
        if not manifest.is_file():
            raise RiffusionError(
                f"no export at {self.artifacts!r} on this node: every node running a replica must "
                "see the export directory at the same path (shared storage, or export there first)"
            )
        if config is not None:
            from .core import check_max_batch

            check_max_batch(config, json.loads(manifest.read_text()).get("profile", {}).get("max_batch"))

    def load(self, threads: int) -> Any:
        from ..runtime.loading import load

        self.check()
        options: dict[str, Any] = {}
        if threads and self.backend in ("onnxruntime", "openvino") and self.device == "cpu":
            options["threads"] = threads
        return load(artifacts=self.artifacts, backend=self.backend, device=self.device, **options)


def prepare(
    model: str | None,
    artifacts: str | None,
    *,
    backend: str,
    device: str,
    precision: str,
    cache_dir: str | None,
) -> EngineSpec:
    """The engine every replica loads, exported here first where ``artifacts`` is not given
    (before anything is deployed: no replica exports or builds engines at start-up)."""
    from ...export.models import DEFAULT_MODEL
    from ..runtime.backends import resolve_backend
    from ..runtime.loading import export_on_first_use

    backend = resolve_backend(backend, device)
    if backend == "torch":
        raise RiffusionError(
            "the cluster's replicas load an export directory; the torch backend runs from a model "
            "source: use --backend onnxruntime (or tensorrt, openvino)"
        )
    if artifacts is None:
        source = model or DEFAULT_MODEL
        directory = export_on_first_use(
            source,
            backend=backend,
            device=device,
            precision="fp32" if backend == "openvino" else precision,
            cache_dir=cache_dir,
            seed=0,
            progress=True,
        )
    else:
        source, directory = artifacts, Path(artifacts)
    spec = EngineSpec(str(Path(directory).resolve()), backend, device, source)
    spec.check()
    return spec


# -- Ray ------------------------------------------------------------------------------


def _ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise RiffusionError(
            f"--ray needs the cluster extra ({exc.name} is missing): pip install 'riffusion-engine[cluster]'"
        ) from None
    return ray


def connect(address: str | None, *, host: str = "127.0.0.1", dashboard: bool = True, **init: Any) -> bool:
    """Join the Ray cluster at ``address``, or start a local one (dashboard on ``host``);
    True when a local one was started here (the caller shuts it down)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray's usage reporting: off unless asked
    ray = _ray()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, namespace=NAMESPACE, **init)
        return False
    ray.init(
        namespace=NAMESPACE,
        include_dashboard=dashboard,
        dashboard_host=host,
        **init,
    )
    return True


class MetricsBoard:
    """The replicas' latest Prometheus text, by replica (a Ray actor, no CPU reserved)."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, str]] = {}

    def report(self, replica: str, text: str) -> None:
        self.reports[replica] = (time.time(), text)

    def read(self) -> dict[str, str]:
        now = time.time()
        self.reports = {r: v for r, v in self.reports.items() if now - v[0] < METRICS_MAX_AGE_S}
        return {r: text for r, (_, text) in self.reports.items()}


def _board(app_name: str) -> Any:
    """The app's metrics actor, created by the first to ask (it lives as long as its creator)."""
    import ray

    return (
        ray.remote(num_cpus=0)(MetricsBoard)
        .options(name=f"metrics-{app_name}", namespace=NAMESPACE, get_if_exists=True)
        .remote()
    )


def merge_metrics(reports: dict[str, str]) -> str:
    """The replicas' Prometheus texts as one, each series labelled with its replica (the
    text format's names: a counter's family is written under its ``_total`` name; the
    optional ``_created`` series are left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, text in sorted(reports.items()):
        for family in text_string_to_metric_families(text):
            name = f"{family.name}_total" if family.type == "counter" else family.name
            _, _, lines = families.setdefault(name, (family.documentation, family.type, []))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = {**sample.labels, "replica": replica}
                body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{sample.name}{{{body}}} {_number(sample.value)}")
    out = []
    for name, (documentation, kind, lines) in families.items():
        documentation = documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out += [f"# HELP {name} {documentation}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n" if out else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _StalledEngine:
    """An engine whose batches never finish (``EngineReplica.stall``, tests only)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def images(self, *args: Any, **kwargs: Any) -> Any:
        threading.Event().wait()  # forever: a stuck device call


class RelayedSocket:
    """The part of a WebSocket a stream session uses, relayed through Ray: messages in
    from a Ray queue (the ingress puts the client's), events and audio out to an asyncio
    queue (the replica streams them back)."""

    def __init__(self, inbox: Any) -> None:
        self.inbox = inbox
        self.outbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.closed = False

    async def accept(self) -> None:
        return None

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get_async()

    async def _send(self, frame: tuple[Any, ...]) -> None:
        from fastapi import WebSocketDisconnect

        if self.closed:
            raise WebSocketDisconnect(1000)
        await self.outbox.put(frame)

    async def send_text(self, text: str) -> None:
        await self._send(("text", text))

    async def send_bytes(self, data: bytes) -> None:
        await self._send(("bytes", data))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await self._send(("close", code, reason or ""))
        self.closed = True


class EngineReplica:
    """One engine serving requests (the Ray Serve deployment's class)."""

    def __init__(self, spec: EngineSpec, config: ServerConfig, cluster: ClusterConfig) -> None:
        from ray import serve

        from .core import EngineServer

        self.config, self.test_hooks = config, cluster.test_hooks
        context = serve.get_replica_context()
        self.replica, app_name = context.replica_tag, context.app_name
        threads = max(1, int(cluster.cpus_per_replica)) if cluster.cpus_per_replica else 0
        self.server = EngineServer(spec.load(threads), config, model=spec.model)
        self.server.start()
        self._stop = threading.Event()
        self._pusher = threading.Thread(
            target=self._push_metrics, args=(app_name,), name="riffusion-metrics", daemon=True
        )
        self._pusher.start()

    def _push_metrics(self, app_name: str) -> None:
        import ray
        from prometheus_client import generate_latest

        board = None
        while not self._stop.wait(METRICS_PERIOD_S):
            try:
                board = board or _board(app_name)
                text = generate_latest(self.server.metrics.registry).decode()
                ray.get(board.report.remote(self.replica, text), timeout=METRICS_PERIOD_S)
            except Exception as exc:  # the board's owner (the ingress) is restarting: look it up again
                log.debug("metrics push failed: %s", exc)
                board = None

    async def infer(self, body: bytes, seconds_left: float) -> Any:
        answer = await self.server.infer(body, seconds_left)
        answer.headers["X-Replica"] = self.replica
        return answer

    async def stream(self, inbox: Any) -> AsyncIterator[tuple[Any, ...]]:
        """A stream session on this replica: the client's messages from ``inbox``; yields
        ``("text", str)``, ``("bytes", bytes)`` and finally ``("close", code, reason)``."""
        socket = RelayedSocket(inbox)
        session = asyncio.ensure_future(self.server.hub.serve(socket))  # type: ignore[arg-type]
        try:
            while True:
                getter = asyncio.ensure_future(socket.outbox.get())
                await asyncio.wait({getter, session}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    while not socket.outbox.empty():
                        yield socket.outbox.get_nowait()
                    return
                frame = getter.result()
                yield frame
                if frame[0] == "close":
                    return
        finally:
            socket.closed = True
            if not session.done():
                session.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session

    async def health(self) -> dict[str, Any]:
        return {**self.server.health(), "replica": self.replica}

    async def check_health(self) -> None:
        """Ray's health check: raising marks this replica unhealthy, and Ray replaces it."""
        problem = self.server.batcher.stalled(self.config.timeout_s)
        if problem:
            raise RuntimeError(f"replica {self.replica}: {problem}")

    async def stall(self) -> str:
        """Tests only: from now on, this replica's batches never finish; one starts now."""
        if not self.test_hooks:
            raise RiffusionError("test hooks are off")
        from ..runtime.pipeline import PromptInput, Request

        self.server.batcher.engine = _StalledEngine(self.server.engine)
        self.server.batcher.submit(Request(PromptInput("stalled"), steps=1))  # a batch that never ends
        return self.replica

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self.server.close(timeout=5.0)  # a stalled batch never ends: do not wait for it


class Ingress:
    """The HTTP front: the single-process server's routes, answered by the engine replicas."""

    def __init__(self, engines: Any, config: ServerConfig, cluster: ClusterConfig) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from ray import serve

        from .batcher import LATENCY_BUCKETS

        self.engines, self.config, self.cluster = engines, config, cluster
        self.app_name = serve.get_replica_context().app_name
        self.board = _board(self.app_name)
        self.registry = CollectorRegistry()
        self.answers = Counter(
            "riffusion_ingress_requests",
            "Inference requests answered at the ingress, by HTTP status and by the replica that answered",
            ["status", "replica"],
            registry=self.registry,
        )
        self.retries = Counter(
            "riffusion_ingress_retries",
            "Requests retried on another replica after theirs died",
            registry=self.registry,
        )
        self.latency = Histogram(
            "riffusion_ingress_request_seconds",
            "Inference request latency at the ingress, arrival to answer",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.mean_s = 1.0  # running mean latency of answered requests, for Retry-After

    def __serve_build_asgi_app__(self) -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from ..runtime.seeds import SeedLibrary
        from .app import _read_body, add_inference_routes, api_app

        config = self.config
        seeds = SeedLibrary(config.seed_images)  # the ids only: the replicas make the images
        app = api_app(config, seeds, None)

        async def run_inference(request: HttpRequest) -> Response:
            arrived = time.monotonic()
            try:
                body = await _read_body(request, config.max_body_bytes)
                status, payload, headers = await self.infer(body, arrived)
            except ApiError as exc:
                status, payload, headers = exc.status, {"detail": str(exc)}, exc.headers
            self.answers.labels(str(status), headers.get("X-Replica", "")).inc()
            seconds = time.monotonic() - arrived
            self.latency.observe(seconds)
            if status == 200:
                self.mean_s = 0.8 * self.mean_s + 0.2 * seconds
            return JSONResponse(payload, status_code=status, headers=headers)

        add_inference_routes(app, run_inference, config, seeds)

        @app.websocket("/stream")
        async def stream(socket: WebSocket) -> None:
            await self.stream(socket)

        @app.get("/health", responses={503: {"description": "no engine replica answers"}})
        async def health() -> Response:
            report = await self.health()
            return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

        @app.get(
            "/metrics",
            response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
            summary="Prometheus metrics (text exposition format): the ingress's and every replica's",
        )
        async def prometheus() -> Response:
            try:
                reports = await self.board.read.remote()
            except Exception as exc:
                log.warning("replica metrics unavailable: %s", exc)
                reports = {}
            text = generate_latest(self.registry).decode() + merge_metrics(reports)
            return Response(text, media_type=CONTENT_TYPE_LATEST)

        return app

    def _busy(self, reason: str) -> ApiError:
        retry = max(1, math.ceil(self.mean_s))
        return ApiError(503, f"{reason}; retry in {retry} s", {"Retry-After": str(retry)})

    async def infer(self, body: bytes, arrived: float) -> tuple[int, dict[str, Any], dict[str, str]]:
        """A replica's answer to ``body``: retried once on another replica where the first
        died; 503 when none is free or both died; 504 when none answers in time."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        for attempt in (1, 2):
            left = self.config.timeout_s - (time.monotonic() - arrived)
            response = self.engines.infer.remote(body, left)
            try:
                answer = await asyncio.wait_for(_result(response), max(left, 0.0) + REPLY_GRACE_S)
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(
                    504, f"no answer within the server's timeout of {self.config.timeout_s:g} s"
                ) from None
            except BackPressureError:
                raise self._busy("every replica is busy and the queue is full") from None
            except DeploymentUnavailableError:
                raise self._busy("no engine replica is running") from None
            except RayActorError as exc:
                if attempt == 1:
                    log.warning("a replica died during a request (%s); retrying on another", exc)
                    self.retries.inc()
                    continue
                raise self._busy("the replicas serving this request died") from None
            return answer.status, answer.body, answer.headers
        raise AssertionError("unreachable")

    async def health(self) -> dict[str, Any]:
        """One replica's health (the one Ray routes to), with the cluster's shape; status
        ``unavailable`` (503) when no replica answers within 10 s."""
        from ray import serve

        status = (await asyncio.to_thread(serve.status)).applications.get(self.app_name)
        deployment = status.deployments.get("EngineReplica") if status is not None else None
        replicas = {str(k): v for k, v in deployment.replica_states.items()} if deployment else {}
        try:
            engine = await asyncio.wait_for(_result(self.engines.health.remote()), 10.0)
        except Exception as exc:
            return {"status": "unavailable", "detail": f"{type(exc).__name__}: {exc}", "replicas": replicas}
        limits = {
            "max_queue": self.config.max_queue,  # at the ingress; a replica's own is its max_ongoing_requests
            "max_ongoing_requests": self.cluster.max_ongoing_requests,
        }
        return {**engine, **limits, "replicas": replicas}

    async def stream(self, socket: Any) -> None:
        """Relay ``socket`` to a stream session on one replica, for the stream's life."""
        from fastapi import WebSocketDisconnect
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
        from ray.util.queue import Queue

        from .streams import TRY_AGAIN_LATER

        await socket.accept()
        inbox = Queue(actor_options={"num_cpus": 0})
        frames = self.engines.options(stream=True).stream.remote(inbox)

        async def relay_in() -> None:
            while True:
                message = await socket.receive()
                await inbox.put_async(message)
                if message["type"] == "websocket.disconnect":
                    return

        reader = asyncio.ensure_future(relay_in())
        try:
            async for frame in frames:
                if frame[0] == "text":
                    await socket.send_text(frame[1])
                elif frame[0] == "bytes":
                    await socket.send_bytes(frame[1])
                else:
                    await socket.close(frame[1], frame[2])
                    return
            await socket.close(1011, "the stream's replica ended it")
        except WebSocketDisconnect:
            pass
        except (BackPressureError, DeploymentUnavailableError) as exc:
            with contextlib.suppress(Exception):
                await socket.close(TRY_AGAIN_LATER, f"no replica can take a stream now: {exc}"[:120])
        except Exception as exc:
            log.warning("stream relay failed: %s", exc)
            with contextlib.suppress(Exception):
                await socket.close(1011, "the stream's replica failed")
        finally:
            reader.cancel()
            with contextlib.suppress(Exception):
                await inbox.put_async({"type": "websocket.disconnect", "code": 1001})
            frames.cancel()
            await asyncio.sleep(1.0)  # the replica reads the disconnect before its queue goes
            inbox.shutdown()


async def _result(response: Any) -> Any:
    return await response


def build(
    spec: EngineSpec, config: ServerConfig, cluster: ClusterConfig, replica: type = EngineReplica
) -> Any:
    """The Ray Serve application: the ingress bound to the engine deployment (``replica``:
    its class, an :class:`EngineReplica`)."""
    from ray import serve

    engine = serve.deployment(replica, name="EngineReplica", **cluster.engine_options(config))
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name="Ingress",
        num_replicas=1,
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
    )
    # The ingress waits on replicas; the engine replicas are bounded by their own config.
    replica_config = ServerConfig(**{**config.__dict__, "max_queue": cluster.max_ongoing_requests})
    return ingress.bind(engine.bind(spec, replica_config, cluster), config, cluster)


def app_builder(args: dict[str, Any]) -> Any:
    """The application from a Ray Serve config file: ``import_path:
    riffusion_engine.engine.serve.cluster:app_builder`` (``serve run``, ``serve deploy``,
    KubeRay's ``serveConfigV2``), its ``args``: ``artifacts`` (required: the export
    directory, at the same path on every node), ``backend`` (default ``onnxruntime``),
    ``device`` (``cpu``), ``model`` (the name ``/health`` gives), and any field of
    :class:`~.api.ServerConfig` (``max_batch``, ``timeout_s``, ...) or
    :class:`ClusterConfig` (``replicas``, ``min_replicas``, ``gpus_per_replica``, ...).
    Values may be strings (``serve run ... key=value``): they are converted to the
    field's type. Nothing is exported here: the replicas load the export."""
    import dataclasses
    import typing

    args = dict(args)
    if "artifacts" not in args:
        raise RiffusionError("app_builder needs args.artifacts: the export directory every node sees")
    spec = EngineSpec(
        str(args.pop("artifacts")),
        str(args.pop("backend", "onnxruntime")),
        str(args.pop("device", "cpu")),
        str(args.pop("model", "")),
    )
    if spec.backend == "torch":
        raise RiffusionError(
            "the cluster's replicas load an export: backend onnxruntime, tensorrt or openvino"
        )
    chosen: dict[type, dict[str, Any]] = {ServerConfig: {}, ClusterConfig: {}}
    for key, value in args.items():
        owner = next((c for c in chosen if key in {f.name for f in dataclasses.fields(c)}), None)
        if owner is None:
            raise RiffusionError(f"app_builder: unknown argument {key!r}")
        chosen[owner][key] = _typed(typing.get_type_hints(owner)[key], value, key)
    if (
        "replicas" not in chosen[ClusterConfig]
        and {"min_replicas", "max_replicas"} & chosen[ClusterConfig].keys()
    ):
        chosen[ClusterConfig]["replicas"] = None  # autoscaled
    return build(spec, ServerConfig(**chosen[ServerConfig]), ClusterConfig(**chosen[ClusterConfig]))


def _typed(kind: Any, value: Any, key: str) -> Any:
    """``value`` (from YAML, or a ``key=value`` string) as the field type ``kind``."""
    import types
    import typing

    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    members = typing.get_args(kind) if union else (kind,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in members:
            return None
        raise RiffusionError(f"app_builder: {key} cannot be null")
    target = next(t for t in members if t is not type(None))
    try:
        if target is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        if target in (int, float):
            return target(value)
        if typing.get_origin(target) is tuple:
            return tuple(value) if isinstance(value, (list, tuple)) else tuple(str(value).split(","))
        if target is Path:
            return Path(value)
    except (TypeError, ValueError):
        raise RiffusionError(f"app_builder: {key} must be {kind}, got {value!r}") from None
    return value


def deploy(
    spec: EngineSpec,
    config: ServerConfig,
    cluster: ClusterConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = APP_NAME,
    replica: type = EngineReplica,
) -> str:
    """Deploy the application (waits until every replica is up); its base URL."""
    from ray import serve

    spec.check(config)  # before anything is deployed
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    serve.run(build(spec, config, cluster, replica), name=name, route_prefix="/")
    return f"http://{host}:{port}"


def run(
    spec: EngineSpec,
    config: ServerConfig,
    cluster: ClusterConfig,
    *,
    address: str | None,
    host: str,
    port: int,
) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM): then the application is deleted, and a
    local Ray started here is shut down."""
    from ray import serve

    started = connect(address, host=host)
    try:
        url = deploy(spec, config, cluster, host=host, port=port)
        shape = (
            f"{cluster.replicas} replica(s)"
            if cluster.replicas is not None
            else f"{cluster.min_replicas}-{cluster.max_replicas} replicas, autoscaled"
        )
        print(f"serving {spec.model} ({spec.backend}, {spec.device}, {shape}) on {url}", flush=True)
        while True:
            time.sleep(3600)
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if started:
            import ray

            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
