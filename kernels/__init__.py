"""Spectrogram kernels: Riffusion's image format, STFT/ISTFT, mel filterbank and
its inverse, fast Griffin-Lim; NumPy/SciPy on CPU and CuPy on GPU from one source."""

from .convert import audio_from_image, audio_from_spectrogram, image_from_audio
from .errors import RiffusionError
from .griffin_lim import GriffinLimOptions, waveform_from_mel
from .metrics import spectral_convergence
from .params import SpectrogramParams
from .stft import StftPlan, istft, stft

__all__ = [
    "GriffinLimOptions",
    "RiffusionError",
    "SpectrogramParams",
    "StftPlan",
    "audio_from_image",
    "audio_from_spectrogram",
    "image_from_audio",
    "istft",
    "spectral_convergence",
    "stft",
    "waveform_from_mel",
]
