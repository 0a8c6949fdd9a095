"""The realtime path on random:tiny: LoRAs fused at export, the few-step schedulers in
every mode and the tiny VAE, each against diffusers' own pipeline; the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytest.importorskip("onnxruntime")

from conftest import reference_pipeline, run_cli  # noqa: E402
from PIL import Image  # noqa: E402
from riffusion_engine import load  # noqa: E402
from riffusion_engine.engine.runtime.requests import STEP_OPTIONS, PromptInput, Request  # noqa: E402
from riffusion_engine.engine.runtime.tensors import slerp  # noqa: E402
from riffusion_engine.export.adapters import Lora, tiny_vae  # noqa: E402
from riffusion_engine.export.models import diffusers_pipeline, random_components  # noqa: E402

FEW_STEP = ("lcm", "tcd")
STEPS = 4


def gray_levels_within_one(actual: np.ndarray, expected: np.ndarray) -> float:
    """The share of 8-bit pixel values within one gray level of diffusers' (the issue's measure)."""
    return float((np.abs(np.round(actual * 255) - np.round(expected * 255)) <= 1).mean())


def diffusers_images(
    components,
    scheduler: str,
    *,
    seed: int = 0,
    generator=None,
    image=None,
    strength=0.75,
    pipe=None,
    **kwargs,
) -> np.ndarray:
    pipe = pipe or reference_pipeline(components, "img2img" if image is not None else "text", scheduler)
    if image is not None:
        kwargs.update(image=image, strength=strength)
    else:
        kwargs.update(height=512, width=512)
    return pipe(
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        generator=generator or torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **STEP_OPTIONS.get(scheduler, {}),
        **kwargs,
    ).images


def engine_images(engine, *requests: Request) -> np.ndarray:
    return engine.images(list(requests)).cpu().numpy()


@pytest.fixture(scope="module")
def seed_image() -> Image.Image:
    # A smooth image: an encoder's output on one is stable under the runtimes' rounding.
    y, x = np.mgrid[0:512, 0:512] / 512.0
    pixels = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y), np.sin(3 * x * y)], -1) * 0.5 + 0.5
    return Image.fromarray((pixels * 255).astype(np.uint8))


def make_lora(path: Path, *, kohya: bool = False, seed: int = 7) -> Path:
    """A LoRA for random:tiny's UNet and text encoder, made with PEFT and saved as
    diffusers saves one (or renamed to kohya's key names)."""
    import safetensors.torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    components = random_components("tiny")
    torch.manual_seed(seed)
    components.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "to_out.0"]))
    text_targets = ["q_proj", "out_proj", "fc1"]
    components.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=text_targets))
    for model in (components.unet, components.text_encoder):
        for module in model.modules():
            if hasattr(module, "lora_B"):
                for layer in module.lora_B.values():
                    torch.nn.init.normal_(layer.weight, std=0.2)
    unet = get_peft_model_state_dict(components.unet)
    text = get_peft_model_state_dict(components.text_encoder)
    if not kohya:
        StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=unet, text_encoder_lora_layers=text)
        return path
    weights = {}
    for prefix, state in (("lora_unet_", unet), ("lora_te_text_model_", text)):
        for key, value in state.items():
            module, side = key.split(".lora_")
            name = prefix + module.replace(".", "_")
            weights[f"{name}.lora_{'down' if side.startswith('A') else 'up'}.weight"] = value.contiguous()
            if side.startswith("A"):
                weights[f"{name}.alpha"] = torch.tensor(4.0 if prefix == "lora_unet_" else 8.0)
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(weights, path / "kohya.safetensors")
    return path / "kohya.safetensors"


def fused_reference(lora: Path, scale: float, *, vae=None):
    """random:tiny with the LoRA loaded and fused by diffusers itself."""
    components = random_components("tiny")
    pipe = diffusers_pipeline(components)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the LoRA layers go; their fused weights stay
    components.unet, components.text_encoder = pipe.unet, pipe.text_encoder
    if vae is not None:
        components.vae = vae
    return components


# -- schedulers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheduler", [pytest.param(s, marks=pytest.mark.long) if s == "lcm" else s for s in FEW_STEP]
)
def test_few_step_schedulers_equal_diffusers_in_every_mode(tiny, torch_engine, seed_image, scheduler) -> None:
    # Text to clip.
    expected = diffusers_images(tiny, scheduler, seed=3, prompt="a funky beat")
    request = Request(PromptInput("a funky beat", 3, guidance=1.0), steps=STEPS, scheduler=scheduler)
    assert gray_levels_within_one(engine_images(torch_engine, request), expected) >= 0.99
    # A seed image at denoising 0.75: img2img's timestep rules (3 of the 4 steps).
    expected = diffusers_images(tiny, scheduler, seed=4, prompt="jazz", image=seed_image, strength=0.75)
    request = Request(
        PromptInput("jazz", 4, guidance=1.0, denoising=0.75),
        steps=STEPS,
        scheduler=scheduler,
        seed_image=seed_image,
    )
    assert gray_levels_within_one(engine_images(torch_engine, request), expected) >= 0.99
    # Riffusion's interpolation: diffusers' pipeline given the blended embeddings and the
    # slerped noise, which is what interpolation is, and the start seed's generator past
    # the draw of its noise (the few-step schedulers draw theirs next).
    alpha = 0.3
    start, end = PromptInput("jazz", 5, guidance=1.0), PromptInput("rock", 6, guidance=1.0)
    embeddings = torch.lerp(torch_engine.encode(["jazz"]), torch_engine.encode(["rock"]), alpha)
    generator = torch.Generator().manual_seed(5)
    a = torch.randn((1, 4, 64, 64), generator=generator)
    b = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(6))
    expected = diffusers_images(
        tiny, scheduler, generator=generator, prompt_embeds=embeddings, latents=slerp(alpha, a, b)
    )
    request = Request(start, end, alpha, steps=STEPS, scheduler=scheduler)
    assert gray_levels_within_one(engine_images(torch_engine, request), expected) >= 0.99
    # A mask: the kept half ends as the seed image's latents, the other half is regenerated.
    mask = np.zeros((512, 512), np.uint8)
    mask[:, 256:] = 255
    request = Request(
        PromptInput("jazz", 6, guidance=1.0, denoising=0.75),
        steps=STEPS,
        scheduler=scheduler,
        seed_image=seed_image,
        mask=Image.fromarray(mask, "L"),
    )
    latents = torch_engine.denoise([request])
    eps = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(6))  # the posterior's draw
    pixels = np.asarray(seed_image, dtype=np.float32)[None] / 255.0
    image = torch.from_numpy(pixels * 2 - 1).permute(0, 3, 1, 2)
    seed_latents = torch_engine.backend.run("vae_encoder", {"image": image, "noise": eps})
    assert torch.equal(latents[..., :32], seed_latents[..., :32])
    assert (latents[..., 32:] - seed_latents[..., 32:]).abs().max() > 0.1


# -- LoRAs and the tiny VAE ------------------------------------------------------------


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return make_lora(tmp_path_factory.mktemp("lora") / "peft")


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("onnxruntime", marks=pytest.mark.long),
        pytest.param("openvino", marks=pytest.mark.long),
    ],
)
def test_a_fused_lora_and_the_tiny_vae_equal_diffusers(lora, seed_image, backend, tmp_path) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    engine = load("random:tiny", backend=backend, loras=[f"{lora}:0.7"], vae="tiny", cache_dir=tmp_path)
    components = fused_reference(lora, 0.7, vae=tiny_vae("tiny", random_preset=True))
    expected = diffusers_images(components, "lcm", seed=3, prompt="a funky beat")
    request = Request(PromptInput("a funky beat", 3, guidance=1.0), steps=STEPS, scheduler="lcm")
    assert gray_levels_within_one(engine_images(engine, request), expected) >= 0.99
    # A seed image through the tiny VAE's encoder (deterministic: no posterior draw).
    expected = diffusers_images(components, "lcm", seed=4, prompt="jazz", image=seed_image, strength=0.75)
    request = Request(
        PromptInput("jazz", 4, guidance=1.0), steps=STEPS, scheduler="lcm", seed_image=seed_image
    )
    assert gray_levels_within_one(engine_images(engine, request), expected) >= 0.99
    # The LoRA changed the model: the base model's image is another.
    base = diffusers_images(random_components("tiny"), "lcm", seed=3, prompt="a funky beat")
    assert (
        gray_levels_within_one(
            engine_images(
                engine, Request(PromptInput("a funky beat", 3, guidance=1.0), steps=STEPS, scheduler="lcm")
            ),
            base,
        )
        < 0.9
    )
    if backend != "torch":
        manifest = engine.backend.manifest
        assert manifest.raw["model"]["loras"][0]["scale"] == 0.7
        assert manifest.raw["model"]["vae"]["source"] == "random"
        assert [t.name for t in manifest.stage("vae_encoder").spec.inputs] == ["image"]


def test_kohya_names_load_as_the_same_lora(lora, tmp_path) -> None:
    from riffusion_engine.export.adapters import Variant
    from riffusion_engine.export.models import load_components

    kohya = make_lora(tmp_path / "kohya", kohya=True)
    ours = load_components("random:tiny", variant=Variant((Lora(str(kohya), 0.5),)))
    theirs = fused_reference(lora, 0.5)
    for name in ("unet", "text_encoder"):
        mine, want = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert mine.keys() == want.keys()
        assert max((mine[k] - want[k]).abs().max().item() for k in mine) < 1e-6
    base = random_components("tiny").text_encoder.state_dict()
    assert max((ours.text_encoder.state_dict()[k] - base[k]).abs().max().item() for k in base) > 1e-3


# -- refusals and the profile ----------------------------------------------------------


def one_line_error(*argv: str) -> str:
    code, _out, err = run_cli(*argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_a_lora_that_does_not_fit_is_one_line_before_any_export(lora, tmp_path) -> None:
    import safetensors.torch

    weights = safetensors.torch.load_file(lora / "pytorch_lora_weights.safetensors")
    down = next(k for k in weights if k.startswith("unet.") and "lora_A" in k)
    cases = {
        "unknown": (
            {**weights, "unet.down_blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 32)},
            "down_blocks.9",
        ),
        "shape": ({**weights, down: torch.zeros(4, 48)}, "input size is 32"),
        # An SDXL LoRA names a second text encoder, which Stable Diffusion 1.5 lacks.
        "sdxl": (
            {**weights, "text_encoder_2.encoder.layers.0.q_proj.lora_A.weight": torch.zeros(4, 32)},
            "text_encoder_2",
        ),
    }
    for name, (state, expected) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file(state, path)
        line = one_line_error(
            "generate",
            "x",
            "--model",
            "random:tiny",
            "--lora",
            str(path),
            "--cache-dir",
            str(tmp_path / "cache"),
            "-o",
            str(tmp_path / "x.wav"),
        )
        assert "does not fit this model" in line and expected in line, line
    assert not list(tmp_path.rglob("*.onnx"))  # refused before any stage was exported


def test_the_realtime_profile_on_a_real_checkpoint_needs_a_lora(tiny, tmp_path) -> None:
    model = tiny.save(tmp_path / "model")
    line = one_line_error(
        "generate", "x", "--model", str(model), "--profile", "realtime", "-o", str(tmp_path / "x.wav")
    )
    assert "needs a few-step LoRA" in line and "latent-consistency/lcm-lora-sdv1-5" in line


def test_generate_with_the_realtime_profile_says_what_it_used(tmp_path) -> None:
    code, out, err = run_cli(
        "generate",
        "jazz",
        "--model",
        "random:tiny",
        "--profile",
        "realtime",
        "--backend",
        "torch",
        "--scheduler",
        "tcd",
        "-o",
        str(tmp_path / "x.wav"),
    )
    assert code == 0, err
    first = out.splitlines()[0]
    # The profile's choices, but the scheduler given on the command line.
    assert first.startswith("profile realtime: tcd 4 steps, guidance off, backend torch"), first
    assert "tiny VAE" in first and "LoRA random:lora" in first
    assert "(4 UNet calls" in out


@pytest.mark.long
def test_the_server_runs_its_profile_whatever_the_client_asks() -> None:
    """serve --profile realtime: the web app's request (50 steps, guidance 7) runs at the
    profile's 4 LCM steps with guidance off; /stream says its profile and refuses another."""
    import base64
    import io
    import json

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import soundfile
    from riffusion_engine.engine.runtime.seeds import seed_image
    from riffusion_engine.engine.serve.app import background, create_app
    from riffusion_engine.engine.serve.config import ServerConfig
    from websockets.sync.client import connect

    engine = load("random:tiny", backend="torch", profile="realtime")
    ends = [
        {"prompt": p, "seed": s, "denoising": 0.75, "guidance": 7.0} for p, s in (("jazz", 4), ("rock", 5))
    ]
    body = {"alpha": 0.25, "num_inference_steps": 50, "seed_image_id": "og_beat", "format": "wav"}
    body.update(start=ends[0], end=ends[1])
    with background(create_app(engine, ServerConfig(max_steps=1000))) as url:
        answer = httpx.post(url + "/run_inference/", json=body, timeout=300)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Inference-Steps"] == "4"
        encoded = answer.json()["audio"].split(",", 1)[1]
        audio, _ = soundfile.read(io.BytesIO(base64.b64decode(encoded)), dtype="int16")
        start, end = (PromptInput(e["prompt"], e["seed"], None, 1.0, 0.75) for e in ends)
        request = Request(start, end, 0.25, 4, 512, "lcm", seed_image("og_beat"))
        (expected,) = engine.run([request])
        np.testing.assert_array_equal(audio, expected.audio[0])
        socket_url = url.replace("http://", "ws://") + "/stream"
        message = {"type": "start", "start": {"prompt": "jazz", "seed": 1}, "num_inference_steps": 50}
        with connect(socket_url) as ws:
            ws.send(json.dumps({**message, "profile": "default"}))
            event = json.loads(ws.recv(timeout=120))
            assert event["type"] == "error" and event["field"] == "profile", event
        with connect(socket_url) as ws:
            ws.send(json.dumps({**message, "profile": "realtime"}))
            event = json.loads(ws.recv(timeout=120))
            assert event["type"] == "ready", event
            assert (event["profile"], event["scheduler"], event["steps"], event["guidance"]) == (
                "realtime",
                "lcm",
                4,
                1.0,
            )


@pytest.mark.long
def test_an_export_for_guidance_off_takes_one_unet_row_per_clip(tmp_path) -> None:
    """The realtime profile's export: its UNet's profile is one row per clip (TensorRT tunes
    for one), and a guided request is refused before any compute."""
    from riffusion_engine.engine.runtime.tensorrt_runtime import tensorrt_provider_options
    from riffusion_engine.kernels import RiffusionError

    engine = load("random:tiny", backend="onnxruntime", profile="realtime", cache_dir=tmp_path)
    manifest = engine.backend.manifest
    (sample,) = [t for t in manifest.stage("unet").spec.inputs if t.name == "sample"]
    batch = sample.shape[0]
    assert (batch.min, batch.opt, batch.max) == (1, 1, manifest.profile.max_batch)
    options = tensorrt_provider_options(manifest.stage("unet").spec, cache=tmp_path / "trt", fp16=True)
    assert options["trt_profile_opt_shapes"].startswith("sample:1x4x")
    with pytest.raises(RiffusionError, match="guidance off"):
        engine.generate("jazz", guidance=7.0)
    assert engine.generate("jazz").timings["unet_steps"] == 4
    # The manifest says the profile, and loading the directory runs it.
    assert manifest.raw["run_profile"] == "realtime"
    again = load(artifacts=manifest.directory, backend="onnxruntime")
    assert (again.scheduler, again.steps, again.guidance) == ("lcm", 4, 1.0)


def test_lora_specs_and_profile_resolution() -> None:
    from riffusion_engine.engine.runtime.profiles import resolve
    from riffusion_engine.export.adapters import RANDOM_LORA
    from riffusion_engine.kernels import RiffusionError

    assert Lora.parse("owner/name:0.5") == Lora("owner/name", 0.5)
    assert Lora.parse("owner/name") == Lora("owner/name", 1.0)
    assert Lora.parse("random:lora") == Lora("random:lora", 1.0)  # no number after the colon
    with pytest.raises(RiffusionError, match="finite"):
        Lora.parse("x.safetensors:nan")
    choices = resolve("realtime", model="random:tiny", steps=2)
    assert (choices.scheduler, choices.steps, choices.guidance, choices.vae) == ("lcm", 2, 1.0, "tiny")
    assert choices.loras == (Lora(RANDOM_LORA),)
    # Explicit choices win, part by part; the default profile changes nothing.
    mine = resolve(
        "realtime", model="random:tiny", backend="torch", vae=None, loras=["a/b:0.3"], guidance=2.0
    )
    assert (mine.backend, mine.precision, mine.loras, mine.guidance) == (
        "torch",
        "fp32",
        (Lora("a/b", 0.3),),
        2.0,
    )
    plain = resolve("default", model="random:tiny")
    assert (plain.scheduler, plain.steps, plain.guidance, plain.vae, plain.loras) == (
        "pndm",
        50,
        7.0,
        None,
        (),
    )
    assert resolve("realtime", model="random:tiny", device="cuda").precision == "fp16"
    with pytest.raises(RiffusionError, match="needs a few-step LoRA"):
        resolve("realtime", model="riffusion/riffusion-model-v1")
