"""Griffin-Lim on consistent spectrograms of music-like signals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from riffusion_engine.kernels import (
    GriffinLimOptions,
    RiffusionError,
    SpectrogramParams,
    spectral_convergence,
)
from riffusion_engine.kernels.audio import spectrogram_from_waveform
from riffusion_engine.kernels.griffin_lim import griffin_lim, iteration_grid, waveform_from_mel
from riffusion_engine.kernels.stft import StftPlan


@pytest.fixture(scope="module")
def short_mel(short_music: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    return spectrogram_from_waveform(short_music, params)


@pytest.mark.parametrize(
    ("options", "bound"),
    [
        (GriffinLimOptions(), 0.12),
        (GriffinLimOptions(init="random"), 0.15),
        (GriffinLimOptions(reduced_rate=True, bin_stride=1), 0.12),
        (GriffinLimOptions.plain(), 0.12),
    ],
    ids=["default", "random-init", "reduced-rate", "plain"],
)
def test_reaches_spectral_convergence_bound(
    short_mel: np.ndarray, params: SpectrogramParams, options: GriffinLimOptions, bound: float
) -> None:
    """A consistent spectrogram (that of a real signal) is approached closely;
    random phase alone is far off (the metric is not trivially small)."""
    waveform = waveform_from_mel(short_mel, params, options)
    assert waveform.shape == (1, params.num_samples(short_mel.shape[-1]))
    assert spectral_convergence(waveform, short_mel, params) < bound
    unrefined = waveform_from_mel(
        short_mel, params, GriffinLimOptions(**{**options.__dict__, "n_iter": 0, "init": "random"})
    )
    assert spectral_convergence(unrefined, short_mel, params) > 2 * bound


def test_more_iterations_never_worse_on_average(short_mel: np.ndarray, params: SpectrogramParams) -> None:
    means = []
    for n_iter in (4, 8, 16, 32):
        scores = [
            spectral_convergence(
                waveform_from_mel(short_mel, params, GriffinLimOptions(n_iter=n_iter, seed=seed)),
                short_mel,
                params,
            )
            for seed in range(3)
        ]
        means.append(np.mean(scores))
    assert all(later <= earlier for earlier, later in itertools.pairwise(means)), means


def test_classic_griffin_lim_converges_slower_than_fast(
    short_mel: np.ndarray, params: SpectrogramParams
) -> None:
    fast = waveform_from_mel(short_mel, params, GriffinLimOptions(n_iter=16))
    classic = waveform_from_mel(short_mel, params, GriffinLimOptions(n_iter=16, momentum=0.0))
    assert spectral_convergence(fast, short_mel, params) < spectral_convergence(classic, short_mel, params)


def test_seeded_and_deterministic(short_mel: np.ndarray, params: SpectrogramParams) -> None:
    a = waveform_from_mel(short_mel, params, GriffinLimOptions(seed=3))
    b = waveform_from_mel(short_mel, params, GriffinLimOptions(seed=3))
    c = waveform_from_mel(short_mel, params, GriffinLimOptions(seed=4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stereo_channels_are_reconstructed_independently(
    short_mel: np.ndarray, params: SpectrogramParams
) -> None:
    stereo = params.replace(stereo=True)
    pair = np.concatenate([short_mel, 0.5 * short_mel[:, :, ::-1]])
    waveform = waveform_from_mel(pair, stereo)
    assert waveform.shape[0] == 2
    assert spectral_convergence(waveform[:1], short_mel, params) < 0.15
    assert spectral_convergence(waveform[1:], pair[1:], params) < 0.15


def test_iteration_grid_geometry(params: SpectrogramParams) -> None:
    plain = iteration_grid(params, GriffinLimOptions.plain())
    assert (plain.sample_rate, plain.plan.n_fft, plain.plan.fft_size, plain.bin_stride) == (
        44100,
        17640,
        17640,
        1,
    )
    fast = iteration_grid(params, GriffinLimOptions())
    # Same 2.5 Hz grid at the lowest rate above 2.1 x 10 kHz with whole-sample lengths.
    assert fast.sample_rate == 21000
    assert (fast.plan.n_fft, fast.plan.win_length, fast.plan.hop_length) == (8400, 2100, 210)
    assert fast.plan.fft_size == 2100 and fast.bin_stride == 4
    assert fast.sample_rate / fast.plan.fft_size == 4 * params.sample_rate / params.n_fft


def test_bad_options_are_clear_errors(params: SpectrogramParams) -> None:
    with pytest.raises(RiffusionError, match="momentum"):
        GriffinLimOptions(momentum=1.0)
    with pytest.raises(RiffusionError, match="bin_stride 7"):
        iteration_grid(params, GriffinLimOptions(bin_stride=7, reduced_rate=False))
    with pytest.raises(RiffusionError, match="bins"):
        griffin_lim(np.ones((10, 7), np.float32), plan=StftPlan(64, 16, 64, 64))
    with pytest.raises(RiffusionError, match="channels"):
        waveform_from_mel(np.ones((params.num_frequencies, 30), np.float32), params)


def test_resample_is_band_limited_interpolation() -> None:
    """A tone below both Nyquist rates resamples to the same tone at the new rate."""
    from riffusion_engine.kernels.griffin_lim import resample

    n = 21000
    t_in = np.arange(n) / 21000
    x = np.sin(2 * np.pi * 1000.0 * t_in + 0.3) + 0.5 * np.cos(2 * np.pi * 9000.0 * t_in)  # periodic in n
    y = resample(x[None].astype(np.float32), 21000, 44100)
    t_out = np.arange(y.shape[-1]) / 44100
    expected = np.sin(2 * np.pi * 1000.0 * t_out + 0.3) + 0.5 * np.cos(2 * np.pi * 9000.0 * t_out)
    assert y.shape == (1, 44100)
    np.testing.assert_allclose(y[0], expected, atol=1e-3)
