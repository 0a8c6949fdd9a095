"""Spectrogram parameters, Riffusion's defaults, and their EXIF encoding.

The field names, defaults and EXIF tag ids are those of Riffusion's
``SpectrogramParams`` so that images written by either project load in the other
with their parameters.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import RiffusionError


class ExifTag(enum.IntEnum):
    """Riffusion's EXIF tag ids for the spectrogram parameters."""

    SAMPLE_RATE = 11000
    STEREO = 11005
    STEP_SIZE_MS = 11010
    WINDOW_DURATION_MS = 11020
    PADDED_DURATION_MS = 11030
    NUM_FREQUENCIES = 11040
    MIN_FREQUENCY = 11050
    MAX_FREQUENCY = 11060
    POWER_FOR_IMAGE = 11070
    MAX_VALUE = 11080


# Used by Riffusion when an image carries no max value.
DEFAULT_MAX_VALUE = 30e6


@dataclass(frozen=True)
class SpectrogramParams:
    """How audio maps to a spectrogram image (Riffusion's defaults)."""

    stereo: bool = False  # two channels: image G = left, B = right
    sample_rate: int = 44100  # Hz
    step_size_ms: int = 10  # hop between frames = one image column
    window_duration_ms: int = 100  # Hann window length
    padded_duration_ms: int = 400  # FFT size (window zero-padded to it)
    num_frequencies: int = 512  # mel bins = image height
    min_frequency: int = 0  # Hz, lowest mel edge
    max_frequency: int = 10000  # Hz, highest mel edge
    mel_scale_norm: Literal[None] = None  # filterbank normalisation (Riffusion: none)
    mel_scale_type: Literal["htk"] = "htk"  # mel formula
    num_griffin_lim_iters: int = 32  # Griffin-Lim iterations
    power_for_image: float = 0.25  # image = (mel / max) ** power

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise RiffusionError(f"sample_rate must be positive, got {self.sample_rate}")
        for name in ("step_size_ms", "window_duration_ms", "padded_duration_ms", "num_frequencies"):
            if getattr(self, name) <= 0:
                raise RiffusionError(f"{name} must be positive, got {getattr(self, name)}")
        if self.window_duration_ms > self.padded_duration_ms:
            raise RiffusionError(
                f"window_duration_ms ({self.window_duration_ms}) exceeds "
                f"padded_duration_ms ({self.padded_duration_ms})"
            )
        if not 0 <= self.min_frequency < self.max_frequency <= self.sample_rate / 2:
            raise RiffusionError(
                f"need 0 <= min_frequency < max_frequency <= sample_rate / 2, got "
                f"{self.min_frequency}, {self.max_frequency} at {self.sample_rate} Hz"
            )
        if not self.power_for_image > 0:
            raise RiffusionError(f"power_for_image must be positive, got {self.power_for_image}")
        if self.num_griffin_lim_iters < 0:
            raise RiffusionError(f"num_griffin_lim_iters must be >= 0, got {self.num_griffin_lim_iters}")
        if self.mel_scale_norm is not None or self.mel_scale_type != "htk":
            raise RiffusionError("only Riffusion's HTK mel scale without normalisation is supported")

    @property
    def n_fft(self) -> int:
        return int(self.padded_duration_ms / 1000.0 * self.sample_rate)

    @property
    def win_length(self) -> int:
        return int(self.window_duration_ms / 1000.0 * self.sample_rate)

    @property
    def hop_length(self) -> int:
        return int(self.step_size_ms / 1000.0 * self.sample_rate)

    @property
    def channels(self) -> int:
        return 2 if self.stereo else 1

    def num_frames(self, num_samples: int) -> int:
        """Frames (image columns) of a centred STFT of ``num_samples`` samples."""
        return 1 + (num_samples + 2 * (self.n_fft // 2) - self.n_fft) // self.hop_length

    def num_samples(self, num_frames: int) -> int:
        """Samples that ``num_frames`` centred frames describe."""
        return self.hop_length * (num_frames - 1)

    def duration_s(self, num_frames: int) -> float:
        return self.num_samples(num_frames) / self.sample_rate

    def replace(self, **changes: Any) -> SpectrogramParams:
        return dataclasses.replace(self, **changes)

    # --- EXIF ---------------------------------------------------------------

    def to_exif(self) -> dict[int, Any]:
        """The parameters under Riffusion's EXIF tag ids."""
        return {
            ExifTag.SAMPLE_RATE.value: self.sample_rate,
            ExifTag.STEREO.value: self.stereo,
            ExifTag.STEP_SIZE_MS.value: self.step_size_ms,
            ExifTag.WINDOW_DURATION_MS.value: self.window_duration_ms,
            ExifTag.PADDED_DURATION_MS.value: self.padded_duration_ms,
            ExifTag.NUM_FREQUENCIES.value: self.num_frequencies,
            ExifTag.MIN_FREQUENCY.value: self.min_frequency,
            ExifTag.MAX_FREQUENCY.value: self.max_frequency,
            ExifTag.POWER_FOR_IMAGE.value: float(self.power_for_image),
        }

    @classmethod
    def from_exif(cls, exif: Mapping[int, Any]) -> SpectrogramParams:
        """Parameters from an image's EXIF; tags that are absent keep the defaults."""
        fields: dict[str, Any] = {}
        for tag, name, kind in (
            (ExifTag.SAMPLE_RATE, "sample_rate", int),
            (ExifTag.STEREO, "stereo", bool),
            (ExifTag.STEP_SIZE_MS, "step_size_ms", int),
            (ExifTag.WINDOW_DURATION_MS, "window_duration_ms", int),
            (ExifTag.PADDED_DURATION_MS, "padded_duration_ms", int),
            (ExifTag.NUM_FREQUENCIES, "num_frequencies", int),
            (ExifTag.MIN_FREQUENCY, "min_frequency", int),
            (ExifTag.MAX_FREQUENCY, "max_frequency", int),
            (ExifTag.POWER_FOR_IMAGE, "power_for_image", float),
        ):
            if tag.value in exif:
                value = exif[tag.value]
                try:
                    fields[name] = kind(float(value)) if kind is int else kind(value)
                except (TypeError, ValueError) as exc:
                    raise RiffusionError(f"EXIF tag {tag.value} ({name}) holds {value!r}") from exc
        return cls(**fields)


def max_value_from_exif(exif: Mapping[int, Any]) -> float:
    """The spectrogram's max value stored with an image, else Riffusion's default."""
    value = exif.get(ExifTag.MAX_VALUE.value, DEFAULT_MAX_VALUE)
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise RiffusionError(f"EXIF max value (tag {ExifTag.MAX_VALUE.value}) holds {value!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise RiffusionError(f"EXIF max value must be positive and finite, got {value}")
    return value
