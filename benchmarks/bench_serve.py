"""Serving throughput and latency: N concurrent clients against a real server, with
batching on and off, rounds alternated in one process.

    python benchmarks/bench_serve.py --model random:tiny --clients 8 --requests 6 --rounds 2 \\
        --steps 8 --json benchmarks/results/serve-random-tiny-cpu.json

Each client sends its requests one after another (a closed loop), each with its own
seeds, so at most ``--clients`` requests are in the server at once. "off" serves with
``--max-batch 1``; "on" with ``--max-batch`` and ``--batch-window-ms``. Prints clips
per second, latency percentiles and the mean batch size per mode.

With ``--ray`` the rows are the single-process server (its engine on ``--cpus``
threads) against the Ray Serve application (``serve --ray``) on a local Ray, for each
count in ``--replicas``: N replicas, each reserving and pinned to ``--cpus / N`` cores
with that many engine threads, batching on. ``--serve-batch`` adds rows whose replicas
batch with Ray's ``@serve.batch`` instead of the project's batcher:

    python benchmarks/bench_serve.py --ray --replicas 1,2 --serve-batch --model random:tiny \\
        --clients 8 --requests 4 --rounds 1 --json benchmarks/results/serve-ray-random-tiny-cpu.json

On a machine with N GPUs, one replica per GPU (an export for CUDA is made first):

    python benchmarks/bench_serve.py --ray --replicas 1,N --device cuda --model DIR_OR_HUB_ID \\
        --clients 32 --steps 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import numpy as np
from report import Column, Table, environment, write_json


def body(client: int, i: int, steps: int) -> dict[str, Any]:
    """A request as Riffusion's web app sends it, with seeds of its own."""
    return {
        "alpha": (i % 4) / 4,
        "num_inference_steps": steps,
        "seed_image_id": "og_beat",
        "start": {
            "prompt": "church bells on sunday",
            "seed": 1000 * client + i,
            "denoising": 0.75,
            "guidance": 7.0,
        },
        "end": {
            "prompt": "jazz with piano",
            "seed": 1000 * client + i + 1,
            "denoising": 0.75,
            "guidance": 7.0,
        },
    }


def run_clients(url: str, *, clients: int, requests: int, steps: int, desc: str = "") -> dict[str, Any]:
    """``clients`` closed-loop clients sending ``requests`` each; latencies and statuses
    (a progress bar counts the answers)."""
    import httpx
    from tqdm.auto import tqdm

    bar = tqdm(total=clients * requests, desc=desc, unit="clip", leave=False)

    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as session:
            barrier.wait()
            for i in range(requests):
                begin = time.perf_counter()
                answer = session.post(url + "/run_inference/", content=json.dumps(body(c, i, steps)))
                with lock:
                    latencies.append(time.perf_counter() - begin)
                    statuses.append(answer.status_code)
                    bar.update()

    begin = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    wall = time.perf_counter() - begin
    ok = statuses.count(200)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]).tolist()
    return {
        "clips": ok,
        "errors": len(statuses) - ok,
        "wall_s": wall,
        "clips_per_s": ok / wall,
        "latency_s": {"p50": p50, "p90": p90, "p99": p99, "mean": statistics.fmean(latencies)},
    }


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each row's medians over its rounds."""
    summary = {}
    for name, results in rounds.items():
        summary[name] = {
            "clips_per_s": statistics.median(r["clips_per_s"] for r in results),
            "p50_s": statistics.median(r["latency_s"]["p50"] for r in results),
            "p90_s": statistics.median(r["latency_s"]["p90"] for r in results),
            "p99_s": statistics.median(r["latency_s"]["p99"] for r in results),
            "mean_batch": statistics.fmean(r.get("mean_batch", float("nan")) for r in results),
            "errors": sum(r["errors"] for r in results),
        }
    return summary


def print_summary(summary: dict[str, dict[str, Any]], label: str) -> None:
    columns = [Column(label, 34, left=True), Column("clips/s", 9, ".3f")]
    columns += [Column(f"{p} s", 8, ".2f") for p in ("p50", "p90", "p99")]
    columns += [Column("mean batch", 12, ".2f"), Column("errors", 8, "d")]
    keys = ("clips_per_s", "p50_s", "p90_s", "p99_s", "mean_batch", "errors")
    print(Table(columns).format([(name, *(s[k] for k in keys)) for name, s in summary.items()]))


def measured(app: Any, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the mean batch size from the single-process ``app``'s metrics."""
    registry = app.state.metrics.registry
    batches = registry.get_sample_value("riffusion_batch_size_count") or 1
    result["mean_batch"] = registry.get_sample_value("riffusion_batch_size_sum") / batches
    return result


def replicas_mean_batch(url: str) -> float:
    """The mean batch size over every replica, from the ingress's /metrics (after the
    replicas' next push)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    from riffusion_engine.engine.serve.cluster import METRICS_PERIOD_S

    time.sleep(METRICS_PERIOD_S + 1)
    sums = {"riffusion_batch_size_sum": 0.0, "riffusion_batch_size_count": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
    return sums["riffusion_batch_size_sum"] / max(sums["riffusion_batch_size_count"], 1)


def pinned_replica(cores: int) -> type:
    """The engine replica, pinned before it loads to its share of the first ``cores``
    cores (by its rank on the node), so that replicas do not compete for cores."""
    import os

    from ray import serve
    from riffusion_engine.engine.serve.cluster import EngineReplica

    class PinnedReplica(EngineReplica):
        def __init__(self, spec: Any, config: Any, cluster: Any) -> None:
            share = max(1, int(cluster.cpus_per_replica))
            first = serve.get_replica_context().rank.local_rank * share
            os.sched_setaffinity(0, {(first + i) % cores for i in range(share)})
            super().__init__(spec, config, cluster)

    return PinnedReplica


def serve_batch_replica(cores: int, max_batch: int, window_ms: float) -> type:
    """The pinned replica batching with Ray's ``@serve.batch`` instead of the project's
    batcher: the same validation and encoding, no deadlines, cancellation or batch keys
    (the benchmark's requests all share one key)."""
    import asyncio

    from ray import serve
    from riffusion_engine.engine.serve.api import encode_output, engine_request, parse_input
    from riffusion_engine.engine.serve.core import Answer

    class ServeBatchReplica(pinned_replica(cores)):  # type: ignore[misc]
        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=window_ms / 1000)
        async def run(self, requests: list[Any]) -> list[Any]:
            self.server.metrics.batch_size.observe(len(requests))
            return await asyncio.to_thread(self.server.engine.run, requests)

        async def infer(self, body: bytes, seconds_left: float) -> Any:
            server = self.server
            inputs = parse_input(body)
            request = await asyncio.to_thread(
                engine_request, inputs, server.engine, server.seeds, server.config
            )
            clip = await self.run(request)
            payload = await asyncio.to_thread(encode_output, clip, inputs.format)
            return Answer(200, payload, {"X-Replica": self.replica})

    return ServeBatchReplica


def run_batching(args: Any) -> dict[str, Any]:
    """One process, batching off against on."""
    from riffusion_engine import load
    from riffusion_engine.engine.serve.app import background, create_app
    from riffusion_engine.engine.serve.config import ServerConfig

    engine = load(args.model, backend=args.backend, progress=True)
    modes = {
        "off": ServerConfig(max_batch=1, batch_window_ms=0, max_queue=args.clients),
        "on": ServerConfig(
            max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, max_queue=args.clients
        ),
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, config in modes.items():
            app = create_app(engine, config, model=args.model)
            with background(app) as url:
                result = run_clients(
                    url,
                    clients=args.clients,
                    requests=args.requests if r else 1,
                    steps=args.steps,
                    desc=f"round {r} batching {name}" if r else f"warm-up, batching {name}",
                )
            measured(app, result)
            if r:
                rounds[name].append(result)
                print(
                    f"round {r} batching {name:>3}: {result['clips_per_s']:.3f} clips/s, "
                    f"p50 {result['latency_s']['p50']:.2f} s, mean batch {result['mean_batch']:.2f}"
                )
    summary = summarize(rounds)
    print(f"\n{args.model}, {engine.backend.name} backend, {args.clients} clients, {args.steps} steps")
    print_summary(summary, "batching")
    print(f"throughput with batching: {summary['on']['clips_per_s'] / summary['off']['clips_per_s']:.2f}x")
    return {"config": vars(args), "backend": engine.backend.name, "summary": summary, "rounds": rounds}


def run_ray(args: Any) -> dict[str, Any]:
    """One process against the Ray Serve application, rounds alternated."""
    from riffusion_engine import load
    from riffusion_engine.engine.serve import cluster
    from riffusion_engine.engine.serve.app import background, create_app
    from riffusion_engine.engine.serve.config import ServerConfig

    gpu = args.device == "cuda"
    spec = cluster.prepare(
        args.model, None, backend=args.backend, device=args.device, precision="fp32", cache_dir=None
    )
    config = ServerConfig(
        max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, max_queue=args.clients, timeout_s=3600
    )
    unit = "GPU" if gpu else "CPU"
    rows: dict[str, tuple[int, Any]] = {f"one process, {args.cpus} threads": (0, None)}
    for n in (int(c) for c in args.replicas.split(",")):
        share = 1 if gpu else max(1, args.cpus // n)
        rows[f"ray, {n} replica(s) x {share} {unit}"] = (n, pinned_replica(args.cpus))
        if args.serve_batch:
            batched = serve_batch_replica(args.cpus, args.max_batch, args.batch_window_ms)
            rows[f"ray, {n} x {share} {unit}, @serve.batch"] = (n, batched)
    threads = {} if gpu else {"threads": args.cpus}
    engine = load(artifacts=spec.artifacts, backend=spec.backend, device=args.device, **threads)
    cluster.connect(None, dashboard=False, log_to_driver=False)
    from ray import serve

    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    try:
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, (n, replica) in rows.items():
                desc = f"round {r} {name}" if r else f"warm-up, {name}"
                each = {"clients": args.clients, "requests": args.requests if r else 1, "steps": args.steps}
                if replica is None:
                    app = create_app(engine, config, model=args.model)
                    with background(app) as url:
                        result = run_clients(url, **each, desc=desc)
                    measured(app, result)
                else:
                    options = cluster.ClusterConfig(
                        replicas=n,
                        max_ongoing_requests=args.clients,
                        gpus_per_replica=1.0 if gpu else 0.0,
                        cpus_per_replica=1.0 if gpu else float(max(1, args.cpus // n)),
                    )
                    url = cluster.deploy(spec, config, options, port=args.port, name="bench", replica=replica)
                    result = run_clients(url, **each, desc=desc)
                    result["mean_batch"] = replicas_mean_batch(url)
                    serve.delete("bench")
                if r:
                    rounds[name].append(result)
                    print(
                        f"round {r} {name}: {result['clips_per_s']:.3f} clips/s, "
                        f"p50 {result['latency_s']['p50']:.2f} s, {result['errors']} errors"
                    )
    finally:
        cluster.shutdown()
    summary = summarize(rounds)
    print(f"\n{args.model}, {spec.backend} backend, {args.clients} clients, {args.steps} steps")
    print_summary(summary, "server")
    first = next(iter(rows))
    for name in list(rows)[1:]:
        ratio = summary[name]["clips_per_s"] / summary[first]["clips_per_s"]
        print(f"{name}: {ratio:.2f}x the throughput of {first}")
    return {"config": vars(args), "backend": spec.backend, "summary": summary, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random:tiny", help="model source (default: random:tiny)")
    parser.add_argument("--backend", default="auto", help="engine backend (default: auto)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument(
        "--requests", type=int, default=16, help="requests per client per round (default: 16)"
    )
    parser.add_argument("--steps", type=int, default=8, help="num_inference_steps (default: 8)")
    parser.add_argument("--max-batch", type=int, default=4, help="batch size with batching on (default: 4)")
    parser.add_argument("--batch-window-ms", type=float, default=50.0, help="batching window (default: 50)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode, alternated (default: 2)")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--ray", action="store_true", help="the Ray Serve application against one process")
    parser.add_argument("--replicas", default="1,2", help="--ray: replica counts, a row each (default: 1,2)")
    parser.add_argument(
        "--cpus", type=int, default=2, help="--ray, CPU: cores shared by the replicas (default: 2)"
    )
    parser.add_argument(
        "--serve-batch", action="store_true", help="--ray: add rows batching with @serve.batch"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="--ray: cpu or cuda (default: cpu)"
    )
    parser.add_argument("--port", type=int, default=8000, help="--ray: Serve's HTTP port (default: 8000)")
    args = parser.parse_args()

    report = run_ray(args) if args.ray else run_batching(args)
    report["environment"] = environment()
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
