"""The chain's inputs and outputs as tensors: seed images and masks in, noise blended by
spherical interpolation, decoded images out as 8-bit pixels."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...kernels.image import pixels_from_image


def slerp(alpha: float, a: Any, b: Any, *, dot_threshold: float = 0.9995) -> Any:
    """Spherical interpolation of two noise tensors; linear when nearly parallel."""
    import torch

    dot = torch.sum(a * b) / (torch.linalg.norm(a) * torch.linalg.norm(b))
    if torch.abs(dot) > dot_threshold:
        return (1 - alpha) * a + alpha * b
    theta = torch.acos(dot)
    sin = torch.sin(theta)
    return torch.sin((1 - alpha) * theta) / sin * a + torch.sin(alpha * theta) / sin * b


def to_pixels(image: Any) -> Any:
    """An image row in [0, 1] -> its 8-bit pixels ``(height, width, 3)``, rounded as diffusers rounds."""
    import torch

    return (image * 255).round().to(torch.uint8)


def image_batch(images: list[Any]) -> Any:
    """PIL images -> ``(batch, 3, height, width)`` float in [-1, 1], as diffusers
    preprocesses them (a channels-last view of the pixels, which the torch backend's
    convolutions see exactly as diffusers' do)."""
    import torch

    pixels = np.stack([pixels_from_image(image).astype(np.float32) / 255.0 for image in images])
    return torch.from_numpy(pixels * 2 - 1).permute(0, 3, 1, 2)


def mask_tensor(mask: Any, latent_shape: tuple[int, int, int]) -> Any:
    """A grayscale PIL mask -> ``(channels, h, w)`` in [0, 1], 1 = regenerate; no mask =
    regenerate everywhere. Downsampled to latent size by nearest neighbour, as Riffusion does."""
    import torch
    from PIL import Image

    channels, height, width = latent_shape
    if mask is None:
        return torch.ones(latent_shape)
    small = mask.convert("L").resize((width, height), resample=Image.NEAREST)
    values = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)
    return values.expand(channels, height, width).contiguous()
