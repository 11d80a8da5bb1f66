"""Training-loop pieces the digits teachers share (UNet and MMDiT alike): learning-rate schedule, optimizer step, EMA,
caption dropout, and aiming a text projection at the directions that tell the captions apart."""

from __future__ import annotations

import math

import torch
from torch import nn


def drop_captions(labels: torch.Tensor, empty: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Replace a random fraction of labels by ``empty``, the empty caption's index (for classifier-free guidance)."""
    dropped = torch.rand(len(labels), generator=generator) < probability
    return torch.where(dropped, torch.full_like(labels, empty), labels)


def caption_directions(caption_embeds: torch.Tensor, count: int) -> torch.Tensor:
    """The count x D text-embedding directions that best separate the captions from what all tokens share.

    Fisher/LDA-style: maximise the between-caption scatter of the token embeddings relative to the
    uncentred scatter of the per-position means (shared prefix, padding, global offset). The random
    frozen text encoder puts ~1% of its energy into caption differences, so without this the UNet's
    cross-attention takes thousands of steps to notice the prompt.
    """
    embeds = caption_embeds.double()
    per_position = embeds.mean(dim=0, keepdim=True).expand_as(embeds)
    flat, shared = (embeds - per_position).flatten(0, 1), per_position.flatten(0, 1)
    between, common = flat.T @ flat / len(flat), shared.T @ shared / len(shared)
    whitener = torch.linalg.inv(torch.linalg.cholesky(common + 1e-3 * torch.eye(len(common), dtype=common.dtype)))
    _, eigenvectors = torch.linalg.eigh(whitener @ between @ whitener.T)
    return (eigenvectors[:, -count:].T @ whitener).float()


@torch.no_grad()
def aim_linear(linear: nn.Linear, directions: torch.Tensor, gain: float, generator: torch.Generator) -> None:
    """Set a linear layer's weight to read only ``directions`` (count x in_features), spread over random outputs."""
    basis, _ = torch.linalg.qr(torch.randn(linear.out_features, len(directions), generator=generator))
    linear.weight.copy_(gain * basis @ directions)


def optimizer_step(optimizer, schedule, loss: torch.Tensor) -> None:
    """Backpropagate loss, clip gradients, step optimizer and lr schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    schedule.step()


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup then cosine decay to 10% of the base learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of model to hold its exponential moving average."""
    import copy

    return copy.deepcopy(model).requires_grad_(False)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move ema's parameters a (1 - decay) step toward model's; copy buffers."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)
