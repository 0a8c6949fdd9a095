"""What the engine checks of a request before any compute: its width against the model's
range and Griffin-Lim's fewest columns, its seed image and mask, its prompts; and an
allocation the machine cannot make, as one error."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from ...export.manifest import ModelShape
from ...kernels.errors import RiffusionError
from ...kernels.griffin_lim import GriffinLimOptions, min_frames
from ...kernels.image import IMAGE_MODES
from ...kernels.params import SpectrogramParams
from .prompts import Tokens
from .requests import PromptInput, Request, leaves

GRAYSCALE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


def fewest_columns(params: SpectrogramParams, options: GriffinLimOptions, multiple: int) -> int:
    """The narrowest image, in ``multiple``-pixel steps, that Griffin-Lim reconstructs."""
    return -(-min_frames(params, options) // multiple) * multiple


def check_finite(image: Any) -> None:
    """One clear error where the decoded spectrograms hold NaN or inf, which every backend
    would otherwise turn into a black image and full-scale noise, written with exit 0. The
    inputs that cause it are checked where they are given (a LoRA's weights and scale, a
    prompt's emphasis); what is left is the model's own overflow, in reduced precision."""
    import torch

    if not bool(torch.isfinite(image).all()):
        raise RiffusionError(
            "the model's output holds NaN or inf values (the decoded spectrogram): its weights or a "
            "reduced precision overflowed; try --precision fp32, a smaller LoRA scale or a milder emphasis"
        )


class RequestChecks:
    """The checks of :class:`~.pipeline.Engine`: each raises RiffusionError, naming the
    range and how to change it, for what the engine cannot run."""

    backend: Any
    shape: ModelShape
    params: SpectrogramParams
    griffin_lim: GriffinLimOptions
    widen: str  # how to take a wider clip than the shape allows

    def _tokens(self, text: str, *, allow_empty: bool, what: str) -> Tokens:
        raise NotImplementedError

    def check(self, request: Request) -> None:
        """Raise RiffusionError for a request this engine cannot run, before any compute."""
        self.check_images(request)
        if not self.shape.guidance and request.blend.guidance > 1:
            raise RiffusionError(
                f"guidance {request.blend.guidance:g}: this {self.backend.name} export was made for "
                "guidance off (one UNet row per clip, as few-step LoRAs run); use guidance <= 1"
            )
        for end in (request.start, request.end):
            if end is not None:
                for prompt in leaves(end):
                    self.check_prompt(prompt)

    def check_prompt(self, prompt: PromptInput) -> None:
        """Raise RiffusionError for a prompt input whose texts this engine cannot encode."""
        self.check_text(prompt.prompt)
        if prompt.negative_prompt is not None:
            self.check_text(prompt.negative_prompt, negative=True)

    def check_images(self, request: Request) -> None:
        """The part of :meth:`check` that is not the prompts: width, seed image and mask."""
        self.check_width(request.width)
        for name in ("seed_image", "mask"):
            image = getattr(request, name)
            if image is None:
                continue
            if not hasattr(image, "size") or not hasattr(image, "mode"):
                raise RiffusionError(f"{name} must be a PIL image, got {type(image).__name__}")
            modes = GRAYSCALE_MODES if name == "mask" else IMAGE_MODES  # seed images: image-to-audio's rule
            if image.mode not in modes:
                raise RiffusionError(f"{name} has mode {image.mode}; use one of {', '.join(modes)}")
            if tuple(image.size) != (request.width, self.shape.height):
                raise RiffusionError(
                    f"{name} is {image.size[0]}x{image.size[1]}; this clip is "
                    f"{request.width}x{self.shape.height}"
                )

    @property
    def widths(self) -> tuple[int, int | None]:
        """The narrowest and widest clip (pixels) this engine takes (None: no upper bound):
        the backend's range, and at least the fewest columns Griffin-Lim reconstructs."""
        low, high = self.shape.widths or (0, None)
        return max(low, self._fewest_columns()), high

    def _fewest_columns(self) -> int:
        return fewest_columns(self.params, self.griffin_lim, self.shape.pixel_multiple)

    def check_width(self, width: int) -> None:
        """Raise RiffusionError, naming the range and how to change it, for a width this
        engine cannot run; before anything is allocated."""
        multiple = self.shape.pixel_multiple
        if width % multiple:
            raise RiffusionError(
                f"width {width} is not a multiple of {multiple} pixels, which this "
                f"{self.backend.name} backend's model takes"
            )
        low, high = self.widths
        profile = self.shape.widths is not None and self.widen.startswith("export")
        if profile and not low <= width <= (high or width):
            allowed = f"{low} pixels" if low == high else f"{low}..{high} pixels"
            hint = f"--max-width {width} for longer" if width > low else f"--width {width} for shorter"
            raise RiffusionError(
                f"width {width} is outside this {self.backend.name} export's profile: it takes "
                f"{allowed} (export with {hint} clips)"
            )
        if width < low:
            if low == self._fewest_columns():
                why = "the fewest columns Griffin-Lim reconstructs"
            elif self.widen.startswith("export"):
                why = "its export's profile"
            else:  # an export made on first use, at its default widths
                torch = fewest_columns(self.params, self.griffin_lim, 8)  # any multiple of 8
                why = (
                    "the profile of the export made on first use; --backend torch takes clips down to "
                    f"{torch} pixels, or export with --width {width}"
                )
            raise RiffusionError(
                f"width {width} is below the narrowest clip this engine takes: {low} pixels "
                f"({low / 100:g} s; {why})"
            )
        if high is not None and width > high:
            raise over_widest(width, high, self.widen)

    def check_text(self, text: str, *, negative: bool = False, what: str | None = None) -> None:
        """Raise RiffusionError (saying ``what`` it is) for a prompt this engine cannot encode."""
        what = what or ("negative prompt" if negative else "prompt")
        self._tokens(text, allow_empty=negative, what=what)


def over_widest(width: int, widest: int, widen: str = "--max-width {width}") -> RiffusionError:
    """The error for a width over a model source's widest clip, saying how to raise it."""
    return RiffusionError(
        f"width {width} is over this engine's widest clip, {widest} pixels "
        f"({widest / 100:g} s); {widen.format(width=width)} raises it"
    )


@contextlib.contextmanager
def memory_bound(width: int, clips: int) -> Iterator[None]:
    """An allocation the machine cannot make (attention grows with the square of the width)
    as one clear error rather than a runtime's traceback."""
    try:
        yield
    except MemoryError as exc:
        raise RiffusionError(too_wide(width, clips, exc)) from exc
    except RuntimeError as exc:  # torch (CPU allocator, CUDA OutOfMemoryError), ONNX Runtime
        text = str(exc).lower()
        needles = ("out of memory", "not enough memory", "bad_alloc", "failed to allocate memory")
        if not any(needle in text for needle in needles):
            raise
        raise RiffusionError(too_wide(width, clips, exc)) from exc


def too_wide(width: int, clips: int, exc: BaseException) -> str:
    asked = re.search(r"buffer of size (\d+)", str(exc))  # ONNX Runtime's arena says what it asked for
    if asked is not None:
        said = f"one buffer of {int(asked.group(1)) / 2**30:.1f} GiB"
    else:
        said = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return (
        f"{clips} clip(s) of {width} pixels need more memory than this machine has ({said}); "
        "use a smaller --width or fewer clips per batch"
    )
