"""An int8 UNet's calibration, collected from the engine's own sampling.

The exporter hands :func:`collect` the fp32 export it is making and a
:class:`~riffusion_engine.export.calibration.CalibrationPlan`; this runs the plan's clips
through the engine's denoising loop (the plan's scheduler, steps and guidance; text to
clip, and the seed image at its denoising) with a backend that records every UNet call.
Calibration clips run in the best float the CPU has (bf16 where it computes bf16) and keep
the calls the plan names, the loop stopping after the last; held-out clips run in fp32 and
keep their calls' inputs and fp32 outputs, the reference the int8 UNet is checked against. Each clip is
stored as it is made, so an interrupted export resumes from the clips it has. Every call is
a full UNet call; a DeepCache export's UNet also gives the feature it keeps, which the
shallow stage is calibrated and checked on, beside the same call's inputs.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np

from ...export.calibration import CalibrationPlan, CalibrationSet, ClipStore, Draw
from ...export.specs import FEATURE
from .backends import Backend, OpenVinoBackend
from .pipeline import Engine
from .requests import Cancelled, PromptInput, Request

Call = dict[str, np.ndarray]  # a UNet call's inputs, its "output" and (DeepCache) its "deep_feature"


class RecordingBackend(Backend):
    """Runs another backend (an export's) and keeps each UNet call's inputs and output
    (and a DeepCache UNet's feature) as NumPy arrays."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name, self.device, self.manifest = inner.name, inner.device, inner.manifest
        self.deep_cache_branch = inner.deep_cache_branch
        self.calls: list[Call] = []

    def run(self, stage: str, inputs: dict[str, Any]) -> Any:
        output = self.inner.run(stage, inputs)
        if stage == "unet":
            call = {name: tensor.detach().cpu().numpy().copy() for name, tensor in inputs.items()}
            outputs = output if isinstance(output, tuple) else (output,)
            for name, tensor in zip(("output", FEATURE), outputs, strict=False):
                call[name] = tensor.detach().cpu().numpy().copy()
            self.calls.append(call)
        return output


def _engine(directory: Path, precision: str) -> Engine:
    # Nothing cached: these compiled models serve the calibration only.
    backend = OpenVinoBackend(directory, inference_precision=precision, model_cache=False)  # type: ignore[arg-type]
    return Engine.from_export(RecordingBackend(backend), directory)


def _denoise(engine: Any, plan: CalibrationPlan, draw: Draw, image: Any) -> list[Call]:
    """The UNet calls of one clip that ``draw.keep`` names (the loop stops after the last);
    ``image``: the plan's seed image at the clip's width."""
    recorder: RecordingBackend = engine.backend
    recorder.calls = []
    request = Request(
        PromptInput(draw.prompt, draw.seed, guidance=plan.guidance, denoising=plan.denoising),
        steps=plan.steps,
        width=draw.width,
        scheduler=plan.scheduler,
        seed_image=image if draw.mode == "seed_image" else None,
    )
    engine.check(request)
    last = draw.keep[-1]
    try:
        engine.denoise([request], should_stop=lambda: len(recorder.calls) > last)
    except Cancelled:
        pass  # the calls kept are made: the rest of the clip is not needed
    return [recorder.calls[i] for i in draw.keep]


def collect(directory: Path, plan: CalibrationPlan, store: ClipStore, progress: bool) -> CalibrationSet:
    """The plan's UNet inputs on the fp32 openvino export in ``directory`` (``store``
    keeps each clip's; clips already there are not made again)."""
    from tqdm.auto import tqdm

    from .cpu import best_float
    from .seeds import seed_image

    sampled_with = best_float()
    images = {width: seed_image(plan.seed_image, width=width) for width in plan.widths}
    parts: dict[str, list[Call]] = {}
    for kind, draws, precision in (
        ("calibration", plan.calibration(), sampled_with),
        ("held_out", plan.held_out(), "fp32"),
    ):
        calls: list[Call] = []
        engine = None
        for index, draw in enumerate(
            tqdm(draws, desc=f"{kind.replace('_', '-')} clips", unit="clip", disable=not progress)
        ):
            stored = store.get(kind, index)
            if stored is None:
                engine = engine or _engine(directory, precision)
                stored = _denoise(engine, plan, draw, images[draw.width])
                store.put(kind, index, stored)
            calls += stored
        parts[kind] = calls
        del engine
        gc.collect()  # the compiled models go before the next precision's (or NNCF's) are made

    def inputs(call: Call) -> dict[str, np.ndarray]:
        return {k: v for k, v in call.items() if k not in ("output", FEATURE)}

    deep = all(FEATURE in call for kind in parts for call in parts[kind])
    return CalibrationSet(
        samples=[inputs(call) for call in parts["calibration"]],
        held_out=[inputs(call) for call in parts["held_out"]],
        held_out_outputs=[call["output"] for call in parts["held_out"]],
        sampled_with=sampled_with,
        features=[call[FEATURE] for call in parts["calibration"]] if deep else None,
        held_out_features=[call[FEATURE] for call in parts["held_out"]] if deep else None,
    )
