"""DeepCache's branches: what a shallow UNet call costs against a full one, and how far a
cached clip lands from the uncached one, per branch and interval.

    python benchmarks/bench_deep_cache.py --model random:full --branches 0,1,2,3 \\
        --json benchmarks/results/deep-cache-branches-random-full-cpu.json

On the torch backend (fp32, the reference-exact path), the realtime profile (its LoRA,
tiny VAE, 4 LCM steps, guidance off), 512 px. For each branch: the median seconds of a
full UNet call and of a shallow call on the same inputs (``--runs`` each, after one
warm-up), and for each interval the cached clip against the uncached one in both of
bench's modes (text to clip; the web app's og_beat at denoising 0.75): RMS difference in
gray levels and the share of pixels within 1 and 4 of them. The branch an export is made
for is the one bench and the profile then time end to end (``bench --profile realtime``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
from report import write_json

PROMPT = "funky jazz saxophone"


def seconds(call: Any, runs: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random:tiny", help="model source (default: random:tiny)")
    parser.add_argument("--branches", default="0,1,2,3", help="DeepCache branches (default: 0,1,2,3)")
    parser.add_argument("--intervals", default="2,3", help="intervals (default: 2,3)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per stage (default: 3)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    import torch
    from riffusion_engine import load
    from riffusion_engine.engine.runtime.cpu import cpu_features
    from riffusion_engine.engine.runtime.deep_cache import DeepCache
    from riffusion_engine.engine.runtime.requests import PromptInput, Request
    from riffusion_engine.engine.runtime.seeds import seed_image
    from riffusion_engine.engine.tools.recipes import with_schedule
    from riffusion_engine.export.specs import FEATURE, SHALLOW

    try:
        branches = [int(b) for b in args.branches.split(",")]
        intervals = [int(i) for i in args.intervals.split(",")]
    except ValueError:
        raise SystemExit(
            "bench_deep_cache: --branches and --intervals take integers, comma-separated"
        ) from None
    first = load(args.model, backend="torch", profile="realtime", deep_cache=f"{intervals[0]}:{branches[0]}")
    modes = {
        "text": Request(PromptInput(PROMPT, 0, guidance=1.0), steps=4, scheduler="lcm"),
        "og_beat 0.75": Request(
            PromptInput(PROMPT, 0, guidance=1.0, denoising=0.75),
            steps=4,
            scheduler="lcm",
            seed_image=seed_image("og_beat", first.params),
        ),
    }

    def pixels(engine: Any, request: Request) -> np.ndarray:
        return np.round(engine.images([request]).cpu().numpy() * 255)

    uncached: dict[str, np.ndarray] | None = None  # the uncached clips, from the first branch's engine
    rows = []
    print(f"{'branch':>6} {'full s':>8} {'shallow s':>9} {'share':>6}  agreement with the uncached clip")
    for index, branch in enumerate(branches):
        engine = (
            first
            if index == 0
            else load(args.model, backend="torch", profile="realtime", deep_cache=f"2:{branch}")
        )
        backend = engine.backend
        if uncached is None:
            uncached = {mode: pixels(with_schedule(engine, None), r) for mode, r in modes.items()}
        g = torch.Generator().manual_seed(0)
        latents = engine.shape.height // engine.shape.vae_factor
        inputs = {
            "sample": torch.randn(1, engine.shape.latent_channels, latents, latents, generator=g),
            "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": engine.encode([PROMPT]),
        }
        _, feature = backend.run("unet", inputs)
        full = seconds(lambda backend=backend, inputs=inputs: backend.run("unet", inputs), args.runs)
        deep = {**inputs, FEATURE: feature}
        shallow = seconds(lambda backend=backend, deep=deep: backend.run(SHALLOW, deep), args.runs)
        row: dict[str, Any] = {
            "branch": branch,
            "full_s": full,
            "shallow_s": shallow,
            "share": shallow / full,
        }
        cells = []
        for interval in intervals:
            cached = with_schedule(engine, DeepCache(interval, branch))
            for mode, request in modes.items():
                gray = np.abs(pixels(cached, request) - uncached[mode])
                found = {
                    "rms_gray_levels": float(np.sqrt((gray**2).mean())),
                    "share_within_1_gray_level": float((gray <= 1).mean()),
                    "share_within_4_gray_levels": float((gray <= 4).mean()),
                }
                row[f"interval {interval}, {mode}"] = found
                cells.append(f"{interval}:{mode} RMS {found['rms_gray_levels']:.2f}")
        rows.append(row)
        print(
            f"{branch:>6} {full:>8.3f} {shallow:>9.3f} {shallow / full:>6.3f}  " + ", ".join(cells),
            flush=True,
        )
        del engine, backend
    if args.json:
        write_json(
            args.json,
            {
                "model": args.model,
                "cpu_features": list(cpu_features()),
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()
