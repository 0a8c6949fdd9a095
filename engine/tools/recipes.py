"""Bench's recipe rows: fewer full UNet calls per clip, each beside the uncached run it
approximates.

Under a profile, every engine row that is a candidate for real time (every row but an
OpenVINO fp32 row that has faster siblings) gets twins on the same backend (no second
copy of the model): one per DeepCache schedule (``NAME deep-cache INTERVAL:BRANCH``) and
one sampling in fewer steps (``NAME 2 steps``). Each twin's agreement is measured against
its uncached row in the same mode and run (:func:`versus`), and the DeepCache gate
(:func:`deep_cache_gates`) says which schedules a profile may choose.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...kernels.audio import spectrogram_from_waveform
from ...kernels.errors import RiffusionError
from ...kernels.metrics import spectral_convergence
from ..runtime.deep_cache import DeepCache, parse_deep_cache

DEEP_CACHE = " deep-cache "  # a DeepCache twin: "openvino int8 deep-cache 3:0"
FEWER_STEPS = " steps"  # a fewer-steps twin: "openvino int8 2 steps"
# A DeepCache schedule passes where its error against the uncached run (RMS gray levels)
# is at most this many times bf16's against fp32 in the same run and mode: one yardstick
# for every lossy choice, as int8's gate (bench.precision_gates) measures int8's.
GATE_RATIO = 2.0


def parse_schedules(values: tuple[str, ...]) -> tuple[DeepCache, ...]:
    """Bench's ``--deep-cache`` list: schedules of one branch (one export holds one branch's
    stages), ``0`` or ``1`` dropped."""
    schedules = tuple(s for s in (parse_deep_cache(v) for v in values) if s is not None)
    branches = {s.branch for s in schedules}
    if len(branches) > 1:
        raise RiffusionError(
            f"--deep-cache: one branch per bench run (an export holds one branch's stages), got "
            f"{', '.join(str(s) for s in schedules)}; run bench again for another branch"
        )
    return tuple(dict.fromkeys(schedules))


def with_schedule(engine: Any, schedule: DeepCache | None) -> Any:
    """``engine`` with another DeepCache schedule, on the same backend (same compiled stages)."""
    from ..runtime.pipeline import Engine

    twin = Engine(
        engine.backend,
        engine.tokenizer,
        engine.scheduler_config,
        engine.shape,
        params=engine.params,
        griffin_lim=engine.griffin_lim,
        cache_size=engine.cache_size,
        choices=engine.choices,
        deep_cache=schedule,
    )
    twin.widen = engine.widen
    return twin


def twins(
    engines: dict[str, Any], schedules: tuple[DeepCache, ...], fewer_steps: int, steps: int
) -> dict[str, tuple[Any, dict[str, Any], str]]:
    """Each candidate row's twins: row name -> (engine, request overrides, the row it approximates)."""
    rows: dict[str, tuple[Any, dict[str, Any], str]] = {}
    for name, engine in engines.items():
        backend, _, precision = name.partition(" ")
        siblings = [n for n in engines if n.startswith(f"{backend} ") and n != name]
        if name.endswith(" default") or (precision == "fp32" and siblings):
            continue
        for schedule in schedules:
            rows[f"{name}{DEEP_CACHE}{schedule}"] = (with_schedule(engine, schedule), {}, name)
        if 0 < fewer_steps < steps:
            rows[f"{name} {fewer_steps}{FEWER_STEPS}"] = (engine, {"steps": fewer_steps}, name)
    return rows


def versus(outputs: dict[str, Any], name: str, anchor: str, params: Any) -> dict[str, float]:
    """Row ``name``'s image and audio against row ``anchor``'s: pixels within 1, 4 and 16
    gray levels, RMS and largest difference in gray levels, and the mel spectral
    convergence of its audio against the anchor's."""
    (pixels, audio), (ref_pixels, ref_audio) = outputs[name], outputs[anchor]
    gray = np.abs(pixels.astype(int) - ref_pixels.astype(int))
    ref_mel = spectrogram_from_waveform(ref_audio.astype(np.float32), params)
    return {
        **{f"share_within_{n}_gray_levels": float((gray <= n).mean()) for n in (1, 4, 16)},
        "rms_gray_levels": float(np.sqrt((gray.astype(float) ** 2).mean())),
        "max_abs_gray_levels": int(gray.max()),
        "spectral_convergence": spectral_convergence(audio.astype(np.float32), ref_mel, params),
    }


def deep_cache_gates(results: dict[str, Any], mode_of: dict[str, str]) -> dict[str, Any]:
    """Per DeepCache twin: its RMS error against its uncached row, bf16's against fp32 on
    the same backend and mode, and whether the first is within GATE_RATIO times the
    second (no gate where the run has no bf16 row: a CPU without bf16 instructions)."""
    gates = {}
    for name, entry in results.items():
        if DEEP_CACHE not in name or "agreement_vs_uncached" not in entry:
            continue
        backend = entry["uncached_row"].split(" ")[0]
        bf16 = results.get(f"{backend} bf16{mode_of[name]}", {}).get("agreement_vs_fp32")
        if bf16 is None:
            continue
        error, allowed = entry["agreement_vs_uncached"]["rms_gray_levels"], bf16["rms_gray_levels"]
        ratio = error / allowed if allowed > 0 else float("inf") if error > 0 else 1.0
        gates[name] = {"deep_cache": error, "bf16": allowed, "ratio": ratio, "holds": ratio <= GATE_RATIO}
    return gates
