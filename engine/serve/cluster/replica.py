"""An engine replica of the cluster (the Ray Serve deployment's class): the single-process
server's :class:`~..core.EngineServer` behind Ray, its metrics pushed to the board, its
streams relayed through Ray (:class:`RelayedSocket`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from ..config import ServerConfig
from .config import ClusterConfig, EngineSpec
from .metrics import METRICS_PERIOD_S, metrics_board

log = logging.getLogger(__name__)


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

        from ..core import EngineServer

        self.config = config
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
                board = board or metrics_board(app_name)
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

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self.server.close(timeout=5.0)  # a stalled batch never ends: do not wait for it
