"""The stream: a diffusion thread, an optional audio thread and a bounded buffer."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from ...kernels.errors import RiffusionError
from ...kernels.joins import Joiner
from ..runtime.defaults import SEED_IMAGE, WIDTH
from ..runtime.pipeline import Engine
from ..runtime.requests import Blend, Cancelled, PromptInput, Request
from ..runtime.seeds import seed_image as builtin_seed_image
from .settings import Runner, StreamChunk, StreamSettings, check_joins, length_samples, overlap_samples
from .walk import WHEN, Walk, continuation_inputs, keep_columns


@dataclasses.dataclass(frozen=True)
class _Made:
    """What a steer rewinds to: the stream just after one clip was made."""

    request: Request  # the clip's request (its point is where the music is)
    tail: Any  # the joiner's held tail after it
    position: int  # the joiner's samples emitted after it
    picture: Any  # its image, which a continuation clip keeps columns of


class Stream:
    """An endless stream of clips from an :class:`Engine` (module docstring).

    Iterate it for :class:`StreamChunk`\\ s; :meth:`queue` a prompt (at the next wrap, or
    now), :meth:`update` the pair, seed image or mask, :meth:`pause`, :meth:`resume` and
    :meth:`stop` it from any thread. ``max_clips`` stops it after that many clips (None:
    endless)."""

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
        check_joins(self.settings, engine.params)  # before any clip: a clip too short for its joins
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
        self.clips_started = 0  # the index of the next request handed to the runner
        self.clips_made = 0  # clips turned into audio (kept ones: a steer drops the rest)
        self.generation = 0  # bumped by each steer: clips of an older one are dropped
        self.delivered = -1  # the last clip iteration handed out
        self._history: dict[int, _Made] = {}  # recent clips made, by index
        self._last_made = False  # max_clips were made: a steer has nothing to remake
        self._previous_image: Any = None
        self._first: Request = self.walk.peek()
        self._last: Request = self._first
        self._threads = [threading.Thread(target=self._diffuse, name="stream-diffusion", daemon=True)]
        if self.pipelined:
            self._threads.append(threading.Thread(target=self._audio_loop, name="stream-audio", daemon=True))
        for thread in self._threads:
            thread.start()

    @classmethod
    def open(
        cls,
        engine: Engine,
        start: PromptInput | str,
        end: PromptInput | str | None = None,
        *,
        seed_image: Any = SEED_IMAGE,
        mask: Any = None,
        max_clips: int | None = None,
        **settings: Any,
    ) -> Stream:
        """A stream walking from ``start`` to ``end`` and on, as Riffusion's web app does:
        prompts may be strings; ``seed_image`` is a built-in seed image id (the web app's
        ``og_beat`` by default, made as wide as the clips), a PIL image or None (text to
        clip); ``settings`` are :class:`StreamSettings` fields (steps and scheduler by
        default the engine's profile's)."""

        def prompt_input(value: PromptInput | str) -> PromptInput:
            # A prompt given as text runs at the engine's profile's guidance (7, or off).
            return PromptInput(value, guidance=engine.guidance) if isinstance(value, str) else value

        # Steps and scheduler left out are the engine's profile's.
        settings.setdefault("steps", engine.steps)
        settings.setdefault("scheduler", engine.scheduler)

        fields = {f.name for f in dataclasses.fields(StreamSettings)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise RiffusionError(
                f"unknown stream setting {unknown[0]!r}; choose from {', '.join(sorted(fields))}"
            )
        if isinstance(seed_image, str):  # made as wide as the clips: a width the engine takes
            width = settings.get("width", WIDTH)
            if isinstance(width, int):
                engine.check_width(width)
            seed_image = builtin_seed_image(seed_image, engine.params, width=width)
        return cls(
            engine,
            prompt_input(start),
            None if end is None else prompt_input(end),
            settings=StreamSettings(**settings),
            seed_image=seed_image,
            mask=mask,
            max_clips=max_clips,
        )

    # -- control, from any thread -------------------------------------------------

    def check(self, request: Request) -> None:
        """RiffusionError for a request of this stream the engine cannot run."""
        self.engine.check(request)

    def queue(
        self, prompt: PromptInput, when: str = "wrap", *, now: bool = False, after: int | None = None
    ) -> None:
        """Steer the walk to ``prompt`` (``now=True`` is ``when="now"``):

        - ``"wrap"``: it becomes the end at the next wrap (after those queued before it);
        - ``"now"``: the next clip not yet made walks from where the music is (the point of
          clip ``after``, by default the last one iteration handed out) to ``prompt``, at
          alpha ``alpha_step``, already on its way;
        - ``"jump"``: the next clip is ``prompt``'s own (alpha 1).

        ``now`` and ``jump`` drop the clips made after ``after`` and the one denoising
        (it stops at its next step) and make them again; the joins and a continuation
        go on from clip ``after``. They replace the prompts queued for the wrap."""
        when = "now" if now else when
        if when not in WHEN:
            raise RiffusionError(f"when must be one of {', '.join(WHEN)}, got {when!r}")
        self.engine.check_prompt(prompt)
        with self._lock:
            if when == "wrap":
                self.walk.queue(prompt)
                return
            if self._last_made or self.stopped:
                raise RiffusionError("the stream has made its last clip: there is nothing to steer")
            after = self.delivered if after is None else after
            if not isinstance(after, int) or not -1 <= after <= self.delivered:
                raise RiffusionError(f"after must be a clip handed out, -1..{self.delivered}, got {after!r}")
            made = self._history.get(after)
            if after >= 0 and made is None:
                raise RiffusionError(f"clip {after} is too old to steer from")
            self.generation += 1
            if made is None:  # nothing kept: from the stream's start
                self.joiner.tail, self.joiner.position = None, 0
                self._previous_image, self._last, point = None, self._first, self._first.start
            else:
                self.joiner.tail, self.joiner.position = made.tail, made.position
                self._previous_image, self._last = made.picture, made.request
                point = Blend.point(made.request.start, made.request.end, made.request.alpha)
            self.clips_started = self.clips_made = after + 1
            self.delivered = after
            self.walk.steer(point, prompt, jump=when == "jump")

    def current(self, chunk: StreamChunk) -> bool:
        """Whether ``chunk`` still belongs to the stream (no steer dropped it since)."""
        return chunk.generation == self.generation

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
            with self._lock:
                if not self.current(item):
                    continue  # made before a steer
                self.delivered = max(self.delivered, item.index)
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

    def _put(self, target: queue.Queue[Any], item: Any, generation: int | None = None) -> bool:
        """Put ``item``, waiting for room; False once stopped (the item is dropped). An
        item of ``generation`` is dropped once a steer makes it stale (True: go on)."""
        while not self._stopped.is_set():
            if generation is not None and generation != self.generation:
                return True
            try:
                target.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _next_requests(self) -> tuple[list[Request], int, int]:
        """The next requests, the index of the first and the generation they belong to."""
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
            first = self.clips_started
            self.clips_started += len(requests)
            self._last_made = not requests  # max_clips reached: the thread ends
            return requests, first, self.generation

    def _diffuse(self) -> None:
        target = self._images if self.pipelined else None
        try:
            while not self._stopped.is_set():
                self._resumed.wait()
                if self._stopped.is_set():
                    break
                requests, first, generation = self._next_requests()
                if not requests:
                    break
                deadlines = [self._deadline(first + i) for i in range(len(requests))]
                timings: dict[str, float] = {}
                begin = time.perf_counter()

                def stale(generation: int = generation) -> bool:
                    return self._stopped.is_set() or generation != self.generation

                try:
                    images = self._runner(requests, deadlines, stale)
                except Cancelled:
                    if self._stopped.is_set() or generation == self.generation:
                        raise
                    continue  # steered: the next requests walk the new way
                timings["diffusion"] = time.perf_counter() - begin
                for index, (request, image) in enumerate(zip(requests, images, strict=True), first):
                    picture = None
                    with self._lock:
                        if generation != self.generation:
                            break
                        if self.settings.continuation:
                            if self._previous_image is not None:
                                image = keep_columns(
                                    image, self._previous_image, self.settings.continuation_columns
                                )
                            self._previous_image = picture = self.engine.picture(image)
                    if self.pipelined and self.engine.backend.device == "cuda":
                        import torch

                        torch.cuda.current_stream().synchronize()  # the audio thread reads it
                    item = (index, generation, request, image, dict(timings), picture)
                    if target is not None:
                        if not self._put(target, item, generation):
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

    def _audio(self, item: tuple[int, int, Request, Any, dict[str, float], Any]) -> bool:
        index, generation, request, image, timings, picture = item
        if generation != self.generation:
            return True  # steered since: dropped
        clip = self.engine.to_clip(image, timings)
        with self._lock:
            if generation != self.generation:
                return True
            audio, start = self.joiner.add(clip.audio)
            self.clips_made = index + 1
            self._last = request
            self._history[index] = _Made(request, self.joiner.tail, self.joiner.position, picture)
            for old in [i for i in self._history if i < self.delivered - 24]:  # a client's buffer is <= 16
                del self._history[old]
        chunk = StreamChunk(
            index, audio, self.sample_rate, start / self.sample_rate, request, clip, generation=generation
        )
        return self._put(self._out, chunk, generation)

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
                generation=self.generation,
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
