"""The export step: a model source -> a verified export directory, cached by key.

``export(config, output)`` loads the model, exports each stage to ONNX (optionally
fused and fp16) and, for ``target="tensorrt"``, builds an engine from each ONNX file;
every artifact is verified against the torch stage. The directory's ``manifest.json``
(schema in ``riffusion_engine.export.artifacts``) records hashes, versions, errors and
the cache key. Exporting again with the same key, into a directory whose files still
match their hashes, does nothing; otherwise the directory is rebuilt in a temporary
sibling and renamed into place under a lock (one that leaves no file), so an interrupted export never leaves
a complete-looking directory and two exports at once do not mix their files.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from ..kernels.errors import RiffusionError
from ..kernels.files import exclusive_lock, umask_mode
from . import artifacts
from .adapters import Variant
from .calibration import CalibrationPlan, CalibrationSet, ClipStore
from .memory_estimate import check_export_memory
from .models import DEFAULT_MODEL, is_random_preset, load_components, source_hash
from .openvino_export import DEFAULT_SCHEME, require_nncf, require_openvino, scheme
from .specs import SHALLOW, STAGES, Dim, ModelDims, ShapeProfile, StageSpec, stage_specs
from .verify import TOLERANCE, Reference, all_finite, onnxruntime_runner, torch_references, verify_stage

log = logging.getLogger(__name__)

Target = Literal["onnx", "tensorrt", "openvino"]
Precision = Literal["fp32", "fp16", "int8"]
Device = Literal["cpu", "cuda"]
TARGETS: tuple[Target, ...] = ("onnx", "tensorrt", "openvino")
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
# Collects an int8 export's calibration: (the export's fp32 stages as a directory the engine
# loads, the plan, where to keep each clip's inputs as they are made, progress) -> the set.
Calibrate = Callable[[Path, CalibrationPlan, ClipStore, bool], CalibrationSet]
DEVICES: tuple[Device, ...] = ("cpu", "cuda")
MIN_OPSET = 17
# Stages that stay fp32 when fp16 overflows on their sample inputs (the VAE's activations
# are the ones known to exceed fp16's range).
FP16_FALLBACK_STAGES = ("vae_decoder", "vae_encoder")
TIMING_CACHE = "timing.cache"
# The torch component each stage runs.
_COMPONENT = {
    "text_encoder": "text_encoder",
    "unet": "unet",
    SHALLOW: "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}


def max_opset() -> int:
    """The newest opset the installed torch's TorchScript ONNX exporter (the one
    ``onnx_export`` runs) writes: torch.onnx._constants names it (torch 2.x); where
    that module does not say, opset 20 (torch 2.13's)."""
    try:
        from torch.onnx import _constants

        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    except ImportError:
        return 20


@dataclass(frozen=True)
class ExportConfig:
    """What to export, and how."""

    model: str = DEFAULT_MODEL  # random preset, diffusers-format directory or hub id
    # ONNX files; ONNX files plus TensorRT engines; unfused ONNX files plus OpenVINO IR
    target: Target = "onnx"
    # fp16: ONNX Runtime fp16 graphs, or TensorRT fp16 kernels; int8 (openvino): the UNet
    # also quantized by NNCF, calibrated on the engine's own sampling (``calibration``)
    precision: Precision = "fp32"
    # Sizes and batch; its deep_cache_branch (DeepCache) makes the UNet also return the
    # feature kept there and adds the unet_shallow stage after it (export/stages.py)
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    opset: int = MIN_OPSET  # ONNX opset
    fuse: bool = True  # ONNX Runtime transformer fusions (ONNX target; TensorRT fuses itself)
    stages: tuple[str, ...] = STAGES  # which stages to export
    seed: int = 0  # weight seed of random presets
    # Where the export will run: cpu, or cuda (CUDA-only fusions; verified on ONNX Runtime's
    # CUDA provider). None: cuda for the tensorrt target, else cpu.
    device: Device | None = None
    variant: Variant = field(default_factory=Variant)  # LoRAs fused in, and the tiny VAE
    # The run profile the export is made for (default, realtime): recorded in the manifest,
    # and the one an engine loading the directory runs unless told otherwise.
    run_profile: str = "default"
    calibration: CalibrationPlan | None = None  # int8: the clips calibrated and verified on
    int8_scheme: str = DEFAULT_SCHEME  # int8: NNCF's recipe (openvino_export.SCHEMES)

    def __post_init__(self) -> None:
        if self.device is None:
            object.__setattr__(self, "device", "cuda" if self.target == "tensorrt" else "cpu")
        if self.device not in DEVICES:
            raise RiffusionError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.target not in TARGETS:
            raise RiffusionError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.target == "tensorrt" and self.device != "cuda":
            raise RiffusionError("the tensorrt target runs on --device cuda")
        if self.precision not in PRECISIONS:
            raise RiffusionError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.target == "openvino":
            if self.device != "cpu":
                raise RiffusionError("the openvino target runs on --device cpu (OpenVINO's CPU plugin)")
            if self.precision == "fp16":
                raise RiffusionError("the openvino target is fp32 or int8 (bf16 is chosen when it runs)")
        elif self.precision == "int8":
            raise RiffusionError("int8 is the openvino target's: export with --target openvino")
        if self.precision == "int8":
            scheme(self.int8_scheme)
            if self.calibration is None:
                raise RiffusionError("an int8 export needs a calibration plan (the engine's sampling)")
            if self.calibration.guidance > 1 and not self.profile.guidance:
                raise RiffusionError("a guided calibration on an export made for guidance off")
        newest = max_opset()
        if not MIN_OPSET <= self.opset <= newest:
            raise RiffusionError(
                f"opset must be in {MIN_OPSET}..{newest} (the newest this torch's ONNX exporter "
                f"writes), got {self.opset}"
            )
        if self.precision == "int8" and "unet" not in self.stages:
            raise RiffusionError("an int8 export quantizes the UNet: keep the unet stage")
        if self.profile.deep_cache_branch is not None and "unet" not in self.stages:
            raise RiffusionError("DeepCache's stages are the UNet's: keep the unet stage")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages or len(set(self.stages)) != len(self.stages):
            raise RiffusionError(f"stages must be distinct names from {', '.join(STAGES)}, got {self.stages}")

    @property
    def int8(self) -> bool:
        return self.precision == "int8"

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stages made: ``stages``, with DeepCache's shallow stage after the UNet."""
        if self.profile.deep_cache_branch is None:
            return self.stages
        return tuple(n for s in self.stages for n in ((s, SHALLOW) if s == "unet" else (s,)))

    @property
    def fused(self) -> bool:
        return self.fuse and self.target == "onnx"

    @property
    def cuda(self) -> bool:
        """Whether the ONNX files are made for (and verified on) ONNX Runtime's CUDA provider.
        The tensorrt target's ONNX files are plain fp32 graphs, verified on the CPU provider
        (TensorRT fuses itself; its engines are verified on the GPU)."""
        return self.device == "cuda" and self.target == "onnx"

    @property
    def optimized(self) -> bool:
        """Whether the ONNX files go through the optimizer (fusions and/or fp16 conversion)."""
        return self.target == "onnx" and (self.fuse or self.precision == "fp16")


@dataclass
class ExportResult:
    directory: Path  # the export directory
    manifest: dict[str, Any]  # its manifest
    cache_hit: bool  # True when nothing had to be built


def export(
    config: ExportConfig,
    output: str | os.PathLike[str],
    *,
    progress: bool = True,
    calibrate: Calibrate | None = None,
    reads: Callable[[str], bool] | None = None,
) -> ExportResult:
    """Export ``config.model`` into ``output`` (or reuse it when its key matches).
    ``calibrate``: an int8 export's collector of its calibration (the engine's sampling,
    which this layer cannot import: ``engine/runtime/calibration.py``). ``reads``: where
    the caller runs only some of the files (OpenVINO the IR, not the ONNX beside it), which
    of them a cached export's hashes are checked for; default every file."""
    output = Path(output)
    if config.int8 and calibrate is None:
        raise RiffusionError("an int8 export calibrates on the engine's sampling: give it a collector")
    if config.target == "openvino":
        require_openvino()
        if config.int8:
            require_nncf()
    if config.target == "tensorrt":
        from .tensorrt_build import require_tensorrt

        require_tensorrt()
        if artifacts.gpu_info() is None:
            raise RiffusionError("TensorRT engines are built on an NVIDIA GPU, and torch sees none here")
    if config.cuda:
        _require_cuda_onnxruntime()
    _check_output(output)
    key_fields = cache_key_fields(config)
    key = artifacts.cache_key(key_fields)
    output.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output.parent / f".{output.name}.lock"):
        cached = _cached(output, key, reads)
        if cached is not None:
            log.info("cache hit: %s already holds this export (key %s)", output, key[:12])
            return ExportResult(output, cached, cache_hit=True)
        for stale in output.parent.glob(f".{output.name}.tmp-*"):
            log.info("removing %s, left by an interrupted export", stale)
            shutil.rmtree(stale, ignore_errors=True)
        # An int8 export's calibration clips, kept as they are made: an interrupted export
        # of the same key resumes from them; another key's are stale.
        store = ClipStore(output.parent / f".{output.name}.calibration-{key[:16]}")
        for stale in output.parent.glob(f".{output.name}.calibration-*"):
            if stale != store.directory:
                shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
        os.chmod(work, umask_mode(0o777))  # mkdtemp's 0700 would keep the export private
        try:
            timing = output / TIMING_CACHE
            if timing.is_file():
                shutil.copy2(timing, work / TIMING_CACHE)
            manifest = _build(
                config, work, key, key_fields, progress=progress, calibrate=calibrate, store=store
            )
            _replace(work, output)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(store.directory, ignore_errors=True)  # reached only once the export is in place
    return ExportResult(output, manifest, cache_hit=False)


def cache_key_fields(config: ExportConfig) -> dict[str, Any]:
    """Every field that decides the artifacts' content; the cache key hashes them."""
    return {
        "format": artifacts.FORMAT,
        "model": source_hash(config.model, seed=config.seed),
        "variant": config.variant.key_fields(random_preset=is_random_preset(config.model), seed=config.seed),
        "target": config.target,
        "device": config.device,
        "precision": config.precision,
        "opset": config.opset,
        "fused": config.fused,
        "profile": config.profile.to_dict(),
        "stages": list(config.stages),
        "tools": artifacts.tool_versions(),
        "gpu": artifacts.gpu_info() if config.device == "cuda" else None,
        # only where not the default: exports made before the field keep their cache keys
        **({"run_profile": config.run_profile} if config.run_profile != "default" else {}),
        **(
            {"openvino": artifacts.tool_versions(("openvino",))["openvino"]}
            if config.target == "openvino"
            else {}
        ),
        **({"int8": int8_key_fields(config)} if config.int8 else {}),
    }


def int8_key_fields(config: ExportConfig) -> dict[str, Any]:
    """What an int8 UNet depends on besides the model: NNCF's version, the scheme and the
    calibration plan (its prompts' text hashed)."""
    assert config.calibration is not None
    return {
        "nncf": artifacts.tool_versions(("nncf",))["nncf"],
        "scheme": asdict(scheme(config.int8_scheme)),
        "calibration": config.calibration.key_fields(),
    }


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise RiffusionError(f"output {str(output)!r} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / artifacts.MANIFEST).exists():
        raise RiffusionError(
            f"output {str(output)!r} is a non-empty directory without a {artifacts.MANIFEST}; "
            "choose a new or empty directory (an export replaces its directory)"
        )


def _cached(output: Path, key: str, reads: Callable[[str], bool] | None = None) -> dict[str, Any] | None:
    """The manifest of a complete, intact export under ``key`` in ``output`` (its files, or
    those ``reads`` accepts, as hashed when it was made), or None."""
    try:
        manifest = artifacts.read_manifest(output)
    except artifacts.ArtifactError:
        return None
    if manifest.get("cache_key") != key:
        log.info("%s holds an export with another key; exporting again", output)
        return None
    damaged = artifacts.damaged_files(output, manifest, reads)
    if damaged:
        log.warning(
            "%s: %s changed since export (sha256 mismatch); exporting again", output, ", ".join(damaged)
        )
        return None
    return manifest


def _replace(work: Path, output: Path) -> None:
    """Move the finished ``work`` directory to ``output``, replacing any previous export."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(output, old)
    os.rename(work, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _require_cuda_onnxruntime() -> None:
    """A cuda export is verified on ONNX Runtime's CUDA provider: one clear error where it cannot run."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RiffusionError(
            "an export for --device cuda is verified on ONNX Runtime's CUDA provider, which this "
            "onnxruntime lacks: pip install 'riffusion-engine[gpu]' (onnxruntime-gpu)"
        )
    if artifacts.gpu_info() is None:
        raise RiffusionError("an export for --device cuda needs a CUDA GPU, and torch sees none here")


def _build(
    config: ExportConfig,
    work: Path,
    key: str,
    key_fields: dict[str, Any],
    *,
    progress: bool,
    calibrate: Calibrate | None = None,
    store: ClipStore | None = None,
) -> dict[str, Any]:
    log.info("loading %s", config.model)
    components = load_components(config.model, seed=config.seed, variant=config.variant)
    dims = ModelDims.of(components)
    specs = stage_specs(dims, config.profile)
    if not config.cuda:  # a GPU's verification allocates on the device, which its runtime checks
        check_export_memory(components, specs, config.stage_names, dims.vae_factor)
    scratch = work / "scratch"
    scratch.mkdir()
    stages = {}
    names = config.stage_names
    for index, name in enumerate(names):
        # Torch weights no later stage needs are dropped once their references are
        # computed: at full size this keeps the UNet's 3.4 GB out of the ONNX optimizer's peak.
        later = {_COMPONENT[s] for s in names[index + 1 :]}
        release = _COMPONENT[name] if _COMPONENT[name] not in later else None
        steps = ["export", "verify"]
        if config.optimized:
            steps.insert(1, "optimize")
        if config.target == "tensorrt":
            steps += ["engine", "verify engine"]
        if config.target == "openvino":
            steps += ["openvino IR"]
        with tqdm(total=len(steps), desc=f"{name:<12}", unit="step", disable=not progress, leave=True) as bar:
            stages[name] = _export_stage(config, components, specs[name], work, scratch, bar, release=release)
    shutil.rmtree(scratch)
    # What the runtime needs besides the stages: the tokenizer and the scheduler config.
    components.tokenizer.save_pretrained(work / "tokenizer")
    # The config as loaded, with diffusers' record of which values were defaults (which
    # save_pretrained drops): other scheduler classes built from it keep their own defaults.
    (work / "scheduler").mkdir()
    scheduler = json.dumps(dict(components.scheduler.config), indent=2, sort_keys=True, default=str)
    (work / "scheduler" / "scheduler_config.json").write_text(scheduler + "\n")
    support = sorted(p for d in ("tokenizer", "scheduler") for p in (work / d).rglob("*") if p.is_file())
    manifest = {
        "format": artifacts.FORMAT,
        "cache_key": key,
        "key_fields": key_fields,
        "model": {
            "id": config.model,
            "content_hash": key_fields["model"],
            "pixel_multiple": dims.pixel_multiple,
            # The LoRAs fused into the weights (sha256, scale) and the VAE (tiny: TAESD).
            "loras": key_fields["variant"]["loras"],
            "vae": key_fields["variant"]["vae"] or "own",
        },
        "target": config.target,
        "device": config.device,
        "precision": config.precision,
        "opset": config.opset,
        "profile": config.profile.to_dict(),
        "run_profile": config.run_profile,
        "tools": key_fields["tools"],
        "gpu": artifacts.gpu_info(),
        "stages": stages,
        "support_files": {str(p.relative_to(work)): artifacts.file_record(p) for p in support},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if config.int8:
        assert calibrate is not None and store is not None and config.calibration is not None
        from .openvino_export import fp32_outputs, ir_path, make_int8

        # The fp32 export, complete, for the engine's sampling to run on (``work`` only becomes
        # the export when renamed into place, after the int8 UNet is made and checked).
        (work / artifacts.MANIFEST).write_text(json.dumps({**manifest, "precision": "fp32"}, indent=2) + "\n")
        plan = replace(config.calibration, widths=config.calibration.widths or _widths(specs["unet"], dims))
        data = calibrate(work, plan, store, progress)
        recipe = scheme(config.int8_scheme)
        stages["unet"] = make_int8(work, "unet", stages["unet"], data, plan, recipe, progress=progress)
        if SHALLOW in stages:
            # Calibrated and checked on each call's inputs with the feature its full call kept.
            shallow = data.shallow(fp32_outputs(ir_path(work, SHALLOW)))
            stages[SHALLOW] = make_int8(
                work, SHALLOW, stages[SHALLOW], shallow, plan, recipe, progress=progress
            )
    # Written last: a directory with a manifest is a complete export.
    (work / artifacts.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _widths(unet: StageSpec, dims: ModelDims) -> tuple[int, ...]:
    """The clip widths an int8 UNet is calibrated at: the export's narrowest and optimized."""
    (sample,) = [t for t in unet.inputs if t.name == "sample"]
    width = sample.shape[3]
    assert isinstance(width, Dim)
    return tuple(dict.fromkeys(w * dims.vae_factor for w in (width.min, width.opt)))


def _export_stage(
    config: ExportConfig,
    components: Any,
    spec: StageSpec,
    work: Path,
    scratch: Path,
    bar: Any,
    *,
    release: str | None,
) -> dict[str, Any]:
    from .onnx_export import Optimized, export_stage, optimize
    from .stages import stage_module

    start = time.perf_counter()
    module = stage_module(components, spec.name, deep_cache_branch=config.profile.deep_cache_branch)
    final = work / f"{spec.name}.onnx"
    plain = scratch / f"{spec.name}.onnx" if config.optimized else final

    def step(label: str) -> None:
        bar.set_postfix_str(label)

    step("export")
    export_stage(module, spec, plain, opset=config.opset)
    references = torch_references(module, spec)
    del module
    if release is not None:
        setattr(components, release, None)
        gc.collect()
    bar.update()
    precision: Precision = config.precision if config.target == "onnx" else "fp32"
    fallback = None
    optimized = Optimized(fusions={}, refused={})
    cuda = config.cuda
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    if config.optimized:
        step("optimize")
        optimized = optimize(plain, spec, final, fuse=config.fuse, fp16=precision == "fp16", cuda=cuda)
        if precision == "fp16" and spec.name in FP16_FALLBACK_STAGES:
            run, _session = onnxruntime_runner(final, spec.output_names, provider=provider)
            if not all_finite(run, spec):
                fallback = "fp16 outputs had inf/NaN on the sample inputs"
                log.warning("%s: %s; keeping this stage in fp32", spec.name, fallback)
                _remove_onnx(final)
                precision = "fp32"
                optimized = optimize(plain, spec, final, fuse=config.fuse, fp16=False, cuda=cuda)
        bar.update()
    step("verify")
    run, _session = onnxruntime_runner(final, spec.output_names, provider=provider)
    verification = {
        "onnx": verify_stage(
            run, spec, references, tolerance=TOLERANCE[precision], runtime=f"onnxruntime {provider}"
        )
    }
    del run, _session
    bar.update()
    if config.target == "tensorrt":
        precision, fallback, verification["tensorrt"] = _build_engine(
            config, spec, references, work, final, step
        )
        bar.update(2)
    if config.target == "openvino":
        from .openvino_export import ir_path, verify_ir, write_ir

        step("openvino IR")
        xml = ir_path(work, spec.name)
        write_ir(final, xml)
        verification["openvino"] = verify_ir(xml, spec, references)
        bar.update()
    files = sorted(p.name for p in work.iterdir() if p.name.split(".")[0] == spec.name and p.is_file())
    seconds = round(time.perf_counter() - start, 2)
    worst = max(e["max_rel"] for report in verification.values() for e in report.values())
    log.info("%s: %s, verified (max relative error %.2e) in %.1f s", spec.name, precision, worst, seconds)
    return {
        "precision": precision,
        "fallback": fallback,
        "fusions": optimized.fusions,
        # CUDA fusions left out: the installed ONNX Runtime's kernel would refuse their shapes.
        "fusions_refused": optimized.refused,
        "spec": spec.to_dict(),
        "files": {f: artifacts.file_record(work / f) for f in files},
        "verification": verification,
        "seconds": seconds,
    }


def _build_engine(
    config: ExportConfig, spec: StageSpec, references: list[Reference], work: Path, onnx_path: Path, step: Any
) -> tuple[Precision, str | None, dict[str, Any]]:
    from .tensorrt_build import EngineOptions, build_engine, engine_runner

    precision: Precision = config.precision
    fallback = None
    engine = work / f"{spec.name}.plan"
    timing = work / TIMING_CACHE
    step("engine")
    build_engine(onnx_path, spec, engine, EngineOptions(fp16=precision == "fp16", timing_cache=timing))
    run, release = engine_runner(engine, spec)
    try:
        if precision == "fp16" and spec.name in FP16_FALLBACK_STAGES and not all_finite(run, spec):
            fallback = "fp16 engine outputs had inf/NaN on the sample inputs"
            log.warning("%s: %s; rebuilding this stage in fp32", spec.name, fallback)
            release()
            precision = "fp32"
            build_engine(onnx_path, spec, engine, EngineOptions(fp16=False, timing_cache=timing))
            run, release = engine_runner(engine, spec)
        step("verify engine")
        report = verify_stage(run, spec, references, tolerance=TOLERANCE[precision], runtime="tensorrt")
    finally:
        release()
    return precision, fallback, report


def _remove_onnx(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)
