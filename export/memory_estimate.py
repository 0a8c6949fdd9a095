"""The memory an export's verification will ask for, estimated before it runs.

The verification runs each stage at its opt and min sizes in ONNX Runtime (and OpenVINO),
whose CPU attention holds the whole score matrix: rows x heads x positions^2 float32
values, then its softmax beside it. At the UNet's first attention level, positions are
the latent's pixels (a 4096-pixel clip of Stable Diffusion 1.5 has 32768): the scores
grow with the square of the width and are by far the largest buffers. The VAE's
mid-block attention (one head, the latent's pixels) is counted too; the tiny VAE has
none. An export that cannot fit is refused with the figure before anything is traced,
rather than failing in the runtime's allocator after minutes of work.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ..kernels.errors import RiffusionError
from .specs import SHALLOW, StageSpec

FLOAT32 = 4
GIB = 2**30


@dataclass(frozen=True)
class AttentionScores:
    """The largest attention score matrix a stage's verification makes."""

    stage: str
    width: int  # image pixels
    rows: int
    heads: int
    lines: int  # the attention's resolution: latent lines (the height) ...
    scale: int  # ... and image pixels per position along the width

    @property
    def positions(self) -> int:
        return self.lines * (self.width // self.scale)

    @property
    def bytes(self) -> int:
        return self.rows * self.heads * self.positions**2 * FLOAT32

    def widest(self, budget: int) -> int:
        """The widest image (pixels, a multiple of 8) whose scores and softmax fit ``budget`` bytes."""
        positions = math.isqrt(budget // (2 * self.rows * self.heads * FLOAT32))
        return positions // self.lines * self.scale // 8 * 8


def available_bytes() -> int | None:
    """The memory the machine can give without swapping (Linux's MemAvailable), else
    the free physical pages; None where neither is known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _first_attention_level(block_types: Any) -> int | None:
    return next((i for i, kind in enumerate(block_types) if "Attn" in kind), None)


def _unet_heads(config: Any, level: int) -> int:
    # diffusers' SD 1.x configs name the head count attention_head_dim (num_attention_heads unset)
    heads = getattr(config, "num_attention_heads", None) or config.attention_head_dim
    return int(heads[level] if isinstance(heads, (list, tuple)) else heads)


def largest_scores(
    components: Any, specs: dict[str, StageSpec], stages: Any, vae_factor: int
) -> list[AttentionScores]:
    """Each verified stage's largest attention score matrix, at its opt and min sizes."""
    from .models import is_tiny_vae

    found = []
    for name in stages:
        spec = specs[name]
        for which in ("opt", "min"):
            shapes = spec.input_shapes(which)
            if name in ("unet", SHALLOW):
                config = components.unet.config
                level = _first_attention_level(config.down_block_types)
                if level is None:
                    continue
                rows, _, height, width = shapes["sample"]  # latent pixels
                heads, lines, scale = _unet_heads(config, level), height >> level, vae_factor << level
                width *= vae_factor
            elif name in ("vae_decoder", "vae_encoder"):
                vae = components.vae
                if is_tiny_vae(vae) or not getattr(vae.config, "mid_block_add_attention", True):
                    continue  # the tiny VAE (TAESD): convolutions only
                if name == "vae_decoder":
                    rows, _, height, width = shapes["latent"]
                    width *= vae_factor
                else:
                    rows, _, height, width = shapes["image"]
                    height //= vae_factor
                heads, lines, scale = 1, height, vae_factor  # the mid block, at the latent's size
            else:
                continue
            found.append(AttentionScores(name, width, rows, heads, lines=lines, scale=scale))
    return found


def check_export_memory(
    components: Any, specs: dict[str, StageSpec], stages: Any, vae_factor: int, available: int | None = None
) -> None:
    """Raise RiffusionError, with the figure, where a stage's attention scores and their
    softmax would not fit the memory available (``available``: measured when None)."""
    available = available_bytes() if available is None else available
    scores = largest_scores(components, specs, stages, vae_factor)
    if available is None or not scores:
        return
    worst = max(scores, key=lambda s: s.bytes)
    if 2 * worst.bytes <= available:
        return
    widest = worst.widest(available)
    raise RiffusionError(
        f"verifying the {worst.stage} at {worst.width} pixels needs {2 * worst.bytes / GIB:.1f} GiB for its "
        f"attention (scores and their softmax: {worst.rows} rows x {worst.heads} heads x "
        f"{worst.positions}^2 positions, float32), and this machine has {available / GIB:.1f} GiB "
        f"available; export with a smaller --width (about {widest} pixels at most here)"
    )
