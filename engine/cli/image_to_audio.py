"""``riffusion-engine image-to-audio``: a spectrogram image to audio."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import add_io, as_flags


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "image-to-audio",
        help="turn a Riffusion spectrogram image into audio",
        description="Spectrogram image to audio: inverse mel, fast Griffin-Lim, Riffusion's loudness "
        "normalisation. The output format follows the extension (.wav, .flac, .ogg, .mp3).",
    )
    add_io(p, "input spectrogram image (PNG; parameters read from its EXIF)", "output audio file")
    p.add_argument("--iters", type=int, default=None, help="Griffin-Lim iterations (default: 32)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random phase (all of it with --init random; only near-silent "
        "coefficients with pghi) (default: 0)",
    )
    p.add_argument(
        "--init",
        choices=("pghi", "random"),
        default=None,
        help="initial phase: pghi (integrated from the magnitude's gradient; the default) or "
        "random (the original; the default with --plain)",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu (NumPy/SciPy) or cuda (CuPy)"
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="the unmodified algorithm (full sample rate, n_fft-padded transform, random initial "
        "phase): slower",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ...kernels.audio import check_audio_output, save_audio
    from ...kernels.convert import audio_from_image
    from ...kernels.griffin_lim import GriffinLimOptions
    from ...kernels.image import load_image

    out = check_audio_output(args.output)
    changes = {"n_iter": args.iters, "seed": args.seed}
    if args.init is not None:
        changes["init"] = args.init
    with as_flags(n_iter="--iters", seed="--seed"):
        options = (GriffinLimOptions.plain if args.plain else GriffinLimOptions)(**changes)
    start = time.perf_counter()
    image = load_image(args.input)
    samples, rate = audio_from_image(image, options=options, device=args.device)
    convert_s = time.perf_counter() - start
    save_audio(out, samples, rate)
    print(f"wrote {out} ({samples.shape[-1] / rate:.2f} s, {rate} Hz) - conversion {convert_s:.2f} s")
