"""The realtime profile on CUDA, and the GPU paths' third read (``pytest -m gpu``).

The realtime profile (a fused few-step LoRA, LCM or TCD, guidance off, TAESD, fp16 on
CUDA) on random:tiny against the torch fp32 run of the same profile on the same GPU; the
torch backend's fp16 UNet against diffusers' own at a fractional timestep; TensorRT's
version in the export cache key, engines verified without polygraphy's CUDA runtime,
and a blend's texts in parts the text encoder's engine takes.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

from conftest import needs, needs_provider  # noqa: E402
from riffusion_engine import load  # noqa: E402
from riffusion_engine.engine.runtime.requests import Blend, PromptInput, Request  # noqa: E402

FP16 = 0.1  # largest |difference| of the [0, 1] images from the fp32 run


def realtime_requests(count: int, scheduler: str = "lcm") -> list[Request]:
    return [
        Request(
            PromptInput("a funky beat", seed=i + 1, guidance=1.0),
            PromptInput("church bells", seed=i + 11, guidance=1.0),
            0.3 * i,
            steps=4,
            scheduler=scheduler,
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def fp32():
    """The realtime profile's torch fp32 images on this GPU, by (requests, scheduler)."""
    engine = load("random:tiny", backend="torch", device="cuda", profile="realtime", precision="fp32")
    cache: dict[tuple[int, str], np.ndarray] = {}

    def images(count: int, scheduler: str = "lcm") -> np.ndarray:
        if (count, scheduler) not in cache:
            cache[(count, scheduler)] = (
                engine.images(realtime_requests(count, scheduler)).float().cpu().numpy()
            )
        return cache[(count, scheduler)]

    return images


def worst(engine, fp32, scheduler: str = "lcm", counts=(1, 3)) -> float:
    errors = []
    for n in counts:
        got = engine.images(realtime_requests(n, scheduler)).float().cpu().numpy()
        errors.append(float(np.abs(got - fp32(n, scheduler)).max()))
    return max(errors)


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_realtime_profile_on_torch_fp16(fp32, scheduler: str) -> None:
    """fp16 on CUDA by the profile: the fused LoRA's UNet and TAESD in fp16, guidance off."""
    engine = load("random:tiny", backend="torch", device="cuda", profile="realtime")
    choices = engine.choices
    assert choices.precision == "fp16" and choices.vae == "tiny" and choices.loras and engine.guidance <= 1
    assert next(engine.backend.modules["vae_decoder"].parameters()).dtype == torch.float16
    assert worst(engine, fp32, scheduler) <= FP16


def test_realtime_profile_on_onnxruntime_cuda(fp32, tmp_path: Path) -> None:
    needs_provider("CUDAExecutionProvider")
    engine = load("random:tiny", backend="onnxruntime", device="cuda", profile="realtime", cache_dir=tmp_path)
    assert engine.backend.manifest.raw["precision"] == "fp16"
    assert worst(engine, fp32) <= FP16


def test_realtime_profile_on_tensorrt_runs_batches_past_its_optimum(fp32, tmp_path: Path) -> None:
    """The guidance-off export's TensorRT profile is one UNet row per clip at its optimum,
    up to max_batch; a batch of three runs in it."""
    needs("tensorrt")
    engine = load("random:tiny", backend="tensorrt", device="cuda", profile="realtime", cache_dir=tmp_path)
    (sample,) = [t for t in engine.backend.spec("unet").inputs if t.name == "sample"]
    batch = sample.shape[0]
    assert (batch.min, batch.opt, batch.max) == (1, 1, engine.backend.manifest.profile.max_batch) == (1, 1, 4)
    assert worst(engine, fp32) <= FP16


def test_realtime_server_batches_requests_on_cuda(tmp_path: Path) -> None:
    """serve --profile realtime --max-batch 4: three requests at once, each answered with
    its own request's clip (doctor's row, run here as a test)."""
    needs("cupy")
    from riffusion_engine.engine.tools.doctor_realtime import RealtimeRows

    here = types.SimpleNamespace(require=lambda *needs: None, work=tmp_path, steps=4)
    error, tolerance, _ = RealtimeRows(here, tolerance=FP16).server()
    assert error <= tolerance


def test_torch_fp16_unet_equals_diffusers_fp16_at_a_fractional_timestep() -> None:
    """diffusers' fp16 pipelines hand the UNet fp16 latents and the scheduler's fp32
    timestep (Euler's are fractional): the torch backend's fp16 UNet gives what diffusers'
    own fp16 UNet gives for them."""
    from riffusion_engine.engine.runtime.backends import TorchBackend
    from riffusion_engine.export.models import load_components

    backend = TorchBackend(load_components("random:tiny"), device="cuda", fp16=True)
    unet = load_components("random:tiny").unet.to(device="cuda", dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 64, 64, generator=g).cuda()
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).cuda()
    timestep = torch.tensor([700.3, 700.3], device="cuda")  # fp16 would make it 700.5
    with torch.inference_mode():
        want = unet(sample.half(), timestep, encoder_hidden_states=hidden.half()).sample.float()
    got = backend.run("unet", {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden})
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_tensorrt_export_records_the_installed_tensorrt_and_verifies_without_polygraphys_cuda(
    tmp_path: Path, monkeypatch
) -> None:
    """The cache key holds the installed TensorRT's version (the tensorrt-cu13 distribution's);
    the engines are verified on torch's CUDA, so polygraphy's CUDA wrapper is never made."""
    needs("tensorrt")
    import tensorrt
    from polygraphy.cuda import cuda as polygraphy_cuda
    from riffusion_engine.export.exporter import ExportConfig, export

    def no_cuda_runtime(self) -> None:
        raise OSError("polygraphy's CUDA runtime was asked for")

    monkeypatch.setattr(polygraphy_cuda.Cuda, "__init__", no_cuda_runtime)
    result = export(ExportConfig(model="random:tiny", target="tensorrt", precision="fp16"), tmp_path / "t")
    assert result.manifest["tools"]["tensorrt"] == tensorrt.__version__
    for stage in result.manifest["stages"].values():
        for report in stage["verification"]["tensorrt"].values():
            assert report["max_rel"] <= report["tolerance"]


def test_tensorrt_encodes_a_blend_with_more_texts_than_its_profile_takes(fp32, tmp_path: Path) -> None:
    """A steered stream's nested blend has five leaf texts; the realtime export's text encoder
    takes four rows (one per clip, four clips): the engine sends them in parts."""
    needs("tensorrt")
    engine = load("random:tiny", backend="tensorrt", device="cuda", profile="realtime", cache_dir=tmp_path)
    assert engine.backend.max_rows("text_encoder") == 4
    point = PromptInput("jazz", 1, guidance=1.0)
    for i, text in enumerate(("rock", "lofi", "ambient")):
        point = Blend(point, PromptInput(text, i + 2, guidance=1.0), 0.5)
    request = Request(point, PromptInput("techno", 9, guidance=1.0), 0.5, steps=4, scheduler="lcm")
    reference = load("random:tiny", backend="torch", device="cuda", profile="realtime", precision="fp32")
    got = engine.images([request]).float().cpu().numpy()
    want = reference.images([request]).float().cpu().numpy()
    assert np.abs(got - want).max() <= FP16
