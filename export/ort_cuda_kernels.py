"""What ONNX Runtime's CUDA kernels accept of the operators its fusions make.

ONNX Runtime's transformer optimizer fuses patterns without asking whether the CUDA
kernel of the fused operator takes the shapes at hand; the kernel then refuses them at
run time (NOT_IMPLEMENTED / INVALID_ARGUMENT). Each rule below states one kernel's limit,
the ONNX Runtime source it comes from, and the versions it holds for (read from the
shipped ``libonnxruntime_providers_cuda.so`` of onnxruntime-gpu 1.17.0 to 1.31.0, whose
limits and messages did not change over that range). ``violations`` walks a fused graph
against them; the exporter turns off a fusion whose operators a kernel would refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The widths BiasSplitGelu's kernel is instantiated for (its input's last axis, 2 x the
# hidden size): bias_split_gelu.cc, BiasSplitGelu<T>::ComputeInternal.
BIAS_SPLIT_GELU_WIDTHS = (2560, 5120, 6144, 10240, 12288)
# GroupNorm's kernel runs 2 channels a thread and at most 512 channels a block:
# group_norm_common_base.h (CHANNELS_PER_THREAD, kMaxSize).
GROUP_NORM_MAX_CHANNELS_PER_GROUP = 512


@dataclass(frozen=True)
class Rule:
    """One CUDA kernel's limit on the operator a fusion makes."""

    op: str  # the fused operator (com.microsoft domain)
    fusion: str  # the FusionOptions flag that makes it
    source: str  # the ONNX Runtime source stating the limit
    first: tuple[int, int]  # the oldest ONNX Runtime (major, minor) the rule is known for
    refuses: Callable[[Any, dict[str, Any]], str | None]  # (node, initializers) -> why, or None


def _length(initializers: dict[str, Any], name: str) -> int | None:
    tensor = initializers.get(name)
    return None if tensor is None or len(tensor.dims) != 1 else int(tensor.dims[0])


def _attribute(node: Any, name: str) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def _group_norm(node: Any, initializers: dict[str, Any]) -> str | None:
    channels, groups = _length(initializers, node.input[1]), _attribute(node, "groups")
    if channels is None or not groups:
        return f"{node.op_type} {node.name}: its gamma is not a 1-D constant or it has no groups"
    if channels % groups:
        return f"{node.op_type} {node.name}: {channels} channels in {groups} groups"
    per_group = channels // groups
    if per_group % 2 or per_group > GROUP_NORM_MAX_CHANNELS_PER_GROUP:
        return (
            f"{node.op_type} {node.name}: {per_group} channel(s) per group ({channels} / {groups}); "
            f"the kernel takes an even number up to {GROUP_NORM_MAX_CHANNELS_PER_GROUP}"
        )
    return None


def _bias_split_gelu(node: Any, initializers: dict[str, Any]) -> str | None:
    width = _length(initializers, node.input[1])
    if width not in BIAS_SPLIT_GELU_WIDTHS:
        allowed = ", ".join(map(str, BIAS_SPLIT_GELU_WIDTHS))
        return f"BiasSplitGelu {node.name}: width {width}; the kernel takes {allowed}"
    return None


GROUP_NORM_SOURCE = (
    "onnxruntime/contrib_ops/cuda/diffusion/group_norm_impl.cu, LaunchGroupNormKernel: NOT_IMPLEMENTED "
    "unless channels_per_group % CHANNELS_PER_THREAD (2) == 0 and channels_per_block <= kMaxSize (512); "
    "group_norm.cc, GroupNorm::ComputeInternal: channels divisible by groups"
)
RULES = (
    Rule("GroupNorm", "enable_group_norm", GROUP_NORM_SOURCE, (1, 17), _group_norm),
    Rule("SkipGroupNorm", "enable_skip_group_norm", GROUP_NORM_SOURCE, (1, 17), _group_norm),
    Rule(
        "BiasSplitGelu",
        "enable_bias_splitgelu",
        "onnxruntime/contrib_ops/cuda/diffusion/bias_split_gelu.cc, BiasSplitGelu<T>::ComputeInternal: "
        "INVALID_ARGUMENT 'hidden size should be 2560, 5120, 6144, 10240 or 12288'",
        (1, 17),
        _bias_split_gelu,
    ),
    # BiasAdd (enable_bias_add): no rule. Its kernel took 320, 640 or 1280 channels only
    # before 1.17 (bias_add.cc); from 1.17 BiasAddLargeKernel takes any count, and the
    # models extra requires onnxruntime >= 1.18.
)


def version_of(version: str) -> tuple[int, int]:
    major, minor = [*version.split("+")[0].split("."), "0"][:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@dataclass(frozen=True)
class Violation:
    fusion: str  # the FusionOptions flag whose operator the kernel refuses
    reason: str  # the node and its shapes
    source: str  # where ONNX Runtime states the limit


def violations(model: Any, onnxruntime_version: str) -> list[Violation]:
    """The fused operators in ``model`` (an onnx ModelProto) that the CUDA kernels of
    that ONNX Runtime version would refuse, in graph order."""
    version = version_of(onnxruntime_version)
    rules = {r.op: r for r in RULES if version >= r.first}
    initializers = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        rule = rules.get(node.op_type) if node.domain == "com.microsoft" else None
        reason = rule.refuses(node, initializers) if rule is not None else None
        if reason is not None:
            found.append(Violation(rule.fusion, reason, rule.source))
    return found
