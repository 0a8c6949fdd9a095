"""Write a diffusers-format model as an original Stable Diffusion (LDM) single-file
checkpoint, the layout of ``riffusion-model-v1.ckpt``: the keys of CompVis'
``ldm`` modules under ``model.diffusion_model.``, ``first_stage_model.`` and
``cond_stage_model.transformer.``. diffusers reads this layout (``from_single_file``)
but ships no writer; tests check this one by loading its output through diffusers."""

from __future__ import annotations

import re
from typing import Any

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_key(key: str, config: Any) -> str:
    # LDM numbers the blocks of a down level's layers and its downsampler in one sequence
    per_level = config.layers_per_block + 1
    for ours, theirs in _UNET_TOP.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        side, level, kind, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if side == "down":
            if kind == "downsamplers":
                return f"input_blocks.{per_level * (level + 1)}.0.op.{rest.removeprefix('conv.')}"
            block = f"input_blocks.{per_level * level + index + 1}"
        else:
            # an up level has one layer more than a down level and no resampler block
            # of its own: the upsampler sits in its last layer, after the attention
            if kind == "upsamplers":
                has_attention = config.up_block_types[level].startswith("CrossAttn")
                last = per_level * level + per_level - 1
                return f"output_blocks.{last}.{2 if has_attention else 1}.{rest}"
            block = f"output_blocks.{per_level * level + index}"
        return _resnet_rest(f"{block}.0", rest) if kind == "resnets" else f"{block}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return _resnet_rest(f"middle_block.{2 * int(m[2])}", m[3])
    raise KeyError(key)


def _resnet_rest(block: str, rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{block}.{_RESNET[name]}.{tail}"


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(key: str, levels: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    # LDM's decoder counts its levels from the lowest resolution up, diffusers' from the top
    key = re.sub(
        r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
        lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
        key,
    )
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    if ".mid_block.attentions.0." in key:
        head, rest = key.split(".mid_block.attentions.0.")
        for ours, theirs in _VAE_ATTENTION.items():
            if rest.startswith(ours + "."):
                return f"{head}.mid.attn_1.{theirs}{rest[len(ours) :]}"
        raise KeyError(key)
    return key


def ldm_state_dict(components: Any) -> dict[str, Any]:
    """The components' weights (UNet, VAE, text encoder) under the LDM keys."""
    out: dict[str, Any] = {}
    for key, value in components.unet.state_dict().items():
        out["model.diffusion_model." + _unet_key(key, components.unet.config)] = value
    levels = len(components.vae.config.block_out_channels)
    for key, value in components.vae.state_dict().items():
        ldm = _vae_key(key, levels)
        if ".mid.attn_1." in ldm and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out["first_stage_model." + ldm] = value
    for key, value in components.text_encoder.state_dict().items():
        # transformers 4's CLIPTextModel keys (the real checkpoints'); 5 drops the prefix
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return {k: v.contiguous().clone() for k, v in out.items()}
