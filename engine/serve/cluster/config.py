"""The cluster's shape (:class:`ClusterConfig`: replicas, their resources and limits)
and what every replica loads (:class:`EngineSpec`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ....export.artifacts import MANIFEST
from ....export.manifest import Manifest
from ....kernels.errors import RiffusionError
from ..config import ServerConfig

NAMESPACE = "riffusion-engine"  # where the metrics actor lives


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

    def __post_init__(self) -> None:
        finite = math.isfinite
        # (field, its serve --ray flag, the rule in words, whether it holds)
        checks = (
            ("replicas", "--replicas", "at least 1", self.replicas is None or self.replicas >= 1),
            ("min_replicas", "--min-replicas", ">= 0", self.min_replicas >= 0),
            (
                "max_replicas",
                "--max-replicas",
                f"at least --min-replicas ({self.min_replicas}) and 1",
                self.max_replicas >= max(self.min_replicas, 1),
            ),
            (
                "target_ongoing_requests",
                "--target-ongoing-requests",
                "> 0",
                (self.target_ongoing_requests or 1) > 0,
            ),
            ("max_ongoing_requests", "--max-ongoing-requests", "at least 1", self.max_ongoing_requests >= 1),
            (
                "gpus_per_replica",
                "--gpus-per-replica",
                ">= 0",
                finite(self.gpus_per_replica) and self.gpus_per_replica >= 0,
            ),
            (
                "cpus_per_replica",
                "--cpus-per-replica",
                ">= 0",
                finite(self.cpus_per_replica) and self.cpus_per_replica >= 0,
            ),
            ("health_check_period_s", "health_check_period_s", "> 0 seconds", self.health_check_period_s > 0),
        )
        for name, flag, rule, ok in checks:
            if not ok:
                raise RiffusionError(f"{flag} ({name}) must be {rule}, got {getattr(self, name)!r}")

    @classmethod
    def of_options(
        cls,
        *,
        replicas: int | None,
        min_replicas: int | None,
        max_replicas: int | None,
        gpus_per_replica: float | None,
        device: str,
        **limits: Any,
    ) -> ClusterConfig:
        """The cluster ``serve --ray``'s options ask for: a fixed count of replicas, or
        autoscaling when either bound is given (not both kinds); a GPU per replica on CUDA
        unless said otherwise. ``limits`` are the other fields, as given."""
        autoscale = min_replicas is not None or max_replicas is not None
        if autoscale and replicas is not None:
            raise RiffusionError("--replicas is a fixed count: give it, or --min-replicas/--max-replicas")
        fewest = 1 if min_replicas is None else min_replicas
        if gpus_per_replica is None:
            gpus_per_replica = 1.0 if device == "cuda" else 0.0
        return cls(
            replicas=None if autoscale else (1 if replicas is None else replicas),
            min_replicas=fewest,
            max_replicas=max(fewest, 1) if max_replicas is None else max_replicas,
            gpus_per_replica=(1.0 if device == "cuda" else 0.0)
            if gpus_per_replica is None
            else gpus_per_replica,
            **limits,
        )

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
    """What every replica loads: an export directory, its backend and device, and what it
    runs with (None: what the export's own run profile chooses on that node)."""

    artifacts: str
    backend: str
    device: str
    model: str  # what /health names
    profile: str | None = None  # "default" or "realtime" (its scheduler, steps, guidance)
    precision: str | None = None  # openvino's bf16 / int8, fp16 on cuda
    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    deep_cache: str | None = None  # INTERVAL:BRANCH, or "0": off

    def check(self, config: ServerConfig | None = None) -> None:
        """The directory holds an export (on this node: every node needs it at this path)
        whose batch size takes ``config``'s."""
        if not (Path(self.artifacts) / MANIFEST).is_file():
            raise RiffusionError(
                f"no export at {self.artifacts!r} on this node: every node running a replica must "
                "see the export directory at the same path (shared storage, or export there first)"
            )
        if config is not None:
            from ..core import check_max_batch

            # The files are checked where a replica loads them; here, what the export was made for.
            manifest = Manifest.load(self.artifacts, check_files=False)
            check_max_batch(config, manifest.profile.max_batch)

    def load(self, threads: int) -> Any:
        from ...runtime.loading import load

        self.check()
        options: dict[str, Any] = {}
        if threads and self.backend in ("onnxruntime", "openvino") and self.device == "cpu":
            options["threads"] = threads
        return load(
            artifacts=self.artifacts,
            backend=self.backend,
            device=self.device,
            profile=self.profile,
            precision=self.precision,
            scheduler=self.scheduler,
            steps=self.steps,
            guidance=self.guidance,
            deep_cache=self.deep_cache,
            **options,
        )
