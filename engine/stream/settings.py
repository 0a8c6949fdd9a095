"""A stream's settings, its chunks and the arithmetic of joined clips' lengths."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...kernels.errors import RiffusionError
from ..runtime.defaults import SCHEDULER, STEPS, WIDTH
from ..runtime.requests import SCHEDULERS, Clip, Request

# runner(requests, deadlines, should_stop) -> images (batch, height, width, 3) in [0, 1]:
# how a stream's diffusion runs (directly on the engine, or through a server's scheduler).
Runner = Callable[[Sequence[Request], Sequence[float], Callable[[], bool]], Any]


@dataclass(frozen=True)
class StreamSettings:
    """How a stream's clips are made and joined."""

    steps: int = STEPS  # scheduler steps per clip (the web app's 50)
    width: int = WIDTH  # image width per clip (512 = 5.12 s)
    scheduler: str = SCHEDULER  # one of pipeline.SCHEDULERS
    alpha_step: float = 0.25  # alpha added per clip (the web app's 0.25: 4 clips per prompt change)
    crossfade_s: float = 0.2  # equal-power crossfade at each join (without continuation)
    continuation: bool = False  # each clip keeps the previous clip's last columns
    continuation_columns: int = 64  # columns kept with continuation (0.64 s; a multiple of 8)
    lookahead: int = 1  # clips denoised as one batch
    # audio of clip n overlaps the diffusion of clip n + 1 (a thread); None: on a GPU only
    # (on a CPU both stages share the cores: 0.99x-1.01x measured on two, docs/performance.md)
    pipeline: bool | None = None
    buffer: int = 2  # chunks made ahead of the reader at most

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise RiffusionError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.scheduler not in SCHEDULERS:
            raise RiffusionError(
                f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        if not math.isfinite(self.alpha_step) or not 0 < self.alpha_step <= 1:
            raise RiffusionError(f"alpha_step must be in (0, 1], got {self.alpha_step!r}")
        if not math.isfinite(self.crossfade_s) or not 0 <= self.crossfade_s <= 2.5:
            raise RiffusionError(f"crossfade_s must be in [0, 2.5] seconds, got {self.crossfade_s!r}")
        if self.continuation:
            k = self.continuation_columns
            if not isinstance(k, int) or k < 8 or k % 8 or k >= self.width:
                raise RiffusionError(
                    f"continuation_columns must be a multiple of 8 in 8..{self.width - 8}, got {k!r}"
                )
        for name in ("lookahead", "buffer"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 16:
                raise RiffusionError(f"{name} must be an integer in 1..16, got {value!r}")
        if self.continuation and self.lookahead != 1:
            # each continuation clip starts from the previous clip's image
            raise RiffusionError("continuation needs lookahead 1 (each clip starts from the one before)")


@dataclass
class StreamChunk:
    """A piece of the joined audio: clip ``index``'s, less the tail held for the next join."""

    index: int  # clip number, from 0; the final tail is a chunk with the last clip's index
    audio: np.ndarray  # (channels, samples) int16: what to play next, gapless after the previous chunk
    sample_rate: int  # Hz
    start_s: float  # where this chunk starts in the stream's audio
    request: Request  # the clip's request (its prompts and alpha)
    clip: Clip | None  # the clip as made (None for the final tail)
    made_at: float = field(default_factory=time.monotonic)  # when it was ready
    final: bool = False  # the last chunk: the stream has stopped
    generation: int = 0  # the stream's steer count when it was made (Stream.current)

    @property
    def duration_s(self) -> float:
        return self.audio.shape[-1] / self.sample_rate


def clip_samples(settings: StreamSettings, params: Any) -> int:
    """L: the audio samples of one clip ((width - 1) hops)."""
    return (settings.width - 1) * params.hop_length


def overlap_samples(settings: StreamSettings, params: Any) -> int:
    """C: the samples crossfaded at each join."""
    if settings.continuation:
        return (settings.continuation_columns - 1) * params.hop_length
    return round(settings.crossfade_s * params.sample_rate)


def check_joins(settings: StreamSettings, params: Any) -> None:
    """One clear error, before any clip is made, where a clip is too short for the joins on
    both its ends (what :class:`~.joins.Joiner` would refuse at the first clip)."""
    clip, overlap = clip_samples(settings, params), overlap_samples(settings, params)
    if clip > 2 * overlap:
        return
    rate = params.sample_rate
    join = (
        f"continuation_columns {settings.continuation_columns}"
        if settings.continuation
        else f"crossfade_s {settings.crossfade_s:g}"
    )
    raise RiffusionError(
        f"{join} joins {overlap / rate:.2f} s at each end of a clip, which needs clips of more than "
        f"{2 * overlap / rate:.2f} s; width {settings.width} makes clips of {clip / rate:.2f} s: "
        "give a wider width or a shorter join"
    )


def advance_samples(settings: StreamSettings, params: Any) -> int:
    """L - C: how far each clip after the first moves the stream on."""
    return clip_samples(settings, params) - overlap_samples(settings, params)


def length_samples(settings: StreamSettings, params: Any, clips: int) -> int:
    """Samples of ``clips`` joined clips: ``N * L - (N - 1) * C``."""
    return clips * clip_samples(settings, params) - max(clips - 1, 0) * overlap_samples(settings, params)


def clips_for(settings: StreamSettings, params: Any, seconds: float) -> int:
    """The fewest clips whose joined audio lasts ``seconds``."""
    need = math.ceil(seconds * params.sample_rate) - overlap_samples(settings, params)
    return max(1, math.ceil(max(need, 0) / advance_samples(settings, params)))
