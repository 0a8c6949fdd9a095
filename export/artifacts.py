"""Export directories as the runtime reads them: the manifest and its integrity check.

An export directory holds one file per stage (``text_encoder.onnx``, ``unet.onnx``, ...;
``*.onnx.data`` for external weights; ``*.plan`` for TensorRT engines; ``*.xml``/``*.bin``
for OpenVINO IR) and a ``manifest.json`` written last; the openvino backend keeps its
compiled models in ``openvino-cache/`` beside them (not part of the export). The
manifest's schema (``format`` 1)::

    format          1
    cache_key       sha256 over every field that decides the artifacts' content (below)
    key_fields      those fields: model content hash, target, device, precision, opset,
                    fusion, shape profile, stages, tool versions, GPU (cuda exports),
                    OpenVINO's version (openvino target), and for int8 NNCF's version,
                    the scheme and the calibration plan (its prompts' text hashed)
    model           {"id": what the user named, "content_hash": sha256 of the source,
                     "pixel_multiple": image sizes the exported UNet takes are multiples of it}
    target          "onnx" | "tensorrt" | "openvino" (unfused ONNX plus OpenVINO IR, <stage>.xml/.bin)
    device          "cpu" | "cuda": where the export runs (cuda: CUDA-only fusions; absent in
                    exports made before it was recorded, which count as cpu)
    precision       "fp32" | "fp16" | "int8" (requested; each stage records what it got: an int8
                    export's stages are fp32, its UNet also int8, unet.int8.xml)
    opset           ONNX opset
    profile         {"height", "width", "max_width", "max_batch", "static"}
    tools           {"torch", "onnx", "onnxruntime", "diffusers", "transformers", "tensorrt"}
    gpu             {"name", "compute_capability"} or null
    stages          {name: {"precision", "fallback" (why fp16 was refused, or null),
                            "fusions" ({op: count}), "fusions_refused" ({CUDA fusion flag:
                            the kernel limit its operator broke}), "spec" (inputs/outputs, dims with
                            min/opt/max), "files" ({file: {"sha256", "bytes"}}),
                            "verification" ({runtime: {output: {"max_abs", "max_rel",
                            "tolerance", "runtime"}}}), "seconds",
                            "int8" (the UNet of an int8 export: "scheme", "nncf", "ops_in_float",
                            "seconds", "calibration" (the plan, its prompts hashed, and the
                            inputs' sha256 and counts), "verification" ({"int8", "bf16":
                            {"rel_rms", "max_rel"} on held-out calls against the fp32 stage,
                            "bound", "held_out_samples", "runtime"}))}}
    support_files   {path: {"sha256", "bytes"}}: tokenizer/ and scheduler/ for the runtime
    created         ISO 8601 time of writing

The runtime only reads this module; it never imports the exporter.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import Any

from ..kernels.errors import RiffusionError

MANIFEST = "manifest.json"
FORMAT = 1
TOOLS = ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "tensorrt")


class ArtifactError(RiffusionError):
    """An export directory that is missing, incomplete or corrupt."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def cache_key(fields: dict[str, Any]) -> str:
    """sha256 of the fields in canonical JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tool_versions(names: tuple[str, ...] = TOOLS) -> dict[str, str | None]:
    """Installed versions by import name (None where not installed), read from the
    distribution that installs the module: ``tensorrt`` comes from ``tensorrt-cu13`` (or
    ``tensorrt-cu12``, or the ``tensorrt`` front package), ``onnxruntime`` from
    ``onnxruntime`` or ``onnxruntime-gpu``. Without the module's version in the key, an
    upgraded TensorRT would take the old engines as a cache hit, which it cannot load."""
    owners = packages_distributions()
    found: dict[str, str | None] = {}
    for name in names:
        found[name] = None
        # The distributions that install the module, then the name itself (metadata
        # without a top_level.txt or RECORD).
        for candidate in (*sorted(owners.get(name, ())), name):
            try:
                found[name] = version(candidate)
                break
            except PackageNotFoundError:
                continue
    return found


def gpu_info() -> dict[str, str] | None:
    """The CUDA GPU torch sees (name, compute capability), or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an export directory; ArtifactError if there is none or it is unreadable."""
    path = Path(directory) / MANIFEST
    if not Path(directory).exists():
        raise ArtifactError(f"export directory {str(directory)!r} does not exist")
    if not Path(directory).is_dir():
        raise ArtifactError(f"{str(directory)!r} is a file, not an export directory")
    if not path.is_file():
        raise ArtifactError(f"{str(directory)!r} is not a complete export directory: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{str(path)!r} is not a format-{FORMAT} manifest")
    return manifest


def damaged_files(
    directory: str | os.PathLike[str], manifest: dict[str, Any], reads: Callable[[str], bool] | None = None
) -> list[str]:
    """Stage and support files that are missing or whose size or sha256 differs from the
    manifest: every file, or those ``reads`` says a backend reads (hashing a full-size
    export's every file takes seconds per GB)."""
    directory = Path(directory)
    damaged = []
    records = [f for stage in manifest["stages"].values() for f in stage["files"].items()]
    records += list(manifest.get("support_files", {}).items())
    for name, record in records:
        if reads is not None and not reads(name):
            continue
        path = directory / name
        if (
            not path.is_file()
            or path.stat().st_size != record["bytes"]
            or sha256_file(path) != record["sha256"]
        ):
            damaged.append(name)
    return damaged


def load_manifest(
    directory: str | os.PathLike[str], *, check_files: bool | Callable[[str], bool] = True
) -> dict[str, Any]:
    """The manifest, after checking every stage file against its recorded hash (or those
    ``check_files`` says a backend reads, when it is a predicate of the file's name)."""
    manifest = read_manifest(directory)
    if check_files:
        damaged = damaged_files(directory, manifest, None if check_files is True else check_files)
        if damaged:
            raise ArtifactError(
                f"export {str(directory)!r} is damaged: {', '.join(damaged)} missing or changed since "
                f"export (sha256 mismatch); export again"
            )
    return manifest
