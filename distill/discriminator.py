"""Diffusion-GAN discriminators on a denoiser network's encoder features.

* PCM / UFOGen: the frozen teacher network (for LoRA students: the student's network with its adapters disabled), run
  only through its encoder half and kept differentiable with respect to its input so the generator receives
  gradients; only small heads, one per feature level, are trained (PCM's adversarial consistency loss, Wang et al.
  2024; UFOGen-style diffusion GANs).
* DMD2: a classifier on the bottleneck features of the fake score, trained together with the fake score (DMD2, Yin et
  al. 2024, sec. 4.3); the generator reads it with both frozen.

A UNet's encoder half is conv_in, the time/added embeddings, the down blocks and the mid block (the bottleneck); a
transformer's (SD3, FLUX.1) is its stem and first half of joint blocks, read as token maps
(``distill.transformer_features``).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .denoiser import network_dtype, using_adapter
from .transformer_features import (capture_transformer_bottleneck, feature_block_indices, is_transformer,
                                   token_map, token_patch, transformer_encoder_modules, transformer_features, width)


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


def network_features(net: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                     **network_kwargs) -> list[torch.Tensor]:
    """The encoder feature maps of a UNet or a transformer (its bottleneck last) at the network's own timestep."""
    if is_transformer(net):
        return transformer_features(net, sample, timestep, **network_kwargs)
    return unet_encoder_features(net, sample, timestep, **network_kwargs)


def whole_network_features(net: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                           **network_kwargs) -> list[torch.Tensor]:
    """One full forward of ``net``: the feature maps ``network_features`` returns, then its decoder's (a UNet's up-block
    outputs; a transformer's final image tokens, before its output norm). UFOGen's discriminator, as DDGAN's and
    SIDDM's, is the whole pre-trained denoiser (UFOGen sec. 4.1), whose last features are at the latent's resolution."""
    captured: dict[int, torch.Tensor] = {}

    def keeper(index: int, read):
        def keep(module, args, output=None):
            captured[index] = read(args, output)
        return keep

    if is_transformer(net):
        patch = token_patch(net)
        grid = (sample.shape[-2] // patch, sample.shape[-1] // patch)
        blocks = [net.transformer_blocks[i] for i in feature_block_indices(len(net.transformer_blocks))]
        handles = [block.register_forward_hook(keeper(i, lambda args, out: token_map(out[1], *grid)))
                   for i, block in enumerate(blocks)]
        handles.append(net.norm_out.register_forward_pre_hook(
            keeper(len(blocks), lambda args, out: token_map(args[0], *grid))))
    else:
        first = lambda args, out: out[0] if isinstance(out, tuple) else out  # noqa: E731 (down blocks add skips)
        modules = [*net.down_blocks, *([net.mid_block] if net.mid_block is not None else []), *net.up_blocks]
        handles = [module.register_forward_hook(keeper(i, first)) for i, module in enumerate(modules)]
    try:
        net(sample, timestep=timestep, **network_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in sorted(captured)]


@contextlib.contextmanager
def capture_bottleneck(unet: nn.Module):
    """Inside the block, ``captured[0]`` is the bottleneck feature map (a UNet's mid-block output, a transformer's
    half-depth tokens) of ``unet``'s latest forward (the full forward still runs: one call gives a network's
    prediction and its bottleneck features, as DDP wants one call per step)."""
    if is_transformer(unet):
        with capture_transformer_bottleneck(unet) as captured:
            yield captured
        return
    captured: list[torch.Tensor] = []

    def keep(module, inputs, output):
        captured[:] = [output]

    handle = unet.mid_block.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def frozen_parameters(module: nn.Module):
    """Inside the block no parameter of ``module`` records gradients (the graph built there reaches only inputs).

    Each submodule's weights are frozen as it runs (a forward pre-hook): under sharding (FSDP2) the weights a module
    computes with are gathered just before it runs and are other tensors than those ``parameters()`` lists between
    calls. Freezing is undone when the block ends; gradients then still flow to ``module``'s inputs.
    """
    frozen: list[nn.Parameter] = []

    def freeze(submodule: nn.Module, args) -> None:
        for p in submodule._parameters.values():
            if p is not None and p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)

    handles = [m.register_forward_pre_hook(freeze) for m in module.modules() if m._parameters]
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)


def frozen_call(module: nn.Module, *args):
    """``module(*args)`` with its weights frozen: a loss through it reaches the inputs, never the weights."""
    with frozen_parameters(module):
        return module(*args)


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


def teacher_features(denoiser, x: torch.Tensor, t: torch.Tensor, cond,
                     whole_network: bool = False) -> list[torch.Tensor]:
    """Encoder features (``whole_network``: those of a full forward) of the frozen teacher (the student's network with
    LoRA disabled) at training timestep ``t``, differentiable w.r.t. ``x`` (PCM's adversarial loss and UFOGen's
    discriminator: both build D on the pre-trained network)."""
    read = whole_network_features if whole_network else network_features
    with denoiser.as_teacher() as teacher, _without_gradient_checkpointing(teacher.module):
        dtype = network_dtype(teacher.module)
        return read(teacher.module, x.to(dtype), denoiser.schedule.network_timestep(t),
                    **cond.to(x.device, dtype).unet_kwargs())


def feature_channels(unet_config, whole_network: bool = False) -> list[int]:
    """Channels of the feature maps ``network_features`` (or, ``whole_network``, ``whole_network_features``)
    returns, read from the network's config (or its dict)."""
    if "block_out_channels" not in unet_config:  # a transformer: one token width per feature block
        return [width(unet_config)] * (len(feature_block_indices(unet_config["num_layers"])) + whole_network)
    channels = list(unet_config["block_out_channels"])
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        channels.append(channels[-1])
    if whole_network:
        channels += list(reversed(unet_config["block_out_channels"]))
    return channels


# The widest feature map a head works at: a UNet's widest (SD1.5's and SDXL's 1280 channels). Wider transformer tokens
# (SD3.5-large 2432, FLUX.1-dev 3072) are first projected down to it by a 1x1 convolution, which keeps the trained
# heads and classifier at a UNet's size rather than growing with the square of the token width.
MAX_HEAD_WIDTH = 1280


def narrowed(channels: int) -> tuple[list[nn.Module], int]:
    """(a 1x1 projection down to ``MAX_HEAD_WIDTH`` where ``channels`` is wider, else nothing; the width after it)."""
    if channels <= MAX_HEAD_WIDTH:
        return [], channels
    return [nn.Conv2d(channels, MAX_HEAD_WIDTH, 1)], MAX_HEAD_WIDTH


class DiscriminatorHead(nn.Module):
    """conv 3x3 -> group norm -> SiLU -> conv 1x1 to one logit per feature-map position (a wider feature map is first
    projected to ``MAX_HEAD_WIDTH`` channels); ``zero_init`` starts the last convolution at zero, so every logit
    starts at 0, as the UFOGen reference code's zero-initialised output layer does."""

    def __init__(self, channels: int, norm_num_groups: int = 32, zero_init: bool = False):
        super().__init__()
        projection, channels = narrowed(channels)
        self.layers = nn.Sequential(
            *projection,
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(math.gcd(norm_num_groups, channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )
        if zero_init:
            nn.init.zeros_(self.layers[-1].weight)
            nn.init.zeros_(self.layers[-1].bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.layers(feature)


class DiscriminatorHeads(nn.Module):
    """The only trainable part of the discriminator: one head per encoder feature level of the frozen UNet."""

    def __init__(self, channels: list[int], norm_num_groups: int = 32, zero_init: bool = False):
        super().__init__()
        self.heads = nn.ModuleList(DiscriminatorHead(c, norm_num_groups, zero_init) for c in channels)

    @classmethod
    def from_unet_config(cls, unet_config, whole_network: bool = False, zero_init: bool = False
                         ) -> "DiscriminatorHeads":
        """Heads matching the feature maps of a network (UNet or transformer) with this config: its encoder's, or
        (``whole_network``) those of its full forward."""
        return cls(feature_channels(unet_config, whole_network), unet_config.get("norm_num_groups") or 32, zero_init)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """One logit map per feature level."""
        dtype = self.heads[0].layers[0].weight.dtype
        return [head(feature.to(dtype)) for head, feature in zip(self.heads, features)]

    def frozen(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The same logits with the heads' weights detached: the generator's loss reaches only the generator."""
        return frozen_call(self, features)


def bottleneck_size(unet_config, latent_size: int) -> int:
    """Side of the mid block's feature map: each down block but the last halves the latent (diffusers' UNet2D)."""
    return max(latent_size // 2 ** (len(unet_config["down_block_types"]) - 1), 1)


def bottleneck_shape(net: nn.Module, latent_size: int) -> tuple[int, int]:
    """(channels, side) of ``net``'s bottleneck feature map for square latents of side ``latent_size``."""
    if is_transformer(net):
        return width(net.config), max(latent_size // token_patch(net), 1)
    return net.config["block_out_channels"][-1], bottleneck_size(net.config, latent_size)


class BottleneckClassifier(nn.Module):
    """DMD2's realism classifier on bottleneck features (DMD2, Yin et al. 2024, sec. 4.3): 4x4 stride-2 convolutions
    down to 4x4 (8x8 -> 4x4 for SD1.5 at 512 px, 32x32 -> 4x4 for SDXL at 1024 px), one convolution to 1x1, then a
    1x1 convolution to one logit; GroupNorm and SiLU after each but the last, as the reference code builds it (a wider
    bottleneck, a transformer's, is first projected to ``MAX_HEAD_WIDTH`` channels)."""

    def __init__(self, channels: int, size: int, norm_num_groups: int = 32):
        super().__init__()
        layers, channels = narrowed(channels)
        groups = math.gcd(norm_num_groups, channels)
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
            size //= 2
        layers += [nn.Conv2d(channels, channels, size, stride=size), nn.GroupNorm(groups, channels), nn.SiLU(),
                   nn.Conv2d(channels, 1, 1)]
        self.layers = nn.Sequential(*layers)

    @classmethod
    def from_unet_config(cls, unet_config, latent_size: int) -> "BottleneckClassifier":
        """A classifier for the mid block of a UNet with this config at latents of side ``latent_size``."""
        return cls(unet_config["block_out_channels"][-1], bottleneck_size(unet_config, latent_size),
                   unet_config.get("norm_num_groups") or 32)

    @classmethod
    def for_network(cls, net: nn.Module, latent_size: int) -> "BottleneckClassifier":
        """A classifier for the bottleneck of ``net`` (UNet or transformer) at latents of side ``latent_size``."""
        return cls(*bottleneck_shape(net, latent_size), net.config.get("norm_num_groups") or 32)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """One realism logit per sample, shape (batch,)."""
        return self.layers(feature.to(self.layers[0].weight.dtype)).flatten()

    def frozen(self, feature: torch.Tensor) -> torch.Tensor:
        """The same logits with the classifier's weights detached: the generator's loss reaches only the generator."""
        return frozen_call(self, feature)


def adapter_encoder_features(view, x: torch.Tensor, timestep: torch.Tensor, cond,
                             whole_network: bool = False) -> list[torch.Tensor]:
    """Encoder features of an ``AdapterView``'s network with only its adapter on (the encoder half only; or, with
    ``whole_network``, every level of a full forward), at the network's own ``timestep``
    (``NoiseSchedule.network_timestep``)."""
    unet = view.unet
    read = whole_network_features if whole_network else network_features
    with using_adapter(unet, view.adapter), _without_gradient_checkpointing(unet):
        dtype = network_dtype(unet)
        return read(unet, x.to(dtype), timestep, **cond.to(x.device, dtype).unet_kwargs())


def adapter_bottleneck(view, x: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
    """Bottleneck features of an ``AdapterView``'s network with only its adapter on, differentiable w.r.t. ``x`` and
    not w.r.t. any weight (DMD2's generator reads the fake score's bottleneck frozen; sec. 4.3)."""
    with frozen_parameters(view):
        return adapter_encoder_features(view, x, timestep, cond)[-1]


ENCODER_PREFIXES = ("down_blocks.", "mid_block.")


def encoder_modules(unet: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the modules among ``targets`` (names or name suffixes) that ``network_features`` runs and reads:
    an adapter on these alone has no weight outside the discriminator's graph (DDP wants every parameter used)."""
    if is_transformer(unet):
        return transformer_encoder_modules(unet, targets)
    return [name for name, _ in unet.named_modules() if name.startswith(ENCODER_PREFIXES)
            and any(name == target or name.endswith("." + target) for target in targets)]


class TrainedEncoderDiscriminator(nn.Module):
    """A diffusion-GAN discriminator initialised from the pre-trained network and trained (UFOGen sec. 4.1, as DDGAN /
    SIDDM): the network's encoder half (or, ``whole_network``, all of it) with a LoRA adapter of its own
    (zero-initialised: it starts as the teacher) and one head per feature level. One network stays in memory: the
    backbone is an ``AdapterView`` of the student's."""

    def __init__(self, backbone, heads: DiscriminatorHeads, whole_network: bool = False):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.whole_network = whole_network

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond) -> list[torch.Tensor]:
        """One logit map per feature level of ``x`` at the network's own ``timestep``."""
        return self.heads(adapter_encoder_features(self.backbone, x, timestep, cond, self.whole_network))

    def frozen(self, x: torch.Tensor, timestep: torch.Tensor, cond) -> list[torch.Tensor]:
        """The same logits, differentiable w.r.t. ``x`` only: the generator's loss reaches only the generator."""
        with frozen_parameters(self):
            return self(x, timestep, cond)
