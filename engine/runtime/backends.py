"""Backends: one small interface, one class per runtime.

A backend runs a stage (``text_encoder``, ``unet``, ``vae_decoder``, ``vae_encoder``, and
DeepCache's ``unet_shallow``; see ``export/stages.py``) on torch tensors that live on its
device and returns the stage's output there (a tuple in the spec's order where a stage has
several: DeepCache's ``unet``), so on a GPU nothing leaves the device between stages:

- ``torch``: eager PyTorch from a model source, the reference-exact path;
- ``onnxruntime``: ONNX files from an export directory, on the CPU, CUDA or TensorRT
  execution provider, with IO binding (inputs and outputs bound to torch tensors'
  memory, no copies);
- ``tensorrt``: native engines from an export directory, device buffers as torch CUDA
  tensors, CUDA graphs when the export's profile is static;
- ``openvino``: an openvino export's IR (or an unfused export's ONNX files) compiled by
  OpenVINO for the CPU and cached, in fp32, bf16 arithmetic, or with an int8 UNet.

Heavy imports happen inside the backend that needs them; a backend that cannot run here
raises one RiffusionError saying what is missing.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ...export.manifest import Manifest
from ...export.specs import SHALLOW, StageSpec
from ...kernels.errors import RiffusionError
from .openvino_files import openvino_reads
from .tensorrt_runtime import check_export_for_provider, load_tensorrt_libraries, tensorrt_provider_options

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt", "openvino")
Device = Literal["cpu", "cuda"]
Provider = Literal["cpu", "cuda", "tensorrt"]


def runtime_module(module: str, title: str, extra: str, *, device: str, needs: Device) -> Any:
    """The runtime ``module`` for the backend of that name, which runs on ``needs`` only."""
    import importlib

    if device != needs:
        raise RiffusionError(f"the {module} backend runs on --device {needs}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RiffusionError(
            f"the {module} backend needs {title}: pip install 'riffusion-engine[{extra}]'"
        ) from exc


class Backend(ABC):
    """Runs the chain's stages on one device."""

    name: str
    device: Device
    deep_cache_branch: int | None = None  # DeepCache's branch its UNet stages run (None: none)

    @abstractmethod
    def run(self, stage: str, inputs: dict[str, Any]) -> Any:
        """The stage's output tensor for ``inputs`` (name -> torch tensor on the device),
        or its outputs' tuple where it has several."""

    def torch_device(self) -> Any:
        import torch

        return torch.device(self.device)

    def max_rows(self, stage: str) -> int | None:
        """The most rows one call of ``stage`` takes (an export's profile), or None: any."""
        return None

    def shrink_after_runs(self) -> None:  # noqa: B027 (a no-op unless the backend pools memory)
        """For a long-running process (a server): hand memory a run no longer uses back
        after every run, at some cost per run. Nothing to do where the backend keeps no
        per-shape pools; ONNX Runtime's CPU arena does."""

    def synchronize(self) -> None:
        """Wait until the work this backend queued on its device has finished (a stage's
        timer calls it at both ends). On CUDA, torch returns once its kernels are queued on
        the current stream, and so does TensorRT (its side stream is joined back into the
        current stream, ``CudaStreams.run``); ONNX Runtime's run synchronizes its own stream
        before returning. Waiting for the current stream covers all three, and leaves other
        streams (a stream session's CuPy audio kernels) running. On the CPU a run has
        finished when it returns."""
        if self.device == "cuda":
            import torch

            torch.cuda.current_stream().synchronize()


def check_device(device: str) -> Device:
    if device not in ("cpu", "cuda"):
        raise RiffusionError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RiffusionError("device cuda: torch sees no CUDA GPU (a CPU build of torch, or no GPU)")
    return device  # type: ignore[return-value]


class TorchBackend(Backend):
    """Eager PyTorch on the stage modules, fp32 (the reference) or fp16 on CUDA."""

    name = "torch"

    def __init__(
        self,
        components: Any,
        *,
        device: str = "cpu",
        fp16: bool = False,
        deep_cache_branch: int | None = None,
    ) -> None:
        import torch

        from ...export.specs import SHALLOW, STAGES
        from ...export.stages import stage_module

        self.device = check_device(device)
        if fp16 and self.device != "cuda":
            raise RiffusionError("the torch backend runs fp16 on cuda only")
        dtype = torch.float16 if fp16 else torch.float32
        self.dtype = dtype
        self.deep_cache_branch = deep_cache_branch
        names = STAGES if deep_cache_branch is None else (*STAGES, SHALLOW)
        # The DeepCache stages share the UNet's modules: one set of weights.
        self.modules = {
            name: stage_module(components, name, deep_cache_branch=deep_cache_branch).to(
                device=self.device, dtype=dtype
            )
            for name in names
        }

    def run(self, stage: str, inputs: dict[str, Any]) -> Any:
        import torch

        if stage not in self.modules:
            raise RiffusionError(f"this torch backend has no {stage} stage")
        with torch.inference_mode():
            out = self.modules[stage](**cast_inputs(inputs, self.dtype))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def cast_inputs(inputs: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """A torch stage's inputs in its modules' ``dtype``, but ``timestep``: diffusers
    computes the time embedding in fp32 from the timestep it is given
    (``UNet2DConditionModel.get_time_embed``: ``time_proj`` returns float32, then the cast
    to the sample's dtype), and its fp16 pipelines hand it the scheduler's fp32 timesteps.
    Cast to fp16 first, a fractional timestep (Euler's ``linspace``) would be rounded, in
    steps of 0.5 above 512."""
    return {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}


class ExportBackend(Backend):
    """Shared by the backends that run an export directory: the manifest and the
    sizing of output buffers from the stage specs it records."""

    def __init__(
        self, directory: str | Path, *, device: str, reads: Callable[[str], bool] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.device = check_device(device)
        # Every recorded file's hash is checked, or (``reads``) those of the files this backend reads.
        self.manifest = Manifest.load(self.directory, check_files=reads or True)
        self.deep_cache_branch = (
            self.manifest.profile.deep_cache_branch if SHALLOW in self.manifest.stages else None
        )

    def spec(self, stage: str) -> StageSpec:
        return self.manifest.stage(stage).spec

    def output_shapes(self, stage: str, inputs: dict[str, Any]) -> list[tuple[int, ...]]:
        """Each output's shape, from the inputs' sizes and the spec's dimension table."""
        return self.spec(stage).output_shapes({k: tuple(v.shape) for k, v in inputs.items()})

    def max_rows(self, stage: str) -> int | None:
        return self.spec(stage).max_rows

    def check_inputs(self, stage: str, inputs: dict[str, Any]) -> None:
        spec = self.spec(stage)
        names = spec.input_names
        if sorted(inputs) != sorted(names):
            raise RiffusionError(f"stage {stage} takes {', '.join(names)}, got {', '.join(inputs)}")


class OnnxRuntimeBackend(ExportBackend):
    """ONNX Runtime with IO binding on an export directory, on the CPU, CUDA or TensorRT
    execution provider (the last with the export's profile and engine caches under
    ``trt_cache``, by default ``<export>/ort-tensorrt``)."""

    name = "onnxruntime"

    def __init__(
        self,
        directory: str | Path,
        *,
        device: str = "cpu",
        provider: Provider | None = None,
        threads: int = 0,
        trt_cache: str | Path | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RiffusionError(
                "the onnxruntime backend needs ONNX Runtime: pip install 'riffusion-engine[models]' "
                "(or onnxruntime-gpu for CUDA)"
            ) from exc
        super().__init__(directory, device=device)
        provider = provider or ("cuda" if self.device == "cuda" else "cpu")
        names = {
            "cpu": ["CPUExecutionProvider"],
            "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        }[provider]
        missing = [p for p in names if p not in ort.get_available_providers()]
        if missing:
            raise RiffusionError(
                f"ONNX Runtime here lacks {', '.join(missing)}: pip install onnxruntime-gpu "
                "(the gpu extra) on a machine with CUDA"
            )
        if provider != "cpu" and self.device != "cuda":
            raise RiffusionError(f"the {provider} execution provider needs --device cuda")
        check_export_for_provider(self.manifest, provider)
        if provider == "tensorrt":
            load_tensorrt_libraries()
        made_for_cuda = self.manifest.target == "onnx" and self.manifest.device == "cuda"
        if provider == "cpu" and made_for_cuda:
            raise RiffusionError(
                f"export {str(self.directory)!r} was made for --device cuda (CUDA-only fused operators); "
                "export again with --device cpu for the CPU provider"
            )
        self.provider = provider
        self.providers = names
        self.trt_cache = Path(trt_cache) if trt_cache is not None else self.directory / "ort-tensorrt"
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # fatal only: a failed run raises with the same message, which the engine words once
        # (an allocation too large for the machine, memory_bound); logged too, it is said twice
        self.options.log_severity_level = 4
        if threads:
            self.options.intra_op_num_threads = threads
        self.run_options = ort.RunOptions()
        self._ort = ort
        self._sessions: dict[str, Any] = {}

    def shrink_after_runs(self) -> None:
        """Hand the CPU arena's free regions back after every run. The arena keeps the
        largest block each shape has asked for, so a server running many batch sizes and
        widths would hold their peaks for good; shrunk, what it holds between runs is its
        weights and its peak is one run's. Each run then allocates afresh, which costs
        time (most on small models, whose runs are short), so only a server asks for it
        (the run option's key and its "cpu:0" value: onnxruntime_run_options_config_keys.h)."""
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def session_providers(self, stage: str) -> list[Any]:
        """The providers list for a stage's session: the TensorRT provider gets the stage's
        profile, fp16 and its engine and timing caches."""
        if self.provider != "tensorrt":
            return list(self.providers)
        self.trt_cache.mkdir(parents=True, exist_ok=True)
        fp16 = self.manifest.stage(stage).precision == "fp16"
        options = tensorrt_provider_options(self.spec(stage), cache=self.trt_cache, fp16=fp16)
        return [("TensorrtExecutionProvider", options), *self.providers[1:]]

    def session(self, stage: str) -> Any:
        if stage not in self._sessions:
            self.spec(stage)
            path = self.directory / f"{stage}.onnx"
            session = self._ort.InferenceSession(
                str(path), self.options, providers=self.session_providers(stage)
            )
            # InferenceSession falls back to the next provider when one fails to set up
            # (printing the error): a silent CPU run is not what was asked for.
            active = session.get_providers()
            if not active or active[0] != self.providers[0]:
                raise RiffusionError(
                    f"ONNX Runtime could not set up {self.providers[0]} for {stage} (it runs on "
                    f"{', '.join(active) or 'nothing'}); see its log above"
                )
            self._sessions[stage] = session
        return self._sessions[stage]

    def run(self, stage: str, inputs: dict[str, Any]) -> Any:
        import numpy as np
        import torch

        self.check_inputs(stage, inputs)
        session = self.session(stage)
        binding = session.io_binding()
        kept = []  # the bound tensors must outlive the run
        for name, tensor in inputs.items():
            tensor = tensor.to(self.torch_device()).contiguous()
            kept.append(tensor)
            dtype = {torch.float32: np.float32, torch.int32: np.int32}[tensor.dtype]
            binding.bind_input(
                name, self.device, tensor.device.index or 0, dtype, tuple(tensor.shape), tensor.data_ptr()
            )
        outs = []
        for output, shape in zip(self.spec(stage).outputs, self.output_shapes(stage, inputs), strict=True):
            out = torch.empty(shape, dtype=torch.float32, device=self.torch_device())
            binding.bind_output(
                output.name, self.device, out.device.index or 0, np.float32, tuple(out.shape), out.data_ptr()
            )
            outs.append(out)
        if self.device == "cuda":
            # ONNX Runtime's CUDA and TensorRT providers run on their own (non-blocking)
            # streams and run_with_iobinding does not wait for torch's: let torch's queued
            # writes to the inputs finish first. The run itself synchronizes its stream
            # before returning (run option disable_synchronize_execution_providers = 0).
            torch.cuda.current_stream().synchronize()
        session.run_with_iobinding(binding, self.run_options)
        return outs[0] if len(outs) == 1 else tuple(outs)


class TensorRTBackend(ExportBackend):
    """TensorRT engines (``<stage>.plan``) on device buffers; static exports pad batches
    to their one shape and replay CUDA graphs (see ``export/tensorrt_engine.py``)."""

    name = "tensorrt"

    def __init__(self, directory: str | Path, *, device: str = "cuda") -> None:
        from ...export.tensorrt_build import check_tensorrt_version
        from ...export.tensorrt_engine import CudaStreams, check_built_by

        trt = runtime_module("tensorrt", "TensorRT", "tensorrt", device=device, needs="cuda")
        check_tensorrt_version(trt)
        super().__init__(directory, device=device)
        if self.manifest.target != "tensorrt":
            raise RiffusionError(
                f"export {str(self.directory)!r} has no TensorRT engines; export with --target tensorrt"
            )
        recorded = self.manifest.raw.get("tools", {}).get("tensorrt")
        check_built_by(recorded, str(trt.__version__), self.directory)
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._stages: dict[str, Any] = {}
        self._streams = CudaStreams()
        self.static = self.manifest.profile.static

    def _stage(self, stage: str) -> Any:
        from ...export.tensorrt_engine import load_stage_engine

        if stage not in self._stages:
            plan = self.directory / f"{stage}.plan"
            self._stages[stage] = load_stage_engine(
                self._runtime, plan, self.spec(stage), static=self.static, streams=self._streams
            )
        return self._stages[stage]

    def run(self, stage: str, inputs: dict[str, Any]) -> Any:
        self.check_inputs(stage, inputs)
        outs = self._stage(stage).run(inputs, self.output_shapes(stage, inputs), self.torch_device())
        return outs[0] if len(outs) == 1 else tuple(outs)


class OpenVinoBackend(ExportBackend):
    """OpenVINO's CPU plugin on an export directory.

    It compiles each stage's OpenVINO IR (an openvino export, ``export --target
    openvino``: weights memory-mapped from the ``.bin`` files) or, in an unfused fp32 ONNX
    export, the stage's ONNX file. Compiled models are kept in OpenVINO's model cache
    (``CACHE_DIR``): ``model_cache``, by default ``<export>/openvino-cache``, so that a second
    start imports them instead of compiling (False, or a directory that is not writable:
    nothing is cached).
    The fused ONNX Runtime operators of other exports OpenVINO computes differently (2.7e-2
    relative error on random:tiny's UNet), so the backend refuses them.

    ``inference_precision``: ``fp32``; ``bf16``, OpenVINO's bf16 arithmetic with fp32
    inputs and outputs (fast only on CPUs with bf16 instructions); ``int8``, an int8
    export's quantized UNet, with the other stages (and the UNet's float operations) in
    the best float the CPU has (bf16 where it computes bf16, else fp32)."""

    name = "openvino"
    CACHE = "openvino-cache"

    def __init__(
        self,
        directory: str | Path,
        *,
        device: str = "cpu",
        inference_precision: Literal["fp32", "bf16", "int8"] = "fp32",
        threads: int = 0,
        model_cache: str | Path | Literal[False] | None = None,
    ) -> None:
        from ...export.openvino_export import INFERENCE_HINT, computes_bf16

        ov = runtime_module("openvino", "OpenVINO", "openvino", device=device, needs="cpu")
        super().__init__(directory, device=device, reads=openvino_reads(directory, inference_precision))
        manifest = self.manifest
        self.ir = manifest.target == "openvino"
        if not self.ir and (
            manifest.target != "onnx"
            or any(s.precision != "fp32" or s.fusions for s in manifest.stages.values())
        ):
            raise RiffusionError(
                f"the openvino backend runs an openvino export (riffusion-engine export --target openvino) "
                f"or an unfused fp32 ONNX export; {str(self.directory)!r} is neither"
            )
        if inference_precision not in ("fp32", "bf16", "int8"):
            raise RiffusionError(
                f"inference_precision must be fp32, bf16 or int8, got {inference_precision!r}"
            )
        if inference_precision == "int8" and not manifest.int8:
            raise RiffusionError(
                f"export {str(self.directory)!r} has no int8 UNet; make one with "
                "riffusion-engine export --target openvino --precision int8"
            )
        self._core = ov.Core()
        self.inference_precision = inference_precision
        # What the float operations run in: an int8 UNet's, and every other stage's.
        self.float_precision = inference_precision
        if inference_precision == "int8":
            self.float_precision = "bf16" if computes_bf16(self._core) else "fp32"
        self.config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": INFERENCE_HINT[self.float_precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        cache = Path(model_cache) if model_cache else self.directory / self.CACHE
        self.model_cache = _writable(cache) if model_cache is not False else None
        if self.model_cache is not None:
            self._core.set_property({"CACHE_DIR": str(self.model_cache)})
        self._requests: dict[str, Any] = {}
        self.loaded_from_cache: dict[str, bool] = {}  # stage -> imported from the cache, not compiled

    def model_path(self, stage: str) -> Path:
        """The file a stage compiles from: its IR (the int8 IR of the UNet, and of DeepCache's
        shallow stage, when running int8), or an unfused ONNX export's ONNX file."""
        from ...export.manifest import openvino_file

        entry = self.manifest.stage(stage)
        # The UNet's int8 IR, and DeepCache's shallow stage's where it has one.
        int8 = self.inference_precision == "int8" and entry.int8 is not None
        files = entry.files
        ir = openvino_file(stage, int8=int8)
        return self.directory / (ir if ir in files else f"{stage}.onnx")

    def request(self, stage: str) -> Any:
        """The stage's infer request, compiled (or imported from the cache) on first use."""
        if stage not in self._requests:
            self.spec(stage)
            compiled = self._core.compile_model(str(self.model_path(stage)), "CPU", self.config)
            try:
                self.loaded_from_cache[stage] = bool(compiled.get_property("LOADED_FROM_CACHE"))
            except RuntimeError:  # an OpenVINO without the property
                self.loaded_from_cache[stage] = False
            self._requests[stage] = compiled.create_infer_request()
        return self._requests[stage]

    def run(self, stage: str, inputs: dict[str, Any]) -> Any:
        import torch

        self.check_inputs(stage, inputs)
        request = self.request(stage)
        arrays = {name: tensor.detach().cpu().contiguous().numpy() for name, tensor in inputs.items()}
        request.infer(arrays, share_inputs=True)
        # The request owns its output buffers and reuses them on the next call: copy them out.
        outs = [
            torch.from_numpy(request.get_output_tensor(i).data.copy())
            for i in range(len(self.spec(stage).outputs))
        ]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _writable(directory: Path) -> Path | None:
    """``directory``, made where missing, if this process can write there; else None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return directory if os.access(directory, os.W_OK | os.X_OK) else None


def create_backend(
    name: str,
    *,
    components: Any = None,
    directory: str | Path | None = None,
    device: str = "cpu",
    **options: Any,
) -> Backend:
    """The backend ``name`` (``auto``: see ``auto_backend``) over ``components`` (torch)
    or an export ``directory`` (the others)."""
    name = resolve_backend(name, device)
    if name == "torch":
        if components is None:
            raise RiffusionError(
                "the torch backend runs from a model source (--model), not an export directory"
            )
        return TorchBackend(components, device=device, **options)
    if directory is None:
        raise RiffusionError(f"the {name} backend runs from an export directory")
    if name == "onnxruntime":
        return OnnxRuntimeBackend(directory, device=device, **options)
    if name == "openvino":
        return OpenVinoBackend(directory, device=device, **options)
    return TensorRTBackend(directory, device=device, **options)


def resolve_backend(name: str, device: str) -> str:
    """``name`` checked against BACKENDS, with ``auto`` replaced by ``auto_backend``'s choice."""
    if name == "auto":
        name = auto_backend(device)
    if name not in BACKENDS:
        raise RiffusionError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or auto")
    return name


def auto_backend(device: str) -> str:
    """On a GPU: TensorRT where it is installed, else ONNX Runtime where it has its CUDA
    provider (onnxruntime-gpu), else torch. On the CPU: ONNX Runtime (fastest measured on
    this project's CPU benchmarks), else torch."""
    import importlib.util

    if device == "cuda" and importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    if importlib.util.find_spec("onnxruntime") is None:
        return "torch"
    if device == "cuda":
        import onnxruntime as ort

        return "onnxruntime" if "CUDAExecutionProvider" in ort.get_available_providers() else "torch"
    return "onnxruntime"
