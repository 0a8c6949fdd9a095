"""What an export adds to a model source: LoRA adapters fused into its weights, and the
tiny autoencoder (TAESD, diffusers' ``AutoencoderTiny``) in place of its VAE.

LoRA files are read by diffusers' own LoRA loading (diffusers/PEFT and kohya
safetensors, UNet and text-encoder weights), after a check that every weight fits a
layer of the model, and fused with ``fuse_lora`` before export: the exported stages run
at the base model's cost. Each file's sha256 and scale join the export's cache key and
manifest (:meth:`Variant.key_fields`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..kernels.errors import RiffusionError

log = logging.getLogger(__name__)

TINY_VAE = "madebyollin/taesd"  # TAESD for Stable Diffusion 1.x latents
LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"  # the few-step LoRA the realtime profile suggests
MAX_SCALE = 100.0  # the largest LoRA scale, in size
RANDOM_LORA = "random:lora"  # a seeded random LoRA of the base's shapes (random presets only)
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file in a folder
RANDOM_LORA_RANK = 8
# The layers the random LoRA adapts: every attention projection and feed-forward layer of
# the UNet's transformer blocks, as LCM-LoRA does.
RANDOM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


@dataclass(frozen=True)
class Lora:
    """One LoRA: a file, a folder holding one, a hub id (``owner/name``, or
    ``owner/name/file.safetensors`` in a repository of several) or :data:`RANDOM_LORA`;
    fused at ``scale``."""

    source: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale) or abs(self.scale) > MAX_SCALE:
            raise RiffusionError(
                f"--lora {self}: the scale must be a finite number at most {MAX_SCALE:g} in size, "
                f"got {self.scale:g} (a fused LoRA's weights scale with it)"
            )

    @classmethod
    def parse(cls, text: str) -> Lora:
        """``PATH_OR_HUB_ID[:SCALE]``."""
        source, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                scale = float(tail)
            except ValueError:
                # A path or hub id with a colon of its own, or a scale that is not a number.
                if text != RANDOM_LORA and not Path(text).expanduser().exists() and "/" not in tail:
                    raise RiffusionError(
                        f"--lora {text!r}: the scale {tail!r} is not a number (PATH_OR_HUB_ID[:SCALE])"
                    ) from None
            else:
                source = head
        if not source.strip():
            raise RiffusionError(f"--lora {text!r} names no LoRA")
        return cls(source, scale)

    def __str__(self) -> str:
        return self.source if self.scale == 1.0 else f"{self.source}:{self.scale:g}"


@dataclass(frozen=True)
class Variant:
    """The LoRAs fused into a model and the VAE it decodes with (None: its own;
    ``tiny``: TAESD, :data:`TINY_VAE` or a random one for a random preset;
    ``tiny=PATH_OR_HUB_ID``)."""

    loras: tuple[Lora, ...] = ()
    vae: str | None = None

    def __post_init__(self) -> None:
        if self.vae is not None and self.vae != "tiny" and not self.vae.startswith("tiny="):
            raise RiffusionError(f"--vae must be tiny or tiny=PATH_OR_HUB_ID, got {self.vae!r}")
        if self.vae == "tiny=":
            raise RiffusionError("--vae tiny= names no autoencoder")

    @property
    def tiny_vae(self) -> bool:
        return self.vae is not None

    def describe(self) -> str:
        parts = [f"lora {lora}" for lora in self.loras]
        if self.vae is not None:
            parts.append(f"vae {self.vae}")
        return ", ".join(parts) or "as published"

    def key_fields(self, *, random_preset: bool, seed: int = 0) -> dict[str, Any]:
        """What the export's content depends on: each LoRA's sha256 and scale, the tiny
        VAE's files' hash (or, for a random preset, its seed and architecture)."""
        loras = []
        for lora in self.loras:
            if lora.source == RANDOM_LORA:
                check_random_lora(random_preset)
                digest = hashlib.sha256(
                    f"{RANDOM_LORA}:{seed}:{RANDOM_LORA_RANK}:{RANDOM_LORA_TARGETS}".encode()
                ).hexdigest()
            else:
                digest = file_hash(lora_file(lora.source))
            loras.append({"source": lora.source, "scale": lora.scale, "sha256": digest})
        vae = None
        if self.vae is not None:
            source = tiny_vae_source(self.vae, random_preset=random_preset)
            if source is None:
                vae = {"source": "random", "seed": seed}
            else:
                folder = tiny_vae_folder(source)
                vae = {"source": source, "sha256": files_hash(folder, _vae_files(folder))}
        return {"loras": loras, "vae": vae}


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_hash(folder: Path, names: list[str]) -> str:
    """sha256 over each file's name and content, in order."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{file_hash(folder / name)}\0".encode())
    return digest.hexdigest()


def check_random_lora(random_preset: bool) -> None:
    if not random_preset:
        raise RiffusionError(f"--lora {RANDOM_LORA} adapts the random: presets only")


# -- finding the files ---------------------------------------------------------------


def check_lora_source(source: str, *, random_preset: bool) -> None:
    """One clear error for a LoRA source that names nothing: not the random LoRA (on a
    random preset), a file, a folder or a hub id's shape. Nothing is read or downloaded."""
    if source == RANDOM_LORA:
        check_random_lora(random_preset)
    elif not Path(source).expanduser().exists():
        _hub_parts(source)


def _hub_parts(source: str) -> list[str]:
    """A LoRA source that is not a local path, as a hub id's parts (owner, name[, file]);
    RiffusionError where it does not have that shape."""
    parts = source.split("/")
    if source.startswith((".", "/", "~")) or len(parts) not in (2, 3) or not all(parts):
        raise RiffusionError(
            f"LoRA {source!r} is not a file, a folder or a hub id (owner/name or owner/name/file.safetensors)"
        )
    return parts


def lora_file(source: str) -> Path:
    """The local safetensors (or .bin) file of a LoRA source, downloaded into the hub
    cache when it is a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _one_lora_file(path, source)
    parts = _hub_parts(source)
    repo = "/".join(parts[:2])
    patterns = [parts[2]] if len(parts) == 3 else ["*.safetensors"]
    return _one_lora_file(_hub_files(repo, patterns, f"LoRA {source!r}"), source, name=parts[2:])


def _one_lora_file(folder: Path, source: str, *, name: list[str] | None = None) -> Path:
    if name:
        return folder / name[0]
    if (folder / LORA_FILE).is_file():
        return folder / LORA_FILE
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise RiffusionError(
            f"LoRA {source!r}: expected one .safetensors file in the folder, found {found}; name the file"
        )
    return files[0]


def _hub_files(repo: str, patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):
        folder = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
        if any(folder.glob(p) for p in patterns):
            return folder
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as exc:
        raise RiffusionError(
            f"{what} is not in the local hub cache and could not be downloaded ({type(exc).__name__}); "
            f"fetch it where there is network with `hf download {repo}` or pass a local path"
        ) from exc


def tiny_vae_source(vae: str, *, random_preset: bool) -> str | None:
    """The folder or hub id of a ``--vae`` value; None for a random preset's random TAESD."""
    if vae.startswith("tiny="):
        return vae.split("=", 1)[1]
    return None if random_preset else TINY_VAE


def tiny_vae_folder(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RiffusionError(
                f"tiny VAE folder {source!r} has no config.json (diffusers' AutoencoderTiny layout)"
            )
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise RiffusionError(f"tiny VAE {source!r} is not a folder or a hub id (owner/name)")
    return _hub_files(source, ["config.json", "*.safetensors"], f"tiny VAE {source!r}")


def _vae_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")


# -- applying them ---------------------------------------------------------------------


def tiny_vae(vae: str, *, random_preset: bool, seed: int = 0) -> Any:
    """The AutoencoderTiny a ``--vae`` value names: TAESD's weights, or seeded random
    weights of TAESD's architecture for a random preset."""
    import torch
    from diffusers import AutoencoderTiny

    source = tiny_vae_source(vae, random_preset=random_preset)
    if source is None:
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed + 1)
            return AutoencoderTiny().eval()  # its defaults are TAESD's architecture
        finally:
            torch.random.set_rng_state(state)
    folder = tiny_vae_folder(source)
    try:
        return AutoencoderTiny.from_pretrained(folder).eval()
    except (OSError, ValueError) as exc:
        raise RiffusionError(f"cannot load the tiny VAE {source!r}: {exc}") from exc


def lora_state_dict(lora: Lora, components: Any, *, random_preset: bool, seed: int = 0) -> dict[str, Any]:
    """The LoRA's weights as diffusers reads them (kohya names converted), or the random
    LoRA's; RiffusionError when the file cannot be read."""
    if lora.source == RANDOM_LORA:
        check_random_lora(random_preset)
        return random_lora(components.unet, seed=seed)
    from diffusers import StableDiffusionPipeline

    path = lora_file(lora.source)
    try:
        with _quiet():
            state_dict, _alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    except Exception as exc:  # diffusers raises many types for a file it cannot read
        raise RiffusionError(
            f"cannot read LoRA {lora.source!r}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    return state_dict


def check_finite(lora: Lora, state_dict: dict[str, Any]) -> None:
    """RiffusionError naming the first weight of the LoRA that holds NaN or inf: fused, it
    would make every clip NaN (a black spectrogram, full-scale noise)."""
    import torch

    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise RiffusionError(f"--lora {lora.source}: weight {key} holds NaN or inf values")


def check_fits(lora: Lora, state_dict: dict[str, Any], components: Any) -> None:
    """RiffusionError naming the first weight of the LoRA that fits no layer of the model:
    a component it lacks (an SDXL LoRA's second text encoder), a layer it lacks, or a
    layer of another size. Keys are checked in PEFT's form, converted by diffusers' own
    functions, as ``load_lora_weights`` converts them."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    parts: dict[str, dict[str, Any]] = {"unet": {}, "text_encoder": {}}
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts or not rest:
            raise RiffusionError(
                f"LoRA {lora.source!r} does not fit this model: key {key!r} is for a component it "
                "lacks (a LoRA for SDXL or another architecture?)"
            )
        parts[prefix][rest] = value
    converted = {
        "unet": convert_unet_state_dict_to_peft(parts["unet"]) if parts["unet"] else {},
        "text_encoder": convert_state_dict_to_peft(convert_state_dict_to_diffusers(parts["text_encoder"]))
        if parts["text_encoder"]
        else {},
    }
    if not any(converted.values()):
        raise RiffusionError(f"LoRA {lora.source!r} holds no UNet or text-encoder weights")
    for component, weights in converted.items():
        model = getattr(components, component)
        if component == "text_encoder" and not hasattr(model, "text_model"):
            # diffusers does the same for transformers' flattened CLIPTextModel
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
        modules = dict(model.named_modules())
        for key, value in weights.items():
            problem = _misfit(key, tuple(value.shape), modules)
            if problem:
                raise RiffusionError(
                    f"LoRA {lora.source!r} does not fit this model: {component}.{key} {problem}"
                )


def _misfit(key: str, shape: tuple[int, ...], modules: dict[str, Any]) -> str | None:
    import torch

    sides = [
        (key.split(marker)[0], side)
        for marker, side in ((".lora_A.", "in"), (".lora_B.", "out"))
        if marker in key
    ]
    if not sides:
        return "is not a LoRA down or up weight"
    path, side = sides[0]
    module = modules.get(path)
    if module is None:
        return f"names a layer the model lacks ({path})"
    if isinstance(module, torch.nn.Linear):
        size = module.in_features if side == "in" else module.out_features
    elif isinstance(module, torch.nn.Conv2d):
        size = module.in_channels if side == "in" else module.out_channels
    else:
        return f"adapts a {type(module).__name__}, which takes no LoRA"
    have = shape[1] if side == "in" else shape[0]
    if len(shape) < 2 or have != size:
        return f"has shape {list(shape)}; the layer's {side}put size is {size}"
    return None


def fuse_loras(pipe: Any, loras: tuple[Lora, ...], *, random_preset: bool, seed: int = 0) -> None:
    """Each LoRA checked against the model of diffusers' pipeline ``pipe``, loaded by it
    and fused at its scale; the LoRA layers are removed afterwards, leaving plain fused
    weights in ``pipe.unet`` and ``pipe.text_encoder``."""
    try:
        import peft  # noqa: F401  (diffusers' LoRA loading runs on PEFT)
    except ImportError as exc:
        raise RiffusionError("--lora needs PEFT: pip install 'riffusion-engine[models]'") from exc
    weights = [lora_state_dict(lora, pipe, random_preset=random_preset, seed=seed) for lora in loras]
    for lora, state_dict in zip(loras, weights, strict=True):
        check_finite(lora, state_dict)
        check_fits(lora, state_dict, pipe)
    with _quiet():
        for index, (lora, state_dict) in enumerate(zip(loras, weights, strict=True)):
            name = f"lora{index}"
            try:
                pipe.load_lora_weights(dict(state_dict), adapter_name=name)
            except Exception as exc:
                raise RiffusionError(
                    f"cannot load LoRA {lora.source!r}: {type(exc).__name__}: {_first_line(exc)}"
                ) from exc
            pipe.fuse_lora(lora_scale=lora.scale, adapter_names=[name])
            log.info("fused LoRA %s", lora)
        pipe.unload_lora_weights()


def random_lora(unet: Any, *, seed: int = 0) -> dict[str, Any]:
    """A seeded random LoRA (PEFT's key names, rank :data:`RANDOM_LORA_RANK`) for every
    layer of ``unet`` that :data:`RANDOM_LORA_TARGETS` names."""
    import torch

    generator = torch.Generator().manual_seed(seed + 2)
    weights = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(RANDOM_LORA_TARGETS):
            r = RANDOM_LORA_RANK
            down = torch.randn(r, module.in_features, generator=generator) / module.in_features**0.5
            up = torch.randn(module.out_features, r, generator=generator) * (0.02 / r**0.5)
            weights[f"unet.{name}.lora_A.weight"] = down
            weights[f"unet.{name}.lora_B.weight"] = up
    return weights


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' and transformers' loading reports (per-key tables) at error level only."""
    import diffusers
    import transformers

    levels = (diffusers.utils.logging.get_verbosity(), transformers.logging.get_verbosity())
    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""
