"""``/stream``: an endless stream over a WebSocket, made on the server and paced by the
listener's playback.

The client sends JSON control messages; the first must be ``start``::

    {"type": "start", "start": {"prompt": "jazz", "seed": 1}, "end": {...} (optional),
     "seed_image_id": "og_beat", "mask_image_id": null, "num_inference_steps": 50,
     "alpha_step": 0.25, "crossfade_s": 0.2, "continuation": false,
     "width": 256 (optional: the clip's pixels, 100 per second; the seed image's by default),
     "format": "pcm_s16le" (the default) or "opus", "bitrate": 104000 (Opus only: bits per
     second, 16000..256000; by default the server's --stream-opus-kbps)}
    {"type": "prompt", "prompt": {"prompt": "techno", "seed": 7}, "when": "wrap"}
        wrap (the default): the end from the next wrap; now: the clip after the one
        playing walks from where the music is to it (already at alpha_step); jump: that
        clip is the prompt's own (alpha 1). now and jump drop the clips made after the one
        playing, sent or not (a rewind event tells the client which)
    {"type": "update", "start": {...}, "end": {...}, "seed_image_id": ..., "mask_image_id": ...}
    {"type": "played", "clip": N}   clip N began playing: the server makes clips up to
                                    N + buffer (a client that sends none gets ``buffer`` clips;
                                    N above every clip sent is an error event)
    {"type": "pause"} / {"type": "resume"} / {"type": "stop"}

Prompt inputs are the API's (``/run_inference/``'s ``start``/``end``) and are checked
the same way. The server sends JSON events and binary audio:

    {"type": "ready", "format": "pcm_s16le", "sample_rate": 44100, "channels": 1, "bitrate": 705600,
     "profile": "realtime", "scheduler": "lcm", "steps": 4, "guidance": 1.0, ...}
        (Opus: "format": "opus", "sample_rate": 48000, "bitrate": 104000, "frame_samples": 960,
        "encoder_delay": 312, "source_sample_rate": 44100)
    {"type": "clip", "index": N, "start": {...}, "end": {...}, "alpha": 0.25, "start_s": ...,
     "samples": ..., "image": "data:image/jpeg;base64,...", "margin": 1.8, "ahead_s": 3.2,
     "behind": false, "prompt_to_ear_s": 2.4 (the first clip toward a prompt: from its message
     to when playback reaches this clip, for a client that plays audio as soon as it has it)}
                        followed by one binary frame: the chunk's audio, to play right after
                        the last. PCM: 16-bit little-endian samples, channels interleaved.
                        Opus: "packets": K whole Opus packets, each as its length (16-bit
                        little-endian) and its bytes; they yield "decoded" samples of the
                        stream's audio (samples: the chunk's own length at 48 kHz; the rest
                        comes with the next chunk's packets, the last chunk's all and more:
                        drop that padding). "pre_skip": P on the first chunk and on the first
                        after a rewind: a new encoder run; decode it with a new decoder (no
                        OpusHead) and drop its first P samples (docs/streams.md)
    {"type": "rewind", "after": N}   a steer dropped the clips after N: drop their audio (not
                                     yet playing); the next chunk is clip N + 1 again, to
                                     play right after clip N (Opus: after what clip N's
                                     packets yielded; the next chunk starts a new run)
    {"type": "behind", "index": N, "late_s": 0.4}   the clip was ready after it was due
    {"type": "error", "field": "start.prompt", "message": "..."}   a refused message; the stream goes on
    {"type": "stopped", "reason": "..."}   then the socket closes (1000)

A socket holds one of the server's stream slots only from a valid ``start`` on. Before
it, ``stop`` closes it (1000, after a ``stopped`` event) and so does the start timeout
(1008, with the reason); sockets waiting to start have a bound of their own. A server at
its stream limit closes a new socket, or one whose start finds no slot, with code 1013
(try again later) and the reason. A stream ends after the server's lifetime; a disconnect
stops its work at the next UNet step.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any

from fastapi import WebSocket

from ..runtime.pipeline import Engine
from ..runtime.requests import Cancelled, Request
from ..runtime.seeds import SeedLibrary
from .batcher import Batcher
from .config import ServerConfig
from .metrics import Metrics
from .scheduler import QueueFull
from .stream_session import StreamSession

TRY_AGAIN_LATER = 1013  # WebSocket close code (RFC 6455 registry): the server is at capacity


class StreamHub:
    """The streams of one server: their count, their clips' way through the batcher."""

    def __init__(
        self, engine: Engine, batcher: Batcher, seeds: SeedLibrary, config: ServerConfig, metrics: Metrics
    ) -> None:
        self.engine, self.batcher, self.seeds, self.config, self.metrics = (
            engine,
            batcher,
            seeds,
            config,
            metrics,
        )
        self.open = 0  # streams started: each holds one of max_streams' slots
        self.waiting = 0  # sockets accepted that have not started a stream

    def runner(self, requests: Sequence[Request], deadlines: Sequence[float], should_stop: Any) -> Any:
        """A stream's diffusion through the shared batcher (earliest deadline first)."""
        import torch

        try:
            jobs = self.batcher.submit_images(requests, deadlines)
        except QueueFull as exc:
            raise Cancelled(str(exc)) from None
        futures = [j.future for j in jobs]
        while True:
            done, _ = concurrent.futures.wait(futures, timeout=0.05)
            if len(done) == len(futures):
                return torch.stack([f.result() for f in futures])
            if should_stop():
                for job in jobs:
                    self.batcher.cancel(job)
                raise Cancelled("the stream stopped")

    async def serve(self, socket: WebSocket) -> None:
        """Admit a socket: it holds a stream slot only once it sends a valid start (sockets
        waiting to start have their own bound and a deadline), then run its stream."""
        await socket.accept()
        if self.open >= self.config.max_streams:
            await self.refuse(socket)
            return
        if self.waiting >= self.config.max_unstarted_streams:
            self.metrics.streams_refused.inc()
            await socket.close(
                TRY_AGAIN_LATER,
                f"too many sockets waiting to start a stream: at most {self.config.max_unstarted_streams}",
            )
            return
        session = StreamSession(self, socket)
        self.waiting += 1
        try:
            started = await session.admit()
        finally:
            self.waiting -= 1
        if not started:
            return
        try:
            await session.run()
        finally:
            self.open -= 1
            self.metrics.streams_open.set(self.open)

    async def refuse(self, socket: WebSocket) -> None:
        self.metrics.streams_refused.inc()
        await socket.close(
            TRY_AGAIN_LATER, f"too many streams: this server runs at most {self.config.max_streams} at once"
        )

    def claim(self) -> bool:
        """Take a stream slot (on the event loop: no await between the check and the count)."""
        if self.open >= self.config.max_streams:
            return False
        self.open += 1
        self.metrics.streams_open.set(self.open)
        return True

    def release(self) -> None:
        self.open -= 1
        self.metrics.streams_open.set(self.open)
