"""``riffusion-engine demo``: an offline end-to-end run on random:tiny through ONNX Runtime."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import output_dir


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end-to-end run on random:tiny through ONNX Runtime",
        description="Exports random:tiny to ONNX (cached in DIR/export), generates a clip through the "
        "onnxruntime backend and writes clip.wav, spectrogram.png and a per-stage timing table. "
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
    from ...export.exporter import ExportConfig, export
    from ..runtime.loading import load
    from ..runtime.requests import PromptInput, Request

    # 1. Check the request: bad steps or seed fail before the export.
    Request(PromptInput(args.prompt, args.seed), steps=args.steps)
    out_dir = output_dir(args.output)
    # 2. Export random:tiny to ONNX into DIR/export (a cache hit when it is already there).
    begin = time.perf_counter()
    result = export(ExportConfig(model="random:tiny"), out_dir / "export", progress=True)
    export_s = time.perf_counter() - begin
    # 3. Load the export on onnxruntime and generate one clip.
    engine = load(artifacts=out_dir / "export", backend="onnxruntime")
    clip = engine.generate(args.prompt, seed=args.seed, steps=args.steps, progress=True)
    # 4. Write the clip and its spectrogram.
    clip.save(out_dir / "clip.wav")
    clip.save(out_dir / "spectrogram.png")
    # 5. Print the per-stage table and what to run with the real checkpoint.
    t = clip.timings
    rows = [("export (random:tiny -> ONNX)" + (", cached" if result.cache_hit else ""), export_s)]
    rows += [
        (name, t[key])
        for key, name in (
            ("text_encoder", "text encoder"),
            ("unet", f"unet + scheduler ({int(t['unet_steps'])} steps)"),
            ("vae_decoder", "vae decoder"),
            ("image_to_audio", "image -> audio"),
        )
    ]
    print(f"{'stage':<34}{'seconds':>9}{'real-time factor':>18}")
    for name, seconds in rows:
        print(f"{name:<34}{seconds:>9.3f}{seconds / clip.duration_s:>18.3f}")
    print(f"wrote {out_dir}/clip.wav and spectrogram.png ({clip.duration_s:.2f} s of audio)")
    print(
        "random:tiny has random weights: the clip is noise, not music. With the real checkpoint "
        "(downloaded once from the Hugging Face hub):\n"
        '  riffusion-engine generate "funky jazz saxophone" -o clip.wav --image clip.png'
    )
