"""Initial phases for Griffin-Lim: seeded random, or from the STFT magnitude
alone by phase-gradient integration.

For a Gaussian window ``exp(-pi t^2 / gamma)`` the STFT phase gradient follows
from the gradient of the log magnitude ``s``; with hop ``a``, transform size
``M`` and the phase measured at the window's centre:

- along time, per hop:      ``2 pi a / M * (k + M^2 / (2 pi gamma) * ds/dk)``
  (the bin's frequency corrected towards the partial it belongs to);
- along frequency, per bin: ``-gamma / (a M) * ds/dn``
  (where in the window the energy lies).

A Hann window of length ``L`` is close to the Gaussian with ``gamma = 0.25645
L^2``. Z. Prusa, P. Balazs, P. L. Søndergaard, "A noniterative method for
reconstruction of phase from STFT magnitude", IEEE/ACM TASLP 25(5), 2017
(PGHI); Z. Prusa, N. Holighaus, "Phase vocoder done right", EUSIPCO 2017 (the
same integration frame by frame).

PGHI integrates from the largest coefficients outwards with a heap, one
coefficient at a time. Here the integration runs frame by frame and is
vectorised within a frame: every bin belongs to the spectral peak that
climbing the magnitude reaches (neighbours within 1 % count as equal, so that
rounding noise on a flat spectrum does not split it); a peak's phase is its phase in the previous
frame advanced along time, and every other bin's phase is its peak's phase
carried along frequency (trapezoid rule both ways). Coefficients below
``tolerance`` times the channel's maximum get a seeded random phase, as in
PGHI. One Python loop over frames (a gather and two additions each); the same
code on NumPy and CuPy.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Any

import numpy as np

from . import xp as xpm
from .errors import RiffusionError
from .stft import StftPlan

HANN_GAMMA = 0.25645  # gamma / L^2 of the Gaussian matched to a Hann window of length L
DEFAULT_TOLERANCE = 1e-3  # relative magnitude below which the phase is random
PEAK_RESOLUTION = 0.01  # log-magnitude step below which neighbours count as equal when finding peaks

_TWO_PI = 2 * math.pi


def random_phase(shape: tuple[int, ...], seed: int, xp: ModuleType) -> Any:
    """Unit phasors with uniform random phase, complex64 (read-only, cached).

    Drawn on the host so that CPU and GPU runs with one seed start from the
    same point; on the GPU, copied once per CUDA stream (:func:`~.xp.on_device`).
    """
    return xpm.on_device(_random_phasors(shape, seed), xp)


@functools.lru_cache(maxsize=4)
def _random_phasors(shape: tuple[int, ...], seed: int) -> np.ndarray:
    angle = np.random.default_rng(seed).random(shape, dtype=np.float32) * np.float32(2 * np.pi)
    phasors = np.empty(shape, dtype=np.complex64)
    phasors.real = np.cos(angle)
    phasors.imag = np.sin(angle)
    phasors.setflags(write=False)
    return phasors


def pghi_phase(
    magnitude: Any,
    plan: StftPlan,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    xp: ModuleType = np,
) -> Any:
    """Unit phasors ``(..., frames, plan.n_bins)`` complex64 for ``magnitude``
    (same shape), in the plan's convention (phase from each window's start),
    ready for :meth:`StftPlan.inverse`."""
    if magnitude.shape[-1] != plan.n_bins:
        raise RiffusionError(f"magnitude has {magnitude.shape[-1]} bins, the STFT plan {plan.n_bins}")
    if not 0 < tolerance < 1:
        raise RiffusionError(f"tolerance must be in (0, 1), got {tolerance}")
    shape = tuple(magnitude.shape)
    frames, bins = shape[-2:]
    mag = magnitude.astype(xp.float32, copy=False).reshape((-1, frames, bins))
    floor = xp.maximum(mag.max(axis=(1, 2), keepdims=True) * np.float32(tolerance), np.float32(1e-30))
    clamped = xp.maximum(mag, floor)
    log_mag = xp.log(clamped)

    a, m = plan.hop_length, plan.fft_size
    gamma = HANN_GAMMA * plan.win_length**2
    k = xp.arange(bins, dtype=xp.float32)
    frequency = k + np.float32(m * m / (_TWO_PI * gamma)) * _slope(log_mag, -1, xp)  # bins
    per_hop = frequency * np.float32(_TWO_PI * a / m)  # phase advance per hop at each coefficient
    time_step = xp.remainder((per_hop[:, 1:] + per_hop[:, :-1]) * np.float32(0.5), np.float32(_TWO_PI))
    per_bin = _slope(log_mag, -2, xp) * np.float32(-gamma / (a * m))
    along = xp.zeros_like(per_bin)  # phase carried along frequency from bin 0
    along[..., 1:] = xp.cumsum((per_bin[..., 1:] + per_bin[..., :-1]) * np.float32(0.5), axis=-1)

    peak = peak_of_each_bin(xp.floor(log_mag * np.float32(1 / PEAK_RESOLUTION)), xp)
    offset = xp.remainder(along - xp.take_along_axis(along, peak, axis=-1), np.float32(_TWO_PI))
    rows = (xp.arange(mag.shape[0]) * bins)[:, None]
    phase = xp.empty_like(offset)
    phase[:, 0] = offset[:, 0]
    for n in range(1, frames):
        advanced = phase[:, n - 1] + time_step[:, n - 1]
        phase[:, n] = xp.take(advanced, peak[:, n] + rows) + offset[:, n]

    centre = xp.asarray(((np.arange(bins) * (plan.win_length / 2) % m) * (_TWO_PI / m)).astype(np.float32))
    phase -= centre  # window-centre phase -> phase from the window's start
    phasors = (xp.cos(phase) + 1j * xp.sin(phase)).astype(xp.complex64, copy=False)
    phasors = xp.where(mag < floor, random_phase(phasors.shape, seed, xp), phasors)
    return phasors.reshape(shape)


def peak_of_each_bin(magnitude: Any, xp: ModuleType = np) -> Any:
    """For ``(..., bins)`` magnitudes, the index of the local maximum that
    climbing from each bin reaches (a bin's own index where it is a peak).

    A peak is ``m[k] >= m[k - 1]`` and ``m[k] > m[k + 1]`` (outside the row is
    ``-inf``); any other bin climbs right where ``m[k] <= m[k + 1]`` (to the
    first peak after it) and left otherwise (to the last peak before it).
    No loop: peaks are counted along the flattened rows.
    """
    bins = magnitude.shape[-1]
    row = magnitude.reshape((-1, bins))
    edge = xp.full((row.shape[0], 1), -np.inf, dtype=row.dtype)
    before = xp.concatenate([edge, row[:, :-1]], axis=1)
    after = xp.concatenate([row[:, 1:], edge], axis=1)
    is_peak = ((row >= before) & (row > after)).ravel()
    climbs_right = (row <= after).ravel()
    index = xp.arange(is_peak.size)
    positions = xp.flatnonzero(is_peak)  # every row has at least one peak
    count = xp.cumsum(is_peak)  # peaks at or before each bin
    last = positions.size - 1
    previous = positions[xp.clip(count - 1, 0, last)]
    following = positions[xp.clip(count, 0, last)]
    target = xp.where(is_peak, index, xp.where(climbs_right, following, previous))
    return (target % bins).reshape(magnitude.shape)


def _slope(x: Any, axis: int, xp: ModuleType) -> Any:
    """Derivative along ``axis`` per sample (``xp.gradient``: central inside,
    one-sided at the ends); zero along an axis of one sample."""
    return xp.gradient(x, axis=axis) if x.shape[axis] > 1 else xp.zeros_like(x)
