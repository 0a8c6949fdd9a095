"""Device memory as the device sees it, sampled while work runs.

torch's ``max_memory_allocated`` counts torch's caching allocator only; TensorRT's
engines and workspaces, ONNX Runtime's arena and CuPy's pool allocate beside it. The
device's own count covers them all: NVML's ``nvmlDeviceGetMemoryInfo(handle).used``
(the ``nvidia-ml-py`` package, in the gpu extra), or else ``cudaMemGetInfo`` through
``torch.cuda.mem_get_info`` (total - free). Both count every process on the device, so
the figure is the rise over a baseline taken before the work, by a sampling thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def device_memory_reader(device_index: int = 0) -> tuple[Callable[[], int], str]:
    """A function giving the bytes in use on the CUDA device, and what it reads (nvml or
    cudaMemGetInfo)."""
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        # By UUID: NVML numbers devices without regard to CUDA_VISIBLE_DEVICES.
        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        return (lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)), "nvml"
    except Exception as exc:  # not installed, no NVML library, no UUID: the CUDA runtime's count
        log.info("NVML unavailable (%s); reading cudaMemGetInfo", exc)

    def used() -> int:
        free, total = torch.cuda.mem_get_info(device_index)
        return int(total - free)

    return used, "cudaMemGetInfo"


class PeakMemory:
    """The peak rise of ``read()`` over its value at :meth:`start`, sampled every
    ``interval_s`` on a thread until :meth:`stop` (which takes a last sample)."""

    def __init__(self, read: Callable[[], int], *, interval_s: float = 0.01) -> None:
        self.read = read
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        self.baseline = self.peak = self.read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        """The peak rise in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.read())
        return self.peak - self.baseline

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class TorchPeak:
    """torch's caching allocator's peak during a run, above what it held when the run began
    (``torch.cuda``'s counters are the process's: without a reset, ``max_memory_allocated``
    is the highest of any earlier work too). ``reset_peak_memory_stats`` sets each peak to
    the current value (``torch/cuda/memory.py``; c10's ``Stat::reset_peak``), and what was
    allocated at the start is subtracted at the end, as :class:`PeakMemory` subtracts its
    baseline."""

    def __init__(self) -> None:
        import torch

        self._cuda = torch.cuda
        self.baseline = 0

    def start(self) -> TorchPeak:
        self._cuda.synchronize()
        self._cuda.reset_peak_memory_stats()
        self.baseline = int(self._cuda.memory_allocated())
        return self

    def stop(self) -> int:
        """The peak rise in bytes."""
        self._cuda.synchronize()
        return int(self._cuda.max_memory_allocated()) - self.baseline
