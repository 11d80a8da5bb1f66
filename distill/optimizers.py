"""One AdamW (or 8-bit AdamW) and one learning-rate schedule per trainable group of a method."""

from __future__ import annotations

import torch


def optimizer_class(use_8bit_adam: bool):
    """torch's AdamW, or bitsandbytes' 8-bit AdamW."""
    if use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    return torch.optim.AdamW


def adamw(params: list[torch.nn.Parameter], use_8bit_adam: bool = False, **hyperparameters) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) over ``params``: torch's fused kernel (one kernel for every tensor, on CUDA and
    the CPU) where torch has one for the parameters' device and dtype, else its default loop; or 8-bit AdamW."""
    if use_8bit_adam:
        return optimizer_class(True)(params, **hyperparameters)
    return torch.optim.AdamW(params, fused=has_fused_kernel(params) or None, **hyperparameters)


def has_fused_kernel(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW runs on ``params``: floating-point tensors on devices with the kernel (torch checks
    only at the first step, so an unsupported device would fail mid-run rather than here)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the list: the two devices every build has the kernel for
        devices = {"cuda", "cpu"}
    return bool(params) and all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def build_optimizers(groups: dict, method, cfg, total_batch: int, max_steps: int, num_processes: int):
    """(optimizers, schedulers) keyed like ``groups``; --learning_rates overrides a method's per-group default."""
    from diffusers.optimization import get_scheduler

    optimizers, schedulers = {}, {}
    for name, params in groups.items():
        base_lr = cfg.learning_rates.get(name, method.learning_rate_for(name, cfg.learning_rate))
        lr = base_lr * (total_batch if cfg.scale_lr else 1)
        optimizers[name] = adamw(params, cfg.use_8bit_adam, lr=lr, betas=method.adam_betas_for(name, (cfg.adam_beta1, cfg.adam_beta2)),
                                 weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
        schedulers[name] = get_scheduler(cfg.lr_scheduler, optimizer=optimizers[name],
                                         num_warmup_steps=cfg.lr_warmup_steps * num_processes,
                                         num_training_steps=max_steps * num_processes)
    return optimizers, schedulers
