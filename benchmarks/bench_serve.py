"""Serving throughput and latency: N concurrent clients against a real server, with
batching on and off, rounds alternated in one process.

    python benchmarks/bench_serve.py --model random:tiny --clients 8 --requests 6 --rounds 2 \\
        --steps 8 --json benchmarks/results/serve-random-tiny-cpu.json

Each client sends its requests one after another (a closed loop), each with its own
seeds, so at most ``--clients`` requests are in the server at once. "off" serves with
``--max-batch 1``; "on" with ``--max-batch`` and ``--batch-window-ms``. Prints clips
per second, latency percentiles and the mean batch size per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


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


def load(url: str, *, clients: int, requests: int, steps: int, desc: str = "") -> dict[str, Any]:
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
    args = parser.parse_args()

    from riffusion_engine.engine.bench import environment
    from riffusion_engine.engine.pipeline import Engine
    from riffusion_engine.engine.serve.app import ServerConfig, background, create_app

    engine = Engine.load(args.model, backend=args.backend, progress=True)
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
                result = load(
                    url,
                    clients=args.clients,
                    requests=args.requests if r else 1,
                    steps=args.steps,
                    desc=f"round {r} batching {name}" if r else f"warm-up, batching {name}",
                )
            registry = app.state.metrics.registry
            batches = registry.get_sample_value("riffusion_batch_size_count") or 1
            result["mean_batch"] = registry.get_sample_value("riffusion_batch_size_sum") / batches
            if r:
                rounds[name].append(result)
                print(
                    f"round {r} batching {name:>3}: {result['clips_per_s']:.3f} clips/s, "
                    f"p50 {result['latency_s']['p50']:.2f} s, mean batch {result['mean_batch']:.2f}"
                )

    summary = {}
    for name, results in rounds.items():
        summary[name] = {
            "clips_per_s": statistics.median(r["clips_per_s"] for r in results),
            "p50_s": statistics.median(r["latency_s"]["p50"] for r in results),
            "p90_s": statistics.median(r["latency_s"]["p90"] for r in results),
            "p99_s": statistics.median(r["latency_s"]["p99"] for r in results),
            "mean_batch": statistics.fmean(r["mean_batch"] for r in results),
            "errors": sum(r["errors"] for r in results),
        }
    print(f"\n{args.model}, {engine.backend.name} backend, {args.clients} clients, {args.steps} steps")
    print(
        f"{'batching':<10}{'clips/s':>9}{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}{'mean batch':>12}{'errors':>8}"
    )
    for name, s in summary.items():
        print(
            f"{name:<10}{s['clips_per_s']:>9.3f}{s['p50_s']:>8.2f}{s['p90_s']:>8.2f}{s['p99_s']:>8.2f}"
            f"{s['mean_batch']:>12.2f}{s['errors']:>8d}"
        )
    print(f"throughput with batching: {summary['on']['clips_per_s'] / summary['off']['clips_per_s']:.2f}x")
    if args.json:
        report = {"config": vars(args), "backend": engine.backend.name, "summary": summary, "rounds": rounds}
        report["environment"] = environment()
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
