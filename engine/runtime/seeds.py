"""Seed images and masks under the ids Riffusion's web app sends.

The seed images are spectrograms of audio this project synthesizes
(:mod:`riffusion_engine.kernels.synth`); the masks are shapes drawn here. Masks are
grayscale, white = regenerate and black = keep (gray = partly: the share of each
step's update that is kept), as :class:`~riffusion_engine.engine.runtime.pipeline.Request`
reads them. A directory of ``ID.png`` files adds ids or replaces built-in ones.

Ids are looked up in a table, never joined into a path, so an id such as ``../x``
cannot name a file outside the directory.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...kernels import synth
from ...kernels.errors import RiffusionError
from ...kernels.params import SpectrogramParams
from .defaults import WIDTH

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SIZE = WIDTH  # the built-ins are 512 x 512: 5.12 s

# id -> the audio it is the spectrogram of: (duration seconds, sample rate) -> (1, samples)
SEED_AUDIO: dict[str, Callable[[float, int], np.ndarray]] = {
    "og_beat": lambda seconds, rate: synth.drum_beat(seconds, sample_rate=rate),
    "agile": lambda seconds, rate: synth.arpeggio(seconds, sample_rate=rate),
    "marim": lambda seconds, rate: synth.marimba(seconds, sample_rate=rate),
    "motorway": lambda seconds, rate: synth.traffic(seconds, sample_rate=rate),
    "vibes": lambda seconds, rate: synth.vibraphone(seconds, sample_rate=rate),
}


def _rows(top: float, value: float) -> np.ndarray:
    """A column profile (top row first): ``value`` over the top ``top`` share, 0 below."""
    return np.where(np.arange(SIZE) < round(top * SIZE), value, 0.0)


def _gradient(top_value: float, bottom_value: float = 0.0) -> np.ndarray:
    return np.linspace(top_value, bottom_value, SIZE)


def _beat_lines(value: float, *, bpm: float = 94.0, width_px: int = 6) -> np.ndarray:
    """``value`` everywhere but black columns on og_beat's eighth notes, so its hits are kept."""
    mask = np.full((SIZE, SIZE), value)
    step_px = 30.0 / bpm * 100  # columns per eighth note (one column per 10 ms)
    for start in np.arange(0.0, SIZE, step_px):
        mask[:, round(start) : round(start) + width_px] = 0.0
    return mask


# id -> regeneration strength per pixel (rows = high frequencies first), 0..1
MASKS: dict[str, Callable[[], np.ndarray]] = {
    "mask_beat_lines_80": lambda: _beat_lines(0.80),
    "mask_gradient_dark": lambda: _gradient(0.35),
    "mask_gradient_top_70": lambda: _gradient(0.70),
    "mask_gradient_top_fifth_75": lambda: np.maximum(_rows(0.2, 0.75), _gradient(0.75) * 0.5),
    "mask_top_third_75": lambda: _rows(1 / 3, 0.75),
    "mask_top_third_95": lambda: _rows(1 / 3, 0.95),
}


def image_of_audio(
    make_audio: Callable[[float, int], np.ndarray], width: int = SIZE, params: SpectrogramParams | None = None
) -> Any:
    """The spectrogram image, ``width`` columns wide, of ``make_audio(seconds, sample_rate)``."""
    from ...kernels.convert import image_from_audio

    params = params or SpectrogramParams()
    seconds = (width - 1) * params.step_size_ms / 1000  # centred frames: width columns
    return image_from_audio(make_audio(seconds, params.sample_rate), params.sample_rate, params)


def seed_image(seed_id: str, params: SpectrogramParams | None = None, *, width: int = SIZE) -> Any:
    """The built-in seed image ``seed_id`` (``width`` x 512 RGB, parameters in its EXIF)."""
    if seed_id not in SEED_AUDIO:
        raise RiffusionError(f"unknown seed image {seed_id!r}; choose one of {', '.join(SEED_AUDIO)}")
    return image_of_audio(SEED_AUDIO[seed_id], width, params).convert("RGB")


def mask_image(mask_id: str) -> Any:
    """The built-in mask ``mask_id`` (512 x 512, mode L)."""
    from PIL import Image

    strength = np.broadcast_to(MASKS[mask_id]().reshape(SIZE, -1), (SIZE, SIZE))
    return Image.fromarray(np.round(strength * 255).astype(np.uint8), mode="L")


class SeedLibrary:
    """Seed images and masks by id: the built-ins, made on first use and kept, and the
    ``ID.png`` files of ``directory`` (read on each use, so files can be replaced)."""

    def __init__(self, directory: str | Path | None = None, params: SpectrogramParams | None = None) -> None:
        self.params = params or SpectrogramParams()
        self.files: dict[str, Path] = {}
        if directory is not None:
            directory = Path(directory)
            if not directory.is_dir():
                raise RiffusionError(f"seed image directory {str(directory)!r} does not exist")
            found = [p for p in sorted(directory.glob("*.png")) if p.is_file()]
            self.files = {p.stem: p for p in found if ID_PATTERN.fullmatch(p.stem)}
            skipped = [p.name for p in found if not ID_PATTERN.fullmatch(p.stem)]
            if skipped:  # said, not silently left out: a request naming one would be "unknown"
                log.warning(
                    "seed image files skipped, their names are not ids (1-64 letters, digits, _ or -, "
                    "then .png): %s",
                    ", ".join(repr(name) for name in skipped),
                )
            for image_id in self.files:  # at start-up, not on the first request that names one
                self._check_file(image_id)
        self._built: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _check_file(self, image_id: str) -> None:
        """RiffusionError naming the file unless it is a PNG a clip can start from: as tall
        as the spectrogram's mel bins, and (unless it is a mask) a multiple of 8 wide."""
        path = self.files[image_id]
        image = self.get(image_id, field=f"seed image file {str(path)!r}")
        height = self.params.num_frequencies
        if image.height != height:
            raise RiffusionError(f"seed image file {str(path)!r} is {image.height} pixels tall, not {height}")
        if image.width % 8:
            raise RiffusionError(
                f"seed image file {str(path)!r} is {image.width} pixels wide, not a multiple of 8; "
                f"cut it (riffusion-engine audio-to-image --width {image.width // 8 * 8})"
            )

    def ids(self) -> list[str]:
        return sorted({*SEED_AUDIO, *MASKS, *self.files})

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and image_id in self.ids()

    def build(self) -> None:
        """Make the built-ins now rather than on first use."""
        for image_id in (*SEED_AUDIO, *MASKS):
            self._builtin(image_id)

    def _builtin(self, image_id: str) -> Any:
        with self._lock:
            if image_id not in self._built:
                self._built[image_id] = (
                    seed_image(image_id, self.params) if image_id in SEED_AUDIO else mask_image(image_id)
                )
            return self._built[image_id]

    def get(self, image_id: str, *, field: str = "seed_image_id", mode: str | None = None) -> Any:
        """The image ``image_id`` as a new PIL image (converted to ``mode`` if given);
        RiffusionError naming ``field`` for an unknown id."""
        from PIL import Image, UnidentifiedImageError

        if image_id in self.files:
            try:
                with Image.open(self.files[image_id]) as image:
                    image.load()
                    return image if mode is None else image.convert(mode)
            except (OSError, UnidentifiedImageError) as exc:
                raise RiffusionError(f"{field}: {image_id!r} is not a readable PNG ({exc})") from exc
        if image_id in SEED_AUDIO or image_id in MASKS:
            built = self._builtin(image_id)
            return built.copy() if mode is None else built.convert(mode)
        shown = image_id if len(image_id) <= 80 else image_id[:77] + "..."
        raise RiffusionError(f"{field}: unknown id {shown!r}; known ids: {', '.join(self.ids())}")


def crop_width(image: Any, width: int) -> Any:
    """``image``'s first ``width`` columns (the first ``width / 100`` seconds of a
    spectrogram), or ``image`` itself when it is not wider."""
    return image.crop((0, 0, width, image.height)) if image.width > width else image
