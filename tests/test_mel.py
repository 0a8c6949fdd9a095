"""Mel filterbank against librosa, and the least-squares inverse."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
from riffusion_engine.kernels import SpectrogramParams
from riffusion_engine.kernels.mel import filterbank, linear_from_mel, mel_filterbank
from scipy.optimize import nnls


@pytest.mark.parametrize(
    ("sr", "n_fft", "n_mels", "fmin", "fmax"),
    [(44100, 17640, 512, 0, 10000), (16000, 512, 40, 20, 8000), (22050, 1000, 64, 100, 5000)],
)
def test_filterbank_matches_librosa_htk(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> None:
    ours = mel_filterbank(sample_rate=sr, n_fft=n_fft, n_mels=n_mels, f_min=fmin, f_max=fmax)
    ref = librosa.filters.mel(
        sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=True, norm=None, dtype=np.float64
    )
    np.testing.assert_allclose(ours, ref, atol=1e-9)


@pytest.fixture(scope="module")
def small_params() -> SpectrogramParams:
    # Riffusion's geometry at a tenth of the rate: a fast but representative filterbank.
    return SpectrogramParams(sample_rate=4410, num_frequencies=64, max_frequency=1000)


def test_inverse_is_nonnegative_and_zero_outside_the_filters(params: SpectrogramParams) -> None:
    rng = np.random.default_rng(0)
    mel = rng.random((3, params.num_frequencies)).astype(np.float32) ** 4 * 1e6
    linear = linear_from_mel(mel, params)
    assert linear.shape == (3, params.n_fft // 2 + 1)
    assert (linear >= 0).all()
    support = filterbank(params).sum(axis=0) > 0
    assert np.all(linear[:, ~support] == 0)


def test_inverse_recovers_spectra_in_the_filterbank_range(small_params: SpectrogramParams) -> None:
    """For mel = F x0 with a smooth non-negative x0, F @ inverse(mel) reproduces mel."""
    fb = filterbank(small_params).astype(np.float64)
    bins = fb.shape[1]
    freqs = np.arange(bins)
    x0 = 1.0 + np.cos(freqs / 40.0) ** 2 + np.exp(-(((freqs - 300) / 30.0) ** 2))  # smooth, positive
    mel = (fb @ x0)[None].astype(np.float32)
    linear = linear_from_mel(mel, small_params)[0].astype(np.float64)
    assert (linear >= 0).all()
    np.testing.assert_allclose(fb @ linear, mel[0], rtol=1e-3)


def test_inverse_residual_is_close_to_nnls(small_params: SpectrogramParams) -> None:
    """The clipped least-squares solution is nearly as good as the exact NNLS optimum."""
    fb = filterbank(small_params).astype(np.float64)
    rng = np.random.default_rng(1)
    for _ in range(5):
        x0 = np.maximum(rng.standard_normal(fb.shape[1]), 0) ** 2  # spiky, non-negative
        mel = fb @ x0 * (1 + 0.05 * rng.standard_normal(fb.shape[0]))
        ours = linear_from_mel(mel[None].astype(np.float32), small_params)[0].astype(np.float64)
        _, best = nnls(fb, mel)
        ours_residual = np.linalg.norm(fb @ ours - mel)
        assert ours_residual <= best + 0.15 * np.linalg.norm(mel)


def test_strided_inverse_takes_every_kth_bin(params: SpectrogramParams) -> None:
    mel = np.random.default_rng(2).random((2, params.num_frequencies)).astype(np.float32)
    full = linear_from_mel(mel, params)
    strided = linear_from_mel(mel, params, stride=4, n_bins=2206)
    np.testing.assert_allclose(strided[:, : full[:, ::4].shape[1]], full[:, ::4], rtol=1e-5, atol=1e-3)
    assert np.all(strided[:, full[:, ::4].shape[1] :] == 0)
