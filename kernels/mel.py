"""Mel filterbank (HTK formula, no normalisation, as torchaudio's ``melscale_fbanks``)
and its least-squares inverse."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

from .params import SpectrogramParams
from .xp import on_device


def hz_to_mel(freq: Any) -> Any:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def mel_to_hz(mel: Any) -> Any:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(*, sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Triangular filters ``(n_mels, n_fft // 2 + 1)``, float64.

    Filter ``m`` rises linearly from mel point ``m`` to ``m + 1`` and falls to
    ``m + 2``, with ``n_mels + 2`` points evenly spaced on the HTK mel scale
    between ``f_min`` and ``f_max``; linear bins at ``k * sample_rate / n_fft``.
    """
    freqs = np.linspace(0.0, sample_rate // 2, n_fft // 2 + 1)
    points = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(points)  # (n_mels + 1,)
    # A bin in segment j (points[j] <= f < points[j + 1]) lies on the rising edge of
    # filter j and the falling edge of filter j - 1 and is zero in every other filter,
    # so only those two entries are formed (the dense min/max form is ~100x slower).
    segment = np.searchsorted(points, freqs, side="right") - 1  # (bins,)
    inside = np.flatnonzero((segment >= 0) & (segment <= n_mels))
    j = segment[inside]
    fb = np.zeros((n_mels, freqs.size))
    rising = j < n_mels
    fb[j[rising], inside[rising]] = (freqs[inside[rising]] - points[j[rising]]) / widths[j[rising]]
    falling = j > 0
    fb[j[falling] - 1, inside[falling]] = (points[j[falling] + 1] - freqs[inside[falling]]) / widths[
        j[falling]
    ]
    return fb


@functools.lru_cache(maxsize=8)
def filterbank(params: SpectrogramParams) -> np.ndarray:
    """The parameters' filterbank ``(num_frequencies, n_fft // 2 + 1)``, float32."""
    fb = mel_filterbank(
        sample_rate=params.sample_rate,
        n_fft=params.n_fft,
        n_mels=params.num_frequencies,
        f_min=params.min_frequency,
        f_max=params.max_frequency,
    )
    fb = fb.astype(np.float32)
    fb.setflags(write=False)
    return fb


@functools.lru_cache(maxsize=8)
def _gram_pinv(params: SpectrogramParams) -> np.ndarray:
    """``pinv(F F^T)`` ``(n_mels, n_mels)`` float64, over the bins the filters touch."""
    fb = filterbank(params)
    fb = fb[:, fb.any(axis=0)].astype(np.float64)
    return np.linalg.pinv(fb @ fb.T, hermitian=True)


def inverse_filterbank(params: SpectrogramParams, stride: int, n_bins: int, xp: ModuleType) -> Any:
    """Rows ``0, stride, 2 * stride, ...`` (``n_bins`` of them) of the filterbank's
    pseudo-inverse, transposed to ``(n_mels, n_bins)`` float32 on ``xp``; rows
    past the linear grid are zero. Computed once per parameter set and cached on the
    host (on the GPU, copied once per CUDA stream: :func:`~.xp.on_device`).

    Through the small Gram matrix, ``pinv(F) = F^T pinv(F F^T)``: only the
    selected rows are formed.
    """
    return on_device(_inverse_filterbank(params, stride, n_bins), xp)


@functools.lru_cache(maxsize=16)
def _inverse_filterbank(params: SpectrogramParams, stride: int, n_bins: int) -> np.ndarray:
    rows = filterbank(params)[:, ::stride][:, :n_bins].astype(np.float64)  # (n_mels, selected)
    inverse = np.zeros((params.num_frequencies, n_bins), dtype=np.float32)
    inverse[:, : rows.shape[1]] = _gram_pinv(params) @ rows  # pinv(F F^T) is symmetric
    inverse.setflags(write=False)
    return inverse


def mel_from_linear(linear: Any, params: SpectrogramParams, xp: ModuleType = np) -> Any:
    """``(..., frames, bins)`` magnitudes -> ``(..., frames, num_frequencies)``."""
    fb = on_device(filterbank(params), xp)
    return linear @ fb.T


def linear_from_mel(
    mel: Any,
    params: SpectrogramParams,
    *,
    xp: ModuleType = np,
    stride: int = 1,
    n_bins: int | None = None,
) -> Any:
    """Least-squares, non-negative linear magnitudes from mel magnitudes.

    ``(..., frames, num_frequencies)`` -> ``(..., frames, n_bins)``: the
    minimum-norm least-squares solution of ``filterbank @ x = mel`` (the
    pseudo-inverse, as torchaudio's ``InverseMelScale`` computes with
    ``lstsq``), clipped at zero. ``stride`` and ``n_bins`` select every
    ``stride``-th linear bin, for transforms on a coarser frequency grid.
    """
    if n_bins is None:
        n_bins = params.n_fft // 2 + 1
    linear = mel @ inverse_filterbank(params, stride, n_bins, xp)
    return xp.maximum(linear, 0.0, out=linear)
