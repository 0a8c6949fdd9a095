"""Array-module plumbing: one source for NumPy (CPU) and CuPy (GPU).

Every kernel takes its array module ``xp`` (``numpy`` or ``cupy``) as a
parameter. This module is the only place that knows how the two differ: which
FFT to call, how to fuse an elementwise function, how to take a GPU tensor
without copying it to the host.
"""

from __future__ import annotations

import functools
import os
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
