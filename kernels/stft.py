"""STFT and ISTFT with centred, reflect-padded frames (the convention of
``torch.stft(center=True)`` and ``librosa.stft(pad_mode="reflect")``).

A Hann window of ``win_length`` samples sits centred in each ``n_fft``-sample
frame. Only the window's support is framed and transformed: ``rfft(segment,
n=fft_size)``. With ``fft_size == n_fft`` this is the usual zero-padded
transform; a smaller ``fft_size`` (down to ``win_length``) samples the same
spectrum on a coarser frequency grid (every ``n_fft / fft_size``-th bin).

Frames are strided views of the padded signal and overlap-add runs one vector
operation per window/hop ratio, never a Python loop over frames. Shapes:
signals ``(..., samples)``, spectra ``(..., frames, bins)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import xp as xpm
from .errors import RiffusionError


@dataclass(frozen=True)
class StftPlan:
    """Geometry of one STFT; its methods take the array module."""

    n_fft: int  # frame length (the window is centred in it)
    hop_length: int  # samples between frame starts
    win_length: int  # Hann window length (its support)
    fft_size: int  # transform length; n_fft for the standard zero-padded STFT

    def __post_init__(self) -> None:
        if not 0 < self.win_length <= self.n_fft:
            raise RiffusionError(f"win_length must be in 1..n_fft={self.n_fft}, got {self.win_length}")
        if not self.win_length <= self.fft_size:
            raise RiffusionError(f"fft_size ({self.fft_size}) must be >= win_length ({self.win_length})")
        if self.hop_length <= 0:
            raise RiffusionError(f"hop_length must be positive, got {self.hop_length}")

    @property
    def left(self) -> int:
        """Offset of the window inside its frame."""
        return (self.n_fft - self.win_length) // 2

    @property
    def pad(self) -> int:
        """Reflect padding on each side of the signal (centred frames)."""
        return self.n_fft // 2

    @property
    def n_bins(self) -> int:
        return self.fft_size // 2 + 1

    def num_frames(self, num_samples: int) -> int:
        return 1 + (num_samples + 2 * self.pad - self.n_fft) // self.hop_length

    def window(self, xp: ModuleType) -> Any:
        return xpm.on_device(_hann(self.win_length), xp)

    # -- segment-origin transforms: phase measured from the window's first sample ---

    def forward(self, x: Any, xp: ModuleType) -> Any:
        """``(..., samples)`` -> ``(..., frames, bins)``, phase relative to each window start."""
        if x.shape[-1] <= self.pad:
            raise RiffusionError(
                f"signal of {x.shape[-1]} samples is too short for reflect padding of {self.pad}"
            )
        lead = x.shape[:-1]
        flat = xp.ascontiguousarray(x.reshape((-1, x.shape[-1])))
        padded = xp.pad(flat, ((0, 0), (self.pad, self.pad)), mode="reflect")
        frames = self.num_frames(x.shape[-1])
        item = padded.itemsize
        view = xpm.as_strided(
            padded[:, self.left :],
            (padded.shape[0], frames, self.win_length),
            (padded.strides[0], self.hop_length * item, item),
            xp,
        )
        segments = view * self.window(xp)  # (batch, frames, win_length)
        spec = xpm.rfft(segments, self.fft_size, xp)  # (batch, frames, bins)
        return spec.reshape((*lead, frames, self.n_bins))

    def inverse(self, spec: Any, xp: ModuleType, length: int | None = None) -> Any:
        """Least-squares inverse of :meth:`forward`: ``(..., frames, bins)`` -> ``(..., length)``."""
        frames = spec.shape[-2]
        if length is None:
            length = self.hop_length * (frames - 1)
        segments = xpm.irfft(spec, self.fft_size, xp)[..., : self.win_length]
        segments *= self.window(xp)  # (..., frames, win_length); the irfft output is ours to overwrite
        y = overlap_add(segments, hop_length=self.hop_length, xp=xp)
        y *= xpm.on_device(_inverse_window_envelope(self, frames), xp)
        start = self.pad - self.left  # y starts at padded position `left`
        out = y[..., start : start + length]
        if out.shape[-1] < length:
            widths = [(0, 0)] * (out.ndim - 1) + [(0, length - out.shape[-1])]
            out = xp.pad(out, widths)
        return out

    # -- standard phase: measured from the frame start, as torch.stft / librosa.stft ---

    def phase_ramp(self, xp: ModuleType) -> Any:
        """Per-bin factor from segment-origin phase to frame-origin phase."""
        return xpm.on_device(_phase_ramp(self.left, self.fft_size), xp)


def overlap_add(segments: Any, *, hop_length: int, xp: ModuleType) -> Any:
    """Sum ``(..., frames, L)`` segments placed ``hop_length`` apart.

    Returns ``(..., (frames + K - 1) * hop_length)`` with ``K = ceil(L / hop)``:
    each segment is cut into ``K`` hop-sized chunks, and chunk ``k`` of every
    frame is added in one vector operation.
    """
    *lead, frames, seg_len = segments.shape
    chunks = math.ceil(seg_len / hop_length)
    if chunks * hop_length != seg_len:
        widths = [(0, 0)] * (segments.ndim - 1) + [(0, chunks * hop_length - seg_len)]
        segments = xp.pad(segments, widths)
    parts = segments.reshape((*lead, frames, chunks, hop_length))
    out = xp.zeros((*lead, frames + chunks - 1, hop_length), dtype=segments.dtype)
    for k in range(chunks):
        out[..., k : k + frames, :] += parts[..., :, k, :]
    return out.reshape((*lead, (frames + chunks - 1) * hop_length))


def stft(
    x: Any,
    *,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    fft_size: int | None = None,
    xp: ModuleType = np,
) -> Any:
    """Complex STFT ``(..., frames, bins)`` of ``(..., samples)``, as ``torch.stft(center=True,
    pad_mode="reflect", onesided=True)`` with a periodic Hann window of ``win_length``."""
    plan = StftPlan(n_fft, hop_length, win_length or n_fft, fft_size or n_fft)
    return plan.forward(x, xp) * plan.phase_ramp(xp)


def istft(
    spec: Any,
    *,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    fft_size: int | None = None,
    length: int | None = None,
    xp: ModuleType = np,
) -> Any:
    """Inverse of :func:`stft` (least-squares overlap-add), ``(..., frames, bins)`` -> ``(..., length)``."""
    plan = StftPlan(n_fft, hop_length, win_length or n_fft, fft_size or n_fft)
    if spec.shape[-1] != plan.n_bins:
        raise RiffusionError(
            f"spectrum has {spec.shape[-1]} bins, fft_size {plan.fft_size} gives {plan.n_bins}"
        )
    return plan.inverse(spec * xp.conj(plan.phase_ramp(xp)), xp, length)


# The constants below are cached on the host, read-only; a kernel takes each through
# xp.on_device (on the GPU, one copy per CUDA stream).


@functools.lru_cache(maxsize=16)
def _hann(win_length: int) -> np.ndarray:
    """Periodic Hann window (``torch.hann_window`` default), float32."""
    n = np.arange(win_length, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
    return _read_only(window.astype(np.float32))


@functools.lru_cache(maxsize=16)
def _phase_ramp(offset: int, fft_size: int) -> np.ndarray:
    k = np.arange(fft_size // 2 + 1, dtype=np.float64)
    ramp = np.exp(-2j * np.pi * ((k * offset) % fft_size) / fft_size)
    return _read_only(ramp.astype(np.complex64))


@functools.lru_cache(maxsize=32)
def _inverse_window_envelope(plan: StftPlan, frames: int) -> np.ndarray:
    """1 / sum of squared windows at each output sample (0 where the sum vanishes)."""
    window = _hann(plan.win_length).astype(np.float64)
    envelope = overlap_add(
        np.broadcast_to(window**2, (frames, plan.win_length)), hop_length=plan.hop_length, xp=np
    )
    inverse = np.zeros_like(envelope)
    nonzero = envelope > 1e-11
    inverse[nonzero] = 1.0 / envelope[nonzero]
    return _read_only(inverse.astype(np.float32))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array
