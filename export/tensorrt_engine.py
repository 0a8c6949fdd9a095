"""Running one TensorRT engine on torch tensors: loading, shapes, addresses, static batches,
streams. The TensorRT backend (``engine/runtime/backends.py``) runs a stage with it, and
the export verifies each engine it builds with it (``tensorrt_build.engine_runner``): one
runtime for both, on the CUDA libraries torch loaded, with no second CUDA runtime to find.

Written against the TensorRT 10 Python API (``python/src/infer/pyCore.cpp``;
``include/NvInferRuntime.h``):

- ``Runtime.deserialize_cuda_engine`` and ``ICudaEngine.create_execution_context`` return
  None on failure; ``IExecutionContext.set_input_shape``, ``set_tensor_address`` and
  ``execute_async_v3`` return ``False`` and do not raise. Every call here checks the value
  and raises a RiffusionError that names the stage, the tensor and the shapes the profile takes.
- A static export (min = opt = max) takes exactly one shape. The pipeline sends fewer
  rows than that (the text encoder only the prompts not cached, the UNet 2 x requests
  rows, the VAE one per request), so inputs are copied into buffers of the static
  shape, the spare rows keep whatever valid data they last held (zeros at first), and
  the output's first rows are returned. Rows do not interact in any stage (no batch
  statistics), so the padding cannot change a result. Other non-batch sizes are refused.
- Streams: the engine runs on its own CUDA stream, ordered with torch's current
  stream both ways (``Stream.wait_stream``: later work waits for the work queued at the
  call) and every tensor it touches is marked with ``Tensor.record_stream``, so the
  caching allocator does not hand the memory out while TensorRT may still use it.
  Static shapes capture the launch in a CUDA graph once (after a warm-up launch outside
  the capture, which TensorRT needs for its deferred set-up) and replay it.

Everything but the CUDA stream and graph handling is plain Python over the runtime and
context objects, so a stand-in for them tests it without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..kernels.errors import RiffusionError
from .specs import StageSpec


class CudaStreams:
    """A side stream for TensorRT, ordered with torch's current stream both ways."""

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self.stream = torch.cuda.Stream()

    def run(self, launch: Callable[[int], None], tensors: Sequence[Any]) -> None:
        current = self._torch.cuda.current_stream()
        self.stream.wait_stream(current)  # the inputs' producers have finished
        with self._torch.cuda.stream(self.stream):
            launch(self.stream.cuda_stream)
        for tensor in tensors:
            tensor.record_stream(self.stream)
        current.wait_stream(self.stream)  # torch reads the outputs after TensorRT wrote them

    def capture(self, launch: Callable[[int], None]) -> Callable[[int], None]:
        """A CUDA graph of ``launch``: the replay to hand to :meth:`run`."""
        torch = self._torch
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            launch(self.stream.cuda_stream)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph makes self.stream current for the capture (and synchronizes
        # first); TensorRT must enqueue on that stream for its kernels to be captured.
        # thread_local: other threads (a server's, bench's memory sampler) may make CUDA
        # calls during the capture, which "global" mode would turn into capture errors.
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            launch(self.stream.cuda_stream)
        torch.cuda.current_stream().wait_stream(self.stream)
        # CUDAGraph.replay launches on the current stream, which run() makes self.stream.
        return lambda _handle: graph.replay()


class InlineStreams:
    """No device streams: ``launch`` runs at once (a stand-in context on CPU tensors)."""

    def run(self, launch: Callable[[int], None], tensors: Sequence[Any]) -> None:
        launch(0)

    def capture(self, launch: Callable[[int], None]) -> Callable[[int], None]:
        return launch


class StageEngine:
    """One stage's execution context and its spec (from the export's manifest)."""

    def __init__(self, stage: str, context: Any, spec: StageSpec, *, static: bool, streams: Any) -> None:
        self.stage = stage
        self.context = context
        self.spec = spec
        self.static = static
        self.streams = streams
        self.inputs = {t.name: t for t in spec.inputs}  # name -> the spec's tensor
        self._static_buffers: dict[str, Any] | None = None
        self._static_outs: list[Any] = []
        self._replay: Callable[[int], None] | None = None
        self.engine: Any = None  # the ICudaEngine the context belongs to, kept alive with it

    # -- checks -------------------------------------------------------------------

    def _launch(self, handle: int) -> None:
        if not self.context.execute_async_v3(handle):
            raise RiffusionError(f"TensorRT failed to enqueue {self.stage} (execute_async_v3 returned False)")

    def _profile(self, name: str) -> str:
        low, high = self.inputs[name].size("min"), self.inputs[name].size("max")
        return f"{low}" if low == high else f"{low} to {high}"

    def _bind(self, inputs: dict[str, Any], outs: list[Any]) -> None:
        for name, tensor in inputs.items():
            shape = tuple(tensor.shape)
            if not self.context.set_input_shape(name, shape):
                raise RiffusionError(
                    f"TensorRT refused {self.stage} input {name} of shape {shape}: the export's profile "
                    f"takes {self._profile(name)}"
                )
            if not self.context.set_tensor_address(name, tensor.data_ptr()):
                raise RiffusionError(f"TensorRT refused the address of {self.stage} input {name}")
        for output, out in zip(self.spec.outputs, outs, strict=True):
            if not self.context.set_tensor_address(output.name, out.data_ptr()):
                raise RiffusionError(f"TensorRT refused the address of {self.stage} output {output.name}")

    # -- running ------------------------------------------------------------------

    def run(self, inputs: dict[str, Any], out_shapes: list[tuple[int, ...]], device: Any) -> list[Any]:
        """The stage's outputs for ``inputs`` (contiguous float32 tensors of ``out_shapes``,
        in the spec's order)."""
        import torch

        inputs = {
            k: v.to(device=device, dtype=getattr(torch, self.inputs[k].dtype)).contiguous()
            for k, v in inputs.items()
        }
        if self.static:
            return self._run_static(inputs, out_shapes, device)
        outs = [torch.empty(shape, dtype=torch.float32, device=device) for shape in out_shapes]
        self._bind(inputs, outs)
        self.streams.run(self._launch, [*inputs.values(), *outs])
        return outs

    def static_shape(self, name: str) -> tuple[int, ...]:
        return self.inputs[name].size("max")

    def _run_static(
        self, inputs: dict[str, Any], out_shapes: list[tuple[int, ...]], device: Any
    ) -> list[Any]:
        import torch

        rows = {int(t.shape[0]) for t in inputs.values()}
        if len(rows) != 1:
            raise RiffusionError(f"{self.stage}: inputs disagree on the batch size ({sorted(rows)})")
        (n,) = rows
        for name, tensor in inputs.items():
            shape = self.static_shape(name)
            if tuple(tensor.shape[1:]) != shape[1:] or n > shape[0]:
                raise RiffusionError(
                    f"{self.stage}: input {name} has shape {tuple(tensor.shape)}; this static export takes "
                    f"{shape} (up to {shape[0]} rows, padded)"
                )
        if self._static_buffers is None:
            self._static_buffers = {
                name: torch.zeros(self.static_shape(name), dtype=tensor.dtype, device=device)
                for name, tensor in inputs.items()
            }
            full = self.static_shape(next(iter(inputs)))[0]
            self._static_outs = [
                torch.empty((full, *shape[1:]), dtype=torch.float32, device=device) for shape in out_shapes
            ]
            self._bind(self._static_buffers, self._static_outs)
            self._replay = self.streams.capture(self._launch)
        buffers = self._static_buffers
        for name, tensor in inputs.items():
            buffers[name][:n].copy_(tensor)
        assert self._replay is not None
        self.streams.run(self._replay, [])
        return [out[:n].clone() for out in self._static_outs]


def load_stage_engine(
    runtime: Any, plan: Path, spec: StageSpec, *, static: bool, streams: Any
) -> StageEngine:
    """``plan`` (a serialized engine of ``spec``'s stage) deserialized by ``runtime`` (a
    ``tensorrt.Runtime``) with its execution context; the engine stays alive with it."""
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise RiffusionError(
            f"TensorRT cannot load {plan.name}: it was built by another TensorRT version or for another "
            "GPU; export again (the export cache's key holds both, so a new export is made)"
        )
    context = engine.create_execution_context()
    if context is None:
        raise RiffusionError(f"TensorRT could not create an execution context for {spec.name}")
    stage = StageEngine(spec.name, context, spec, static=static, streams=streams)
    stage.engine = engine  # the context needs its engine alive
    return stage


def check_built_by(recorded: str | None, installed: str, directory: Path) -> None:
    """One clear error where the export's engines were built by another TensorRT than the
    one installed (its manifest's ``tools.tensorrt``; None in exports that did not record
    it): TensorRT loads only engines its own version built (``deserialize_cuda_engine``
    returns None)."""
    if recorded is not None and recorded != installed:
        raise RiffusionError(
            f"export {str(directory)!r} holds engines built by TensorRT {recorded}; TensorRT {installed} "
            "is installed and cannot load them: export again (an export on first use does so by itself)"
        )
