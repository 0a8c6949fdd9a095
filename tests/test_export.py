"""The export step on random:tiny: ONNX parity with torch, the manifest, the cache,
interrupted and concurrent exports, fp16, and clear errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from conftest import TINY_EXPORT_ARGS, run_cli  # noqa: E402
from riffusion_engine.engine.cli import main  # noqa: E402
from riffusion_engine.export import artifacts  # noqa: E402
from riffusion_engine.export import exporter as export_module  # noqa: E402
from riffusion_engine.export.exporter import ExportConfig, ExportResult, export  # noqa: E402
from riffusion_engine.export.models import load_components  # noqa: E402
from riffusion_engine.export.specs import STAGES, ModelDims, ShapeProfile, stage_specs  # noqa: E402
from riffusion_engine.export.stages import stage_module  # noqa: E402
from riffusion_engine.export.verify import TOLERANCE, compare  # noqa: E402
from riffusion_engine.kernels import RiffusionError  # noqa: E402

FULL_DIMS = ModelDims(tokens=77, vocab=49408, text_hidden=768, latent_channels=4, vae_factor=8, unet_factor=8)


def test_cli_export_writes_four_verified_stages(tiny_export) -> None:
    out, stdout = tiny_export
    manifest = artifacts.load_manifest(out)
    assert list(manifest["stages"]) == list(STAGES)
    for name, stage in manifest["stages"].items():
        assert (out / f"{name}.onnx").is_file()
        assert stage["precision"] == "fp32" and stage["fallback"] is None
        for report in stage["verification"]["onnx"].values():
            assert report["max_rel"] <= report["tolerance"] == TOLERANCE["fp32"]
        assert name in stdout
    assert "wrote" in stdout and "max rel. error" in stdout


def test_rerun_is_a_cache_hit(tiny_export) -> None:
    out, _ = tiny_export
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, stdout, _ = run_cli("export", *TINY_EXPORT_ARGS, "-o", str(out), "-q")
    assert code == 0
    assert "cache hit" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_manifest_records_hashes_versions_and_key(tiny_export, tiny) -> None:
    out, _ = tiny_export
    manifest = json.loads((out / "manifest.json").read_text())
    records = [r for stage in manifest["stages"].values() for r in stage["files"].items()]
    records += manifest["support_files"].items()
    assert "tokenizer/tokenizer_config.json" in manifest["support_files"]
    assert "scheduler/scheduler_config.json" in manifest["support_files"]
    for name, record in records:
        data = (out / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["model"] == {
        "id": "random:tiny",
        "content_hash": tiny.content_hash,
        "pixel_multiple": 16,
        "loras": [],  # none fused in
        "vae": "own",  # the model's own VAE, not the tiny one
    }
    assert manifest["run_profile"] == "default"
    assert manifest["tools"]["torch"] == version("torch")
    assert manifest["tools"]["onnxruntime"] == version("onnxruntime")
    assert manifest["tools"]["onnx"] == version("onnx")
    assert manifest["cache_key"] == artifacts.cache_key(manifest["key_fields"])
    assert manifest["key_fields"]["model"] == manifest["model"]["content_hash"]
    assert manifest["opset"] == 17 and manifest["target"] == "onnx"
    assert manifest["profile"] == {
        "height": 512,
        "width": 512,
        "max_width": 1024,  # the session export's --max-width
        "max_batch": 4,
        "static": False,
    }
    assert manifest["stages"]["unet"]["fusions"].get("MultiHeadAttention", 0) > 0
    unet_inputs = {t["name"]: t for t in manifest["stages"]["unet"]["spec"]["inputs"]}
    assert unet_inputs["sample"]["shape"] == ["batch", 4, "latent_height", "latent_width"]
    assert unet_inputs["sample"]["max"] == [8, 4, 64, 128]


def test_onnx_files_declare_the_spec(tiny_export, tiny) -> None:
    out, _ = tiny_export
    specs = stage_specs(ModelDims.of(tiny), ShapeProfile())
    for name, spec in specs.items():
        model = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        declared = {i.name: i for i in model.graph.input}
        for tensor in spec.inputs:
            dims = declared[tensor.name].type.tensor_type.shape.dim
            expected = [d if isinstance(d, int) else d.name for d in tensor.shape]
            assert [d.dim_param or d.dim_value for d in dims] == expected


def _inputs(
    name: str, batch: int, height: int, width: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Inputs built here, independently of the specs, at sizes the export never traced."""
    lh, lw = height // 8, width // 8
    if name == "text_encoder":
        return {"input_ids": rng.integers(0, 514, size=(batch, 77)).astype(np.int32)}
    if name == "unet":
        return {
            "sample": rng.standard_normal((batch, 4, lh, lw), dtype=np.float32),
            "timestep": np.full(batch, 321.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32),
        }
    if name == "vae_decoder":
        return {"latent": rng.standard_normal((batch, 4, lh, lw), dtype=np.float32)}
    return {
        "image": rng.uniform(-1, 1, (batch, 3, height, width)).astype(np.float32),
        "noise": rng.standard_normal((batch, 4, lh, lw), dtype=np.float32),
    }


@pytest.mark.parametrize("name", STAGES)
def test_onnx_stage_matches_torch_at_untraced_sizes(tiny_export, tiny, name: str) -> None:
    """Batch 3 and a 768-pixel-wide clip: wrong dynamic axes would fail here."""
    out, _ = tiny_export
    module = stage_module(tiny, name)
    session = ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    inputs = _inputs(name, 3, 512, 768, np.random.default_rng(7))
    (actual,) = session.run(None, inputs)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in inputs.values())).numpy()
    assert compare(actual, expected, name)["max_rel"] <= TOLERANCE["fp32"]


def _export(out: Path, **kwargs) -> ExportResult:
    kwargs.setdefault("stages", ("vae_encoder",))
    return export(ExportConfig(model=kwargs.pop("model", "random:tiny"), **kwargs), out, progress=False)


def test_changed_key_exports_again(tmp_path: Path) -> None:
    out = tmp_path / "e"
    first = _export(out)
    assert not first.cache_hit
    assert _export(out).cache_hit
    wider = _export(out, profile=ShapeProfile(max_width=1024))
    assert not wider.cache_hit
    assert wider.manifest["cache_key"] != first.manifest["cache_key"]
    assert artifacts.load_manifest(out)["profile"]["max_width"] == 1024


def test_damaged_file_is_detected_and_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "e"
    _export(out)
    path = out / "vae_encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(artifacts.ArtifactError, match=r"vae_encoder\.onnx"):
        artifacts.load_manifest(out)
    again = _export(out)
    assert not again.cache_hit
    artifacts.load_manifest(out)


EXPORT_SCRIPT = textwrap.dedent(
    """
    import sys
    from riffusion_engine.export.exporter import ExportConfig, export
    from riffusion_engine.export.specs import ShapeProfile
    result = export(
        ExportConfig(model="random:tiny", profile=ShapeProfile(width=int(sys.argv[2]))), sys.argv[1],
        progress=False,
    )
    print("HIT" if result.cache_hit else "BUILT")
    """
)


def _spawn(out: Path, width: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", EXPORT_SCRIPT, str(out), str(width)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.long
def test_killed_export_leaves_the_previous_export_intact(tmp_path: Path) -> None:
    out = tmp_path / "e"
    previous = _export(out, stages=STAGES, profile=ShapeProfile(width=512))
    proc = _spawn(out, 256)
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".e.tmp-*/*.onnx")):  # killed in the middle of the stages
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = artifacts.load_manifest(out)  # still the complete previous export, every hash intact
    assert manifest["cache_key"] == previous.manifest["cache_key"]
    assert list(tmp_path.glob(".e.tmp-*")), "the killed export's work directory is left behind"
    result = _export(out, stages=STAGES, profile=ShapeProfile(width=256))
    assert not result.cache_hit
    assert not list(tmp_path.glob(".e.tmp-*")), "the next export removes it"


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.long)])
def test_a_stopped_export_command_removes_its_work_directory(tmp_path: Path, sig: int) -> None:
    """SIGTERM (a service manager, a timeout) and Ctrl-C unwind the command: the hidden
    work directory (gigabytes at full size) goes with it, and the exit says why."""
    out = tmp_path / "e"
    command = [sys.executable, "-m", "riffusion_engine.engine.cli", "export", "--model", "random:tiny"]
    # Ctrl-C's default disposition, even where this test runs in the background (a shell
    # starts background jobs with SIGINT ignored, and Python then keeps it ignored).
    proc = subprocess.Popen(
        [*command, "-o", str(out), "-q"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".e.tmp-*/*.onnx")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(60) == 130
    assert "interrupted" in (proc.stderr.read() if proc.stderr else "")
    assert not list(tmp_path.glob(".e.tmp-*")) and not out.exists()


def test_killed_first_export_leaves_no_complete_looking_directory(tmp_path: Path) -> None:
    out = tmp_path / "e"
    proc = _spawn(out, 512)
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".e.tmp-*/*.onnx")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    # Nothing there yet (the export builds in a hidden folder), or a folder without a manifest.
    with pytest.raises(artifacts.ArtifactError, match=r"does not exist|not a complete export"):
        artifacts.load_manifest(out)


@pytest.mark.long
def test_concurrent_exports_into_one_directory(tmp_path: Path) -> None:
    out = tmp_path / "e"
    procs = [_spawn(out, 256) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert sorted(stdout.strip() for stdout, _ in results) == ["BUILT", "HIT"]
    manifest = artifacts.load_manifest(out)
    assert manifest["profile"]["width"] == 256
    expected = ["manifest.json", "scheduler", "tokenizer", *(f"{s}.onnx" for s in STAGES)]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"], "no lock file or work directory is left"


def test_the_export_lock_excludes_and_leaves_no_file(tmp_path: Path) -> None:
    """Mutual exclusion, including the handover where the holder unlinks the lock file
    that waiters are blocked on: unsynchronised read-modify-write under the lock loses no
    increment, and no file remains."""
    import threading

    from riffusion_engine.kernels.files import exclusive_lock

    counter, lock = tmp_path / "counter", tmp_path / ".e.lock"
    counter.write_text("0")

    def work() -> None:
        for _ in range(40):
            with exclusive_lock(lock):
                value = int(counter.read_text())
                time.sleep(0.0005)
                counter.write_text(str(value + 1))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert int(counter.read_text()) == 160
    assert not lock.exists()


@pytest.mark.long
def test_fp16_export_of_the_tiny_model(tmp_path: Path) -> None:
    fp32 = _export(tmp_path / "fp32", stages=("text_encoder", "unet"))
    fp16 = _export(tmp_path / "fp16", stages=("text_encoder", "unet"), precision="fp16")
    for name in ("text_encoder", "unet"):
        stage = fp16.manifest["stages"][name]
        assert stage["precision"] == "fp16"
        model = onnx.load(str(tmp_path / "fp16" / f"{name}.onnx"))
        kinds = {init.data_type for init in model.graph.initializer}
        assert onnx.TensorProto.FLOAT16 in kinds
        assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in model.graph.input)
        error = stage["verification"]["onnx"]
        ((output, report),) = error.items()
        assert report["max_rel"] <= TOLERANCE["fp16"]
        # Half precision really is in use: it is less exact than the fp32 export.
        assert report["max_rel"] > fp32.manifest["stages"][name]["verification"]["onnx"][output]["max_rel"]
        size = {p: (tmp_path / p / f"{name}.onnx").stat().st_size for p in ("fp16", "fp32")}
        assert size["fp16"] < size["fp32"]
    assert "MultiHeadAttention" in fp16.manifest["stages"]["unet"]["fusions"]


def test_fusions_follow_the_target_device_not_the_machine(tmp_path: Path, monkeypatch) -> None:
    """An export for the CPU made on a machine where ONNX Runtime sees a GPU gets no
    CUDA-only operator (the CPU provider could not load it), and the device is part of
    the cache key and the manifest."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    monkeypatch.setattr(artifacts, "gpu_info", lambda: {"name": "a GPU", "compute_capability": "9.0"})
    result = _export(tmp_path / "cpu", stages=("unet", "vae_decoder"))
    cuda_only = {"GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"}
    for name, stage in result.manifest["stages"].items():
        assert not cuda_only & set(stage["fusions"]), (name, stage["fusions"])
        ort.InferenceSession(str(tmp_path / "cpu" / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    assert result.manifest["device"] == result.manifest["key_fields"]["device"] == "cpu"
    cpu, cuda = (
        export_module.cache_key_fields(ExportConfig(model="random:tiny", device=d)) for d in ("cpu", "cuda")
    )
    assert cpu["device"] == "cpu" and cuda["device"] == "cuda"
    assert artifacts.cache_key(cpu) != artifacts.cache_key(cuda)


@pytest.mark.parametrize("fp16", [False, True])
def test_cuda_only_and_packed_attention_fusions_by_target(fp16: bool) -> None:
    """ONNX Runtime's own Stable Diffusion optimizer: the CUDA-only fusions for CUDA, the
    packed QKV / KV attention layouts only for fp16 CUDA (no fp32 fused kernel)."""
    from riffusion_engine.export.onnx_export import (
        CUDA_ONLY_FUSIONS,
        PACKED_ATTENTION_FUSIONS,
        fusion_options,
    )

    cpu = fusion_options("unet", cuda=False, fp16=fp16)
    assert not any(getattr(cpu, flag) for flag in CUDA_ONLY_FUSIONS + PACKED_ATTENTION_FUSIONS)
    cuda = fusion_options("unet", cuda=True, fp16=fp16)
    assert all(getattr(cuda, flag) for flag in CUDA_ONLY_FUSIONS)
    assert all(getattr(cuda, flag) == fp16 for flag in PACKED_ATTENTION_FUSIONS)
    assert cpu.enable_attention and cuda.enable_attention


def test_a_cuda_export_needs_onnxruntime_cuda(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and artifacts.gpu_info() is not None:
        pytest.skip("ONNX Runtime runs CUDA here")
    code, _, err = run_cli("export", "--model", "random:tiny", "-o", str(tmp_path / "o"), "--device", "cuda")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "CUDA" in err and not (tmp_path / "o").exists()
    with pytest.raises(RiffusionError, match="tensorrt target runs on --device cuda"):
        ExportConfig(model="random:tiny", target="tensorrt", device="cpu")
    assert ExportConfig(model="random:tiny", target="tensorrt").device == "cuda"
    assert ExportConfig(model="random:tiny").device == "cpu"


def test_vae_that_overflows_in_fp16_stays_fp32(tmp_path: Path, caplog) -> None:
    components = load_components("random:tiny")
    with torch.no_grad():
        components.vae.decoder.conv_in.weight.mul_(3e4)  # activations far beyond fp16's 65504
    components.save(tmp_path / "model")
    with caplog.at_level("WARNING"):
        result = _export(
            tmp_path / "e", model=str(tmp_path / "model"), stages=("vae_decoder",), precision="fp16"
        )
    stage = result.manifest["stages"]["vae_decoder"]
    assert stage["precision"] == "fp32"
    assert "inf/NaN" in stage["fallback"]
    assert "keeping this stage in fp32" in caplog.text
    assert stage["verification"]["onnx"]["image"]["tolerance"] == TOLERANCE["fp32"]


def test_specs_give_profiles_for_every_input() -> None:
    specs = stage_specs(FULL_DIMS, ShapeProfile(width=512, max_width=1024, max_batch=4))
    unet = specs["unet"]
    assert unet.input_shapes("min") == {
        "sample": (1, 4, 64, 32),
        "timestep": (1,),
        "encoder_hidden_states": (1, 77, 768),
    }
    assert unet.input_shapes("opt")["sample"] == (2, 4, 64, 64)
    assert unet.input_shapes("max")["sample"] == (8, 4, 64, 128)
    assert specs["vae_decoder"].input_shapes("max") == {"latent": (4, 4, 64, 128)}
    assert specs["vae_encoder"].input_shapes("opt") == {"image": (1, 3, 512, 512), "noise": (1, 4, 64, 64)}
    assert unet.dynamic_axes()["sample"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    decoder = specs["vae_decoder"].to_dict()
    assert decoder["outputs"][0]["shape"] == ["batch", 3, "height", "width"]
    width = {"min": 256, "opt": 512, "max": 1024, "base": "latent_width", "factor": 8}
    assert decoder["dims"]["width"] == width
    static = stage_specs(FULL_DIMS, ShapeProfile(max_batch=1, static=True))
    for spec in static.values():
        assert spec.input_shapes("min") == spec.input_shapes("opt") == spec.input_shapes("max")
    assert static["unet"].input_shapes("opt")["sample"] == (2, 4, 64, 64)
    ids = specs["text_encoder"].sample_inputs()["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (2, 77) and 0 <= ids.min() and ids.max() < 49408


def test_bad_profiles_and_configs_are_clear_errors() -> None:
    with pytest.raises(RiffusionError, match="not a multiple of 64"):
        stage_specs(FULL_DIMS, ShapeProfile(width=520))
    with pytest.raises(RiffusionError, match="max_width 256 is smaller"):
        ShapeProfile(width=512, max_width=256)
    with pytest.raises(RiffusionError, match="precision must be one of"):
        ExportConfig(model="random:tiny", precision="int4")
    with pytest.raises(RiffusionError, match="int8 is the openvino target's"):
        ExportConfig(model="random:tiny", precision="int8")
    with pytest.raises(RiffusionError, match=r"opset must be in 17\.\.\d+"):
        ExportConfig(model="random:tiny", opset=13)
    with pytest.raises(RiffusionError, match="newest this torch's ONNX exporter writes"):
        ExportConfig(model="random:tiny", opset=99)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    code, _, err = run_cli("export", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert code == 2 and "not a diffusers-format directory" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = run_cli("export", "--model", "random:tiny", "-o", str(tmp_path / "busy"))
    assert code == 2 and "non-empty directory" in err
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()) as usage:
        main(["export", "--model", "random:tiny", "-o", str(tmp_path / "o"), "--precision", "int4"])
    assert exc.value.code == 2 and "invalid choice: 'int4'" in usage.getvalue()
    code, _, err = run_cli(
        "export",
        "--model",
        "random:tiny",
        "-o",
        str(tmp_path / "o"),
        "--target",
        "onnx",
        "--precision",
        "int8",
    )
    assert code == 2 and "int8 is the openvino target's" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_tensorrt_missing_is_one_line(tmp_path: Path) -> None:
    if _installed("tensorrt") and _installed("polygraphy"):
        pytest.skip("TensorRT is installed here")
    code, _, err = run_cli(
        "export", "--model", "random:tiny", "-o", str(tmp_path / "o"), "--target", "tensorrt"
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "pip install 'riffusion-engine[tensorrt]'" in err
    assert not (tmp_path / "o").exists()


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("static", [False, True])
def test_tensorrt_profiles_cover_every_stage_input(tmp_path: Path, static: bool) -> None:
    """Every input of every stage has a profile entry, exactly the spec's min/opt/max, and
    the range holds what the pipeline sends: 1..2 x max_batch UNet rows (dynamic) or the
    one static shape; no entry names a tensor the stage does not take."""
    pytest.importorskip("polygraphy")
    from riffusion_engine.export.tensorrt_build import EngineOptions, optimization_profile

    profile_config = ShapeProfile(max_width=None if static else 1024, max_batch=3, static=static)
    specs = stage_specs(FULL_DIMS, profile_config)
    for name, spec in specs.items():
        profile = optimization_profile(spec)
        assert set(profile.keys()) == set(spec.input_names), name
        for tensor in spec.inputs:
            shapes = profile[tensor.name]
            low, opt, high = (tuple(shapes.min), tuple(shapes.opt), tuple(shapes.max))
            assert (low, opt, high) == tuple(tensor.size(w) for w in ("min", "opt", "max"))
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
            if static:
                assert low == high
        config = EngineOptions(fp16=False, timing_cache=tmp_path / "t").create_config(spec)
        assert len(config.profiles) == 1 and set(config.profiles[0].keys()) == set(spec.input_names)
    unet = optimization_profile(specs["unet"])["sample"]
    if static:
        assert tuple(unet.min) == (6, 4, 64, 64)  # 2 x max_batch rows: the pipeline pads to it
    else:
        assert (unet.min[0], unet.max[0]) == (1, 6) and (unet.min[3], unet.max[3]) == (32, 128)


def test_tensorrt_config_asks_for_fp16_only_when_asked(tmp_path: Path) -> None:
    """fp16 kernels only for an fp16 build (the fp32 rebuild of a VAE that overflows asks
    for none); TF32 only beside fp16 (an fp32 engine is verified at fp32's tolerance); the
    timing cache is read only where one exists."""
    pytest.importorskip("polygraphy")
    from riffusion_engine.export.tensorrt_build import EngineOptions

    spec = stage_specs(FULL_DIMS, ShapeProfile())["vae_decoder"]
    cache = tmp_path / "timing.cache"
    fp32 = EngineOptions(fp16=False, timing_cache=cache).create_config(spec)
    fp16 = EngineOptions(fp16=True, timing_cache=cache).create_config(spec)
    assert not fp32.fp16 and not fp32.tf32 and fp16.fp16 and fp16.tf32
    assert fp16.timing_cache_path is None
    cache.write_bytes(b"")
    assert EngineOptions(fp16=True, timing_cache=cache).create_config(spec).timing_cache_path == str(cache)
    with pytest.raises(RiffusionError, match="optimization_level"):
        EngineOptions(fp16=True, timing_cache=cache, optimization_level=9)


@pytest.mark.gpu
def test_tensorrt_engines_for_the_tiny_model(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    out = tmp_path / "trt"
    result = export(
        ExportConfig(model="random:tiny", target="tensorrt", precision="fp16"), out, progress=False
    )
    for name, stage in result.manifest["stages"].items():
        assert (out / f"{name}.plan").is_file()
        for report in stage["verification"]["tensorrt"].values():
            assert report["max_rel"] <= report["tolerance"]
    assert (out / "timing.cache").is_file()
    assert result.manifest["gpu"]["compute_capability"]
    assert export(
        ExportConfig(model="random:tiny", target="tensorrt", precision="fp16"), out, progress=False
    ).cache_hit


@pytest.mark.slow
def test_full_architecture_exports_to_verified_fp32_onnx(tmp_path: Path) -> None:
    result = export(ExportConfig(model="random:full"), tmp_path / "full", progress=False)
    for stage in result.manifest["stages"].values():
        for report in stage["verification"]["onnx"].values():
            assert report["max_rel"] <= TOLERANCE["fp32"]
    assert result.manifest["stages"]["unet"]["files"]["unet.onnx.data"]["bytes"] > 2**31


def test_the_attention_estimate_is_the_largest_score_matrix_the_models_own_attention_makes(tiny) -> None:
    """Oracle: diffusers' plain attention processor (the one that materializes the scores,
    as ONNX Runtime's CPU attention does), run on the UNet and the VAE at the spec's opt
    and min sizes; the estimate's matrix is the largest it made, and the machine's budget
    decides the refusal and the widest width it names."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor
    from riffusion_engine.export.memory_estimate import check_export_memory, largest_scores

    specs = stage_specs(ModelDims.of(tiny), ShapeProfile(width=512))
    seen: dict[str, int] = {}

    def record(name: str, module: torch.nn.Module) -> None:
        processors = [m for m in module.modules() if hasattr(m, "get_attention_scores")]
        for attention in processors:
            attention.set_processor(AttnProcessor())
            plain = attention.get_attention_scores

            def scores(*args, plain=plain, **kwargs):
                probs = plain(*args, **kwargs)
                seen[name] = max(seen.get(name, 0), probs.numel() * 4)  # float32: batch x heads rows
                return probs

            attention.get_attention_scores = scores

    for name in ("unet", "vae_decoder"):
        module = stage_module(tiny, name)
        record(name, module)
        with torch.no_grad():
            for which in ("opt", "min"):
                inputs = specs[name].sample_inputs(which=which)
                module(*(torch.from_numpy(v) for v in inputs.values()))
    for name in ("unet", "vae_decoder"):
        worst = max((s for s in largest_scores(tiny, specs, (name,), 8)), key=lambda s: s.bytes)
        assert worst.bytes == seen[name], (name, worst, seen[name])
    unet = max(largest_scores(tiny, specs, ("unet",), 8), key=lambda s: s.bytes)
    check_export_memory(tiny, specs, ("unet",), 8, available=2 * unet.bytes)  # fits: no error
    with pytest.raises(RiffusionError, match=r"needs .* GiB for its attention") as refused:
        check_export_memory(tiny, specs, ("unet",), 8, available=2 * unet.bytes - 1)
    assert "about 504 pixels at most" in str(refused.value)  # one 8-pixel step below 512
