"""``riffusion-engine serve``: the HTTP API and the stream, in this process or on Ray Serve."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ...kernels.errors import RiffusionError
from .common import add_engine_args, apply_profile, load_engine


def add_parser(sub: Any) -> None:
    from ..runtime.requests import SCHEDULERS

    p = sub.add_parser(
        "serve",
        help="serve Riffusion's HTTP API (POST /run_inference/) and an endless stream (/stream, page at /)",
        description="Riffusion's inference API on FastAPI + uvicorn: the original's request and "
        "response, seed images and masks under the original's ids, requests batched within a "
        "window, a bounded queue (503 + Retry-After when full), a per-request timeout (504), "
        "GET /health, GET /metrics (Prometheus) and /docs; an endless stream over a WebSocket at /stream "
        "(clips due soonest run first, sharing the batcher) and a page at / that plays it. Ctrl-C "
        "finishes the requests in flight.",
    )
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=3013, help="port (default: 3013)")
    p.add_argument("--max-batch", type=int, default=4, help="most requests per UNet batch (default: 4)")
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=20.0,
        help="how long a request waits for company (default: 20)",
    )
    p.add_argument("--max-queue", type=int, default=32, help="most requests waiting or running (default: 32)")
    p.add_argument(
        "--stream-batches",
        type=int,
        default=3,
        help="batches of /stream clips that may run in a row while a one-shot request waits; then a "
        "batch of one-shot requests runs (0: earliest deadline first alone; default: 3)",
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds before a request answers 504 (default: 300)"
    )
    p.add_argument("--max-steps", type=int, default=100, help="largest num_inference_steps (default: 100)")
    p.add_argument(
        "--scheduler",
        choices=tuple(SCHEDULERS),
        default=None,
        help="the scheduler every request and stream is sampled with: clients do not choose it, the "
        "LoRA fused in does (tcd for a TCD LoRA) (default: the profile's: pndm; realtime: lcm)",
    )
    p.add_argument("--max-body-kb", type=int, default=64, help="largest request body in KiB (default: 64)")
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="answer /health at once instead of first running every stage and batch size once "
        "(then the first requests pay for it)",
    )
    p.add_argument(
        "--seed-images", default=None, metavar="DIR", help="extra seed images and masks: DIR/ID.png"
    )
    p.add_argument(
        "--degrade-steps",
        type=int,
        default=None,
        metavar="MIN",
        help="when a request would miss --timeout (its wait plus its run, from the measured per-step "
        "time), run it with fewer steps, down to MIN, and refuse (503) only when even MIN would miss "
        "it; the answer's X-Inference-Steps header says the steps run (default: off)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let browser pages from ORIGIN (scheme://host[:port], or * for any) call the API; "
        "repeatable (default: none, same-origin only)",
    )
    p.add_argument(
        "--max-streams", type=int, default=4, help="most /stream WebSockets open at once; one more is refused"
    )
    p.add_argument(
        "--stream-buffer",
        type=int,
        default=3,
        help="clips a stream makes ahead of its listener's playback (default: 3); deeper rides out slow "
        "clips and drops more work when a prompt steers now",
    )
    p.add_argument(
        "--stream-opus-kbps",
        type=int,
        default=104,
        help="bitrate of an Opus /stream (a start message with format opus and no bitrate), in kbit/s "
        "(16..256; default: 104; 16-bit PCM is 706)",
    )
    p.add_argument("--stream-lifetime", type=float, default=3600.0, help="seconds a stream may last")
    p.add_argument(
        "--stream-start-timeout",
        type=float,
        default=10.0,
        help="seconds a /stream socket may wait before a valid start message; then it is closed (1008) "
        "(default: 10)",
    )
    p.add_argument(
        "--max-unstarted-streams",
        type=int,
        default=16,
        help="most /stream sockets waiting to start at once; they hold no --max-streams slot (default: 16)",
    )
    ray = p.add_argument_group(
        "cluster (Ray Serve)",
        "--ray serves the same API from engine replicas on a Ray cluster (the cluster extra): each "
        "replica loads one prebuilt export (made here first unless --artifacts names one), --max-queue "
        "requests wait at the ingress past the replicas' --max-ongoing-requests, then 503",
    )
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve")
    ray.add_argument(
        "--address",
        default=None,
        help="the Ray cluster to join (e.g. auto, or HEAD:6379); default: start a local one on "
        "127.0.0.1 (its HTTP proxy and dashboard on --host), stopped with the command",
    )
    count = ray.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default: 1)")
    count.add_argument(
        "--min-replicas", type=int, default=None, help="autoscale: fewest replicas (default: 1)"
    )
    ray.add_argument(
        "--max-replicas", type=int, default=None, help="autoscale: most replicas (default: --min-replicas)"
    )
    ray.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=None,
        help="autoscale: ongoing requests per replica to aim for (default: --max-batch)",
    )
    ray.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=8,
        help="requests a replica holds at once, running or batching (default: 8)",
    )
    ray.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPUs each replica reserves (default: 1 with --device cuda, else 0)",
    )
    ray.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1.0,
        help="CPUs each replica reserves; on the CPU its engine runs that many threads (default: 1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.ray and args.max_width is not None:
        raise RiffusionError(
            "serve --ray runs its exports' widths; --max-width serves from one process (without --ray)"
        )
    apply_profile(args)
    try:
        from ..serve.app import bind, serve
        from ..serve.config import ServerConfig
    except ImportError as exc:
        raise RiffusionError(
            f"the server needs the serve extra ({exc.name} is missing): pip install 'riffusion-engine[serve]'"
        ) from None

    config = ServerConfig(
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        max_steps=args.max_steps,
        max_body_bytes=args.max_body_kb * 1024,
        seed_images=Path(args.seed_images) if args.seed_images else None,
        cors_origins=tuple(args.cors_origin),
        degrade_steps=args.degrade_steps,
        max_streams=args.max_streams,
        stream_buffer=args.stream_buffer,
        stream_lifetime_s=args.stream_lifetime,
        stream_start_timeout_s=args.stream_start_timeout,
        max_unstarted_streams=args.max_unstarted_streams,
        stream_batches=args.stream_batches,
        stream_opus_kbps=args.stream_opus_kbps,
        warm_up=args.warm_up,
    )
    if args.ray:
        return _serve_cluster(args, config)
    given = [f for f in CLUSTER_FLAGS if getattr(args, f.lstrip("-").replace("-", "_")) not in (None, False)]
    if given:
        raise RiffusionError(f"{given[0]} is an option of --ray")
    sock = bind(args.host, args.port)  # before the model loads: a bad or busy port fails at once
    try:
        from ...export.models import DEFAULT_MODEL

        began = time.monotonic()
        engine = load_engine(args)
        model = args.artifacts or args.model or DEFAULT_MODEL
        host, port = sock.getsockname()[:2]

        def event(name: str, server: Any) -> None:
            if name == "starting" and config.warm_up:
                print("warming up: every stage once, before taking requests", flush=True)
            elif name == "ready":
                warm = "" if server.warm_up_s is None else f", {server.warm_up_s:.1f} s of it warming up"
                print(
                    f"serving {model} ({engine.backend.name}, {engine.backend.device}) on "
                    f"http://{host}:{port} (ready in {time.monotonic() - began:.1f} s{warm})",
                    flush=True,
                )

        level = "info" if args.verbose else "warning"
        serve(engine, config, sock=sock, model=model, log_level=level, on_event=event)
    finally:
        sock.close()


CLUSTER_FLAGS = (
    "--address",
    "--replicas",
    "--min-replicas",
    "--max-replicas",
    "--target-ongoing-requests",
    "--gpus-per-replica",
)


def _serve_cluster(args: argparse.Namespace, config: Any) -> None:
    from ..serve import cluster
    from ..serve.app import bind

    cluster.require_ray()  # the extra is installed: before any export
    options = cluster.ClusterConfig.of_options(
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        gpus_per_replica=args.gpus_per_replica,
        device=args.device,
        target_ongoing_requests=args.target_ongoing_requests,
        max_ongoing_requests=args.max_ongoing_requests,
        cpus_per_replica=args.cpus_per_replica,
    )
    if args.address is None:
        bind(args.host, args.port).close()  # a bad or busy port fails before Ray starts
    # The profile, LoRAs and VAE that apply_profile resolved: fused into the export made
    # here, and run by every replica as this process would run them.
    spec = cluster.prepare(
        args.model,
        args.artifacts,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        cache_dir=args.cache_dir,
        profile=args.profile,
        loras=args.lora or (),
        vae=args.vae,
        scheduler=args.scheduler,
        guidance=getattr(args, "guidance", None),
        deep_cache=args.deep_cache,
    )
    cluster.run(
        spec, config, options, address=args.address, host=args.host, port=args.port, quiet=not args.verbose
    )
