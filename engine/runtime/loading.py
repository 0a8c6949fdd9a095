"""Building an Engine: from a model source (torch, or exported on first use) or an
export directory (ONNX Runtime, TensorRT)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...export.adapters import Lora, Variant
from ...export.manifest import ModelShape
from ...export.models import DEFAULT_MODEL
from ...export.specs import SHALLOW
from ...kernels.errors import RiffusionError
from .backends import check_device, create_backend, resolve_backend
from .deep_cache import DeepCache
from .defaults import MAX_BATCH, MAX_WIDTH
from .openvino_files import ir_reads
from .pipeline import Engine
from .profiles import Choices, resolve

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where exports made on first use live: $XDG_CACHE_HOME/riffusion-engine/exports."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "riffusion-engine" / "exports"


def load(
    model: str | None = None,
    *,
    artifacts: str | Path | None = None,
    backend: str = "auto",
    device: str = "cpu",
    precision: str | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
    loras: Sequence[str | Lora] = (),
    vae: str | None = None,
    profile: str | None = None,
    max_width: int | None = None,
    deep_cache: str | DeepCache | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    **options: Any,
) -> Engine:
    """An engine from a model source (the torch backend, or exported on first use into
    ``cache_dir`` for the others) or from an export directory (``artifacts``).

    ``model`` is a diffusers-format directory, a hub id (default Riffusion v1) or a
    ``random:`` preset; ``backend`` is ``auto``, ``torch``, ``onnxruntime``, ``openvino`` or
    ``tensorrt``; ``loras`` are fused into the model's weights (``PATH_OR_HUB_ID[:SCALE]``
    or :class:`Lora`); ``vae="tiny"`` decodes with TAESD; ``profile`` (``default`` or
    ``realtime``) fills in the backend, precision, VAE and LoRAs left unset, and the
    engine's request defaults (scheduler, steps, guidance); ``max_width`` is the widest
    clip in pixels a model source runs (default 2048, 20.48 s; an export directory's is
    its profile's); ``deep_cache`` is DeepCache's ``INTERVAL[:BRANCH]`` (a full UNet call
    every INTERVAL steps, the others its shallow branch; ``0``: off; None: the profile's
    choice); ``scheduler``, ``steps`` and ``guidance`` override the profile's request
    defaults and reach the export made on first use (guidance off: one UNet row per clip;
    int8: calibrated on that sampling); ``options`` go to the backend (``provider``,
    ``threads``, ...)."""
    check_device(device)  # before anything is loaded or exported
    if max_width is not None:
        if artifacts is not None:
            raise RiffusionError(
                "--max-width is fixed when an export is made: export with --max-width, then run it"
            )
        if not isinstance(max_width, int) or max_width < 64 or max_width % 8:
            raise RiffusionError(
                f"--max-width must be a multiple of 8 pixels, at least 64; got {max_width!r}"
            )
    choices, backend, precision = _choices(
        model,
        artifacts=artifacts,
        backend=backend,
        device=device,
        precision=precision,
        loras=loras,
        vae=vae,
        profile=profile,
        deep_cache=deep_cache,
        scheduler=scheduler,
        steps=steps,
        guidance=guidance,
    )
    if model is not None and artifacts is not None:
        raise RiffusionError("give a model source or an export directory, not both")
    if backend == "torch":
        if artifacts is not None:
            raise RiffusionError("the torch backend runs from a model source (--model), not an export")
        from ...export.models import is_tiny_vae, load_components, vae_factor

        variant = Variant(choices.loras, choices.vae)
        components = load_components(model or DEFAULT_MODEL, seed=seed, variant=variant)
        branch = choices.deep_cache.branch if choices.deep_cache is not None else None
        runner = create_backend(
            "torch", components=components, device=device, fp16=precision == "fp16", deep_cache_branch=branch
        )
        shape = ModelShape(
            latent_channels=components.unet.config.in_channels,
            vae_factor=vae_factor(components.vae),
            pixel_multiple=8,  # diffusers' UNet takes any latent size
            max_batch=MAX_BATCH,
            widths=(8, max_width or MAX_WIDTH),  # the engine raises the low end to what Griffin-Lim needs
            sampled_vae=not is_tiny_vae(components.vae),
        )
        scheduler_config = dict(components.scheduler.config)
        engine = Engine(
            runner,
            components.tokenizer,
            scheduler_config,
            shape,
            choices=choices,
            deep_cache=choices.deep_cache,
        )
        engine.widen = "--max-width {width}"
        return engine
    precision = _openvino_precision(backend, precision, options)
    from_model = artifacts is None
    if artifacts is None:
        artifacts = export_on_first_use(
            model or DEFAULT_MODEL,
            backend=backend,
            provider=options.get("provider"),
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            seed=seed,
            progress=progress,
            choices=choices,
            max_width=max_width,
        )
    runner = create_backend(backend, directory=artifacts, device=device, **options)
    engine = Engine.from_export(runner, Path(artifacts), choices=choices, deep_cache=choices.deep_cache)
    if from_model:
        engine.widen = "--max-width {width}"  # a wider export on first use
    return engine


def _choices(
    model: str | None,
    *,
    artifacts: str | Path | None,
    backend: str,
    device: str,
    precision: str | None,
    loras: Sequence[str | Lora],
    vae: str | None,
    profile: str | None,
    deep_cache: str | DeepCache | None,
    scheduler: str | None,
    steps: int | None,
    guidance: float | None,
) -> tuple[Choices, str, str]:
    """The profile's choices with the flags given, the backend they resolve to and its
    precision; the combinations no backend runs are refused here."""
    if artifacts is not None and profile is None:
        profile = export_run_profile(Path(artifacts))
    choices = resolve(
        profile,
        model=model or DEFAULT_MODEL,
        device=device,
        exported=artifacts is not None,
        backend=backend,
        precision=precision,
        vae=vae,
        loras=list(loras),
        int8=export_has_int8(Path(artifacts)) if artifacts is not None else None,
        scheduler=scheduler,
        steps=steps,
        guidance=guidance,
        deep_cache=deep_cache,
        export_branch=export_deep_cache_branch(Path(artifacts)) if artifacts is not None else False,
    )
    if artifacts is not None and (choices.loras or choices.vae is not None):
        raise RiffusionError(
            "LoRAs and the tiny VAE are fused in at export: give them to `export`, not with an export"
        )
    backend, precision = choices.backend, choices.precision
    backend = resolve_backend(backend, device)
    if precision in ("bf16", "int8") and backend != "openvino":
        raise RiffusionError(
            f"{precision} is the openvino backend's precision (--backend openvino); the others run fp32 "
            "or fp16"
        )
    return choices, backend, precision


def _openvino_precision(backend: str, precision: str, options: dict[str, Any]) -> str:
    """The export's precision for ``precision`` on ``backend``: OpenVINO compiles an
    openvino export's IR; bf16 is its arithmetic, set at compile time (``options``'
    inference_precision), and int8 an int8 export's UNet (made on first use where asked for)."""
    if backend != "openvino":
        return precision
    if precision not in ("fp32", "bf16", "int8"):
        raise RiffusionError(f"the openvino backend runs fp32, bf16 or int8, not {precision}")
    options.setdefault("inference_precision", precision)
    return "int8" if precision == "int8" else "fp32"


def export_for_replicas(
    model: str | None,
    *,
    backend: str,
    device: str,
    precision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    loras: Sequence[str | Lora] = (),
    vae: str | None = None,
    profile: str | None = None,
    deep_cache: str | DeepCache | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
) -> tuple[Path, Choices]:
    """The export directory ``load(model, ...)`` with these arguments would export on
    first use and run (exported now unless the cache has it), and the choices it runs
    with (their backend resolved): what a cluster's replicas load (``load(artifacts=...)``
    with the choices' run arguments), made once before any replica starts."""
    check_device(device)
    choices, backend, precision = _choices(
        model,
        artifacts=None,
        backend=backend,
        device=device,
        precision=precision,
        loras=loras,
        vae=vae,
        profile=profile,
        deep_cache=deep_cache,
        scheduler=scheduler,
        steps=steps,
        guidance=guidance,
    )
    check_replica_backend(backend)
    directory = export_on_first_use(
        model or DEFAULT_MODEL,
        backend=backend,
        device=device,
        precision=_openvino_precision(backend, precision, {}),
        cache_dir=cache_dir,
        seed=0,
        progress=progress,
        choices=choices,
    )
    return directory, replace(choices, backend=backend)


def check_replica_backend(backend: str) -> None:
    """A cluster's replicas load an export directory, which the torch backend does not run."""
    if backend == "torch":
        raise RiffusionError(
            "the cluster's replicas load an export directory; the torch backend runs from a model "
            "source: use --backend onnxruntime (or tensorrt, openvino)"
        )


def export_run_profile(directory: Path) -> str | None:
    """The run profile an export directory was made for (its manifest's), if it says."""
    return _manifest_or_empty(directory).get("run_profile")


def export_deep_cache_branch(directory: Path) -> int | None:
    """The DeepCache branch an export directory has UNet stages for (None: none)."""
    raw = _manifest_or_empty(directory)
    stages = raw.get("stages", {})
    if not isinstance(stages, dict) or SHALLOW not in stages:
        return None
    branch = raw.get("profile", {}).get("deep_cache_branch")
    return branch if isinstance(branch, int) else None


def export_has_int8(directory: Path) -> bool:
    """Whether an export directory holds an int8 UNet (its manifest says)."""
    stages = _manifest_or_empty(directory).get("stages", {})
    return isinstance(stages, dict) and isinstance(stages.get("unet"), dict) and "int8" in stages["unet"]


def _manifest_or_empty(directory: Path) -> dict[str, Any]:
    """An export directory's manifest as written, or {} where it cannot be read (the
    backend's own loading says what is wrong with it)."""
    from ...export.artifacts import ArtifactError, read_manifest

    try:
        return read_manifest(directory)
    except ArtifactError:
        return {}


def export_on_first_use(
    model: str,
    *,
    backend: str,
    provider: str | None = None,
    device: str = "cpu",
    precision: str,
    cache_dir: str | Path | None,
    seed: int,
    progress: bool,
    choices: Choices | None = None,
    max_width: int | None = None,
) -> Path:
    """The export directory for ``model`` in the cache, exported now unless an export
    with a matching key is already there; ``choices`` (a profile's) give its LoRAs, VAE
    and guidance."""
    # The one place the runtime reaches for the exporter, and only when asked to.
    from ...export.exporter import export
    from .calibration import collect

    name, config = first_use_export(
        model,
        backend=backend,
        provider=provider,
        device=device,
        precision=precision,
        seed=seed,
        choices=choices,
        max_width=max_width,
    )
    root = Path(cache_dir or default_cache_dir())
    if root.exists() and not root.is_dir():
        raise RiffusionError(f"the export cache {str(root)!r} (--cache-dir) is a file, not a folder")
    directory = root / name
    # OpenVINO reads an openvino export's IR only: the cache hit checks those files' hashes.
    reads = ir_reads(precision or "fp32") if config.target == "openvino" else None
    result = export(
        config, directory, progress=progress, calibrate=collect if config.int8 else None, reads=reads
    )
    log.info("%s export %s (%s)", "reusing" if result.cache_hit else "made", directory, model)
    return directory


def export_fields(
    choices: Choices, *, backend: str | None = None, precision: str | None = None, target: str | None = None
) -> dict[str, Any]:
    """The ExportConfig fields of an export that ``backend`` runs in ``precision`` (default:
    the choices'): its target (openvino: IR; tensorrt: engines; else ONNX), the files'
    precision (bf16 is OpenVINO's arithmetic, chosen when it runs: fp32 files) and, for
    int8, the calibration plan of the choices' sampling (scheduler, steps, guidance)."""
    from ...export.calibration import CalibrationPlan

    backend = backend or choices.backend
    precision = precision or choices.precision
    target = target or {"tensorrt": "tensorrt", "openvino": "openvino"}.get(backend, "onnx")
    precision = "fp32" if precision == "bf16" else precision
    calibration = (
        CalibrationPlan.of(choices.scheduler, choices.steps, choices.guidance)
        if precision == "int8"
        else None
    )
    return {"target": target, "precision": precision, "calibration": calibration}


def first_use_export(
    model: str,
    *,
    backend: str,
    provider: str | None,
    device: str,
    precision: str,
    seed: int,
    choices: Choices | None = None,
    max_width: int | None = None,
) -> tuple[str, Any]:
    """The cache directory's name and the ExportConfig of the export ``backend`` (and
    ONNX Runtime's ``provider``) runs when made on first use, with the LoRAs, VAE and
    guidance of ``choices`` (None: the model as published, guided)."""
    from ...export.exporter import ExportConfig
    from ...export.specs import ShapeProfile

    # Calibrated (int8) on the sampling the export will run: the profile's scheduler, steps, guidance.
    made_for = choices or resolve(None, model=model, device=device, backend=backend, precision=precision)
    fields = export_fields(made_for, backend=backend, precision=precision)
    target = fields["target"]
    # ONNX Runtime's fused operators are its own: OpenVINO computes them differently, and
    # TensorRT (ONNX Runtime's tensorrt provider too) cannot parse them.
    tensorrt = target == "tensorrt" or provider == "tensorrt"  # engines built from the profile
    fuse = target == "onnx" and not tensorrt
    flavour = target if fuse or target != "onnx" else f"{target}-unfused"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-")[-48:]
    variant = Variant(choices.loras, choices.vae) if choices is not None else Variant()
    guidance = choices is None or choices.guidance > 1
    run_profile = choices.profile.name if choices is not None else "default"
    # The variant's files are hashed into the export's own key; here its names and scales suffice.
    described = [[lora.source, lora.scale] for lora in variant.loras], variant.vae
    described += () if guidance else ("no guidance",)
    described += () if run_profile == "default" else (run_profile,)
    described += () if max_width is None else (f"max width {max_width}",)
    branch = choices.deep_cache.branch if choices is not None and choices.deep_cache is not None else None
    described += () if branch is None else (f"DeepCache branch {branch}",)
    digest = hashlib.sha256(
        json.dumps([model, seed, flavour, precision, device, *described]).encode()
    ).hexdigest()[:12]
    config = ExportConfig(
        model=model,
        **fields,
        seed=seed,
        fuse=fuse,
        device=device,  # type: ignore[arg-type]
        variant=variant,
        run_profile=run_profile,
        # ONNX files take any width in the profile at no cost: up to 20.48 s clips. A
        # TensorRT engine is built and tuned for its range, native or built by ONNX
        # Runtime's TensorRT provider from the same profile, so both keep the default
        # (512 pixels); --max-width widens either.
        profile=ShapeProfile(
            max_width=max_width or (None if tensorrt else MAX_WIDTH),
            guidance=guidance,
            deep_cache_branch=branch,
        ),
    )
    return f"{name}-{flavour}-{device}-{precision}-{digest}", config
