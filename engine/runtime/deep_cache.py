"""DeepCache's schedule: which denoising steps run the full UNet and which its shallow branch.

DeepCache (Ma et al., 2023, "DeepCache: Accelerating Diffusion Models for Free",
arXiv:2312.00858) keeps the UNet's high-level feature from a full call and, for the next
``interval - 1`` steps, reruns only the shallow branch on it (``export/stages.py``:
``unet`` also returns the feature at ``branch``, ``unet_shallow`` takes it). The schedule
lives here, in the runtime's loop, not in a backend:

- a full call every ``interval`` steps, counted from the clip's first step, which is
  always full (DeepCacheSDHelper's ``uniform`` skip mode, counted from the first step the
  pipeline runs, which for a seed image is ``int(steps * denoising)`` from the end);
- the feature belongs to one batch's denoising and is dropped with it: every clip, a
  stream's steered clip included, starts with a full call, and the rows of a batch (clips
  started together, sharing steps) are always at the same step, so they share each call.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...kernels.errors import RiffusionError

MAX_INTERVAL = 50


@dataclass(frozen=True)
class DeepCache:
    """A full UNet call every ``interval`` steps; the others run the shallow branch."""

    interval: int  # 2..MAX_INTERVAL: steps per full call
    branch: int = 0  # DeepCache's cache_branch_id (export/specs.py: branch_position)

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or not 2 <= self.interval <= MAX_INTERVAL:
            raise RiffusionError(
                f"--deep-cache interval must be 2..{MAX_INTERVAL} (0 or 1: off), got {self.interval!r}"
            )
        if not isinstance(self.branch, int) or self.branch < 0:
            raise RiffusionError(f"--deep-cache branch must be an integer >= 0, got {self.branch!r}")

    def full(self, step: int) -> bool:
        """Whether the clip's ``step``-th step (0: its first) runs the full UNet."""
        return step % self.interval == 0

    def full_calls(self, steps: int) -> int:
        """Full UNet calls in a clip of ``steps`` denoising steps."""
        return sum(self.full(i) for i in range(steps))

    def __str__(self) -> str:
        return f"{self.interval}:{self.branch}"


def parse_deep_cache(value: str | int | DeepCache | None, *, branch: int | None = None) -> DeepCache | None:
    """``INTERVAL[:BRANCH]`` (or a DeepCache) -> the schedule, None for off (``0``, or an
    interval of 1: every step full). A BRANCH left out is ``branch``, else 0."""
    if value is None or isinstance(value, DeepCache):
        return value
    if isinstance(value, bool):
        raise RiffusionError(f"--deep-cache takes INTERVAL[:BRANCH], got {value!r}")
    text = str(value).strip()
    head, sep, tail = text.partition(":")
    try:
        interval = int(head)
        chosen = int(tail) if sep else (branch if branch is not None else 0)
    except ValueError:
        raise RiffusionError(
            f"--deep-cache takes INTERVAL[:BRANCH] (e.g. 3 or 3:0; 0 turns it off), got {text!r}"
        ) from None
    if interval < 0:
        raise RiffusionError(f"--deep-cache interval must be >= 0 (0 or 1: off), got {interval}")
    if interval <= 1:
        return None
    return DeepCache(interval, chosen)
