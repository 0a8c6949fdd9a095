"""Audio <-> spectrogram image, end to end."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import xp as xpm
from .audio import normalize_like_riffusion, prepare_audio, spectrogram_from_waveform
from .griffin_lim import GriffinLimOptions, waveform_from_mel
from .image import image_from_spectrogram, spectrogram_from_image
from .params import SpectrogramParams
from .xp import Device


def image_from_audio(samples: np.ndarray, sample_rate: int, params: SpectrogramParams | None = None) -> Any:
    """A Riffusion spectrogram image (PIL, EXIF included) of ``(channels, samples)``
    int16-scale audio at any rate; its width is the number of 10 ms frames."""
    params = params or SpectrogramParams()
    samples = prepare_audio(samples, sample_rate, params)
    return image_from_spectrogram(spectrogram_from_waveform(samples, params), params)


def audio_from_spectrogram(
    mel: Any,
    params: SpectrogramParams,
    options: GriffinLimOptions | None = None,
    *,
    device: Device | None = None,
) -> np.ndarray:
    """Mel magnitudes ``(channels, mels, frames)`` -> int16 ``(channels, samples)``,
    normalised as Riffusion does. ``device`` defaults to where ``mel`` lives: a
    CuPy array or CUDA tensor stays on the GPU until the waveform."""
    xp = xpm.get_xp(device or xpm.device_of(mel))
    waveform = waveform_from_mel(xpm.as_array(mel, xp), params, options, xp=xp)
    return xpm.to_numpy(normalize_like_riffusion(waveform, xp=xp))


def audio_from_image(
    image: Any,
    params: SpectrogramParams | None = None,
    options: GriffinLimOptions | None = None,
    *,
    device: Device = "cpu",
) -> tuple[np.ndarray, int]:
    """int16 audio ``(channels, samples)`` and its sample rate from a spectrogram
    image; parameters and max value from its EXIF unless ``params`` is given."""
    mel, params = spectrogram_from_image(image, params, xp=xpm.get_xp(device))
    return audio_from_spectrogram(mel, params, options, device=device), params.sample_rate
