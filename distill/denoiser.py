"""A UNet seen as a denoiser: owns the one ``unet(...)`` call and absorbs the prediction type."""

from __future__ import annotations

import contextlib

import torch

from .conditioning import Cond
from .schedule import NoiseSchedule


class Denoiser:
    """(x_t, t, cond) -> (x0, eps) for any prediction type; ``as_teacher`` turns LoRA adapters off."""

    def __init__(self, unet: torch.nn.Module, schedule: NoiseSchedule):
        self.unet = unet  # possibly wrapped by accelerate (DDP/FSDP); called for the forward pass
        self.module = getattr(unet, "module", unet)  # the bare UNet, for its dtype and adapters
        self.schedule = schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.raw(x_t, t, cond)
        return self.schedule.to_x0_eps(output.float(), x_t.float(), t)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The UNet's own output (eps, v or x0 depending on the teacher)."""
        dtype = self.module.dtype
        cond = cond.to(x_t.device, dtype)
        return self.unet(x_t.to(dtype), t.to(x_t.device), **cond.unet_kwargs(), return_dict=False)[0]

    @contextlib.contextmanager
    def as_teacher(self):
        """The frozen teacher: the same UNet with its LoRA adapters disabled (LCM-LoRA, Luo et al. 2023, sec. 3)."""
        has_adapters = getattr(self.module, "_hf_peft_config_loaded", False)
        if has_adapters:
            self.module.disable_adapters()
        try:
            yield self
        finally:
            if has_adapters:
                self.module.enable_adapters()
