"""Quality metrics shared by tests and benchmarks."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import xp as xpm
from .audio import spectrogram_from_waveform
from .errors import RiffusionError
from .params import SpectrogramParams


def spectral_convergence(audio: Any, target_mel: Any, params: SpectrogramParams) -> float:
    """``min_a ||a M(audio) - T||_F / ||T||_F`` in the mel domain (lower is better).

    ``audio`` ``(channels, samples)`` at ``params.sample_rate``; ``target_mel``
    ``(channels, mels, frames)``. The best scale ``a = <M, T> / <M, M>`` makes the
    metric blind to loudness normalisation.
    """
    target = np.asarray(xpm.to_numpy(target_mel), dtype=np.float64)
    audio = np.atleast_2d(np.asarray(xpm.to_numpy(audio), dtype=np.float32))
    mel = np.asarray(spectrogram_from_waveform(audio, params), dtype=np.float64)
    frames = min(mel.shape[-1], target.shape[-1])
    if mel.shape[:-1] != target.shape[:-1] or abs(mel.shape[-1] - target.shape[-1]) > 1:
        raise RiffusionError(f"audio's spectrogram {mel.shape} does not match the target {target.shape}")
    mel, target = mel[..., :frames], target[..., :frames]
    norm_t = float(np.linalg.norm(target))
    if norm_t == 0:
        raise RiffusionError("target spectrogram is silent")
    denom = float(np.vdot(mel, mel))
    scale = float(np.vdot(mel, target)) / denom if denom > 0 else 0.0
    return float(np.linalg.norm(scale * mel - target) / norm_t)
