"""What several commands share: the engine and run flags, loading the engine, input
images, output directories and the timing line."""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...kernels.errors import RiffusionError
from ...kernels.files import check_writable


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model source (--model or --artifacts), --backend, --device, --precision, --cache-dir."""
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        default=None,
        help="random:tiny, random:full, a diffusers-format directory, a single-file checkpoint "
        "(.ckpt or .safetensors) or a hub id (default: riffusion/riffusion-model-v1)",
    )
    source.add_argument("--artifacts", default=None, metavar="DIR", help="an export directory")
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "onnxruntime", "tensorrt", "openvino"),
        default="auto",
        help="auto: tensorrt on a GPU where installed, else onnxruntime where it runs on the device "
        "(on cuda: onnxruntime-gpu), else torch (default: auto); "
        "openvino runs an unfused export (--no-fuse) on the CPU",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16", "int8"),
        default=None,
        help="of an export made on first use, or of the torch backend (fp16 on cuda); bf16: "
        "OpenVINO's arithmetic on an fp32 export; int8: OpenVINO with an int8 UNet (calibrated and "
        "checked when the export is made, minutes at full size) and the other stages in bf16 where "
        "the CPU has it (default: the profile's: fp32; realtime: on cpu int8, bf16 or fp32 by the "
        "CPU's class, the first line says which and why; fp16 on cuda)",
    )
    add_deep_cache_arg(p)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where exports made on first use go (default: ~/.cache/riffusion-engine/exports)",
    )
    p.add_argument(
        "--max-width",
        type=int,
        default=None,
        help="widest clip in pixels a --model runs (torch), or its export made on first use takes "
        "(default: 2048 = 20.48 s); an --artifacts export's range was set when it was made",
    )
    add_variant_args(p)


def add_deep_cache_arg(p: argparse.ArgumentParser, *, export: bool = False) -> None:
    """--deep-cache INTERVAL[:BRANCH]."""
    run = (
        "a full UNet call every INTERVAL steps (a clip's first step always), the steps between "
        "rerunning only its shallow branch on the deep feature the full call kept at BRANCH "
        "(DeepCache; 0..11 on Stable Diffusion 1.5, 0 the shallowest, default 0 or an export's "
        "own); 0: off, every step a full call (default: the profile's: off; realtime on cpu: by "
        "the CPU's class, the first line says which and its measured agreement)"
    )
    p.add_argument(
        "--deep-cache",
        default=None,
        metavar="INTERVAL[:BRANCH]",
        help=(
            "export DeepCache's stages for BRANCH (the UNet also returns the feature kept there, and "
            "unet_shallow runs on it); INTERVAL is the run's: " + run
        )
        if export
        else run,
    )


def add_variant_args(p: argparse.ArgumentParser, *, export: bool = False) -> None:
    """--profile, --lora and --vae (``export``: the export command's, which has no --artifacts)."""
    from ..runtime.profiles import PROFILES

    default = "default" if export else "default, or with --artifacts the profile the export was made for"

    p.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        default=None,
        help="default: Riffusion's recipe ("
        + PROFILES["default"].summary()
        + "); realtime: "
        + PROFILES["realtime"].summary()
        + ", with a few-step LoRA (a random one on the random: presets; a real checkpoint needs "
        f"--lora). Each flag given overrides its own part (default: {default})",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="PATH_OR_HUB_ID[:SCALE]",
        help="a LoRA fused into the weights before export (diffusers/PEFT or kohya safetensors: a file, "
        "a folder, a hub id or owner/name/file.safetensors), at SCALE (default 1); repeatable",
    )
    p.add_argument(
        "--vae",
        default=None,
        metavar="tiny[=PATH_OR_HUB_ID]",
        help="tiny: decode (and encode seed images) with TAESD, madebyollin/taesd or the one named "
        "(default: the model's own VAE; the realtime profile's: tiny)",
    )


def apply_profile(args: argparse.Namespace) -> Any:
    """Fill the flags left unset from ``--profile`` (the backend, precision, VAE, LoRAs and,
    where the command has them, scheduler, steps and guidance), say on stdout what the run
    uses when it is not the default recipe, and return the choices."""
    from ...export.adapters import Variant, check_lora_source
    from ...export.models import DEFAULT_MODEL, is_random_preset
    from ..runtime.loading import export_deep_cache_branch
    from ..runtime.profiles import resolve

    exported = getattr(args, "artifacts", None) is not None
    if args.profile is None:
        from ..runtime.loading import export_run_profile

        args.profile = (export_run_profile(Path(args.artifacts)) if exported else None) or "default"
    choices = resolve(
        args.profile,
        model=None if exported else (args.model or DEFAULT_MODEL),
        device=args.device or "cpu",
        exported=exported,
        backend=getattr(args, "backend", None),
        precision=args.precision,
        vae=args.vae,
        loras=args.lora,
        scheduler=getattr(args, "scheduler", None),
        steps=getattr(args, "steps", None),
        guidance=getattr(args, "guidance", None),
        deep_cache=getattr(args, "deep_cache", None),
        export_branch=export_deep_cache_branch(Path(args.artifacts)) if exported else False,
    )
    for name in ("backend", "precision", "scheduler", "steps", "guidance"):
        if hasattr(args, name):
            setattr(args, name, getattr(choices, name))
    if hasattr(args, "deep_cache"):
        args.deep_cache = str(choices.deep_cache or 0)
    args.vae, args.lora = choices.vae, list(choices.loras)
    # The LoRAs and VAE named before the line that says what runs (nothing read yet).
    Variant(tuple(choices.loras), choices.vae)
    for lora in choices.loras:
        check_lora_source(
            lora.source, random_preset=exported or is_random_preset(args.model or DEFAULT_MODEL)
        )
    if args.profile != "default" or choices.loras or choices.vae is not None or choices.deep_cache:
        print(choices.describe(exported=exported), flush=True)
    if getattr(args, "negative_prompt", None) and choices.guidance <= 1:
        print(
            f"warning: --negative-prompt steers guidance, which is off here (guidance {choices.guidance:g}); "
            "it is ignored",
            file=sys.stderr,
        )
    return choices


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The request flags: --steps, --scheduler, --width, --seed-image, --mask."""
    from ..runtime.defaults import HEIGHT, SCHEDULER, STEPS, WIDTH
    from ..runtime.requests import SCHEDULERS

    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="scheduler steps; PNDM (the default scheduler) makes steps + 1 UNet calls, its first "
        f"step taking two (default: the profile's: {STEPS}; realtime: 4)",
    )
    p.add_argument(
        "--scheduler",
        choices=tuple(SCHEDULERS),
        default=None,
        help=f"lcm and tcd sample few-step LoRAs (default: the profile's: {SCHEDULER}; realtime: lcm)",
    )
    p.add_argument(
        "--width", type=int, default=WIDTH, help=f"image width, 8-pixel multiples ({WIDTH} = 5.12 s)"
    )
    p.add_argument("--seed-image", default=None, help=f"PNG to start from (width x {HEIGHT})")
    p.add_argument("--mask", default=None, help="grayscale PNG: white = regenerate, black = keep")


# Request and PromptInput fields -> the run commands' flags, for their errors.
REQUEST_FLAGS = {
    "steps": "--steps",
    "width": "--width",
    "seed": "--seed",
    "guidance": "--guidance",
    "denoising": "--denoising",
}


def check_seed_arg(seed: int, flag: str = "--seed") -> None:
    """A seed flag's range (PromptInput's and Griffin-Lim's), checked before any work."""
    if not 0 <= seed < 2**63:
        raise RiffusionError(f"{flag} must be an integer in 0..2**63-1, got {seed}")


@contextlib.contextmanager
def as_flags(**flags: str) -> Iterator[None]:
    """An error raised inside that names a field of a config (``steps must be ...``,
    ``max_width 256 is smaller than width 512``) names this command's flags instead
    (``--steps must be ...``)."""
    try:
        yield
    except RiffusionError as exc:
        text = str(exc)
        renamed = text
        for field, flag in flags.items():
            renamed = re.sub(rf"(?<![-\w]){re.escape(field)}(?=\s)", flag, renamed)
        if renamed == text:
            raise
        raise RiffusionError(renamed) from None


def load_engine(args: argparse.Namespace) -> Any:
    """The engine that the engine flags of ``args`` name."""
    from ..runtime.loading import load

    return load(
        args.model,
        artifacts=args.artifacts,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        cache_dir=args.cache_dir,
        progress=True,
        loras=args.lora or (),
        vae=args.vae,
        profile=args.profile,
        max_width=args.max_width,
        deep_cache=args.deep_cache,
        # what the command's flags (or its profile, apply_profile) set: the export follows them
        scheduler=getattr(args, "scheduler", None),
        steps=getattr(args, "steps", None),
        guidance=getattr(args, "guidance", None),
    )


GUIDANCE_HELP = "guidance scale; <= 1 turns it off (default: the profile's: 7; realtime: off)"


def open_image(path: str | None, what: str) -> Any:
    """The image at ``path`` (None without one); an unreadable one is an error naming ``what``."""
    if path is None:
        return None
    from ...kernels.image import load_image

    try:
        return load_image(path)
    except RiffusionError as exc:
        raise RiffusionError(f"{what}: {exc}") from exc


def _fewest_columns() -> int:
    """The narrowest clip Griffin-Lim reconstructs at the default spectrogram parameters, in
    8-pixel steps (any multiple of 8: what the torch backend takes)."""
    from ...kernels.griffin_lim import GriffinLimOptions
    from ...kernels.params import SpectrogramParams
    from ..runtime.checks import fewest_columns

    return fewest_columns(SpectrogramParams(), GriffinLimOptions(), 8)


def check_width_arg(args: argparse.Namespace, *, first_use: bool = True) -> None:
    """``--width`` against the widest clip the engine flags allow, before anything is
    loaded or made (the engine checks the rest once loaded); with ``first_use``, against
    the narrowest clip of an export made on first use too (check_first_use_width)."""
    from ..runtime.checks import over_widest
    from ..runtime.defaults import MAX_WIDTH

    width = args.width
    if width < 8 or width % 8:
        raise RiffusionError(f"--width must be a positive multiple of 8 pixels, got {width}")
    fewest = _fewest_columns()
    if width < fewest:  # the engine's parameters are the defaults; its backend may take fewer pixels
        raise RiffusionError(
            f"--width {width} is below the narrowest clip: {fewest} pixels ({fewest / 100:g} s; the fewest "
            "columns Griffin-Lim reconstructs)"
        )
    if args.artifacts is None:
        widest = args.max_width or MAX_WIDTH
        if width > widest:
            raise over_widest(width, widest)
        if first_use:
            check_first_use_width(args)
        return
    from ...export.artifacts import ArtifactError, read_manifest

    try:
        widest = int(read_manifest(Path(args.artifacts))["profile"]["max_width"])
    except (ArtifactError, KeyError, TypeError, ValueError):
        return  # loading the export says what is wrong with it
    if width > widest:
        raise RiffusionError(
            f"width {width} is over this export's widest clip, {widest} pixels "
            f"(export with --max-width {width} for longer clips)"
        )


def check_first_use_width(args: argparse.Namespace) -> None:
    """A --width below the narrowest clip of the export a backend other than torch makes on
    first use: one line saying what takes it, before that export is made."""
    from ...export.specs import NARROWEST
    from ..runtime.backends import resolve_backend

    if args.artifacts is not None or args.width >= NARROWEST:
        return
    if resolve_backend(args.backend, args.device or "cpu") != "torch":
        raise RiffusionError(
            f"--width {args.width} is below the narrowest clip of the export made on first use: "
            f"{NARROWEST} pixels ({NARROWEST / 100:g} s); --backend torch takes clips down to "
            f"{_fewest_columns()} pixels, or export with --width {args.width} and run it with --artifacts"
        )


def check_seed_image_steps(steps: int, denoising: float) -> None:
    """A seed image runs ``int(steps x denoising)`` of the steps (diffusers' img2img): where
    that is none, the clip would be the seed image itself, whatever the prompt. One line
    naming both flags and the fewest steps that run one (diffusers raises here too)."""
    from ..runtime.requests import first_step

    if first_step(steps, denoising) < steps:
        return
    if denoising <= 0:
        raise RiffusionError(
            "--denoising 0 keeps the seed image as it is, whatever the prompt; give --denoising above 0"
        )
    need = max(math.ceil(1 / denoising) - 1, 1)
    while first_step(need, denoising) >= need:
        need += 1
    raise RiffusionError(
        f"--steps {steps} at --denoising {denoising:g} runs none of the steps with a seed image "
        f"(int({steps} x {denoising:g}) = 0): the clip would be the seed image itself; give "
        f"--steps {need} or more, or a higher --denoising"
    )


def seed_image_or_default(args: argparse.Namespace) -> Any:
    """``--seed-image``, else the web app's default seed image, ``--width`` columns wide
    (``--width`` checked first: the default is made that wide)."""
    from ..runtime.defaults import SEED_IMAGE
    from ..runtime.seeds import seed_image

    check_width_arg(args)
    return open_image(args.seed_image, "seed image") or seed_image(SEED_IMAGE, width=args.width)


def timing_line(clip: Any) -> str:
    """A clip's seconds per stage and its real-time factor, on one line."""
    t = clip.timings
    steps = int(t.get("unet_steps", 0))
    full = int(t.get("unet_full_calls", steps))
    parts = [f"text encoder {t.get('text_encoder', 0):.2f} s"]
    if "vae_encoder" in t:
        parts.append(f"vae encoder {t['vae_encoder']:.2f} s")
    calls = (
        f"{steps} UNet calls"
        if full == steps
        else f"{steps} UNet calls, {full} full and {steps - full} shallow"
    )
    parts.append(f"unet {t.get('unet', 0):.2f} s ({calls}, {t.get('unet', 0) / max(steps, 1):.3f} s each)")
    parts.append(f"vae decoder {t.get('vae_decoder', 0):.2f} s")
    parts.append(f"image->audio {t.get('image_to_audio', 0):.2f} s")
    total = clip.seconds
    rtf = total / clip.duration_s
    parts.append(f"total {total:.2f} s for {clip.duration_s:.2f} s of audio (real-time factor {rtf:.2f})")
    return " | ".join(parts)


def check_output_dir(path: str) -> Path:
    """``path`` as an output directory, refused with what was expected if it is a file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RiffusionError(f"output {path!r} is a file; this command writes a directory there")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    check_writable(existing, f"output {path!r}")
    return out


def output_dir(path: str) -> Path:
    """``path`` as an output directory, made where it is missing."""
    out = check_output_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def output_dir_kept_if_written(path: str) -> Iterator[Path]:
    """``output_dir``, removed again where this command made it and an interruption or an
    error leaves it empty (the command's work comes before its first file)."""
    out = check_output_dir(path)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def add_io(p: argparse.ArgumentParser, input_help: str, output_help: str) -> None:
    """The input file and the required -o output of a conversion command."""
    p.add_argument("input", help=input_help)
    p.add_argument("-o", "--output", required=True, help=output_help)
