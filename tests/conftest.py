"""Shared fixtures: Riffusion's parameters and a music-like signal, built once per session."""

from __future__ import annotations

import numpy as np
import pytest
from riffusion_engine.kernels import SpectrogramParams
from riffusion_engine.kernels.audio import spectrogram_from_waveform
from riffusion_engine.kernels.synth import music_like


@pytest.fixture(scope="session")
def params() -> SpectrogramParams:
    return SpectrogramParams()


@pytest.fixture(scope="session")
def music(params: SpectrogramParams) -> np.ndarray:
    """5.11 s mono, (1, samples) float32 on the int16 scale: a 512-column image."""
    return music_like(5.11, sample_rate=params.sample_rate, seed=1)


@pytest.fixture(scope="session")
def short_music(params: SpectrogramParams) -> np.ndarray:
    """1.5 s mono: enough frames for Griffin-Lim tests that run many times."""
    return music_like(1.5, sample_rate=params.sample_rate, seed=2)


@pytest.fixture(scope="session")
def music_mel(music: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    return spectrogram_from_waveform(music, params)


@pytest.fixture(scope="session")
def tiny():
    """random:tiny's components (torch), built once."""
    pytest.importorskip("torch")
    from riffusion_engine.engine.models import load_components

    return load_components("random:tiny")
