"""The four stages of the chain as torch modules with plain tensor inputs and outputs.

These modules fix what each stage computes (the VAE's latent scaling included), so
that the torch backend and every exported artifact agree on one definition:

- ``text_encoder``: token ids -> CLIP's last hidden state;
- ``unet``: noisy latents, timesteps, text embeddings -> predicted noise;
- ``vae_decoder``: scaled latents -> image in [-1, 1] (not clamped);
- ``vae_encoder``: image in [-1, 1] and standard normal noise -> scaled latents sampled
  from the VAE's posterior, as diffusers' ``latent_dist.sample()`` draws them; the tiny
  VAE (AutoencoderTiny) encodes deterministically and takes the image only.
"""

from __future__ import annotations

from typing import Any

import torch

from .models import Components, is_tiny_vae
from .specs import STAGES


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


def stage_module(components: Components, name: str) -> torch.nn.Module:
    """The torch module of stage ``name``, in eval mode."""
    modules = {
        "text_encoder": lambda: TextEncoderStage(components.text_encoder),
        "unet": lambda: UNetStage(components.unet),
        "vae_decoder": lambda: VaeDecoderStage(components.vae),
        "vae_encoder": lambda: (TinyVaeEncoderStage if is_tiny_vae(components.vae) else VaeEncoderStage)(
            components.vae
        ),
    }
    if name not in modules:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return modules[name]().eval()
