"""A stream's audio as Opus: one encoder for the stream's whole life, so the joins
between chunks stay gapless (a restarted encoder would put priming silence and a click
at each), after one resampling of the 44.1 kHz audio to Opus's 48 kHz (soxr, streaming).

Timing. The stream's 48 kHz audio has positions from 0. libopus delays its input by its
lookahead (``ENCODER_DELAY`` samples, RFC 7845's pre-skip), and the resampler and the
encoder's 20 ms frames hold back the end of each chunk: a chunk's packets decode to
the stream's audio up to a little before the chunk's end, and the rest comes with the
next chunk's packets (with the stream's last chunk, everything). An encoder *run* is
what one decoder decodes: the stream's first, and one after each rewind. A decoder
starting a run drops its first ``pre_skip`` output samples; then each chunk's packets
yield ``decoded`` samples of the stream in order, and the last chunk's packets decode
to more (padding): the rest is dropped. The samples yielded add up to the resampled
PCM stream's length, ``round(pcm_samples * 48000 / 44100)``.

Rewinds. A steer drops chunks already encoded. The encoder cannot be rewound, so a new
run starts: a new resampler and encoder are fed the kept audio from at least
``PRE_ROLL`` samples before the position the listener has decoded to (RFC 7845 section
4.6: a decoder converges within 80 ms), and the listener's new decoder drops that
pre-roll with the pre-skip. The join is then between two decodings of the same audio.

PyAV (FFmpeg's libopus binding, with libopus in its wheels) encodes and decodes;
contracts relied on, checked in the tests: a libopus encoder fed whole 960-sample frames
returns one packet per frame at once, packet ``j`` decoding to the input from
``j * 960 - ENCODER_DELAY`` on, and ``encode(None)`` returns the packets of the rest; a
decoder opened without an OpusHead (no ``extradata``) drops nothing.
"""

from __future__ import annotations

import collections
import contextlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...kernels.errors import RiffusionError
from ...kernels.files import atomic_path

RATE = 48000  # Opus's sample rate (Hz)
FRAME = 960  # samples per packet: 20 ms
ENCODER_DELAY = 312  # libopus's lookahead at 48 kHz (its pre-skip): 6.5 ms
PRE_ROLL = 3840  # samples fed to a new run before the listener's position: 80 ms
MIN_BITRATE, MAX_BITRATE = 16_000, 256_000  # bits per second, per channel pair
# 1/6.8 of 16-bit PCM's 706 kbit/s, mel spectral convergence <= 0.05 (docs/streams.md)
DEFAULT_BITRATE = 104_000
# Riffusion's audio holds nothing above its mel scale's top (10 kHz): Opus's super-wideband
# band (12 kHz) spends the bits below it, not on fullband's 12-20 kHz.
CUTOFF = 12000
MAX_PACKET = 65535  # a frame's packet length is a 16-bit field


def check_bitrate(bitrate: int, name: str = "bitrate") -> int:
    if isinstance(bitrate, bool) or not isinstance(bitrate, int) or not MIN_BITRATE <= bitrate <= MAX_BITRATE:
        raise RiffusionError(
            f"{name} must be an integer from {MIN_BITRATE} to {MAX_BITRATE} bits per second, got {bitrate!r}"
        )
    return bitrate


def import_av() -> Any:
    try:
        import av
    except ImportError:
        raise RiffusionError(
            "Opus needs PyAV: pip install 'riffusion-engine[serve]' (or pip install av)"
        ) from None
    return av


def _layout(channels: int) -> str:
    return "stereo" if channels == 2 else "mono"


def _resample(resampler: Any, audio: np.ndarray, *, last: bool = False) -> np.ndarray:
    """Source int16 ``(channels, samples)`` through a soxr stream: float32 ``(samples, channels)``
    at 48 kHz, as much as the resampler gives back now (``last``: all the rest)."""
    x = np.ascontiguousarray(np.atleast_2d(audio).T, dtype=np.float32) / 32768.0
    return resampler.resample_chunk(x, last=last).reshape(-1, x.shape[1])


def _audio_frame(samples: np.ndarray, pts: int) -> Any:
    """float32 ``(samples, channels)`` at 48 kHz as a PyAV frame for the encoder."""
    av = import_av()
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout=_layout(samples.shape[1]))
    frame.sample_rate, frame.pts = RATE, pts
    return frame


def _configure(codec: Any, channels: int, bitrate: int) -> Any:
    """A libopus encoder's settings: 48 kHz float32 interleaved, libopus's defaults otherwise
    (20 ms frames, VBR, complexity 10, the "audio" application)."""
    codec.sample_rate = RATE
    codec.layout = _layout(channels)
    codec.format = "flt"
    codec.bit_rate = bitrate
    codec.options = {"cutoff": str(CUTOFF)}
    return codec


def opus_encoder(channels: int, bitrate: int) -> Any:
    """A libopus encoder (PyAV CodecContext) for float32 interleaved 48 kHz frames."""
    av = import_av()
    codec = _configure(av.CodecContext.create("libopus", "w"), channels, bitrate)
    codec.open()
    if codec.frame_size != FRAME:  # the positions below assume 20 ms packets
        raise RiffusionError(f"libopus opened with {codec.frame_size}-sample frames, not {FRAME}")
    return codec


def decoded_int16(frame: Any) -> np.ndarray:
    """A decoded PyAV audio frame's samples as int16, channels interleaved (libopus's
    decoder gives s16; a float format is scaled)."""
    samples = frame.to_ndarray()
    if frame.format.is_planar:
        samples = samples.T  # (samples, channels)
    samples = samples.reshape(-1)
    if samples.dtype.kind == "f":
        return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)
    return samples.astype(np.int16)


def opus_decoder(channels: int) -> Any:
    """A libopus decoder (PyAV) with no OpusHead: it drops no samples itself."""
    av = import_av()
    codec = av.CodecContext.create("libopus", "r")
    codec.sample_rate = RATE
    codec.layout = _layout(channels)
    return codec


class OpusDecoding:
    """A ``/stream`` client's side of Opus (docs/streams.md#opus): a new decoder (no
    OpusHead) at each frame that starts an encoder run, its first ``pre_skip`` samples
    dropped (across frames if need be), then each frame's ``decoded`` samples in order;
    what is left after the last frame is its padding."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.decoder: Any = None
        self.skip = 0  # samples the run still drops
        self.rest = np.zeros(0, np.int16)  # decoded, not yet yielded (channels interleaved)

    def frame(self, packets: list[bytes], decoded: int, pre_skip: int | None) -> np.ndarray:
        """One frame's packets: the ``decoded`` samples they yield, int16 ``(channels, decoded)``."""
        av = import_av()
        if pre_skip is not None:
            self.decoder, self.skip, self.rest = opus_decoder(self.channels), pre_skip, np.zeros(0, np.int16)
        if self.decoder is None:
            raise RiffusionError("an Opus frame before any frame that starts a run (pre_skip)")
        parts = [self.rest]
        for packet in packets:
            for out in self.decoder.decode(av.Packet(packet)):
                samples = decoded_int16(out)
                drop = min(self.skip * self.channels, samples.size)
                self.skip -= drop // self.channels
                parts.append(samples[drop:])
        samples = np.concatenate(parts)
        take = decoded * self.channels
        if samples.size < take:
            raise RiffusionError(
                f"an Opus frame's packets decode to {samples.size // self.channels} samples, not {decoded}"
            )
        self.rest = samples[take:]
        return samples[:take].reshape(-1, self.channels).T


def pack(packets: list[bytes]) -> bytes:
    """A chunk's binary frame: each packet as its length (16-bit little-endian) and bytes."""
    return b"".join(struct.pack("<H", len(p)) + p for p in packets)


def unpack(frame: bytes) -> list[bytes]:
    """The packets of a binary frame made by :func:`pack`."""
    packets, at = [], 0
    while at < len(frame):
        if at + 2 > len(frame):
            raise RiffusionError(f"an Opus frame ends inside a packet length at byte {at}")
        (size,) = struct.unpack_from("<H", frame, at)
        if at + 2 + size > len(frame):
            raise RiffusionError(f"an Opus frame's packet at byte {at} runs past its end")
        packets.append(frame[at + 2 : at + 2 + size])
        at += 2 + size
    return packets


@dataclass
class Encoded:
    """One chunk's Opus: its packets and what a decoder makes of them."""

    packets: list[bytes]
    samples: int  # the chunk's length at 48 kHz
    decoded: int  # stream samples the packets yield (after the run's pre-skip; the last: trimmed)
    pre_skip: int | None  # a new run begins: a new decoder drops its first pre_skip samples


class OpusStream:
    """A stream's chunks (int16 ``(channels, samples)`` at ``sample_rate``) as Opus packets.

    ``encode`` each chunk in order (the last with ``final``); ``rewind(after)`` when the
    chunks encoded after chunk ``after`` are dropped (-1: all). ``keep`` chunks back are
    remembered for a rewind."""

    def __init__(self, sample_rate: int, channels: int, bitrate: int, *, keep: int = 8) -> None:
        if channels not in (1, 2):
            raise RiffusionError(f"Opus streams carry 1 or 2 channels, got {channels}")
        self.sample_rate, self.channels, self.bitrate = sample_rate, channels, check_bitrate(bitrate)
        self.keep = keep
        self.in_samples = 0  # source samples encoded
        self.out_samples = 0  # the resampled length of in_samples (what the chunks' samples add to)
        # (chunk index, source samples and stream position decoded through after it)
        self.marks: collections.deque[tuple[int, int, int]] = collections.deque()
        # (source start, audio) of the chunks a rewind may go back into
        self.history: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._run(0, 0)

    def _run(self, start: int, through: int) -> None:
        """A new resampler and encoder whose input begins at stream position ``start`` (on
        the grid both rates share, so a source position too) and whose listener has audio
        to ``through``."""
        import soxr

        self.resampler = soxr.ResampleStream(self.sample_rate, RATE, self.channels, dtype="float32")
        self.encoder = opus_encoder(self.channels, self.bitrate)
        self.start = start  # the stream position of the run's first input sample
        self.fed = 0  # input samples given to the encoder (whole frames)
        self.fifo = np.zeros((0, self.channels), np.float32)  # resampled, not yet a whole frame
        self.through = through  # the stream position the listener's audio reaches
        self.pre_skip: int | None = through - start + ENCODER_DELAY
        self.pending: list[bytes] = []  # packets made before the next chunk's (a rewind's pre-roll)

    def _feed(self, audio: np.ndarray, *, last: bool = False) -> None:
        """Source audio (int16 ``(channels, samples)``) through the resampler into whole frames."""
        self.fifo = np.concatenate([self.fifo, _resample(self.resampler, audio, last=last)])
        if last and len(self.fifo) % FRAME:
            pad = FRAME - len(self.fifo) % FRAME  # the encoder's last frame is whole: the rest is padding
            self.fifo = np.concatenate([self.fifo, np.zeros((pad, self.channels), np.float32)])
        whole = len(self.fifo) // FRAME * FRAME
        for at in range(0, whole, FRAME):
            self.pending.extend(
                bytes(p) for p in self.encoder.encode(_audio_frame(self.fifo[at : at + FRAME], self.fed))
            )
            self.fed += FRAME
        self.fifo = self.fifo[whole:]
        if last:
            self.pending.extend(bytes(p) for p in self.encoder.encode(None))

    def encode(self, index: int, audio: np.ndarray, *, final: bool = False) -> Encoded:
        """Chunk ``index``'s audio as packets (``final``: the stream's last chunk)."""
        audio = np.atleast_2d(audio)
        before = self.out_samples
        self.in_samples += audio.shape[-1]
        self.out_samples = round(self.in_samples * RATE / self.sample_rate)  # soxr's length
        self.history.append((self.in_samples - audio.shape[-1], audio))
        self._feed(audio, last=final)
        # The encoder's output reaches ENCODER_DELAY before its input; the last chunk's, the end.
        reaches = self.out_samples if final else self.start + self.fed - ENCODER_DELAY
        reaches = max(reaches, self.through)
        encoded = Encoded(self.pending, self.out_samples - before, reaches - self.through, self.pre_skip)
        self.pending, self.pre_skip, self.through = [], None, reaches
        self.marks.append((index, self.in_samples, reaches))
        while len(self.marks) > self.keep:
            self.marks.popleft()
        while len(self.history) > self.keep + 1:
            self.history.popleft()
        if any(len(p) > MAX_PACKET for p in encoded.packets):
            raise RiffusionError("an Opus packet is longer than a frame's 16-bit length field")
        return encoded

    def rewind(self, after: int) -> None:
        """The chunks after chunk ``after`` are dropped: a new run goes on from the end of
        chunk ``after`` (its first packets are pre-roll that the listener drops)."""
        while self.marks and self.marks[-1][0] > after:
            self.marks.pop()
        if after < 0 or not self.marks:
            if after >= 0:  # a caller's defect (a rewind keeps a recent chunk), not a user's
                raise RuntimeError(f"cannot rewind to chunk {after}: only {self.keep} chunks are kept")
            self.in_samples = self.out_samples = 0
            self.history.clear()
            self._run(0, 0)
            return
        index, end, through = self.marks[-1]
        if index != after:
            raise RuntimeError(f"cannot rewind to chunk {after}: it was not encoded")
        self.in_samples, self.out_samples = end, round(end * RATE / self.sample_rate)
        audio = np.concatenate([a for _, a in self.history], axis=-1)  # (channels, samples)
        first = self.history[0][0]
        audio = audio[:, : end - first]
        # The new input starts on a common grid of both rates (160 at 48 kHz = 147 at 44.1).
        step_in, step_out = _grid(self.sample_rate)
        start = max(0, (through - PRE_ROLL) // step_out * step_out)
        source = start // step_out * step_in
        if source < first:  # no more history: as far back as it goes, on the grid
            source = -(-first // step_in) * step_in
            start = source // step_in * step_out
        if start > through:
            raise RuntimeError(f"cannot rewind to chunk {after}: the history kept begins after its end")
        while self.history and self.history[-1][0] >= end:
            self.history.pop()
        self._run(start, through)
        self.pending = []
        self._feed(audio[:, source - first :])


def _grid(sample_rate: int) -> tuple[int, int]:
    """The smallest source and 48 kHz sample counts that span the same time."""
    from math import gcd

    g = gcd(sample_rate, RATE)
    return sample_rate // g, RATE // g


@contextlib.contextmanager
def ogg_opus_writer(
    path: str | os.PathLike[str], sample_rate: int, channels: int, bitrate: int = DEFAULT_BITRATE
) -> Iterator[Callable[[np.ndarray], None]]:
    """A function that appends int16 ``(channels, samples)`` at ``sample_rate`` to an Ogg
    Opus file (RFC 7845) as it comes: resampled to 48 kHz once (soxr, streaming) and
    encoded by one libopus encoder, like a stream's Opus. Its pre-skip and last granule
    make a decoder's output the resampled audio's length. Like ``kernels.audio.audio_writer``,
    the file takes ``path``'s place when the block ends, with KeyboardInterrupt too."""
    import soxr

    av = import_av()
    check_bitrate(bitrate, "the Opus bitrate")
    resampler = soxr.ResampleStream(sample_rate, RATE, channels, dtype="float32")
    fed = 0

    def encode(out: Any, stream: Any, audio: np.ndarray, last: bool = False) -> None:
        nonlocal fed
        y = _resample(resampler, audio, last=last)
        if len(y):
            # PyAV cuts the frames to the encoder's 960 samples
            out.mux(stream.encode(_audio_frame(y, fed)))
            fed += len(y)
        if last:
            out.mux(stream.encode(None))

    interrupted: KeyboardInterrupt | None = None
    with atomic_path(path) as tmp:
        out = av.open(str(tmp), "w", format="ogg")
        try:
            stream = _configure(out.add_stream("libopus", rate=RATE), channels, bitrate)
            try:
                yield lambda audio: encode(out, stream, audio)
            except KeyboardInterrupt as exc:
                interrupted = exc
            encode(out, stream, np.zeros((channels, 0), np.int16), last=True)
        finally:
            out.close()
    if interrupted is not None:
        raise interrupted
