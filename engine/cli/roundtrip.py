"""``riffusion-engine roundtrip``: synthesized music through a spectrogram image and back."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import check_seed_arg, output_dir


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "roundtrip",
        help="round trip synthesized music through a spectrogram image (no model)",
        description="Synthesizes 5.11 s of music-like audio, converts it to a spectrogram image and "
        "back, and prints per-stage timings. Offline; needs no model.",
    )
    p.add_argument(
        "-o",
        "--output",
        default="riffusion-roundtrip",
        help="output directory (default: riffusion-roundtrip)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthesized audio")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu (NumPy/SciPy) or cuda (CuPy)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from ...kernels.audio import normalize_like_riffusion, save_audio
    from ...kernels.convert import audio_from_image, image_from_audio
    from ...kernels.image import save_image, spectrogram_from_image
    from ...kernels.metrics import spectral_convergence
    from ...kernels.params import SpectrogramParams
    from ...kernels.synth import music_like
    from ...kernels.xp import get_xp

    get_xp(args.device)  # a device that cannot run stops here, before any file is written
    check_seed_arg(args.seed)
    out_dir = output_dir(args.output)
    params = SpectrogramParams()
    source = music_like(5.11, sample_rate=params.sample_rate, seed=args.seed)
    save_audio(out_dir / "source.wav", normalize_like_riffusion(source), params.sample_rate)
    timings: list[tuple[str, float]] = []
    start = time.perf_counter()
    image = image_from_audio(source, params.sample_rate, params)
    timings.append(("audio -> image", time.perf_counter() - start))
    save_image(image, out_dir / "spectrogram.png")
    start = time.perf_counter()
    audio, rate = audio_from_image(image, device=args.device)
    timings.append(("image -> audio", time.perf_counter() - start))
    save_audio(out_dir / "roundtrip.wav", audio, rate)
    mel, _ = spectrogram_from_image(image)
    quality = spectral_convergence(audio.astype(np.float32), mel, params)
    duration = audio.shape[-1] / rate
    print(f"{'stage':<16}{'seconds':>9}{'real-time factor':>18}")
    for stage, seconds in timings:
        print(f"{stage:<16}{seconds:>9.3f}{seconds / duration:>18.3f}")
    print(f"spectral convergence of the round trip: {quality:.3f} (lower is better)")
    print(f"wrote {out_dir}/source.wav, spectrogram.png, roundtrip.wav ({duration:.2f} s of audio)")
