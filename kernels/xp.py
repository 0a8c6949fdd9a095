"""Array-module plumbing: one source for NumPy (CPU) and CuPy (GPU).

Every kernel takes its array module ``xp`` (``numpy`` or ``cupy``) as a
parameter. This module is the only place that knows how the two differ: which
FFT to call, how to fuse an elementwise function, how to take a GPU tensor
without copying it to the host.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from .errors import RiffusionError

Device = Literal["cpu", "cuda"]


def get_xp(device: Device) -> ModuleType:
    """``numpy`` for ``cpu``, ``cupy`` for ``cuda`` (imported only then)."""
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy
        except ImportError as exc:
            raise RiffusionError(
                "device 'cuda' needs CuPy: pip install 'riffusion-engine[gpu]' "
                "(CUDA 13; gpu-cu12 for CUDA 12)"
            ) from exc
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # cupy raises its own CUDARuntimeError types
            raise RiffusionError(f"device 'cuda': no usable CUDA device ({exc})") from exc
        return cupy
    raise RiffusionError(f"unknown device {device!r}; choose 'cpu' or 'cuda'")


def is_cupy(xp: ModuleType) -> bool:
    return xp.__name__ == "cupy"


# Device copies of cached host constants, by (device, stream, host array): see on_device.
_constants: OrderedDict[tuple[int, int, int], tuple[np.ndarray, Any]] = OrderedDict()
_constants_lock = threading.Lock()
DEVICE_CONSTANTS = 128  # copies kept: a few per parameter set and stream (window, ramps, phases, ...)


def on_device(host: np.ndarray, xp: ModuleType) -> Any:
    """A cached, read-only host constant (a window, a filterbank's inverse, a phase start)
    as an ``xp`` array: ``host`` itself on NumPy; on CuPy, one copy per device and CUDA
    stream, made on that stream and read only by work queued on it.

    One device copy shared by every stream would be wrong: ``cupy.asarray`` copies on the
    current stream, asynchronously (``cupy/_core/core.pyx``, ``_send_object_to_gpu``:
    ``copy_from_host_async`` from a pinned buffer), and a stream session's non-blocking
    stream does not wait for another stream's copy; and when the copy is freed, CuPy's
    pool hands its block back to the arena of the stream that allocated it
    (``SingleDeviceMemoryPool._arenas``, ``cupy/cuda/memory.pyx``), which may rewrite it
    while another stream still reads it. Per stream, the copy, its reads and its reuse
    are all in one stream's order. The streams that run the kernels are never destroyed
    (the null stream, and the stream sessions' pool, ``engine/stream/stream.py``), so a
    stream's pointer names one stream for the life of the process."""
    if not is_cupy(xp):
        return host
    key = (xp.cuda.Device().id, xp.cuda.get_current_stream().ptr, id(host))
    with _constants_lock:
        found = _constants.get(key)
        if found is not None and found[0] is host:  # the id of this very array, not a reused one
            _constants.move_to_end(key)
            return found[1]
    copy = xp.asarray(host)
    with _constants_lock:
        _constants[key] = (host, copy)  # the host array held too: its id stays its own
        while len(_constants) > DEVICE_CONSTANTS:
            _constants.popitem(last=False)
    return copy


def device_of(array: Any) -> Device:
    """Where an array lives: CuPy arrays and CUDA tensors (DLPack) are ``cuda``."""
    module = type(array).__module__
    if module.startswith("cupy"):
        return "cuda"
    device = getattr(array, "device", None)
    if module.startswith("torch") and getattr(device, "type", "cpu") == "cuda":
        return "cuda"
    return "cpu"


def as_array(array: Any, xp: ModuleType, dtype: Any = None) -> Any:
    """``array`` as an ``xp`` array, without a host round trip for GPU input.

    A torch CUDA tensor handed to CuPy goes through DLPack (zero copy); a CPU
    torch tensor handed to NumPy likewise.
    """
    module = type(array).__module__
    if module.startswith("torch"):
        if is_cupy(xp):
            if device_of(array) != "cuda":
                array = array.cuda()
            # CuPy takes a strided DLPack tensor as a strided view (dlpack.pyx), so a
            # permuted tensor (the VAE's channels-last image) is not copied either.
            out = xp.from_dlpack(array.detach())
        else:
            if device_of(array) == "cuda":
                array = array.cpu()
            out = np.from_dlpack(array.detach().contiguous())
    elif is_cupy(xp):
        out = xp.asarray(array)
    else:
        if module.startswith("cupy"):
            array = array.get()
        out = np.asarray(array)
    return out if dtype is None else out.astype(dtype, copy=False)


def to_numpy(array: Any) -> np.ndarray:
    if type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def rfft(x: Any, n: int, xp: ModuleType) -> Any:
    """Real FFT along the last axis: ``scipy.fft`` with all cores, or ``cupy.fft`` (plan cache)."""
    if is_cupy(xp):
        return xp.fft.rfft(x, n=n, axis=-1)
    import scipy.fft

    return scipy.fft.rfft(x, n=n, axis=-1, workers=_workers())


def irfft(x: Any, n: int, xp: ModuleType) -> Any:
    """Inverse of :func:`rfft` (length ``n`` along the last axis)."""
    if is_cupy(xp):
        return xp.fft.irfft(x, n=n, axis=-1)
    import scipy.fft

    return scipy.fft.irfft(x, n=n, axis=-1, workers=_workers())


@functools.cache
def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class Elementwise:
    """A plain elementwise function written for ``cupy.fuse``, and the argument kinds it
    takes (a dtype name for an array, ``("scalar", dtype name)`` for a NumPy scalar), from
    which a CPU test traces it with CuPy's fusion tracer."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


ELEMENTWISE: dict[Callable[..., Any], Elementwise] = {}
_FUSED: dict[Callable[..., Any], Callable[..., Any]] = {}


def elementwise(*args: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a function that :func:`fused` may fuse, with its argument kinds.

    The function takes its array module as the keyword ``xp`` and may use only what
    CuPy's fusion tracer supports on its variables: arithmetic, comparison and bitwise
    operators, ``astype``, and ``xp`` ufuncs (``xp.absolute``, ``xp.sqrt``, ...) — not
    builtins such as ``abs()``, not NumPy's ufuncs, not ``.real``/``.imag``/indexing
    (cupy/_core/fusion.pyx and _fusion_interface.py define no ``__abs__``,
    ``__array_ufunc__`` or those attributes)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        ELEMENTWISE[fn] = Elementwise(fn, args)
        return fn

    return register


def fused(fn: Callable[..., Any], xp: ModuleType) -> Callable[..., Any]:
    """``fn`` (declared with :func:`elementwise`) fused into one kernel on the GPU.

    On NumPy the plain function runs as written, with ``xp=numpy``."""
    assert fn in ELEMENTWISE, f"{fn.__name__} is not declared @elementwise"
    if not is_cupy(xp):
        return functools.partial(fn, xp=np)
    if fn not in _FUSED:

        def bound(*args: Any) -> Any:
            return fn(*args, xp=xp)

        _FUSED[fn] = xp.fuse(kernel_name=fn.__name__)(bound)
    return _FUSED[fn]


def as_strided(x: Any, shape: tuple[int, ...], strides: tuple[int, ...], xp: ModuleType) -> Any:
    """A strided view of ``x`` (NumPy's or CuPy's ``as_strided``)."""
    return xp.lib.stride_tricks.as_strided(x, shape=shape, strides=strides)
