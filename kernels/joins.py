"""Joining clips into gapless audio: an equal-power crossfade over a fixed number of
samples at each join, so ``N`` clips of ``L`` samples make exactly ``N * L - (N - 1) * C``."""

from __future__ import annotations

import numpy as np

from .errors import RiffusionError


def equal_power(samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The fade-out and fade-in gains of an equal-power crossfade over ``samples``
    (``cos`` and ``sin`` of a quarter turn; their squares sum to 1)."""
    t = (np.arange(samples, dtype=np.float64) + 0.5) / max(samples, 1)
    return np.cos(t * np.pi / 2), np.sin(t * np.pi / 2)


def crossfade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    """``tail`` faded out over ``head`` faded in (same shape), as float64."""
    out_gain, in_gain = equal_power(tail.shape[-1])
    return tail.astype(np.float64) * out_gain + head.astype(np.float64) * in_gain


def _int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio), -32768, 32767).astype(np.int16)


class Joiner:
    """Turns clips into gapless chunks (module docstring: joins)."""

    def __init__(self, overlap: int) -> None:
        self.overlap = overlap  # C: samples crossfaded at each join
        self.tail: np.ndarray | None = None
        self.position = 0  # samples emitted so far

    def add(self, audio: np.ndarray) -> tuple[np.ndarray, int]:
        """The chunk for the next clip's ``audio`` (channels, samples) and where it starts."""
        c = self.overlap
        if audio.shape[-1] <= 2 * c:
            raise RiffusionError(f"a clip of {audio.shape[-1]} samples is too short for a {c}-sample join")
        body = audio[:, : audio.shape[-1] - c]
        if self.tail is not None and c:
            body = np.concatenate(
                [_int16(crossfade(self.tail, audio[:, :c])), audio[:, c : audio.shape[-1] - c]], 1
            )
        self.tail = audio[:, audio.shape[-1] - c :]
        start, self.position = self.position, self.position + body.shape[-1]
        return body.astype(np.int16, copy=False), start

    def flush(self) -> tuple[np.ndarray, int] | None:
        if self.tail is None or not self.tail.shape[-1]:
            return None
        tail, self.tail = self.tail, None
        start, self.position = self.position, self.position + tail.shape[-1]
        return tail, start
