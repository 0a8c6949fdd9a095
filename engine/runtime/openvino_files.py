"""Which of an export's files the openvino backend reads: what its loading checks the
hashes of (hashing a full-size export's every file takes seconds per GB)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def openvino_reads(directory: str | Path, precision: str) -> Callable[[str], bool] | None:
    """Which of an export's files the openvino backend reads in ``precision``: of an
    openvino export, :func:`ir_reads`; None (every file) for an ONNX export or an
    unreadable manifest, whose own loading says what is wrong."""
    from ...export.artifacts import ArtifactError, read_manifest

    try:
        if read_manifest(directory).get("target") != "openvino":
            return None
    except ArtifactError:
        return None
    return ir_reads(precision)


def ir_reads(precision: str) -> Callable[[str], bool]:
    """A predicate of an openvino export's file names: whether OpenVINO reads the file when
    running ``precision``: each stage's IR (the UNet's and the shallow stage's int8 IR when
    running int8, else their fp32 ones) and the support files, not the ONNX files beside them."""
    from ...export.manifest import INT8_SUFFIX
    from ...export.specs import SHALLOW

    def reads(name: str) -> bool:
        stage, _, rest = name.partition(".")
        if "/" in stage or not rest:
            return True  # a support file (tokenizer/, scheduler/)
        if rest.startswith("onnx"):
            return False
        if stage in ("unet", SHALLOW):  # their int8 IR, or their fp32 one
            return rest.startswith(INT8_SUFFIX.lstrip(".")) == (precision == "int8")
        return True

    return reads
