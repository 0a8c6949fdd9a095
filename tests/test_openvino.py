"""The openvino backend on random:tiny: an openvino export (unfused ONNX and OpenVINO IR)
made on first use, images against the torch backend (itself equal to diffusers), bf16 as an
approximation of fp32, an older unfused ONNX export, and the exports it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from riffusion_engine import load
from riffusion_engine.engine.runtime.pipeline import Engine
from riffusion_engine.engine.runtime.requests import PromptInput, Request
from riffusion_engine.kernels import RiffusionError

# Observed about 3e-6 against the torch backend on random:tiny; generous for other CPUs.
FP32_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def openvino_engine(cache) -> Engine:
    return load("random:tiny", backend="openvino", cache_dir=cache)


def images(engine: Engine, request: Request) -> np.ndarray:
    return engine.images([request]).cpu().numpy()


REQUEST = Request(PromptInput("a funky beat", 3, "noise", 7.0), steps=6)


def test_first_use_makes_an_openvino_export(openvino_engine, cache) -> None:
    (directory,) = [p for p in cache.iterdir() if p.is_dir()]
    assert "openvino" in directory.name
    manifest = json.loads((directory / "manifest.json").read_text())
    assert (manifest["target"], manifest["precision"]) == ("openvino", "fp32")
    for name, stage in manifest["stages"].items():
        assert not stage["fusions"] and stage["precision"] == "fp32"
        assert {f"{name}.onnx", f"{name}.xml", f"{name}.bin"} <= set(stage["files"])
        # The IR is verified against torch on OpenVINO itself, as the ONNX file on ONNX Runtime.
        assert set(stage["verification"]) == {"onnx", "openvino"}
        assert all(e["max_rel"] <= 1e-3 for e in stage["verification"]["openvino"].values())
    # The backend compiles the IR, and keeps what it compiled in the export's model cache.
    assert openvino_engine.backend.model_path("unet").name == "unet.xml"
    assert openvino_engine.backend.model_cache == directory / "openvino-cache"


@pytest.mark.long  # one more export
def test_an_unfused_onnx_export_still_runs(openvino_engine, torch_engine, tmp_path) -> None:
    """Exports made before the openvino target (unfused fp32 ONNX): compiled from ONNX."""
    from riffusion_engine.export.exporter import ExportConfig, export

    old = export(ExportConfig(model="random:tiny", fuse=False), tmp_path / "unfused", progress=False)
    engine = load(artifacts=old.directory, backend="openvino")
    assert engine.backend.model_path("unet").name == "unet.onnx"
    expected = images(torch_engine, REQUEST)
    assert np.abs(images(engine, REQUEST) - expected).max() <= FP32_TOLERANCE


def test_openvino_equals_the_torch_backend(openvino_engine, torch_engine) -> None:
    expected = images(torch_engine, REQUEST)
    got = images(openvino_engine, REQUEST)
    assert np.abs(got - expected).max() <= FP32_TOLERANCE
    assert (np.abs(np.round(got * 255) - np.round(expected * 255)) <= 1).mean() >= 0.99


def test_seed_image_batches_and_masks_run_through_openvino(openvino_engine, torch_engine) -> None:
    from riffusion_engine.engine.runtime.seeds import mask_image, seed_image

    requests = [
        Request(
            PromptInput("jazz", seed, denoising=0.6),
            PromptInput("organ", seed + 1, denoising=0.6),
            alpha,
            steps=6,
            seed_image=seed_image("og_beat"),
            mask=mask_image("mask_top_third_75"),
        )
        for seed, alpha in ((1, 0.2), (5, 0.7))
    ]
    got = openvino_engine.images(requests).numpy()
    expected = torch_engine.images(requests).numpy()
    assert np.abs(got - expected).max() <= FP32_TOLERANCE


def test_bf16_approximates_fp32(cache, openvino_engine) -> None:
    bf16 = load("random:tiny", backend="openvino", precision="bf16", cache_dir=cache)
    assert bf16.backend.inference_precision == "bf16"
    got = images(bf16, REQUEST)
    # What OpenVINO applied: on a CPU without bf16 instructions it keeps f32 whatever the hint.
    import openvino as ov

    applied = bf16.backend.request("unet").get_compiled_model().get_property("INFERENCE_PRECISION_HINT")
    if applied != ov.Type.bf16:
        pytest.skip(f"OpenVINO runs {applied.get_type_name()} here (this CPU has no bf16 instructions)")
    error = np.abs(got - images(openvino_engine, REQUEST)).max()
    # bf16 keeps 8 bits of mantissa: about 1e-2 of the [0, 1] image, and never exact.
    assert 0 < error < 0.1


def test_openvino_refuses_a_fused_export(tiny_export) -> None:
    with pytest.raises(RiffusionError, match=r"export --target openvino\) or an unfused fp32 ONNX export"):
        load(artifacts=tiny_export[0], backend="openvino")


def test_precisions_are_checked(tiny_export) -> None:
    with pytest.raises(RiffusionError, match="bf16 is the openvino backend's precision"):
        load(artifacts=tiny_export[0], backend="onnxruntime", precision="bf16")
    with pytest.raises(RiffusionError, match="fp32, bf16 or int8, not fp16"):
        load("random:tiny", backend="openvino", precision="fp16")
    with pytest.raises(RiffusionError, match="runs on --device cpu"):
        from riffusion_engine.engine.runtime.backends import OpenVinoBackend

        OpenVinoBackend(tiny_export[0], device="cuda")
