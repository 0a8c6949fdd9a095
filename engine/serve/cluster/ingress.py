"""The cluster's HTTP front (:class:`Ingress`): the single-process server's routes, each
request handed to an engine replica, its answer given back as the replica gave it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from fastapi import Request as HttpRequest
from fastapi import WebSocket
from fastapi.responses import JSONResponse, Response

from ..api import ApiError
from ..config import ServerConfig
from ..metrics import LATENCY_BUCKETS
from .config import ClusterConfig
from .metrics import merge_metrics, metrics_board

log = logging.getLogger(__name__)

REPLY_GRACE_S = 5.0  # how much past the timeout the ingress waits for a replica's own 504


class Ingress:
    """The HTTP front: the single-process server's routes, answered by the engine replicas."""

    def __init__(self, engines: Any, config: ServerConfig, cluster: ClusterConfig) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from ray import serve

        self.engines, self.config, self.cluster = engines, config, cluster
        self.app_name = serve.get_replica_context().app_name
        self.board = metrics_board(self.app_name)
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

        from ...runtime.seeds import SeedLibrary
        from ..app import _read_body, add_inference_routes, api_app

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

        from ..streams import TRY_AGAIN_LATER

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
