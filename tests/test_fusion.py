"""Every function handed to ``cupy.fuse`` traces through CuPy's own fusion tracer.

CuPy imports without a GPU, and its (default) fusion tracer is pure Python: it builds
the kernel's code from the operations the function applies to CuPy's fusion
variables. An operation those variables do not define — the builtin ``abs()``, a NumPy
ufunc, ``.real`` — fails here on the CPU exactly as it would fail on the first GPU run.
"""

from __future__ import annotations

import numpy as np
import pytest
from riffusion_engine.kernels import griffin_lim
from riffusion_engine.kernels import xp as xpm

cupy = pytest.importorskip("cupy")
fusion = pytest.importorskip("cupy._core.fusion")
thread_local = pytest.importorskip("cupy._core._fusion_thread_local").thread_local


def trace(fn, kinds: tuple, *, xp=None):
    """Trace ``fn`` with CuPy's fusion tracer (cupy/_core/fusion.pyx: _FusionHistory,
    _FusionVarArray, _FusionVarScalar), as ``cupy.fuse`` does on its first call: the
    generated operation code and the output dtypes. Raises what tracing raises."""
    history = fusion._FusionHistory()
    thread_local.history = history
    thread_local.is_old_fusing = True
    try:
        args = []
        for kind in kinds:
            if isinstance(kind, tuple):  # ("scalar", dtype): a NumPy scalar argument
                dtype = np.dtype(kind[1])
                param = history._fresh_premap_param(dtype)
                args.append(fusion._FusionVarScalar(param, -1, False, dtype.type))
            else:
                args.append(fusion._FusionVarArray(history._fresh_premap_param(np.dtype(kind)), 2, False))
        out = fn(*args) if xp is None else fn(*args, xp=xp)
        outs = out if isinstance(out, tuple) else (out,)
        return history._emit_operation_code(), [o.dtype for o in outs]
    finally:
        thread_local.history = None
        thread_local.is_old_fusing = False


def test_at_least_the_griffin_lim_update_is_declared() -> None:
    assert griffin_lim._fgla_step in xpm.ELEMENTWISE


@pytest.mark.parametrize("declared", list(xpm.ELEMENTWISE.values()), ids=lambda d: d.fn.__name__)
def test_each_fused_function_traces_on_cupy(declared: xpm.Elementwise) -> None:
    code, dtypes = trace(declared.fn, declared.args, xp=cupy)
    assert code  # the tracer emitted the kernel body
    # The output keeps the widest input type (no silent promotion to float64/complex128).
    widest = np.result_type(*[np.dtype(k[1] if isinstance(k, tuple) else k) for k in declared.args])
    assert all(d == widest for d in dtypes), dtypes


def test_the_tracer_refuses_what_cupy_fuse_refuses() -> None:
    """The check can fail: the builtin abs() and NumPy's ufuncs are not fusable."""
    kinds = ("complex64", "float32", ("scalar", "float32"))

    def builtin_abs(a, b, c):
        return a * (b / (abs(a) + c))

    def numpy_ufunc(a, b, c):
        return a * (b / (np.absolute(a) + c))

    def cupy_ufunc(a, b, c):
        return a * (b / (cupy.absolute(a) + c))

    for fn in (builtin_abs, numpy_ufunc):
        with pytest.raises(TypeError, match="abs"):
            trace(fn, kinds)
    assert trace(cupy_ufunc, kinds)[1] == [np.complex64]
