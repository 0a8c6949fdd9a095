"""OpenVINO's files of an export: each stage's IR, and the UNet quantized to int8.

- IR (``<stage>.xml`` + ``.bin``): the verified fp32 ONNX file converted by OpenVINO and
  checked again, on OpenVINO's CPU plugin in f32, against the same torch references. The
  openvino backend compiles these (its weights memory-mapped, its compiled models cached).
- int8 (``unet.int8.xml`` + ``.bin``): NNCF's post-training quantization of the UNet's IR,
  weights and activations, by a :class:`Scheme`, calibrated on the UNet inputs of the
  engine's own sampling (:mod:`.calibration`); then checked on held-out inputs against
  the fp32 stage's outputs, beside OpenVINO's bf16 arithmetic on the same inputs
  (:func:`check_int8`). An int8 UNet past the bound is refused with the numbers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..kernels.errors import RiffusionError
from .calibration import CalibrationSet, Sample
from .manifest import openvino_file
from .specs import StageSpec
from .verify import TOLERANCE, Reference, VerificationError, verify_stage

log = logging.getLogger(__name__)

# The int8 UNet's largest accepted error on held-out inputs: the root mean square of its
# difference from the fp32 stage's output, relative to that output's (rel_rms), over every
# held-out UNet call. OpenVINO's bf16 arithmetic's error on the same inputs is measured and
# recorded beside it, not bounded here: per call, int8's was 1.4x bf16's on random:full and
# 1.9x-2.4x on random:tiny's narrow UNet, while the broken quantizations the tests make land
# above 0.1. The precision gate (int8 at most twice bf16, against fp32) is bench's, on the
# clips' images end to end (engine/tools/bench.py, precision_gates).
INT8_TOLERANCE = 0.1


# OpenVINO's INFERENCE_PRECISION_HINT for the precision of the float operations.
INFERENCE_HINT = {"fp32": "f32", "bf16": "bf16"}


def require_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise RiffusionError(
            "an openvino export needs OpenVINO: pip install 'riffusion-engine[openvino]'"
        ) from exc
    return openvino


def require_nncf() -> Any:
    try:
        import nncf
    except ImportError as exc:
        raise RiffusionError(
            "an int8 export quantizes with NNCF: pip install 'riffusion-engine[openvino]'"
        ) from exc
    return nncf


def ir_path(directory: Path, stage: str, *, int8: bool = False) -> Path:
    return directory / openvino_file(stage, int8=int8)


def write_ir(onnx_path: Path, xml_path: Path) -> None:
    """Convert a stage's ONNX file to OpenVINO IR (fp32 weights: no fp16 compression).

    The steps of ``ov.convert_model`` for an ONNX file without options (the ONNX frontend's
    model, then the offline transformations of its ``moc_emit_ir``), which give the same
    IR, without the converter's usage telemetry: ``convert_model`` sends it to Google
    Analytics from a forked process unless the user opted out, and that child can
    deadlock in the resolver (the export runs offline) and hold up the process's exit."""
    ov = require_openvino()
    from openvino._offline_transformations import (
        apply_fused_names_cleanup,
        apply_moc_legacy_transformations,
        apply_moc_transformations,
        compress_quantize_weights_transformation,
    )

    model = ov.Core().read_model(str(onnx_path))
    apply_moc_transformations(model, cf=False, smart_reshape=True)
    compress_quantize_weights_transformation(model)
    apply_moc_legacy_transformations(model, [])
    apply_fused_names_cleanup(model)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


def compiled(xml_path: Path, precision: str = "fp32") -> Any:
    """An infer request of the IR compiled for the CPU in ``precision`` (fp32 or bf16)."""
    ov = require_openvino()
    hint = INFERENCE_HINT[precision]
    model = ov.Core().compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": hint})
    return model.create_infer_request()


def run_all(request: Any, samples: list[Sample]) -> list[np.ndarray]:
    outputs = []
    for sample in samples:
        request.infer(sample)
        outputs.append(request.get_output_tensor(0).data.copy())  # the request reuses its buffer
    return outputs


def verify_ir(xml_path: Path, spec: StageSpec, references: list[Reference]) -> dict[str, dict[str, Any]]:
    """The IR on OpenVINO's CPU plugin in f32 against the torch references (fp32's tolerance)."""
    request = compiled(xml_path)

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        request.infer(feed)
        return [request.get_output_tensor(i).data.copy() for i in range(len(spec.outputs))]

    return verify_stage(run, spec, references, tolerance=TOLERANCE["fp32"], runtime="openvino CPU f32")


# -- int8 ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """One recipe for NNCF's post-training quantization of the UNet (weights and
    activations to int8; weights symmetric per channel)."""

    name: str
    transformer: bool  # NNCF's ModelType.TRANSFORMER: asymmetric activations, its transformer patterns
    smooth_quant: bool  # SmoothQuant before quantizing the MatMuls (NNCF's alpha for TRANSFORMER, 0.95)
    # Left in float: "io" the first and last convolutions, "time" the time embedding and
    # every resnet's projection of it, "attention" the MatMuls of two activations (query
    # by key, and the softmax's probabilities by value), "text" the cross-attention's key
    # and value projections of the text embeddings, "shortcut" the resnets' 1x1 shortcut
    # convolutions of the up blocks' concatenated skip connections.
    ignored: tuple[str, ...] = ()
    hybrid: bool = False  # optimum-intel's "hybrid": MatMuls' weights int8 only, everything else quantized
    # Activation ranges: NNCF's mean of the samples' min and max, or "histogram" (the range
    # that minimizes the quantization error of the values' histogram)
    ranges: str = "mean_minmax"
    # Weights at 7 bits (NNCF's overflow fix) so that CPUs without VNNI, whose int8 dot
    # product (AVX2's vpmaddubsw) sums pairs of products in 16 bits, do not saturate: one
    # export runs alike on every CPU class.
    overflow_fix: bool = False
    about: str = ""


SCHEMES = {
    s.name: s
    for s in (
        Scheme("transformer", True, True, about="NNCF's transformer preset (SmoothQuant on MatMuls)"),
        Scheme(
            "hybrid",
            False,
            False,
            hybrid=True,
            about="optimum-intel's diffusion recipe: MatMul weights int8, convolutions and the rest "
            "quantized",
        ),
        Scheme(
            "selective",
            True,
            False,
            ignored=("io", "time", "attention", "shortcut"),
            ranges="histogram",
            overflow_fix=True,
            about="the transformer preset without SmoothQuant, histogram ranges; the first and last "
            "convolutions, the time embedding, attention's products and the skip connections' shortcut "
            "convolutions left in float; 7-bit weights, which no CPU's int8 arithmetic saturates",
        ),
    )
}
# The lowest held-out error of the schemes measured on random:full, as fast as the others
# (docs/performance.md, "int8 schemes"): the up blocks' shortcut convolutions take the raw
# concatenation of two skip connections, whose ranges differ, and quantized as one tensor they
# were most of the error.
DEFAULT_SCHEME = "selective"


def scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise RiffusionError(f"unknown int8 scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def _has_weights(op: Any) -> bool:
    """Whether a MatMul multiplies by a constant (a weight), possibly behind a Convert."""
    for port in range(op.get_input_size()):
        node = op.input_value(port).get_node()
        while node.get_type_name() in ("Convert", "FakeQuantize", "Reshape"):
            node = node.input_value(0).get_node()
        if node.get_type_name() == "Constant":
            return True
    return False


def ignored_ops(model: Any, groups: tuple[str, ...]) -> list[str]:
    """The names of the model's convolutions and MatMuls in the ``groups`` left in float."""
    names = []
    for op in model.get_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind not in ("Convolution", "MatMul"):
            continue
        if (
            ("io" in groups and ("/conv_in/" in name or "/conv_out/" in name))
            or ("time" in groups and ("/time_embedding/" in name or "/time_emb_proj/" in name))
            or ("attention" in groups and kind == "MatMul" and not _has_weights(op))
            or ("text" in groups and ("/attn2/to_k/" in name or "/attn2/to_v/" in name))
            or ("shortcut" in groups and "/conv_shortcut/" in name)
        ):
            names.append(name)
    return names


class _Counted:
    """The calibration samples as NNCF iterates them, each pass ticking a progress bar."""

    def __init__(self, samples: list[Sample], bar: Any) -> None:
        self.samples, self.bar = samples, bar

    def __iter__(self) -> Iterator[Sample]:
        for sample in self.samples:
            self.bar.update()  # as NNCF takes it: it stops after the last one without asking again
            yield sample

    def __len__(self) -> int:
        return len(self.samples)


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF's INFO log and its own progress bars (rich, on stdout) off: the export's bar counts."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def quantize_unet(
    fp32_xml: Path,
    int8_xml: Path,
    data: CalibrationSet,
    recipe: Scheme,
    *,
    progress: bool,
    stage: str = "unet",
) -> dict[str, Any]:
    """The int8 IR of the UNet (or of DeepCache's ``stage``) at ``int8_xml``, quantized from
    ``fp32_xml`` on ``data.samples``. Returns what was done (scheme, NNCF's version, ops
    left in float, seconds)."""
    from importlib.metadata import version

    from tqdm.auto import tqdm

    ov = require_openvino()
    nncf = require_nncf()
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    begin = time.perf_counter()
    model = ov.Core().read_model(str(fp32_xml))
    passes = 2 if recipe.smooth_quant else 1  # NNCF's statistics passes over the samples
    options: dict[str, Any] = {}
    if not recipe.smooth_quant:
        options["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
    if recipe.ranges == "histogram":
        options["activations_range_estimator_params"] = RangeEstimatorParametersSet.HISTOGRAM
    if recipe.overflow_fix:
        options["overflow_fix"] = OverflowFix.ENABLE
    ignored = ignored_ops(model, recipe.ignored)
    with (
        tqdm(
            total=passes * len(data.samples),
            desc=f"{stage} int8" if stage != "unet" else "int8 calibration",
            unit="call",
            disable=not progress,
        ) as bar,
        _quiet_nncf(),
    ):
        dataset = nncf.Dataset(_Counted(data.samples, bar))
        if recipe.hybrid:
            # optimum-intel's hybrid: MatMuls with weights keep int8 weights only (computed
            # in float), the convolutions and the other operations are quantized.
            ignored += [
                op.get_friendly_name()
                for op in model.get_ops()
                if op.get_type_name() == "MatMul" and _has_weights(op)
            ]
            model = nncf.compress_weights(
                model,
                mode=nncf.CompressWeightsMode.INT8_ASYM,
                ignored_scope=nncf.IgnoredScope(types=["Convolution"]),
            )
        quantized = nncf.quantize(
            model,
            dataset,
            model_type=nncf.ModelType.TRANSFORMER if recipe.transformer else None,
            subset_size=len(data.samples),
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
            advanced_parameters=AdvancedQuantizationParameters(**options) if options else None,
        )
    # save_model stores the quantized weights as int8 (a quarter of the fp32 file).
    ov.save_model(quantized, str(int8_xml), compress_to_fp16=False)
    return {
        "scheme": asdict(recipe),
        "nncf": version("nncf"),
        "ops_in_float": len(ignored),
        "seconds": round(time.perf_counter() - begin, 2),
    }


def errors(outputs: list[np.ndarray], references: list[np.ndarray]) -> dict[str, float]:
    """Over every held-out call: ``rel_rms`` (root mean square of the difference relative
    to the reference's) and ``max_rel`` (largest difference relative to the largest value)."""
    if len(outputs) != len(references):
        raise VerificationError(f"{len(outputs)} outputs for {len(references)} references")
    squares = reference_squares = 0.0
    max_abs = max_ref = 0.0
    for got, want in zip(outputs, references, strict=True):
        if got.shape != want.shape:
            raise VerificationError(f"int8 UNet output has shape {got.shape}, fp32 gives {want.shape}")
        if not np.isfinite(got).all():
            raise VerificationError(f"int8 UNet output has {int((~np.isfinite(got)).sum())} inf/NaN values")
        diff = got.astype(np.float64) - want.astype(np.float64)
        squares += float((diff**2).sum())
        reference_squares += float((want.astype(np.float64) ** 2).sum())
        max_abs = max(max_abs, float(np.abs(diff).max()))
        max_ref = max(max_ref, float(np.abs(want).max()))
    return {
        "rel_rms": (squares / reference_squares) ** 0.5 if reference_squares else squares**0.5,
        "max_rel": max_abs / max_ref if max_ref else max_abs,
    }


def check_int8(
    int8_xml: Path,
    fp32_xml: Path,
    data: CalibrationSet,
    *,
    float_precision: str,
    bf16: bool,
    tolerance: float = INT8_TOLERANCE,
    stage: str = "unet",
) -> dict[str, Any]:
    """The int8 UNet on the held-out inputs against the fp32 stage's outputs there, and
    (``bf16``: the CPU computes bf16) OpenVINO's bf16 arithmetic on the fp32 IR beside it.
    ``float_precision``: what the int8 IR's float operations run in (the best the CPU has).
    Raises VerificationError, with the numbers, past the bound."""
    references = data.held_out_outputs
    report: dict[str, Any] = {
        "held_out_samples": len(data.held_out),
        "int8": errors(run_all(compiled(int8_xml, float_precision), data.held_out), references),
        "runtime": f"openvino CPU, int8 with {float_precision}",
    }
    report["bf16"] = errors(run_all(compiled(fp32_xml, "bf16"), data.held_out), references) if bf16 else None
    report["bound"] = tolerance
    got = report["int8"]["rel_rms"]
    if got > tolerance:
        against = "" if report["bf16"] is None else f"; bf16's is {report['bf16']['rel_rms']:.2e}"
        raise VerificationError(
            f"stage {stage}: the int8 UNet differs from the fp32 stage by {got:.2e} (relative RMS over "
            f"{len(data.held_out)} held-out calls; max relative {report['int8']['max_rel']:.2e}{against}); "
            f"the bound is {tolerance:g}: not exported"
        )
    return report


def computes_bf16(core: Any = None) -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 arithmetic here (its optimization
    capabilities, asked of ``core`` or a new ``openvino.Core``)."""
    core = core or require_openvino().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def make_int8(
    work: Path,
    stage: str,
    record: dict[str, Any],
    data: CalibrationSet,
    plan: Any,
    recipe: Scheme,
    *,
    progress: bool,
) -> dict[str, Any]:
    """The manifest ``record`` of ``stage`` (the UNet, or DeepCache's shallow stage) once
    its int8 IR is made in ``work`` and checked: NNCF quantizes it on ``data.samples`` (the
    engine's sampling on the fp32 export in ``work``), the held-out ones check the result."""
    from . import artifacts

    fp32_xml, int8_xml = ir_path(work, stage), ir_path(work, stage, int8=True)
    quantized = quantize_unet(fp32_xml, int8_xml, data, recipe, progress=progress, stage=stage)
    bf16 = computes_bf16()
    check = check_int8(
        int8_xml, fp32_xml, data, float_precision="bf16" if bf16 else "fp32", bf16=bf16, stage=stage
    )
    log.info(
        "%s int8: relative RMS %.2e against fp32 on %d held-out calls (bf16: %s; bound %g)",
        stage,
        check["int8"]["rel_rms"],
        len(data.held_out),
        "n/a" if check["bf16"] is None else f"{check['bf16']['rel_rms']:.2e}",
        check["bound"],
    )
    names = sorted(p.name for p in work.iterdir() if p.is_file() and p.name.split(".")[0] == stage)
    return {
        **record,
        "files": {name: artifacts.file_record(work / name) for name in names},
        "int8": {
            **quantized,
            "calibration": {**plan.key_fields(), **data.describe()},
            "verification": check,
        },
    }


def fp32_outputs(xml_path: Path) -> Any:
    """A function of samples giving the fp32 IR's first output on each."""
    return lambda samples: run_all(compiled(xml_path), samples)
