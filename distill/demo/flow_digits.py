"""The digits teacher in Stable Diffusion 3 format: a small MMDiT trained by flow matching on the digits latents.

Same data, VAE recipe, caption dropout, EMA and CFG selection as the UNet teacher of ``digits.py``; the folder is a
stock ``StableDiffusion3Pipeline`` (two CLIP text encoders and T5, FlowMatchEulerDiscreteScheduler with SD3's shift),
so every flow-matching code path of the toolkit runs on it exactly as on SD3 / SD3.5.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .teacher_training import (aim_linear, caption_directions, drop_captions, ema_copy, ema_update, optimizer_step,
                               warmup_cosine)

HEAD_DIM = 32  # channels per attention head of the digits MMDiT


def train_and_save_sd3_teacher(folder: Path, vae, latents: torch.Tensor, labels, captions: list[str], recipe,
                               bar) -> None:
    """Save an SD3 folder around the trained VAE, then train its transformer on the scaled latents (EMA weights).

    ``labels`` index ``captions``, whose last entry is the empty caption; ``recipe`` is a ``digits.TeacherRecipe``.
    """
    from diffusers import StableDiffusion3Pipeline

    from distill.testing import build_tiny_sd3_teacher, tiny_sd3_transformer

    shift = latents.mean()
    vae.register_to_config(shift_factor=float(shift), scaling_factor=float(1.0 / (latents - shift).std()))
    transformer = tiny_sd3_transformer(recipe.seed, latents.shape[-1], latents.shape[1], recipe.transformer_layers,
                                       HEAD_DIM, recipe.transformer_width // HEAD_DIM)
    build_tiny_sd3_teacher(folder, seed=recipe.seed, transformer=transformer, vae=vae, flow_shift=recipe.flow_shift)
    context, pooled = caption_embeddings(StableDiffusion3Pipeline.from_pretrained(folder), captions)
    scaled = (latents - shift) * vae.config.scaling_factor
    ema = _train_transformer(transformer.train(), scaled, torch.as_tensor(labels), context, pooled, recipe, bar)
    ema.save_pretrained(folder / "transformer")


@torch.no_grad()
def caption_embeddings(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint-attention states and pooled embeddings of the captions, exactly as
    ``StableDiffusion3Pipeline.encode_prompt`` makes them."""
    context, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False)
    return context, pooled


def _train_transformer(transformer, latents, labels, context, pooled, recipe, bar):
    """Train the MMDiT with the flow-matching loss; return its EMA weights."""
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    if recipe.cross_attention_init_dims:
        _aim_text_inputs(transformer, context, pooled, recipe, generator)
    ema = ema_copy(transformer)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=recipe.denoiser_lr, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, recipe.warmup_steps, recipe.denoiser_steps)
    bar.set_description("digits teacher: transformer")
    for step in range(recipe.denoiser_steps):
        batch = torch.randint(0, len(labels), (recipe.denoiser_batch_size,), generator=generator)
        chosen = drop_captions(labels[batch], len(context) - 1, recipe.caption_dropout, generator)
        loss = flow_matching_loss(transformer, latents[batch], context[chosen], pooled[chosen], recipe.flow_shift,
                                  generator)
        optimizer_step(optimizer, schedule, loss)
        ema_update(ema, transformer, min(recipe.ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update()
    return ema.eval().requires_grad_(False)


def flow_matching_loss(transformer, latents, context, pooled, shift: float, generator) -> torch.Tensor:
    """SD3's rectified-flow loss (Esser et al. 2024, sec. 2 and the logit-normal sigma density of sec. 3.1): MSE
    between the predicted velocity and eps - x0 at x_t = (1 - sigma) x0 + sigma eps, sigma then shifted as the
    scheduler shifts it (sigma' = shift sigma / (1 + (shift - 1) sigma), the resolution shift of sec. 5.3.2)."""
    logit_normal = torch.sigmoid(torch.randn(len(latents), generator=generator))
    sigmas = shift * logit_normal / (1 + (shift - 1) * logit_normal)
    noise = torch.randn(latents.shape, generator=generator)
    sigma = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * noise
    velocity = transformer(hidden_states=noisy, encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=sigmas * 1000).sample
    return (velocity - (noise - latents)).square().mean()


def _aim_text_inputs(transformer, context, pooled, recipe, generator) -> None:
    """Point the joint-attention text projection and the pooled-text embedder at the caption-separating directions
    (the random text encoders put little of their output into what tells the captions apart; see digits.py)."""
    count, gain = recipe.cross_attention_init_dims, recipe.cross_attention_init_gain
    aim_linear(transformer.context_embedder, caption_directions(context, count), gain, generator)
    pooled_directions = caption_directions(pooled[:, None], count)
    pooled_directions /= (pooled @ pooled_directions.T).std(dim=0)[:, None]  # unit spread over the captions
    aim_linear(transformer.time_text_embed.text_embedder.linear_1, pooled_directions, gain, generator)
