"""A ``/stream``'s audio frames: 16-bit PCM (the default) or Opus, as its start message
asks. Each chunk becomes the fields its clip or tail event adds and the binary frame
that follows the event; a rewind drops what the format holds of the dropped chunks."""

from __future__ import annotations

import time
from typing import Any

from ...kernels.errors import RiffusionError
from ..stream import StreamChunk
from ..stream.opus import ENCODER_DELAY, FRAME, RATE, OpusStream, pack
from .config import ServerConfig
from .messages import MessageError, StartMessage


class PcmAudio:
    """Each chunk's samples, 16-bit little-endian, channels interleaved."""

    format = "pcm_s16le"

    def __init__(self, sample_rate: int, channels: int) -> None:
        self.sample_rate, self.channels = sample_rate, channels

    def ready(self) -> dict[str, Any]:
        rate, channels = self.sample_rate, self.channels
        return {
            "format": self.format,
            "sample_rate": rate,
            "channels": channels,
            "bitrate": rate * 16 * channels,
        }

    def encode(self, chunk: StreamChunk) -> tuple[dict[str, Any], bytes]:
        return {"samples": int(chunk.audio.shape[-1])}, chunk.audio.T.astype("<i2").tobytes()

    def rewind(self, after: int) -> None:
        pass  # the client drops the chunks' PCM; nothing here depends on them


class OpusAudio:
    """Each chunk's Opus packets from the stream's one encoder (``stream/opus.py``), the
    frame being each packet's 16-bit little-endian length and bytes."""

    format = "opus"

    def __init__(self, sample_rate: int, channels: int, bitrate: int, keep: int) -> None:
        self.opus = OpusStream(sample_rate, channels, bitrate, keep=keep)
        self.sample_rate = sample_rate

    def ready(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "sample_rate": RATE,
            "channels": self.opus.channels,
            "bitrate": self.opus.bitrate,
            "frame_samples": FRAME,
            "encoder_delay": ENCODER_DELAY,
            "source_sample_rate": self.sample_rate,
        }

    def encode(self, chunk: StreamChunk) -> tuple[dict[str, Any], bytes]:
        began = time.perf_counter()
        encoded = self.opus.encode(chunk.index, chunk.audio, final=chunk.final)
        fields: dict[str, Any] = {
            "samples": encoded.samples,
            "packets": len(encoded.packets),
            "decoded": encoded.decoded,
            "encode_ms": round(1000 * (time.perf_counter() - began), 2),  # resampling included
        }
        if encoded.pre_skip is not None:
            fields["pre_skip"] = encoded.pre_skip
        return fields, pack(encoded.packets)

    def rewind(self, after: int) -> None:
        self.opus.rewind(after)


def stream_audio(message: StartMessage, config: ServerConfig, sample_rate: int, channels: int) -> Any:
    """The audio format a start message asks for (a message error naming a bad field)."""
    if message.format == "pcm_s16le":
        if message.bitrate is not None:
            raise MessageError("bitrate", "only an Opus stream (format opus) takes a bitrate")
        return PcmAudio(sample_rate, channels)
    bitrate = message.bitrate if message.bitrate is not None else config.stream_opus_kbps * 1000
    try:
        # a rewind keeps the clip playing: at most the client's window of clips back
        return OpusAudio(sample_rate, channels, bitrate, keep=config.stream_buffer + 4)
    except RiffusionError as exc:
        raise MessageError("format", str(exc)) from None
