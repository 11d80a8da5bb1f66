"""One AdamW (or 8-bit AdamW) and one learning-rate schedule per trainable group of a method."""

from __future__ import annotations

import torch


def optimizer_class(use_8bit_adam: bool):
    """torch's AdamW, or bitsandbytes' 8-bit AdamW."""
    if use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    return torch.optim.AdamW


def build_optimizers(groups: dict, method, cfg, total_batch: int, max_steps: int, num_processes: int):
    """(optimizers, schedulers) keyed like ``groups``; --learning_rates overrides a method's per-group default."""
    from diffusers.optimization import get_scheduler

    optimizers, schedulers = {}, {}
    adamw = optimizer_class(cfg.use_8bit_adam)
    for name, params in groups.items():
        base_lr = cfg.learning_rates.get(name, method.learning_rate_for(name, cfg.learning_rate))
        lr = base_lr * (total_batch if cfg.scale_lr else 1)
        optimizers[name] = adamw(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
        schedulers[name] = get_scheduler(cfg.lr_scheduler, optimizer=optimizers[name],
                                         num_warmup_steps=cfg.lr_warmup_steps * num_processes,
                                         num_training_steps=max_steps * num_processes)
    return optimizers, schedulers
