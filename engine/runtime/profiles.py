"""Named sets of choices a run is made with: ``default`` (Riffusion's own recipe) and
``realtime`` (a few-step LoRA's sampler, guidance off, the tiny VAE, reduced precision).

A profile fills in what the user left unset; an explicit choice overrides its own part.
:func:`resolve` gives the choices a run actually uses, and :meth:`Choices.describe` says
them on one line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from ...export.adapters import LCM_LORA, RANDOM_LORA, Lora
from ...export.models import is_random_preset
from ...kernels.errors import RiffusionError
from .cpu import auto_deep_cache, auto_precision, best_float, has_bf16
from .deep_cache import DeepCache, parse_deep_cache
from .defaults import SCHEDULER, STEPS


@dataclass(frozen=True)
class Profile:
    name: str
    scheduler: str  # one of requests.SCHEDULERS
    steps: int  # scheduler steps (a seed image at denoising d runs int(steps * d) of them)
    guidance: float  # classifier-free guidance scale; <= 1: off, the UNet runs one row per clip
    vae: str | None  # None: the model's own VAE; "tiny": TAESD
    cpu_backend: str  # the backend on the CPU ("auto": the engine's own choice)
    cpu_precision: str  # its precision there ("auto": by the CPU's class, cpu.auto_precision)
    cuda_precision: str  # the precision on CUDA
    needs_lora: bool  # a real checkpoint needs a few-step LoRA for this profile's sampler
    # DeepCache on the CPU: "0" off, INTERVAL:BRANCH, or "auto" (by the CPU's class,
    # cpu.auto_deep_cache); off on CUDA unless asked for
    cpu_deep_cache: str = "0"

    def summary(self) -> str:
        vae = "tiny VAE (TAESD)" if self.vae == "tiny" else "the model's VAE"
        guidance = "guidance off" if self.guidance <= 1 else f"guidance {self.guidance:g}"
        cpu = f"{self.cpu_backend} {self.cpu_precision} on cpu"
        if self.cpu_precision == "bf16":
            cpu += " (fp32 without bf16 instructions)"
        elif self.cpu_precision == "auto":
            cpu = f"{self.cpu_backend} on cpu in int8, bf16 or fp32 by the CPU's instructions"
        precision = f"{cpu}, {self.cuda_precision} on cuda"
        deep = {"0": "", "auto": ", DeepCache by the CPU's class"}.get(
            self.cpu_deep_cache, f", DeepCache {self.cpu_deep_cache} on cpu"
        )
        return f"{self.scheduler} {self.steps} steps, {guidance}, {vae}, {precision}{deep}"


PROFILES: dict[str, Profile] = {
    "default": Profile(
        name="default",
        scheduler=SCHEDULER,
        steps=STEPS,
        guidance=7.0,
        vae=None,
        cpu_backend="auto",
        cpu_precision="fp32",
        cuda_precision="fp32",
        needs_lora=False,
    ),
    "realtime": Profile(
        name="realtime",
        scheduler="lcm",
        steps=4,
        guidance=1.0,
        vae="tiny",
        cpu_backend="openvino",
        cpu_precision="auto",
        cuda_precision="fp16",
        needs_lora=True,
        cpu_deep_cache="auto",
    ),
}
DEFAULT_PROFILE = PROFILES["default"]


def profile(name: str | Profile | None) -> Profile:
    if isinstance(name, Profile):
        return name
    if name is None:
        return DEFAULT_PROFILE
    if name not in PROFILES:
        raise RiffusionError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


def nncf_installed() -> bool:
    return importlib.util.find_spec("nncf") is not None


@dataclass(frozen=True)
class Choices:
    """What a run uses: the profile's choices where the user made none."""

    profile: Profile
    backend: str
    precision: str
    vae: str | None
    loras: tuple[Lora, ...]
    scheduler: str
    steps: int
    guidance: float
    notes: tuple[str, ...] = ()  # where the profile's choice could not be made, and why
    exported: bool = False  # loaded from an export directory: LoRAs and VAE are its own
    deep_cache: DeepCache | None = None  # DeepCache's schedule (None: every step a full UNet call)

    def describe(self, *, exported: bool | None = None) -> str:
        exported = self.exported if exported is None else exported
        parts = [
            f"{self.scheduler} {self.steps} steps",
            "guidance off" if self.guidance <= 1 else f"guidance {self.guidance:g}",
            f"backend {self.backend}",
            f"precision {self.precision}",
        ]
        if self.deep_cache is not None:
            parts.append(f"DeepCache {self.deep_cache} (interval:branch)")
        if exported:
            parts.append("LoRAs and VAE as exported")
        else:
            parts.append(
                "tiny VAE" if self.vae == "tiny" else f"vae {self.vae}" if self.vae else "the model's VAE"
            )
            parts.append("LoRA " + ", ".join(str(x) for x in self.loras) if self.loras else "no LoRA")
        return f"profile {self.profile.name}: " + ", ".join(parts) + "".join(f" ({n})" for n in self.notes)


def resolve(
    name: str | Profile | None,
    *,
    model: str | None,
    device: str = "cpu",
    exported: bool = False,
    backend: str | None = None,
    precision: str | None = None,
    vae: str | None = None,
    loras: tuple[Lora, ...] | list[Any] | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    int8: bool | None = None,
    features: tuple[str, ...] | None = None,
    deep_cache: str | DeepCache | None = None,
    export_branch: int | bool | None = False,
) -> Choices:
    """The choices of profile ``name`` where the arguments are None; ``exported``: the run
    loads an export directory, whose LoRAs and VAE were fixed when it was made; ``int8``:
    whether an int8 UNet is there to run (an export's) or can be made (NNCF installed;
    None: find out), which an ``auto`` precision needs to choose int8; ``features``: the
    CPU's (default: this one's, :func:`~.cpu.cpu_features`); ``deep_cache``:
    ``INTERVAL[:BRANCH]`` (``0``: off), None for the profile's; ``export_branch``: the
    DeepCache branch the export directory run has stages for (None: none; False: not an
    export), which a BRANCH left out and the profile's ``auto`` take."""
    p = profile(name)
    notes = []
    backend = backend or "auto"
    if backend == "auto" and device == "cpu" and p.cpu_backend != "auto":
        if p.cpu_backend == "openvino" and importlib.util.find_spec("openvino") is None:
            notes.append("OpenVINO is not installed: pip install 'riffusion-engine[openvino]'")
        else:
            backend = p.cpu_backend
    if precision is None:
        if device == "cuda":
            precision = p.cuda_precision
        else:
            precision = p.cpu_precision if backend == "openvino" else "fp32"
            if precision == "auto":
                precision, why = auto_precision(features)
                if precision == "int8" and not (int8 if int8 is not None else nncf_installed()):
                    precision = best_float(features)
                    why += (
                        f"; this export has no int8 UNet: {precision}"
                        if exported
                        else f"; NNCF, which makes the int8 UNet, is not installed: {precision} "
                        "(pip install 'riffusion-engine[openvino]')"
                    )
                notes.append(why)
            if precision == "bf16" and not has_bf16(features):
                # OpenVINO would run f32 anyway: say so rather than claim bf16
                precision = "fp32"
                notes.append("this CPU has no bf16 instructions (AVX-512 BF16 or AMX): fp32")
    branch = export_branch if export_branch is not False else None
    if deep_cache is not None:
        chosen = parse_deep_cache(deep_cache, branch=branch)
    elif device == "cpu" and p.cpu_deep_cache == "auto":
        chosen, why = auto_deep_cache(precision, features)
        if chosen is not None and export_branch is not False and export_branch != chosen.branch:
            if export_branch is None:
                why += "; this export has no DeepCache stages: off"
                chosen = None
            else:
                chosen = DeepCache(chosen.interval, export_branch)
                why += f"; the export's branch {export_branch}"
        notes.append(why)
    else:
        chosen = parse_deep_cache(p.cpu_deep_cache if device == "cpu" else "0", branch=branch)
    loras = tuple(x if isinstance(x, Lora) else Lora.parse(x) for x in (loras or ()))
    if not exported:
        vae = vae if vae is not None else p.vae
        if p.needs_lora and not loras:
            if model is not None and is_random_preset(model):
                loras = (Lora(RANDOM_LORA),)  # seeded random weights of a LoRA's shapes: real compute
            else:
                raise RiffusionError(
                    f"the {p.name} profile samples in {p.steps} steps, which needs a few-step LoRA: "
                    f"add --lora {LCM_LORA} (or --lora h1t/TCD-SD15-LoRA with --scheduler tcd)"
                )
    return Choices(
        profile=p,
        backend=backend,
        precision=precision,
        vae=vae,
        loras=loras,
        scheduler=scheduler if scheduler is not None else p.scheduler,
        steps=steps if steps is not None else p.steps,
        guidance=guidance if guidance is not None else p.guidance,
        notes=tuple(notes),
        exported=exported,
        deep_cache=chosen,
    )
