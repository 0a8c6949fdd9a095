"""The server's limits and batching (:class:`ServerConfig`), and the rules on a request's
steps that follow from them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ...kernels.errors import RiffusionError
from ..runtime.defaults import STEPS as DEFAULT_STEPS  # the original API's default too
from ..stream.opus import DEFAULT_BITRATE, MAX_BITRATE, MIN_BITRATE


@dataclass(frozen=True)
class ServerConfig:
    """Limits and batching of the server."""

    max_batch: int = 4  # most requests in one UNet batch (the UNet sees twice this with guidance)
    batch_window_ms: float = 20.0  # how long the oldest request waits for others to batch with
    max_queue: int = 32  # most requests waiting or running; one more answers 503
    timeout_s: float = 300.0  # a request unanswered after this answers 504 and leaves the queue
    max_steps: int = 100  # largest num_inference_steps accepted
    max_body_bytes: int = 64 * 1024  # larger bodies answer 413
    seed_images: Path | None = None  # a directory of ID.png seed images and masks (adds to the built-ins)
    cors_origins: tuple[str, ...] = ()  # origins browsers may call from ("*": any); none = closed
    # When a request would miss timeout_s, run it with fewer steps, down to this many;
    # refuse (503) only when even these miss it. None: never change a request's steps.
    degrade_steps: int | None = None
    max_streams: int = 4  # most streams open at once (/stream); one more is refused (close 1013)
    stream_buffer: int = 3  # clips a stream makes ahead of the client's playback at most
    stream_lifetime_s: float = 3600.0  # a stream ends after this long (close 1000, reason given)
    stream_start_timeout_s: float = 10.0  # a socket without a valid start after this is closed (1008)
    max_unstarted_streams: int = 16  # most sockets waiting to start at once (they hold no stream slot)
    warm_up: bool = True  # run every stage and batch size once before /health answers
    # Batches of stream clips that may run in a row while a one-shot request waits: then a
    # batch of one-shot requests runs, whatever the clips' deadlines. 0: earliest deadline
    # first alone (busy streams can hold a request back until its timeout).
    stream_batches: int = 3
    stream_opus_kbps: int = (
        DEFAULT_BITRATE // 1000
    )  # an Opus stream's kbit/s unless its start message gives one

    def __post_init__(self) -> None:
        finite = math.isfinite
        # (field, its serve flag, the rule in words, whether it holds)
        checks = (
            ("max_batch", "--max-batch", "at least 1", self.max_batch >= 1),
            (
                "batch_window_ms",
                "--batch-window-ms",
                ">= 0",
                finite(self.batch_window_ms) and self.batch_window_ms >= 0,
            ),
            ("max_queue", "--max-queue", "at least 1", self.max_queue >= 1),
            ("timeout_s", "--timeout", "> 0 seconds", finite(self.timeout_s) and self.timeout_s > 0),
            ("max_steps", "--max-steps", "in 1..1000", 1 <= self.max_steps <= 1000),
            ("max_body_bytes", "--max-body-kb", "at least 1 KiB", self.max_body_bytes >= 1024),
            (
                "degrade_steps",
                "--degrade-steps",
                f"in 1..--max-steps ({self.max_steps})",
                self.degrade_steps is None or 1 <= self.degrade_steps <= self.max_steps,
            ),
            ("max_streams", "--max-streams", ">= 0", self.max_streams >= 0),
            ("stream_buffer", "--stream-buffer", "in 1..16 clips", 1 <= self.stream_buffer <= 16),
            (
                "stream_lifetime_s",
                "--stream-lifetime",
                "> 0 seconds",
                finite(self.stream_lifetime_s) and self.stream_lifetime_s > 0,
            ),
            (
                "stream_start_timeout_s",
                "--stream-start-timeout",
                "> 0 seconds",
                finite(self.stream_start_timeout_s) and self.stream_start_timeout_s > 0,
            ),
            ("stream_batches", "--stream-batches", ">= 0", self.stream_batches >= 0),
            (
                "stream_opus_kbps",
                "--stream-opus-kbps",
                f"in {MIN_BITRATE // 1000}..{MAX_BITRATE // 1000}",
                MIN_BITRATE <= self.stream_opus_kbps * 1000 <= MAX_BITRATE,
            ),
            (
                "max_unstarted_streams",
                "--max-unstarted-streams",
                "at least 1",
                self.max_unstarted_streams >= 1,
            ),
        )
        for name, flag, rule, ok in checks:
            if not ok:
                value = getattr(self, name)
                shown = f"{value // 1024} KiB" if name == "max_body_bytes" else repr(value)
                raise RiffusionError(f"{flag} ({name}) must be {rule}, got {shown}")
        if self.seed_images is not None and not Path(self.seed_images).is_dir():
            raise RiffusionError(f"seed image directory {str(self.seed_images)!r} does not exist")
        for origin in self.cors_origins:
            scheme, _, host = origin.partition("://")
            if origin != "*" and (scheme not in ("http", "https") or not host or "/" in host):
                raise RiffusionError(
                    f"CORS origin must be * or scheme://host[:port] (no path), got {origin!r}"
                )


class FieldError(RiffusionError):
    """A request field the server refuses: which one, and why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def default_steps(config: ServerConfig) -> int:
    """The steps of a request that leaves them out: the API's default, at most the cap."""
    return min(DEFAULT_STEPS, config.max_steps)


def checked_steps(config: ServerConfig, steps: int | None) -> int:
    """``steps`` (None: left out, so :func:`default_steps`) within the server's cap."""
    steps = default_steps(config) if steps is None else steps
    if steps > config.max_steps:
        raise FieldError("num_inference_steps", f"at most {config.max_steps} on this server, got {steps}")
    return steps
