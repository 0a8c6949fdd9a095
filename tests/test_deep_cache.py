"""DeepCache on random:tiny: the engine's cached runs against the method's own
implementation (the DeepCache package's DeepCacheSDHelper on diffusers' pipeline, same
interval and branch, the realtime profile's LCM scheduler), on every CPU backend; the
shallow stage's export; the cache-state rules; ``--deep-cache 0`` against today's run;
a stream with DeepCache."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
DeepCache = pytest.importorskip("DeepCache")
pytest.importorskip("onnxruntime")

from conftest import run_cli  # noqa: E402
from PIL import Image  # noqa: E402
from riffusion_engine import Stream, load  # noqa: E402
from riffusion_engine.engine.runtime.backends import Backend  # noqa: E402
from riffusion_engine.engine.runtime.deep_cache import parse_deep_cache  # noqa: E402
from riffusion_engine.engine.runtime.requests import PromptInput, Request  # noqa: E402
from riffusion_engine.kernels import RiffusionError  # noqa: E402
from test_realtime import diffusers_images, gray_levels_within_one  # noqa: E402

STEPS = 4


def package_branch(branch: int, layers_per_block: int) -> int:
    """The package's cache_branch_id of our branch: it numbers 3 up layers per block (SD
    1.5's); random:tiny's blocks have ``layers_per_block + 1``."""
    block, layer = divmod(branch, layers_per_block + 1)
    return block * 3 + layer


def realtime_components():
    """random:tiny as the realtime profile runs it: the random LoRA fused, the tiny VAE."""
    from riffusion_engine.export.adapters import RANDOM_LORA, Lora, Variant
    from riffusion_engine.export.models import load_components

    return load_components("random:tiny", variant=Variant((Lora(RANDOM_LORA),), "tiny"))


def oracle_images(components, interval: int, branch: int, **kwargs) -> np.ndarray:
    """diffusers' LCM pipeline with DeepCacheSDHelper enabled for this one call."""
    from conftest import reference_pipeline

    pipe = reference_pipeline(components, "img2img" if "image" in kwargs else "text", "lcm")
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(
        cache_interval=interval,
        cache_branch_id=package_branch(branch, components.unet.config.layers_per_block),
    )
    helper.enable()  # its step count starts at the first step this call runs
    try:
        return diffusers_images(components, "lcm", pipe=pipe, **kwargs)
    finally:
        helper.disable()


@pytest.fixture(scope="module")
def components():
    return realtime_components()


@pytest.fixture(scope="module")
def seed_image() -> Image.Image:
    y, x = np.mgrid[0:512, 0:512] / 512.0
    pixels = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y), np.sin(3 * x * y)], -1) * 0.5 + 0.5
    return Image.fromarray((pixels * 255).astype(np.uint8))


def both_modes(engine, components, interval: int, branch: int, seed_image) -> None:
    """Text to clip, and the web app's mode (a seed image at denoising 0.75: 3 of 4 steps),
    against the oracle; the text clip is also far nearer the oracle than the uncached run
    (the cache is used, not skipped)."""
    text = Request(PromptInput("a funky beat", 3, guidance=1.0), steps=STEPS, scheduler="lcm")
    expected = oracle_images(components, interval, branch, seed=3, prompt="a funky beat")
    got = engine.images([text]).cpu().numpy()
    assert gray_levels_within_one(got, expected) >= 0.99
    uncached = diffusers_images(components, "lcm", seed=3, prompt="a funky beat")
    assert np.abs(got - expected).mean() < 0.1 * np.abs(got - uncached).mean()
    webapp = Request(
        PromptInput("jazz", 4, guidance=1.0, denoising=0.75),
        steps=STEPS,
        scheduler="lcm",
        seed_image=seed_image,
    )
    expected = oracle_images(
        components, interval, branch, seed=4, prompt="jazz", image=seed_image, strength=0.75
    )
    timings: dict[str, float] = {}
    got = engine.images([webapp], timings=timings).cpu().numpy()
    assert gray_levels_within_one(got, expected) >= 0.99
    assert timings["unet_steps"] == 3 and timings["unet_full_calls"] == len(range(0, 3, interval))


@pytest.mark.parametrize("interval, branch", [(2, 0), (3, 1), (2, 3)])
def test_torch_equals_deepcache_on_diffusers(components, seed_image, interval, branch) -> None:
    engine = load("random:tiny", backend="torch", profile="realtime", deep_cache=f"{interval}:{branch}")
    assert engine.deep_cache is not None and (engine.deep_cache.interval, engine.deep_cache.branch) == (
        interval,
        branch,
    )
    both_modes(engine, components, interval, branch, seed_image)


@pytest.mark.long  # an export with the shallow stage per backend; the torch backend runs in every run
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_backends_equal_deepcache_on_diffusers(components, seed_image, backend, tmp_path) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    engine = load(
        "random:tiny",
        backend=backend,
        profile="realtime",
        precision="fp32",
        deep_cache="2:1",
        cache_dir=tmp_path,
    )
    both_modes(engine, components, 2, 1, seed_image)


def test_the_shallow_stage_is_exported_verified_and_holds_no_deep_weights(tmp_path) -> None:
    import onnx

    out = tmp_path / "tiny-deep"
    code, _, stderr = run_cli(
        "export", "--model", "random:tiny", "--deep-cache", "3:0", "-o", str(out), "-q", "--no-fuse"
    )
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"])[:3] == ["text_encoder", "unet", "unet_shallow"]
    assert manifest["profile"]["deep_cache_branch"] == 0
    unet, shallow = manifest["stages"]["unet"], manifest["stages"]["unet_shallow"]
    assert [t["name"] for t in unet["spec"]["outputs"]] == ["noise_pred", "deep_feature"]
    assert [t["name"] for t in shallow["spec"]["inputs"]][-1] == "deep_feature"
    # Verified against torch: the feature as well as the noise, and the shallow stage.
    assert set(unet["verification"]["onnx"]) == {"noise_pred", "deep_feature"}
    assert shallow["verification"]["onnx"]["noise_pred"]["max_rel"] <= 1e-4
    # Branch 0 on random:tiny: the shallow graph keeps conv_in, the time embedding, the
    # last up block's last layer and conv_out; no mid or deeper block weight.
    model = onnx.load(str(out / "unet_shallow.onnx"))
    weights = sum(int(np.prod(w.dims)) for w in model.graph.initializer)
    full = sum(int(np.prod(w.dims)) for w in onnx.load(str(out / "unet.onnx")).graph.initializer)
    assert weights < full / 3
    assert not [w.name for w in model.graph.initializer if "mid_block" in w.name or "down_blocks.1" in w.name]
    # Another branch is another export (its own cache key), and run with another branch refused.
    with pytest.raises(
        RiffusionError,
        match=r"branch 1; this onnxruntime backend has branch 0's: export with --deep-cache 2:1",
    ):
        load(artifacts=out, backend="onnxruntime", deep_cache="2:1")
    engine = load(artifacts=out, backend="onnxruntime", deep_cache="2")
    assert engine.deep_cache is not None and engine.deep_cache.branch == 0  # the export's own


class Counting(Backend):
    """Another backend, counting its UNet calls by stage, per run."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.deep_cache_branch = inner.deep_cache_branch
        self.calls: list[str] = []

    def run(self, stage: str, inputs):
        if stage.startswith("unet"):
            self.calls.append(stage)
        return self.inner.run(stage, inputs)


def test_cache_state_rules(torch_engine) -> None:
    from riffusion_engine.engine.runtime.pipeline import Engine
    from riffusion_engine.engine.runtime.requests import Blend

    engine = load("random:tiny", backend="torch", deep_cache="3:0")
    counting = Counting(engine.backend)
    engine = Engine(
        counting, engine.tokenizer, engine.scheduler_config, engine.shape, deep_cache=engine.deep_cache
    )
    request = Request(PromptInput("jazz", 1, guidance=1.0), steps=7, scheduler="lcm", width=256)
    engine.images([request])
    # The first step full, then a full call every 3 steps.
    assert counting.calls == ["unet", "unet_shallow", "unet_shallow"] * 2 + ["unet"]
    # Every clip starts full: a second clip does not reuse the first's feature, and a
    # steered stream's clip (a blend at its start) starts full like any other.
    counting.calls = []
    steered = Request(
        Blend(PromptInput("jazz", 1, guidance=1.0), PromptInput("rock", 2, guidance=1.0), 0.5),
        PromptInput("lofi", 3, guidance=1.0),
        0.25,
        steps=4,
        scheduler="lcm",
        width=256,
    )
    engine.images([steered])
    assert counting.calls[0] == "unet"
    # A batch: its clips start together and share each call's cache state; each clip
    # equals the same request run alone, with guidance (two rows per clip) too.
    a = Request(PromptInput("jazz", 1, guidance=3.0), steps=5, scheduler="lcm", width=256)
    b = Request(PromptInput("rock", 2, guidance=3.0), steps=5, scheduler="lcm", width=256)
    batch = engine.images([a, b])
    alone = torch.cat([engine.images([a]), engine.images([b])])
    assert (batch - alone).abs().max() < 1e-5


def test_deep_cache_off_is_todays_run_bitwise(torch_engine) -> None:
    request = Request(PromptInput("jazz", 1, guidance=1.0), steps=4, scheduler="lcm", width=256)
    today = torch_engine.images([request])
    off = load("random:tiny", backend="torch", deep_cache="0")
    assert off.deep_cache is None
    assert torch.equal(off.images([request]), today)
    # The DeepCache stages loaded but not used: the UNet's noise is the same computation.
    from riffusion_engine.engine.runtime.backends import TorchBackend
    from riffusion_engine.engine.runtime.pipeline import Engine
    from riffusion_engine.export.models import load_components

    backend = TorchBackend(load_components("random:tiny"), deep_cache_branch=2)
    engine = Engine(backend, torch_engine.tokenizer, torch_engine.scheduler_config, torch_engine.shape)
    assert torch.equal(engine.images([request]), today)


def test_a_stream_with_deep_cache_joins_and_keeps_its_length() -> None:
    from test_stream import FAST, naive_join, own_jumps

    engine = load("random:tiny", backend="torch", profile="realtime", deep_cache="2:0")
    with Stream.open(engine, "jazz", "techno", seed_image=None, max_clips=3, **FAST) as stream:
        chunks = list(stream)
    clips = [c.clip for c in chunks[:-1]]
    for chunk in chunks[:-1]:
        (alone,) = engine.run([chunk.request])
        assert np.array_equal(chunk.clip.audio, alone.audio)
        assert alone.timings["unet_full_calls"] == 2  # 3 steps: full, shallow, full
    joined = np.concatenate([c.audio for c in chunks], 1)
    assert joined.shape[-1] == stream.length_samples(3)
    assert np.array_equal(joined, naive_join([c.audio for c in clips], stream.overlap_samples))
    own, jumps = own_jumps(chunks)
    assert max(jumps) <= own


@pytest.mark.parametrize(
    "value, message",
    [
        ("x", r"--deep-cache takes INTERVAL\[:BRANCH\]"),
        ("2:x", r"--deep-cache takes INTERVAL\[:BRANCH\]"),
        ("-1", "interval must be >= 0"),
        ("99", "interval must be 2..50"),
        ("2:-1", "branch must be an integer >= 0"),
    ],
)
def test_bad_deep_cache_values_are_one_line(value, message) -> None:
    with pytest.raises(RiffusionError, match=message):
        parse_deep_cache(value)


def test_cli_says_what_deep_cache_runs_and_refuses_a_branch_the_unet_lacks(tmp_path) -> None:
    out = tmp_path / "a.wav"
    code, stdout, stderr = run_cli(
        "generate", "jazz", "--model", "random:tiny", "--backend", "torch", "--profile", "realtime",
        "--deep-cache", "2", "--width", "256", "-o", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    first = stdout.splitlines()[0]
    assert "DeepCache 2:0 (interval:branch)" in first
    assert "4 UNet calls, 2 full and 2 shallow" in stdout
    code, stdout, stderr = run_cli(
        "generate",
        "jazz",
        "--model",
        "random:tiny",
        "--backend",
        "torch",
        "--deep-cache",
        "2:9",
        "-o",
        str(out),
    )
    assert code == 2 and "DeepCache branch must be 0..3 for this UNet" in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.long
def test_an_int8_export_quantizes_both_unet_stages_and_runs_cached(tmp_path) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from dataclasses import replace

    from riffusion_engine.engine.runtime.calibration import collect
    from riffusion_engine.export.exporter import export
    from riffusion_engine.export.specs import ShapeProfile
    from test_int8 import int8_config, small_plan

    config = int8_config(small_plan())
    config = replace(config, profile=ShapeProfile(guidance=False, deep_cache_branch=1))
    out = tmp_path / "int8-deep"
    export(config, out, progress=False, calibrate=collect)
    manifest = json.loads((out / "manifest.json").read_text())
    for stage in ("unet", "unet_shallow"):
        record = manifest["stages"][stage]
        assert f"{stage}.int8.xml" in record["files"]
        check = record["int8"]["verification"]
        assert check["int8"]["rel_rms"] <= check["bound"]
        assert (
            check["held_out_samples"]
            == manifest["stages"]["unet"]["int8"]["verification"]["held_out_samples"]
        )
    # Run int8 with DeepCache: near the fp32 stages' cached run of the same export.
    request = Request(PromptInput("jazz", 2, guidance=1.0), steps=4, scheduler="lcm", width=256)
    int8 = load(artifacts=out, backend="openvino", precision="int8", deep_cache="2")
    fp32 = load(artifacts=out, backend="openvino", precision="fp32", deep_cache="2")
    assert int8.backend.model_path("unet_shallow").name == "unet_shallow.int8.xml"
    timings: dict[str, float] = {}
    a = int8.images([request], timings=timings).numpy()
    b = fp32.images([request]).numpy()
    assert timings["unet_full_calls"] == 2
    assert np.abs(a - b).mean() < 0.05


@pytest.mark.long
def test_fp16_and_fused_exports_verify_both_unet_stages(tmp_path) -> None:
    for name, flags in (("fp16", ("--precision", "fp16")), ("fused", ())):
        out = tmp_path / name
        code, _, stderr = run_cli(
            "export", "--model", "random:tiny", "--deep-cache", "2:1", "-o", str(out), "-q", *flags
        )
        assert code == 0, stderr
        manifest = json.loads((out / "manifest.json").read_text())
        for stage in ("unet", "unet_shallow"):
            record = manifest["stages"][stage]
            assert record["precision"] == ("fp16" if name == "fp16" else "fp32")
            assert record["fusions"], (name, stage)  # ONNX Runtime's transformer fusions ran on it
            report = record["verification"]["onnx"]
            assert all(e["max_rel"] <= e["tolerance"] for e in report.values())
        # Runs cached on ONNX Runtime, near the torch backend's cached run.
        engine = load(artifacts=out, backend="onnxruntime", deep_cache="2")
        request = Request(PromptInput("jazz", 2), steps=4, width=256)
        torch_run = load("random:tiny", backend="torch", deep_cache="2:1").images([request]).numpy()
        got = engine.images([request]).numpy()
        assert gray_levels_within_one(got, torch_run) >= (0.95 if name == "fp16" else 0.99)


def test_the_shallow_stage_has_its_own_tensorrt_profile_sized_from_the_latents() -> None:
    """Stable Diffusion 1.5's sizes: branch 0 keeps 320 channels at the latents' size,
    branch 3 the 640 of the second block's input at half of it, branch 11 the mid block's
    1280 at an eighth; the profile's min/opt/max follow the export's widths and rows."""
    pytest.importorskip("polygraphy")
    from riffusion_engine.export.specs import ModelDims, ShapeProfile, stage_specs
    from riffusion_engine.export.tensorrt_build import optimization_profile

    dims = ModelDims(
        tokens=77, vocab=49408, text_hidden=768, latent_channels=4, vae_factor=8, unet_factor=8,
        block_channels=(320, 640, 1280, 1280), layers_per_block=2,
    )  # fmt: skip
    for branch, (channels, down) in {0: (320, 1), 2: (640, 1), 3: (640, 2), 11: (1280, 8)}.items():
        specs = stage_specs(dims, ShapeProfile(max_width=1024, guidance=False, deep_cache_branch=branch))
        feature = specs["unet"].outputs[1]
        shallow = specs["unet_shallow"]
        assert shallow.input_shapes("min")["deep_feature"] == (1, channels, 64 // down, 32 // down)
        assert shallow.input_shapes("opt")["deep_feature"] == (1, channels, 64 // down, 64 // down)
        assert shallow.input_shapes("max")["deep_feature"] == (4, channels, 64 // down, 128 // down)
        assert feature.size("opt") == shallow.input_shapes("opt")["deep_feature"]
        profile = optimization_profile(shallow)
        assert tuple(profile["deep_feature"].max) == (4, channels, 64 // down, 128 // down)
    with pytest.raises(RiffusionError, match=r"DeepCache branch must be 0\.\.11"):
        stage_specs(dims, ShapeProfile(deep_cache_branch=12))
