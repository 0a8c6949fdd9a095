"""Model sources: a diffusers-format directory, a hub id, or a built-in random preset.

``random:tiny`` builds tiny versions of Riffusion's classes (seconds on a CPU);
``random:full`` builds Riffusion v1's exact architecture (Stable Diffusion 1.5 UNet,
CLIP ViT-L/14 text encoder, AutoencoderKL) with seeded random weights. Random
presets carry a byte-level CLIP tokenizer generated locally, so nothing is
downloaded unless the user names a hub id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..kernels.errors import RiffusionError
from .adapters import Variant, fuse_loras, tiny_vae

log = logging.getLogger(__name__)

DEFAULT_MODEL = "riffusion/riffusion-model-v1"
VAE_SCALING = 0.18215

# Riffusion v1's scheduler (its checkpoint's scheduler_config.json).
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


# (text encoder, UNet, VAE) configuration of each random preset. "full" is Riffusion
# v1's architecture: Stable Diffusion 1.5's UNet, CLIP ViT-L/14's text encoder, its VAE.
_PRESET_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "tiny": (
        dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=16,
            sample_size=16,
        ),
        dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=16, sample_size=128),
    ),
    "full": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            sample_size=64,
        ),
        dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512
        ),
    ),
}
RANDOM_PRESETS = tuple(f"random:{size}" for size in _PRESET_CONFIGS)


@dataclass
class Components:
    """The pieces of a Riffusion pipeline, in torch."""

    model_id: str  # what the user named
    content_hash: str  # sha256 of the source: its files, or a preset's description (source_hash)
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler: Any

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a diffusers-format directory (Riffusion's checkpoint layout)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
            getattr(self, name).save_pretrained(path / name)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "unet": ["diffusers", type(self.unet).__name__],
            "vae": ["diffusers", type(self.vae).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        return path


def diffusers_pipeline(components: Components, *, img2img: bool = False, scheduler: Any = None) -> Any:
    """diffusers' own Stable Diffusion pipeline (text-to-image, or img2img) over the
    components: the reference the engine is checked and benchmarked against."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler if scheduler is not None else components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_components(
    model: str = DEFAULT_MODEL, *, seed: int = 0, variant: Variant | None = None
) -> Components:
    """Components from a preset name, a directory, or a hub id (downloaded through
    huggingface_hub's cache; a clear error when offline with no cached copy), with
    ``variant``'s LoRAs fused and its VAE swapped in."""
    kind, where = resolve_source(model)
    if kind == "preset":
        components = random_components(where, seed=seed)
    elif kind == "checkpoint":
        components = _load_checkpoint(Path(where), model)
    else:
        components = _load_directory(Path(where), model)
    if variant is not None:
        apply_variant(components, variant, random_preset=kind == "preset", seed=seed)
    return components


def apply_variant(components: Components, variant: Variant, *, random_preset: bool, seed: int = 0) -> None:
    """Fuse ``variant``'s LoRAs into ``components`` and swap in its VAE, in place."""
    if variant.loras:
        pipe = diffusers_pipeline(components)
        fuse_loras(pipe, variant.loras, random_preset=random_preset, seed=seed)
        components.unet, components.text_encoder = pipe.unet.eval(), pipe.text_encoder.eval()
    if variant.vae is not None:
        components.vae = tiny_vae(variant.vae, random_preset=random_preset, seed=seed)


def is_random_preset(model: str) -> bool:
    return model.startswith("random:")


def is_tiny_vae(vae: Any) -> bool:
    """Whether ``vae`` is diffusers' AutoencoderTiny (TAESD): a deterministic encoder."""
    return type(vae).__name__ == "AutoencoderTiny"


def vae_factor(vae: Any) -> int:
    """Image pixels per latent pixel of an AutoencoderKL or AutoencoderTiny."""
    config = vae.config
    blocks = getattr(config, "block_out_channels", None) or config.encoder_block_out_channels
    return 2 ** (len(blocks) - 1)


CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")


def resolve_source(model: str) -> tuple[str, str]:
    """``("preset", size)``, ``("directory", path)`` or ``("checkpoint", file)``; a hub
    id resolves to its local snapshot."""
    if model.startswith("random:"):
        if model not in RANDOM_PRESETS:
            raise RiffusionError(f"unknown preset {model!r}; choose one of {', '.join(RANDOM_PRESETS)}")
        return "preset", model.split(":", 1)[1]
    path = Path(model).expanduser()
    if path.is_dir():
        return "directory", str(path)
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint", str(path)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise RiffusionError(
            f"model {model!r} is not a diffusers-format directory, a single-file checkpoint "
            f"({' or '.join(CHECKPOINT_SUFFIXES)}), a hub id (owner/name) "
            f"or one of {', '.join(RANDOM_PRESETS)}"
        )
    return "directory", str(_hub_snapshot(model))


def source_hash(model: str, *, seed: int = 0) -> str:
    """The content hash of a model source without loading it: the files of a directory
    or hub snapshot; for a random preset, its configuration, seed and the versions of
    the libraries that draw its weights."""
    kind, where = resolve_source(model)
    if kind == "directory":
        return directory_hash(Path(where))
    if kind == "checkpoint":
        config = checkpoint_config(Path(where))
        files = [f for f in select_files(_repository_files(config)) if not f.endswith(WEIGHT_SUFFIXES)]
        digest = hashlib.sha256(directory_hash(config, files).encode())
        digest.update(directory_hash(Path(where).parent, [Path(where).name]).encode())
        return digest.hexdigest()
    from importlib.metadata import version

    description = {
        "preset": where,
        "seed": seed,
        "configs": _PRESET_CONFIGS[where],
        "versions": [version(name) for name in ("torch", "diffusers", "transformers")],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def select_files(files: list[str]) -> list[str]:
    """Of a model repository's files (relative POSIX paths), the ones the engine loads:
    ``model_index.json`` and, in each component folder, its configuration and tokenizer
    files and its weights — ``.safetensors`` where the folder has them, ``.bin``
    otherwise. Never the single-file checkpoint (``*.ckpt``, a top-level
    ``*.safetensors``), a traced UNet (``*.pt``), the safety checker, the feature
    extractor, or weight variants (``*.fp16.safetensors``)."""
    chosen = [f for f in files if f == "model_index.json"]
    for component in COMPONENTS:
        inside = [f for f in files if f.count("/") == 1 and f.startswith(f"{component}/")]
        names = {f: f.split("/", 1)[1] for f in inside}

        def weights(suffix: str, names: dict[str, str] = names) -> list[str]:
            # "model.safetensors" or shards "model-00001-of-00002.safetensors"; not "x.fp16.safetensors"
            return [f for f, n in names.items() if n.endswith(suffix) and "." not in n[: -len(suffix)]]

        fmt = next((s for s in WEIGHT_SUFFIXES if weights(s)), None)
        for f, name in names.items():
            if name.endswith((".json", ".txt")):
                index = name.endswith(".index.json")
                if not index or (fmt is not None and name.endswith(f"{fmt}.index.json")):
                    chosen.append(f)
        if fmt is not None:
            chosen += weights(fmt)
    return sorted(chosen)


def _repository_files(path: Path) -> list[str]:
    return sorted(
        p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts
    )


def _snapshot(
    repo_id: str,
    what: str,
    cached: list[str],
    wanted: Callable[[], list[str]],
    error: Callable[[Exception], str],
) -> Path:
    """A local snapshot of ``repo_id``: the files of the hub cache matching ``cached``,
    else a download of the patterns ``wanted()`` returns; RiffusionError(``error(exc)``)
    when that fails too (offline, say)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=cached, local_files_only=True))
    except Exception:
        log.info("%s is not in the local hub cache; downloading it", what)
    unreachable = _hub_unreachable()
    if unreachable is not None:  # at once, not after the hub client's retries
        raise RiffusionError(error(ConnectionError(unreachable)))
    try:
        return Path(snapshot_download(repo_id, allow_patterns=wanted()))
    except Exception as exc:
        raise RiffusionError(error(exc)) from exc


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (offline mode, or no TCP connection to its endpoint
    within ``timeout``), or None; None too behind a proxy, which only a request tells."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port} unreachable: {exc}"
    return None


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import HfApi

    # What may be in the cache already: the components' folders (the cache holds what an
    # earlier download selected).
    cached = ["model_index.json", *(f"{c}/*" for c in COMPONENTS)]
    return _snapshot(
        repo_id,
        repo_id,
        cached,
        lambda: select_files(HfApi().list_repo_files(repo_id)),
        lambda exc: (
            f"model {repo_id!r} is not in the local cache and could not be downloaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
            "fetch it where there is network with "
            f"`hf download {repo_id}` or pass a local diffusers-format directory"
        ),
    )


def checkpoint_config(checkpoint: Path) -> Path:
    """The diffusers-format configuration a single-file checkpoint is read with: the
    folder it lies in when that folder holds ``model_index.json`` (the hub repository's
    layout, and a place to put a fine-tune's configs), else the configuration and
    tokenizer files of :data:`DEFAULT_MODEL` (kilobytes from the hub, or its cache)."""
    if (checkpoint.parent / "model_index.json").is_file():
        return checkpoint.parent
    configs = ["model_index.json", *(f"{c}/*.{ext}" for c in COMPONENTS for ext in ("json", "txt"))]
    return _snapshot(
        DEFAULT_MODEL,
        f"{DEFAULT_MODEL}'s configuration",
        configs,
        lambda: configs,
        lambda exc: (
            f"checkpoint {str(checkpoint)!r} needs a model configuration: put it in a folder with "
            f"model_index.json and the component folders' configs (a diffusers-format directory's "
            f".json and .txt files), or fetch {DEFAULT_MODEL}'s where there is network with "
            f"`hf download {DEFAULT_MODEL} --include '*.json' '*.txt'` ({type(exc).__name__})"
        ),
    )


def _load_checkpoint(path: Path, model_id: str) -> Components:
    """A single-file Stable Diffusion checkpoint (the original LDM layout, as
    ``riffusion-model-v1.ckpt``) through diffusers' single-file loading."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    config = checkpoint_config(path)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as exc:  # diffusers raises many types here; all mean "cannot load it"
        raise RiffusionError(
            f"cannot load checkpoint {str(path)!r} with the configuration in {str(config)!r}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    return Components(
        model_id=model_id,
        content_hash=source_hash(str(path)),
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder.eval(),
        unet=pipe.unet.eval(),
        vae=pipe.vae.eval(),
        scheduler=PNDMScheduler.from_pretrained(config / "scheduler"),  # as a directory's
    )


def _no_weight_loading_bar() -> None:
    """transformers 5 draws a "Loading weights" bar for each model read from disk (a fraction
    of a second, beside the engine's own output); its tqdm hook (a public API since 5.x,
    which 4.x has no such bar to need) leaves every other bar, the hub's downloads
    included, as it is."""
    from transformers.utils import logging as transformers_logging

    if not hasattr(transformers_logging, "set_tqdm_hook"):
        return

    def hook(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    transformers_logging.set_tqdm_hook(hook)


def _load_directory(path: Path, model_id: str) -> Components:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    missing = [name for name in ("model_index.json", *COMPONENTS) if not (path / name).exists()]
    if missing:
        raise RiffusionError(f"model directory {str(path)!r} lacks {', '.join(missing)}")
    files = select_files(_repository_files(path))
    for component in ("text_encoder", "unet", "vae"):
        if not any(f.startswith(f"{component}/") and f.endswith(WEIGHT_SUFFIXES) for f in files):
            raise RiffusionError(
                f"model directory {str(path)!r}: {component}/ holds no weights (.safetensors or .bin)"
            )
    _no_weight_loading_bar()
    try:
        return Components(
            model_id=model_id,
            content_hash=directory_hash(path, files),
            tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder").eval(),
            unet=UNet2DConditionModel.from_pretrained(path / "unet").eval(),
            vae=AutoencoderKL.from_pretrained(path / "vae").eval(),
            scheduler=PNDMScheduler.from_pretrained(path / "scheduler"),
        )
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise RiffusionError(f"cannot load model directory {str(path)!r}: {exc}") from exc


def directory_hash(path: Path, files: list[str] | None = None) -> str:
    """sha256 over the relative path, size and content of each of ``files`` (by default
    the ones the engine loads: :func:`select_files`), each delimited, so moving bytes from
    one file into another, or renaming, changes it."""
    digest = hashlib.sha256()
    for name in sorted(select_files(_repository_files(path)) if files is None else files):
        file = path / name
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def random_components(size: str, *, seed: int = 0) -> Components:
    """Seeded random weights in Riffusion's classes; ``size`` is ``tiny`` or ``full``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in _PRESET_CONFIGS:
        raise RiffusionError(f"unknown random preset size {size!r}; choose {' or '.join(_PRESET_CONFIGS)}")
    text, unet, vae = _PRESET_CONFIGS[size]
    tokenizer = byte_level_tokenizer()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=text["hidden_size"],
                **text,
            )
        ).eval()
        unet_model = UNet2DConditionModel(in_channels=4, out_channels=4, **unet).eval()
        vae_model = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=VAE_SCALING,
            **vae,
        ).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = PNDMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "trained_betas"})
    name = f"random:{size}"
    return Components(
        model_id=name,
        content_hash=source_hash(name, seed=seed),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet_model,
        vae=vae_model,
        scheduler=scheduler,
    )


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_level_tokenizer() -> Any:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (plain and
    word-final) plus CLIP's special tokens, built locally; ids fit CLIP's 49408."""
    import tempfile

    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # Through files, as a checkpoint's tokenizer folder holds it: every transformers
    # release this project supports reads these (their constructors' arguments differ).
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)
