"""Spectrogram <-> image, in Riffusion's format.

Image = (mel / max) ** power_for_image scaled to 0..255 and inverted (loud is
dark), flipped so low frequencies are at the bottom. Mono: the same gray in
R, G and B. Stereo: R = 0, G = left, B = right. The parameters and the max
value travel in the PNG's EXIF under Riffusion's tag ids.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from . import xp as xpm
from .errors import RiffusionError
from .files import atomic_path, check_output_path
from .params import ExifTag, SpectrogramParams, max_value_from_exif

log = logging.getLogger(__name__)


def pixels_from_spectrogram(
    mel: Any, params: SpectrogramParams, *, max_value: float | None = None, xp: ModuleType = np
) -> tuple[Any, float]:
    """Mel magnitudes ``(channels, num_frequencies, frames)`` -> RGB pixels
    ``(num_frequencies, frames, 3)`` uint8, and the max value used."""
    if mel.ndim != 3 or mel.shape[0] not in (1, 2):
        raise RiffusionError(f"spectrogram must be (1 or 2 channels, mels, frames), got {tuple(mel.shape)}")
    mel = mel.astype(xp.float32, copy=False)
    if max_value is None:
        max_value = float(mel.max())
    if not max_value > 0:
        raise RiffusionError("spectrogram is silent (max value 0): nothing to draw")
    data = mel / xp.float32(max_value)
    data = xp.power(data, xp.float32(params.power_for_image))
    data = data * xp.float32(255)
    data = xp.float32(255) - data
    data = data.astype(xp.uint8)  # (channels, mels, frames)
    if data.shape[0] == 1:
        rgb = xp.stack([data[0]] * 3, axis=-1)
    else:
        rgb = xp.stack([xp.zeros_like(data[0]), data[0], data[1]], axis=-1)
    return rgb[::-1], max_value


def spectrogram_from_pixels(
    pixels: Any, params: SpectrogramParams, *, max_value: float, xp: ModuleType = np
) -> Any:
    """RGB pixels ``(num_frequencies, frames, 3)`` (uint8 values) -> mel
    magnitudes ``(channels, num_frequencies, frames)`` float32."""
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise RiffusionError(f"pixels must be (height, width, 3), got {tuple(pixels.shape)}")
    if pixels.shape[0] != params.num_frequencies:
        raise RiffusionError(
            f"image height {pixels.shape[0]} does not match num_frequencies {params.num_frequencies}"
        )
    channels = (1, 2) if params.stereo else (0,)
    data = xp.stack([pixels[::-1, :, c] for c in channels]).astype(xp.float32)  # (ch, mels, frames)
    data = xp.float32(255) - data
    data = data / xp.float32(255)
    data = xp.power(data, xp.float32(1.0 / params.power_for_image))
    return data * xp.float32(max_value)


def min_frames(params: SpectrogramParams) -> int:
    """Fewest image columns that can be turned into audio (centred frames need
    more than n_fft / 2 samples of signal)."""
    return params.n_fft // 2 // params.hop_length + 2


def image_from_spectrogram(mel: Any, params: SpectrogramParams, *, max_value: float | None = None) -> Any:
    """A PIL image with the parameters and max value in its EXIF."""
    pixels, max_value = pixels_from_spectrogram(xpm.to_numpy(mel), params, max_value=max_value)
    return image_from_pixels(pixels, params, max_value=max_value)


def image_from_pixels(pixels: np.ndarray, params: SpectrogramParams, *, max_value: float) -> Any:
    """A PIL image of RGB pixels ``(height, width, 3)`` uint8, with the parameters and
    max value in its EXIF."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    exif = image.getexif()
    exif.update(params.to_exif())
    exif[ExifTag.MAX_VALUE.value] = float(max_value)
    return image


def params_from_image(image: Any, params: SpectrogramParams | None = None) -> tuple[SpectrogramParams, float]:
    """The image's parameters (``params`` if given, else its EXIF, else the
    defaults) and its max value (EXIF, else Riffusion's 30e6)."""
    exif = image.getexif()
    return (params or SpectrogramParams.from_exif(exif)), max_value_from_exif(exif)


# PIL modes a spectrogram image may have: 8-bit gray, palette, RGB(A), and 16-bit gray
# (its top 8 bits are the pixel value). One rule for image-to-audio and seed images.
IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")


def pixels_from_image(image: Any) -> np.ndarray:
    """RGB pixels ``(height, width, 3)`` uint8 of a PIL image in one of IMAGE_MODES (gray
    and palette become RGB; 16-bit gray keeps its top 8 bits)."""
    if image.mode not in IMAGE_MODES:
        raise RiffusionError(f"image mode {image.mode} is not supported; use one of {', '.join(IMAGE_MODES)}")
    if image.mode in SIXTEEN_BIT_MODES:
        gray = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def looks_like_a_spectrogram(image: Any, pixels: np.ndarray) -> bool:
    """Whether an image can be one of Riffusion's: it carries Riffusion's EXIF, or its
    channels are laid out as Riffusion's are (mono: R = G = B; stereo: R = 0)."""
    if any(int(tag) in image.getexif() for tag in ExifTag):
        return True
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return bool(((red == green) & (green == blue)).all() or not red.any())


def spectrogram_from_image(
    image: Any, params: SpectrogramParams | None = None, *, xp: ModuleType = np
) -> tuple[Any, SpectrogramParams]:
    """Mel magnitudes ``(channels, mels, frames)`` and the parameters of a spectrogram image."""
    params, max_value = params_from_image(image, params)
    host = pixels_from_image(image)
    if not looks_like_a_spectrogram(image, host):
        log.warning(
            "this image has no Riffusion EXIF and its colour channels differ (Riffusion's mono "
            "images are gray, its stereo ones have R = 0): it is probably not a spectrogram; "
            "converting it anyway (mono: its red channel; stereo: green and blue)"
        )
    pixels = xp.asarray(host)
    check_image_size(pixels.shape, params)
    return spectrogram_from_pixels(pixels, params, max_value=max_value, xp=xp), params


def check_image_size(shape: tuple[int, ...], params: SpectrogramParams) -> None:
    height, width = shape[0], shape[1]
    if height != params.num_frequencies:
        raise RiffusionError(f"image height {height} does not match num_frequencies {params.num_frequencies}")
    if width < min_frames(params):
        raise RiffusionError(
            f"image width {width} is too small to hold a frame: need at least {min_frames(params)} columns"
        )


def load_image(path: str | os.PathLike[str]) -> Any:
    """Open a spectrogram image; a clear error when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise RiffusionError(f"image file {str(path)!r} is a directory")
    if not path.is_file():
        raise RiffusionError(f"image file {str(path)!r} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise RiffusionError(f"{str(path)!r} is not a readable image ({exc})") from exc
    return image


def save_image(image: Any, path: str | os.PathLike[str]) -> Path:
    """Write a PNG (or JPEG) keeping the EXIF, atomically."""
    path = check_output_path(path, (".png", ".jpg", ".jpeg"))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG" if path.suffix.lower() == ".png" else "JPEG", exif=image.getexif())
    return path
