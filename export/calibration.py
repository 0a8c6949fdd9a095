"""What the int8 UNet is calibrated and verified on: a plan of clips and the UNet inputs
the engine's own denoising produced for them.

A :class:`CalibrationPlan` names clips: prompts from the list this package ships
(``calibration-prompts.txt``: the first part calibrates, the held-out part verifies),
seeds, widths and both of the engine's modes (text to clip, and the web app's seed image
at denoising 0.75), run with the export's run profile (its scheduler, steps and
guidance). The plan is an export input: its fields and the prompts' text are hashed into
the export's cache key (:meth:`CalibrationPlan.key_fields`). The inputs themselves are
collected by the runtime (``engine/runtime/calibration.py``) on the fp32 stages of the
export being made, and handed back as a :class:`CalibrationSet`; a :class:`ClipStore`
keeps each clip's inputs on disk as it is made, so an interrupted export resumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..kernels.errors import RiffusionError
from .specs import FEATURE

PROMPTS_FILE = "calibration-prompts.txt"
HELD_OUT_MARK = "# held out"  # the line that starts the held-out prompts
Mode = Literal["text", "seed_image"]
MODES: tuple[Mode, ...] = ("text", "seed_image")
Sample = dict[str, np.ndarray]  # one UNet call's inputs (name -> array), batch 1


def shipped_prompts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The calibration prompts and the held-out prompts of ``calibration-prompts.txt``."""
    text = resources.files(__package__).joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    parts: tuple[list[str], list[str]] = ([], [])
    held_out = False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(HELD_OUT_MARK):
            held_out = True
        elif line and not line.startswith("#"):
            parts[held_out].append(line)
    return tuple(parts[0]), tuple(parts[1])


CALLS_RUN = 256  # about how many UNet calls calibration runs (CalibrationPlan.of)
SAMPLES = 64  # UNet calls calibrated on
HELD_OUT_CALLS = 4  # UNet calls kept per held-out clip, at most


@dataclass(frozen=True)
class Draw:
    """One clip of a plan."""

    prompt: str
    seed: int
    width: int  # pixels
    mode: Mode
    keep: tuple[int, ...]  # the UNet calls kept (indices, ascending): the clip stops after the last


@dataclass(frozen=True)
class CalibrationPlan:
    """The clips an int8 UNet is calibrated on and verified on."""

    scheduler: str  # the run profile's scheduler (lcm for the realtime profile)
    steps: int  # its steps (a seed-image clip runs int(steps * denoising) of them)
    guidance: float  # its guidance scale (<= 1: one UNet row per clip)
    widths: tuple[int, ...]  # clip widths in pixels (empty: the export's narrowest and optimized)
    clips: int = SAMPLES  # calibration clips, one calibration prompt each
    per_clip: int = 1  # UNet calls kept per calibration clip, spread over its steps
    held_out_clips: int = 8  # verification clips from the held-out prompts
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # the calibration clips' noise seeds
    held_out_seeds: tuple[int, ...] = (1000, 1001)  # the verification clips' (never calibrated on)
    denoising: float = 0.75  # the seed-image mode's share regenerated (the web app's)
    seed_image: str = "og_beat"  # the seed-image mode's image (the web app's default)
    prompts: tuple[str, ...] = field(default_factory=lambda: shipped_prompts()[0])
    held_out_prompts: tuple[str, ...] = field(default_factory=lambda: shipped_prompts()[1])

    @classmethod
    def of(cls, scheduler: str, steps: int, guidance: float, widths: tuple[int, ...] = ()) -> CalibrationPlan:
        """The plan for a run profile's sampling: :data:`SAMPLES` calls calibrated on, from
        as many clips (one call each) as about :data:`CALLS_RUN` UNet calls make (a few-step
        profile: one clip per calibration prompt; 50 steps: 8 clips of 8 calls), and held-out
        clips for about an eighth of that (8 few-step clips; 2 of 50 steps)."""
        plan = cls(scheduler, steps, guidance, widths)
        calls = sum(plan.calls(mode) for mode in MODES) / len(MODES)  # a whole clip's
        clips = max(8, min(SAMPLES, round(CALLS_RUN / calls)))
        held_out = max(2, min(8, round(CALLS_RUN / 8 / calls)))
        return replace(plan, clips=clips, per_clip=-(-SAMPLES // clips), held_out_clips=held_out)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.per_clip < 1 or (self.widths and min(self.widths) < 8):
            raise RiffusionError(f"a calibration plan needs steps and calls per clip >= 1, got {self}")
        if not 1 <= self.clips <= len(self.prompts) or not 1 <= self.held_out_clips <= len(
            self.held_out_prompts
        ):
            raise RiffusionError(
                f"calibration takes 1..{len(self.prompts)} clips and 1..{len(self.held_out_prompts)} "
                f"held-out clips, got {self.clips} and {self.held_out_clips}"
            )
        if set(self.prompts) & set(self.held_out_prompts) or set(self.seeds) & set(self.held_out_seeds):
            raise RiffusionError("held-out prompts and seeds must not be calibrated on")

    def calls(self, mode: Mode) -> int:
        """UNet calls of one clip in ``mode``."""
        if mode == "text":
            return self.steps
        return max(int(self.steps * self.denoising), 1)

    def _draws(self, prompts: tuple[str, ...], seeds: tuple[int, ...], n: int, per_clip: int) -> list[Draw]:
        """Clip i: the i-th prompt; modes alternate, then seeds, then widths, then where the
        ``per_clip`` calls kept (evenly spaced over the clip's) start, so every combination recurs."""
        if not self.widths:
            raise RiffusionError("a calibration plan's widths are set by the export it calibrates")
        draws = []
        for i in range(n):
            mode = MODES[i % len(MODES)]
            rest = i // len(MODES)
            seed, width = seeds[rest % len(seeds)], self.widths[(rest // len(seeds)) % len(self.widths)]
            calls = self.calls(mode)
            kept = min(per_clip, calls)
            offset = (rest // (len(seeds) * len(self.widths))) % max(calls // kept, 1)
            keep = tuple(sorted({(offset + j * calls // kept) % calls for j in range(kept)}))
            draws.append(Draw(prompts[i], seed, width, mode, keep))
        return draws

    def calibration(self) -> list[Draw]:
        return self._draws(self.prompts, self.seeds, self.clips, self.per_clip)

    def held_out(self) -> list[Draw]:
        return self._draws(self.held_out_prompts, self.held_out_seeds, self.held_out_clips, HELD_OUT_CALLS)

    def key_fields(self) -> dict[str, Any]:
        """Everything the collected inputs depend on besides the model (the prompts as text)."""
        fields = asdict(self)
        for name in ("prompts", "held_out_prompts"):
            fields[name] = hashlib.sha256("\n".join(fields[name]).encode()).hexdigest()
        return fields


@dataclass
class CalibrationSet:
    """The UNet inputs a plan's clips produced: calibration samples, and held-out samples
    with the fp32 UNet's outputs on them (the reference the int8 UNet is checked against)."""

    samples: list[Sample]
    held_out: list[Sample]
    held_out_outputs: list[np.ndarray]
    sampled_with: str  # the precision the calibration clips were denoised in
    # DeepCache's UNet: the feature each call's full UNet kept (samples', held-out's), on
    # which the shallow stage is calibrated and checked
    features: list[np.ndarray] | None = None
    held_out_features: list[np.ndarray] | None = None

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for sample in (*self.samples, *self.held_out):
            for name in sorted(sample):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(sample[name]).tobytes())
        for output in (*self.held_out_outputs, *(self.features or ()), *(self.held_out_features or ())):
            digest.update(np.ascontiguousarray(output).tobytes())
        return digest.hexdigest()

    def shallow(self, reference: Any) -> CalibrationSet:
        """The shallow stage's set: each call's inputs with the feature its full call kept;
        the held-out references are ``reference``'s outputs (the fp32 shallow stage's) on them."""
        assert self.features is not None and self.held_out_features is not None
        samples = [{**s, FEATURE: f} for s, f in zip(self.samples, self.features, strict=True)]
        held_out = [{**s, FEATURE: f} for s, f in zip(self.held_out, self.held_out_features, strict=True)]
        return CalibrationSet(samples, held_out, reference(held_out), self.sampled_with)

    def describe(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256(),
            "samples": len(self.samples),
            "held_out_samples": len(self.held_out),
            "sampled_with": self.sampled_with,
        }


class ClipStore:
    """Each clip's UNet inputs (and outputs), one ``.npz`` per clip in a directory, so a
    collection that was interrupted resumes where it stopped. Written atomically; a
    store belongs to one export key (its directory name says which)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, kind: str, index: int) -> Path:
        return self.directory / f"{kind}-{index:03d}.npz"

    def get(self, kind: str, index: int) -> list[dict[str, np.ndarray]] | None:
        path = self._path(kind, index)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                count = int(data["count"])
                names = json.loads(str(data["names"]))
                return [{n: data[f"{i}/{n}"] for n in names} for i in range(count)]
        except (OSError, ValueError, KeyError):
            return None  # a damaged file: the clip is made again

    def put(self, kind: str, index: int, calls: list[dict[str, np.ndarray]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        names = sorted(calls[0]) if calls else []
        arrays = {f"{i}/{n}": call[n] for i, call in enumerate(calls) for n in names}
        tmp = self._path(kind, index).with_suffix(".tmp.npz")
        np.savez(tmp, count=np.array(len(calls)), names=np.array(json.dumps(names)), **arrays)
        tmp.replace(self._path(kind, index))
