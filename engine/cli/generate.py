"""``riffusion-engine generate``: a clip from a prompt."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import (
    GUIDANCE_HELP,
    REQUEST_FLAGS,
    add_engine_args,
    add_run_args,
    apply_profile,
    as_flags,
    check_seed_image_steps,
    check_width_arg,
    load_engine,
    open_image,
    timing_line,
)

DENOISING = 0.75  # PromptInput's default: share of a seed image regenerated


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a clip from a prompt",
        description="Prompt -> spectrogram image -> audio. Runs a model source on the torch backend, or "
        "an export directory (--artifacts) on onnxruntime / openvino / tensorrt; with a model source and a "
        "non-torch backend the model is exported on first use into --cache-dir. The audio format "
        "follows the extension of -o (.wav .flac .ogg .mp3).",
    )
    p.add_argument("prompt", help="what to generate; (word:1.3) and [word] set emphasis")
    add_engine_args(p)
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP)
    add_run_args(p)
    p.add_argument(
        "--denoising", type=float, default=DENOISING, help="with --seed-image: share regenerated (0..1)"
    )
    p.add_argument("-o", "--output", required=True, help="output audio file")
    p.add_argument("--image", default=None, help="also write the spectrogram PNG here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    apply_profile(args)
    from ...kernels.audio import check_audio_output
    from ...kernels.files import check_output_path
    from ..runtime.requests import PromptInput, Request

    out = check_audio_output(args.output)
    image_out = check_output_path(args.image, (".png",)) if args.image else None
    check_width_arg(args)
    if args.seed_image is None and args.denoising != DENOISING:
        print("warning: --denoising applies to a --seed-image; without one it is ignored", file=sys.stderr)
    if args.seed_image is not None:
        check_seed_image_steps(args.steps, args.denoising)
    with as_flags(**REQUEST_FLAGS):
        request = Request(
            PromptInput(args.prompt, args.seed, args.negative_prompt, args.guidance, args.denoising),
            steps=args.steps,
            width=args.width,
            scheduler=args.scheduler,
            seed_image=open_image(args.seed_image, "seed image"),
            mask=open_image(args.mask, "mask"),
        )
    engine = load_engine(args)
    engine.check(request)
    (clip,) = engine.run([request], progress=True)
    clip.save(out)
    if image_out:
        clip.save(image_out)
    print(timing_line(clip))
    print(f"wrote {out}" + (f" and {image_out}" if image_out else ""))
