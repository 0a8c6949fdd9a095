"""The web app's alpha walk, and the inputs of a clip that continues the one before."""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

import numpy as np

from ..runtime.requests import MAX_SEED, Blend, Point, PromptInput, Request
from .settings import StreamSettings

WHEN = ("wrap", "now", "jump")  # when a queued prompt takes over the walk
MAX_BLEND_DEPTH = 8  # a start steered from a blend of blends ... keeps this many levels


class Walk:
    """The web app's alpha walk (module docstring): which request comes next."""

    def __init__(self, start: Point, end: PromptInput | None, settings: StreamSettings) -> None:
        self.settings = settings
        self.start, self.end = start, end if end is not None else _next_seed(start)
        self.alpha = 0.0
        self.upcoming: deque[PromptInput] = deque()
        self.seed_image: Any = None
        self.mask: Any = None

    def queue(self, prompt: PromptInput) -> None:
        self.upcoming.append(prompt)

    def steer(self, point: Point, prompt: PromptInput, *, jump: bool = False) -> None:
        """Walk from ``point`` (where the music is) to ``prompt`` from the next clip on: at
        alpha ``alpha_step`` (already on its way), or at alpha 1 with ``jump`` (the
        prompt's own clip). Prompts queued for the wrap are dropped: this one replaces them."""
        self.start, self.end = shallow(point, MAX_BLEND_DEPTH - 1), prompt
        self.alpha = 1.0 if jump else min(self.settings.alpha_step, 1.0)
        self.upcoming.clear()

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


def shallow(point: Point, depth: int) -> Point:
    """``point`` with at most ``depth`` nested blends: deeper ones (steered many times in a
    row) become the prompt input they are nearest, which holds the least of the mix."""
    if not isinstance(point, Blend):
        return point
    if depth <= 0:
        return shallow(point.start if point.alpha < 0.5 else point.end, 0)
    return Blend(shallow(point.start, depth - 1), point.end, point.alpha)


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


def keep_columns(image: Any, previous: Any, columns: int) -> Any:
    """``image`` (batch row, height x width x 3 in [0, 1]) with its first ``columns``
    columns set to ``previous``'s last ones, exactly (after rounding to 8-bit pixels)."""
    import torch

    width = previous.size[0]
    tail = np.asarray(previous.convert("RGB"), dtype=np.float32)[:, width - columns :] / 255.0
    image = image.clone()
    image[:, :columns] = torch.from_numpy(tail).to(image.device, image.dtype)
    return image
