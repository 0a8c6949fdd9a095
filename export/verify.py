"""Verification of an exported stage against its torch module.

The exported stage (an ONNX Runtime session or a TensorRT engine) and the torch module
run on the spec's sample inputs, at its opt sizes and again at its min sizes (another
batch and width, which catches a dimension traced as a constant). Per output:
``max_abs = max |exported - torch|`` and ``max_rel = max_abs / max |torch|``. A stage
fails when an output is not finite or ``max_rel`` exceeds ``TOLERANCE[precision]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.errors import RiffusionError
from .specs import StageSpec

# Largest accepted max_rel per output. fp32: the runtimes differ from torch only in
# summation order and kernels (observed below 1e-5). fp16: half precision against
# torch in fp32 (observed 1e-3..1e-2 on the random presets).
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class VerificationError(RiffusionError):
    """An exported stage whose outputs differ from torch beyond the tolerance."""


@dataclass(frozen=True)
class Reference:
    """Sample inputs and the torch stage's outputs on them."""

    inputs: dict[str, np.ndarray]
    outputs: list[np.ndarray]


def torch_references(module: Any, spec: StageSpec, *, seed: int = 1) -> list[Reference]:
    """The torch outputs on the sample inputs at the spec's opt and min sizes. Computed
    once, so the torch weights can be released before the exported copy is checked."""
    references = []
    for which in ("opt", "min"):
        inputs = spec.sample_inputs(which=which, seed=seed)
        references.append(Reference(inputs, run_torch(module, spec, inputs)))
    return references


def verify_stage(
    run: Runner, spec: StageSpec, references: list[Reference], *, tolerance: float, runtime: str
) -> dict[str, dict[str, Any]]:
    """The worst errors per output over the references; raises VerificationError naming
    the stage and the output when over ``tolerance``."""
    report: dict[str, dict[str, Any]] = {}
    for reference in references:
        actual = run(reference.inputs)
        for name, got, want in zip(spec.output_names, actual, reference.outputs, strict=True):
            errors = compare(got, want, f"stage {spec.name}: output {name}")
            seen = report.get(name, {"max_abs": 0.0, "max_rel": 0.0})
            report[name] = {
                "max_abs": max(seen["max_abs"], errors["max_abs"]),
                "max_rel": max(seen["max_rel"], errors["max_rel"]),
                "tolerance": tolerance,
                "runtime": runtime,
            }
    for name, errors in report.items():
        if errors["max_rel"] > tolerance:
            raise VerificationError(
                f"stage {spec.name}: output {name} differs from torch by {errors['max_rel']:.2e} "
                f"(max |difference| / max |torch| in {runtime}; tolerance {tolerance:.0e})"
            )
    return report


def run_torch(module: Any, spec: StageSpec, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The torch module's outputs, as float32 arrays."""
    import torch

    with torch.no_grad():
        out = module(*(torch.from_numpy(inputs[name]) for name in spec.input_names))
    outs = out if isinstance(out, tuple | list) else (out,)
    return [o.float().numpy() for o in outs]


def compare(actual: np.ndarray, expected: np.ndarray, what: str) -> dict[str, float]:
    """``max_abs`` and ``max_rel`` of ``actual`` against ``expected``; VerificationError
    if the shapes differ or ``actual`` is not finite."""
    if actual.shape != expected.shape:
        raise VerificationError(f"{what} has shape {actual.shape}, torch gives {expected.shape}")
    if not np.isfinite(actual).all():
        bad = int((~np.isfinite(actual)).sum())
        raise VerificationError(f"{what} has {bad} inf/NaN values of {actual.size}")
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs}


def all_finite(run: Runner, spec: StageSpec) -> bool:
    """Whether the outputs on the opt-size sample inputs are all finite."""
    return all(bool(np.isfinite(out).all()) for out in run(spec.sample_inputs()))


def onnxruntime_runner(
    path: Any, output_names: list[str], *, provider: str = "CPUExecutionProvider"
) -> tuple[Runner, Any]:
    """A runner over an ONNX Runtime session of ``path`` giving ``output_names`` (and the session)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the fp16 casts ORT inserts on CPU are expected
    # The CUDA provider computes fp32 matrix products in TF32 by default: verify fp32 as fp32.
    settings = {"use_tf32": 0} if provider == "CUDAExecutionProvider" else {}
    session = ort.InferenceSession(str(path), options, providers=[(provider, settings)])
    if session.get_providers()[0] != provider:  # ONNX Runtime falls back instead of failing
        raise RiffusionError(f"ONNX Runtime could not run {provider} here (it fell back to the CPU)")
    return (lambda feed: session.run(output_names, feed)), session
