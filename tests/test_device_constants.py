"""The kernels' cached constants on a device: one copy per device and CUDA stream
(``kernels.xp.on_device``), checked with a stand-in for CuPy's stream and copy calls;
the real streams are ``tests/test_gpu_kernels.py::test_cached_constants_are_copied_per_stream``."""

from __future__ import annotations

import types

import numpy as np
from riffusion_engine.kernels import xp as xpm
from riffusion_engine.kernels.mel import inverse_filterbank
from riffusion_engine.kernels.params import SpectrogramParams


class StandInCupy(types.ModuleType):
    """``cupy`` as on_device uses it: the current device and stream, and a copy made on it."""

    def __init__(self) -> None:
        super().__init__("cupy")
        self.stream = 0
        self.copies: list[tuple[int, np.ndarray]] = []  # (stream, copy) in the order made
        self.cuda = types.SimpleNamespace(
            Device=lambda: types.SimpleNamespace(id=0),
            get_current_stream=lambda: types.SimpleNamespace(ptr=self.stream),
        )

    def asarray(self, host: np.ndarray) -> np.ndarray:
        copy = np.array(host)
        self.copies.append((self.stream, copy))
        return copy


def test_numpy_gets_the_cached_host_array_itself() -> None:
    params = SpectrogramParams()
    host = inverse_filterbank(params, 1, 1024, np)
    assert inverse_filterbank(params, 1, 1024, np) is host
    assert not host.flags.writeable  # shared by every caller: nobody writes into it


def test_one_copy_per_stream_made_on_that_stream(monkeypatch) -> None:
    monkeypatch.setattr(xpm, "_constants", type(xpm._constants)())
    cupy = StandInCupy()
    params = SpectrogramParams()
    host = inverse_filterbank(params, 1, 1024, np)
    cupy.stream = 11
    a = inverse_filterbank(params, 1, 1024, cupy)
    assert inverse_filterbank(params, 1, 1024, cupy) is a  # cached on its stream
    cupy.stream = 22
    b = inverse_filterbank(params, 1, 1024, cupy)
    assert b is not a
    assert [stream for stream, _ in cupy.copies] == [11, 22]  # each made on the stream that reads it
    np.testing.assert_array_equal(a, host)
    np.testing.assert_array_equal(b, host)
    cupy.stream = 11
    assert inverse_filterbank(params, 1, 1024, cupy) is a


def test_the_copies_are_bounded_and_keyed_by_the_host_array_itself(monkeypatch) -> None:
    monkeypatch.setattr(xpm, "_constants", type(xpm._constants)())
    monkeypatch.setattr(xpm, "DEVICE_CONSTANTS", 4)
    cupy = StandInCupy()
    hosts = [np.full(3, i, dtype=np.float32) for i in range(6)]
    for host in hosts:
        xpm.on_device(host, cupy)
    assert len(xpm._constants) == 4  # the oldest copies dropped
    np.testing.assert_array_equal(xpm.on_device(hosts[5], cupy), hosts[5])
    assert len(cupy.copies) == 6  # the newest was still held: no new copy
    # An array whose id a dropped array had (ids are reused) gets its own copy, not the old one's.
    replacement = np.zeros(3, dtype=np.float32)
    xpm._constants[(0, 0, id(replacement))] = (np.ones(3, dtype=np.float32), "a dropped array's copy")
    np.testing.assert_array_equal(xpm.on_device(replacement, cupy), replacement)
