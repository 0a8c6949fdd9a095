"""What a run is asked for and what it gives: the prompt inputs, the request (every
parameter one clip depends on), the clip, and the schedulers by name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...kernels.errors import RiffusionError
from .defaults import SCHEDULER, STEPS, WIDTH

# name -> (diffusers class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    # Few-step samplers for LoRAs distilled to them (LCM-LoRA, TCD), guidance off.
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
# Keyword arguments of a scheduler's step: TCD's stochasticity eta, at its authors' 0.3
# (diffusers' pipelines pass eta=0.0 unless told; pass eta=0.3 to them to compare).
STEP_OPTIONS: dict[str, dict[str, Any]] = {"tcd": {"eta": 0.3}}
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1


class Cancelled(RiffusionError):
    """A run stopped early because its ``should_stop`` callback asked it to."""


@dataclass(frozen=True)
class PromptInput:
    """One end of a Riffusion request (its ``start`` or ``end``)."""

    prompt: str  # what to generate; (word:1.3) and [word] set emphasis
    seed: int = 0  # seed of the noise (and of the seed image's posterior sample)
    negative_prompt: str | None = None  # what to steer away from
    guidance: float = 7.0  # classifier-free guidance scale; <= 1 turns guidance off
    denoising: float = 0.75  # with a seed image: share of the steps run, 0..1

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise RiffusionError(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise RiffusionError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if not math.isfinite(self.denoising) or not 0 <= self.denoising <= 1:
            raise RiffusionError(f"denoising must be in [0, 1], got {self.denoising!r}")


@dataclass(frozen=True)
class Request:
    """Everything one clip depends on."""

    start: PromptInput  # the prompt input (alpha 0)
    end: PromptInput | None = None  # interpolate towards this one (alpha 1)
    alpha: float = 0.0  # position between start and end, 0..1
    steps: int = STEPS  # scheduler steps (a seed image runs int(steps * denoising) of them)
    width: int = WIDTH  # image width in pixels (512 = 5.12 s)
    scheduler: str = SCHEDULER  # one of SCHEDULERS
    seed_image: Any = None  # PIL image, width x 512, to start from
    mask: Any = None  # PIL grayscale image, same size: white = regenerate, black = keep

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or not 0 <= self.alpha <= 1:
            raise RiffusionError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise RiffusionError(f"steps must be an integer in 1..{MAX_STEPS}, got {self.steps!r}")
        if not isinstance(self.width, int) or self.width < 8 or self.width % 8:
            raise RiffusionError(f"width must be a positive multiple of 8 pixels, got {self.width!r}")
        if self.scheduler not in SCHEDULERS:
            raise RiffusionError(
                f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        if self.mask is not None and self.seed_image is None:
            raise RiffusionError("a mask needs a seed image (it says which parts of it to keep)")

    @property
    def blend(self) -> PromptInput:
        """Guidance and denoising at alpha (the other fields are the start's)."""
        if self.end is None:
            return self.start
        a = self.alpha
        return replace(
            self.start,
            guidance=(1 - a) * self.start.guidance + a * self.end.guidance,
            denoising=(1 - a) * self.start.denoising + a * self.end.denoising,
        )

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one batch."""
        first = first_step(self.steps, self.blend.denoising) if self.seed_image is not None else 0
        return (self.steps, self.width, self.scheduler, self.seed_image is not None, first)


@dataclass
class Clip:
    """A generated clip: audio, its spectrogram image and where the time went."""

    audio: np.ndarray  # (channels, samples) int16
    sample_rate: int  # Hz
    image: Any  # PIL spectrogram image, parameters and max value in its EXIF
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def duration_s(self) -> float:
        return self.audio.shape[-1] / self.sample_rate

    def save(self, path: str | Path) -> Path:
        """Audio by extension (.wav .flac .ogg .mp3), or the image (.png)."""
        from ...kernels.audio import AUDIO_FORMATS, save_audio
        from ...kernels.image import save_image

        path = Path(path)
        if path.suffix.lower() == ".png":
            return save_image(self.image, path)
        if path.suffix.lower() in AUDIO_FORMATS:
            return save_audio(path, self.audio, self.sample_rate)
        raise RiffusionError(f"cannot save a clip as {path.suffix!r}; use .png or {', '.join(AUDIO_FORMATS)}")


def first_step(steps: int, denoising: float) -> int:
    """diffusers' img2img: the index of the first of the steps a seed image runs."""
    return max(steps - min(int(steps * denoising), steps), 0)


def unet_calls(request: Request) -> int:
    """The UNet calls ``request`` makes: its steps (with a seed image, the share
    ``denoising`` runs), one more with PNDM (whose first step takes two)."""
    first = first_step(request.steps, request.blend.denoising) if request.seed_image is not None else 0
    return request.steps - first + (1 if request.scheduler == "pndm" else 0)
