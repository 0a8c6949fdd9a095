"""int8 on the CPU, on random:tiny: an int8 export from the engine's own sampling to its
manifest and cache hit; the held-out check refusing broken quantizations; the precision
each CPU class runs; OpenVINO's model cache; generate's memory."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")

from riffusion_engine import load  # noqa: E402
from riffusion_engine.engine.runtime.calibration import collect  # noqa: E402
from riffusion_engine.engine.runtime.cpu import CPU_CLASSES, auto_precision  # noqa: E402
from riffusion_engine.engine.runtime.loading import export_fields  # noqa: E402
from riffusion_engine.engine.runtime.profiles import resolve  # noqa: E402
from riffusion_engine.export.adapters import Variant  # noqa: E402
from riffusion_engine.export.calibration import CalibrationPlan, ClipStore, shipped_prompts  # noqa: E402
from riffusion_engine.export.exporter import ExportConfig, cache_key_fields, export  # noqa: E402
from riffusion_engine.export.openvino_export import (  # noqa: E402
    DEFAULT_SCHEME,
    INT8_TOLERANCE,
    check_int8,
    computes_bf16,
    ir_path,
    quantize_unet,
    scheme,
)
from riffusion_engine.export.specs import ShapeProfile  # noqa: E402
from riffusion_engine.export.verify import VerificationError  # noqa: E402
from riffusion_engine.kernels import RiffusionError  # noqa: E402

# A smaller plan than an export's own (64 calibration clips, 8 held out): seconds on tiny.
CLIPS, HELD_OUT = 16, 4


def small_plan() -> CalibrationPlan:
    return replace(CalibrationPlan.of("lcm", 4, 1.0), clips=CLIPS, held_out_clips=HELD_OUT)


def int8_config(plan: CalibrationPlan) -> ExportConfig:
    choices = resolve("realtime", model="random:tiny", backend="openvino", precision="int8")
    fields = {**export_fields(choices), "calibration": plan}
    return ExportConfig(
        model="random:tiny",
        **fields,
        variant=Variant(choices.loras, choices.vae),
        profile=ShapeProfile(guidance=False),
        run_profile="realtime",
    )


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "export"
    result = export(int8_config(small_plan()), out, progress=False, calibrate=collect)
    assert not result.cache_hit
    return out


@pytest.fixture(scope="module")
def calibration(int8_export, tmp_path_factory):
    """The small plan's inputs again, collected on the export's own fp32 stages."""
    plan = replace(small_plan(), widths=(256, 512))
    return collect(int8_export, plan, ClipStore(tmp_path_factory.mktemp("clips")), False)


def test_an_int8_export_records_its_calibration_and_is_reused(int8_export) -> None:
    from importlib.metadata import version

    manifest = json.loads((int8_export / "manifest.json").read_text())
    assert (manifest["target"], manifest["precision"]) == ("openvino", "int8")
    unet = manifest["stages"]["unet"]
    assert {"unet.xml", "unet.bin", "unet.int8.xml", "unet.int8.bin"} <= set(unet["files"])
    assert all(f"{name}.xml" in s["files"] for name, s in manifest["stages"].items())
    int8 = unet["int8"]
    assert int8["scheme"]["name"] == DEFAULT_SCHEME and int8["nncf"] == version("nncf")
    calibration = int8["calibration"]
    # The plan's clips: one call kept per calibration clip, every call of a held-out one.
    assert calibration["samples"] == CLIPS
    assert calibration["held_out_samples"] == HELD_OUT // 2 * (4 + 3)  # text: 4 calls, seed image: 3
    assert len(calibration["sha256"]) == 64
    prompts, held_out = shipped_prompts()
    assert len(prompts) >= 64 and not set(prompts) & set(held_out)
    assert calibration["prompts"] == hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    check = int8["verification"]
    assert check["int8"]["rel_rms"] <= check["bound"] == INT8_TOLERANCE
    # bf16's error on the same held-out calls, recorded beside it where the CPU computes bf16.
    assert (check["bf16"] is not None) == computes_bf16()
    if check["bf16"] is not None:
        assert 0 < check["bf16"]["rel_rms"] < check["int8"]["rel_rms"]
    # The scheme, NNCF's version and the calibration plan are in the cache key.
    assert manifest["key_fields"]["int8"]["calibration"]["clips"] == CLIPS
    assert manifest["key_fields"]["int8"]["nncf"] == version("nncf")
    # Exporting again reuses it; its calibration clips were removed once it was in place.
    again = export(int8_config(small_plan()), int8_export, progress=False, calibrate=collect)
    assert again.cache_hit
    assert not list(int8_export.parent.glob(".export.calibration-*"))


def test_the_calibration_plan_and_scheme_change_the_key() -> None:
    base = cache_key_fields(int8_config(small_plan()))
    other_seeds = cache_key_fields(int8_config(replace(small_plan(), seeds=(5, 6))))
    other_scheme = cache_key_fields(replace(int8_config(small_plan()), int8_scheme="transformer"))
    assert base != other_seeds and base != other_scheme
    assert base["int8"]["scheme"]["name"] == DEFAULT_SCHEME


def test_int8_runs_near_fp32_and_far_from_another_clip(int8_export) -> None:
    """The int8 engine against the fp32 one on the same export, seed and prompt: much
    nearer than the fp32 clip of another seed is."""
    fp32 = load(artifacts=int8_export, backend="openvino", precision="fp32")
    int8 = load(artifacts=int8_export, backend="openvino", precision="int8")
    assert int8.choices.precision == "int8" and int8.backend.model_path("unet").name == "unet.int8.xml"
    for seed_image in (None, "og_beat"):
        from riffusion_engine.engine.runtime.seeds import seed_image as make

        image = None if seed_image is None else make(seed_image)
        a = np.asarray(fp32.generate("held-out jazz", seed=11, seed_image=image).image, dtype=float)
        b = np.asarray(int8.generate("held-out jazz", seed=11, seed_image=image).image, dtype=float)
        other = np.asarray(fp32.generate("held-out jazz", seed=12, seed_image=image).image, dtype=float)
        assert np.abs(b - a).mean() < 0.25 * np.abs(other - a).mean()


@pytest.mark.long  # one more quantization; a corrupted weight is refused in every run
def test_the_held_out_check_refuses_a_calibration_scaled_by_1e3(int8_export, calibration, tmp_path) -> None:
    scaled = replace(
        calibration,
        samples=[{k: v * 1e3 if k != "timestep" else v for k, v in s.items()} for s in calibration.samples],
    )
    broken = tmp_path / "unet.int8.xml"
    quantize_unet(ir_path(int8_export, "unet"), broken, scaled, scheme(DEFAULT_SCHEME), progress=False)
    with pytest.raises(VerificationError, match=r"differs from the fp32 stage by .*the bound is"):
        check_int8(broken, ir_path(int8_export, "unet"), calibration, float_precision="fp32", bf16=False)


def test_the_held_out_check_refuses_a_weight_corrupted_after_quantization(
    int8_export, calibration, tmp_path
) -> None:
    fp32_xml = ir_path(int8_export, "unet")
    # The export's own int8 UNet passes the check it passed when it was made.
    check_int8(
        ir_path(int8_export, "unet", int8=True), fp32_xml, calibration, float_precision="fp32", bf16=False
    )
    model = ov.Core().read_model(str(ir_path(int8_export, "unet", int8=True)))
    weights = [
        op
        for op in model.get_ops()
        if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
    ]
    assert weights, "an int8 UNet stores int8 weights"
    largest = max(weights, key=lambda op: int(np.prod(op.get_output_shape(0))))
    values = largest.get_data().copy()
    corrupted = ov.opset13.constant(-values, ov.Type.i8)  # every weight of one layer negated
    largest.output(0).replace(corrupted.output(0))
    broken = tmp_path / "unet.int8.xml"
    ov.save_model(model, str(broken), compress_to_fp16=False)
    with pytest.raises(VerificationError, match="int8 UNet differs from the fp32 stage"):
        check_int8(broken, fp32_xml, calibration, float_precision="fp32", bf16=False)


@pytest.mark.parametrize(
    ("features", "precision"),
    [
        (
            ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"),
            "int8",
        ),
        (("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"), "int8"),  # Zen 4, Cooper Lake
        (("avx2", "fma", "avx512f", "avx512_vnni"), "int8"),  # Cascade Lake, Ice Lake
        (("avx2", "fma"), "int8"),  # AVX2 only
        ((), "fp32"),
    ],
)
def test_the_precision_each_cpu_class_runs(features, precision) -> None:
    chosen, why = auto_precision(features)
    assert chosen == precision and why.startswith("auto: ")
    choices = resolve("realtime", model="random:tiny", backend="openvino", features=features, int8=True)
    assert choices.precision == precision and any(n.startswith("auto: ") for n in choices.notes)
    assert choices.describe().startswith(
        f"profile realtime: lcm 4 steps, guidance off, backend openvino, precision {precision}"
    )
    # An explicit precision wins, whatever the class.
    assert (
        resolve(
            "realtime", model="random:tiny", backend="openvino", precision="bf16", features=features
        ).precision
        == "bf16"
    )
    # Without an int8 UNet to run (an export without one), the class's best float.
    fallback = resolve(
        "realtime", model="random:tiny", backend="openvino", features=features, int8=False, exported=True
    )
    bf16 = "avx512_bf16" in features
    assert fallback.precision == ("bf16" if bf16 else "fp32")
    assert [c.name for c in CPU_CLASSES] == ["AMX", "AVX-512 BF16 + VNNI", "AVX-512 VNNI", "AVX2"]


def test_int8_is_the_openvino_backends(int8_export, tiny_export, tmp_path) -> None:
    import shutil

    with pytest.raises(RiffusionError, match="int8 is the openvino backend's precision"):
        load(artifacts=int8_export, backend="onnxruntime", precision="int8")
    with pytest.raises(RiffusionError, match="openvino target"):
        ExportConfig(model="random:tiny", precision="int8")
    with pytest.raises(RiffusionError, match=r"an openvino export .* or an unfused fp32 ONNX export"):
        load(artifacts=tiny_export[0], backend="openvino")  # ONNX Runtime's fused files
    # An openvino export without an int8 UNet: its manifest says so.
    fp32 = tmp_path / "fp32"
    shutil.copytree(int8_export, fp32, ignore=shutil.ignore_patterns("openvino-cache"))
    manifest = json.loads((fp32 / "manifest.json").read_text())
    del manifest["stages"]["unet"]["int8"]
    (fp32 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RiffusionError, match="has no int8 UNet; make one with"):
        load(artifacts=fp32, backend="openvino", precision="int8")
    # Its realtime profile's auto precision falls back to the best float, and says why.
    engine = load(artifacts=fp32, backend="openvino")
    assert engine.choices.precision in ("bf16", "fp32")
    assert any("no int8 UNet" in note for note in engine.choices.notes)


def test_a_second_load_compiles_nothing(int8_export, tmp_path) -> None:
    from riffusion_engine.engine.runtime.backends import OpenVinoBackend

    images = []
    for first in (True, False):
        engine = load(
            artifacts=int8_export, backend="openvino", precision="int8", model_cache=tmp_path / "cache"
        )
        backend = engine.backend
        assert isinstance(backend, OpenVinoBackend) and backend.model_cache == tmp_path / "cache"
        images.append(np.asarray(engine.generate("a cached beat", seed=3).image))
        assert set(backend.loaded_from_cache) == {"text_encoder", "unet", "vae_decoder"}
        assert all(v is not first for v in backend.loaded_from_cache.values()), backend.loaded_from_cache
    np.testing.assert_array_equal(images[0], images[1])


def test_openvino_checks_the_hashes_of_the_files_it_reads(int8_export, tmp_path) -> None:
    """An openvino export's ONNX files are not OpenVINO's to read: a changed one does not
    stop it; a changed IR does, in the precision that reads it, and only there."""
    copy = tmp_path / "export"
    shutil.copytree(int8_export, copy, ignore=shutil.ignore_patterns("openvino-cache"))
    recorded = json.loads((copy / "manifest.json").read_text())["stages"]["unet"]["files"]
    assert {"unet.onnx", "unet.xml", "unet.int8.xml"} <= set(recorded)

    def change(name: str) -> None:
        with open(copy / name, "ab") as f:
            f.write(b"\0")

    change("unet.onnx")
    load(artifacts=copy, backend="openvino", precision="int8", model_cache=False)
    load(artifacts=copy, backend="openvino", precision="fp32", model_cache=False)
    change("unet.int8.bin")
    with pytest.raises(RiffusionError, match=r"is damaged: unet\.int8\.bin missing or changed"):
        load(artifacts=copy, backend="openvino", precision="int8", model_cache=False)
    load(artifacts=copy, backend="openvino", precision="bf16", model_cache=False)  # reads unet.xml
    change("unet.bin")
    with pytest.raises(RiffusionError, match=r"is damaged: unet\.bin missing or changed"):
        load(artifacts=copy, backend="openvino", precision="fp32", model_cache=False)


def _peak_rss(*argv: str) -> int:
    """The peak resident bytes of ``argv`` run as a child of a fresh Python."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.long
def test_generate_holds_the_ir_once(int8_export, tmp_path) -> None:
    """A subprocess `generate` of the int8 export: its peak resident memory over a process
    that only imports what it runs stays within 3x the export's OpenVINO files plus one
    clip's work (a copy of the fp32 ONNX weights, or of every IR, would show)."""
    cli = [sys.executable, "-m", "riffusion_engine.engine.cli"]
    imports = "import riffusion_engine.engine.cli, openvino, torch, transformers, diffusers, soundfile"
    baseline = _peak_rss(sys.executable, "-c", imports)
    peak = _peak_rss(*cli, "generate", "jazz", "--artifacts", str(int8_export), "-o", str(tmp_path / "a.wav"))
    ir = sum(p.stat().st_size for p in int8_export.iterdir() if p.suffix in (".xml", ".bin"))
    assert peak - baseline <= 3 * ir + WORK_BYTES, (peak, baseline, ir)


WORK_BYTES = 400 * 2**20  # a 512-px clip's activations, Griffin-Lim's arrays and OpenVINO's compiler


def test_a_calibration_plan_covers_modes_seeds_widths_and_steps() -> None:
    from collections import Counter

    plan = replace(CalibrationPlan.of("lcm", 4, 1.0), widths=(256, 512))
    assert (plan.clips, plan.per_clip, plan.held_out_clips) == (64, 1, 8)
    draws = plan.calibration()
    assert [d.prompt for d in draws] == list(plan.prompts[:64])
    # Every mode, seed and width alike; every step of each mode kept by some clip.
    assert Counter(d.mode for d in draws) == {"text": 32, "seed_image": 32}
    assert Counter((d.mode, d.seed, d.width) for d in draws) == {
        (m, s, w): 4 for m in ("text", "seed_image") for s in plan.seeds for w in plan.widths
    }
    assert {d.keep for d in draws if d.mode == "text"} == {(0,), (1,), (2,), (3,)}
    assert {d.keep for d in draws if d.mode == "seed_image"} == {(0,), (1,), (2,)}  # int(4 * 0.75) calls
    held_out = plan.held_out()
    assert {d.prompt for d in held_out}.isdisjoint(plan.prompts) and {d.seed for d in held_out} == {
        1000,
        1001,
    }
    assert {d.keep for d in held_out} == {(0, 1, 2, 3), (0, 1, 2)}  # every call of a held-out clip
    # A 50-step profile: fewer clips, several calls each, spread over the steps.
    long = replace(CalibrationPlan.of("pndm", 50, 7.0), widths=(512,))
    assert long.clips * long.per_clip >= 64 and long.clips == 8 and long.held_out_clips == 2
    assert long.calibration()[0].keep == (0, 6, 12, 18, 25, 31, 37, 43)
    with pytest.raises(RiffusionError, match="held-out prompts and seeds"):
        replace(plan, seeds=(1000,))


def test_calibration_resumes_from_the_clips_it_has(int8_export, tmp_path) -> None:
    """A store holding a clip's calls (as an interrupted export left them) is read, not
    made again; a damaged file is made again."""
    plan = replace(small_plan(), widths=(256, 512), clips=2, held_out_clips=2)
    store = ClipStore(tmp_path / "clips")
    first = collect(int8_export, plan, store, False)
    assert len(list(store.directory.glob("*.npz"))) == 4
    marked = {**first.samples[0], "sample": np.full_like(first.samples[0]["sample"], 7.0)}
    store.put("calibration", 0, [{**marked, "output": np.zeros(1, np.float32)}])
    (store.directory / "held_out-001.npz").write_bytes(b"not a zip")
    again = collect(int8_export, plan, store, False)
    assert (again.samples[0]["sample"] == 7.0).all()  # read back, not made again
    np.testing.assert_array_equal(again.samples[1]["sample"], first.samples[1]["sample"])
    np.testing.assert_array_equal(again.held_out_outputs[-1], first.held_out_outputs[-1])  # made again
