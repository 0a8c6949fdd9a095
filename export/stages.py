"""The four stages of the chain as torch modules with plain tensor inputs and outputs.

These modules fix what each stage computes (the VAE's latent scaling included), so
that the torch backend and every exported artifact agree on one definition:

- ``text_encoder``: token ids -> CLIP's last hidden state;
- ``unet``: noisy latents, timesteps, text embeddings -> predicted noise (with a
  DeepCache branch, also the feature kept there);
- ``unet_shallow``: the UNet's inputs and that feature -> predicted noise, through the
  shallow branch only (DeepCache: Ma et al., 2023, "DeepCache: Accelerating Diffusion
  Models for Free", arXiv:2312.00858);
- ``vae_decoder``: scaled latents -> image in [-1, 1] (not clamped);
- ``vae_encoder``: image in [-1, 1] and standard normal noise -> scaled latents sampled
  from the VAE's posterior, as diffusers' ``latent_dist.sample()`` draws them; the tiny
  VAE (AutoencoderTiny) encodes deterministically and takes the image only.
"""

from __future__ import annotations

from typing import Any

import torch

from .models import Components, is_tiny_vae
from .specs import SHALLOW, branch_position, deep_feature


class TextEncoderStage(torch.nn.Module):
    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # (batch, tokens) int32 -> (batch, tokens, hidden)
        return self.text_encoder(input_ids.long(), return_dict=False)[0]


class UNetStage(torch.nn.Module):
    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        # (batch, 4, h, w), (batch,), (batch, tokens, hidden) -> (batch, 4, h, w)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def _up_layer(unet: Any, block: int, layer: int) -> tuple[Any, Any | None]:
    """The resnet and attention (None in a block without) of DeepCache's up ``layer`` of
    ``block``, layers counted from the block's output end as DeepCache counts them."""
    up = unet.up_blocks[len(unet.up_blocks) - 1 - block]
    index = len(up.resnets) - 1 - layer
    attentions = getattr(up, "attentions", None)
    return up.resnets[index], attentions[index] if attentions is not None else None


class DeepCacheUNetStage(torch.nn.Module):
    """The UNet, exactly as ``UNetStage`` computes it, that also returns the feature a
    shallow call at ``branch`` starts from: the input of the branch's up layer, less the
    skip connection concatenated to it (taken by a hook on that layer's resnet)."""

    def __init__(self, unet: Any, branch: int) -> None:
        super().__init__()
        self.unet = unet
        self.block, self.layer = branch_position(branch, len(unet.up_blocks), unet.config.layers_per_block)
        self.resnet, _ = _up_layer(unet, self.block, self.layer)
        config = unet.config
        self.channels, _ = deep_feature(tuple(config.block_out_channels), config.layers_per_block, branch)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # (batch, 4, h, w), (batch,), (batch, tokens, hidden) -> (batch, 4, h, w), (batch, c, h', w')
        kept: list[torch.Tensor] = []

        def keep(_module: Any, args: tuple[Any, ...]) -> None:
            (hidden, *_rest) = args  # the feature, then the skip connection concatenated to it
            kept.append(hidden[:, : self.channels])

        hook = self.resnet.register_forward_pre_hook(keep)
        try:
            out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[
                0
            ]
        finally:
            hook.remove()
        (feature,) = kept
        return out, feature


class ShallowUNetStage(torch.nn.Module):
    """DeepCache's shallow call (the full call's skipped parts as DeepCacheSDHelper skips
    them): the time embedding and ``conv_in``, the down blocks shallower than the branch's
    whole and its own first ``layer`` down layers, then, from the kept feature, the
    branch's up layers from it out, its upsampler, every shallower up block and the output
    convolution. It holds the shared UNet, so the torch backend keeps one set of weights;
    its ONNX graph holds the shallow weights only."""

    def __init__(self, unet: Any, branch: int) -> None:
        super().__init__()
        self.unet = unet
        self.block, self.layer = branch_position(branch, len(unet.up_blocks), unet.config.layers_per_block)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        deep_feature: torch.Tensor,
    ) -> torch.Tensor:
        # (batch, 4, h, w), (batch,), (batch, tokens, hidden), (batch, c, h', w') -> (batch, 4, h, w)
        unet, ehs = self.unet, encoder_hidden_states
        # As UNet2DConditionModel.forward: the time embedding, conv_in, the skip connections.
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        hidden = unet.conv_in(sample)
        skips: list[torch.Tensor] = [hidden]
        for down in unet.down_blocks[: self.block]:
            if getattr(down, "has_cross_attention", False):
                hidden, res = down(hidden_states=hidden, temb=emb, encoder_hidden_states=ehs)
            else:
                hidden, res = down(hidden_states=hidden, temb=emb)
            skips += res
        down = unet.down_blocks[self.block]
        attentions = getattr(down, "attentions", None)
        for index in range(self.layer):
            hidden = down.resnets[index](hidden, emb)
            if attentions is not None:
                hidden = attentions[index](hidden, encoder_hidden_states=ehs, return_dict=False)[0]
            skips.append(hidden)
        # Up: the branch's layers from the kept feature out, as CrossAttnUpBlock2D runs them.
        hidden = deep_feature
        for layer in range(self.layer, -1, -1):
            resnet, attention = _up_layer(unet, self.block, layer)
            hidden = resnet(torch.cat([hidden, skips.pop()], dim=1), emb)
            if attention is not None:
                hidden = attention(hidden, encoder_hidden_states=ehs, return_dict=False)[0]
        up_blocks = unet.up_blocks
        first = len(up_blocks) - 1 - self.block
        for upsampler in up_blocks[first].upsamplers or []:
            hidden = upsampler(hidden)
        for up in up_blocks[first + 1 :]:
            res = tuple(skips[-len(up.resnets) :])
            del skips[-len(up.resnets) :]
            if getattr(up, "has_cross_attention", False):
                hidden = up(
                    hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs
                )
            else:
                hidden = up(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res)
        assert not skips, "every skip connection is consumed"
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


class VaeDecoderStage(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        # (batch, 4, h, w) -> (batch, 3, 8h, 8w)
        return self.vae.decode(latent / self.scaling, return_dict=False)[0]


class VaeEncoderStage(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # (batch, 3, 8h, 8w), (batch, 4, h, w) -> (batch, 4, h, w)
        posterior = self.vae.encode(image, return_dict=False)[0]
        return (posterior.mean + posterior.std * noise) * self.scaling


class TinyVaeEncoderStage(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # (batch, 3, 8h, 8w) -> (batch, 4, h, w)
        return self.vae.encode(image, return_dict=False)[0] * self.scaling


def stage_module(
    components: Components, name: str, *, deep_cache_branch: int | None = None
) -> torch.nn.Module:
    """The torch module of stage ``name``, in eval mode; with ``deep_cache_branch``, the
    UNet also returns DeepCache's feature and ``unet_shallow`` is a stage."""
    branch = deep_cache_branch
    modules = {
        "text_encoder": lambda: TextEncoderStage(components.text_encoder),
        "unet": lambda: (
            UNetStage(components.unet) if branch is None else DeepCacheUNetStage(components.unet, branch)
        ),
        "vae_decoder": lambda: VaeDecoderStage(components.vae),
        "vae_encoder": lambda: (TinyVaeEncoderStage if is_tiny_vae(components.vae) else VaeEncoderStage)(
            components.vae
        ),
    }
    if branch is not None:
        modules[SHALLOW] = lambda: ShallowUNetStage(components.unet, branch)
    if name not in modules:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(modules)}")
    return modules[name]().eval()
