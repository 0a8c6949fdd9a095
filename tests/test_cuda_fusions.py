"""CUDA fusions against what ONNX Runtime's CUDA kernels take (runs on the CPU).

ONNX Runtime's optimizer fuses GroupNorm and BiasSplitGelu whatever the shapes; its CUDA
kernels then refuse some of them at run time. The oracle is the kernels' own limits as
ONNX Runtime's sources state them (``export/ort_cuda_kernels.py`` names each source):
random:tiny's graphs, fused for CUDA without the check, hold nodes that break them, and
the exporter's graphs hold none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import helper  # noqa: E402
from riffusion_engine.export.models import load_components  # noqa: E402
from riffusion_engine.export.onnx_export import (  # noqa: E402
    CUDA_ONLY_FUSIONS,
    export_stage,
    fuse_graph,
    fusion_options,
    optimize,
)
from riffusion_engine.export.ort_cuda_kernels import RULES, violations  # noqa: E402
from riffusion_engine.export.specs import ModelDims, ShapeProfile, stage_specs  # noqa: E402
from riffusion_engine.export.stages import stage_module  # noqa: E402


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """random:tiny's UNet and VAE decoder as plain ONNX graphs, with their specs."""
    components = load_components("random:tiny")
    specs = stage_specs(ModelDims.of(components), ShapeProfile())
    out = tmp_path_factory.mktemp("plain")
    made = {}
    for name in ("unet", "vae_decoder"):
        path = out / f"{name}.onnx"
        export_stage(stage_module(components, name), specs[name], path, opset=17)
        made[name] = (path, specs[name])
    return made


@pytest.fixture(scope="module")
def unchecked(plain) -> dict[str, object]:
    """Every CUDA fusion ONNX Runtime's optimizer makes, as the exporter made them before
    it checked them against the kernels."""
    made = {}
    for name, (path, spec) in plain.items():
        options = fusion_options(spec.model_type, cuda=True, fp16=False)
        made[name] = fuse_graph(path, spec.model_type, options, cuda=True).model
    return made


def test_unchecked_cuda_fusions_make_nodes_the_kernels_refuse(unchecked) -> None:
    found = {name: {v.fusion for v in violations(m, ort.__version__)} for name, m in unchecked.items()}
    # The tiny VAE's 16 channels in 16 groups (1 a group); the tiny UNet's feed-forward
    # widths 256 and 512 (BiasSplitGelu takes 2560 and up).
    assert "enable_group_norm" in found["vae_decoder"] | found["unet"]
    assert "enable_bias_splitgelu" in found["unet"]


@pytest.mark.parametrize("stage", ["unet", "vae_decoder"])
def test_cuda_export_keeps_only_fusions_the_kernels_take(
    plain, unchecked, tmp_path: Path, stage: str
) -> None:
    path, spec = plain[stage]
    out = tmp_path / f"{stage}.onnx"
    result = optimize(path, spec, out, fuse=True, fp16=False, cuda=True)
    fused = onnx.load(str(out))
    assert violations(fused, ort.__version__) == []
    assert set(result.refused) == {v.fusion for v in violations(unchecked[stage], ort.__version__)}
    for flag, why in result.refused.items():
        assert "onnxruntime/contrib_ops/cuda/" in why, (flag, why)
    # The other CUDA fusions stay: NHWC convolutions in both graphs.
    assert result.fusions.get("NhwcConv", 0) > 0
    assert set(result.refused) < set(CUDA_ONLY_FUSIONS)


def test_a_cpu_export_is_not_checked_against_cuda_kernels(plain, tmp_path: Path) -> None:
    path, spec = plain["vae_decoder"]
    result = optimize(path, spec, tmp_path / "v.onnx", fuse=True, fp16=False, cuda=False)
    assert result.refused == {}


def _graph(node, initializers) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", [], [], initializer=initializers)
    return helper.make_model(graph)


def _vector(name: str, length: int):
    return helper.make_tensor(name, onnx.TensorProto.FLOAT, [length], [1.0] * length)


def group_norm(channels: int, groups: int, op: str = "GroupNorm") -> onnx.ModelProto:
    inputs = ["x", "gamma", "beta"] + (["skip", "bias"] if op == "SkipGroupNorm" else [])
    node = helper.make_node(op, inputs, ["y"], name="gn", domain="com.microsoft", groups=groups)
    return _graph(node, [_vector("gamma", channels), _vector("beta", channels)])


def bias_split_gelu(width: int) -> onnx.ModelProto:
    node = helper.make_node("BiasSplitGelu", ["x", "bias"], ["y"], name="bsg", domain="com.microsoft")
    return _graph(node, [_vector("bias", width)])


@pytest.mark.parametrize("op", ["GroupNorm", "SkipGroupNorm"])
@pytest.mark.parametrize(
    ("channels", "groups", "refused"),
    [
        (320, 32, False),  # Riffusion v1's UNet: 10 channels a group
        (1280, 32, False),  # 40
        (128, 32, False),  # its VAE: 4
        (16, 16, True),  # 1 a group: odd
        (96, 32, True),  # 3: odd
        (1024, 2, False),  # 512: the largest block
        (2048, 2, True),  # 1024: over 512
        (100, 32, True),  # channels not divisible by groups
    ],
)
def test_group_norm_rule(op: str, channels: int, groups: int, refused: bool) -> None:
    assert bool(violations(group_norm(channels, groups, op), "1.31.0")) is refused


@pytest.mark.parametrize("width", [2560, 5120, 6144, 10240, 12288, 256, 512, 1280, 20480])
def test_bias_split_gelu_rule(width: int) -> None:
    found = violations(bias_split_gelu(width), "1.31.0")
    assert bool(found) is (width not in (2560, 5120, 6144, 10240, 12288))
    assert all(v.fusion == "enable_bias_splitgelu" for v in found)


def test_every_rule_names_its_source_and_an_optimizer_flag() -> None:
    options = fusion_options("unet", cuda=True, fp16=False)
    for rule in RULES:
        assert rule.source.startswith("onnxruntime/contrib_ops/cuda/diffusion/"), rule
        assert rule.fusion in CUDA_ONLY_FUSIONS and hasattr(options, rule.fusion), rule
