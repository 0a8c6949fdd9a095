"""Image -> audio for a 512x512 Riffusion spectrogram: the engine's kernels
against the original converter's algorithm as torchaudio implements it
(``InverseMelScale`` + ``GriffinLim``, Riffusion's settings). With torchaudio
< 2.1 the inverse mel is the original's 200 SGD iterations; later torchaudio
solves it by least squares (faster and more accurate); the report names which.

Both start from the same mel spectrogram (decoded once from the same image)
and end at a float waveform; they run alternated in one process after a
warm-up, each run with its own seed (the reference's ``torch.manual_seed``,
ours ``GriffinLimOptions.seed``). Reported per method: median and 90th
percentile seconds, real-time factor (compute seconds per second of audio),
speedup against the reference, and spectral convergence (median over runs) of
the waveform against the target mel spectrogram.

torchaudio must match the installed torch; see the README ("Performance") for
the environment this was measured in.

    python benchmarks/bench_audio.py --runs 7 --json audio-bench.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from typing import Any

import numpy as np
from report import Column, Round, Table, alternate, cpu_model, summary, write_json
from riffusion_engine.engine.tools.reference import (
    Converter,
    music_mel,
    reference_algorithm,
    reference_converter,
)
from riffusion_engine.kernels import GriffinLimOptions, SpectrogramParams, spectral_convergence
from riffusion_engine.kernels.errors import RiffusionError
from riffusion_engine.kernels.griffin_lim import waveform_from_mel


def engine_converter(params: SpectrogramParams, options: GriffinLimOptions) -> Converter:
    def convert(mel: np.ndarray, seed: int) -> np.ndarray:
        return waveform_from_mel(mel, params, GriffinLimOptions(**{**options.__dict__, "seed": seed}))

    return convert


VARIANTS: dict[str, GriffinLimOptions] = {
    "engine": GriffinLimOptions(),
    "engine-plain": GriffinLimOptions.plain(),
    "engine-random-init": GriffinLimOptions(init="random"),
    "engine-reduced-rate-only": GriffinLimOptions(reduced_rate=True, bin_stride=1),
    "engine-unpadded-only": GriffinLimOptions(reduced_rate=False, bin_stride=4),
    "engine-16-iters": GriffinLimOptions(n_iter=16),
}

TABLE = Table(
    [
        Column("method", 28, left=True),
        Column("median s", 10, ".3f"),
        Column("p90 s", 9, ".3f"),
        Column("RTF", 8, ".3f"),
        Column("speedup", 9, ".1f", "x"),
        Column("spec. conv.", 13, ".4f"),
    ]
)


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numpy": np.__version__,
    }
    import scipy

    info["scipy"] = scipy.__version__
    for name in ("torch", "torchaudio"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = module.__version__
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7, help="timed runs per method (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per method first (default 1)")
    parser.add_argument(
        "--variants", action="store_true", help="also time each speed option alone and the plain algorithm"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    params = SpectrogramParams()
    mel = music_mel(params, through_image=True)
    audio_s = params.duration_s(mel.shape[-1])
    try:
        methods: dict[str, Converter] = {"reference": reference_converter(params)}
    except RiffusionError as exc:
        raise SystemExit(str(exc)) from None
    for name, options in VARIANTS.items():
        if name == "engine" or args.variants:
            methods[name] = engine_converter(params, options)

    times: dict[str, list[float]] = {name: [] for name in methods}
    quality: dict[str, list[float]] = {name: [] for name in methods}

    def record(name: str, r: Round, seconds: float, waveform: np.ndarray) -> None:
        if r.warmup:
            return
        times[name].append(seconds)
        quality[name].append(spectral_convergence(waveform, mel, params))
        if name == list(methods)[-1]:
            print(
                f"round {r.index + 1}/{args.runs}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in methods),
                flush=True,
            )

    # Each timed run with its own seed (the warm-up runs with seeds of their own).
    calls = {
        name: lambda r, convert=convert: convert(mel, 1000 + r.index if r.warmup else r.index)
        for name, convert in methods.items()
    }
    alternate(calls, runs=args.runs, warmup=args.warmup, after=record)

    ref_median = statistics.median(times["reference"])
    results: dict[str, Any] = {}
    for name in methods:
        stats = summary(times[name])
        results[name] = {
            "median_s": stats["median_s"],
            "p90_s": stats["p90_s"],
            "real_time_factor": stats["median_s"] / audio_s,
            "speedup_vs_reference": ref_median / stats["median_s"],
            "spectral_convergence_median": statistics.median(quality[name]),
            "times_s": stats["runs"],
            "spectral_convergence": quality[name],
        }
    report = {
        "benchmark": "image_to_audio_512x512",
        "audio_seconds": audio_s,
        "runs": args.runs,
        "warmup": args.warmup,
        "reference": reference_algorithm(),
        "environment": environment(),
        "methods": results,
    }
    print("\n" + TABLE.header())
    for name, r in results.items():
        print(
            TABLE.row(
                name,
                r["median_s"],
                r["p90_s"],
                r["real_time_factor"],
                r["speedup_vs_reference"],
                r["spectral_convergence_median"],
            )
        )
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
