"""Fast Griffin-Lim phase reconstruction and the mel -> waveform chain.

Fast Griffin-Lim: N. Perraudin, P. Balazs, P. L. Søndergaard, "A fast
Griffin-Lim algorithm", IEEE WASPAA 2013 (the momentum form used by torchaudio
and librosa: ``c - momentum / (1 + momentum) * c_prev``). Griffin-Lim:
D. Griffin, J. Lim, "Signal estimation from modified short-time Fourier
transform", IEEE TASSP 1984. The initial phase is random (the original) or
integrated from the magnitude's gradient (:mod:`.phase`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import mel as melm
from . import xp as xpm
from .errors import RiffusionError
from .params import SpectrogramParams
from .phase import pghi_phase, random_phase
from .stft import StftPlan

INITS = ("pghi", "random")


@dataclass(frozen=True)
class GriffinLimOptions:
    """How the phase is reconstructed. ``GriffinLimOptions.plain()`` is the
    original algorithm; the defaults are faster and end closer to the target
    (measured in docs/performance.md, "Image -> audio")."""

    n_iter: int | None = None  # iterations; None = the parameters' num_griffin_lim_iters (32)
    momentum: float = 0.99  # fast Griffin-Lim momentum; 0 = classic Griffin-Lim
    seed: int = 0  # seed of the random phase (all of it, or pghi's near-silent coefficients)
    reduced_rate: bool = True  # iterate at the lowest sample rate that holds max_frequency, upsample once
    bin_stride: int = (
        4  # iterate on every bin_stride-th bin of the n_fft grid (fft_size = n_fft / stride); 1 = plain
    )
    init: str = "pghi"  # initial phase: "pghi" (from the magnitude's gradient) or "random" (plain)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise RiffusionError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.n_iter is not None and self.n_iter < 0:
            raise RiffusionError(f"n_iter must be >= 0, got {self.n_iter}")
        if self.bin_stride < 1:
            raise RiffusionError(f"bin_stride must be >= 1, got {self.bin_stride}")
        if not 0 <= self.momentum < 1:
            raise RiffusionError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.seed < 2**63:
            raise RiffusionError(f"seed must be an integer in 0..2**63-1, got {self.seed}")

    @classmethod
    def plain(cls, **changes: Any) -> GriffinLimOptions:
        """The unmodified algorithm: full sample rate, n_fft-padded transform, random start."""
        return cls(**{"reduced_rate": False, "bin_stride": 1, "init": "random", **changes})


@dataclass(frozen=True)
class IterationGrid:
    """Where the iterations run: a sample rate, an STFT plan, and which linear
    bins of the parameters' ``n_fft`` grid the plan's bins coincide with."""

    sample_rate: int  # Hz, the iterations' sample rate
    plan: StftPlan  # transform at that rate
    bin_stride: int  # plan bin k = linear bin k * bin_stride of the parameters' grid


def iteration_grid(params: SpectrogramParams, options: GriffinLimOptions) -> IterationGrid:
    """The grid the options ask for, falling back to the full-rate padded grid
    where the parameters do not allow an exact one."""
    exact = _exact_lengths(params.sample_rate, params)
    rate = params.sample_rate
    if options.reduced_rate and exact is not None:
        rate = _reduced_rate(params)
    lengths = _exact_lengths(rate, params) or (params.n_fft, params.win_length, params.hop_length)
    n_fft, win_length, hop_length = lengths
    stride = options.bin_stride
    if n_fft % stride or n_fft // stride < win_length:
        raise RiffusionError(
            f"bin_stride {stride} must divide n_fft ({n_fft}) and leave at least win_length ({win_length})"
        )
    return IterationGrid(rate, StftPlan(n_fft, hop_length, win_length, n_fft // stride), stride)


def min_frames(params: SpectrogramParams, options: GriffinLimOptions | None = None) -> int:
    """The fewest frames (image columns) :func:`waveform_from_mel` reconstructs: its
    transform needs more samples than the plan's padding."""
    plan = iteration_grid(params, options or GriffinLimOptions()).plan
    return plan.pad // plan.hop_length + 2  # hop * (frames - 1) > pad


def _exact_lengths(rate: int, params: SpectrogramParams) -> tuple[int, int, int] | None:
    """(n_fft, win_length, hop_length) at ``rate`` when all are whole samples."""
    out = []
    for ms in (params.padded_duration_ms, params.window_duration_ms, params.step_size_ms):
        if (rate * ms) % 1000:
            return None
        out.append(rate * ms // 1000)
    return out[0], out[1], out[2]


def _reduced_rate(params: SpectrogramParams) -> int:
    """Lowest rate above 2.1 x max_frequency with whole-sample lengths, else the full rate."""
    for rate in range(math.ceil(2.1 * params.max_frequency), params.sample_rate):
        if _exact_lengths(rate, params) is not None:
            return rate
    return params.sample_rate


@xpm.elementwise("complex64", "complex64", "float32", ("scalar", "float32"), ("scalar", "float32"))
def _fgla_step(rebuilt: Any, previous: Any, magnitude: Any, alpha: Any, eps: Any, *, xp: ModuleType) -> Any:
    """One fast Griffin-Lim update: the next spectrum to invert. Elementwise;
    fused into one kernel on the GPU."""
    update = rebuilt - alpha * previous
    return update * (magnitude / (xp.absolute(update) + eps))


def griffin_lim(
    magnitude: Any,
    *,
    plan: StftPlan,
    n_iter: int = 32,
    momentum: float = 0.99,
    seed: int = 0,
    length: int | None = None,
    init: str = "pghi",
    xp: ModuleType = np,
) -> Any:
    """Waveform ``(..., length)`` whose STFT magnitude approximates ``magnitude``
    ``(..., frames, plan.n_bins)`` (float32), starting from the ``init`` phase
    (``"pghi"``: integrated from the magnitude; ``"random"``: seeded uniform)."""
    if magnitude.shape[-1] != plan.n_bins:
        raise RiffusionError(f"magnitude has {magnitude.shape[-1]} bins, the STFT plan {plan.n_bins}")
    frames = magnitude.shape[-2]
    if length is None:
        length = plan.hop_length * (frames - 1)
    if length <= plan.pad:
        raise RiffusionError(
            f"{frames} frames are too few to reconstruct: the narrowest image is "
            f"{plan.pad // plan.hop_length + 2} columns (more than {plan.pad} samples)"
        )
    magnitude = magnitude.astype(xp.float32, copy=False)
    if init == "pghi":
        phase = pghi_phase(magnitude, plan, seed=seed, xp=xp)
    elif init == "random":
        phase = random_phase(tuple(magnitude.shape), seed, xp)
    else:
        raise RiffusionError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    spec = magnitude * phase
    previous = xp.zeros_like(spec)
    step = xpm.fused(_fgla_step, xp)
    alpha = np.float32(momentum / (1.0 + momentum))
    eps = np.float32(1e-16)
    for _ in range(n_iter):
        rebuilt = plan.forward(plan.inverse(spec, xp, length), xp)
        spec = step(rebuilt, previous, magnitude, alpha, eps)
        previous = rebuilt
    return plan.inverse(spec, xp, length)


def waveform_from_mel(
    mel: Any,
    params: SpectrogramParams,
    options: GriffinLimOptions | None = None,
    *,
    xp: ModuleType = np,
) -> Any:
    """Mel magnitudes ``(channels, num_frequencies, frames)`` -> float32 waveform
    ``(channels, samples)`` at ``params.sample_rate``.

    Least-squares inverse mel, fast Griffin-Lim on the options' grid, then one
    band-limited upsampling when the iterations ran at a reduced rate.
    """
    options = options or GriffinLimOptions()
    if mel.ndim != 3 or mel.shape[1] != params.num_frequencies:
        raise RiffusionError(
            f"mel spectrogram must be (channels, {params.num_frequencies}, frames), got {tuple(mel.shape)}"
        )
    grid = iteration_grid(params, options)
    frames = mel.shape[-1]
    linear = grid_magnitude(mel, params, grid, xp=xp)
    n_iter = params.num_griffin_lim_iters if options.n_iter is None else options.n_iter
    waveform = griffin_lim(
        linear,
        plan=grid.plan,
        n_iter=n_iter,
        momentum=options.momentum,
        seed=options.seed,
        init=options.init,
        xp=xp,
    )
    length = params.num_samples(frames)
    if grid.sample_rate != params.sample_rate:
        waveform = resample(waveform, grid.sample_rate, params.sample_rate, xp=xp)
    return _fit_length(waveform, length, xp)


def grid_magnitude(mel: Any, params: SpectrogramParams, grid: IterationGrid, *, xp: ModuleType = np) -> Any:
    """Mel magnitudes ``(channels, num_frequencies, frames)`` -> the least-squares
    linear magnitudes on the grid's bins, ``(channels, frames, grid.plan.n_bins)``."""
    mel_t = xp.ascontiguousarray(xp.swapaxes(mel.astype(xp.float32, copy=False), -1, -2))  # ch, frames, mels
    return melm.linear_from_mel(mel_t, params, xp=xp, stride=grid.bin_stride, n_bins=grid.plan.n_bins)


def resample(x: Any, rate_in: int, rate_out: int, *, xp: ModuleType = np) -> Any:
    """Band-limited resampling along the last axis by zero-padding (or cutting)
    the spectrum: one real FFT each way, the same code on NumPy and CuPy.

    Output length ``ceil(n * rate_out / rate_in)``. Exact for signals band-limited
    below both Nyquist rates (the iterations' output is, by construction).
    """
    if rate_in == rate_out:
        return x
    n_in = x.shape[-1]
    n_out = -(-n_in * rate_out // rate_in)
    spectrum = xpm.rfft(x, n_in, xp)
    bins = n_out // 2 + 1
    if spectrum.shape[-1] >= bins:
        spectrum = spectrum[..., :bins]
    else:
        widths = [(0, 0)] * (spectrum.ndim - 1) + [(0, bins - spectrum.shape[-1])]
        spectrum = xp.pad(spectrum, widths)
    if n_in % 2 == 0 and n_out > n_in:
        spectrum[..., n_in // 2] *= 0.5  # split the input's Nyquist bin between +/- frequencies
    out = xpm.irfft(spectrum, n_out, xp)
    out *= xp.float32(n_out / n_in)
    return out


def _fit_length(x: Any, length: int, xp: ModuleType) -> Any:
    if x.shape[-1] >= length:
        return x[..., :length]
    return xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])])
