"""torch -> ONNX for one stage: export with the spec's dynamic axes, shape inference,
ONNX Runtime's transformer fusions and fp16 conversion. Verification is in ``verify``."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .specs import StageSpec

log = logging.getLogger(__name__)

# A single protobuf is limited to 2 GiB; larger models keep their weights beside it.
PROTOBUF_LIMIT = 2**31 - 1

# ONNX Runtime optimizer fusions whose operators only have CUDA kernels.
CUDA_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_bias_add",
)
# MultiHeadAttention with packed QKV / KV inputs: CUDA only, and only in fp16 (ONNX
# Runtime's own Stable Diffusion optimizer enables them for fp16 alone; its CUDA
# kernels for the packed layouts are fp16 kernels on many GPUs).
PACKED_ATTENTION_FUSIONS = ("enable_packed_qkv", "enable_packed_kv")


def export_stage(module: Any, spec: StageSpec, path: Path, *, opset: int) -> None:
    """Trace ``module`` on the spec's sample inputs into ``path`` (with dynamic axes),
    then run ONNX shape inference; weights over 2 GiB go to ``path``.data."""
    import onnx
    import torch

    sample = spec.sample_inputs()
    args = tuple(torch.from_numpy(sample[name]) for name in spec.input_names)
    raw = path.with_name(f"{path.stem}.raw") / path.name  # the exporter may write one file per weight
    raw.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of torch.export, which takes
        # about 10x longer on these models and whose graphs ONNX Runtime's diffusion
        # fusions do not yet match.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(raw),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.shape_inference.infer_shapes_path(str(raw), str(raw))
    save_model(onnx.load(str(raw)), path)
    shutil.rmtree(raw.parent, ignore_errors=True)


def save_model(model: Any, path: Path) -> None:
    """Save an ONNX ModelProto, weights external (``<name>.data``) when over 2 GiB."""
    import onnx

    large = proto_too_large(model)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
    )


def proto_too_large(model: Any) -> bool:
    """Whether the model's weights alone pass the 2 GiB protobuf limit (``ByteSize``
    itself fails on such a model)."""
    total = 0
    for tensor in model.graph.initializer:
        fields = (tensor.float_data, tensor.int32_data, tensor.int64_data, tensor.double_data)
        total += len(tensor.raw_data) if tensor.HasField("raw_data") else 8 * sum(len(f) for f in fields)
    return total > PROTOBUF_LIMIT - (64 << 20)  # room for the graph itself


def fusion_options(model_type: str, *, cuda: bool, fp16: bool, without: tuple[str, ...] = ()) -> Any:
    """ONNX Runtime's FusionOptions for a stage that will run on CUDA (``cuda``) or on the
    CPU: the CUDA-only fusions only for CUDA, the packed attention layouts only for fp16
    on CUDA; never the flags in ``without``."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    disabled = () if cuda else CUDA_ONLY_FUSIONS
    if not (cuda and fp16):
        disabled += PACKED_ATTENTION_FUSIONS
    for flag in (*disabled, *without):
        setattr(options, flag, False)
    return options


@dataclass
class Optimized:
    fusions: dict[str, int]  # fused operator -> count
    refused: dict[str, str]  # CUDA fusion flag left out -> the kernel limit its operator broke


def optimize(source: Path, spec: StageSpec, path: Path, *, fuse: bool, fp16: bool, cuda: bool) -> Optimized:
    """``source`` -> ``path`` through ONNX Runtime's transformer optimizer. With ``fuse``:
    attention, layer norm and GELU fusions, and when ``cuda`` (the export's target device)
    also the CUDA-only GroupNorm, NHWC conv and bias-split-GELU fusions (see
    :func:`fusion_options`), each kept only where the installed ONNX Runtime's CUDA kernel
    takes the shapes it fused (``ort_cuda_kernels``); a fusion whose operators a kernel
    would refuse is left out of the stage. With ``fp16``: half precision inside, fp32
    inputs and outputs."""
    import onnx
    import onnxruntime
    from onnxruntime.transformers.onnx_model import OnnxModel

    from .ort_cuda_kernels import violations

    refused: dict[str, str] = {}
    with _quiet_ort_logging():
        if fuse:
            for _ in range(len(CUDA_ONLY_FUSIONS) + 1):
                options = fusion_options(spec.model_type, cuda=cuda, fp16=fp16, without=tuple(refused))
                model = fuse_graph(source, spec.model_type, options, cuda=cuda)
                found = violations(model.model, onnxruntime.__version__) if cuda else []
                if not found:
                    break
                # A flag already left out cannot have made the operator again.
                assert all(v.fusion not in refused for v in found), found
                for v in found:
                    refused.setdefault(v.fusion, f"{v.reason} ({v.source})")
            for flag, why in refused.items():
                log.info("%s: %s left out: %s", spec.name, flag, why)
            fusions = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
        else:
            model, fusions = OnnxModel(onnx.load(str(source))), {}
        if fp16:
            model.convert_float_to_float16(keep_io_types=True)
        large = proto_too_large(model.model)
        model.save_model_to_file(str(path), use_external_data_format=large, all_tensors_to_one_file=True)
    return Optimized(fusions, refused)


def fuse_graph(source: Path, model_type: str, options: Any, *, cuda: bool) -> Any:
    """ONNX Runtime's transformer optimizer on ``source`` with ``options`` (its OnnxModel)."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _numpy2_num_heads():
        return optimize_model(
            str(source), model_type=model_type, opt_level=0, optimization_options=options, use_gpu=cuda
        )


@contextlib.contextmanager
def _numpy2_num_heads() -> Iterator[None]:
    """ONNX Runtime's UNet attention fusion (up to at least 1.32) reads the head count
    with ``int()`` of a one-element array, which NumPy 2.4 refuses; read it with
    ``.item()`` for the duration of the optimization."""
    module = sys.modules.get("fusion_attention_unet")  # the optimizer imports it top-level
    if module is None:
        yield
        return
    fusion = module.FusionAttentionUnet
    original = fusion.get_num_heads

    def get_num_heads(self: Any, reshape_q: Any, is_torch2: bool = False) -> int:
        try:
            return original(self, reshape_q, is_torch2)
        except TypeError:
            parent = self.model.get_parent(reshape_q, 1)
            value = self.model.get_constant_value(parent.input[2]) if parent is not None else None
            return int(np.asarray(value).reshape(-1)[0]) if value is not None and np.size(value) == 1 else 0

    fusion.get_num_heads = get_num_heads
    try:
        yield
    finally:
        fusion.get_num_heads = original


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """The optimizer logs every fusion at INFO and draws its own progress bar on stderr;
    the export shows its own progress, so keep both quiet (warnings still reach the log)."""
    prefixes = ("onnx_model", "fusion_", "onnxruntime", "float16", "shape_infer")
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith(prefixes)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
