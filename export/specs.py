"""Stage specs: each stage's tensors declared once.

A :class:`StageSpec` gives a stage's input and output names, dtypes and shapes, whose
dynamic dimensions (:class:`Dim`) carry min/opt/max sizes. ONNX export takes its
dynamic axes and sample inputs from here, verification its inputs, TensorRT its
optimization profiles, and the manifest records the specs for the runtime's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..kernels.errors import RiffusionError

STAGES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# DeepCache's stage: the UNet's shallow branch on the feature its full call kept. Exported
# (beside ``unet``, which then also returns that feature) when a profile names a branch.
SHALLOW = "unet_shallow"
# The narrowest clip (pixels) of a dynamic profile whose --width is wider: 2.56 s.
NARROWEST = 256
FEATURE = "deep_feature"  # the UNet's second output there, and the shallow stage's last input
HEIGHT = 512  # image height in pixels: Riffusion's 512 mel bins
WIDTH = 512  # the default image width in pixels: 512 columns = 5.12 s
Which = Literal["min", "opt", "max"]


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: its name in the ONNX graph and its profile sizes."""

    name: str  # symbolic name (batch, latent_height, ...)
    min: int  # smallest size a TensorRT profile accepts
    opt: int  # size TensorRT tunes for; the size of the sample inputs
    max: int  # largest size a TensorRT profile accepts
    base: str | None = None  # the dimension this one is a multiple of (height of latent_height)
    factor: int = 1  # size = factor x base's size
    divisor: int = 1  # ... / divisor (DeepCache's feature: latent sizes over its downsampling)

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise RiffusionError(f"dimension {self.name}: need 1 <= min <= opt <= max, got {self}")

    def size(self, which: Which) -> int:
        return {"min": self.min, "opt": self.opt, "max": self.max}[which]

    def scaled(self, name: str, factor: int, divisor: int = 1) -> Dim:
        """The dimension ``factor`` times this one (divided by ``divisor``, which divides it)."""
        sizes = (self.min * factor // divisor, self.opt * factor // divisor, self.max * factor // divisor)
        return Dim(name, *sizes, base=self.name, factor=factor, divisor=divisor)

    def derived(self, base_size: int) -> int:
        """This dimension's size where its base's is ``base_size``."""
        return base_size * self.factor // self.divisor

    def to_dict(self) -> dict[str, Any]:
        sizes = {"min": self.min, "opt": self.opt, "max": self.max, "base": self.base, "factor": self.factor}
        return sizes if self.divisor == 1 else {**sizes, "divisor": self.divisor}


Sample = Literal["normal", "image", "tokens", "timestep"]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor."""

    name: str  # ONNX input/output name
    dtype: Literal["float32", "int32"]  # element type at the stage boundary
    shape: tuple[int | Dim, ...]  # fixed sizes and dynamic dimensions
    sample: Sample = "normal"  # how sample inputs are drawn (inputs only)
    high: int = 0  # exclusive upper bound of token ids (sample == "tokens")

    def size(self, which: Which) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else d.size(which) for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        return {axis: d.name for axis, d in enumerate(self.shape) if isinstance(d, Dim)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [d if isinstance(d, int) else d.name for d in self.shape],
            **{which: list(self.size(which)) for which in ("min", "opt", "max")},
        }


@dataclass(frozen=True)
class StageSpec:
    """One stage of the chain: its inputs and outputs."""

    name: str  # one of STAGES
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_type: str = field(default="", compare=False)  # ONNX Runtime optimizer's model type

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def input_shapes(self, which: Which) -> dict[str, tuple[int, ...]]:
        return {t.name: t.size(which) for t in self.inputs}

    @property
    def max_rows(self) -> int:
        """The most rows (first dimension) one call takes: the profile's batch maximum."""
        return min(t.size("max")[0] for t in self.inputs)

    def output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Each output's shape, in order, from the inputs' shapes and the dimension table."""
        sizes: dict[str, int] = {}
        for tensor in self.inputs:
            for dim, size in zip(tensor.shape, input_shapes[tensor.name], strict=True):
                if isinstance(dim, Dim):
                    sizes[dim.name] = int(size)
                    if dim.base is not None:  # the tiny VAE's encoder: latent sizes from the image's
                        sizes.setdefault(dim.base, int(size) * dim.divisor // dim.factor)

        def size(dim: int | Dim) -> int:
            if isinstance(dim, int):
                return dim
            if dim.name in sizes:
                return sizes[dim.name]
            assert dim.base is not None, f"{self.name}: output {dim.name} derives from no input"
            return dim.derived(sizes[dim.base])

        return [tuple(size(dim) for dim in output.shape) for output in self.outputs]

    def sample_inputs(self, *, which: Which = "opt", seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic inputs at the ``which`` sizes, drawn as each input declares."""
        rng = np.random.default_rng(seed)
        return {t.name: _draw(t, t.size(which), rng) for t in self.inputs}

    def to_dict(self) -> dict[str, Any]:
        """Names, dtypes and shapes of the inputs and outputs; ``dims`` gives each dynamic
        dimension's sizes and, for a derived one, its base and factor, from which the
        runtime sizes output buffers."""
        tensors = (*self.inputs, *self.outputs)
        dims = {d.name: d.to_dict() for t in tensors for d in t.shape if isinstance(d, Dim)}
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dims": dims,
        }


def _draw(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if spec.sample == "tokens":
        # (batch, tokens): start token, random ids, end token, padding, as a tokenizer pads.
        ids = rng.integers(0, spec.high - 2, size=shape)
        ids[:, 0] = spec.high - 2
        lengths = rng.integers(2, shape[1] + 1, size=shape[0])
        for row, length in enumerate(lengths):
            ids[row, length - 1 :] = spec.high - 1
        return ids.astype(np.int32)
    if spec.sample == "timestep":
        return rng.uniform(0, 999, size=shape).round().astype(np.float32)
    if spec.sample == "image":
        return rng.uniform(-1, 1, size=shape).astype(np.float32)
    return rng.standard_normal(shape, dtype=np.float32)


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a model that the stage shapes depend on."""

    tokens: int  # text encoder's sequence length (77)
    vocab: int  # token ids are below this
    text_hidden: int  # text embedding width (768 for CLIP ViT-L/14)
    latent_channels: int  # 4
    vae_factor: int  # image pixels per latent pixel (8)
    unet_factor: int  # the UNet's total downsampling; latent sizes are multiples of it
    sampled_vae: bool = True  # the VAE encoder samples a posterior (takes noise); not the tiny VAE
    block_channels: tuple[int, ...] = ()  # the UNet's channels per resolution (DeepCache's feature)
    layers_per_block: int = 0  # resnets per down block (an up block has one more)

    @classmethod
    def of(cls, components: Any) -> ModelDims:
        from .models import is_tiny_vae, vae_factor

        text, unet = components.text_encoder.config, components.unet.config
        if unet.cross_attention_dim != text.hidden_size:
            raise RiffusionError(
                f"UNet cross-attention width {unet.cross_attention_dim} does not match the text "
                f"encoder's hidden size {text.hidden_size}"
            )
        return cls(
            tokens=text.max_position_embeddings,
            vocab=text.vocab_size,
            text_hidden=text.hidden_size,
            latent_channels=components.vae.config.latent_channels,
            vae_factor=vae_factor(components.vae),
            unet_factor=2 ** (len(unet.block_out_channels) - 1),
            sampled_vae=not is_tiny_vae(components.vae),
            block_channels=tuple(unet.block_out_channels),
            layers_per_block=int(unet.layers_per_block),
        )

    @property
    def pixel_multiple(self) -> int:
        """Image sizes the exported UNet accepts are multiples of this."""
        return self.vae_factor * self.unet_factor

    def deep_feature(self, branch: int) -> tuple[int, int]:
        """The channels and the downsampling of the feature DeepCache keeps at ``branch``."""
        return deep_feature(self.block_channels, self.layers_per_block, branch)


def deep_feature(block_channels: tuple[int, ...], layers_per_block: int, branch: int) -> tuple[int, int]:
    """The channels and the downsampling (of the latents) of the feature DeepCache keeps
    at ``branch`` (:func:`branch_position`) in a UNet of ``block_channels``."""
    block, layer = branch_position(branch, len(block_channels), layers_per_block)
    if layer < layers_per_block:  # an up block's layer output: that block's width
        return block_channels[block], 2**block
    # The up block's input: the deeper up block's upsampled output, or the mid block's.
    return block_channels[min(block + 1, len(block_channels) - 1)], 2**block


def branch_position(branch: int, blocks: int, layers_per_block: int) -> tuple[int, int]:
    """DeepCache's branch as (block, layer), numbered as its ``cache_branch_id``: block
    ``branch // (layers_per_block + 1)`` from the shallowest, layer the rest. A full call
    keeps the input of that up block's layer (its layers counted from the output end); a
    shallow call reruns that block's first ``layer`` down layers and the up layers from it
    out, with every shallower block, on the kept feature."""
    per_block = layers_per_block + 1
    if not isinstance(branch, int) or not 0 <= branch < blocks * per_block:
        raise RiffusionError(
            f"DeepCache branch must be 0..{blocks * per_block - 1} for this UNet "
            f"({blocks} blocks of {per_block} up layers), got {branch!r}"
        )
    return divmod(branch, per_block)


@dataclass(frozen=True)
class ShapeProfile:
    """The image sizes and batch an export is built for."""

    height: int = HEIGHT  # image height in pixels (Riffusion: 512 mel bins)
    width: int = WIDTH  # image width in pixels (512 = 5.12 s); the optimized width
    max_width: int | None = None  # widest image accepted (longer clips); None = width
    max_batch: int = 4  # most clips per call (the UNet sees twice this with guidance)
    static: bool = False  # one shape only (batch max_batch, width width): CUDA graphs
    # Classifier-free guidance: the UNet sees two rows per clip (unconditional and
    # conditional). False (guidance off, as few-step LoRAs run): one row per clip, and the
    # UNet's TensorRT profile is tuned for one.
    guidance: bool = True
    # DeepCache's branch (ModelDims.deep_feature): the UNet also returns the feature kept
    # there, and the unet_shallow stage runs on it. None: no DeepCache stages.
    deep_cache_branch: int | None = None

    def __post_init__(self) -> None:
        if self.deep_cache_branch is not None and (
            not isinstance(self.deep_cache_branch, int) or self.deep_cache_branch < 0
        ):
            raise RiffusionError(
                f"deep_cache_branch must be a branch number >= 0, got {self.deep_cache_branch!r}"
            )
        for name in ("height", "width", "max_batch"):
            if getattr(self, name) < 1:
                raise RiffusionError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_width is not None and self.max_width < self.width:
            raise RiffusionError(f"max_width {self.max_width} is smaller than width {self.width}")
        if self.static and self.max_width not in (None, self.width):
            raise RiffusionError("a static profile has one width: leave max_width unset")

    @property
    def widest(self) -> int:
        return self.width if self.max_width is None else self.max_width

    def check(self, dims: ModelDims) -> None:
        if self.deep_cache_branch is not None:
            branch_position(self.deep_cache_branch, len(dims.block_channels), dims.layers_per_block)
        multiple = dims.pixel_multiple
        for name in ("height", "width", "max_width"):
            value = getattr(self, name)
            if value is not None and value % multiple:
                raise RiffusionError(f"{name} {value} is not a multiple of {multiple} pixels for this model")

    def to_dict(self) -> dict[str, Any]:
        sizes = {
            "height": self.height,
            "width": self.width,
            "max_width": self.widest,
            "max_batch": self.max_batch,
            "static": self.static,
        }
        # Only where set: exports made before the fields keep their cache keys.
        if not self.guidance:
            sizes["guidance"] = False
        if self.deep_cache_branch is not None:
            sizes["deep_cache_branch"] = self.deep_cache_branch
        return sizes


def stage_specs(dims: ModelDims, profile: ShapeProfile) -> dict[str, StageSpec]:
    """The four stage specs of a model under a shape profile.

    Batch: 1..max_batch clips, optimized for one; the text encoder and UNet see up to two
    rows per clip (unconditional and conditional; one when a single prompt is encoded or
    guidance is off), optimized for two; a profile without guidance, one row per clip,
    optimized for one. Height is fixed at the profile's height; width
    runs from the smaller of width and 256 pixels up to max_width. A static profile
    collapses every range to one size: max_batch clips of width pixels. Image sizes are
    derived from latent sizes (factor 8), so the runtime can size the VAE's outputs.
    With a DeepCache branch the UNet also returns the feature kept there, and the
    ``unet_shallow`` stage takes it besides the UNet's inputs.
    """
    profile.check(dims)
    f = dims.vae_factor
    per_clip = 2 if profile.guidance else 1  # UNet rows per clip
    if profile.static:
        clips = Dim("batch", profile.max_batch, profile.max_batch, profile.max_batch)
        rows = Dim("batch", *(per_clip * profile.max_batch,) * 3)
        widths = (profile.width,) * 3
    else:
        clips = Dim("batch", 1, 1, profile.max_batch)
        rows = Dim("batch", 1, per_clip, per_clip * profile.max_batch)
        widths = (min(profile.width, max(NARROWEST, dims.pixel_multiple)), profile.width, profile.widest)
    lh = Dim("latent_height", *(profile.height // f,) * 3)
    lw = Dim("latent_width", *(w // f for w in widths))
    height, width = lh.scaled("height", f), lw.scaled("width", f)
    c = dims.latent_channels

    def latent(name: str, batch: Dim, sample: Sample = "normal") -> TensorSpec:
        return TensorSpec(name, "float32", (batch, c, lh, lw), sample)

    def image(name: str, batch: Dim) -> TensorSpec:
        return TensorSpec(name, "float32", (batch, 3, height, width), "image")

    embeddings = TensorSpec("text_embeddings", "float32", (rows, dims.tokens, dims.text_hidden))
    unet_inputs = (
        latent("sample", rows),
        TensorSpec("timestep", "float32", (rows,), "timestep"),
        TensorSpec("encoder_hidden_states", "float32", embeddings.shape),
    )
    unet_outputs: tuple[TensorSpec, ...] = (latent("noise_pred", rows),)
    deep: dict[str, StageSpec] = {}
    if profile.deep_cache_branch is not None:
        channels, down = dims.deep_feature(profile.deep_cache_branch)
        feature = TensorSpec(
            FEATURE,
            "float32",
            (rows, channels, lh.scaled("deep_height", 1, down), lw.scaled("deep_width", 1, down)),
        )
        unet_outputs += (feature,)
        deep[SHALLOW] = StageSpec(
            SHALLOW, inputs=(*unet_inputs, feature), outputs=unet_outputs[:1], model_type="unet"
        )
    return {
        "text_encoder": StageSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int32", (rows, dims.tokens), "tokens", high=dims.vocab),),
            outputs=(embeddings,),
            model_type="clip",
        ),
        "unet": StageSpec("unet", inputs=unet_inputs, outputs=unet_outputs, model_type="unet"),
        "vae_decoder": StageSpec(
            "vae_decoder",
            inputs=(latent("latent", clips),),
            outputs=(image("image", clips),),
            model_type="vae",
        ),
        "vae_encoder": StageSpec(
            "vae_encoder",
            inputs=(image("image", clips), latent("noise", clips))
            if dims.sampled_vae
            else (image("image", clips),),
            outputs=(latent("latent", clips),),
            model_type="vae",
        ),
        **deep,
    }
