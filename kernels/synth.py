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


# -- the seed images' sources (see engine/runtime/seeds.py) --------------------------------


def _grid(duration_s: float, sample_rate: int) -> np.ndarray:
    return np.arange(round(duration_s * sample_rate)) / sample_rate


def _to_int16_scale(out: np.ndarray) -> np.ndarray:
    """``(1, samples)`` float32 peaking at -3 dBFS on the int16 scale."""
    out = out - out.mean()
    return (out * (10 ** (-3 / 20) * 32767) / np.abs(out).max())[None].astype(np.float32)


def _strike(
    out: np.ndarray,
    sample_rate: int,
    start: float,
    hz: float,
    partials: tuple[tuple[float, float, float], ...],
) -> None:
    """Add a struck note at ``start`` seconds: partials of (frequency ratio, weight, decay seconds),
    each cut off after ten decay times."""
    first = round(start * sample_rate)
    local = (
        np.arange(min(out.size - first, round(10 * max(p[2] for p in partials) * sample_rate))) / sample_rate
    )
    tone = sum(
        w * np.exp(-local / decay) * np.sin(2 * np.pi * hz * ratio * local) for ratio, w, decay in partials
    )
    out[first : first + local.size] += np.minimum(1.0, local / 0.002) * tone


def drum_beat(
    duration_s: float = 5.11, *, sample_rate: int = 44100, bpm: float = 94.0, seed: int = 0
) -> np.ndarray:
    """A hip-hop drum loop: kick on 1 and the "and" of 3, snare on 2 and 4, hi-hats on eighths."""
    rng = np.random.default_rng(seed)
    t = _grid(duration_s, sample_rate)
    eighth = 30.0 / bpm
    out = np.zeros_like(t)
    for k, start in enumerate(np.arange(0.0, duration_s, eighth)):
        local = np.clip(t - start, 0.0, None)
        on = t >= start
        if k % 8 in (0, 5):  # kick: a pitch-dropping sine
            phase = 2 * np.pi * (48 * local + 90 * 0.03 * (1 - np.exp(-local / 0.03)))
            out += on * 1.6 * np.exp(-local / 0.15) * np.sin(phase)
        if k % 4 == 2:  # snare: a body tone and a burst of noise
            out += (
                on
                * np.exp(-local / 0.06)
                * (0.5 * np.sin(2 * np.pi * 190 * local) + 0.6 * rng.standard_normal(t.size))
            )
        out += on * 0.25 * np.exp(-local / 0.02) * np.gradient(rng.standard_normal(t.size))  # hi-hat
    return _to_int16_scale(out)


def arpeggio(duration_s: float = 5.11, *, sample_rate: int = 44100, bpm: float = 128.0) -> np.ndarray:
    """Fast sixteenth-note synth arpeggios over A minor and F major (bright, reedy tones)."""
    sixteenth = 15.0 / bpm
    patterns = ((57, 60, 64, 69), (53, 57, 60, 65))
    partials = tuple((h, 1.0 / h, 0.18 / h**0.5) for h in range(1, 8))  # saw-like, brighter decays faster
    out = np.zeros(round(duration_s * sample_rate))
    for k, start in enumerate(np.arange(0.0, duration_s, sixteenth)):
        notes = patterns[int(start / (16 * sixteenth)) % 2]
        _strike(out, sample_rate, start, _midi_hz(notes[k % 4] + 12 * (k // 4 % 2)), partials)
    return _to_int16_scale(out)


def marimba(duration_s: float = 5.11, *, sample_rate: int = 44100, bpm: float = 100.0) -> np.ndarray:
    """A pentatonic marimba melody: a wooden bar's partials (1, 3.9, 9.2) decaying fast."""
    melody = (60, 62, 64, 67, 69, 67, 64, 62, 72, 69, 67, 64)
    partials = ((1.0, 1.0, 0.35), (3.9, 0.35, 0.08), (9.2, 0.12, 0.03))
    out = np.zeros(round(duration_s * sample_rate))
    for k, start in enumerate(np.arange(0.0, duration_s, 30.0 / bpm)):
        _strike(out, sample_rate, start, _midi_hz(melody[k % len(melody)]), partials)
    return _to_int16_scale(out)


def traffic(duration_s: float = 5.11, *, sample_rate: int = 44100, seed: int = 0) -> np.ndarray:
    """A motorway: low road rumble and cars passing by (engine hum with a Doppler drop)."""
    rng = np.random.default_rng(seed)
    t = _grid(duration_s, sample_rate)
    rumble = np.cumsum(rng.standard_normal(t.size))  # brown noise
    rumble = rumble - np.convolve(rumble, np.ones(2001) / 2001, mode="same")
    out = 0.02 * rumble
    for passing in (0.8, 2.4, 3.9):
        closeness = 1.0 / (1.0 + ((t - passing) / 0.45) ** 2)
        doppler = 1.0 + 0.06 * np.tanh((passing - t) / 0.3)
        hum = np.sin(2 * np.pi * np.cumsum(95 * doppler) / sample_rate)
        hiss = np.gradient(rng.standard_normal(t.size))
        out += closeness * (
            hum + 0.5 * np.sin(2 * np.pi * np.cumsum(190 * doppler) / sample_rate) + 0.25 * hiss
        )
    return _to_int16_scale(out)


def vibraphone(duration_s: float = 5.11, *, sample_rate: int = 44100) -> np.ndarray:
    """Sustained vibraphone chords (partials 1 and 4) with the motor's 5 Hz tremolo."""
    t = _grid(duration_s, sample_rate)
    chords = ((62, 65, 69, 72), (55, 59, 62, 65), (60, 64, 67, 71))
    partials = ((1.0, 1.0, 1.6), (4.0, 0.25, 0.25))
    out = np.zeros_like(t)
    for k, start in enumerate(np.arange(0.0, duration_s, 1.7)):
        for note in chords[k % len(chords)]:
            _strike(out, sample_rate, start, _midi_hz(note), partials)
    return _to_int16_scale(out * (1.0 + 0.35 * np.sin(2 * np.pi * 5.0 * t)))
