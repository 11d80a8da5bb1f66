"""A diffusion-GAN discriminator: a frozen UNet's encoder features with small trainable heads.

The feature extractor is the teacher UNet itself (for LoRA students: the student's UNet with its adapters disabled),
run only through its encoder half (conv_in, time/added embeddings, down blocks, mid block) and kept differentiable
with respect to its input so the generator receives gradients. Only the heads are trained (PCM's adversarial
consistency loss, Wang et al. 2024; the same construction serves UFOGen-style diffusion GANs).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.func import functional_call


def unet_encoder_features(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                          encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None = None,
                          timestep_cond: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Outputs of every down block and of the mid block of a ``UNet2DConditionModel`` (its up blocks are not run)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                               added_cond_kwargs=added_cond_kwargs)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    hidden = unet.conv_in(sample)
    features = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, _ = block(hidden_states=hidden, temb=emb)
        features.append(hidden)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden = unet.mid_block(hidden, emb)
        features.append(hidden)
    return features


@contextlib.contextmanager
def _without_gradient_checkpointing(unet: nn.Module):
    """Run blocks normally: a checkpointed block would recompute its forward in the backward pass, by then with the
    student's LoRA adapters switched back on, and so differentiate the wrong function."""
    flagged = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


def teacher_features(denoiser, x: torch.Tensor, t: torch.Tensor, cond) -> list[torch.Tensor]:
    """Encoder features of the frozen teacher (the student's UNet with LoRA disabled), differentiable w.r.t. ``x``
    (PCM's adversarial loss and UFOGen's discriminator: both build D on the pre-trained UNet's encoder)."""
    with denoiser.as_teacher() as teacher, _without_gradient_checkpointing(teacher.module):
        dtype = teacher.module.dtype
        return unet_encoder_features(teacher.module, x.to(dtype), t, **cond.to(x.device, dtype).unet_kwargs())


def feature_channels(unet_config) -> list[int]:
    """Channels of the feature maps ``unet_encoder_features`` returns, read from the UNet's config (or its dict)."""
    channels = list(unet_config["block_out_channels"])
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        channels.append(channels[-1])
    return channels


class DiscriminatorHead(nn.Module):
    """conv 3x3 -> group norm -> SiLU -> conv 1x1 to one logit per feature-map position."""

    def __init__(self, channels: int, norm_num_groups: int = 32):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(math.gcd(norm_num_groups, channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.layers(feature)


class DiscriminatorHeads(nn.Module):
    """The only trainable part of the discriminator: one head per encoder feature level of the frozen UNet."""

    def __init__(self, channels: list[int], norm_num_groups: int = 32):
        super().__init__()
        self.heads = nn.ModuleList(DiscriminatorHead(c, norm_num_groups) for c in channels)

    @classmethod
    def from_unet_config(cls, unet_config) -> "DiscriminatorHeads":
        """Heads matching the feature maps of a UNet with this config."""
        return cls(feature_channels(unet_config), unet_config.get("norm_num_groups") or 32)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """One logit map per feature level."""
        dtype = self.heads[0].layers[0].weight.dtype
        return [head(feature.to(dtype)) for head, feature in zip(self.heads, features)]

    def frozen(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The same logits with the heads' weights detached: the generator's loss reaches only the generator."""
        params = {name: p.detach() for name, p in self.named_parameters()}
        return functional_call(self, params, (features,))
