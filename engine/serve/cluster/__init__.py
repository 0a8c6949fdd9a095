"""Riffusion's API on a Ray Serve cluster: the routes and answers of the single-process
server (:mod:`..app`), with engine replicas spread over GPUs and machines.

Two deployments:

- ``Ingress`` (FastAPI, one replica, no engine): ``/run_inference/`` (and without the
  slash), ``/health``, ``/metrics``, ``/stream``, the OpenAPI schema and the player
  page. It reads the body (413 over the limit) and hands it to an engine replica; the
  replica parses and validates it with the single-process server's own code
  (:class:`~..core.EngineServer`), so every answer, 4xx included, is the same. When
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
(``RAY_USAGE_STATS_ENABLED=0``) unless the environment sets it. A local Ray started here
is one node on 127.0.0.1 (GCS, raylet, workers, agents); only its dashboard and Serve's
HTTP proxy listen on the serving host. :func:`shutdown` returns once every process of it
has ended.
"""

from __future__ import annotations

from .config import NAMESPACE, ClusterConfig, EngineSpec
from .deploy import APP_NAME, app_builder, build, deploy, prepare, run
from .ingress import Ingress
from .local import connect, require_ray, shutdown
from .metrics import METRICS_MAX_AGE_S, METRICS_PERIOD_S, MetricsBoard, merge_metrics
from .replica import EngineReplica, RelayedSocket

__all__ = [
    "APP_NAME",
    "METRICS_MAX_AGE_S",
    "METRICS_PERIOD_S",
    "NAMESPACE",
    "ClusterConfig",
    "EngineReplica",
    "EngineSpec",
    "Ingress",
    "MetricsBoard",
    "RelayedSocket",
    "app_builder",
    "build",
    "connect",
    "deploy",
    "merge_metrics",
    "prepare",
    "require_ray",
    "run",
    "shutdown",
]
