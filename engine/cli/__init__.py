"""The ``riffusion-engine`` command line.

Each subcommand imports what it needs when it runs, so that ``--help`` and the
light commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...kernels.errors import RiffusionError

log = logging.getLogger("riffusion_engine")


def _cmd_audio_to_image(args: argparse.Namespace) -> None:
    from ...kernels.audio import load_audio
    from ...kernels.convert import image_from_audio
    from ...kernels.files import check_output_path
    from ...kernels.image import save_image
    from ...kernels.params import SpectrogramParams

    out = check_output_path(args.output, (".png",))
    start = time.perf_counter()
    samples, rate = load_audio(args.input)
    params = SpectrogramParams(stereo=args.stereo)
    image = image_from_audio(samples, rate, params)
    save_image(image, out)
    print(
        f"wrote {out} ({image.width}x{image.height}, {params.duration_s(image.width):.2f} s of audio) "
        f"in {time.perf_counter() - start:.2f} s"
    )


def _cmd_image_to_audio(args: argparse.Namespace) -> None:
    from ...kernels.audio import check_audio_output, save_audio
    from ...kernels.convert import audio_from_image
    from ...kernels.griffin_lim import GriffinLimOptions
    from ...kernels.image import load_image

    out = check_audio_output(args.output)
    changes = {"n_iter": args.iters, "seed": args.seed}
    if args.init is not None:
        changes["init"] = args.init
    options = (GriffinLimOptions.plain if args.plain else GriffinLimOptions)(**changes)
    start = time.perf_counter()
    image = load_image(args.input)
    samples, rate = audio_from_image(image, options=options, device=args.device)
    convert_s = time.perf_counter() - start
    save_audio(out, samples, rate)
    print(f"wrote {out} ({samples.shape[-1] / rate:.2f} s, {rate} Hz) - conversion {convert_s:.2f} s")


def _cmd_roundtrip(args: argparse.Namespace) -> None:
    import numpy as np

    from ...kernels.audio import normalize_like_riffusion, save_audio
    from ...kernels.convert import audio_from_image, image_from_audio
    from ...kernels.image import save_image, spectrogram_from_image
    from ...kernels.metrics import spectral_convergence
    from ...kernels.params import SpectrogramParams
    from ...kernels.synth import music_like
    from ...kernels.xp import get_xp

    get_xp(args.device)  # a device that cannot run stops here, before any file is written
    out_dir = _output_dir(args.output)
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


def _cmd_export(args: argparse.Namespace) -> None:
    from ...export.exporter import ExportConfig, export
    from ...export.specs import ShapeProfile

    config = ExportConfig(
        model=args.model,
        target=args.target,
        precision=args.precision,
        profile=ShapeProfile(
            height=args.height,
            width=args.width,
            max_width=args.max_width,
            max_batch=args.max_batch,
            static=args.static,
        ),
        opset=args.opset,
        fuse=not args.no_fuse,
        seed=args.seed,
        device=args.device,
    )
    start = time.perf_counter()
    result = export(config, args.output, progress=not args.quiet)
    if result.cache_hit:
        key = result.manifest["cache_key"][:12]
        print(f"cache hit: {result.directory} already holds this export (key {key})")
    print(f"{'stage':<14}{'precision':<11}{'size':>10}{'max rel. error':>16}{'seconds':>10}")
    for name, stage in result.manifest["stages"].items():
        size = sum(f["bytes"] for f in stage["files"].values())
        error = max(e["max_rel"] for report in stage["verification"].values() for e in report.values())
        note = f"  ({stage['fallback']})" if stage["fallback"] else ""
        print(
            f"{name:<14}{stage['precision']:<11}{_size(size):>10}{error:>16.2e}{stage['seconds']:>10.1f}{note}"
        )
    verb = "reused" if result.cache_hit else "wrote"
    print(f"{verb} {result.directory} in {time.perf_counter() - start:.1f} s")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
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
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="of an export made on first use, or of the torch backend (fp16 on cuda); bf16: "
        "OpenVINO's arithmetic on an fp32 export (default: fp32)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where exports made on first use go (default: ~/.cache/riffusion-engine/exports)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from ..runtime.pipeline import SCHEDULERS

    p.add_argument(
        "--steps",
        type=int,
        default=50,
        help="scheduler steps; PNDM (the default scheduler) makes steps + 1 UNet calls, its first "
        "step taking two (default: 50)",
    )
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="pndm", help="(default: pndm)")
    p.add_argument("--width", type=int, default=512, help="image width, 8-pixel multiples (512 = 5.12 s)")
    p.add_argument("--seed-image", default=None, help="PNG to start from (width x 512)")
    p.add_argument("--mask", default=None, help="grayscale PNG: white = regenerate, black = keep")


def _load_engine(args: argparse.Namespace) -> Any:
    from ..runtime.loading import load

    return load(
        args.model,
        artifacts=args.artifacts,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        cache_dir=args.cache_dir,
        progress=True,
    )


def _open_image(path: str | None, what: str) -> Any:
    if path is None:
        return None
    from ...kernels.image import load_image

    try:
        return load_image(path)
    except RiffusionError as exc:
        raise RiffusionError(f"{what}: {exc}") from exc


def _timing_line(clip: Any) -> str:
    t = clip.timings
    steps = int(t.get("unet_steps", 0))
    parts = [f"text encoder {t.get('text_encoder', 0):.2f} s"]
    if "vae_encoder" in t:
        parts.append(f"vae encoder {t['vae_encoder']:.2f} s")
    parts.append(
        f"unet {t.get('unet', 0):.2f} s ({steps} UNet calls, {t.get('unet', 0) / max(steps, 1):.3f} s each)"
    )
    parts.append(f"vae decoder {t.get('vae_decoder', 0):.2f} s")
    parts.append(f"image->audio {t.get('image_to_audio', 0):.2f} s")
    total = sum(v for k, v in t.items() if k != "unet_steps")
    rtf = total / clip.duration_s
    parts.append(f"total {total:.2f} s for {clip.duration_s:.2f} s of audio (real-time factor {rtf:.2f})")
    return " | ".join(parts)


def _cmd_generate(args: argparse.Namespace) -> None:
    from ...kernels.audio import check_audio_output
    from ...kernels.files import check_output_path
    from ..runtime.pipeline import PromptInput, Request

    out = check_audio_output(args.output)
    image_out = check_output_path(args.image, (".png",)) if args.image else None
    request = Request(
        PromptInput(args.prompt, args.seed, args.negative_prompt, args.guidance, args.denoising),
        steps=args.steps,
        width=args.width,
        scheduler=args.scheduler,
        seed_image=_open_image(args.seed_image, "seed image"),
        mask=_open_image(args.mask, "mask"),
    )
    engine = _load_engine(args)
    engine.check(request)
    (clip,) = engine.run([request], progress=True)
    clip.save(out)
    if image_out:
        clip.save(image_out)
    print(_timing_line(clip))
    print(f"wrote {out}" + (f" and {image_out}" if image_out else ""))


def _cmd_interpolate(args: argparse.Namespace) -> None:
    import numpy as np

    from ...kernels.audio import save_audio
    from ..runtime.pipeline import PromptInput, Request

    if args.clips < 1:
        raise RiffusionError(f"--clips must be at least 1, got {args.clips}")
    _check_output_dir(args.output)
    seed_image = _open_image(args.seed_image, "seed image") or _beat_seed_image(args.width)
    mask = _open_image(args.mask, "mask")
    start = PromptInput(args.start, args.start_seed, args.negative_prompt, args.guidance, args.denoising)
    end = PromptInput(args.end, args.end_seed, args.negative_prompt, args.guidance, args.denoising)
    requests = [
        Request(start, end, min(0.25 * i, 1.0), args.steps, args.width, args.scheduler, seed_image, mask)
        for i in range(args.clips)
    ]
    engine = _load_engine(args)
    for request in requests:
        engine.check(request)
    out_dir = _output_dir(args.output)
    audio = []
    rate = 0
    for i, request in enumerate(requests):
        (clip,) = engine.run([request], progress=True)
        clip.save(out_dir / f"clip_{i:03d}.wav")
        clip.save(out_dir / f"clip_{i:03d}.png")
        audio.append(clip.audio)
        rate = clip.sample_rate
        print(f"clip {i} (alpha {request.alpha:.2f}): {_timing_line(clip)}")
    save_audio(out_dir / "joined.wav", np.concatenate(audio, axis=-1), rate)
    print(f"wrote {len(requests)} clips and joined.wav to {out_dir}")


def _beat_seed_image(width: int) -> Any:
    """A seed image of a beat the project synthesizes, ``width`` columns wide."""
    from ...kernels.synth import music_like
    from ..runtime.seeds import image_of_audio

    return image_of_audio(lambda seconds, rate: music_like(seconds, sample_rate=rate, seed=0), width)


def _cmd_demo(args: argparse.Namespace) -> None:
    from ...export.exporter import ExportConfig, export
    from ..runtime.loading import load
    from ..runtime.pipeline import PromptInput, Request

    Request(PromptInput(args.prompt, args.seed), steps=args.steps)  # bad steps or seed: before the export
    out_dir = _output_dir(args.output)
    begin = time.perf_counter()
    result = export(ExportConfig(model="random:tiny"), out_dir / "export", progress=True)
    export_s = time.perf_counter() - begin
    engine = load(artifacts=out_dir / "export", backend="onnxruntime")
    clip = engine.generate(args.prompt, seed=args.seed, steps=args.steps, progress=True)
    clip.save(out_dir / "clip.wav")
    clip.save(out_dir / "spectrogram.png")
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


def _cmd_bench(args: argparse.Namespace) -> None:
    import json

    from ...kernels.files import atomic_path, check_output_path
    from ..tools.bench import BenchConfig, format_table, plot, run_bench

    json_out = check_output_path(args.json, (".json",)) if args.json else None
    plot_out = check_output_path(args.plot, (".png",)) if args.plot else None
    config = BenchConfig(
        model=args.model,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        precision=args.precision,
        steps=args.steps,
        runs=args.runs,
        warmup=args.warmup,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    from ..runtime.backends import check_device

    check_device(config.device)  # before any export or model load
    report = run_bench(config)
    print(format_table(report))
    if json_out:
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_out}")
    if plot_out:
        plot(report, plot_out)
        print(f"wrote {plot_out}")


def _cmd_serve(args: argparse.Namespace) -> None:
    try:
        from ..serve.app import ServerConfig, bind, serve
    except ImportError as exc:
        raise RiffusionError(
            f"the server needs the serve extra ({exc.name} is missing): pip install 'riffusion-engine[serve]'"
        ) from None

    config = ServerConfig(
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        max_steps=args.max_steps,
        max_body_bytes=args.max_body_kb * 1024,
        seed_images=Path(args.seed_images) if args.seed_images else None,
        cors_origins=tuple(args.cors_origin),
        degrade_steps=args.degrade_steps,
        max_streams=args.max_streams,
        stream_buffer=args.stream_buffer,
        stream_lifetime_s=args.stream_lifetime,
    )
    if args.ray:
        return _serve_cluster(args, config)
    given = [f for f in CLUSTER_FLAGS if getattr(args, f.lstrip("-").replace("-", "_")) not in (None, False)]
    if given:
        raise RiffusionError(f"{given[0]} is an option of --ray")
    sock = bind(args.host, args.port)  # before the model loads: a bad or busy port fails at once
    try:
        engine = _load_engine(args)
        model = args.artifacts or args.model or "riffusion/riffusion-model-v1"
        host, port = sock.getsockname()[:2]
        print(f"serving {model} ({engine.backend.name}, {engine.backend.device}) on http://{host}:{port}")
        serve(engine, config, sock=sock, model=model, log_level="info" if args.verbose else "warning")
    finally:
        sock.close()


CLUSTER_FLAGS = (
    "--address",
    "--replicas",
    "--min-replicas",
    "--max-replicas",
    "--target-ongoing-requests",
    "--gpus-per-replica",
)


def _serve_cluster(args: argparse.Namespace, config: Any) -> None:
    from ..serve import cluster
    from ..serve.app import bind

    cluster._ray()  # the extra is installed: before any export
    autoscale = args.min_replicas is not None or args.max_replicas is not None
    if autoscale and args.replicas is not None:
        raise RiffusionError("--replicas is a fixed count: give it, or --min-replicas/--max-replicas")
    fewest = 1 if args.min_replicas is None else args.min_replicas
    options = cluster.ClusterConfig(
        replicas=None if autoscale else (args.replicas or 1),
        min_replicas=fewest,
        max_replicas=max(fewest, 1) if args.max_replicas is None else args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_ongoing_requests=args.max_ongoing_requests,
        gpus_per_replica=(1.0 if args.device == "cuda" else 0.0)
        if args.gpus_per_replica is None
        else args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
    )
    if args.address is None:
        bind(args.host, args.port).close()  # a bad or busy port fails before Ray starts
    spec = cluster.prepare(
        args.model,
        args.artifacts,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        cache_dir=args.cache_dir,
    )
    cluster.run(spec, config, options, address=args.address, host=args.host, port=args.port)


def _cmd_doctor(args: argparse.Namespace) -> None:
    import json

    from ...kernels.files import atomic_path, check_output_path
    from ..tools.doctor import HEADER, check_cuda_ready, format_row, run_doctor

    json_out = check_output_path(args.json, (".json",)) if args.json else None
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        check_cuda_ready()  # before the table: a GPU check that cannot check the GPU fails
    print(f"riffusion-engine doctor on {device}: random:tiny, {args.steps} steps, against torch cpu fp32")
    print(HEADER, flush=True)
    report = run_doctor(device, steps=args.steps, report=lambda check: print(format_row(check), flush=True))
    if json_out:
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_out}")
    counts = {s: sum(c["status"] == s for c in report["checks"]) for s in ("ok", "failed", "skipped")}
    print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped")
    failed = [c["path"] for c in report["checks"] if c["status"] == "failed"]
    if failed:
        raise RiffusionError(f"{len(failed)} path(s) failed: {'; '.join(failed)}")


def _check_output_dir(path: str) -> Path:
    """``path`` as an output directory, refused with what was expected if it is a file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RiffusionError(f"output {path!r} is a file; this command writes a directory there")
    return out


def _output_dir(path: str) -> Path:
    out = _check_output_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _add_io(p: argparse.ArgumentParser, input_help: str, output_help: str) -> None:
    p.add_argument("input", help=input_help)
    p.add_argument("-o", "--output", required=True, help=output_help)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, where the help does not already say it (flags
    and options without a default have none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if "default" in text or not action.option_strings or unset or action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="riffusion-engine",
        description="Optimized inference engine for Riffusion.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    # -v after the command too (not overriding one given before it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress and details"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    class _Sub:
        def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
            return commands.add_parser(name, parents=[common], formatter_class=HelpFormatter, **kwargs)

    sub = _Sub()

    p = sub.add_parser(
        "audio-to-image",
        help="turn audio into a Riffusion spectrogram image",
        description="Audio (WAV, FLAC, OGG, MP3; any rate, resampled to 44.1 kHz) to a spectrogram PNG "
        "in Riffusion's format: one column per 10 ms, parameters in the EXIF.",
    )
    _add_io(p, "input audio file", "output PNG")
    p.add_argument("--stereo", action="store_true", help="keep two channels (G = left, B = right)")
    p.set_defaults(func=_cmd_audio_to_image)

    p = sub.add_parser(
        "image-to-audio",
        help="turn a Riffusion spectrogram image into audio",
        description="Spectrogram image to audio: inverse mel, fast Griffin-Lim, Riffusion's loudness "
        "normalisation. The output format follows the extension (.wav, .flac, .ogg, .mp3).",
    )
    _add_io(p, "input spectrogram image (PNG; parameters read from its EXIF)", "output audio file")
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
    p.set_defaults(func=_cmd_image_to_audio)

    p = sub.add_parser(
        "export",
        help="export the text encoder, UNet and VAE to verified ONNX / TensorRT",
        description="Export each stage (text_encoder, unet, vae_decoder, vae_encoder) to ONNX and, "
        "with --target tensorrt, to TensorRT engines; verify every artifact against torch and record "
        "hashes, versions and errors in DIR/manifest.json. Re-running with the same settings reuses "
        "the directory (a cache hit).",
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
        choices=("onnx", "tensorrt"),
        default="onnx",
        help="onnx, or tensorrt (ONNX then one engine per stage; needs the tensorrt extra and a GPU)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16"),
        default="fp32",
        help="fp16: ONNX Runtime fp16 graphs (the VAE stays fp32 if it overflows) or TensorRT fp16 kernels",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where the export will run: cuda adds ONNX Runtime's CUDA-only fusions (and packed "
        "attention in fp16) and verifies on its CUDA provider (default: cuda for --target tensorrt, "
        "else cpu)",
    )
    p.add_argument("--height", type=int, default=512, help="image height in pixels (default: 512)")
    p.add_argument("--width", type=int, default=512, help="image width optimized for (default: 512 = 5.12 s)")
    p.add_argument("--max-width", type=int, default=None, help="widest image accepted (default: --width)")
    p.add_argument("--max-batch", type=int, default=4, help="most clips per call (default: 4)")
    p.add_argument(
        "--static",
        action="store_true",
        help="TensorRT profiles with one shape (--max-batch clips of --width): enables CUDA graphs",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default: 17)")
    p.add_argument(
        "--no-fuse", action="store_true", help="skip ONNX Runtime's transformer fusions (ONNX target)"
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed of random presets (default: 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "generate",
        help="generate a clip from a prompt",
        description="Prompt -> spectrogram image -> audio. Runs a model source on the torch backend, or "
        "an export directory (--artifacts) on onnxruntime / openvino / tensorrt; with a model source and a "
        "non-torch backend the model is exported on first use into --cache-dir. The audio format "
        "follows the extension of -o (.wav .flac .ogg .mp3).",
    )
    p.add_argument("prompt", help="what to generate; (word:1.3) and [word] set emphasis")
    _add_engine_args(p)
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument(
        "--guidance", type=float, default=7.0, help="guidance scale; <= 1 turns it off (default: 7)"
    )
    _add_run_args(p)
    p.add_argument(
        "--denoising", type=float, default=0.75, help="with --seed-image: share regenerated (0..1)"
    )
    p.add_argument("-o", "--output", required=True, help="output audio file")
    p.add_argument("--image", default=None, help="also write the spectrogram PNG here")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "interpolate",
        help="a continuous sequence of clips moving from one prompt to another",
        description="Riffusion's web-app sequence: clip i is the start and end prompts blended at "
        "alpha = min(0.25 i, 1), all from one seed image for continuity (by default a beat the "
        "project synthesizes). Writes clip_000.wav ... and joined.wav (and the PNGs) to DIR.",
    )
    p.add_argument("--start", required=True, help="start prompt (alpha 0)")
    p.add_argument("--end", required=True, help="end prompt (alpha 1)")
    p.add_argument("--start-seed", type=int, default=0, help="start noise seed (default: 0)")
    p.add_argument("--end-seed", type=int, default=1, help="end noise seed (default: 1)")
    p.add_argument("--clips", type=int, default=5, help="number of clips (default: 5)")
    _add_engine_args(p)
    p.add_argument("--negative-prompt", default=None, help="negative prompt of both ends")
    p.add_argument("--guidance", type=float, default=7.0, help="guidance scale (default: 7)")
    p.add_argument("--denoising", type=float, default=0.75, help="share of the seed image regenerated")
    _add_run_args(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=_cmd_interpolate)

    from .stream import add_parser as add_stream_parser

    add_stream_parser(sub, _add_engine_args, _add_run_args)

    p = sub.add_parser(
        "bench",
        help="time the engine's backends against the reference diffusers pipeline",
        description="Runs diffusers' StableDiffusionPipeline (fp32 eager) plus the original audio "
        "conversion (librosa) and each engine backend on the same prompt, seed, scheduler and steps, "
        "alternated after warm-up; prints median and p90 per stage, speedups, real-time factors and "
        "output agreement. The JSON schema is documented in riffusion_engine/engine/bench.py.",
    )
    p.add_argument("--model", default="random:full", help="model source (default: random:full)")
    p.add_argument(
        "--backends", default="torch,onnxruntime", help="comma-separated (default: torch,onnxruntime)"
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="engine precision (bf16: openvino)",
    )
    p.add_argument("--steps", type=int, default=10, help="scheduler steps (default: 10)")
    p.add_argument("--runs", type=int, default=3, help="timed rounds (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where exports made on first use go (default: ~/.cache/riffusion-engine/exports)",
    )
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the report here")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write a bar chart of the stages here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "serve",
        help="serve Riffusion's HTTP API (POST /run_inference/) and an endless stream (/stream, page at /)",
        description="Riffusion's inference API on FastAPI + uvicorn: the original's request and "
        "response, seed images and masks under the original's ids, requests batched within a "
        "window, a bounded queue (503 + Retry-After when full), a per-request timeout (504), "
        "GET /health, GET /metrics (Prometheus) and /docs; an endless stream over a WebSocket at /stream "
        "(clips due soonest run first, sharing the batcher) and a page at / that plays it. Ctrl-C "
        "finishes the requests in flight.",
    )
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=3013, help="port (default: 3013)")
    p.add_argument("--max-batch", type=int, default=4, help="most requests per UNet batch (default: 4)")
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=20.0,
        help="how long a request waits for company (default: 20)",
    )
    p.add_argument("--max-queue", type=int, default=32, help="most requests waiting or running (default: 32)")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds before a request answers 504 (default: 300)"
    )
    p.add_argument("--max-steps", type=int, default=100, help="largest num_inference_steps (default: 100)")
    p.add_argument("--max-body-kb", type=int, default=64, help="largest request body in KiB (default: 64)")
    p.add_argument(
        "--seed-images", default=None, metavar="DIR", help="extra seed images and masks: DIR/ID.png"
    )
    p.add_argument(
        "--degrade-steps",
        type=int,
        default=None,
        metavar="MIN",
        help="when a request would miss --timeout (its wait plus its run, from the measured per-step "
        "time), run it with fewer steps, down to MIN, and refuse (503) only when even MIN would miss "
        "it; the answer's X-Inference-Steps header says the steps run (default: off)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let browser pages from ORIGIN (scheme://host[:port], or * for any) call the API; "
        "repeatable (default: none, same-origin only)",
    )
    p.add_argument(
        "--max-streams", type=int, default=4, help="most /stream WebSockets open at once; one more is refused"
    )
    p.add_argument(
        "--stream-buffer", type=int, default=3, help="clips a stream makes ahead of its listener's playback"
    )
    p.add_argument("--stream-lifetime", type=float, default=3600.0, help="seconds a stream may last")
    ray = p.add_argument_group(
        "cluster (Ray Serve)",
        "--ray serves the same API from engine replicas on a Ray cluster (the cluster extra): each "
        "replica loads one prebuilt export (made here first unless --artifacts names one), --max-queue "
        "requests wait at the ingress past the replicas' --max-ongoing-requests, then 503",
    )
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve")
    ray.add_argument(
        "--address",
        default=None,
        help="the Ray cluster to join (e.g. auto, or HEAD:6379); default: start a local one",
    )
    count = ray.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default: 1)")
    count.add_argument(
        "--min-replicas", type=int, default=None, help="autoscale: fewest replicas (default: 1)"
    )
    ray.add_argument(
        "--max-replicas", type=int, default=None, help="autoscale: most replicas (default: --min-replicas)"
    )
    ray.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=None,
        help="autoscale: ongoing requests per replica to aim for (default: --max-batch)",
    )
    ray.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=8,
        help="requests a replica holds at once, running or batching (default: 8)",
    )
    ray.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPUs each replica reserves (default: 1 with --device cuda, else 0)",
    )
    ray.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1.0,
        help="CPUs each replica reserves; on the CPU its engine runs that many threads (default: 1)",
    )
    p.set_defaults(func=_cmd_serve)

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
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "doctor",
        help="run every backend, precision and GPU path this machine can, against the reference",
        description="On random:tiny (offline): the exports (ONNX fused, unfused and fp16; TensorRT "
        "dynamic and static), every backend (torch, onnxruntime on the CPU, CUDA and TensorRT "
        "providers, openvino, tensorrt with CUDA graphs), the CuPy kernels and the DLPack hand-off, "
        "export on first use, and one request through the HTTP server, each compared with the torch "
        "backend in fp32 on the CPU. On cuda it first reports the driver and the CUDA each GPU "
        "library was built for, and fails when they mix majors or the driver is too old. Prints "
        "path, status (ok / failed / skipped and why), error against the reference and time; exits "
        "non-zero when any path that could run failed, and, on cuda, at once in one line where no "
        "CUDA device is usable or the gpu extra (CuPy) is missing.",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="cpu: the CPU paths only; cuda: the GPU paths too (default: cuda where torch sees a GPU)",
    )
    p.add_argument("--steps", type=int, default=4, help="scheduler steps per clip (default: 4)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the table here as JSON")
    p.set_defaults(func=_cmd_doctor)

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
    p.set_defaults(func=_cmd_roundtrip)
    return parser


# Libraries whose warnings (deprecations, optional packages such as torchvision, config
# advice) concern their own users, not this command's: shown with -v.
THIRD_PARTIES = (
    "transformers",
    "diffusers",
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "huggingface_hub",
)


def _quiet_third_parties() -> None:
    import os
    import warnings

    for name in THIRD_PARTIES:
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers and diffusers reset their loggers' level on first use, from these.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        _quiet_third_parties()
    func: Callable[[argparse.Namespace], None] = args.func
    # SIGTERM unwinds as Ctrl-C does, so finally blocks remove temporary files and folders
    # (the server handles both signals itself: it finishes the requests in flight).
    previous = None
    handles_signals = args.command == "serve" and not args.ray
    if not handles_signals and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        func(args)
    except RiffusionError as exc:
        print(f"riffusion-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"riffusion-engine {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"riffusion-engine {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
