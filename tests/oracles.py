"""Independent re-implementations the tests compare the engine against."""

from __future__ import annotations

import librosa
import numpy as np
from riffusion_engine.engine.tools.bench import librosa_mel_basis
from riffusion_engine.kernels import SpectrogramParams


def original_image_pixels(samples: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    """Riffusion's audio -> image, written from its description with librosa as the
    STFT and filterbank: |STFT| -> HTK mel (no norm) -> /max -> ** 0.25 -> *255 ->
    255 - x -> uint8 -> gray to RGB -> flip."""
    spec = np.abs(
        librosa.stft(
            samples,
            n_fft=params.n_fft,
            hop_length=params.hop_length,
            win_length=params.win_length,
            window="hann",
            center=True,
            pad_mode="reflect",
        )
    )
    mel = (librosa_mel_basis(params) @ spec).astype(np.float32)  # (channels, mels, frames)
    data = mel / np.max(mel)
    data = np.power(data, params.power_for_image)
    data = 255 - data * 255
    data = data.astype(np.uint8)
    rgb = (
        np.stack([data[0]] * 3, axis=-1)
        if data.shape[0] == 1
        else np.stack([np.zeros_like(data[0]), data[0], data[1]], axis=-1)
    )
    return rgb[::-1]
