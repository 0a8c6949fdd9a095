"""``riffusion-engine demo``: an offline end-to-end run on random:tiny, Riffusion's recipe
and the realtime profile side by side."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .common import output_dir_kept_if_written


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end-to-end run on random:tiny: Riffusion's recipe and the realtime profile",
        description="Exports random:tiny to ONNX (cached in DIR/export), generates a clip through the "
        "onnxruntime backend with Riffusion's recipe (--steps PNDM steps, guidance 7), then exports it "
        "again with the realtime profile's random few-step LoRA and tiny VAE (DIR/export-realtime) and "
        "generates the same prompt in 4 LCM steps, guidance off, on OpenVINO where installed (in int8, "
        "bf16 or fp32 by the CPU's class, the int8 UNet calibrated on the export's own sampling). "
        "Writes clip.wav, clip-realtime.wav, spectrogram.png, spectrogram-realtime.png and both "
        "per-stage timings side by side. "
        "Random weights do not make music: this shows the machinery, offline, in seconds.",
    )
    p.add_argument(
        "-o", "--output", default="riffusion-demo", help="output directory (default: riffusion-demo)"
    )
    p.add_argument("--prompt", default="a funky jazz beat", help="prompt (default: a funky jazz beat)")
    p.add_argument("--steps", type=int, default=25, help="scheduler steps (default: 25)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..runtime.requests import PromptInput, Request

    # 1. Check the request: bad steps or seed fail before the export.
    Request(PromptInput(args.prompt, args.seed), steps=args.steps)
    with output_dir_kept_if_written(args.output) as out_dir:
        _run(args, out_dir)


def _run(args: argparse.Namespace, out_dir: Path) -> None:
    from ...export.adapters import Variant
    from ...export.exporter import ExportConfig, export
    from ...export.specs import ShapeProfile
    from ..runtime.calibration import collect
    from ..runtime.loading import export_fields, load
    from ..runtime.profiles import resolve

    # 2. Riffusion's recipe: random:tiny to ONNX in DIR/export (a cache hit when it is there),
    #    on onnxruntime, --steps PNDM steps at guidance 7.
    begin = time.perf_counter()
    result = export(ExportConfig(model="random:tiny"), out_dir / "export", progress=True)
    export_s = [time.perf_counter() - begin]
    engine = load(artifacts=out_dir / "export", backend="onnxruntime")
    clips = [engine.generate(args.prompt, seed=args.seed, steps=args.steps, progress=True)]
    # 3. The realtime profile: a (random) few-step LoRA fused in and the tiny VAE, exported to
    #    DIR/export-realtime; 4 LCM steps, guidance off, OpenVINO where installed.
    choices = resolve("realtime", model="random:tiny")
    print(choices.describe())
    begin = time.perf_counter()
    # OpenVINO's IR where installed (an int8 UNet where the CPU's class runs it).
    config = ExportConfig(
        model="random:tiny",
        **export_fields(choices),
        variant=Variant(choices.loras, choices.vae),
        # guidance off: one UNet row per clip; DeepCache's stages where the profile runs them here
        profile=ShapeProfile(
            guidance=False,
            deep_cache_branch=choices.deep_cache.branch if choices.deep_cache is not None else None,
        ),
        run_profile="realtime",
    )
    realtime = export(
        config, out_dir / "export-realtime", progress=True, calibrate=collect if config.int8 else None
    )
    export_s.append(time.perf_counter() - begin)
    engine = load(
        artifacts=out_dir / "export-realtime",
        backend=choices.backend,
        precision=choices.precision,
        profile="realtime",
    )
    engine.generate(args.prompt, seed=args.seed)  # untimed: OpenVINO compiles on the first call
    clips.append(engine.generate(args.prompt, seed=args.seed, progress=True))
    # 4. Write the clips and their spectrograms.
    for clip, suffix in zip(clips, ("", "-realtime"), strict=True):
        clip.save(out_dir / f"clip{suffix}.wav")
        clip.save(out_dir / f"spectrogram{suffix}.png")
    # 5. Print the per-stage table side by side and what to run with the real checkpoint.
    cached = [r.cache_hit for r in (result, realtime)]
    print(f"{'stage':<24}{'default (s)':>14}{'realtime (s)':>14}")
    print(f"{'export' + (' (cached)' if all(cached) else ''):<24}{export_s[0]:>14.3f}{export_s[1]:>14.3f}")
    steps = [f"{int(c.timings['unet_steps'])}" for c in clips]  # UNet calls (PNDM: steps + 1)
    for key, name in (
        ("text_encoder", "text encoder"),
        ("unet", f"unet ({steps[0]} / {steps[1]} calls)"),
        ("vae_decoder", "vae decoder"),
        ("image_to_audio", "image -> audio"),
    ):
        print(f"{name:<24}{clips[0].timings[key]:>14.3f}{clips[1].timings[key]:>14.3f}")
    totals = [c.seconds for c in clips]
    print(f"{'total':<24}{totals[0]:>14.3f}{totals[1]:>14.3f}")
    factors = [total / clip.duration_s for total, clip in zip(totals, clips, strict=True)]
    print(f"{'real-time factor':<24}{factors[0]:>14.3f}{factors[1]:>14.3f}")
    print(
        f"wrote {out_dir}/clip.wav and clip-realtime.wav, spectrogram.png and spectrogram-realtime.png "
        f"({clips[0].duration_s:.2f} s of audio each; a real-time factor below 1 is faster than it plays)"
    )
    print(
        "random:tiny has random weights: the clips are noise, not music. With the real checkpoint "
        "(downloaded once from the Hugging Face hub):\n"
        '  riffusion-engine generate "funky jazz saxophone" -o clip.wav --image clip.png\n'
        '  riffusion-engine generate "funky jazz saxophone" -o clip.wav --profile realtime '
        "--lora latent-consistency/lcm-lora-sdv1-5"
    )
