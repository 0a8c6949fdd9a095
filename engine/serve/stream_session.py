"""One client's ``/stream`` session (the protocol: ``streams.py``'s docstring): its start,
its clips sent in their format as the client's playback makes room, its steers, rewinds
and controls, until it stops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect

from ...kernels.errors import RiffusionError
from ..runtime.requests import Blend, PromptInput
from ..runtime.seeds import crop_width
from ..stream import Stream, StreamChunk, StreamSettings, advance_samples, clip_samples
from .api import jpeg_data_url, profile_name, profiled
from .config import FieldError, checked_steps
from .messages import (
    ControlMessage,
    MessageError,
    PlayedMessage,
    PromptMessage,
    StartMessage,
    UpdateMessage,
    message_image,
    message_prompt,
    message_width,
    parse_message,
)
from .playback import Playback
from .stream_audio import stream_audio

# A steer keeps the clips the listener will have begun within this long (the rewind event's
# way to the client) plus the time to make the clip that replaces them, and drops the later
# ones it was sent: the first clip toward the prompt is ready before the kept audio ends.
REWIND_MARGIN_S = 0.25


class StreamSession:
    """One client's stream."""

    def __init__(self, hub: Any, socket: WebSocket) -> None:  # hub: streams.StreamHub
        self.hub, self.socket = hub, socket
        self.engine, self.config = hub.engine, hub.config
        self.stream: Stream | None = None
        self.credit = asyncio.Event()
        self.began = time.monotonic()
        self.playback: float | None = None  # when clip 0 was sent: the playback clock's zero
        self.paused_at: float | None = None
        self.paused_total = 0.0
        self.step_s = 0.0  # new audio per clip, seconds
        self.reason = "stopped by the client"
        self.made_s = 0.0  # audio seconds sent and kept
        self.send_lock = asyncio.Lock()  # a clip is sent whole before a steer, or dropped by it
        self.heard = Playback()  # the client's playback: clips sent and played, prompts on their way
        self.last_request: Any = None  # the request of the last clip sent
        self.audio: Any = None  # the audio frames' format (stream_audio.PcmAudio or OpusAudio)

    async def send_json(self, payload: dict[str, Any]) -> None:
        await self.socket.send_text(json.dumps(payload))

    async def error(self, exc: MessageError) -> None:
        await self.send_json({"type": "error", "field": exc.field, "message": str(exc)})

    async def admit(self) -> bool:
        """Wait for a valid start: True once the stream runs and holds a slot. Until then
        each bad message gets its error event; ``stop`` closes the socket (1000), and so
        does the start timeout (1008); a start when every slot is taken closes it (1013)."""
        timeout = self.config.stream_start_timeout_s
        try:
            while True:
                left = timeout - (time.monotonic() - self.began)
                try:
                    text = await asyncio.wait_for(self._receive(), timeout=max(left, 0))
                except asyncio.TimeoutError:  # a socket that never starts holds nothing for long
                    await self.socket.close(1008, f"no valid start message within {timeout:g} s")
                    return False
                if text is None:
                    return False
                try:
                    message = parse_message(text)
                except MessageError as exc:
                    await self.error(exc)
                    continue
                if isinstance(message, ControlMessage) and message.type == "stop":
                    reason = "stopped by the client before the stream started"
                    await self.send_json({"type": "stopped", "reason": reason})
                    await self.socket.close(1000, reason)
                    return False
                if not isinstance(message, StartMessage):
                    await self.error(MessageError("type", "the first message must be a start message"))
                    continue
                if not self.hub.claim():
                    await self.hub.refuse(self.socket)
                    return False
                try:
                    self.stream = await asyncio.to_thread(self._start, message)
                except BaseException as exc:
                    self.hub.release()
                    if not isinstance(exc, MessageError):
                        raise
                    await self.error(exc)
                    continue
                return True
        except WebSocketDisconnect:
            return False

    async def run(self) -> None:
        """The started stream, until it stops, the client leaves or its lifetime ends."""
        assert self.stream is not None
        try:
            await self._ready()
            sender = asyncio.create_task(self._send_clips())
            receiver = asyncio.create_task(self._receive_controls())
            left = self.config.stream_lifetime_s - (time.monotonic() - self.began)
            done, _ = await asyncio.wait(
                {sender, receiver}, timeout=max(left, 0), return_when="FIRST_COMPLETED"
            )
            if not done:
                self.reason = (
                    f"the stream reached the server's lifetime of {self.config.stream_lifetime_s:g} s"
                )
            self.stream.stop()
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await sender
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await self.send_json({"type": "stopped", "reason": self.reason})
                await self.socket.close(1000, self.reason[:120])
        except WebSocketDisconnect:
            pass
        finally:
            if self.stream is not None:
                await asyncio.to_thread(self.stream.close)

    async def _receive(self) -> str | None:
        message = await self.socket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        if message.get("text") is None:
            await self.error(MessageError("message", "control messages are JSON text"))
            return ""
        return message["text"]

    def _start(self, message: StartMessage) -> Stream:
        engine, seeds, config = self.engine, self.hub.seeds, self.config
        runs = profile_name(engine)
        if message.profile is not None and message.profile != runs:
            raise MessageError(
                "profile",
                f"this server runs the {runs} profile; `serve --profile {message.profile}` runs the other",
            )
        try:
            steps = checked_steps(config, message.num_inference_steps)
        except FieldError as exc:
            raise MessageError(exc.field, exc.reason) from None
        start = message_prompt(engine, "start", message.start)
        end = message_prompt(engine, "end", message.end) if message.end is not None else None
        seed_image = message_image(seeds, "seed_image_id", message.seed_image_id, "RGB")
        mask = message_image(seeds, "mask_image_id", message.mask_image_id, "L")
        params = engine.params
        self.audio = stream_audio(message, config, params.sample_rate, params.channels)
        width = seed_image.width
        if message.width is not None:
            width = message_width(engine, message.width, seed_image.width, message.seed_image_id)
            seed_image = crop_width(seed_image, width)
            mask = None if mask is None else crop_width(mask, width)
        try:
            settings = StreamSettings(
                steps=engine.steps if profiled(engine) else steps,
                width=width,
                scheduler=engine.scheduler,  # the profile's, or serve --scheduler
                alpha_step=message.alpha_step,
                crossfade_s=message.crossfade_s,
                continuation=message.continuation,
                buffer=1,  # the client's window (stream_buffer) is the buffer that counts
            )
        except RiffusionError as exc:
            raise MessageError("start", str(exc)) from None
        self.step_s = advance_samples(settings, engine.params) / engine.params.sample_rate
        try:
            return Stream(
                engine,
                start,
                end,
                settings=settings,
                seed_image=seed_image,
                mask=mask,
                runner=self.hub.runner,
                deadline=self._deadline,
            )
        except RiffusionError as exc:
            raise MessageError("seed_image_id" if mask is None else "mask_image_id", str(exc)) from None

    def _deadline(self, index: int) -> float:
        """When clip ``index`` must start playing (monotonic), on the playback clock."""
        zero = self.playback if self.playback is not None else time.monotonic()
        paused = self.paused_total + (time.monotonic() - self.paused_at if self.paused_at else 0.0)
        return zero + paused + index * self.step_s

    async def _ready(self) -> None:
        assert self.stream is not None
        params = self.engine.params
        await self.send_json(
            {
                "type": "ready",
                **self.audio.ready(),
                "clip_s": clip_samples(self.stream.settings, params) / params.sample_rate,
                "width": self.stream.settings.width,
                "overlap_s": self.stream.overlap_samples / params.sample_rate,
                "buffer": self.config.stream_buffer,
                "lifetime_s": self.config.stream_lifetime_s,
                # what every clip of the stream runs: the server's profile
                "profile": profile_name(self.engine),
                "scheduler": self.stream.settings.scheduler,
                "steps": self.stream.settings.steps,
                "guidance": self.stream.walk.start.guidance,
            }
        )

    async def _send_clips(self) -> None:
        assert self.stream is not None
        chunks = iter(self.stream)
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return
            while (
                chunk.index > self.heard.played + self.config.stream_buffer
                and not self.stream.stopped
                and self.stream.current(chunk)
            ):
                self.credit.clear()
                await self.credit.wait()
            async with self.send_lock:
                if not self.stream.current(chunk):
                    continue  # a steer dropped it: the stream makes it again
                await self._send(chunk)
            if chunk.final:
                return

    async def _send(self, chunk: StreamChunk) -> None:
        """The chunk's event and audio frame."""
        assert self.stream is not None
        now = time.monotonic()
        if self.playback is None:
            self.playback = now
        due = self._deadline(chunk.index)
        late = chunk.made_at - due if chunk.index > 0 and not chunk.final else 0.0
        self.made_s += chunk.duration_s
        working = max(now - self.began - self.paused_total, 1e-6)
        margin = self.made_s / working
        event: dict[str, Any] = {
            "type": "tail" if chunk.final else "clip",
            "index": chunk.index,
            "start_s": chunk.start_s,
            "margin": round(margin, 3),
        }
        fields, frame = await asyncio.to_thread(self.audio.encode, chunk)
        event.update(fields)
        if not chunk.final:
            request = self.last_request = chunk.request
            event.update(
                start=_describe(request.start),
                end=_describe(request.end or request.start),
                alpha=request.alpha,
                ahead_s=round(due - now, 3),
                behind=late > 0,
                image=await asyncio.to_thread(jpeg_data_url, chunk.clip.image),
            )
            ear = self.heard.prompt_to_ear(chunk.index, request, now)
            if ear is not None:
                event["prompt_to_ear_s"] = round(ear, 3)
            self.hub.metrics.stream_clips.inc()
            self.hub.metrics.stream_margin.observe(margin)
            if late > 0:
                self.hub.metrics.stream_underruns.inc()
                await self.send_json({"type": "behind", "index": chunk.index, "late_s": round(late, 3)})
        await self.send_json(event)
        await self.socket.send_bytes(frame)
        self.hub.metrics.stream_audio_bytes.labels(self.audio.format).inc(len(frame))
        self.heard.sent_clip(chunk.index, now, chunk.duration_s)

    async def _receive_controls(self) -> None:
        assert self.stream is not None
        while True:
            text = await self._receive()
            if text is None:
                self.reason = "the client disconnected"
                self.stream.stop()
                self.credit.set()
                return
            if not text:
                continue
            received = time.monotonic()
            try:
                message = parse_message(text)
                if isinstance(message, StartMessage):
                    raise MessageError("type", "the stream has started; send update or prompt to change it")
                if isinstance(message, PromptMessage):
                    await self._steer(message, received)
                elif isinstance(message, UpdateMessage):
                    await asyncio.to_thread(self._apply, message)  # tokenizes: off the event loop
                else:
                    self._control(message)
            except MessageError as exc:
                await self.error(exc)
                continue
            if isinstance(message, ControlMessage) and message.type == "stop":
                self.stream.stop()
                self.credit.set()
                return

    def _control(self, message: PlayedMessage | ControlMessage) -> None:
        """Played, pause, resume (on the event loop: they touch the credit event)."""
        stream = self.stream
        assert stream is not None
        if isinstance(message, PlayedMessage):
            highest = self.heard.highest
            if message.clip > highest:
                sent = f"the last clip sent is {highest}" if highest >= 0 else "none is sent yet"
                raise MessageError("clip", f"clip {message.clip} was never sent: {sent}")
            for seconds in self.heard.played_clip(message.clip, time.monotonic()):
                self.hub.metrics.stream_prompt_to_ear.observe(seconds)
            self.credit.set()
        elif message.type == "pause":
            stream.pause()
            if self.paused_at is None:
                self.paused_at = time.monotonic()
        elif message.type == "resume":
            if self.paused_at is not None:
                self.paused_total += time.monotonic() - self.paused_at
                self.paused_at = None
            stream.resume()

    async def _steer(self, message: PromptMessage, received: float) -> None:
        """Queue the prompt for the wrap, or steer now: the clips after the last one sent
        are dropped (the one waiting for the client's credit included) and made again."""
        stream = self.stream
        assert stream is not None
        prompt = await asyncio.to_thread(message_prompt, self.engine, "prompt", message.prompt)  # tokenizes
        try:
            if message.when == "wrap":
                await asyncio.to_thread(stream.queue, prompt)
            else:
                async with self.send_lock:
                    # Kept: what plays until the steered clip can be made (never a gap).
                    make = self.hub.batcher.estimate(self.last_request) if self.last_request else None
                    keep = self.heard.playing_at(time.monotonic() + REWIND_MARGIN_S + (make or 0.0))
                    await asyncio.to_thread(stream.queue, prompt, message.when, after=keep)
                    if keep < self.heard.sent:  # sent, not yet playing: the client drops them
                        await asyncio.to_thread(self.audio.rewind, keep)
                        await self.send_json({"type": "rewind", "after": keep})
                        self.made_s -= self.heard.drop_after(keep)  # never heard
                    self.credit.set()  # a chunk waiting for credit is dropped now
        except RiffusionError as exc:
            raise MessageError("prompt", str(exc)) from None
        # now and jump replace the prompts queued for the wrap
        self.heard.prompt(prompt, received, replaces=message.when != "wrap")

    def _apply(self, message: UpdateMessage) -> None:
        stream = self.stream
        assert stream is not None
        changes: dict[str, Any] = {}
        if message.start is not None:
            changes["start"] = message_prompt(self.engine, "start", message.start)
        if message.end is not None:
            changes["end"] = message_prompt(self.engine, "end", message.end)
        width = stream.settings.width  # a shorter stream's images: their first columns
        if message.seed_image_id is not None:
            image = message_image(self.hub.seeds, "seed_image_id", message.seed_image_id, "RGB")
            changes["seed_image"] = crop_width(image, width)
        if message.mask_image_id is not None:
            changes["mask"] = crop_width(
                message_image(self.hub.seeds, "mask_image_id", message.mask_image_id, "L"), width
            )
        try:
            stream.update(**changes)
        except RiffusionError as exc:
            raise MessageError(next(iter(changes), "update"), str(exc)) from None


def _describe(prompt: PromptInput | Blend) -> dict[str, Any]:
    """A prompt input as the API writes it; a blend (where a steered walk started) as its
    two ends and alpha."""
    if isinstance(prompt, Blend):
        return {
            "start": _describe(prompt.start),
            "end": _describe(prompt.end),
            "alpha": prompt.alpha,
            "guidance": prompt.guidance,
            "denoising": prompt.denoising,
        }
    return {
        "prompt": prompt.prompt,
        "seed": prompt.seed,
        "negative_prompt": prompt.negative_prompt,
        "guidance": prompt.guidance,
        "denoising": prompt.denoising,
    }
