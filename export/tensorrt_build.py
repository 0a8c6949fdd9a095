"""ONNX -> TensorRT engine for one stage, through polygraphy.

The optimization profile comes from the stage spec (min/opt/max of every input); a
static profile has min = opt = max, which lets the runtime capture CUDA graphs. The
timing cache (kernel timings TensorRT measured) is loaded before a build and written
back after, so later builds on the same GPU are faster. A built engine is verified on
the runtime the TensorRT backend uses (:func:`engine_runner`). TensorRT is an optional
extra: it is imported only here, only when a build is asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..kernels.errors import RiffusionError
from .specs import StageSpec
from .verify import Runner

log = logging.getLogger(__name__)

INSTALL = (
    "pip install 'riffusion-engine[tensorrt]' (CUDA 13; tensorrt-cu12 for CUDA 12) "
    "on a machine with an NVIDIA GPU"
)


# TensorRT 11 builds strongly typed networks only (BuilderFlag.FP16 and the other
# precision flags are gone), which the fp16 engine builds here do not do yet.
SUPPORTED_MAJOR = 10


def check_tensorrt_version(trt: Any) -> Any:
    """``trt`` if it is a TensorRT this engine supports (10.x), else one clear error."""
    version = str(getattr(trt, "__version__", "0"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major != SUPPORTED_MAJOR:
        raise RiffusionError(
            f"TensorRT {version} is installed; this engine supports TensorRT {SUPPORTED_MAJOR}.x "
            f"(pip install 'tensorrt>={SUPPORTED_MAJOR},<{SUPPORTED_MAJOR + 1}', as the tensorrt extra pins)"
        )
    return trt


def require_tensorrt() -> Any:
    """The tensorrt module (10.x), or one clear error saying what to install."""
    try:
        import polygraphy  # noqa: F401
        import tensorrt
    except ImportError as exc:
        raise RiffusionError(f"TensorRT is not installed ({exc.name} missing): {INSTALL}") from exc
    return check_tensorrt_version(tensorrt)


def optimization_profile(spec: StageSpec) -> Any:
    """A polygraphy Profile with every input's min/opt/max shape from the spec."""
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for tensor in spec.inputs:
        profile.add(tensor.name, min=tensor.size("min"), opt=tensor.size("opt"), max=tensor.size("max"))
    return profile


@dataclass(frozen=True)
class EngineOptions:
    """How an engine is built."""

    fp16: bool  # allow half-precision kernels (weights and activations)
    timing_cache: Path  # loaded if present, updated after the build
    optimization_level: int = 3  # TensorRT builder optimization level, 0..5

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise RiffusionError(f"optimization_level must be in 0..5, got {self.optimization_level}")

    def create_config(self, spec: StageSpec) -> Any:
        """polygraphy's CreateConfig for ``spec`` (plain Python until a build calls it)."""
        from polygraphy.backend.trt import CreateConfig

        return CreateConfig(
            fp16=self.fp16,
            tf32=self.fp16,  # an fp32 engine computes in fp32 (TF32 would miss fp32's tolerance)
            profiles=[optimization_profile(spec)],
            load_timing_cache=str(self.timing_cache) if self.timing_cache.is_file() else None,
            builder_optimization_level=self.optimization_level,
        )


def build_engine(onnx_path: Path, spec: StageSpec, engine_path: Path, options: EngineOptions) -> None:
    """Parse ``onnx_path``, build an engine with the spec's profile, write ``engine_path``."""
    require_tensorrt()
    from polygraphy.backend.trt import engine_from_network, network_from_onnx_path, save_engine

    # TensorRT 10's parser imports InstanceNormalization natively by default
    # (OnnxParserFlag.NATIVE_INSTANCENORM is on unless cleared).
    network = network_from_onnx_path(str(onnx_path))
    engine = engine_from_network(
        network, config=options.create_config(spec), save_timing_cache=str(options.timing_cache)
    )
    save_engine(engine, path=str(engine_path))


def engine_runner(
    engine_path: Path, spec: StageSpec, *, device: str = "cuda"
) -> tuple[Runner, Callable[[], None]]:
    """A runner over a built engine giving ``spec``'s outputs, and the call that releases it.

    It runs the engine as the TensorRT backend does (``tensorrt_engine.StageEngine`` over
    torch tensors on torch's CUDA stream), not through polygraphy's ``TrtRunner``: that one
    makes its own ``cuda.Stream()``, which loads libcudart through polygraphy's own search
    (``polygraphy/cuda/cuda.py``: ``LD_LIBRARY_PATH``, ``/usr/local/cuda/lib64``, ``/usr/lib``,
    ``/lib``, ``site-packages/nvidia/cuda_runtime/lib``, then ``libcudart.so``), and CUDA 13's
    wheels keep it in ``nvidia/cu13/lib/libcudart.so.13``, where that search does not look. The
    engine then ran on a machine whose CUDA comes from pip only, and its check did not.
    ``device``: where the tensors live (``cpu`` only with a stand-in runtime, in tests)."""
    trt = require_tensorrt()
    import torch

    from .tensorrt_engine import CudaStreams, InlineStreams, load_stage_engine

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    streams = CudaStreams() if device == "cuda" else InlineStreams()
    stage = load_stage_engine(runtime, engine_path, spec, static=False, streams=streams)
    target = torch.device(device)

    def run(feed: dict[str, Any]) -> list[Any]:
        inputs = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feed.items()}
        shapes = spec.output_shapes({name: tuple(value.shape) for name, value in feed.items()})
        outputs = stage.run(inputs, shapes, target)
        return [out.cpu().numpy() for out in outputs]

    def release() -> None:
        nonlocal stage
        stage = None  # type: ignore[assignment]  # the context, then its engine
        if device == "cuda":
            torch.cuda.empty_cache()

    return run, release
