"""``riffusion-engine interpolate``: clips moving from one prompt to another."""

from __future__ import annotations

import argparse
from typing import Any

from ...kernels.errors import RiffusionError
from .common import (
    GUIDANCE_HELP,
    REQUEST_FLAGS,
    add_engine_args,
    add_run_args,
    apply_profile,
    as_flags,
    check_output_dir,
    check_seed_image_steps,
    load_engine,
    open_image,
    output_dir,
    seed_image_or_default,
    timing_line,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "interpolate",
        help="a continuous sequence of clips moving from one prompt to another",
        description="Riffusion's web-app sequence: clip i is the start and end prompts blended at "
        "alpha = min(0.25 i, 1), all from one seed image for continuity (by default the web "
        "app's og_beat, a drum loop the project synthesizes). Writes clip_000.wav ... and "
        "joined.wav (and the PNGs) to DIR.",
    )
    p.add_argument("--start", required=True, help="start prompt (alpha 0)")
    p.add_argument("--end", required=True, help="end prompt (alpha 1)")
    p.add_argument("--start-seed", type=int, default=0, help="start noise seed (default: 0)")
    p.add_argument("--end-seed", type=int, default=1, help="end noise seed (default: 1)")
    p.add_argument("--clips", type=int, default=5, help="number of clips (default: 5)")
    add_engine_args(p)
    p.add_argument("--negative-prompt", default=None, help="negative prompt of both ends")
    p.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP)
    p.add_argument("--denoising", type=float, default=0.75, help="share of the seed image regenerated")
    add_run_args(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    apply_profile(args)
    import numpy as np

    from ...kernels.audio import save_audio
    from ..runtime.requests import PromptInput, Request

    if args.clips < 1:
        raise RiffusionError(f"--clips must be at least 1, got {args.clips}")
    check_output_dir(args.output)
    seed_image = seed_image_or_default(args)
    check_seed_image_steps(args.steps, args.denoising)
    mask = open_image(args.mask, "mask")
    with as_flags(**{**REQUEST_FLAGS, "seed": "--start-seed"}):
        start = PromptInput(args.start, args.start_seed, args.negative_prompt, args.guidance, args.denoising)
    with as_flags(**{**REQUEST_FLAGS, "seed": "--end-seed"}):
        end = PromptInput(args.end, args.end_seed, args.negative_prompt, args.guidance, args.denoising)
    with as_flags(**REQUEST_FLAGS):
        requests = [
            Request(start, end, min(0.25 * i, 1.0), args.steps, args.width, args.scheduler, seed_image, mask)
            for i in range(args.clips)
        ]
    engine = load_engine(args)
    for request in requests:
        engine.check(request)
    out_dir = output_dir(args.output)
    audio = []
    rate = 0
    try:
        for i, request in enumerate(requests):
            (clip,) = engine.run([request], progress=True)
            clip.save(out_dir / f"clip_{i:03d}.wav")
            clip.save(out_dir / f"clip_{i:03d}.png")
            audio.append(clip.audio)
            rate = clip.sample_rate
            print(f"clip {i} (alpha {request.alpha:.2f}): {timing_line(clip)}")
    except KeyboardInterrupt:
        if audio:  # the clips made so far, joined
            save_audio(out_dir / "joined.wav", np.concatenate(audio, axis=-1), rate)
        kept = f"the {len(audio)} clip(s) made and joined.wav" if audio else "nothing"
        print(f"\ninterrupted: wrote {kept} to {out_dir}")
        raise
    save_audio(out_dir / "joined.wav", np.concatenate(audio, axis=-1), rate)
    print(f"wrote {len(requests)} clips and joined.wav to {out_dir}")
