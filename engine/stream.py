"""Endless streams: Riffusion's alpha walk as a sequence of ordinary requests, joined
into gapless audio, with the diffusion of the next clips overlapping the audio of this one.

The walk follows Riffusion's web app. Each prompt end has a seed; the end of a pair
defaults to the start's prompt with the next seed, so a steady prompt still moves. The
first clip is alpha 0 (the start itself); every clip adds ``alpha_step``; once alpha
passes 1 it wraps (``alpha - 1``), the end becomes the start, and the next queued
prompt, if any, becomes the end (else the new start's prompt with the next seed). The
clip at alpha 1 and the would-be clip at alpha 0 of the next pair are the same
request, so the walk never repeats it. A prompt queued while clip ``n`` is the newest
one started is the end from the next wrap on; :meth:`Stream.update` changes the start,
end, seed image or mask from the next clip that has not begun.

Joins. Clip ``n`` ends with a tail of ``C`` samples that is crossfaded into the head of
clip ``n + 1`` with an equal-power fade (``cos`` out, ``sin`` in, over ``C`` samples), so
``N`` clips of ``L`` samples make exactly ``N * L - (N - 1) * C`` samples. A chunk holds
back its clip's tail until the next clip arrives (the last tail comes when the stream
stops). With ``continuation``, clip ``n + 1`` keeps clip ``n``'s last ``K`` spectrogram
columns: its seed image starts with them and its mask keeps them (black) and
regenerates the rest; after decoding they are put back pixel for pixel, so the two clips
hold the same spectrogram there, and the crossfade spans exactly those columns' audio
(``C = (K - 1) * hop`` samples).

Pipelining. A diffusion thread turns requests into spectrogram images (``lookahead``
clips as one batch); with ``pipeline`` (by default on a GPU only: on a CPU both stages
share the same cores, and measured no faster) an audio thread turns images into audio
and joins them while the next clips denoise (on a GPU, in a CuPy stream of its own). The
reader's side is a bounded buffer: a reader that stops reading stops the stream after
``buffer`` chunks, never grows its memory.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from riffusion_engine.kernels.errors import RiffusionError
from riffusion_engine.kernels.joins import Joiner

from .pipeline import MAX_SEED, SCHEDULERS, Cancelled, Clip, Engine, PromptInput, Request

# runner(requests, deadlines, should_stop) -> images (batch, height, width, 3) in [0, 1]:
# how a stream's diffusion runs (directly on the engine, or through a server's scheduler).
Runner = Callable[[Sequence[Request], Sequence[float], Callable[[], bool]], Any]


@dataclass(frozen=True)
class StreamSettings:
    """How a stream's clips are made and joined."""

    steps: int = 50  # scheduler steps per clip (the web app's 50)
    width: int = 512  # image width per clip (512 = 5.12 s)
    scheduler: str = "pndm"  # one of pipeline.SCHEDULERS
    alpha_step: float = 0.25  # alpha added per clip (the web app's 0.25: 4 clips per prompt change)
    crossfade_s: float = 0.2  # equal-power crossfade at each join (without continuation)
    continuation: bool = False  # each clip keeps the previous clip's last columns
    continuation_columns: int = 64  # columns kept with continuation (0.64 s; a multiple of 8)
    lookahead: int = 1  # clips denoised as one batch
    # audio of clip n overlaps the diffusion of clip n + 1 (a thread); None: on a GPU only
    # (on a CPU both stages share the cores: 0.99x-1.01x measured on two, README "Streams")
    pipeline: bool | None = None
    buffer: int = 2  # chunks made ahead of the reader at most

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise RiffusionError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.scheduler not in SCHEDULERS:
            raise RiffusionError(
                f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        if not math.isfinite(self.alpha_step) or not 0 < self.alpha_step <= 1:
            raise RiffusionError(f"alpha_step must be in (0, 1], got {self.alpha_step!r}")
        if not math.isfinite(self.crossfade_s) or not 0 <= self.crossfade_s <= 2.5:
            raise RiffusionError(f"crossfade_s must be in [0, 2.5] seconds, got {self.crossfade_s!r}")
        if self.continuation:
            k = self.continuation_columns
            if not isinstance(k, int) or k < 8 or k % 8 or k >= self.width:
                raise RiffusionError(
                    f"continuation_columns must be a multiple of 8 in 8..{self.width - 8}, got {k!r}"
                )
        for name in ("lookahead", "buffer"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 16:
                raise RiffusionError(f"{name} must be an integer in 1..16, got {value!r}")
        if self.continuation and self.lookahead != 1:
            # each continuation clip starts from the previous clip's image
            raise RiffusionError("continuation needs lookahead 1 (each clip starts from the one before)")


@dataclass
class StreamChunk:
    """A piece of the joined audio: clip ``index``'s, less the tail held for the next join."""

    index: int  # clip number, from 0; the final tail is a chunk with the last clip's index
    audio: np.ndarray  # (channels, samples) int16: what to play next, gapless after the previous chunk
    sample_rate: int  # Hz
    start_s: float  # where this chunk starts in the stream's audio
    request: Request  # the clip's request (its prompts and alpha)
    clip: Clip | None  # the clip as made (None for the final tail)
    made_at: float = field(default_factory=time.monotonic)  # when it was ready
    final: bool = False  # the last chunk: the stream has stopped

    @property
    def duration_s(self) -> float:
        return self.audio.shape[-1] / self.sample_rate


class Walk:
    """The web app's alpha walk (module docstring): which request comes next."""

    def __init__(self, start: PromptInput, end: PromptInput | None, settings: StreamSettings) -> None:
        self.settings = settings
        self.start, self.end = start, end if end is not None else _next_seed(start)
        self.alpha = 0.0
        self.upcoming: deque[PromptInput] = deque()
        self.seed_image: Any = None
        self.mask: Any = None

    def queue(self, prompt: PromptInput) -> None:
        self.upcoming.append(prompt)

    def peek(self) -> Request:
        """The next request, without moving on."""
        return Request(
            self.start,
            self.end,
            min(self.alpha, 1.0),
            steps=self.settings.steps,
            width=self.settings.width,
            scheduler=self.settings.scheduler,
            seed_image=self.seed_image,
            mask=self.mask,
        )

    def next(self) -> Request:
        request = self.peek()
        self.alpha += self.settings.alpha_step
        if self.alpha > 1 + 1e-3:
            self.alpha -= 1
            self.start = self.end
            self.end = self.upcoming.popleft() if self.upcoming else _next_seed(self.start)
        return request


def _next_seed(prompt: PromptInput) -> PromptInput:
    return replace(prompt, seed=(prompt.seed + 1) % (MAX_SEED + 1))


def continuation_inputs(previous: Any, base: Any, columns: int) -> tuple[Any, Any]:
    """Seed image and mask for a clip that keeps ``previous``'s last ``columns`` columns:
    those columns, then ``base`` (the stream's seed image) from that column on; the
    mask black (keep) over the kept columns and white (regenerate) elsewhere."""
    from PIL import Image

    width, height = previous.size
    seed = (base if base is not None else previous).convert("RGB").copy()
    seed.paste(previous.convert("RGB").crop((width - columns, 0, width, height)), (0, 0))
    mask = np.full((height, width), 255, dtype=np.uint8)
    mask[:, :columns] = 0
    return seed, Image.fromarray(mask, mode="L")


def _keep_columns(image: Any, previous: Any, columns: int) -> Any:
    """``image`` (batch row, height x width x 3 in [0, 1]) with its first ``columns``
    columns set to ``previous``'s last ones, exactly (after rounding to 8-bit pixels)."""
    import torch

    width = previous.size[0]
    tail = np.asarray(previous.convert("RGB"), dtype=np.float32)[:, width - columns :] / 255.0
    image = image.clone()
    image[:, :columns] = torch.from_numpy(tail).to(image.device, image.dtype)
    return image


class Stream:
    """An endless stream of clips from an :class:`Engine` (module docstring).

    Iterate it for :class:`StreamChunk`\\ s; :meth:`queue` a prompt, :meth:`update` the
    pair, seed image or mask, :meth:`pause`, :meth:`resume` and :meth:`stop` it from any
    thread. ``max_clips`` stops it after that many clips (None: endless)."""

    def __init__(
        self,
        engine: Engine,
        start: PromptInput,
        end: PromptInput | None = None,
        *,
        settings: StreamSettings | None = None,
        seed_image: Any = None,
        mask: Any = None,
        max_clips: int | None = None,
        runner: Runner | None = None,
        deadline: Callable[[int], float] | None = None,
    ) -> None:
        if max_clips is not None and (not isinstance(max_clips, int) or max_clips < 1):
            raise RiffusionError(f"max_clips must be an integer >= 1 or None, got {max_clips!r}")
        self.engine = engine
        self.settings = settings or StreamSettings()
        self.walk = Walk(start, end, self.settings)
        self.walk.seed_image, self.walk.mask = seed_image, mask
        self.max_clips = max_clips
        self._runner = runner or self._run_engine
        self._deadline = deadline or (lambda index: math.inf)
        self.joiner = Joiner(overlap_samples(self.settings, engine.params))
        self.sample_rate = engine.params.sample_rate
        self.check(self.walk.peek())
        self._lock = threading.Lock()
        self._resumed = threading.Event()
        self._resumed.set()
        self._stopped = threading.Event()
        self._out: queue.Queue[StreamChunk | BaseException | None] = queue.Queue(self.settings.buffer)
        self._images: queue.Queue[tuple[Request, Any, dict[str, float]] | BaseException | None] = queue.Queue(
            self.settings.lookahead
        )
        self.pipelined = (
            self.settings.pipeline if self.settings.pipeline is not None else engine.backend.device == "cuda"
        )
        self.clips_started = 0  # requests handed to the runner
        self.clips_made = 0  # clips turned into audio
        self._previous_image: Any = None
        self._last: Request = self.walk.peek()
        self._threads = [threading.Thread(target=self._diffuse, name="stream-diffusion", daemon=True)]
        if self.pipelined:
            self._threads.append(threading.Thread(target=self._audio_loop, name="stream-audio", daemon=True))
        for thread in self._threads:
            thread.start()

    # -- control, from any thread -------------------------------------------------

    def check(self, request: Request) -> None:
        """RiffusionError for a request of this stream the engine cannot run."""
        self.engine.check(request)

    def queue(self, prompt: PromptInput) -> None:
        """``prompt`` becomes the end at the next wrap (after those queued before it)."""
        self.engine.check_prompt(prompt)
        with self._lock:
            self.walk.queue(prompt)

    def update(
        self,
        *,
        start: PromptInput | None = None,
        end: PromptInput | None = None,
        alpha: float | None = None,
        seed_image: Any = ...,
        mask: Any = ...,
    ) -> None:
        """Change the pair, alpha, seed image or mask from the next clip not yet begun
        (checked first: a bad value raises RiffusionError and changes nothing)."""
        with self._lock:
            walk = self.walk
            trial = Walk(start or walk.start, end or walk.end, self.settings)
            trial.alpha = walk.alpha if alpha is None else alpha
            trial.seed_image = walk.seed_image if seed_image is ... else seed_image
            trial.mask = walk.mask if mask is ... else mask
            self.check(trial.peek())
            walk.start, walk.end, walk.alpha = trial.start, trial.end, trial.alpha
            walk.seed_image, walk.mask = trial.seed_image, trial.mask

    def pause(self) -> None:
        """Make no new clip until :meth:`resume` (the one denoising finishes)."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    def stop(self) -> None:
        """Stop making clips: the one denoising stops at its next step; iteration ends
        with the held tail as a final chunk."""
        self._stopped.set()
        self._resumed.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def close(self, timeout: float = 30.0) -> None:
        """Stop and wait for the threads."""
        self.stop()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a thread waiting for room
                self._out.get_nowait()
        for thread in self._threads:
            thread.join(timeout)

    # -- iteration ------------------------------------------------------------------

    def __iter__(self) -> Iterator[StreamChunk]:
        while True:
            try:
                item = self._out.get(timeout=0.1)
            except queue.Empty:
                if not any(t.is_alive() for t in self._threads) and self._out.empty():
                    return  # the threads ended without an end marker (stopped, nobody reading)
                continue
            if isinstance(item, BaseException):
                raise item
            if item is None:
                return
            yield item
            if item.final:
                return

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the threads ------------------------------------------------------------------

    def _run_engine(self, requests: Sequence[Request], deadlines: Sequence[float], should_stop: Any) -> Any:
        return self.engine.images(requests, should_stop=should_stop)

    def _put(self, target: queue.Queue[Any], item: Any) -> bool:
        """Put ``item``, waiting for room; False once stopped (the item is dropped)."""
        while not self._stopped.is_set():
            try:
                target.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _next_requests(self) -> list[Request]:
        with self._lock:
            count = self.settings.lookahead
            if self.max_clips is not None:
                count = min(count, self.max_clips - self.clips_started)
            requests = []
            for _ in range(count):
                request = self.walk.next()
                if self.settings.continuation and self._previous_image is not None:
                    seed, mask = continuation_inputs(
                        self._previous_image, self.walk.seed_image, self.settings.continuation_columns
                    )
                    request = replace(request, seed_image=seed, mask=mask)
                requests.append(request)
            self.clips_started += len(requests)
            return requests

    def _diffuse(self) -> None:
        target = self._images if self.pipelined else None
        try:
            while not self._stopped.is_set():
                self._resumed.wait()
                if self._stopped.is_set():
                    break
                requests = self._next_requests()
                if not requests:
                    break
                first = self.clips_started - len(requests)
                deadlines = [self._deadline(first + i) for i in range(len(requests))]
                timings: dict[str, float] = {}
                begin = time.perf_counter()
                images = self._runner(requests, deadlines, self._stopped.is_set)
                timings["diffusion"] = time.perf_counter() - begin
                for request, image in zip(requests, images, strict=True):
                    if self.settings.continuation:
                        if self._previous_image is not None:
                            image = _keep_columns(
                                image, self._previous_image, self.settings.continuation_columns
                            )
                        self._previous_image = self.engine.picture(image)
                    if self.pipelined and self.engine.backend.device == "cuda":
                        import torch

                        torch.cuda.current_stream().synchronize()  # the audio thread reads it
                    item = (request, image, dict(timings))
                    if target is not None:
                        if not self._put(target, item):
                            return
                    elif not self._audio(item):
                        return
            self._finish(target)
        except Cancelled:
            self._finish(target)
        except BaseException as exc:  # to the reader
            self._put(target if target is not None else self._out, exc)

    def _finish(self, target: queue.Queue[Any] | None) -> None:
        if target is not None:
            self._put_final(target, None)
        else:
            self._flush()

    def _put_final(self, target: queue.Queue[Any], item: Any) -> None:
        """Put the end of the stream, waiting for room as long as the stream runs; once
        stopped, for half a second (the reader also ends when the threads have)."""
        waited = 0.0
        while not self._stopped.is_set() or waited < 0.5:
            try:
                target.put(item, timeout=0.05)
                return
            except queue.Full:
                waited += 0.05 if self._stopped.is_set() else 0.0

    def _audio_loop(self) -> None:
        try:
            with _audio_stream(self.engine):
                while True:
                    try:
                        item = self._images.get(timeout=0.05)
                    except queue.Empty:
                        if self._stopped.is_set() and not self._threads[0].is_alive():
                            break  # stopped: the diffusion thread ended without an end marker
                        continue
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        self._put(self._out, item)
                        return
                    if not self._audio(item):
                        return
            self._flush()
        except BaseException as exc:
            self._put(self._out, exc)

    def _audio(self, item: tuple[Request, Any, dict[str, float]]) -> bool:
        request, image, timings = item
        clip = self.engine.to_clip(image, timings)
        audio, start = self.joiner.add(clip.audio)
        index = self.clips_made
        self.clips_made += 1
        self._last = request
        chunk = StreamChunk(index, audio, self.sample_rate, start / self.sample_rate, request, clip)
        return self._put(self._out, chunk)

    def _flush(self) -> None:
        tail = self.joiner.flush()
        if tail is not None:
            audio, start = tail
            chunk = StreamChunk(
                self.clips_made - 1,
                audio,
                self.sample_rate,
                start / self.sample_rate,
                self._last,
                None,
                final=True,
            )
            self._put_final(self._out, chunk)
        else:
            self._put_final(self._out, None)

    @property
    def overlap_samples(self) -> int:
        """C: the samples crossfaded at each join."""
        return self.joiner.overlap

    def length_samples(self, clips: int) -> int:
        """Samples of ``clips`` joined clips (the final tail included)."""
        return length_samples(self.settings, self.engine.params, clips)


def clip_samples(settings: StreamSettings, params: Any) -> int:
    """L: the audio samples of one clip ((width - 1) hops)."""
    return (settings.width - 1) * params.hop_length


def overlap_samples(settings: StreamSettings, params: Any) -> int:
    """C: the samples crossfaded at each join."""
    if settings.continuation:
        return (settings.continuation_columns - 1) * params.hop_length
    return round(settings.crossfade_s * params.sample_rate)


def advance_samples(settings: StreamSettings, params: Any) -> int:
    """L - C: how far each clip after the first moves the stream on."""
    return clip_samples(settings, params) - overlap_samples(settings, params)


def length_samples(settings: StreamSettings, params: Any, clips: int) -> int:
    """Samples of ``clips`` joined clips: ``N * L - (N - 1) * C``."""
    return clips * clip_samples(settings, params) - max(clips - 1, 0) * overlap_samples(settings, params)


def clips_for(settings: StreamSettings, params: Any, seconds: float) -> int:
    """The fewest clips whose joined audio lasts ``seconds``."""
    need = math.ceil(seconds * params.sample_rate) - overlap_samples(settings, params)
    return max(1, math.ceil(max(need, 0) / advance_samples(settings, params)))


@contextlib.contextmanager
def _audio_stream(engine: Engine) -> Iterator[None]:
    """On CUDA, the audio kernels (CuPy) in a non-blocking stream of their own, so they
    overlap the diffusion on torch's stream. The stream comes from the process's pool
    (:func:`audio_cuda_stream`) and goes back to it when the session ends.

    Contracts relied on: CuPy's ``Stream(non_blocking=True)`` does not synchronize with
    the legacy default stream torch computes on, and ``with stream:`` makes it the
    current stream of this thread only (``cupy.cuda.Stream`` reference). The image row
    reaches CuPy through DLPack (``kernels.xp.as_array``): ``cupy.from_dlpack`` hands its
    current stream to ``Tensor.__dlpack__(stream=...)``, which makes that stream wait for
    torch's current one (torch 2.13 ``_tensor.py``), so the pixels torch rounds in this
    thread are written before CuPy reads them; the diffusion thread synchronizes its own
    stream before handing the row over. ``to_numpy`` (``.get()``) ends each clip's audio
    synchronously. Covered by ``test_pipelined_stream_on_cuda_equals_its_one_shot_runs``."""
    if engine.backend.device != "cuda":
        yield
        return
    with audio_cuda_stream() as stream:
        try:
            with stream:
                yield
        finally:
            stream.synchronize()


_free_audio_streams: dict[int, list[Any]] = {}  # device -> streams no session holds
_audio_streams_lock = threading.Lock()


@contextlib.contextmanager
def audio_cuda_stream() -> Iterator[Any]:
    """A CuPy stream for one session's audio kernels on the current device, taken from the
    process's pool of them and given back after: streams are made only when every one is
    held, and never destroyed, so there are at most as many as sessions ever ran at once.

    CuPy's memory pool keeps freed blocks per stream (``SingleDeviceMemoryPool._arenas``,
    keyed by the stream's pointer, cupy/cuda/memory.pyx 14.x): a freed block goes back to
    the arena of the stream it was allocated on and serves that stream only, and
    ``Stream.__del__`` leaves its arena in the pool. A new stream per session would strand
    its blocks when the session ends; a reused stream reuses its arena."""
    import cupy

    device = cupy.cuda.Device().id
    with _audio_streams_lock:
        free = _free_audio_streams.setdefault(device, [])
        stream = free.pop() if free else cupy.cuda.Stream(non_blocking=True)
    try:
        yield stream
    finally:
        with _audio_streams_lock:
            _free_audio_streams[device].append(stream)
