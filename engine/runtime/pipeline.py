"""The chain: prompts -> text embeddings -> denoising loop -> VAE -> spectrogram -> audio.

One loop serves every mode Riffusion has; the modes are parameters:

- text to clip: pure noise, all the scheduler's steps;
- interpolation: a start and an end :class:`PromptInput` blended at ``alpha`` — text
  embeddings (negative prompts included), guidance and denoising linearly, the two
  seeds' noise by spherical interpolation;
- seed image: VAE-encode it (the posterior sampled with the start seed, scaled by
  0.18215; the tiny VAE encodes without sampling), noise it to step
  ``int(steps * denoising)`` from the end and denoise from there, as diffusers' img2img does;
- mask: a grayscale image downsampled 8x to latent size, white = regenerate,
  black = keep; after each step the kept regions are reset to the seed image's latents
  noised to the level the latents are now at (un-noised after the last step), as
  diffusers' legacy inpainting does.

Requests that share a shape, step count and scheduler run as one batch (one UNet call
per step for all of them, unconditional and conditional rows together); each result
equals the same request run alone. With DeepCache (``deep_cache.py``) the steps between
full UNet calls run its shallow branch on the feature the batch's last full call kept.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...export.manifest import ModelShape
from ...export.specs import FEATURE, SHALLOW
from ...kernels.errors import RiffusionError
from ...kernels.griffin_lim import GriffinLimOptions
from ...kernels.params import DEFAULT_MAX_VALUE, SpectrogramParams
from .backends import Backend
from .checks import RequestChecks, check_finite, memory_bound
from .deep_cache import DeepCache
from .defaults import WIDTH
from .profiles import DEFAULT_PROFILE, Choices
from .prompts import Tokens, apply_weights, tokenize
from .requests import (
    SCHEDULERS,
    STEP_OPTIONS,
    Blend,
    Cancelled,
    Clip,
    Point,
    PromptInput,
    Request,
    first_step,
    leaves,
)
from .tensors import image_batch, mask_tensor, slerp, to_pixels

log = logging.getLogger(__name__)

# Rows a CPU runs a stage at, at most (see Engine._in_parts): one clip with guidance.
CPU_ROWS = {"text_encoder": 1, "unet": 2, SHALLOW: 2, "vae_encoder": 1, "vae_decoder": 1}


class Engine(RequestChecks):
    """Riffusion on a backend: requests in, clips out."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Any,
        scheduler_config: dict[str, Any],
        shape: ModelShape,
        *,
        params: SpectrogramParams | None = None,
        griffin_lim: GriffinLimOptions | None = None,
        cache_size: int = 256,
        choices: Choices | None = None,
        deep_cache: DeepCache | None = None,
    ) -> None:
        if deep_cache is not None and deep_cache.branch != backend.deep_cache_branch:
            made = backend.deep_cache_branch
            has = f"branch {made}'s" if made is not None else "none"
            raise RiffusionError(
                f"--deep-cache {deep_cache} runs the UNet's DeepCache stages for branch "
                f"{deep_cache.branch}; this {backend.name} backend has {has}: export with "
                f"--deep-cache {deep_cache} (or leave BRANCH out to run the export's own)"
            )
        self.backend = backend
        self.deep_cache = deep_cache  # DeepCache's schedule (None: every step a full UNet call)
        self.choices = choices  # what it was loaded with; its request defaults below
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.shape = shape
        self.params = params or SpectrogramParams()
        self.griffin_lim = griffin_lim or GriffinLimOptions()
        self.cache_size = cache_size
        self._embeddings: OrderedDict[tuple[str, bool], Any] = OrderedDict()
        self._tokenizer_lock = threading.Lock()
        # How to take a wider clip than the shape allows: an export's widths are its own.
        self.widen = "export with --max-width {width}"
        if self.params.num_frequencies != shape.height:
            raise RiffusionError(
                f"the spectrogram has {self.params.num_frequencies} mel bins; images are {shape.height} tall"
            )

    @classmethod
    def from_export(
        cls,
        backend: Backend,
        directory: Path,
        *,
        choices: Choices | None = None,
        deep_cache: DeepCache | None = None,
    ) -> Engine:
        """An engine over a backend that runs the export ``directory``: its tokenizer,
        scheduler config and sizes come from the directory and its manifest."""
        import json

        from transformers import CLIPTokenizer

        shape = backend.manifest.model_shape()  # type: ignore[attr-defined]
        tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
        scheduler_config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
        return cls(backend, tokenizer, scheduler_config, shape, choices=choices, deep_cache=deep_cache)

    # -- public API ---------------------------------------------------------------

    @property
    def scheduler(self) -> str:
        """The scheduler a request left unset runs: the profile's (PNDM by default)."""
        return (self.choices or DEFAULT_PROFILE).scheduler

    @property
    def steps(self) -> int:
        return (self.choices or DEFAULT_PROFILE).steps

    @property
    def guidance(self) -> float:
        return (self.choices or DEFAULT_PROFILE).guidance

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        width: int = WIDTH,
        scheduler: str | None = None,
        seed_image: Any = None,
        denoising: float = 0.75,
        mask: Any = None,
        progress: bool = False,
    ) -> Clip:
        """One clip from a prompt (optionally from a seed image and a mask). Steps,
        guidance and scheduler left None are the engine's profile's (by default 50 PNDM
        steps at guidance 7)."""
        guidance = self.guidance if guidance is None else guidance
        start = PromptInput(prompt, seed, negative_prompt, guidance, denoising)
        request = Request(
            start,
            steps=self.steps if steps is None else steps,
            width=width,
            scheduler=self.scheduler if scheduler is None else scheduler,
            seed_image=seed_image,
            mask=mask,
        )
        return self.run([request], progress=progress)[0]

    def riffuse(
        self,
        start: PromptInput,
        end: PromptInput | None = None,
        alpha: float = 0.0,
        *,
        steps: int | None = None,
        width: int = WIDTH,
        scheduler: str | None = None,
        seed_image: Any = None,
        mask: Any = None,
        progress: bool = False,
    ) -> Clip:
        """Riffusion's interpolation form: ``start`` and ``end`` blended at ``alpha``
        (steps and scheduler left None are the engine's profile's)."""
        steps = self.steps if steps is None else steps
        scheduler = self.scheduler if scheduler is None else scheduler
        request = Request(start, end, alpha, steps, width, scheduler, seed_image, mask)
        return self.run([request], progress=progress)[0]

    def run(
        self,
        requests: Sequence[Request],
        *,
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Clip]:
        """Clips for requests that share a batch key (see Request.batch_key).

        ``should_stop`` is asked before every UNet step; when it answers true the run
        raises Cancelled (a server drops a batch whose requests all timed out)."""
        timings: dict[str, float] = {}
        images = self.images(requests, progress=progress, timings=timings, should_stop=should_stop)
        return [self.to_clip(image, dict(timings)) for image in images]

    def images(
        self,
        requests: Sequence[Request],
        *,
        progress: bool = False,
        timings: dict[str, float] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Any:
        """The decoded spectrogram images ``(batch, height, width, 3)`` float in [0, 1]
        (a torch tensor on the backend's device)."""
        timings = {} if timings is None else timings
        if not requests:
            raise RiffusionError("no requests")
        keys = {r.batch_key() for r in requests}
        if len(keys) != 1:
            raise RiffusionError(
                "requests in one batch must share steps, width, scheduler and seed-image step"
            )
        if self.shape.max_batch is not None and len(requests) > self.shape.max_batch:
            raise RiffusionError(
                f"{len(requests)} clips in one batch; this {self.backend.name} backend's model takes "
                f"at most {self.shape.max_batch}"
            )
        for request in requests:
            self.check(request)
        with memory_bound(requests[0].width, len(requests)):
            latents = self.denoise(
                list(requests), progress=progress, timings=timings, should_stop=should_stop
            )
            with _timer(timings, "vae_decoder", self.backend):
                image = self._in_parts("vae_decoder", {"latent": latents})
        check_finite(image)
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    # -- the chain ----------------------------------------------------------------

    def _tokens(self, text: str, *, allow_empty: bool, what: str) -> Tokens:
        # Fast tokenizers refuse concurrent calls: a server checks requests while a batch runs.
        with self._tokenizer_lock:
            return tokenize(self.tokenizer, text, allow_empty=allow_empty, what=what)

    def encode(self, texts: Sequence[str], *, negative: bool = False) -> Any:
        """Text embeddings ``(len(texts), tokens, hidden)``, cached by text."""
        import torch

        missing = [t for t in dict.fromkeys(texts) if (t, negative) not in self._embeddings]
        if missing:
            what = "negative prompt" if negative else "prompt"
            tokens = [self._tokens(t, allow_empty=negative, what=what) for t in missing]
            ids = torch.from_numpy(np.stack([t.ids for t in tokens])).to(self.backend.torch_device())
            embeddings = self._in_parts("text_encoder", {"input_ids": ids})
            for text, token, embedding in zip(missing, tokens, embeddings, strict=True):
                if token.weighted:
                    weights = torch.from_numpy(token.weights).to(embedding.device)
                    embedding = apply_weights(embedding[None], weights[None])[0]
                self._embeddings[(text, negative)] = embedding
                while len(self._embeddings) > self.cache_size:
                    self._embeddings.popitem(last=False)
        for text in texts:
            self._embeddings.move_to_end((text, negative))
        return torch.stack([self._embeddings[(t, negative)] for t in texts])

    def _embeddings_at_alpha(self, requests: list[Request], *, negative: bool) -> Any:
        import torch

        def text(p: PromptInput) -> str:
            return (p.negative_prompt or "") if negative else p.prompt

        if all(isinstance(r.start, PromptInput) for r in requests):
            start = self.encode([text(r.start) for r in requests], negative=negative)
            if all(r.end is None for r in requests):
                return start
            end = self.encode([text(r.end or r.start) for r in requests], negative=negative)
            alpha = self._column([r.alpha if r.end is not None else 0.0 for r in requests], start.ndim)
            return torch.lerp(start, end, alpha)  # exactly start at 0 and end at 1
        # A steered stream's clip starts from a blend: every text encoded in one batch
        # (then cached), each point the same lerps a clip at its alpha makes.
        self.encode(
            list(dict.fromkeys(text(p) for r in requests for p in leaves(r.blend))), negative=negative
        )

        def at(point: Point) -> Any:
            if isinstance(point, Blend):
                return torch.lerp(at(point.start), at(point.end), point.alpha)
            return self.encode([text(point)], negative=negative)[0]

        return torch.stack([at(r.blend) for r in requests])

    def _column(self, values: Sequence[float], ndim: int) -> Any:
        import torch

        shape = (len(values),) + (1,) * (ndim - 1)
        return torch.tensor(values, dtype=torch.float32, device=self.backend.torch_device()).reshape(shape)

    def make_scheduler(self, name: str) -> Any:
        import diffusers

        class_name, overrides = SCHEDULERS[name]
        # The whole config, bookkeeping keys included: from_config uses them to let another
        # scheduler class keep its own defaults where the checkpoint's class used defaults.
        cls = getattr(diffusers, class_name)
        # Less the keys this class does not take (PNDM's skip_prk_steps for LCM), which
        # diffusers would warn about on every clip.
        accepted = inspect.signature(cls.__init__).parameters
        config = {k: v for k, v in self.scheduler_config.items() if k.startswith("_") or k in accepted}
        scheduler = cls.from_config({**config, **overrides})
        # diffusers' Stable Diffusion pipelines correct two legacy settings of SD 1.x
        # configs when they are built; so does the engine, to run the same schedule.
        fixes = {}
        if getattr(scheduler.config, "steps_offset", 1) != 1:
            fixes["steps_offset"] = 1
        if getattr(scheduler.config, "clip_sample", False) is True:
            fixes["clip_sample"] = False
        return cls.from_config(scheduler.config, **fixes) if fixes else scheduler

    def _noise(self, requests: list[Request], shape: tuple[int, ...]) -> tuple[Any, Any, list[Any]]:
        """Per request: the posterior draws for a seed image, the slerped noise, and the
        start seed's generator (drawn in that order from it, as diffusers does)."""
        import torch

        generators, eps, noise = [], [], []

        def at(point: Point, generator: Any) -> Any:
            # A blend's noise is the slerp its clip drew: the start's from ``generator``
            # (after the posterior draws), each end's from a fresh generator of its seed.
            if isinstance(point, Blend):
                b = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(point.end.seed))
                return slerp(point.alpha, at(point.start, generator), b)
            return torch.randn(shape, generator=generator)

        for request in requests:
            generator = torch.Generator("cpu").manual_seed(request.start.seed)
            if request.seed_image is not None and self.shape.sampled_vae:
                eps.append(torch.randn(shape, generator=generator))
            a = at(request.start, generator)
            if request.end is not None and request.alpha > 0:
                b = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(request.end.seed))
                a = slerp(request.alpha, a, b)
            noise.append(a)
            generators.append(generator)
        device = self.backend.torch_device()
        eps_batch = torch.stack(eps).to(device) if eps else None
        return eps_batch, torch.stack(noise).to(device), generators

    def denoise(
        self,
        requests: Sequence[Request],
        *,
        progress: bool = False,
        timings: dict[str, float] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Any:
        """The final latents ``(batch, 4, h, w)`` of requests that share a batch key."""
        import torch
        from tqdm.auto import tqdm

        requests = list(requests)
        timings = {} if timings is None else timings
        first = requests[0]
        device = self.backend.torch_device()
        latent_shape = (
            self.shape.latent_channels,
            self.shape.height // self.shape.vae_factor,
            first.width // self.shape.vae_factor,
        )
        blends = [r.blend for r in requests]
        guidance = [b.guidance for b in blends]
        cfg = any(g > 1 for g in guidance)
        with _timer(timings, "text_encoder", self.backend):
            cond = self._embeddings_at_alpha(requests, negative=False)
            embeddings = (
                torch.cat([self._embeddings_at_alpha(requests, negative=True), cond]) if cfg else cond
            )

        scheduler = self.make_scheduler(first.scheduler)
        scheduler.set_timesteps(first.steps, device=device)
        timesteps = scheduler.timesteps
        eps, noise, generators = self._noise(requests, latent_shape)
        init = mask = None
        if first.seed_image is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            start = first_step(first.steps, blends[0].denoising) * scheduler.order
            timesteps = timesteps[start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            image = image_batch([r.seed_image for r in requests]).to(device)
            inputs = {"image": image, "noise": eps} if self.shape.sampled_vae else {"image": image}
            with _timer(timings, "vae_encoder", self.backend):
                init = self._in_parts("vae_encoder", inputs)
            if len(timesteps):
                latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(requests)))
            else:
                latents = init
            if any(r.mask is not None for r in requests):
                mask = torch.stack([mask_tensor(r.mask, latent_shape) for r in requests]).to(device)

        step_kwargs = dict(STEP_OPTIONS.get(first.scheduler, {}))
        step_parameters = inspect.signature(scheduler.step).parameters
        if "generator" in step_parameters:  # ancestral samplers draw per request, seeded
            step_kwargs["generator"] = generators[0] if len(requests) == 1 else generators
        scale = self._column(guidance, 4)
        deep, feature, full_calls = self.deep_cache, None, 0
        bar = tqdm(timesteps, desc="denoising", unit="step", disable=not progress, leave=False)
        # "unet": the denoising loop, UNet calls with the guidance and scheduler steps between
        # them, timed as one stage: the device is synchronized at its ends only, not per step.
        with _timer(timings, "unet", self.backend):
            for i, t in enumerate(bar):
                if should_stop is not None and should_stop():
                    raise Cancelled(f"stopped before step {i + 1} of {len(timesteps)}")
                rows = torch.cat([latents] * 2) if cfg else latents
                rows = scheduler.scale_model_input(rows, t)
                timestep = t.to(device=device, dtype=torch.float32).expand(rows.shape[0]).contiguous()
                inputs = {"sample": rows, "timestep": timestep, "encoder_hidden_states": embeddings}
                if deep is not None and feature is not None and not deep.full(i):
                    predicted = self._in_parts(SHALLOW, {**inputs, FEATURE: feature})
                else:
                    predicted = self._in_parts("unet", inputs)
                    full_calls += 1
                    if isinstance(predicted, tuple):  # DeepCache's UNet: the feature besides
                        predicted, returned = predicted
                        feature = returned if deep is not None else None
                if cfg:
                    uncond, text = predicted.chunk(2)
                    predicted = uncond + scale * (text - uncond)
                latents = scheduler.step(predicted, t, latents, **step_kwargs, return_dict=False)[0]
                if mask is not None:
                    if i + 1 < len(timesteps):
                        level = timesteps[i + 1 : i + 2].repeat(len(requests))
                        kept = scheduler.add_noise(init, noise, level)
                    else:
                        kept = init
                    # Requests without a mask regenerate everywhere.
                    latents = kept * (1 - mask) + latents * mask
        timings["unet_steps"] = len(timesteps)
        timings["unet_full_calls"] = full_calls
        return latents

    def _in_parts(self, stage: str, inputs: dict[str, Any]) -> Any:
        """A stage over a batch, in parts of at most the rows the backend's export takes
        (its profile's batch maximum, :meth:`Backend.max_rows`) on every device: a blend's
        leaf texts, or a batch of streams' uncached prompts, can outnumber the text
        encoder's ``per_clip x max_batch`` rows, which TensorRT refuses outright.

        On the CPU the parts are smaller still, ``CPU_ROWS[stage]`` rows: activations grow
        with the batch (the VAE's at full resolution are GBs per clip at full size; the
        UNet's attention is the next largest), while a larger batch buys little speed on
        CPU cores (1.04x for 8 UNet rows, docs/performance.md), so the peak memory does not
        grow with ``--max-batch``. A GPU takes what the export allows in one call. Rows are
        independent in every stage, so the parts make the batch's result."""
        import torch

        batch = next(iter(inputs.values())).shape[0]
        rows = CPU_ROWS.get(stage, batch) if self.backend.device == "cpu" else batch
        limit = self.backend.max_rows(stage)
        rows = rows if limit is None else min(rows, limit)
        if batch <= rows:
            return self.backend.run(stage, inputs)
        parts = [
            self.backend.run(stage, {k: v[i : i + rows] for k, v in inputs.items()})
            for i in range(0, batch, rows)
        ]
        if isinstance(parts[0], tuple):  # a stage with several outputs: each joined
            return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))
        return torch.cat(parts)

    def to_clip(self, image: Any, timings: dict[str, float]) -> Clip:
        """One row of :meth:`images` ``(height, width, 3)`` -> spectrogram -> audio, on the
        backend's device (``timings`` gains ``image_to_audio``)."""
        from ...kernels import xp as xpm
        from ...kernels.convert import audio_from_spectrogram
        from ...kernels.image import spectrogram_from_pixels

        begin = time.perf_counter()
        pixels = to_pixels(image)
        xp = xpm.get_xp(self.backend.device)
        mel = spectrogram_from_pixels(
            xpm.as_array(pixels, xp), self.params, max_value=DEFAULT_MAX_VALUE, xp=xp
        )
        audio = audio_from_spectrogram(mel, self.params, self.griffin_lim, device=self.backend.device)
        timings["image_to_audio"] = time.perf_counter() - begin
        return Clip(
            audio=audio, sample_rate=self.params.sample_rate, image=self._picture(pixels), timings=timings
        )

    def picture(self, image: Any) -> Any:
        """One row of :meth:`images` -> the PIL spectrogram image a clip carries, its
        parameters in the EXIF."""
        return self._picture(to_pixels(image))

    def _picture(self, pixels: Any) -> Any:
        from ...kernels.image import image_from_pixels

        return image_from_pixels(pixels.cpu().numpy(), self.params, max_value=DEFAULT_MAX_VALUE)


class _timer:
    """Adds the block's wall time to ``timings[name]``: from a device with nothing queued to
    the device having finished the block's work (``Backend.synchronize`` at both ends, so
    work queued before the block is not counted in it, nor the block's in the next)."""

    def __init__(self, timings: dict[str, float], name: str, backend: Backend) -> None:
        self.timings, self.name, self.backend = timings, name, backend

    def __enter__(self) -> None:
        self.backend.synchronize()
        self.begin = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.backend.synchronize()
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.begin
