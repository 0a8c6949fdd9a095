"""Measuring: warm-up rounds, then timed rounds that alternate the things compared; the
median and 90th percentile of the runs; the machine a measurement ran on.

``bench`` and the benchmark scripts (``benchmarks/report.py``) share these.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class Round:
    """Which round a call belongs to."""

    index: int  # counted within its phase: the warm-up rounds 0, 1, ..., then the timed ones 0, 1, ...
    warmup: bool  # an untimed round


@dataclass
class Rounds(Generic[T]):
    """What ``alternate`` measured."""

    seconds: dict[str, list[float]]  # each call's wall seconds, one per timed round
    outputs: dict[str, T]  # each call's output in the last round


def timed(call: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """``call(*args, **kwargs)``'s wall seconds and its result."""
    start = time.perf_counter()
    result = call(*args, **kwargs)
    return time.perf_counter() - start, result


def alternate(
    calls: Mapping[str, Callable[[Round], T]],
    *,
    runs: int,
    warmup: int = 1,
    after: Callable[[str, Round, float, T], None] | None = None,
) -> Rounds[T]:
    """``warmup`` untimed rounds, then ``runs`` timed ones. Each round calls every entry of
    ``calls`` once, in order (A B C A B C ...), so that drift hits all of them alike;
    ``after`` sees each call's name, round, seconds and output as it finishes."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    outputs: dict[str, T] = {}
    rounds = [Round(i, True) for i in range(warmup)] + [Round(i, False) for i in range(runs)]
    for round_ in rounds:
        for name, call in calls.items():
            elapsed, outputs[name] = timed(call, round_)
            if not round_.warmup:
                seconds[name].append(elapsed)
            if after is not None:
                after(name, round_, elapsed, outputs[name])
    return Rounds(seconds, outputs)


def summary(seconds: Sequence[float]) -> dict[str, Any]:
    """``{"median_s", "p90_s", "runs"}``: the median and 90th percentile of the runs, and
    the runs."""
    return {
        "median_s": float(np.median(seconds)),
        "p90_s": float(np.percentile(seconds, 90)),
        "runs": list(seconds),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """The machine and the installed versions a report was measured with."""
    from ...export.artifacts import gpu_info, tool_versions
    from ..runtime.cpu import cpu_features

    names = ("torch", "onnx", "onnxruntime", "openvino", "tensorrt", "diffusers", "transformers")
    versions = {k: v for k, v in tool_versions((*names, "numpy", "scipy", "librosa")).items() if v}
    return {
        "cpu": cpu_model(),
        "cpu_features": list(cpu_features()),  # bf16 and int8 instructions the figures depend on
        "cores": os.cpu_count(),
        "gpu": gpu_info(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
    }
