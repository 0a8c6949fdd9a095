"""Image -> audio quality across kinds of sound: the default options (phase-gradient
initial phase) against the random initial phase on the same grid and against
the plain algorithm (full rate, padded transform, random phase).

Each sound (the built-in seed sounds, two music-like clips, a stereo pair) is
turned into a Riffusion image, decoded back to its mel spectrogram, and
converted with each option set; the table gives the spectral convergence of
each result against that spectrogram (lower is better) and the seconds taken.

    python benchmarks/bench_phase.py --json phase.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
from report import timed, write_json
from riffusion_engine.engine.runtime.seeds import SEED_AUDIO
from riffusion_engine.kernels import GriffinLimOptions, SpectrogramParams, spectral_convergence, synth
from riffusion_engine.kernels.convert import image_from_audio
from riffusion_engine.kernels.griffin_lim import waveform_from_mel
from riffusion_engine.kernels.image import spectrogram_from_image

SECONDS = 5.11
OPTIONS: dict[str, GriffinLimOptions] = {
    "default (pghi)": GriffinLimOptions(),
    "random init": GriffinLimOptions(init="random"),
    "plain": GriffinLimOptions.plain(),
}


def sounds(rate: int) -> dict[str, tuple[np.ndarray, bool]]:
    """name -> (samples (channels, n) or (n,), stereo)."""
    out: dict[str, tuple[np.ndarray, bool]] = {
        name: (make(SECONDS, rate), False) for name, make in SEED_AUDIO.items()
    }
    for seed in (1, 2):
        out[f"music_like seed {seed}"] = (synth.music_like(SECONDS, sample_rate=rate, seed=seed), False)
    pair = np.stack(
        [
            np.ravel(synth.music_like(SECONDS, sample_rate=rate, seed=4)),
            np.ravel(synth.vibraphone(SECONDS, sample_rate=rate)),
        ]
    )
    out["stereo (music_like | vibes)"] = (pair, True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    base = SpectrogramParams()
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for name, (samples, stereo) in sounds(base.sample_rate).items():
        params = base.replace(stereo=stereo)
        mel, _ = spectrogram_from_image(image_from_audio(samples, params.sample_rate, params))
        rows[name] = {}
        for label, options in OPTIONS.items():
            seconds, waveform = timed(waveform_from_mel, mel, params, options)
            rows[name][label] = {
                "spectral_convergence": spectral_convergence(waveform, mel, params),
                "seconds": seconds,
            }
        print(
            f"{name:<30}"
            + "".join(f"{label} {r['spectral_convergence']:.4f}  " for label, r in rows[name].items()),
            flush=True,
        )
    summary = {
        label: statistics.median(rows[name][label]["spectral_convergence"] for name in rows)
        for label in OPTIONS
    }
    print("median: " + ", ".join(f"{label} {value:.4f}" for label, value in summary.items()))
    if args.json:
        write_json(args.json, {"benchmark": "phase_init_by_sound", "median": summary, "sounds": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
