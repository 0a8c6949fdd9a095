"""Every GPU path against the CPU reference (needs an NVIDIA GPU: ``pytest -m gpu``).

The reference is the torch backend in fp32 on the CPU (itself equal to diffusers). Each
backend x precision x path here is also one row of ``riffusion-engine doctor --device
cuda``; these tests add the cases a table cannot: batches of 1, 2 and 3 requests on
static exports, inputs still being written by torch when a backend reads them, and the
CLI commands with ``--device cuda``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

from conftest import needs, needs_provider, run_cli  # noqa: E402
from riffusion_engine import Stream, load  # noqa: E402
from riffusion_engine.engine.runtime.pipeline import Engine  # noqa: E402
from riffusion_engine.engine.runtime.requests import PromptInput, Request  # noqa: E402
from riffusion_engine.export.exporter import ExportConfig, export  # noqa: E402
from riffusion_engine.export.specs import ShapeProfile  # noqa: E402
from riffusion_engine.kernels import RiffusionError  # noqa: E402

FP32, FP16 = 1e-2, 0.1  # largest |difference| of the [0, 1] images from the CPU reference


def requests(count: int, steps: int = 4) -> list[Request]:
    return [
        Request(
            PromptInput("a funky beat", seed=i + 1), PromptInput("church bells", seed=i + 11), 0.3 * i, steps
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def reference(torch_engine):
    cache: dict[int, np.ndarray] = {}

    def images(count: int) -> np.ndarray:
        if count not in cache:
            cache[count] = torch_engine.images(requests(count)).numpy()
        return cache[count]

    return images


def max_error(engine: Engine, reference, count: int) -> float:
    return float(np.abs(engine.images(requests(count)).float().cpu().numpy() - reference(count)).max())


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Exports made once per module, by name."""
    made: dict[str, Path] = {}

    def get(name: str, **config) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp("gpu-exports") / name
            export(ExportConfig(model="random:tiny", **config), out, progress=False)
            made[name] = out
        return made[name]

    return get


# -- torch ---------------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", FP32), ("fp16", FP16)])
def test_torch_backend_on_cuda(reference, precision: str, tolerance: float) -> None:
    engine = load("random:tiny", backend="torch", device="cuda", precision=precision)
    for count in (1, 3):
        assert max_error(engine, reference, count) <= tolerance


def test_engine_end_to_end_on_cuda_hands_the_vae_output_to_cupy_without_a_copy(monkeypatch) -> None:
    needs("cupy")
    import cupy
    from riffusion_engine.kernels import xp as xpm

    engine = load("random:tiny", backend="torch", device="cuda")
    seen = []
    original = xpm.as_array

    def watch(array, xp, dtype=None):
        out = original(array, xp, dtype)
        if type(array).__module__.startswith("torch"):
            seen.append((array.is_cuda, xp is cupy, out.data.ptr == array.data_ptr()))
        return out

    monkeypatch.setattr(xpm, "as_array", watch)
    clip = engine.generate("a funky beat", steps=3)
    assert seen == [(True, True, True)]  # the pixels stayed in device memory
    assert clip.audio.shape == (1, engine.params.num_samples(512)) and np.abs(clip.audio).max() > 0


# -- ONNX Runtime ----------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", FP32), ("fp16", FP16)])
def test_cuda_export_is_verified_on_cuda_and_runs_with_io_binding(
    exports, reference, precision: str, tolerance: float
) -> None:
    needs_provider("CUDAExecutionProvider")
    directory = exports(f"cuda-{precision}", device="cuda", precision=precision)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["device"] == "cuda"
    for stage in manifest["stages"].values():
        for report in stage["verification"]["onnx"].values():
            assert report["runtime"] == "onnxruntime CUDAExecutionProvider"
    # Attention fused (the packed layouts only in fp16: test_export checks the options).
    assert "MultiHeadAttention" in manifest["stages"]["unet"]["fusions"]
    engine = load(artifacts=directory, backend="onnxruntime", device="cuda")
    for count in (1, 3):
        assert max_error(engine, reference, count) <= tolerance


def assert_reads_finished_inputs(backend, *, tolerance: float) -> None:
    """The VAE decoder's input is written by torch after a long kernel on torch's stream:
    a backend that does not wait for that stream reads zeros."""
    source = torch.randn(2, 4, 64, 64).cuda()
    expected = backend.run("vae_decoder", {"latent": source}).cpu()
    for _ in range(5):
        latent = torch.zeros_like(source)
        torch.cuda._sleep(50_000_000)  # torch's stream stays busy, then writes the input
        latent.copy_(source)
        got = backend.run("vae_decoder", {"latent": latent})
        torch.testing.assert_close(got.cpu(), expected, atol=tolerance, rtol=tolerance)


def test_io_binding_waits_for_torch_to_finish_writing_the_inputs(exports) -> None:
    """The inputs come straight from torch kernels still queued on torch's stream: ONNX
    Runtime (on its own stream) must see the finished values."""
    needs_provider("CUDAExecutionProvider")
    from riffusion_engine.engine.runtime.backends import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(exports("cuda-fp32", device="cuda"), device="cuda")
    # GroupNorm's CUDA kernel is not deterministic: a race shows as far more than this.
    assert_reads_finished_inputs(backend, tolerance=1e-4)


def test_tensorrt_execution_provider(exports, reference) -> None:
    needs_provider("TensorrtExecutionProvider")
    needs("tensorrt")  # the provider loads pip TensorRT's libraries
    directory = exports("unfused", fuse=False)
    engine = load(artifacts=directory, backend="onnxruntime", device="cuda", provider="tensorrt")
    assert engine.backend.session("unet").get_providers()[0] == "TensorrtExecutionProvider"
    for count in (1, 3):
        assert max_error(engine, reference, count) <= FP32
    assert any((directory / "ort-tensorrt").iterdir())  # engines cached for the next session
    with pytest.raises(RiffusionError, match="outside this onnxruntime export's profile"):
        engine.check(Request(PromptInput("x"), width=2048))


# -- TensorRT ----------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True])
def test_tensorrt_backend_matches_torch_for_one_two_and_three_requests(
    exports, reference, static: bool
) -> None:
    needs("tensorrt")
    directory = exports(
        f"trt-{static}", target="tensorrt", precision="fp16", profile=ShapeProfile(max_batch=4, static=static)
    )
    engine = load(artifacts=directory, backend="tensorrt", device="cuda")
    for count in (1, 2, 3, 1):  # smaller after larger: the static buffers' spare rows do not leak
        assert max_error(engine, reference, count) <= FP16
    if static:
        with pytest.raises(RiffusionError, match="at most 4"):
            engine.images(requests(5))
        with pytest.raises(RiffusionError, match="takes 512 pixels"):
            engine.check(Request(PromptInput("x"), width=256))


@pytest.mark.parametrize("static", [False, True])
def test_tensorrt_deep_cache_stages_match_torch_with_deep_cache(exports, static: bool) -> None:
    """DeepCache's UNet (two outputs) and shallow stage (its own profile, the feature's
    sizes derived from the latents') as engines, against the torch backend's cached run."""
    needs("tensorrt")
    directory = exports(
        f"trt-deep-{static}",
        target="tensorrt",
        precision="fp16",
        profile=ShapeProfile(max_batch=4, static=static, deep_cache_branch=1),
    )
    manifest = json.loads((directory / "manifest.json").read_text())
    assert {"unet.plan", "unet_shallow.plan"} <= set(manifest["stages"]["unet"]["files"]) | set(
        manifest["stages"]["unet_shallow"]["files"]
    )
    engine = load(artifacts=directory, backend="tensorrt", device="cuda", deep_cache="2")
    cpu = load("random:tiny", backend="torch", deep_cache="2:1")
    for count in (1, 3):
        timings: dict[str, float] = {}
        got = engine.images(requests(count), timings=timings).float().cpu().numpy()
        assert timings["unet_full_calls"] == 2  # 4 steps: full, shallow, full, shallow
        assert float(np.abs(got - cpu.images(requests(count)).numpy()).max()) <= FP16


def test_tensorrt_reads_inputs_torch_is_still_writing(exports) -> None:
    needs("tensorrt")
    from riffusion_engine.engine.runtime.backends import TensorRTBackend

    directory = exports("trt-False", target="tensorrt", precision="fp16", profile=ShapeProfile(max_batch=4))
    assert_reads_finished_inputs(TensorRTBackend(directory), tolerance=1e-3)


def test_tensorrt_refuses_a_shape_outside_its_profile(exports) -> None:
    needs("tensorrt")
    from riffusion_engine.engine.runtime.backends import TensorRTBackend

    backend = TensorRTBackend(
        exports("trt-False", target="tensorrt", precision="fp16", profile=ShapeProfile(max_batch=4))
    )
    with pytest.raises(RiffusionError, match="profile takes"):
        backend.run("vae_decoder", {"latent": torch.randn(5, 4, 64, 64, device="cuda")})


def test_auto_on_cuda_exports_on_first_use(tmp_path: Path, reference) -> None:
    if importlib.util.find_spec("tensorrt") is None:
        needs_provider("CUDAExecutionProvider")
    engine = load("random:tiny", backend="auto", device="cuda", cache_dir=tmp_path)
    expected = "tensorrt" if importlib.util.find_spec("tensorrt") else "onnxruntime"
    assert engine.backend.name == expected
    (directory,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["target"] == ("tensorrt" if expected == "tensorrt" else "onnx")
    assert max_error(engine, reference, 1) <= FP16


def test_tensorrt_export_on_first_use(tmp_path: Path, reference) -> None:
    needs("tensorrt")
    engine = load("random:tiny", backend="tensorrt", device="cuda", precision="fp16", cache_dir=tmp_path)
    assert max_error(engine, reference, 1) <= FP16
    again = load("random:tiny", backend="tensorrt", device="cuda", precision="fp16", cache_dir=tmp_path)
    assert again.backend.manifest.cache_key == engine.backend.manifest.cache_key


# -- commands --------------------------------------------------------------------------


def test_kernel_commands_on_cuda(tmp_path: Path) -> None:
    needs("cupy")
    code, _, err = run_cli("roundtrip", "-o", str(tmp_path / "rt"), "--device", "cuda")
    assert code == 0, err
    assert (tmp_path / "rt" / "roundtrip.wav").is_file()
    code, _, err = run_cli(
        "image-to-audio",
        str(tmp_path / "rt" / "spectrogram.png"),
        "-o",
        str(tmp_path / "a.wav"),
        "--device",
        "cuda",
    )
    assert code == 0, err


def test_bench_on_cuda_counts_device_memory(tmp_path: Path) -> None:
    """The peaks are the run's: earlier work in the process (a 4 GiB peak, 1 GiB still
    held) is in neither."""
    needs_provider("CUDAExecutionProvider")
    spike = torch.empty(2**32, dtype=torch.uint8, device="cuda")
    del spike
    held = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    out = tmp_path / "bench.json"
    code, _, err = run_cli(
        "bench", "--model", "random:tiny", "--backends", "torch,onnxruntime", "--device", "cuda",
        "--steps", "2", "--runs", "1", "--warmup", "0", "--cache-dir", str(tmp_path / "c"),
        "--json", str(out),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["gpu_memory_source"] in ("nvml", "cudaMemGetInfo")
    # ONNX Runtime's arena is outside torch's allocator: the device saw more than torch did.
    assert report["peak_gpu_bytes"] > report["peak_torch_gpu_bytes"] > 0
    assert report["peak_torch_gpu_bytes"] < 2**32  # random:tiny's run: neither earlier block is its own
    del held


def test_device_memory_sees_allocations_outside_torch() -> None:
    needs("cupy")
    import cupy
    from riffusion_engine.engine.tools.device_memory import PeakMemory, device_memory_reader

    read, _ = device_memory_reader()
    cupy.get_default_memory_pool().free_all_blocks()  # a new allocation, not a cached block
    with PeakMemory(read) as meter:
        block = cupy.empty(512 * 2**20, dtype=cupy.uint8)
        block.fill(1)
        cupy.cuda.Device().synchronize()
    assert meter.stop() >= 400 * 2**20
    del block


def test_server_on_cuda() -> None:
    needs("cupy")  # the engine's audio kernels on CUDA
    import httpx
    from riffusion_engine.engine.serve.app import background, create_app
    from riffusion_engine.engine.serve.config import ServerConfig

    engine = load("random:tiny", backend="torch", device="cuda")
    body = {
        "alpha": 0.25,
        "num_inference_steps": 4,
        "seed_image_id": "og_beat",
        "start": {"prompt": "church bells", "seed": 42, "denoising": 0.5, "guidance": 7.0},
        "end": {"prompt": "jazz", "seed": 123, "denoising": 0.5, "guidance": 7.0},
    }
    with background(create_app(engine, ServerConfig())) as url:
        answer = httpx.post(url + "/run_inference/", content=json.dumps(body), timeout=300)
    assert answer.status_code == 200, answer.text
    assert answer.json()["audio"].startswith("data:audio/mpeg;base64,")


def test_pipelined_stream_on_cuda_equals_its_one_shot_runs() -> None:
    """The audio thread runs CuPy's kernels in a non-blocking stream of its own while the
    next clip denoises on torch's: each clip must still be its request's one-shot clip."""
    needs("cupy")
    engine = load("random:tiny", backend="torch", device="cuda")
    with Stream.open(engine, "jazz", "techno", steps=4, max_clips=4, pipeline=True, lookahead=1) as stream:
        chunks = [c for c in stream if not c.final]
    assert len(chunks) == 4
    for chunk in chunks:
        (alone,) = engine.run([chunk.request])
        ours, theirs = np.asarray(chunk.clip.image, dtype=int), np.asarray(alone.image, dtype=int)
        assert np.abs(ours - theirs).max() <= 1  # GPU kernels may round differently run to run
        if np.array_equal(ours, theirs):
            assert np.array_equal(chunk.clip.audio, alone.audio)  # then the audio kernels agree too


def test_stream_sessions_do_not_strand_cupy_pool_memory(monkeypatch) -> None:
    """CuPy's pool keeps freed blocks per stream: one session after another reuse one
    audio stream (held here, so CUDA cannot hand a destroyed stream's handle to the next),
    and 20 sessions hold what one does, not 20 times it."""
    needs("cupy")
    import cupy

    engine = load("random:tiny", backend="torch", device="cuda")
    pool = cupy.get_default_memory_pool()
    seen = []  # the CuPy stream current where each clip's audio was made (kept alive)
    to_clip = engine.to_clip

    def watch(image, timings):
        seen.append(cupy.cuda.get_current_stream())
        return to_clip(image, timings)

    monkeypatch.setattr(engine, "to_clip", watch)

    def session() -> None:
        with Stream.open(
            engine, "jazz", "techno", steps=2, max_clips=2, pipeline=True, lookahead=1
        ) as stream:
            assert len([c for c in stream if not c.final]) == 2

    session()
    held = pool.total_bytes()
    assert held > 0  # the audio kernels ran on CuPy's pool
    for _ in range(19):
        session()
    assert len({id(s) for s in seen}) == 1 and seen[0].ptr != 0 and len(seen) == 40
    assert pool.total_bytes() <= 1.5 * held + 16 * 2**20


def test_tensorrt_provider_exports_unfused_on_first_use(tmp_path: Path, reference) -> None:
    """TensorRT cannot parse ONNX Runtime's fused operators: the export made on first use
    for the tensorrt provider is unfused, and the provider loads TensorRT's libraries."""
    needs_provider("TensorrtExecutionProvider")
    needs("tensorrt")
    engine = load(
        "random:tiny", backend="onnxruntime", device="cuda", provider="tensorrt", cache_dir=tmp_path
    )
    assert all(not stage.fusions for stage in engine.backend.manifest.stages.values())
    assert engine.backend.session("unet").get_providers()[0] == "TensorrtExecutionProvider"
    assert max_error(engine, reference, 1) <= FP32


def test_doctor_on_cuda(tmp_path: Path) -> None:
    """Every GPU row whose requirements are installed ran, and passed."""
    from riffusion_engine.engine.tools.doctor import REQUIREMENTS

    needs("cupy")
    out = tmp_path / "doctor.json"
    code, stdout, err = run_cli("doctor", "--device", "cuda", "--json", str(out))
    assert code == 0, stdout + err
    checks = json.loads(out.read_text())["checks"]
    assert not [c for c in checks if c["status"] == "failed"]
    for check in checks:
        if "cuda" in check["needs"] and all(REQUIREMENTS[n]() is None for n in check["needs"]):
            assert check["status"] == "ok", check
    ran = {c["path"] for c in checks if c["status"] == "ok"}
    assert {"torch cuda fp32", "torch cuda fp16", "kernels cupy: image -> audio"} <= ran
