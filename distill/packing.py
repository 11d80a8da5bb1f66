"""FLUX.1's transformer reads latents packed in 2x2 patches with position ids; every other denoiser network here reads
latents (B, C, H, W). ``accept_unpacked_latents`` makes a FLUX transformer take and return (B, C, H, W) latents as
well, so the denoiser, the methods and the trainer call it like any other network.

The packing is diffusers' FluxPipeline's (``_pack_latents``, ``_prepare_latent_image_ids``; Black Forest Labs 2024).
Calls with already packed (B, tokens, 4C) latents, as FluxPipeline makes during validation, pass through unchanged.
"""

from __future__ import annotations

import torch

PACKED_PATCH = 2  # each token packs a 2x2 patch of latent pixels
_PACKED = "_distill_packed"  # (the img_ids tensor the pre-hook made, latent (H, W)) of the latest packed call


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token, channels then patch rows and columns."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width``."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed tokens: (0, row, column), as FluxPipeline builds them."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def _pack_inputs(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: pack (B, C, H, W) latents and add the image and text position ids."""
    latents = args[0] if args else kwargs["hidden_states"]
    if latents.dim() != 4:
        return None
    if latents.shape[-2] % 2 or latents.shape[-1] % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latents of {tuple(latents.shape[-2:])} cannot be packed; "
                         "use a resolution divisible by 16 (8 for the VAE times 2 for the patches).")
    text = kwargs["encoder_hidden_states"]
    image_ids = latent_image_ids(*latents.shape[-2:], latents.device, latents.dtype)
    setattr(module, _PACKED, (image_ids, tuple(latents.shape[-2:])))
    kwargs = {**kwargs, "hidden_states": pack_latents(latents), "img_ids": image_ids,
              "txt_ids": torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype)}
    return args[1:], kwargs


def _unpack_output(module: torch.nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: unpack the prediction of a call whose latents the pre-hook packed (recognised by its ids)."""
    image_ids, shape = getattr(module, _PACKED, (None, None))
    if image_ids is None or kwargs.get("img_ids") is not image_ids:
        return None
    if isinstance(output, tuple):
        return (unpack_latents(output[0], *shape), *output[1:])
    output.sample = unpack_latents(output.sample, *shape)
    return output


def accept_unpacked_latents(transformer: torch.nn.Module) -> torch.nn.Module:
    """``transformer`` itself, made to take and return (B, C, H, W) latents (see the module docstring)."""
    if not hasattr(transformer, _PACKED):
        setattr(transformer, _PACKED, (None, None))
        transformer.register_forward_pre_hook(_pack_inputs, with_kwargs=True)
        transformer.register_forward_hook(_unpack_output, with_kwargs=True)
    return transformer
