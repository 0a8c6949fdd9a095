"""``riffusion-engine export``: the stages to verified ONNX / TensorRT."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import add_deep_cache_arg, add_variant_args, as_flags, check_seed_arg


def add_parser(sub: Any) -> None:
    from ...export.openvino_export import DEFAULT_SCHEME, SCHEMES
    from ...export.specs import HEIGHT, WIDTH

    p = sub.add_parser(
        "export",
        help="export the text encoder, UNet and VAE to verified ONNX / TensorRT",
        description="Export each stage (text_encoder, unet, vae_decoder, vae_encoder) to ONNX and, "
        "with --target tensorrt, to TensorRT engines, with --target openvino to OpenVINO IR (and with "
        "--precision int8 an int8 UNet, calibrated on the engine's own sampling); verify every artifact "
        "against torch (the int8 UNet against the fp32 one on held-out clips) and record hashes, "
        "versions and errors in DIR/manifest.json. Re-running with the same settings reuses the "
        "directory (a cache hit).",
    )
    p.add_argument(
        "--model",
        default="riffusion/riffusion-model-v1",
        help="random:tiny, random:full, a diffusers-format directory, a single-file checkpoint "
        "(.ckpt or .safetensors) or a hub id (default: riffusion/riffusion-model-v1)",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="export directory")
    p.add_argument(
        "--target",
        choices=("onnx", "tensorrt", "openvino"),
        default=None,
        help="onnx; tensorrt (ONNX then one engine per stage; needs the tensorrt extra and a GPU); "
        "openvino (unfused ONNX then OpenVINO IR per stage, what --backend openvino runs; needs the "
        "openvino extra) (default: onnx; with --profile realtime on cpu, openvino where installed)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default=None,
        help="fp16: ONNX Runtime fp16 graphs (the VAE stays fp32 if it overflows) or TensorRT fp16 kernels; "
        "int8 (openvino): the UNet also quantized by NNCF, calibrated on the engine's own sampling of "
        "shipped prompts and checked on held-out ones, minutes at full size (default: fp32; with "
        "--profile realtime, fp16 on cuda, and on cpu int8 where the CPU's class runs it fastest)",
    )
    p.add_argument(
        "--int8-scheme",
        choices=tuple(SCHEMES),
        default=DEFAULT_SCHEME,
        help=f"NNCF's recipe for --precision int8 (default: {DEFAULT_SCHEME}, the lowest error measured: "
        "docs/performance.md); " + "; ".join(f"{s.name}: {s.about}" for s in SCHEMES.values()),
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where the export will run: cuda adds ONNX Runtime's CUDA-only fusions (and packed "
        "attention in fp16) and verifies on its CUDA provider (default: cuda for --target tensorrt, "
        "else cpu)",
    )
    p.add_argument(
        "--height",
        type=int,
        default=HEIGHT,
        help=f"image height in pixels: {HEIGHT}, the spectrogram's mel bins (any other would make an "
        "export no engine runs)",
    )
    p.add_argument(
        "--width", type=int, default=WIDTH, help=f"image width optimized for (default: {WIDTH} = 5.12 s)"
    )
    p.add_argument("--max-width", type=int, default=None, help="widest image accepted (default: --width)")
    p.add_argument("--max-batch", type=int, default=4, help="most clips per call (default: 4)")
    p.add_argument(
        "--static",
        action="store_true",
        help="TensorRT profiles with one shape (--max-batch clips of --width): enables CUDA graphs",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=17,
        help="ONNX opset, from 17 to the newest the installed torch exports (20 on torch 2.13; default: 17)",
    )
    p.add_argument(
        "--no-fuse", action="store_true", help="skip ONNX Runtime's transformer fusions (ONNX target)"
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed of random presets (default: 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_variant_args(p, export=True)
    add_deep_cache_arg(p, export=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ...export.adapters import Variant
    from ...export.exporter import ExportConfig, export
    from ...export.manifest import Manifest
    from ...export.specs import HEIGHT, ShapeProfile
    from ...kernels.errors import RiffusionError
    from ..runtime.calibration import collect
    from ..runtime.loading import export_fields
    from ..runtime.profiles import resolve

    if args.height != HEIGHT:
        raise RiffusionError(
            f"--height {args.height}: Riffusion's images are {HEIGHT} pixels tall (the spectrogram's mel "
            "bins), and an export of another height could not be run; leave --height out"
        )
    check_seed_arg(args.seed)
    device = args.device or ("cuda" if args.target == "tensorrt" else "cpu")
    args.profile = args.profile or "default"
    choices = resolve(
        args.profile,
        model=args.model,
        device=device,
        backend={"onnx": "onnxruntime", "tensorrt": "tensorrt", "openvino": "openvino"}.get(args.target),
        precision=args.precision,
        vae=args.vae,
        loras=args.lora,
        deep_cache=args.deep_cache,
    )
    # An export for a profile is what the profile runs: its backend's files (int8 is OpenVINO's).
    backend = "openvino" if choices.precision == "int8" and args.target is None else None
    with as_flags(max_batch="--max-batch", max_width="--max-width", width="--width"):
        shape = ShapeProfile(
            height=args.height,
            width=args.width,
            max_width=args.max_width,
            max_batch=args.max_batch,
            static=args.static,
            guidance=choices.guidance > 1,  # the realtime profile's exports: one UNet row per clip
            deep_cache_branch=choices.deep_cache.branch if choices.deep_cache is not None else None,
        )
    config = ExportConfig(
        model=args.model,
        **export_fields(choices, backend=backend, target=args.target),
        variant=Variant(choices.loras, choices.vae),
        run_profile=choices.profile.name,
        int8_scheme=args.int8_scheme,
        profile=shape,
        opset=args.opset,
        fuse=not args.no_fuse,
        seed=args.seed,
        device=args.device,
    )
    if args.profile != "default" or choices.loras or choices.vae is not None or choices.deep_cache:
        print(choices.describe())  # once the flags are checked
    start = time.perf_counter()
    result = export(config, args.output, progress=not args.quiet, calibrate=collect if config.int8 else None)
    manifest = Manifest.of(result.directory, result.manifest)
    if result.cache_hit:
        print(f"cache hit: {result.directory} already holds this export (key {manifest.cache_key[:12]})")
    print(f"{'stage':<14}{'precision':<11}{'size':>10}{'max rel. error':>16}{'seconds':>10}")
    for name, stage in manifest.stages.items():
        note = f"  ({stage.fallback})" if stage.fallback else ""
        print(
            f"{name:<14}{stage.precision:<11}{_size(stage.bytes):>10}{stage.max_rel_error:>16.2e}"
            f"{stage.seconds:>10.1f}{note}"
        )
    int8 = manifest.stages["unet"].int8 if "unet" in manifest.stages else None
    if int8 is not None:
        check = int8["verification"]
        bf16 = "" if check["bf16"] is None else f"; bf16: {check['bf16']['rel_rms']:.2e}"
        print(
            f"unet int8 ({int8['scheme']['name']}, NNCF {int8['nncf']}): relative RMS "
            f"{check['int8']['rel_rms']:.2e} against fp32 on {check['held_out_samples']} held-out calls"
            f"{bf16}; bound {check['bound']:g}"
        )
    verb = "reused" if result.cache_hit else "wrote"
    print(f"{verb} {result.directory} in {time.perf_counter() - start:.1f} s")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
