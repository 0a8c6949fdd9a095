"""ONNX Runtime's TensorRT execution provider: which exports it can run, the libraries it
loads, and its options from a stage's spec. The native TensorRT backend runs engines with
``export/tensorrt_engine.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...export.manifest import Manifest
from ...export.specs import StageSpec, Which
from ...kernels.errors import RiffusionError


def check_export_for_provider(manifest: Manifest, provider: str) -> None:
    """One clear error for an export the provider cannot run: TensorRT parses standard ONNX
    operators only, so ONNX Runtime would split a fused export around its com.microsoft
    operators, and the split pieces' dynamic inputs have no profile (EP_FAIL "User needs
    to provide all the dynamic shape inputs with associated profiles",
    tensorrt_execution_provider.cc)."""
    fused = sorted({op for stage in manifest.stages.values() for op in stage.fusions})
    if provider == "tensorrt" and fused:
        raise RiffusionError(
            f"export {str(manifest.directory)!r} holds ONNX Runtime's fused operators ({', '.join(fused)}), "
            "which TensorRT cannot parse; the tensorrt provider runs an unfused export "
            "(riffusion-engine export --no-fuse)"
        )


def load_tensorrt_libraries() -> None:
    """Make TensorRT's libraries loadable for ONNX Runtime's TensorRT provider.

    ``libonnxruntime_providers_tensorrt.so`` links ``libnvinfer.so.10`` and
    ``libnvonnxparser.so.10`` and has no RUNPATH, while pip's TensorRT keeps them in
    ``site-packages/tensorrt_libs``: ``import tensorrt`` imports ``tensorrt_libs``, whose
    ``__init__`` loads every library there with ``ctypes.CDLL``, and the dynamic loader then
    resolves the provider's needs by soname from the libraries already loaded. Without it
    the provider fails to load ("libnvinfer.so.10: cannot open shared object file") and
    ONNX Runtime falls back to the CUDA provider, which ``session`` refuses."""
    from ...export.tensorrt_build import check_tensorrt_version

    try:
        import tensorrt
    except ImportError as exc:
        raise RiffusionError(
            "ONNX Runtime's TensorRT provider needs TensorRT's libraries (libnvinfer.so.10), which "
            "pip's TensorRT brings: pip install 'riffusion-engine[tensorrt]'"
        ) from exc
    check_tensorrt_version(tensorrt)


def tensorrt_provider_options(spec: StageSpec, *, cache: Path, fp16: bool) -> dict[str, Any]:
    """ONNX Runtime TensorRT execution provider options for a stage:
    min/opt/max shapes of every input ("name:2x4x64x64,..."), fp16, and the engine and
    timing caches in ``cache`` so sessions do not rebuild engines at each start."""

    def shapes(which: Which) -> str:
        return ",".join(
            f"{name}:{'x'.join(map(str, shape))}" for name, shape in spec.input_shapes(which).items()
        )

    return {
        "trt_profile_min_shapes": shapes("min"),
        "trt_profile_opt_shapes": shapes("opt"),
        "trt_profile_max_shapes": shapes("max"),
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }
