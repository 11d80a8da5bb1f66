"""Feature maps of a diffusion transformer (SD3's MMDiT, FLUX.1's double-stream blocks) for the diffusion-GAN
discriminators of ``distill.discriminator``: the transformer's counterpart of a UNet's encoder half.

The features are the image tokens after a few joint blocks of the network's first half, laid back on the latent grid
as (B, D, h, w) maps, one token per latent patch (LADD, Sauer et al. 2024, sec. 3, reads a transformer teacher's
tokens the same way). The block at half depth plays the UNet's mid block: DMD2's classifier reads it. Only the first
half runs: the stem (patch embedding, time and pooled-text embedding, text projection) and the blocks up to the
last feature block, with the same calls as the network's own forward in diffusers.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .packing import PACKED_PATCH, latent_image_ids, pack_latents

MAX_FEATURE_LEVELS = 4
# In the last feature block these adapt only the text stream's output, which nothing downstream reads.
TEXT_STREAM_OUTPUTS = ("attn.to_add_out", "ff_context.")


def network_class(net: nn.Module) -> str | None:
    """The diffusers class of ``net`` that this module reads (SD3, FLUX.1), also when sharding has subclassed it
    (FSDP2 makes ``FSDPSD3Transformer2DModel``); None for any other network (a UNet)."""
    return next((cls.__name__ for cls in type(net).__mro__ if cls.__name__ in STEMS), None)


def is_transformer(net: nn.Module) -> bool:
    """Whether ``net`` is a joint-attention transformer this module reads (SD3, FLUX.1), not a UNet."""
    return network_class(net) is not None


def feature_block_indices(num_blocks: int) -> list[int]:
    """Up to four evenly spaced joint blocks of the first half, the last one at half depth (the 'mid block')."""
    half = max(num_blocks // 2, 1)
    levels = min(MAX_FEATURE_LEVELS, half)
    return [half * (k + 1) // levels - 1 for k in range(levels)]


def width(config) -> int:
    """The transformer's token width (heads x head dimension), from its config (or its dict)."""
    return config["num_attention_heads"] * config["attention_head_dim"]


def token_patch(net: nn.Module) -> int:
    """Side, in latent pixels, of the square patch one image token covers (SD3: its patch embedding's; FLUX.1: the
    2x2 packing)."""
    return PACKED_PATCH if network_class(net) == "FluxTransformer2DModel" else net.config.patch_size


def token_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h*w, D) tokens in row-major patch order -> a (B, D, h, w) feature map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], height, width)


def _sd3_stem(net, sample, timestep, encoder_hidden_states, pooled_projections, **unused):
    """SD3Transformer2DModel.forward up to its blocks: patch embedding, timestep + pooled text, text projection."""
    hidden = net.pos_embed(sample).contiguous()
    temb = net.time_text_embed(timestep, pooled_projections)
    return hidden, net.context_embedder(encoder_hidden_states), {"temb": temb}


def _flux_stem(net, sample, timestep, encoder_hidden_states, pooled_projections, guidance=None, **unused):
    """FluxTransformer2DModel.forward up to its blocks, on (B, C, H, W) latents packed as FluxPipeline packs them."""
    hidden = net.x_embedder(pack_latents(sample))
    timestep = timestep.to(hidden.dtype) * 1000
    if guidance is None:
        temb = net.time_text_embed(timestep, pooled_projections)
    else:
        temb = net.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled_projections)
    text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device, dtype=sample.dtype)
    ids = torch.cat([text_ids, latent_image_ids(*sample.shape[-2:], sample.device, sample.dtype)])
    return hidden, net.context_embedder(encoder_hidden_states), {"temb": temb, "image_rotary_emb": net.pos_embed(ids)}


STEMS = {"SD3Transformer2DModel": _sd3_stem, "FluxTransformer2DModel": _flux_stem}


def transformer_features(net: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                         **network_kwargs) -> list[torch.Tensor]:
    """Image-token maps after each of ``feature_block_indices``'s blocks for latents ``sample`` (B, C, H, W) at the
    network's own ``timestep``; ``network_kwargs`` as the network's forward takes them (``Cond.unet_kwargs``)."""
    levels = feature_block_indices(len(net.transformer_blocks))
    hidden, context, block_kwargs = STEMS[network_class(net)](net, sample, timestep, **network_kwargs)
    patch = token_patch(net)
    grid = (sample.shape[-2] // patch, sample.shape[-1] // patch)
    features = []
    for index, block in enumerate(net.transformer_blocks[:levels[-1] + 1]):
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, **block_kwargs)
        if index in levels:
            features.append(token_map(hidden, *grid))
    return features


def bottleneck_block(net: nn.Module) -> nn.Module:
    """The block at half depth, whose image tokens are the transformer's bottleneck features."""
    return net.transformer_blocks[feature_block_indices(len(net.transformer_blocks))[-1]]


@contextlib.contextmanager
def capture_transformer_bottleneck(net: nn.Module):
    """Inside the block, ``captured[0]`` is the bottleneck feature map of ``net``'s latest full forward."""
    captured: list[torch.Tensor] = []
    grid: list[int] = []

    def keep_grid(module, args, kwargs):
        sample = args[0] if args else kwargs["hidden_states"]
        if sample.dim() == 4:  # (B, C, H, W), before FLUX's packing pre-hook turns it into tokens
            grid[:] = [sample.shape[-2] // token_patch(net), sample.shape[-1] // token_patch(net)]

    def keep(module, inputs, output):
        captured[:] = [token_map(output[1], *grid)]

    handles = [net.register_forward_pre_hook(keep_grid, with_kwargs=True, prepend=True),
               bottleneck_block(net).register_forward_hook(keep)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def transformer_encoder_modules(net: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the modules among ``targets`` that ``transformer_features`` runs and whose output reaches a
    feature map (in the last feature block, the text stream's output projections reach none)."""
    last = feature_block_indices(len(net.transformer_blocks))[-1]
    names = []
    for name, _ in net.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "transformer_blocks" or int(parts[1]) > last:
            continue
        inner = ".".join(parts[2:])
        if int(parts[1]) == last and inner.startswith(TEXT_STREAM_OUTPUTS):
            continue
        if any(name == target or name.endswith("." + target) for target in targets):
            names.append(name)
    return names
