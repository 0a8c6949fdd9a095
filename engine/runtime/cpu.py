"""The CPU's instructions, and the precision its OpenVINO UNet runs fastest in.

A profile whose CPU precision is ``auto`` (the realtime profile's) runs the precision
:func:`auto_precision` picks from the CPU's class: the fastest of fp32, bf16 and int8 as
measured for that class (docs/performance.md, "Precision per CPU": one UNet call of
``random:full`` at 512 px, ``benchmarks/bench_int8.py``). The AVX-512 BF16 + VNNI class
was measured on such a CPU; AVX-512 VNNI and AVX2 on it with OpenVINO's kernels limited
to those instructions (``--isa``); AMX could not be measured, and its reason says so.
Its DeepCache schedule, where its profile's is ``auto``, is :func:`auto_deep_cache`'s:
the fastest that passed ``bench``'s agreement gate (docs/performance.md, "DeepCache").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .deep_cache import DeepCache

# The CPU instructions the precisions depend on, as /proc/cpuinfo names them.
CPU_FEATURES = (
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
BF16_FEATURES = ("avx512_bf16", "amx_bf16")  # bf16 arithmetic in hardware
INT8_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products in hardware


@functools.cache
def cpu_features() -> tuple[str, ...]:
    """Which of :data:`CPU_FEATURES` this CPU has (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(name for name in CPU_FEATURES if name in flags)
    except OSError:
        pass
    return ()


def has_bf16(features: tuple[str, ...] | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (OpenVINO runs f32 where it does not)."""
    features = cpu_features() if features is None else features
    return any(f in features for f in BF16_FEATURES)


def best_float(features: tuple[str, ...] | None = None) -> str:
    """The fastest float precision of an OpenVINO stage here: bf16 where the CPU has it."""
    return "bf16" if has_bf16(features) else "fp32"


@dataclass(frozen=True)
class CpuClass:
    """CPUs alike for the UNet's precision: the instructions that define the class and the
    precision that runs its UNet call fastest, with why."""

    name: str
    needs: tuple[str, ...]  # all of these
    precision: str  # fp32, bf16 or int8
    why: str


# Most capable first: a CPU belongs to the first class whose instructions it has all of.
CPU_CLASSES = (
    CpuClass(
        "AMX",
        ("amx_int8",),
        "int8",
        "AMX-INT8 tiles do twice AMX-BF16's operations per cycle (not measured: no AMX machine "
        "was available)",
    ),
    CpuClass(
        "AVX-512 BF16 + VNNI",
        ("avx512_bf16", "avx512_vnni"),
        "int8",
        "an int8 UNet call measured 0.69x bf16's, 0.37x fp32's",
    ),
    CpuClass(
        "AVX-512 VNNI",
        ("avx512_vnni",),
        "int8",
        "an int8 UNet call measured 0.46x fp32's (no bf16 here)",
    ),
    CpuClass(
        "AVX2",
        ("avx2",),
        "int8",
        "an int8 UNet call measured 0.88x fp32's (no VNNI: 7-bit weights keep its sums exact)",
    ),
)


# DeepCache's schedule per (CPU class, UNet precision): (interval, branch, why), the
# fastest in the web app's mode whose agreement with the uncached run passed bench's gate
# on random:full (its error at most twice bf16's against fp32; docs/performance.md).
_AGREES = "0.30 gray levels RMS from the uncached clip (1.45x bf16's error)"
_SHARE = "a shallow call measured {share} of a full int8 call"
DEEP_CACHE: dict[tuple[str, str], tuple[int, int, str]] = {
    ("AVX-512 BF16 + VNNI", "int8"): (3, 1, f"web app's mode RTF 0.68 from 1.10 uncached, {_AGREES}"),
    ("AVX-512 BF16 + VNNI", "bf16"): (3, 1, f"web app's mode RTF 0.85 from 1.52 uncached, {_AGREES}"),
    ("AVX-512 VNNI", "int8"): (
        3,
        1,
        _SHARE.format(share="0.34")
        + " (--isa avx512_core_vnni); agreement as on AVX-512 BF16 + VNNI, "
        + _AGREES,
    ),
    ("AVX2", "int8"): (
        3,
        1,
        _SHARE.format(share="0.32") + " (--isa avx2); agreement as on AVX-512 BF16 + VNNI, " + _AGREES,
    ),
    ("AMX", "int8"): (3, 1, "not measured on AMX; agreement as on AVX-512 BF16 + VNNI, " + _AGREES),
}


def cpu_class(features: tuple[str, ...] | None = None) -> CpuClass | None:
    """The class of a CPU with ``features`` (default: this one's), or None below AVX2."""
    features = cpu_features() if features is None else features
    for c in CPU_CLASSES:
        if all(f in features for f in c.needs):
            return c
    return None


def auto_deep_cache(precision: str, features: tuple[str, ...] | None = None) -> tuple[DeepCache | None, str]:
    """The DeepCache schedule an ``auto`` profile runs at ``precision`` on a CPU with
    ``features`` (default: this one's), and why: the fastest measured for the class whose
    agreement with the uncached run passed (docs/performance.md, "DeepCache")."""
    c = cpu_class(features)
    recipe = DEEP_CACHE.get((c.name if c else "", precision))
    if recipe is None:
        return None, f"DeepCache off: not measured at {precision} on this CPU's class"
    interval, branch, why = recipe
    return DeepCache(interval, branch), f"DeepCache {interval}:{branch}: {why}"


def auto_precision(features: tuple[str, ...] | None = None) -> tuple[str, str]:
    """The precision an ``auto`` profile runs OpenVINO's UNet in on a CPU with ``features``
    (default: this one's), and why, in a few words."""
    c = cpu_class(features)
    if c is None:
        return "fp32", "auto: no AVX2, the CPU class nothing was measured on"
    return c.precision, f"auto: {c.name} CPU, {c.why}"
