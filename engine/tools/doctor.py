"""``riffusion-engine doctor``: every path this machine can run, checked against the reference.

On ``random:tiny`` (offline, seconds per path) it runs each backend x precision x path
that the device allows — the exports (ONNX fused / unfused / fp16, OpenVINO with an int8
UNet, TensorRT dynamic and static), each backend, CUDA graphs, the CuPy kernels and the
DLPack hand-off from the VAE, export on first use through ``auto``, and one request
through the HTTP server — and compares each with the reference: the torch backend in fp32 on the CPU (itself
equal to diffusers' pipeline, ``tests/test_runtime.py``). A path whose requirement is
missing (no GPU, TensorRT not installed, ...) is skipped with the reason. The command
fails when any path that could run failed.

Errors: for a backend, the largest difference of its spectrogram images (floats in
[0, 1]) from the reference's over one request and a batch (one to three requests);
for an export, the worst relative error its verification recorded (for the int8 UNet,
its relative RMS error on held-out calls, against the export's own bound); for the CuPy
kernels, the relative L2 difference of the waveform from NumPy's; for the server, the
largest difference of its WAV samples from the same engine's one-shot run (full scale 1).

JSON (``--json``; ``schema`` 1)::

    schema       1
    device       "cpu" | "cuda"
    environment  as bench's (CPU, GPU, versions)
    checks       [{"path", "status": "ok" | "failed" | "skipped", "detail", "error",
                   "tolerance", "seconds", "needs": [keys of REQUIREMENTS the path asked for]}]
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...kernels.errors import RiffusionError
from ...kernels.params import SpectrogramParams
from .doctor_realtime import RealtimeRows
from .measure import environment
from .reference import music_mel, reference_engine

log = logging.getLogger(__name__)

SCHEMA = 1
MODEL = "random:tiny"
# Largest difference of a backend's [0, 1] spectrogram image from the fp32 reference.
IMAGE_TOLERANCE = {"fp32": 1e-2, "fp16": 0.1, "bf16": 0.1, "int8": 0.2}
EXPORT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # as export verification (export/verify.py)
KERNEL_TOLERANCE = 1e-3  # CuPy's waveform against NumPy's, same (random) initial phase
# The server's WAV against the same engine's one-shot run (relative L2): equal on the CPU;
# on a GPU, kernels may round differently from run to run, within the kernels' tolerance.
SERVER_TOLERANCE = {"cpu": 0.0, "cuda": KERNEL_TOLERANCE}


def _missing_cuda() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch not installed (pip install 'riffusion-engine[models]' with a CUDA build of torch)"
    import torch

    return None if torch.cuda.is_available() else f"no CUDA GPU (torch {torch.__version__} sees none)"


def check_cuda_ready() -> None:
    """``doctor --device cuda`` checks the GPU or fails: one line where no CUDA device is
    usable, or the gpu extra (CuPy, the GPU audio kernels every GPU row of the chain uses)
    is missing. A run that skipped every GPU path has not checked the GPU."""
    missing = _missing_cuda() or _missing_module("cupy", "gpu")()
    if missing:
        raise RiffusionError(f"doctor --device cuda cannot check the GPU here: {missing}")


def _missing_module(module: str, extra: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        found = importlib.util.find_spec(module) is not None
        return None if found else f"{module} not installed (pip install 'riffusion-engine[{extra}]')"

    return missing


def _missing_provider(provider: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        import onnxruntime as ort

        if provider in ort.get_available_providers():
            return None
        return f"ONNX Runtime lacks {provider} (onnxruntime-gpu: pip install 'riffusion-engine[gpu]')"

    return missing


# What a path may need; each gives None when present, else why it is missing.
REQUIREMENTS: dict[str, Callable[[], str | None]] = {
    "cuda": _missing_cuda,
    "cupy": _missing_module("cupy", "gpu"),
    "tensorrt": _missing_module("tensorrt", "tensorrt"),
    "openvino": _missing_module("openvino", "openvino"),
    "nncf": _missing_module("nncf", "openvino"),
    "onnxruntime-cuda": _missing_provider("CUDAExecutionProvider"),
    "onnxruntime-tensorrt": _missing_provider("TensorrtExecutionProvider"),
}


class Skip(Exception):
    """A path that cannot run here; the message says why."""


@dataclass
class Check:
    path: str  # what was run
    status: str  # ok, failed or skipped
    detail: str  # why skipped, what failed, or what was compared
    error: float | None  # difference from the reference (see the module docstring)
    tolerance: float | None  # the largest error that passes
    seconds: float  # wall time of the check
    needs: list[str]  # the REQUIREMENTS it asked for: with all of them met it must run


class Doctor:
    """Runs the checks in order; later checks use what earlier ones built (an export)."""

    def __init__(self, device: str, work: Path, *, steps: int = 4) -> None:
        self.device = device
        self.work = work
        self.steps = steps
        self.exports: dict[str, Path] = {}
        self.checks: list[Check] = []
        self._reference: Any = None
        self._references: dict[int, np.ndarray] = {}
        self._needs: set[str] = set()  # what the running check asked for

    # -- requirements -------------------------------------------------------------

    def require(self, *needs: str) -> None:
        """Skip (saying every reason) unless each of ``needs`` (keys of REQUIREMENTS) is met
        and, for a GPU path, the doctor runs on cuda."""
        self._needs.update(needs)
        missing = [reason for reason in (REQUIREMENTS[need]() for need in needs) if reason]
        if missing:
            raise Skip("; ".join(missing))
        if "cuda" in needs and self.device != "cuda":
            raise Skip("--device cpu (doctor --device cuda runs the GPU paths)")

    def export_dir(self, name: str) -> Path:
        if name not in self.exports:
            raise Skip(f"the {name} export did not succeed")
        return self.exports[name]

    # -- references ---------------------------------------------------------------

    def requests(self, count: int) -> list[Any]:
        """``count`` requests that share a batch: text, interpolation, negative prompt."""
        from ..runtime.requests import PromptInput, Request

        alphas = (0.0, 0.5, 1.0, 0.25)
        return [
            Request(
                PromptInput("a funky beat", seed=i + 1, negative_prompt="noise" if i == 0 else None),
                PromptInput("church bells", seed=i + 11),
                alphas[i],
                steps=self.steps,
            )
            for i in range(count)
        ]

    def reference_engine(self) -> Any:
        """The torch backend on the CPU in fp32, loaded once."""
        if self._reference is None:
            self._reference = reference_engine(MODEL)
        return self._reference

    def reference(self, count: int) -> np.ndarray:
        if count not in self._references:
            self._references[count] = self.reference_engine().images(self.requests(count)).cpu().numpy()
        return self._references[count]

    def compare_engine(self, engine: Any, counts: tuple[int, ...] = (1, 3)) -> tuple[float, str]:
        worst = 0.0
        for count in counts:
            got = engine.images(self.requests(count)).float().cpu().numpy()
            worst = max(worst, float(np.abs(got - self.reference(count)).max()))
        batches = ", ".join(str(c) for c in counts)
        return worst, f"images of {batches} request(s) vs torch cpu fp32"

    # -- running ------------------------------------------------------------------

    def run(self, path: str, check: Callable[[], tuple[float | None, float | None, str]]) -> Check:
        begin = time.perf_counter()
        self._needs = set()
        try:
            error, tolerance, detail = check()
            ok = error is None or tolerance is None or error <= tolerance
            status = "ok" if ok else "failed"
            if not ok:
                detail = f"error above tolerance; {detail}"
        except Skip as skip:
            error = tolerance = None
            status, detail = "skipped", str(skip)
        except Exception as exc:  # a path that crashes is a failed path, reported, not raised
            log.debug("%s failed:\n%s", path, traceback.format_exc())
            error = tolerance = None
            status, detail = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        seconds = round(time.perf_counter() - begin, 2)
        result = Check(path, status, detail, error, tolerance, seconds, sorted(self._needs))
        self.checks.append(result)
        return result

    def all_checks(self) -> Iterator[tuple[str, Callable[[], tuple[float | None, float | None, str]]]]:
        yield "cuda: driver and the CUDA of each library", self.cuda_versions
        yield "kernels numpy: image -> audio", self.kernels_numpy
        yield "kernels cupy: image -> audio", self.kernels_cupy
        yield "torch cpu fp32 (reference)", self.torch_reference
        yield "export onnx cpu fp32 (fused)", lambda: self.export("onnx-cpu-fp32", "onnx", "cpu", "fp32")
        yield "onnxruntime cpu fp32", lambda: self.onnxruntime("onnx-cpu-fp32", "cpu", "fp32")
        yield "export onnx cpu fp16", lambda: self.export("onnx-cpu-fp16", "onnx", "cpu", "fp16")
        yield "onnxruntime cpu fp16", lambda: self.onnxruntime("onnx-cpu-fp16", "cpu", "fp16")
        yield (
            "export onnx cpu fp32 (unfused)",
            lambda: self.export("unfused", "onnx", "cpu", "fp32", fuse=False),
        )
        yield "openvino cpu fp32", lambda: self.openvino("fp32")
        yield "openvino cpu bf16", lambda: self.openvino("bf16")
        yield "export openvino cpu int8 (calibrated, checked)", self.export_int8
        yield "openvino cpu int8", lambda: self.openvino("int8")
        yield f"auto {self.device}: export on first use", self.auto
        yield "server: one /run_inference/ request", self.server
        yield "torch cuda fp32", lambda: self.torch_cuda("fp32")
        yield "torch cuda fp16", lambda: self.torch_cuda("fp16")
        yield "DLPack: VAE output -> CuPy, no host copy", self.dlpack
        yield (
            "export onnx cuda fp32 (CUDA fusions)",
            lambda: self.export("onnx-cuda-fp32", "onnx", "cuda", "fp32"),
        )
        yield "onnxruntime cuda fp32 (IO binding)", lambda: self.onnxruntime("onnx-cuda-fp32", "cuda", "fp32")
        yield (
            "export onnx cuda fp16 (packed attention)",
            lambda: self.export("onnx-cuda-fp16", "onnx", "cuda", "fp16"),
        )
        yield "onnxruntime cuda fp16 (IO binding)", lambda: self.onnxruntime("onnx-cuda-fp16", "cuda", "fp16")
        yield "onnxruntime tensorrt provider fp32", self.onnxruntime_tensorrt
        yield "export tensorrt fp16 (dynamic)", lambda: self.export("trt-dynamic", "tensorrt", "cuda", "fp16")
        yield "tensorrt fp16 dynamic", lambda: self.tensorrt("trt-dynamic", (1, 3))
        yield (
            "export tensorrt fp16 (static, batch 4)",
            lambda: self.export("trt-static", "tensorrt", "cuda", "fp16", static=True),
        )
        yield "tensorrt fp16 static + CUDA graphs", lambda: self.tensorrt("trt-static", (1, 2, 3))
        yield from RealtimeRows(self, tolerance=IMAGE_TOLERANCE["fp16"]).rows()

    # -- the checks -----------------------------------------------------------------

    def cuda_versions(self) -> tuple[None, None, str]:
        from .cuda_versions import cuda_versions

        self.require("cuda")
        versions = cuda_versions()
        problems = versions.problems()
        if problems:
            raise RiffusionError(f"{problems[0]}; {versions.describe()}")
        return None, None, versions.describe()

    def kernels_numpy(self) -> tuple[float, float, str]:
        from ...kernels import spectral_convergence
        from ...kernels.griffin_lim import waveform_from_mel

        params = SpectrogramParams()
        mel = music_mel(params, through_image=False)
        waveform = waveform_from_mel(mel, params)
        return spectral_convergence(waveform, mel, params), 0.3, "spectral convergence of music's round trip"

    def kernels_cupy(self) -> tuple[float, float, str]:
        self.require("cuda", "cupy")
        import cupy

        from ...kernels.griffin_lim import GriffinLimOptions, waveform_from_mel

        params = SpectrogramParams()
        mel = music_mel(params, through_image=False)
        options = GriffinLimOptions(init="random")  # the same start on both (pghi picks peaks)
        cpu = waveform_from_mel(mel, params, options)
        gpu = waveform_from_mel(cupy.asarray(mel), params, options, xp=cupy).get()
        error = float(np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu))
        return error, KERNEL_TOLERANCE, "waveform vs NumPy (random start, fused Griffin-Lim update)"

    def torch_reference(self) -> tuple[None, None, str]:
        self.reference(1)
        self.reference(3)
        return None, None, "the reference the other paths are compared with"

    def export(
        self, name: str, target: str, device: str, precision: str, *, fuse: bool = True, static: bool = False
    ) -> tuple[float, float, str]:
        from ...export.exporter import ExportConfig, export
        from ...export.specs import ShapeProfile

        if target == "tensorrt":
            self.require("cuda", "tensorrt")
        elif device == "cuda":
            self.require("cuda", "onnxruntime-cuda")
        config = ExportConfig(
            model=MODEL,
            target=target,  # type: ignore[arg-type]
            precision=precision,  # type: ignore[arg-type]
            device=device,  # type: ignore[arg-type]
            fuse=fuse,
            profile=ShapeProfile(max_batch=4, static=static),
        )
        from ...export.manifest import Manifest

        result = export(config, self.work / name, progress=False)
        self.exports[name] = result.directory
        manifest = Manifest.of(result.directory, result.manifest)
        entries = [entry for stage in manifest.stages.values() for entry in stage.verification_entries()]
        # The entry nearest its tolerance (fp16 stages may have fallen back to fp32's).
        nearest = max(entries, key=lambda e: e["max_rel"] / e["tolerance"])
        worst, tolerance = nearest["max_rel"], nearest["tolerance"]
        runtimes = sorted({e["runtime"] for e in entries})
        return worst, tolerance, f"worst verification error against torch ({', '.join(runtimes)})"

    def onnxruntime(self, export: str, device: str, precision: str) -> tuple[float, float, str]:
        from ..runtime.loading import load

        if device == "cuda":
            self.require("cuda", "onnxruntime-cuda")
        engine = load(artifacts=self.export_dir(export), backend="onnxruntime", device=device)
        error, detail = self.compare_engine(engine)
        return error, IMAGE_TOLERANCE[precision], detail

    def onnxruntime_tensorrt(self) -> tuple[float, float, str]:
        from ..runtime.loading import load

        self.require("cuda", "onnxruntime-tensorrt", "tensorrt")  # the provider loads TensorRT's libraries
        engine = load(
            artifacts=self.export_dir("unfused"), backend="onnxruntime", device="cuda", provider="tensorrt"
        )
        error, detail = self.compare_engine(engine)
        return error, IMAGE_TOLERANCE["fp32"], detail + " (unfused fp32 export)"

    def export_int8(self) -> tuple[float, float, str]:
        """An openvino export with an int8 UNet, calibrated on the engine's sampling of the
        doctor's own requests (PNDM, guidance 7, its steps; 16 clips, 4 held out)."""
        from dataclasses import replace

        from ...export.calibration import CalibrationPlan
        from ...export.exporter import ExportConfig, export
        from ...export.specs import ShapeProfile
        from ..runtime.calibration import collect
        from ..runtime.defaults import SCHEDULER

        self.require("openvino", "nncf")
        plan = replace(CalibrationPlan.of(SCHEDULER, self.steps, 7.0), clips=16, held_out_clips=4)
        config = ExportConfig(
            model=MODEL,
            target="openvino",
            precision="int8",
            calibration=plan,
            profile=ShapeProfile(max_batch=4),
        )
        result = export(config, self.work / "int8", progress=False, calibrate=collect)
        self.exports["int8"] = result.directory
        check = result.manifest["stages"]["unet"]["int8"]["verification"]
        bf16 = "" if check["bf16"] is None else f", bf16's {check['bf16']['rel_rms']:.1e}"
        detail = f"the int8 UNet's relative RMS error against fp32 on held-out calls{bf16}"
        return check["int8"]["rel_rms"], check["bound"], detail

    def openvino(self, precision: str) -> tuple[float, float, str]:
        from ..runtime.loading import load

        self.require("openvino")
        export = "int8" if precision == "int8" else "unfused"
        engine = load(artifacts=self.export_dir(export), backend="openvino", precision=precision)
        error, detail = self.compare_engine(engine)
        if precision == "bf16":
            compiled = engine.backend.request("unet").get_compiled_model()
            applied = compiled.get_property("INFERENCE_PRECISION_HINT")
            detail += f" (OpenVINO applied {applied.get_type_name()})"
        return error, IMAGE_TOLERANCE[precision], detail

    def auto(self) -> tuple[float, float, str]:
        from ..runtime.backends import resolve_backend
        from ..runtime.loading import load

        if self.device == "cuda":
            self.require("cuda")
        engine = load(MODEL, backend="auto", device=self.device, cache_dir=self.work / "cache")
        error, detail = self.compare_engine(engine, (1,))
        return error, IMAGE_TOLERANCE["fp32"], f"picked {resolve_backend('auto', self.device)}; {detail}"

    def server(self) -> tuple[float, float, str]:
        import base64
        import io
        import json

        import httpx
        import soundfile

        from ..runtime.loading import load
        from ..runtime.seeds import SeedLibrary
        from ..serve.api import engine_request, parse_input
        from ..serve.app import background, create_app
        from ..serve.config import ServerConfig

        if self.device == "cuda":
            self.require("cuda", "cupy")  # the engine's audio kernels on CUDA
            engine = load(MODEL, backend="torch", device="cuda")
        else:
            engine = load(artifacts=self.export_dir("onnx-cpu-fp32"), backend="onnxruntime")
        body = {
            "alpha": 0.25,
            "num_inference_steps": 2 * self.steps,
            "seed_image_id": "og_beat",
            "start": {"prompt": "church bells on sunday", "seed": 42, "denoising": 0.5, "guidance": 7.0},
            "end": {"prompt": "jazz with piano", "seed": 123, "denoising": 0.5, "guidance": 7.0},
            "format": "wav",
        }
        config = ServerConfig()
        with background(create_app(engine, config, model=MODEL)) as url:
            answer = httpx.post(url + "/run_inference/", content=json.dumps(body), timeout=300)
        if answer.status_code != 200:
            raise RiffusionError(f"the server answered {answer.status_code}: {answer.text[:200]}")
        audio = answer.json()["audio"].split(",", 1)[1]
        samples, _ = soundfile.read(io.BytesIO(base64.b64decode(audio)), dtype="int16", always_2d=True)
        request = engine_request(parse_input(json.dumps(body).encode()), engine, SeedLibrary(), config)
        (alone,) = engine.run([request])
        if samples.T.shape != alone.audio.shape:
            raise RiffusionError(f"the server's audio is {samples.T.shape}, one-shot {alone.audio.shape}")
        served, expected = samples.T.astype(np.float64), alone.audio.astype(np.float64)
        error = float(np.linalg.norm(served - expected) / max(np.linalg.norm(expected), 1.0))
        detail = f"WAV from {engine.backend.name} {engine.backend.device} vs its one-shot run (relative L2)"
        return error, SERVER_TOLERANCE[self.device], detail

    def torch_cuda(self, precision: str) -> tuple[float, float, str]:
        from ..runtime.loading import load

        self.require("cuda")
        engine = load(MODEL, backend="torch", device="cuda", precision=precision)
        error, detail = self.compare_engine(engine)
        return error, IMAGE_TOLERANCE[precision], detail

    def dlpack(self) -> tuple[float, float, str]:
        self.require("cuda", "cupy")
        import cupy
        import torch

        from ...kernels import spectral_convergence
        from ...kernels import xp as xpm
        from ...kernels.image import spectrogram_from_pixels
        from ...kernels.params import DEFAULT_MAX_VALUE
        from ..runtime.loading import load

        engine = load(MODEL, backend="torch", device="cuda")
        image = engine.images(self.requests(1))[0]  # (height, width, 3) on the GPU
        pixels = (image * 255).round().to(torch.uint8)  # as the engine makes them: a strided view
        if xpm.as_array(pixels, cupy).data.ptr != pixels.data_ptr():
            raise RiffusionError("the VAE's output was copied on its way to CuPy")
        # The engine's own image -> audio on the GPU, and the same image on the CPU kernels.
        on_gpu = engine.to_clip(image, {}).audio.astype(np.float32)
        on_cpu = self.reference_engine().to_clip(image.cpu(), {}).audio.astype(np.float32)
        params = engine.params
        mel = spectrogram_from_pixels(pixels.cpu().numpy(), params, max_value=DEFAULT_MAX_VALUE)
        ratio = spectral_convergence(on_gpu, mel, params) / spectral_convergence(on_cpu, mel, params)
        return (
            max(0.0, ratio - 1),
            0.05,
            "one device pointer from VAE to CuPy; spectral convergence of the GPU audio over the CPU's, - 1",
        )

    def tensorrt(self, export: str, counts: tuple[int, ...]) -> tuple[float, float, str]:
        from ..runtime.loading import load

        self.require("cuda", "tensorrt")
        engine = load(artifacts=self.export_dir(export), backend="tensorrt", device="cuda")
        error, detail = self.compare_engine(engine, counts)
        return error, IMAGE_TOLERANCE["fp16"], detail


def run_doctor(
    device: str,
    *,
    steps: int = 4,
    work: str | Path | None = None,
    report: Callable[[Check], None] | None = None,
) -> dict[str, Any]:
    """Run every check (``report`` is called with each as it finishes); the JSON report."""
    if device not in ("cpu", "cuda"):
        raise RiffusionError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        check_cuda_ready()
    with tempfile.TemporaryDirectory(prefix="riffusion-doctor-", dir=work) as tmp:
        doctor = Doctor(device, Path(tmp), steps=steps)
        for path, check in doctor.all_checks():
            result = doctor.run(path, check)
            if report is not None:
                report(result)
    return {
        "schema": SCHEMA,
        "device": device,
        "environment": environment(),
        "checks": [asdict(c) for c in doctor.checks],
    }


def format_row(check: Check) -> str:
    error = "-" if check.error is None else f"{check.error:.2e}"
    tolerance = "" if check.tolerance is None else f" <= {check.tolerance:.0e}"
    return f"{check.path:<48}{check.status:<9}{error + tolerance:>20}{check.seconds:>9.1f}  {check.detail}"


HEADER = f"{'path':<48}{'status':<9}{'error vs reference':>20}{'seconds':>9}  detail"
