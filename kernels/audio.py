"""Audio in and out: reading, resampling, the spectrogram of a waveform,
Riffusion's loudness normalisation, and writing WAV/FLAC/OGG/MP3."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from . import mel as melm
from .errors import RiffusionError
from .files import atomic_path, check_output_path
from .params import SpectrogramParams
from .stft import StftPlan

# extension -> (libsndfile format, subtype)
AUDIO_FORMATS: dict[str, tuple[str, str | None]] = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}

INT16_MAX = 32767


def load_audio(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Samples ``(channels, samples)`` float32 on the int16 scale, and the sample rate."""
    import soundfile

    path = Path(path)
    if path.is_dir():
        raise RiffusionError(f"audio file {str(path)!r} is a directory")
    if not path.is_file():
        raise RiffusionError(f"audio file {str(path)!r} does not exist")
    try:
        data, rate = soundfile.read(path, dtype="int16", always_2d=True)
    except Exception as exc:  # libsndfile reports unreadable input with several exception types
        raise RiffusionError(f"{str(path)!r} is not a readable audio file ({exc})") from exc
    if data.shape[0] == 0:
        raise RiffusionError(f"{str(path)!r} holds no audio samples")
    return np.ascontiguousarray(data.T, dtype=np.float32), int(rate)


def prepare_audio(samples: np.ndarray, sample_rate: int, params: SpectrogramParams) -> np.ndarray:
    """Resample ``(channels, samples)`` to the parameters' rate and channel count
    (mono = mean of the channels; stereo from mono = the channel twice)."""
    samples = np.atleast_2d(np.asarray(samples, dtype=np.float32))
    if samples.shape[-1] == 0:
        raise RiffusionError("audio holds no samples")
    if params.stereo:
        samples = np.repeat(samples, 2, axis=0) if samples.shape[0] == 1 else samples[:2]
    else:
        samples = samples.mean(axis=0, keepdims=True)
    if sample_rate != params.sample_rate:
        from scipy.signal import resample_poly

        g = math.gcd(sample_rate, params.sample_rate)
        samples = resample_poly(samples, params.sample_rate // g, sample_rate // g, axis=-1)
    return np.ascontiguousarray(samples, dtype=np.float32)


def spectrogram_from_waveform(samples: Any, params: SpectrogramParams, *, xp: ModuleType = np) -> Any:
    """Mel magnitudes ``(channels, num_frequencies, frames)`` of ``(channels, samples)``
    (STFT amplitude, not power, as Riffusion)."""
    plan = StftPlan(params.n_fft, params.hop_length, params.win_length, params.n_fft)
    if samples.shape[-1] <= plan.pad:
        raise RiffusionError(
            f"audio of {samples.shape[-1]} samples is too short: need more than {plan.pad} "
            f"({plan.pad / params.sample_rate:.3f} s)"
        )
    magnitude = xp.abs(plan.forward(samples.astype(xp.float32, copy=False), xp))  # (ch, frames, bins)
    mel = melm.mel_from_linear(magnitude, params, xp)  # (ch, frames, mels)
    return xp.ascontiguousarray(xp.swapaxes(mel, -1, -2))


def normalize_like_riffusion(waveform: Any, *, xp: ModuleType = np) -> Any:
    """Riffusion's output loudness: peak-scale to int16, gain to -12 dBFS RMS
    (saturating at full scale, as pydub does), then peak-normalise with 0.1 dB
    headroom. ``(channels, samples)`` float -> int16."""
    x = waveform.astype(xp.float64)
    peak = float(xp.abs(x).max()) if x.size else 0.0
    if not peak > 0 or not math.isfinite(peak):
        return xp.zeros(x.shape, dtype=xp.int16)
    x = xp.trunc(x * (INT16_MAX / peak))
    rms = float(xp.sqrt(xp.mean(x * x)))
    if rms > 0:
        gain_db = -12.0 - 20.0 * math.log10(rms / 32768.0)
        x = xp.clip(xp.trunc(x * 10.0 ** (gain_db / 20.0)), -32768, INT16_MAX)
    peak = float(xp.abs(x).max())
    if peak > 0:
        x = xp.clip(xp.trunc(x * (32768.0 * 10.0 ** (-0.1 / 20.0) / peak)), -32768, INT16_MAX)
    return x.astype(xp.int16)


def check_audio_output(path: str | os.PathLike[str]) -> Path:
    return check_output_path(path, AUDIO_FORMATS)


@contextlib.contextmanager
def audio_writer(
    path: str | os.PathLike[str], sample_rate: int, channels: int
) -> Iterator[Callable[[np.ndarray], None]]:
    """A function that appends int16 ``(channels, samples)`` to the file at ``path`` (its
    format by extension), so a long recording never sits in memory whole. The file takes
    ``path``'s place when the block ends, and also when it ends with KeyboardInterrupt
    (what was written is kept; the interrupt goes on); on any other error it is dropped."""
    import soundfile

    path = check_audio_output(path)
    fmt, subtype = AUDIO_FORMATS[path.suffix.lower()]
    interrupted: KeyboardInterrupt | None = None
    with (
        atomic_path(path) as tmp,
        soundfile.SoundFile(tmp, "w", sample_rate, channels, format=fmt, subtype=subtype) as out,
    ):
        try:
            yield lambda samples: out.write(np.ascontiguousarray(np.atleast_2d(samples).T))
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """int16 ``(channels, samples)`` as the bytes of a file of format ``fmt`` (an extension)."""
    import io

    import soundfile

    key = "." + fmt.lower().lstrip(".")
    if key not in AUDIO_FORMATS:
        raise RiffusionError(f"audio format {fmt!r}: use one of {', '.join(AUDIO_FORMATS)}")
    container, subtype = AUDIO_FORMATS[key]
    buffer = io.BytesIO()
    soundfile.write(
        buffer, np.ascontiguousarray(np.atleast_2d(samples).T), sample_rate, format=container, subtype=subtype
    )
    return buffer.getvalue()


def save_audio(path: str | os.PathLike[str], samples: np.ndarray, sample_rate: int) -> Path:
    """Write int16 ``(channels, samples)`` in the format the extension names, atomically."""
    import soundfile

    path = check_audio_output(path)
    fmt, subtype = AUDIO_FORMATS[path.suffix.lower()]
    data = np.ascontiguousarray(np.atleast_2d(samples).T)
    with atomic_path(path) as tmp:
        soundfile.write(tmp, data, sample_rate, format=fmt, subtype=subtype)
    return path
