"""The runtime on random:tiny: parity with diffusers' pipelines, Riffusion's modes,
determinism, batching, backends and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from conftest import reference_pipeline, run_cli  # noqa: E402
from PIL import Image  # noqa: E402
from riffusion_engine import load  # noqa: E402
from riffusion_engine.engine.runtime.defaults import SCHEDULER  # noqa: E402
from riffusion_engine.engine.runtime.pipeline import Engine  # noqa: E402
from riffusion_engine.engine.runtime.prompts import apply_weights, parse_weights, tokenize  # noqa: E402
from riffusion_engine.engine.runtime.requests import SCHEDULERS, STEP_OPTIONS, PromptInput, Request  # noqa: E402
from riffusion_engine.engine.runtime.tensors import slerp  # noqa: E402
from riffusion_engine.export import artifacts  # noqa: E402
from riffusion_engine.kernels import RiffusionError  # noqa: E402

# The onnxruntime backend against diffusers in fp32 (max |difference| of [0, 1] images):
# observed about 2e-6 on random:tiny; generous for other CPUs' kernels.
ONNX_IMAGE_TOLERANCE = 1e-3


@pytest.fixture(scope="session")
def ort_engine(tiny_export) -> Engine:
    return load(artifacts=tiny_export[0], backend="onnxruntime")


def images(engine: Engine, *requests: Request) -> np.ndarray:
    return engine.images(list(requests)).cpu().numpy()


@pytest.fixture(scope="session")
def seed_image() -> Image.Image:
    pixels = np.random.default_rng(5).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    "scheduler",  # the default scheduler in every run; the others with the long tests
    [s if s == SCHEDULER else pytest.param(s, marks=pytest.mark.long) for s in SCHEDULERS],
)
def test_torch_backend_equals_diffusers_text_to_clip(tiny, torch_engine, scheduler: str) -> None:
    steps = 8
    expected = reference_pipeline(tiny, scheduler=scheduler)(
        "a funky beat",
        negative_prompt="noise",
        num_inference_steps=steps,
        guidance_scale=7.0,
        height=512,
        width=512,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
        **STEP_OPTIONS.get(scheduler, {}),  # TCD's eta: diffusers' pipelines pass 0.0 unless told
    ).images
    request = Request(PromptInput("a funky beat", 3, "noise", 7.0), steps=steps, scheduler=scheduler)
    assert np.abs(images(torch_engine, request) - expected).max() <= 1e-5


def test_torch_backend_equals_diffusers_img2img(tiny, torch_engine, seed_image) -> None:
    expected = reference_pipeline(tiny, "img2img")(
        "jazz",
        image=seed_image,
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(4),
        output_type="np",
    ).images
    request = Request(PromptInput("jazz", 4, None, 5.0, 0.6), steps=10, seed_image=seed_image)
    assert np.abs(images(torch_engine, request) - expected).max() <= 1e-5


def test_onnxruntime_backend_agrees_with_diffusers(tiny, ort_engine, seed_image) -> None:
    expected = reference_pipeline(tiny)(
        "a funky beat",
        num_inference_steps=6,
        guidance_scale=7.0,
        height=512,
        width=512,
        generator=torch.Generator("cpu").manual_seed(2),
        output_type="np",
    ).images
    actual = images(ort_engine, Request(PromptInput("a funky beat", 2), steps=6))
    assert np.abs(actual - expected).max() <= ONNX_IMAGE_TOLERANCE
    gray = np.abs(np.round(actual * 255) - np.round(expected * 255))
    assert (gray <= 1).mean() >= 0.99
    expected = reference_pipeline(tiny, "img2img")(
        "jazz",
        image=seed_image,
        strength=0.5,
        num_inference_steps=6,
        guidance_scale=7.0,
        generator=torch.Generator("cpu").manual_seed(4),
        output_type="np",
    ).images
    actual = images(
        ort_engine, Request(PromptInput("jazz", 4, denoising=0.5), steps=6, seed_image=seed_image)
    )
    assert np.abs(actual - expected).max() <= ONNX_IMAGE_TOLERANCE


@pytest.mark.long
def test_interpolation_endpoints_are_the_plain_runs(torch_engine) -> None:
    start = PromptInput("funky bass", 1, "noise", 6.0)
    end = PromptInput("church organ", 9, "drums", 8.0)
    steps = 5
    for alpha, plain in ((0.0, start), (1.0, end)):
        blended = images(torch_engine, Request(start, end, alpha, steps=steps))
        assert np.array_equal(blended, images(torch_engine, Request(plain, steps=steps)))
    middle = images(torch_engine, Request(start, end, 0.5, steps=steps))
    assert not np.array_equal(middle, images(torch_engine, Request(start, steps=steps)))


def test_slerp_keeps_the_norm_and_falls_back_to_lerp() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 64, 64, generator=generator), torch.randn(4, 64, 64, generator=generator)
    for alpha in (0.25, 0.5, 0.75):
        mixed = slerp(alpha, a, b)
        assert float(torch.linalg.norm(mixed)) == pytest.approx(float(torch.linalg.norm(a)), rel=0.02)
        # A linear blend of independent noise shrinks it (by about 1/sqrt(2) at 0.5).
        assert float(torch.linalg.norm((1 - alpha) * a + alpha * b)) < 0.8 * float(torch.linalg.norm(a))
    assert torch.equal(slerp(0.0, a, b), a)
    nearly = a + 1e-4 * b
    assert torch.allclose(slerp(0.3, a, nearly), 0.7 * a + 0.3 * nearly)


def test_mask_keeps_the_seed_image_where_black(torch_engine, seed_image) -> None:
    mask = np.zeros((512, 512), np.uint8)
    mask[:, 256:] = 255  # regenerate the right half, keep the left
    request = Request(
        PromptInput("jazz", 6, denoising=0.8), steps=8, seed_image=seed_image, mask=Image.fromarray(mask, "L")
    )
    latents = torch_engine.denoise([request])
    generator = torch.Generator("cpu").manual_seed(6)  # the posterior sample is the seed's first draw
    eps = torch.randn((4, 64, 64), generator=generator)[None]
    pixels = np.asarray(seed_image, dtype=np.float32)[None] / 255.0
    image = torch.from_numpy(pixels * 2 - 1).permute(0, 3, 1, 2)
    seed_latents = torch_engine.backend.run("vae_encoder", {"image": image, "noise": eps})
    assert torch.equal(latents[..., :32], seed_latents[..., :32])
    assert (latents[..., 32:] - seed_latents[..., 32:]).abs().max() > 0.1


def test_same_inputs_give_bitwise_identical_clips(ort_engine) -> None:
    first = ort_engine.generate("a funky beat", seed=7, steps=4)
    second = ort_engine.generate("a funky beat", seed=7, steps=4)
    assert np.array_equal(first.audio, second.audio)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    other = ort_engine.generate("a funky beat", seed=8, steps=4)
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_negative_prompt_changes_the_output(torch_engine) -> None:
    plain = images(torch_engine, Request(PromptInput("a funky beat", 3), steps=4))
    negative = images(torch_engine, Request(PromptInput("a funky beat", 3, "drums"), steps=4))
    assert np.abs(plain - negative).max() > 1e-3


@pytest.mark.long
def test_a_batch_equals_its_requests_run_alone(torch_engine) -> None:
    one = Request(PromptInput("funky bass", 1, None, 7.0), steps=4)
    two = Request(PromptInput("church organ", 2, "drums", 3.0), steps=4)
    batch = images(torch_engine, one, two)
    # Not bitwise: torch's kernels block their sums by batch size (observed 5e-5).
    for row, request in enumerate((one, two)):
        alone = images(torch_engine, request)[0]
        assert np.abs(batch[row] - alone).max() <= 1e-4
        assert (np.abs(np.round(batch[row] * 255) - np.round(alone * 255)) <= 1).all()


def test_wider_clips(torch_engine, ort_engine) -> None:
    clip = torch_engine.generate("a funky beat", steps=2, width=520)
    assert clip.image.size == (520, 512)
    assert clip.duration_s == pytest.approx(5.19, abs=0.01)
    assert ort_engine.generate("a funky beat", steps=2, width=768).image.size == (768, 512)
    with pytest.raises(RiffusionError, match="not a multiple of 16 pixels"):
        ort_engine.generate("a funky beat", steps=2, width=520)
    # The export's profile (256..1024 pixels here) bounds every exported backend.
    with pytest.raises(RiffusionError, match=r"width 1280 is outside this onnxruntime export's profile"):
        ort_engine.generate("a funky beat", steps=2, width=1280)


def test_clip_saves_audio_and_image(torch_engine, tmp_path: Path) -> None:
    clip = torch_engine.generate("a funky beat", steps=2)
    assert clip.audio.dtype == np.int16 and clip.sample_rate == 44100
    assert {"text_encoder", "unet", "vae_decoder", "image_to_audio"} <= set(clip.timings)
    for name in ("clip.wav", "clip.flac", "clip.mp3", "clip.png"):
        assert clip.save(tmp_path / name).stat().st_size > 0
    from riffusion_engine.kernels.image import load_image

    exif = load_image(tmp_path / "clip.png").getexif()
    assert exif[11000] == 44100 and exif[11080] == pytest.approx(30e6)
    with pytest.raises(RiffusionError, match="cannot save"):
        clip.save(tmp_path / "clip.txt")


def test_prompt_weighting() -> None:
    assert parse_weights("a (jazz:1.3) [bass] ((drums)) \\(literal\\)") == [
        ("a ", 1.0),
        ("jazz", 1.3),
        (" ", 1.0),
        ("bass", pytest.approx(1 / 1.1)),
        (" ", 1.0),
        ("drums", pytest.approx(1.21)),
        (" (literal)", 1.0),
    ]


def test_weighted_prompts_scale_embeddings(tiny, torch_engine) -> None:
    plain = tokenize(tiny.tokenizer, "jazz piano")
    reference = tiny.tokenizer("jazz piano", padding="max_length", max_length=77, truncation=True).input_ids
    assert plain.ids.tolist() == reference and not plain.weighted
    weighted = tokenize(tiny.tokenizer, "(jazz:1.5) piano")
    assert weighted.ids.tolist() == plain.ids.tolist() and weighted.weighted
    embeddings = torch.randn(1, 77, 32)
    scaled = apply_weights(embeddings, torch.from_numpy(weighted.weights)[None])
    assert float(scaled.mean()) == pytest.approx(float(embeddings.mean()), rel=1e-4)
    a = torch_engine.encode(["jazz piano"])
    b = torch_engine.encode(["(jazz:1.5) piano"])
    assert not torch.allclose(a, b)


def test_long_prompt_is_truncated_with_a_warning(torch_engine, caplog) -> None:
    prompt = "funky " * 40 + "ending " * 200  # a prompt checked, then encoded: tokenized twice
    with caplog.at_level("WARNING"):
        clip = torch_engine.generate(prompt, steps=1)
    warnings = [r.getMessage() for r in caplog.records if "longer than 75 tokens" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per prompt, shortened
    assert "more characters)" in warnings[0] and len(warnings[0]) < 200
    assert clip.audio.size


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(steps=0), "steps must be"),
        (dict(guidance=math.nan), "guidance must be"),
        (dict(guidance=-1.0), "guidance must be"),
        (dict(denoising=1.5), "denoising must be"),
        (dict(width=500), "multiple of 8"),
        (dict(scheduler="lms"), "unknown scheduler"),
        (dict(mask=Image.new("L", (512, 512))), "mask needs a seed image"),
        (dict(seed_image=Image.new("RGB", (256, 512))), "seed_image is 256x512"),
        (dict(seed_image=Image.new("RGB", (512, 512)), mask=Image.new("F", (512, 512))), "mask has mode F"),
        (dict(seed=-1), "seed must be"),
    ],
)
def test_bad_input_is_a_clear_error(torch_engine, change: dict, message: str) -> None:
    arguments = dict(prompt="a funky beat", steps=2) | change
    with pytest.raises(RiffusionError, match=message):
        torch_engine.generate(**arguments)


def test_guidance_off_runs_the_unet_at_one_row_per_clip(torch_engine, monkeypatch) -> None:
    """Guidance <= 1 (few-step samplers run without it) skips the unconditional rows: the UNet
    and the text encoder see one row per clip, not two. Prompts new to the engine's cache."""
    import uuid

    rows: dict[str, list[int]] = {"text_encoder": [], "unet": []}
    run = torch_engine.backend.run

    def counting(stage: str, inputs: dict):
        if stage in rows:
            rows[stage].append(int(inputs["input_ids" if stage == "text_encoder" else "sample"].shape[0]))
        return run(stage, inputs)

    monkeypatch.setattr(torch_engine.backend, "run", counting)
    fresh = uuid.uuid4().hex[:8]
    off = [
        Request(PromptInput(f"{fresh} one", seed=11, guidance=1.0), steps=2, scheduler="ddim"),
        Request(PromptInput(f"{fresh} zero", seed=12, guidance=0.0), steps=2, scheduler="ddim"),
    ]
    torch_engine.images(off)
    # Two prompts (on the CPU the text encoder runs one at a time), no empty negative one.
    assert rows == {"text_encoder": [1, 1], "unet": [2, 2]}
    for calls in rows.values():
        calls.clear()
    guided = PromptInput(f"{fresh} guided", seed=13, guidance=7.0, negative_prompt=f"{fresh} not")
    torch_engine.images([Request(guided, steps=2, scheduler="ddim")])
    assert rows == {"text_encoder": [1, 1], "unet": [2, 2]}  # the negative prompt, then the prompt


def test_alpha_outside_zero_one() -> None:
    with pytest.raises(RiffusionError, match="alpha must be in"):
        Request(PromptInput("a"), PromptInput("b"), alpha=1.5)


def test_backend_errors(tiny_export, tmp_path: Path) -> None:
    with pytest.raises(RiffusionError, match="unknown backend"):
        load("random:tiny", backend="jax")
    with pytest.raises(RiffusionError, match="runs from a model source"):
        load(artifacts=tiny_export[0], backend="torch")
    with pytest.raises(RiffusionError, match="tensorrt backend runs on --device cuda"):
        load(artifacts=tiny_export[0], backend="tensorrt")
    with pytest.raises(artifacts.ArtifactError, match="not a complete export"):
        load(artifacts=tmp_path, backend="onnxruntime")


def test_onnxruntime_on_cuda_follows_what_is_installed(tiny_export) -> None:
    """On a machine with onnxruntime-gpu and a GPU the CUDA provider loads; elsewhere one
    clear error says what is missing."""
    import onnxruntime as ort
    import torch

    cuda_here = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    if cuda_here:
        engine = load(artifacts=tiny_export[0], backend="onnxruntime", device="cuda")
        assert engine.backend.session("unet").get_providers()[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(RiffusionError, match="CUDA"):
            load(artifacts=tiny_export[0], backend="onnxruntime", device="cuda")


def test_auto_picks_what_can_run_on_the_device() -> None:
    import importlib.util

    import onnxruntime as ort
    from riffusion_engine.engine.runtime.backends import auto_backend

    assert auto_backend("cpu") == "onnxruntime"
    if importlib.util.find_spec("tensorrt") is not None:
        assert auto_backend("cuda") == "tensorrt"
    elif "CUDAExecutionProvider" in ort.get_available_providers():
        assert auto_backend("cuda") == "onnxruntime"
    else:  # a CPU build of ONNX Runtime cannot run on the GPU: torch can
        assert auto_backend("cuda") == "torch"


def test_a_cuda_export_is_refused_by_the_cpu_provider(tiny_export, tmp_path: Path) -> None:
    import json
    import shutil

    copy = tmp_path / "cuda-export"
    shutil.copytree(tiny_export[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["device"] = "cuda"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RiffusionError, match="made for --device cuda"):
        load(artifacts=copy, backend="onnxruntime")


def test_tensorrt_provider_options_cover_every_input_of_the_profile(tiny_export, tmp_path: Path) -> None:
    from riffusion_engine.engine.runtime.tensorrt_runtime import tensorrt_provider_options
    from riffusion_engine.export.manifest import Manifest

    typed = Manifest.load(tiny_export[0])
    manifest = artifacts.load_manifest(tiny_export[0])  # the JSON as written
    for name, stage in manifest["stages"].items():
        spec = stage["spec"]
        options = tensorrt_provider_options(typed.stage(name).spec, cache=tmp_path, fp16=name == "unet")
        for which in ("min", "opt", "max"):
            listed = dict(item.split(":") for item in options[f"trt_profile_{which}_shapes"].split(","))
            assert listed == {t["name"]: "x".join(map(str, t[which])) for t in spec["inputs"]}
        assert options["trt_fp16_enable"] is (name == "unet")
        assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
        assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path)


def test_an_exported_backend_refuses_widths_outside_the_profile(ort_engine, tiny_export) -> None:
    """The widths an export was made and verified for bound it (TensorRT takes no others;
    ONNX Runtime would run them unverified): refused before any compute, naming the range."""
    width = artifacts.load_manifest(tiny_export[0])["stages"]["vae_decoder"]["spec"]["dims"]["width"]
    assert (width["min"], width["max"]) == (256, 1024)
    ort_engine.check(Request(PromptInput("a funky beat"), width=width["max"]))
    for outside, hint in (
        (width["max"] + 16, "--max-width 1040 for longer"),
        (width["min"] - 16, "--width 240 for shorter"),
    ):
        with pytest.raises(RiffusionError, match=rf"takes 256\.\.1024 pixels \(export with {hint} clips\)"):
            ort_engine.check(Request(PromptInput("a funky beat"), width=outside))


@pytest.mark.long
def test_export_on_first_use_is_cached(tmp_path: Path) -> None:
    engine = load("random:tiny", backend="onnxruntime", cache_dir=tmp_path)
    (directory,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert artifacts.load_manifest(directory)["model"]["id"] == "random:tiny"
    before = (directory / "unet.onnx").stat().st_mtime_ns
    load("random:tiny", backend="onnxruntime", cache_dir=tmp_path)
    assert (directory / "unet.onnx").stat().st_mtime_ns == before
    assert engine.generate("a funky beat", steps=1).audio.size


def test_cli_generate_on_both_backends(tiny_export, tmp_path: Path) -> None:
    code, stdout, err = run_cli(
        "generate", "a funky beat", "--model", "random:tiny", "--backend", "torch", "--steps", "3",
        "-o", str(tmp_path / "torch.wav"), "--image", str(tmp_path / "torch.png"),
    )  # fmt: skip
    assert code == 0, err
    assert "unet" in stdout and "real-time factor" in stdout
    code, _, err = run_cli(
        "generate", "a funky beat", "--artifacts", str(tiny_export[0]), "--backend", "onnxruntime",
        "--steps", "3", "-o", str(tmp_path / "ort.wav"), "--image", str(tmp_path / "ort.png"),
    )  # fmt: skip
    assert code == 0, err
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("torch", "ort"))
    assert (np.abs(a - b) <= 1).mean() >= 0.99


def test_cli_generate_with_seed_image_and_mask(tmp_path: Path, seed_image) -> None:
    seed_image.save(tmp_path / "seed.png")
    Image.new("L", (512, 512), 255).save(tmp_path / "mask.png")
    code, _, err = run_cli(
        "generate", "jazz", "--model", "random:tiny", "--backend", "torch", "--steps", "4",
        "--seed-image", str(tmp_path / "seed.png"), "--mask", str(tmp_path / "mask.png"),
        "--denoising", "0.5", "-o", str(tmp_path / "out.flac"),
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "out.flac").stat().st_size > 0


def test_cli_generate_bad_input_is_one_line(tmp_path: Path) -> None:
    cases = [
        (["--steps", "0"], "steps must be"),
        (["--guidance", "nan"], "guidance must be"),
        (["--width", "500"], "multiple of 8"),
        (["--seed-image", str(tmp_path / "missing.png")], "seed image"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(
            "generate", "a beat", "--model", "random:tiny", "--backend", "torch",
            "-o", str(tmp_path / "x.wav"), *extra,
        )  # fmt: skip
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.long
def test_cli_interpolate(tmp_path: Path) -> None:
    code, stdout, err = run_cli(
        "interpolate", "--start", "funky bass", "--end", "church organ", "--clips", "3",
        "--model", "random:tiny", "--backend", "torch", "--steps", "4", "-o", str(tmp_path / "seq"),
    )  # fmt: skip
    assert code == 0, err
    for i in range(3):
        assert (tmp_path / "seq" / f"clip_{i:03d}.wav").is_file()
    assert "alpha 0.50" in stdout
    import soundfile

    joined = soundfile.info(str(tmp_path / "seq" / "joined.wav"))
    single = soundfile.info(str(tmp_path / "seq" / "clip_000.wav"))
    assert joined.frames == 3 * single.frames


@pytest.mark.long
def test_cli_demo(tmp_path: Path) -> None:
    code, stdout, err = run_cli("demo", "-o", str(tmp_path / "demo"), "--steps", "3")
    assert code == 0, err
    for name in ("clip.wav", "spectrogram.png", "clip-realtime.wav", "spectrogram-realtime.png"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "random weights" in stdout and "riffusion-engine generate" in stdout
    # Both recipes side by side: 3 PNDM steps (4 UNet calls) beside the realtime profile's 4.
    assert "unet (4 / 4 calls)" in stdout and "real-time factor" in stdout
    assert "profile realtime: lcm 4 steps, guidance off" in stdout
    code, stdout, _ = run_cli("demo", "-o", str(tmp_path / "demo"), "--steps", "3")
    assert code == 0 and "cached" in stdout


@pytest.mark.slow
def test_full_architecture_on_both_backends_agrees_with_diffusers(tmp_path: Path) -> None:
    from riffusion_engine.export.models import load_components

    full = load_components("random:full")
    expected = reference_pipeline(full)(
        "a funky beat",
        num_inference_steps=2,
        guidance_scale=7.0,
        height=512,
        width=512,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="np",
    ).images
    del full
    request = Request(PromptInput("a funky beat", 1), steps=2)
    actual = images(load("random:full", backend="torch"), request)
    assert np.abs(actual - expected).max() <= 1e-5
    ort = load("random:full", backend="onnxruntime", cache_dir=tmp_path)
    actual = images(ort, request)
    gray = np.abs(np.round(actual * 255) - np.round(expected * 255))
    assert (gray <= 1).mean() >= 0.99


def test_an_allocation_the_machine_cannot_make_is_one_clear_error() -> None:
    """What torch's CPU allocator raises for a clip too wide for the machine (a 4096-pixel
    clip asked for a 34 GB attention buffer) becomes one line naming the width."""
    from riffusion_engine.engine.runtime.checks import memory_bound

    message = (
        "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: not enough memory: you tried to allocate"
    )
    with pytest.raises(
        RiffusionError, match=r"1 clip\(s\) of 4096 pixels need more memory .* smaller --width"
    ):
        with memory_bound(4096, 1):
            raise RuntimeError(f"{message} 34359738368 bytes.")
    with pytest.raises(RiffusionError, match="2 clip"), memory_bound(1024, 2):
        raise MemoryError()
    with pytest.raises(RuntimeError, match="shape mismatch"), memory_bound(512, 1):
        raise RuntimeError("shape mismatch")  # other failures pass through unchanged


@pytest.mark.long  # an export at --max-batch 1
def test_every_stage_call_fits_the_exports_batch_maximum_on_every_device(torch_engine, tmp_path) -> None:
    """A steered stream's blend encodes all its leaf texts in one batch, which can outnumber
    the text encoder's ``per_clip x max_batch`` rows; TensorRT refuses such a batch
    (set_input_shape returns False). A backend that refuses rows over its spec's maximum,
    taking whole batches as on a GPU (no CPU row limit), runs every stage in parts
    that fit, and the clip equals the torch reference's."""
    from riffusion_engine.engine.runtime.backends import Backend
    from riffusion_engine.engine.runtime.requests import Blend

    out = tmp_path / "batch-1"
    code, _, stderr = run_cli("export", "--model", "random:tiny", "--max-batch", "1", "-o", str(out), "-q")
    assert code == 0, stderr
    inner = load(artifacts=out, backend="onnxruntime").backend

    class RefusingBackend(Backend):
        name = "refusing"
        device = "cuda"  # the GPU's policy: a batch goes whole where the export allows it

        def __init__(self) -> None:
            self.manifest = inner.manifest
            self.calls: list[tuple[str, int]] = []

        def torch_device(self):
            return torch.device("cpu")

        def synchronize(self) -> None:
            pass

        def max_rows(self, stage: str) -> int | None:
            return inner.max_rows(stage)

        def run(self, stage, inputs):
            rows = int(next(iter(inputs.values())).shape[0])
            most = inner.spec(stage).max_rows
            if rows > most:
                raise RiffusionError(f"{stage}: {rows} rows, the profile takes at most {most}")
            self.calls.append((stage, rows))
            return inner.run(stage, inputs)

    backend = RefusingBackend()
    engine = Engine.from_export(backend, out)
    assert inner.spec("text_encoder").max_rows == 2  # one clip, guided: prompt and negative prompt
    steered = Blend(Blend(PromptInput("jazz", 1), PromptInput("rock", 2), 0.5), PromptInput("lofi", 3), 0.25)
    request = Request(steered, PromptInput("ambient", 4), 0.5, steps=3)
    got = engine.images([request]).numpy()
    texts = [rows for stage, rows in backend.calls if stage == "text_encoder"]
    assert sum(texts) >= 4 and max(texts) == 2  # four prompts (and the empty negative), two at a time
    want = torch_engine.images([request]).numpy()
    assert np.abs(got - want).max() < 1e-3


def test_the_torch_backends_half_precision_keeps_the_timestep_in_fp32() -> None:
    """diffusers' fp16 pipelines hand the UNet the scheduler's fp32 timesteps and compute
    the time embedding in fp32; cast to fp16 first, Euler's fractional timesteps would be
    rounded (steps of 0.5 above 512)."""
    from riffusion_engine.engine.runtime.backends import cast_inputs

    timestep = torch.tensor([700.3, 999.0, 0.25])
    assert not torch.equal(timestep.half().float(), timestep)  # what fp16 would make of them
    inputs = {
        "sample": torch.randn(3, 4, 8, 8),
        "timestep": timestep,
        "input_ids": torch.ones(3, 7, dtype=torch.int32),
    }
    cast = cast_inputs(inputs, torch.float16)
    assert cast["sample"].dtype == torch.float16
    assert cast["timestep"].dtype == torch.float32 and torch.equal(cast["timestep"], timestep)
    assert cast["input_ids"].dtype == torch.int32
