"""``riffusion-engine bench``: the engine's backends against the reference, side by side.

The reference is diffusers' ``StableDiffusionPipeline`` in fp32 eager mode over the same
components, scheduler, steps, seed and guidance, followed by the original audio
conversion as maintained libraries implement it: the inverse mel scale as torchaudio's
``InverseMelScale`` computes it (least squares against the filterbank, clipped at zero;
here with NumPy and librosa's HTK filterbank), then librosa's Griffin-Lim (momentum 0.99,
32 iterations, random initial phase) at Riffusion's full rate and FFT size. Each engine
backend generates the same clip. After ``warmup`` rounds, the reference and the backends
run alternated (A B C A B C ...) so that drift hits all of them.

JSON schema (``schema`` 2)::

    schema         2
    config         the options of the run (``profile``: default or realtime, whose scheduler,
                   steps, guidance, LoRA and VAE the reference and every backend run)
    environment    {"cpu", "cpu_features", "cores", "gpu", "python", "platform",
                    "versions": {installed package: version}}
    audio_seconds  length of the clip
    peak_rss_bytes the process's peak resident memory (all runs; one process)
    peak_gpu_bytes the device's peak memory in use above its level before the engines loaded
                   (all allocators: TensorRT, ONNX Runtime, CuPy, torch), or null on cpu
    gpu_memory_source  what peak_gpu_bytes reads: "nvml" or "cudaMemGetInfo" (null on cpu)
    peak_torch_gpu_bytes  torch's caching allocator's peak alone, above what it held before
                   the engines loaded (this run's, not the process's), or null
    results        {"reference" | backend: {
                      "stages": {stage: {"median_s", "p90_s", "runs": [seconds, ...]}},
                      "real_time_factor": end-to-end median / audio seconds,
                      "speedup": {stage: reference median / this median} (backends only),
                      "speedup_vs_default": the engine's default recipe's end-to-end median /
                                    this one's, same mode (profiled rows only),
                      "agreement": {"max_abs_gray_levels", "share_within_one_gray_level",
                                    "spectral_convergence", "spectral_convergence_vs_reference"},
                      "agreement_vs_fp32": (bf16 and int8 rows) {"share_within_{1,4,16}_gray_levels",
                                    "rms_gray_levels", "max_abs_gray_levels",
                                    "spectral_convergence_vs_fp32"}: against the same backend's
                                    fp32 row, same mode}}
                      "uncached_row", "agreement_vs_uncached": (DeepCache and fewer-steps twins)
                                    the row it approximates, and recipes.versus against it}}
    precision_gates  {int8 row: {"int8", "bf16": their rms_gray_levels against fp32, "ratio",
                      "holds": ratio <= 2}}
    deep_cache_gates {DeepCache row: {"deep_cache": its rms_gray_levels against its uncached
                      row, "bf16": bf16's against fp32 (same backend and mode), "ratio",
                      "holds": ratio <= recipes.GATE_RATIO}}

Stages: ``text_encoder`` (prompt and negative prompt), ``unet_step`` (one guided UNet
call for the reference; for the engine, its denoising loop over its steps, the guidance
and scheduler arithmetic between calls included, timed from an idle device to a finished
one), ``vae_decoder``, ``image_to_audio``, ``end_to_end``. ``spectral_convergence`` is
the audio's against the generated image's mel spectrogram (lower is better);
``spectral_convergence_vs_reference`` against the reference audio's.

With ``profile`` realtime, every row runs the profile (the reference: diffusers with the
same LoRA fused, AutoencoderTiny and scheduler), in two modes: text to clip, and the web
app's (``og_beat`` at denoising 0.75; rows named ``NAME @ og_beat 0.75``). The openvino
backend then gets a row per precision the CPU runs (``openvino fp32``, ``openvino bf16``
where it has bf16 instructions, ``openvino int8`` where NNCF is installed), unless
``precision`` names one, each agreeing with the fp32 row or not. Every row runs without
DeepCache; candidate rows get twins with fewer full UNet calls (``recipes.py``): one per
DeepCache schedule (``deep_cache``) and one in ``fewer_steps`` steps. A row ``BACKEND
default`` (and its seed-image twin) runs the engine's default recipe (PNDM at
``default_steps``, guidance 7, no LoRA, the model's VAE) for scale.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...kernels.audio import spectrogram_from_waveform
from ...kernels.errors import RiffusionError
from ...kernels.metrics import spectral_convergence
from ..runtime.backends import BACKENDS
from .measure import Round, alternate, environment, summary
from .recipes import GATE_RATIO, deep_cache_gates, twins, versus, with_schedule
from .reference import ReferencePipeline

log = logging.getLogger(__name__)

STAGES = ("text_encoder", "unet_step", "vae_decoder", "image_to_audio", "end_to_end")
SCHEMA = 2
REALTIME_SCHEDULES = ("2:0", "3:0")  # DeepCache twins a realtime bench runs unless told
REALTIME_FEWER_STEPS = 2  # and its fewer-steps twin (one UNet call in the web app's mode)
PROMPT = "funky jazz saxophone"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure."""

    model: str = "random:full"  # model source (random presets need no download)
    backends: tuple[str, ...] = ("torch", "onnxruntime")  # engine backends to measure
    precision: str | None = None  # engine precision (None: the profile's); the reference is fp32
    steps: int = 10  # scheduler steps (PNDM, Riffusion's)
    runs: int = 3  # timed rounds
    warmup: int = 1  # untimed rounds first
    device: str = "cpu"  # cpu or cuda
    guidance: float = 7.0  # guidance scale
    seed: int = 0  # noise seed
    cache_dir: str | None = None  # where exports made on first use go
    profile: str = "default"  # realtime: its scheduler, steps, guidance, LoRA and VAE on every row
    # With a profile other than default: the engine's default recipe (PNDM, guidance 7, the
    # model's VAE, no LoRA) at these steps on the first backend, for scale; 0 leaves it out.
    default_steps: int = 50
    denoising: float = 0.75  # the seed-image mode's (the web app's og_beat at 0.75)
    loras: tuple[str, ...] = ()  # PATH_OR_HUB_ID[:SCALE], fused into the engines' and the reference's weights
    vae: str | None = None  # tiny[=PATH_OR_HUB_ID] (None: the profile's)
    # DeepCache schedules (INTERVAL:BRANCH, one branch) run as twins of the candidate rows
    # (recipes.py); None: the profile's (realtime: REALTIME_SCHEDULES; default: none)
    deep_cache: tuple[str, ...] | None = None
    fewer_steps: int | None = None  # a twin sampling in this many steps (0: none; None: realtime's 2)

    def schedules(self) -> tuple[Any, ...]:
        from .recipes import parse_schedules

        if self.deep_cache is not None:
            return parse_schedules(self.deep_cache)
        return parse_schedules(REALTIME_SCHEDULES if self.profile != "default" else ())

    def fewer(self) -> int:
        if self.fewer_steps is not None:
            return self.fewer_steps
        return REALTIME_FEWER_STEPS if self.profile != "default" else 0

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise RiffusionError(
                f"backends must be among {', '.join(BACKENDS)}, got {', '.join(self.backends)}"
            )
        if self.steps < 1 or self.runs < 1 or self.warmup < 0:
            raise RiffusionError("steps and runs must be at least 1, warmup at least 0")
        if self.fewer_steps is not None and self.fewer_steps < 0:
            raise RiffusionError(f"fewer_steps must be >= 0, got {self.fewer_steps}")
        self.schedules()  # a bad --deep-cache list: refused before anything loads


def _summary(runs: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    return {stage: summary([r[stage] for r in runs]) for stage in STAGES}


def run_bench(config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Measure and return the report (schema in the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from ...kernels.params import DEFAULT_MAX_VALUE, SpectrogramParams
    from ..runtime.loading import load

    params = SpectrogramParams()
    memory = memory_source = torch_memory = None
    if config.device == "cuda":
        from .device_memory import PeakMemory, TorchPeak, device_memory_reader

        read, memory_source = device_memory_reader(torch.cuda.current_device())
        memory = PeakMemory(read).start()
        torch_memory = TorchPeak().start()
    profiled = config.profile != "default"
    schedules = config.schedules()
    # Every row runs uncached (its twins run the schedules); its export has the schedules' stages.
    deep_cache = str(schedules[0]) if schedules else "0"
    # Exported backends first: an export on first use peaks at several times the model's
    # size, so it runs before the reference and the torch backend hold their copies.
    order = sorted(config.backends, key=lambda name: name == "torch")
    loaded: dict[str, Any] = {}
    made: list[Any] = []
    for name in order:
        precisions = (
            openvino_precisions() if name == "openvino" and profiled and config.precision is None else ()
        )
        engine = load(
            config.model,
            backend=name,
            device=config.device,
            precision=precisions[-1] if precisions else config.precision,
            cache_dir=config.cache_dir,
            progress=progress,
            profile=config.profile,
            loras=config.loras,
            vae=config.vae,
            deep_cache=deep_cache,
        )
        engine = with_schedule(engine, None)
        made.append(engine)  # from the model source: its choices name the LoRAs and VAE fused in
        if not precisions:
            loaded[name] = engine
            continue
        # A row per precision the CPU runs, all from the one export (an int8 export holds
        # the fp32 stages too): agreement with the fp32 row, same profile, seed and inputs.
        for precision in precisions:
            loaded[f"{name} {precision}"] = (
                engine
                if precision == precisions[-1]
                else load(
                    artifacts=engine.backend.directory, backend=name, precision=precision, deep_cache="0"
                )
            )
    engines = {row: loaded[row] for name in config.backends for row in loaded if row.split(" ")[0] == name}
    if profiled and config.default_steps:
        first = config.backends[0]
        engines[f"{first} default"] = load(
            config.model,
            backend=first,
            device=config.device,
            # the default recipe's own precision where this one is the profile's or int8
            precision=config.precision
            if config.precision in ("fp32", "fp16") or (config.precision == "bf16" and first == "openvino")
            else None,
            cache_dir=config.cache_dir,
            progress=progress,
            deep_cache="0",
        )
    # The reference runs what the engines run: under a profile (or with --lora, --vae), the
    # LoRAs fused by diffusers, the VAE and the scheduler.
    adapted = profiled or config.loras or config.vae is not None
    choices = made[0].choices if adapted else None
    reference = ReferencePipeline(config.model, config.device, choices=choices)
    settings = {"steps": config.steps, "guidance": config.guidance, "seed": config.seed}
    # Modes: text to clip; under a profile also the web app's, a seed image at denoising 0.75.
    modes: dict[str, Any] = {"": None}
    if profiled:
        from ..runtime.defaults import SEED_IMAGE
        from ..runtime.seeds import seed_image

        modes[f" @ {SEED_IMAGE} {config.denoising:g}"] = seed_image(SEED_IMAGE, params)
    # Each engine's request: the bench's settings, or (a default row) its own recipe; the
    # scheduler is each engine's profile's.
    requests = {
        name: {**settings, "steps": config.default_steps, "guidance": engine.guidance}
        if name.endswith(" default")
        else settings
        for name, engine in engines.items()
    }
    extra = twins(engines, schedules, config.fewer(), config.steps) if profiled else {}
    calls: dict[str, Callable[[Round], Any]] = {}
    mode_of: dict[str, str] = {}  # row -> its mode's suffix
    anchor_of: dict[str, str] = {}  # twin row -> the uncached row it approximates
    for suffix, image in modes.items():
        options = {"seed_image": image, "denoising": config.denoising} if image is not None else {}
        calls["reference" + suffix] = lambda _, options=options: reference.run(PROMPT, **settings, **options)
        rows = {name: (engine, requests[name]) for name, engine in engines.items()}
        rows.update(
            {name: (twin, {**requests[base], **changed}) for name, (twin, changed, base) in extra.items()}
        )
        anchor_of.update({name + suffix: base + suffix for name, (_, _, base) in extra.items()})
        for name, (engine, request) in rows.items():
            run = {**request, **options}
            calls[name + suffix] = lambda _, engine=engine, run=run: engine.generate(PROMPT, **run)
        mode_of.update({row: suffix for row in calls if row not in mode_of})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in calls}

    def record(name: str, round_: Round, seconds: float, output: Any) -> None:
        bar.update()
        if round_.warmup:
            return
        if name.startswith("reference"):
            runs[name].append(output[0])
            return
        t = output.timings
        runs[name].append(
            {
                "text_encoder": t["text_encoder"],
                "unet_step": t["unet"] / t["unet_steps"],
                "vae_decoder": t["vae_decoder"],
                "image_to_audio": t["image_to_audio"],
                "end_to_end": seconds,
            }
        )

    rounds = config.warmup + config.runs
    with tqdm(total=rounds * len(calls), desc="bench", unit="run", disable=not progress) as bar:
        last = alternate(calls, runs=config.runs, warmup=config.warmup, after=record).outputs
    outputs = {
        name: out[1:] if name.startswith("reference") else (np.asarray(out.image), out.audio)
        for name, out in last.items()
    }
    audio_seconds = outputs["reference"][1].shape[-1] / params.sample_rate

    def agreement(name: str) -> dict[str, float]:
        """Against the reference of the same mode (and recipe: a default row's images are
        another model's, so its agreement says how far the profile moved them)."""
        from ...kernels.image import spectrogram_from_pixels

        pixels, audio = outputs[name]
        ref_pixels, ref_audio = outputs["reference" + mode_of[name]]
        ref_audio_mel = spectrogram_from_waveform(ref_audio.astype(np.float32), params)

        mel = spectrogram_from_pixels(pixels, params, max_value=DEFAULT_MAX_VALUE)
        gray = np.abs(pixels.astype(int) - ref_pixels.astype(int))
        return {
            "max_abs_gray_levels": int(gray.max()),
            "share_within_one_gray_level": float((gray <= 1).mean()),
            "spectral_convergence": spectral_convergence(audio.astype(np.float32), mel, params),
            "spectral_convergence_vs_reference": spectral_convergence(
                audio.astype(np.float32), ref_audio_mel, params
            ),
        }

    def versus_fp32(name: str) -> dict[str, float] | None:
        """Against the fp32 row of the same backend and mode (:func:`recipes.versus`)."""
        backend, _, rest = name.partition(" ")
        precision = rest.split(" ")[0]
        fp32 = f"{backend} fp32{mode_of[name]}"
        if precision not in ("bf16", "int8") or fp32 not in outputs:
            return None
        found = versus(outputs, name, fp32, params)
        return {**found, "spectral_convergence_vs_fp32": found.pop("spectral_convergence")}

    results: dict[str, Any] = {}
    for name, measured in runs.items():
        stages = _summary(measured)
        entry: dict[str, Any] = {
            "stages": stages,
            "real_time_factor": stages["end_to_end"]["median_s"] / audio_seconds,
            "agreement": agreement(name),
        }
        if not name.startswith("reference") and (vs := versus_fp32(name)) is not None:
            entry["agreement_vs_fp32"] = vs
        if name in anchor_of:
            entry["uncached_row"] = anchor_of[name]
            entry["agreement_vs_uncached"] = versus(outputs, name, anchor_of[name], params)
        if not name.startswith("reference"):
            entry["speedup"] = {
                s: results["reference" + mode_of[name]]["stages"][s]["median_s"] / stages[s]["median_s"]
                for s in STAGES
            }
        results[name] = entry
    for name, entry in results.items():
        default = f"{config.backends[0]} default{mode_of[name]}"
        if default in results and name != default and not name.startswith("reference"):
            # how many times faster than the engine's own default recipe, same mode, same run
            entry["speedup_vs_default"] = (
                results[default]["stages"]["end_to_end"]["median_s"]
                / entry["stages"]["end_to_end"]["median_s"]
            )
    gates = precision_gates(results, mode_of)
    cache_gates = deep_cache_gates(results, mode_of)
    peak_gpu = memory.stop() if memory is not None else None
    peak_torch = torch_memory.stop() if torch_memory is not None else None
    return {
        "schema": SCHEMA,
        "config": asdict(config),
        "environment": environment(),
        "audio_seconds": audio_seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": peak_gpu,
        "gpu_memory_source": memory_source,
        "peak_torch_gpu_bytes": peak_torch,
        "results": results,
        "precision_gates": gates,
        "deep_cache_gates": cache_gates,
    }


def openvino_precisions() -> tuple[str, ...]:
    """The precisions a realtime bench runs on OpenVINO here, int8 (where NNCF can make its
    UNet) last: the export made for it serves the others."""
    from ..runtime.cpu import has_bf16
    from ..runtime.profiles import nncf_installed

    return ("fp32",) + (("bf16",) if has_bf16() else ()) + (("int8",) if nncf_installed() else ())


def precision_gates(results: dict[str, Any], mode_of: dict[str, str]) -> dict[str, Any]:
    """Per backend and mode with int8 and bf16 rows: int8's end-to-end error against the
    fp32 row at most twice bf16's, both measured in this run. The error is the image's
    root mean square difference in gray levels: the audio's spectral convergence against
    the fp32 audio is reported beside it, but on the random presets' noise-like images
    Griffin-Lim's own inconsistency (the rows' ``spectral_convergence``) is its floor."""
    gates = {}
    for name, entry in results.items():
        backend, _, rest = name.partition(" ")
        bf16 = results.get(f"{backend} bf16{mode_of[name]}", {}).get("agreement_vs_fp32")
        twin = "uncached_row" in entry  # DeepCache and fewer steps: their own gate (recipes.py)
        if twin or not rest.startswith("int8") or "agreement_vs_fp32" not in entry or bf16 is None:
            continue
        int8, reference = entry["agreement_vs_fp32"]["rms_gray_levels"], bf16["rms_gray_levels"]
        ratio = int8 / reference if reference > 0 else float("inf") if int8 > 0 else 1.0
        gates[name] = {"int8": int8, "bf16": reference, "ratio": ratio, "holds": ratio <= 2.0}
    return gates


LABEL = 19  # the widest row label, 'uncached within 4', and a gap


def format_table(report: dict[str, Any]) -> str:
    """The report as a terminal table: median (p90) seconds and speedup per stage."""
    names = list(report["results"])
    # columns as wide as the longest row name, labels as the longest label: never run together
    w = max(26, *(len(n) + 2 for n in names))
    blank = " " * w
    lines = [f"{'stage':<{LABEL}}" + "".join(f"{n:>{w}}" for n in names)]
    for stage in STAGES:
        cells = []
        for name in names:
            entry = report["results"][name]
            s = entry["stages"][stage]
            speed = f" {entry['speedup'][stage]:.2f}x" if "speedup" in entry else ""
            cells.append(f"{s['median_s']:.3f} ({s['p90_s']:.3f}){speed}")
        lines.append(f"{stage:<{LABEL}}" + "".join(f"{c:>{w}}" for c in cells))
    lines.append(
        f"{'real-time factor':<{LABEL}}"
        + "".join(f"{report['results'][n]['real_time_factor']:>{w}.3f}" for n in names)
    )
    for key, label in (
        ("share_within_one_gray_level", "within 1 gray"),
        ("spectral_convergence", "spectral conv."),
        ("spectral_convergence_vs_reference", "SC vs reference"),
    ):
        lines.append(
            f"{label:<{LABEL}}" + "".join(f"{report['results'][n]['agreement'][key]:>{w}.4f}" for n in names)
        )
    if any("agreement_vs_fp32" in report["results"][n] for n in names):
        for key, label in (
            ("share_within_1_gray_levels", "fp32 within 1"),
            ("share_within_4_gray_levels", "fp32 within 4"),
            ("share_within_16_gray_levels", "fp32 within 16"),
            ("rms_gray_levels", "fp32 RMS gray"),
            ("spectral_convergence_vs_fp32", "SC vs fp32"),
        ):
            cells = [report["results"][n].get("agreement_vs_fp32", {}).get(key) for n in names]
            lines.append(f"{label:<{LABEL}}" + "".join(blank if c is None else f"{c:>{w}.4f}" for c in cells))
    if any("agreement_vs_uncached" in report["results"][n] for n in names):
        for key, label in (
            ("share_within_4_gray_levels", "uncached within 4"),
            ("rms_gray_levels", "uncached RMS"),
        ):
            cells = [report["results"][n].get("agreement_vs_uncached", {}).get(key) for n in names]
            lines.append(f"{label:<{LABEL}}" + "".join(blank if c is None else f"{c:>{w}.4f}" for c in cells))
    for name, gate in report.get("deep_cache_gates", {}).items():
        lines.append(
            f"{name}: RMS error against uncached {gate['deep_cache']:.2f} gray levels, bf16's against "
            f"fp32 {gate['bf16']:.2f}: {gate['ratio']:.2f}x "
            f"({'within' if gate['holds'] else 'over'} the {GATE_RATIO:g}x gate)"
        )
    for name, gate in report.get("precision_gates", {}).items():
        lines.append(
            f"{name}: RMS error against fp32 {gate['int8']:.2f} gray levels, bf16's {gate['bf16']:.2f}: "
            f"{gate['ratio']:.2f}x ({'within' if gate['holds'] else 'over'} the 2x gate)"
        )
    if any("speedup_vs_default" in report["results"][n] for n in names):
        lines.append(
            f"{'vs default':<{LABEL}}"
            + "".join(
                f"{report['results'][n]['speedup_vs_default']:>{w - 1}.1f}x"
                if "speedup_vs_default" in report["results"][n]
                else blank
                for n in names
            )
        )
    features = ", ".join(report["environment"].get("cpu_features", [])) or "none of AVX2/AVX-512/AMX"
    lines.append(f"cpu: {report['environment']['cpu']} ({features})")
    memory = f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB"
    if report.get("peak_gpu_bytes") is not None:
        memory += (
            f"; peak GPU memory {report['peak_gpu_bytes'] / 2**30:.2f} GiB ({report['gpu_memory_source']})"
        )
    lines.append(f"{memory}; {report['audio_seconds']:.2f} s of audio")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG bar chart of per-stage median times, the reference beside each backend."""
    from PIL import Image, ImageDraw

    from ...kernels.files import atomic_path

    names = list(report["results"])
    colors = [(90, 90, 90), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    row, bar_h, left, width = 20 + 18 * len(names), 16, 150, 900
    image = Image.new("RGB", (width, 40 + row * len(STAGES) + 20 * len(names)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), f"median seconds per stage ({report['config']['model']})", fill="black")
    for i, stage in enumerate(STAGES):
        top = 40 + i * row
        draw.text((10, top + 4), stage, fill="black")
        longest = max(report["results"][n]["stages"][stage]["median_s"] for n in names) or 1.0
        for j, name in enumerate(names):
            seconds = report["results"][name]["stages"][stage]["median_s"]
            length = int((width - left - 120) * seconds / longest)
            y = top + j * 18
            draw.rectangle((left, y, left + max(length, 1), y + bar_h - 2), fill=colors[j % len(colors)])
            draw.text((left + length + 6, y + 2), f"{seconds:.3f} s", fill="black")
    legend = 40 + row * len(STAGES)
    for j, name in enumerate(names):
        draw.rectangle((left, legend + j * 20, left + 14, legend + j * 20 + 14), fill=colors[j % len(colors)])
        draw.text((left + 20, legend + j * 20 + 2), name, fill="black")
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
