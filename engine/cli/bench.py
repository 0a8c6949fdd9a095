"""``riffusion-engine bench``: the backends timed against the reference diffusers pipeline."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="time the engine's backends against the reference diffusers pipeline",
        description="Runs diffusers' StableDiffusionPipeline (fp32 eager) plus the original audio "
        "conversion (librosa) and each engine backend on the same prompt, seed, scheduler and steps, "
        "alternated after warm-up; prints median and p90 per stage, speedups, real-time factors and "
        "output agreement. The JSON schema is documented in riffusion_engine/engine/tools/bench.py.",
    )
    p.add_argument(
        "--model",
        default="random:tiny",
        help="model source (default: random:tiny, minutes on a CPU; random:full is the full-size "
        "architecture, tens of minutes: docs/performance.md)",
    )
    p.add_argument(
        "--backends", default="torch,onnxruntime", help="comma-separated (default: torch,onnxruntime)"
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16", "int8"),
        default=None,
        help="engine precision (bf16, int8: openvino; default: the profile's: fp32; realtime on "
        "openvino: one row per precision the CPU runs, fp32, bf16 where it has bf16 instructions, int8)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="PATH_OR_HUB_ID[:SCALE]",
        help="a LoRA fused into every row's weights, the reference's by diffusers (repeatable; the "
        "realtime profile needs one on a real checkpoint)",
    )
    p.add_argument("--vae", default=None, metavar="tiny[=PATH_OR_HUB_ID]", help="tiny: TAESD on every row")
    p.add_argument(
        "--default-steps",
        type=int,
        default=50,
        help="with --profile realtime: also run the engine's default recipe (PNDM at these steps, "
        "guidance 7) on the first backend, for scale; 0 leaves it out (default: 50)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="scheduler steps (default: 10; realtime profile: 4)"
    )
    p.add_argument(
        "--profile",
        choices=("default", "realtime"),
        default="default",
        help="realtime: every row (diffusers' reference included) runs the realtime profile's "
        "scheduler, steps, guidance, few-step LoRA and tiny VAE (default: default)",
    )
    p.add_argument(
        "--deep-cache",
        default=None,
        metavar="INTERVAL:BRANCH[,...]",
        help="with --profile realtime: DeepCache schedules of one branch, each run as a twin of every "
        "candidate row on its backend, with its agreement against that uncached row and the gate a "
        "profile chooses by; 0: none (default: 2:0,3:0)",
    )
    p.add_argument(
        "--fewer-steps",
        type=int,
        default=None,
        help="with --profile realtime: a twin of every candidate row sampling in this many steps "
        "(2: one UNet call in the web app's mode), with its agreement against that row; 0: none "
        "(default: 2)",
    )
    p.add_argument("--runs", type=int, default=3, help="timed rounds (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where exports made on first use go (default: ~/.cache/riffusion-engine/exports)",
    )
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the report here")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write a bar chart of the stages here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import json

    from ...kernels.files import atomic_path, check_output_path
    from ..tools.bench import BenchConfig, format_table, plot, run_bench

    json_out = check_output_path(args.json, (".json",)) if args.json else None
    plot_out = check_output_path(args.plot, (".png",)) if args.plot else None
    config = BenchConfig(
        model=args.model,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        precision=args.precision,
        steps=args.steps if args.steps is not None else 4 if args.profile == "realtime" else 10,
        guidance=1.0 if args.profile == "realtime" else 7.0,
        profile=args.profile,
        default_steps=args.default_steps,
        loras=tuple(args.lora or ()),
        vae=args.vae,
        runs=args.runs,
        warmup=args.warmup,
        device=args.device,
        cache_dir=args.cache_dir,
        deep_cache=tuple(v.strip() for v in args.deep_cache.split(","))
        if args.deep_cache is not None
        else None,
        fewer_steps=args.fewer_steps,
    )
    from ..runtime.backends import check_device

    check_device(config.device)  # before any export or model load
    report = run_bench(config)
    print(format_table(report))
    if json_out:
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_out}")
    if plot_out:
        plot(report, plot_out)
        print(f"wrote {plot_out}")
