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
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from riffusion_engine.kernels import GriffinLimOptions, SpectrogramParams, spectral_convergence
from riffusion_engine.kernels.convert import image_from_audio
from riffusion_engine.kernels.griffin_lim import waveform_from_mel
from riffusion_engine.kernels.image import spectrogram_from_image
from riffusion_engine.kernels.synth import music_like

Converter = Callable[[np.ndarray, int], np.ndarray]  # (mel, seed) -> waveform (channels, samples)


def reference_converter(params: SpectrogramParams) -> Converter:
    """The original Riffusion converter's algorithm, through torchaudio."""
    try:
        import torch
        import torchaudio
    except ImportError as exc:  # pragma: no cover - environment dependent
        raise SystemExit(
            "the reference needs torchaudio matching torch, e.g. in a separate venv: "
            "pip install torch==2.9.1 'torchaudio==2.9.*' -e ."
        ) from exc
    inverse_mel = torchaudio.transforms.InverseMelScale(
        n_stft=params.n_fft // 2 + 1,
        n_mels=params.num_frequencies,
        sample_rate=params.sample_rate,
        f_min=params.min_frequency,
        f_max=params.max_frequency,
        norm=params.mel_scale_norm,
        mel_scale=params.mel_scale_type,
        **_original_inverse_mel_settings(torchaudio),
    )
    griffin_lim = torchaudio.transforms.GriffinLim(
        n_fft=params.n_fft,
        n_iter=params.num_griffin_lim_iters,
        win_length=params.win_length,
        hop_length=params.hop_length,
        window_fn=torch.hann_window,
        power=1.0,
        momentum=0.99,
        rand_init=True,
    )

    def convert(mel: np.ndarray, seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        linear = inverse_mel(torch.from_numpy(mel))  # the SGD inverse needs autograd
        with torch.inference_mode():
            return griffin_lim(linear).numpy()

    return convert


ORIGINAL_MEL_ITERS = 200  # Riffusion's SpectrogramParams.max_mel_iters


def _original_inverse_mel_settings(torchaudio: Any) -> dict[str, Any]:
    """The original converter's SGD settings where the installed torchaudio still
    solves the inverse by SGD (torchaudio < 2.1); later versions solve it by
    least squares and take none of them."""
    import inspect

    signature = inspect.signature(torchaudio.transforms.InverseMelScale)
    if "max_iter" not in signature.parameters:
        return {}
    return {"max_iter": ORIGINAL_MEL_ITERS, "tolerance_loss": 1e-5, "tolerance_change": 1e-8, "sgdargs": None}


def reference_algorithm() -> str:
    """How the installed torchaudio inverts the mel scale (for the report)."""
    import torchaudio

    if _original_inverse_mel_settings(torchaudio):
        return (
            f"torchaudio {torchaudio.__version__}: InverseMelScale by SGD "
            f"({ORIGINAL_MEL_ITERS} iterations, as the original converter) + GriffinLim"
        )
    return f"torchaudio {torchaudio.__version__}: InverseMelScale by least squares + GriffinLim"


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


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


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
    image = image_from_audio(
        music_like(5.11, sample_rate=params.sample_rate, seed=1), params.sample_rate, params
    )
    mel, _ = spectrogram_from_image(image)
    audio_s = params.duration_s(mel.shape[-1])
    methods: dict[str, Converter] = {"reference": reference_converter(params)}
    for name, options in VARIANTS.items():
        if name == "engine" or args.variants:
            methods[name] = engine_converter(params, options)

    for convert in methods.values():
        for w in range(args.warmup):
            convert(mel, 1000 + w)
    times: dict[str, list[float]] = {name: [] for name in methods}
    quality: dict[str, list[float]] = {name: [] for name in methods}
    for run in range(args.runs):  # alternated: every method once per round
        for name, convert in methods.items():
            start = time.perf_counter()
            waveform = convert(mel, run)
            times[name].append(time.perf_counter() - start)
            quality[name].append(spectral_convergence(waveform, mel, params))
        print(
            f"round {run + 1}/{args.runs}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in methods),
            flush=True,
        )

    ref_median = statistics.median(times["reference"])
    results: dict[str, Any] = {}
    for name in methods:
        median = statistics.median(times[name])
        results[name] = {
            "median_s": median,
            "p90_s": float(np.percentile(times[name], 90)),
            "real_time_factor": median / audio_s,
            "speedup_vs_reference": ref_median / median,
            "spectral_convergence_median": statistics.median(quality[name]),
            "times_s": times[name],
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
    print(f"\n{'method':<28}{'median s':>10}{'p90 s':>9}{'RTF':>8}{'speedup':>9}{'spec. conv.':>13}")
    for name, r in results.items():
        print(
            f"{name:<28}{r['median_s']:>10.3f}{r['p90_s']:>9.3f}{r['real_time_factor']:>8.3f}"
            f"{r['speedup_vs_reference']:>8.1f}x{r['spectral_convergence_median']:>13.4f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
