"""Music-like test signals the project makes itself: chords, a bass line and
percussion on a beat grid. Used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np

# A I-V-vi-IV progression in C (MIDI note numbers).
_CHORDS = ((60, 64, 67), (55, 59, 62), (57, 60, 64), (53, 57, 60))


def _midi_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def music_like(
    duration_s: float = 5.11,
    *,
    sample_rate: int = 44100,
    bpm: float = 120.0,
    seed: int = 0,
    stereo: bool = False,
) -> np.ndarray:
    """``(channels, samples)`` float32 on the int16 scale (peak about -3 dBFS):
    a chord per bar with harmonics, a bass note per beat, kick on the beat,
    hi-hat noise bursts on the off-beats."""
    rng = np.random.default_rng(seed)
    n = round(duration_s * sample_rate)
    t = np.arange(n) / sample_rate
    beat = 60.0 / bpm
    out = np.zeros((2, n))
    for bar_start in np.arange(0.0, duration_s, 4 * beat):
        chord = _CHORDS[int(bar_start / (4 * beat)) % len(_CHORDS)]
        span = (t >= bar_start) & (t < bar_start + 4 * beat)
        local = t[span] - bar_start
        envelope = np.exp(-local / 1.5) * np.minimum(1.0, local / 0.01)
        for i, note in enumerate(chord):
            for harmonic, weight in ((1, 1.0), (2, 0.5), (3, 0.25), (4, 0.12)):
                tone = weight * np.sin(2 * np.pi * _midi_hz(note) * harmonic * local + rng.uniform(0, 6.28))
                out[i % 2, span] += 0.6 * envelope * tone
                out[(i + 1) % 2, span] += 0.4 * envelope * tone
    for k, beat_start in enumerate(np.arange(0.0, duration_s, beat)):
        span = (t >= beat_start) & (t < beat_start + beat)
        local = t[span] - beat_start
        bass = _midi_hz(_CHORDS[int(beat_start / (4 * beat)) % len(_CHORDS)][0] - 24)
        out[:, span] += 0.8 * np.exp(-local / 0.3) * np.sin(2 * np.pi * bass * local)
        kick_phase = 2 * np.pi * (50 * local + 60 * 0.04 * (1 - np.exp(-local / 0.04)))
        out[:, span] += 1.5 * np.exp(-local / 0.12) * np.sin(kick_phase)
        hat_start = beat_start + beat / 2
        hat = (t >= hat_start) & (t < hat_start + 0.05)
        noise = np.diff(rng.standard_normal(int(hat.sum()) + 1))  # high-passed noise
        out[k % 2, hat] += 0.3 * np.exp(-(t[hat] - hat_start) / 0.015) * noise
    out *= (10 ** (-3 / 20) * 32767) / np.abs(out).max()
    if not stereo:
        out = out.mean(axis=0, keepdims=True)
    return out.astype(np.float32)
