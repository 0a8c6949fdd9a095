"""STFT / ISTFT against a naive frame-then-rfft oracle and librosa."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
from riffusion_engine.kernels.stft import StftPlan, istft, overlap_add, stft

GRID = [
    # n_fft, hop, win, fft_size
    (64, 16, 64, 64),
    (64, 16, 32, 64),
    (60, 15, 40, 60),
    (64, 10, 24, 32),  # coarser transform than n_fft
    (257, 50, 201, 257),  # odd sizes, window not a multiple of the hop
    (400, 25, 100, 100),  # Riffusion's shape scaled down: n_fft = 4 win, unpadded
    (400, 10, 100, 400),  # Riffusion's shape scaled down: n_fft = 4 win, padded
]


def naive_stft(x: np.ndarray, n_fft: int, hop: int, win: int, fft_size: int) -> np.ndarray:
    """Frame by frame: reflect-pad n_fft // 2, periodic Hann of win centred in an
    n_fft frame, and the frame's DFT at frequencies k / fft_size (the usual
    rfft when fft_size == n_fft), phase measured from the frame start."""
    pad = n_fft // 2
    padded = np.pad(x.astype(np.float64), pad, mode="reflect")
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left : left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    frames = 1 + (len(padded) - n_fft) // hop
    out = []
    n = np.arange(n_fft)
    k = np.arange(fft_size // 2 + 1)
    basis = np.exp(-2j * np.pi * np.outer(k, n) / fft_size)  # DFT at the fft_size grid, frame origin
    for t in range(frames):
        out.append(basis @ (padded[t * hop : t * hop + n_fft] * window))
    return np.array(out)


@pytest.mark.parametrize(("n_fft", "hop", "win", "fft_size"), GRID)
def test_stft_matches_naive_oracle(n_fft: int, hop: int, win: int, fft_size: int) -> None:
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    ours = stft(x, n_fft=n_fft, hop_length=hop, win_length=win, fft_size=fft_size)
    expected = naive_stft(x, n_fft, hop, win, fft_size)
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() < 2e-4 * np.abs(expected).max()


@pytest.mark.parametrize(("n_fft", "hop", "win"), [(64, 16, 48), (2048, 512, 2048), (17640 // 10, 44, 441)])
def test_stft_matches_librosa(n_fft: int, hop: int, win: int) -> None:
    x = np.random.default_rng(1).standard_normal((2, 5000)).astype(np.float32)
    ours = stft(x, n_fft=n_fft, hop_length=hop, win_length=win)
    ref = librosa.stft(x, n_fft=n_fft, hop_length=hop, win_length=win, center=True, pad_mode="reflect")
    np.testing.assert_allclose(ours, np.swapaxes(ref, -1, -2), atol=2e-3, rtol=0)


@pytest.mark.parametrize(("n_fft", "hop", "win", "fft_size"), GRID)
def test_istft_inverts_stft(n_fft: int, hop: int, win: int, fft_size: int) -> None:
    x = np.random.default_rng(2).standard_normal((2, 3, 1200)).astype(np.float32)
    spec = stft(x, n_fft=n_fft, hop_length=hop, win_length=win, fft_size=fft_size)
    y = istft(spec, n_fft=n_fft, hop_length=hop, win_length=win, fft_size=fft_size, length=1200)
    assert y.shape == x.shape
    # Ends are covered by reflected frames only where the window overlap is thin; compare the body.
    body = slice(n_fft // 2, 1200 - n_fft // 2)
    np.testing.assert_allclose(y[..., body], x[..., body], atol=1e-4)


def test_istft_is_exact_for_the_plan_geometry() -> None:
    plan = StftPlan(n_fft=400, hop_length=10, win_length=100, fft_size=100)
    x = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    y = plan.inverse(plan.forward(x, np), np, length=5000)
    np.testing.assert_allclose(y, x, atol=1e-4)


@pytest.mark.parametrize(("seg_len", "hop"), [(10, 5), (10, 3), (7, 7), (4, 9)])
def test_overlap_add_matches_loop(seg_len: int, hop: int) -> None:
    segments = np.random.default_rng(4).standard_normal((2, 6, seg_len))
    out = overlap_add(segments, hop_length=hop, xp=np)
    expected = np.zeros((2, out.shape[-1]))
    for t in range(6):
        expected[:, t * hop : t * hop + seg_len] += segments[:, t]
    np.testing.assert_allclose(out, expected, atol=1e-12)
