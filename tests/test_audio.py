"""Audio I/O, resampling and Riffusion's loudness normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
from riffusion_engine.kernels import RiffusionError, SpectrogramParams, image_from_audio
from riffusion_engine.kernels.audio import (
    AUDIO_FORMATS,
    load_audio,
    normalize_like_riffusion,
    prepare_audio,
    save_audio,
)


@pytest.mark.parametrize("suffix", sorted(AUDIO_FORMATS))
def test_save_and_load_every_format(tmp_path, suffix: str) -> None:
    tone = (10000 * np.sin(2 * np.pi * 440 * np.arange(44100) / 44100)).astype(np.int16)[None]
    path = save_audio(tmp_path / f"a{suffix}", tone, 44100)
    samples, rate = load_audio(path)
    assert rate == 44100 and samples.shape[0] == 1
    # Lossy codecs add delay and padding; the tone's loudness survives.
    rms = np.sqrt(np.mean(samples[0, 4000:40000] ** 2))
    assert abs(rms - 10000 / np.sqrt(2)) < 0.1 * 10000


def test_prepare_resamples_and_mixes(params: SpectrogramParams) -> None:
    stereo_22k = np.stack([np.ones(22050), -np.ones(22050) * 0.5]).astype(np.float32) * 1000
    mono = prepare_audio(stereo_22k, 22050, params)
    assert mono.shape == (1, 44100)
    assert abs(float(np.median(mono)) - 250.0) < 1.0
    both = prepare_audio(stereo_22k[:1], 22050, params.replace(stereo=True))
    assert both.shape == (2, 44100)


def test_image_width_follows_audio_length(params: SpectrogramParams) -> None:
    for seconds in (1.0, 2.5):
        samples = (
            np.random.default_rng(0).standard_normal((1, int(seconds * 44100))).astype(np.float32) * 1000
        )
        image = image_from_audio(samples, 44100)
        assert image.width == params.num_frames(samples.shape[-1]) == 1 + int(seconds * 100)
        assert image.height == 512


def test_normalize_like_riffusion() -> None:
    x = np.sin(np.linspace(0, 100, 10000))[None] * 0.01
    y = normalize_like_riffusion(x)
    assert y.dtype == np.int16
    peak = np.abs(y.astype(int)).max()
    assert abs(20 * np.log10(peak / 32768) - (-0.1)) < 0.01  # peak normalised with 0.1 dB headroom
    assert np.all(normalize_like_riffusion(np.zeros((1, 100))) == 0)


def test_bad_audio(tmp_path) -> None:
    with pytest.raises(RiffusionError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(RiffusionError, match="not a readable audio file"):
        load_audio(tmp_path / "text.wav")
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), np.int16), 44100)
    with pytest.raises(RiffusionError, match="no audio samples"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(RiffusionError, match="too short"):
        image_from_audio(np.ones((1, 1000), np.float32), 44100)
    with pytest.raises(RiffusionError, match="extension"):
        save_audio(tmp_path / "x.aiff", np.zeros((1, 10), np.int16), 44100)
