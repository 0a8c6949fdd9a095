"""The cluster's application: the engine every replica loads, made here first
(:func:`prepare`); Ray joined or started (:func:`~.local.connect`); the ingress bound to the
engine deployment (:func:`build`, :func:`app_builder` for Ray Serve config files);
deployed (:func:`deploy`) and served until interrupted (:func:`run`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ....kernels.errors import RiffusionError
from ..config import ServerConfig
from .config import ClusterConfig, EngineSpec
from .ingress import Ingress
from .local import connect, shutdown
from .replica import EngineReplica

APP_NAME = "riffusion"
INGRESS_MAX_ONGOING = 1024  # the ingress only waits: it bounds nothing itself


def prepare(
    model: str | None,
    artifacts: str | None,
    *,
    backend: str,
    device: str,
    precision: str | None,
    cache_dir: str | None,
    profile: str | None = None,
    loras: Sequence[Any] = (),  # PATH_OR_HUB_ID[:SCALE] strings or Lora
    vae: str | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    deep_cache: str | None = None,
) -> EngineSpec:
    """The engine every replica loads, exported here first where ``artifacts`` is not given
    (before anything is deployed: no replica exports or builds engines at start-up), with
    the profile's LoRAs and VAE fused in; the replicas run what this process would run
    (the profile's scheduler, steps, guidance, precision and DeepCache, or the flags')."""
    from ....export.models import DEFAULT_MODEL
    from ...runtime.backends import resolve_backend
    from ...runtime.loading import check_replica_backend, export_for_replicas

    if artifacts is None:
        source = model or DEFAULT_MODEL
        directory, choices = export_for_replicas(
            source,
            backend=backend,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            progress=True,
            loras=loras,
            vae=vae,
            profile=profile,
            deep_cache=deep_cache,
            scheduler=scheduler,
            steps=steps,
            guidance=guidance,
        )
        spec = EngineSpec(
            str(Path(directory).resolve()),
            choices.backend,
            device,
            source,
            profile=choices.profile.name,
            precision=choices.precision,
            scheduler=choices.scheduler,
            steps=choices.steps,
            guidance=choices.guidance,
            deep_cache=str(choices.deep_cache) if choices.deep_cache is not None else "0",
        )
    else:
        backend = resolve_backend(backend, device)
        check_replica_backend(backend)
        # the export's run profile (its LoRAs and VAE fused in), with these flags over it
        spec = EngineSpec(
            str(Path(artifacts).resolve()),
            backend,
            device,
            artifacts,
            profile=profile,
            precision=precision,
            scheduler=scheduler,
            steps=steps,
            guidance=guidance,
            deep_cache=deep_cache,
        )
    spec.check()
    return spec


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
    :class:`~..config.ServerConfig` (``max_batch``, ``timeout_s``, ...) or
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
    quiet: bool = True,
) -> str:
    """Deploy the application (waits until every replica is up); its base URL. ``quiet``:
    Ray Serve logs warnings and errors only, without a line per request (its access log,
    every /health included)."""
    from ray import serve

    spec.check(config)  # before anything is deployed
    logs = {"log_level": "WARNING", "enable_access_log": False} if quiet else None
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly", logging_config=logs)
    serve.run(build(spec, config, cluster, replica), name=name, route_prefix="/", logging_config=logs)
    return f"http://{host}:{port}"


def run(
    spec: EngineSpec,
    config: ServerConfig,
    cluster: ClusterConfig,
    *,
    address: str | None,
    host: str,
    port: int,
    quiet: bool = True,
) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM): then the application is deleted, and a
    local Ray started here is stopped, every process of it ended before this returns."""
    from ray import serve

    started = connect(address, host=host)
    try:
        url = deploy(spec, config, cluster, host=host, port=port, quiet=quiet)
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
            shutdown()
