"""What a run is asked for and what it gives: the prompt inputs, the request (every
parameter one clip depends on), the clip, and the schedulers by name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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
# The entries of a clip's timings that count rather than time: UNet steps, and the full
# UNet calls among them (fewer with DeepCache).
COUNTS = ("unet_steps", "unet_full_calls")
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
        if not isinstance(self.prompt, str):
            raise RiffusionError(f"prompt must be text, got {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise RiffusionError("prompt is empty")  # before any model is loaded or exported
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise RiffusionError(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise RiffusionError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if not math.isfinite(self.denoising) or not 0 <= self.denoising <= 1:
            raise RiffusionError(f"denoising must be in [0, 1], got {self.denoising!r}")


@dataclass(frozen=True)
class Blend:
    """A point between two prompt inputs, as a clip at ``alpha`` makes it: text embeddings
    and guidance and denoising interpolated linearly, noise spherically (each end's own
    draws, as :class:`Request` interpolates them). A stream steered mid-walk starts from
    the last clip's point, so the music moves on from where it is instead of jumping
    back; ``start`` may itself be a blend (steered again before the walk reached its end)."""

    start: PromptInput | Blend
    end: PromptInput
    alpha: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or not 0 <= self.alpha <= 1:
            raise RiffusionError(f"alpha must be in [0, 1], got {self.alpha!r}")

    @property
    def guidance(self) -> float:
        return (1 - self.alpha) * self.start.guidance + self.alpha * self.end.guidance

    @property
    def denoising(self) -> float:
        return (1 - self.alpha) * self.start.denoising + self.alpha * self.end.denoising

    @property
    def seed(self) -> int:
        """The seed whose generator draws a clip's other randomness (its start's)."""
        return self.start.seed

    @property
    def depth(self) -> int:
        """Blends nested in this one, itself included."""
        return 1 + (self.start.depth if isinstance(self.start, Blend) else 0)

    def leaves(self) -> list[PromptInput]:
        """The prompt inputs it blends, start first."""
        return [*leaves(self.start), self.end]

    @classmethod
    def point(cls, start: PromptInput | Blend, end: PromptInput | None, alpha: float) -> PromptInput | Blend:
        """The point at ``alpha`` from ``start`` to ``end``: an end itself at alpha 0 or 1."""
        if end is None or alpha <= 0:
            return start
        return end if alpha >= 1 else cls(start, end, alpha)


Point = PromptInput | Blend


def leaves(point: Point) -> list[PromptInput]:
    """The prompt inputs ``point`` is made of."""
    return point.leaves() if isinstance(point, Blend) else [point]


@dataclass(frozen=True)
class Request:
    """Everything one clip depends on."""

    start: Point  # the prompt input (alpha 0), or a point between two (a steered stream's)
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
    def blend(self) -> Point:
        """The clip's point: its guidance and denoising are the ones it runs at."""
        return self.start if self.end is None else Blend(self.start, self.end, self.alpha)

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
    # Seconds per stage, and the counts in COUNTS (UNet steps, full UNet calls among them)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.audio.shape[-1] / self.sample_rate

    @property
    def seconds(self) -> float:
        """The seconds the clip took, its stages' together."""
        return sum(v for k, v in self.timings.items() if k not in COUNTS)

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
