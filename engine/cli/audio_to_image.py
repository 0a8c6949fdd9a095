"""``riffusion-engine audio-to-image``: audio to a spectrogram image."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ...kernels.errors import RiffusionError
from .common import add_io


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "audio-to-image",
        help="turn audio into a Riffusion spectrogram image",
        description="Audio (WAV, FLAC, OGG, MP3; any rate, resampled to 44.1 kHz) to a spectrogram PNG "
        "in Riffusion's format: one column per 10 ms, parameters in the EXIF.",
    )
    add_io(p, "input audio file", "output PNG")
    p.add_argument("--stereo", action="store_true", help="keep two channels (G = left, B = right)")
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="keep the first WIDTH columns (WIDTH / 100 seconds), a multiple of 8: a seed image for "
        "clips that wide (default: all of it)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ...kernels.audio import load_audio
    from ...kernels.convert import image_from_audio
    from ...kernels.files import check_output_path
    from ...kernels.image import save_image
    from ...kernels.params import SpectrogramParams

    out = check_output_path(args.output, (".png",))
    if args.width is not None and (args.width < 8 or args.width % 8):
        raise RiffusionError(f"--width must be a positive multiple of 8 pixels, got {args.width}")
    start = time.perf_counter()
    samples, rate = load_audio(args.input)
    params = SpectrogramParams(stereo=args.stereo)
    image = image_from_audio(samples, rate, params)
    if args.width is not None:
        if args.width > image.width:
            raise RiffusionError(
                f"--width {args.width} is wider than the audio's {image.width} columns "
                f"({params.duration_s(image.width):.2f} s)"
            )
        from ..runtime.seeds import crop_width

        image = crop_width(image, args.width)
    save_image(image, out)
    print(
        f"wrote {out} ({image.width}x{image.height}, {params.duration_s(image.width):.2f} s of audio) "
        f"in {time.perf_counter() - start:.2f} s"
    )
    if image.width % 8:
        print(
            f"note: {image.width} columns is not a multiple of 8, so it cannot seed clips as it is; "
            f"--width {image.width // 8 * 8} makes a seed image"
        )
