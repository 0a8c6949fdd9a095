"""``riffusion-engine stream``: an offline stream into one long seamless audio file."""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from ...kernels.errors import RiffusionError
from .common import (
    GUIDANCE_HELP,
    add_engine_args,
    add_run_args,
    apply_profile,
    as_flags,
    check_first_use_width,
    check_width_arg,
    load_engine,
    open_image,
    seed_image_or_default,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "stream",
        help="an endless stream, offline: one long seamless file",
        description="Riffusion's web-app walk as one long file: clips at alpha 0, 0.25, ... from --start "
        "to --end, then on through the --prompts, each end becoming the next start; the clips are "
        "joined by an equal-power crossfade (or, with --continuation, each keeps the previous clip's "
        "last spectrogram columns and the join spans them). Clips start from --seed-image, by default "
        "the web app's og_beat (a drum loop this project synthesizes). Prints the real-time margin: "
        "audio seconds made per wall second (1 or more keeps up with playback).",
    )
    p.add_argument("--start", required=True, help="the first prompt")
    p.add_argument("--end", default=None, help="the prompt it moves to (default: --start, next seed)")
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="more prompts, one per line (or a JSON list of strings), each the end of the next transition",
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of audio to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the start; each later end takes the next")
    p.add_argument("--negative-prompt", default=None, help="what every clip steers away from")
    p.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP)
    p.add_argument("--denoising", type=float, default=0.75, help="share of the seed image regenerated")
    p.add_argument("--alpha-step", type=float, default=0.25, help="alpha added per clip")
    p.add_argument("--crossfade", type=float, default=0.2, help="seconds crossfaded at each join")
    p.add_argument(
        "--continuation", action="store_true", help="each clip keeps the previous clip's last columns"
    )
    p.add_argument("--continuation-columns", type=int, default=64, help="columns kept (multiple of 8)")
    p.add_argument("--lookahead", type=int, default=1, help="clips denoised as one batch")
    p.add_argument(
        "--pipeline",
        choices=("auto", "on", "off"),
        default="auto",
        help="make a clip's audio while the next clip denoises (a second thread); auto: on a GPU only "
        "(on a CPU both share the cores)",
    )
    add_engine_args(p)
    add_run_args(p)
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output audio file (.wav .flac .ogg .mp3, or .opus: Ogg Opus at 48 kHz, encoded as a "
        "/stream's Opus is), written as the clips come",
    )
    p.add_argument(
        "--opus-kbps",
        type=int,
        default=104,
        help="a .opus output's bitrate in kbit/s (16..256; default: 104)",
    )
    p.set_defaults(func=run)


# StreamSettings' fields -> this command's flags, for its errors
FLAGS = {
    "alpha_step": "--alpha-step",
    "crossfade_s": "--crossfade",
    "continuation_columns": "--continuation-columns",
    "lookahead": "--lookahead",
    "steps": "--steps",
    "width": "--width",
}


def _prompts(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise RiffusionError(f"--prompts: cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RiffusionError(
            f"--prompts: {path!r} is not UTF-8 text (one prompt per line, or a JSON list of strings)"
        ) from None
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RiffusionError(f"--prompts: {path!r} is not a JSON list ({exc.msg})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise RiffusionError(f"--prompts: {path!r} must be a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise RiffusionError(f"--prompts: {path!r} holds no prompts, or an empty one")
    return prompts


def run(args: argparse.Namespace) -> None:
    apply_profile(args)
    from tqdm.auto import tqdm

    from ...kernels.audio import AUDIO_FORMATS, audio_writer
    from ...kernels.files import check_output_path
    from ...kernels.params import SpectrogramParams
    from ..runtime.requests import PromptInput
    from ..stream import Stream, StreamSettings, clips_for
    from ..stream.opus import check_bitrate, import_av, ogg_opus_writer
    from ..stream.settings import check_joins

    out = check_output_path(args.output, [*AUDIO_FORMATS, ".opus"])
    opus = out.suffix.lower() == ".opus"
    if opus:
        check_bitrate(args.opus_kbps * 1000, "--opus-kbps (in bits per second)")
        import_av()
    if not math.isfinite(args.duration) or not 0 < args.duration <= 24 * 3600:
        raise RiffusionError(f"--duration must be in (0, 86400] seconds, got {args.duration}")
    with as_flags(**FLAGS):
        settings = StreamSettings(
            steps=args.steps,
            width=args.width,
            scheduler=args.scheduler,
            alpha_step=args.alpha_step,
            crossfade_s=args.crossfade,
            continuation=args.continuation,
            continuation_columns=args.continuation_columns,
            lookahead=args.lookahead,
            pipeline={"auto": None, "on": True, "off": False}[args.pipeline],
        )
        check_width_arg(args, first_use=False)
        check_joins(settings, SpectrogramParams())  # the engine's parameters: the defaults
        check_first_use_width(args)
    prompts = _prompts(args.prompts)

    def ending(text: str, seed: int) -> PromptInput:
        return PromptInput(text, seed, args.negative_prompt, args.guidance, args.denoising)

    start = ending(args.start, args.seed)
    if args.end is not None and not args.end.strip():
        raise RiffusionError("--end is empty: give the prompt the stream moves to, or leave --end out")
    end = ending(args.end, args.seed + 1) if args.end else None
    seed_image = seed_image_or_default(args)
    mask = open_image(args.mask, "mask")
    engine = load_engine(args)
    clips = clips_for(settings, engine.params, args.duration)
    rate = engine.params.sample_rate
    total = round(args.duration * rate)
    made = 0  # samples written
    began = time.perf_counter()
    try:
        with (
            (
                ogg_opus_writer(out, rate, engine.params.channels, args.opus_kbps * 1000)
                if opus
                else audio_writer(out, rate, engine.params.channels)
            ) as write,
            Stream(
                engine, start, end, settings=settings, seed_image=seed_image, mask=mask, max_clips=clips
            ) as stream,
            tqdm(total=total, unit="audio s", unit_scale=1 / rate, desc="stream") as bar,
        ):
            for seed, text in enumerate(prompts, start=args.seed + 2):
                stream.queue(ending(text, seed))
            for chunk in stream:
                audio = chunk.audio[:, : total - made]
                write(audio)
                made += audio.shape[-1]
                bar.update(audio.shape[-1])
    except KeyboardInterrupt:
        print(f"\ninterrupted: wrote the {made / rate:.2f} s made so far to {out}")
        raise
    wall = time.perf_counter() - began
    seconds = made / rate
    print(
        f"{clips} clips, {seconds:.2f} s of audio in {wall:.2f} s: real-time margin {seconds / wall:.2f}x "
        f"({'keeps up with' if seconds >= wall else 'slower than'} playback)"
    )
    print(f"wrote {out}")
