"""Latent consistency distillation with the CFG-augmented PF-ODE (LCM / LCM-LoRA, Luo et al. 2023, Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lora import LoRASettings
from ..losses import DistanceSettings, distance
from ..schedule import consistency_boundary_scalings, skipping_step_pairs
from ..solvers import CFGSolverSettings, cfg_teacher_ddim_step
from .base import LatentBatch, Method, SamplingSpec, Teacher


@dataclass
class LCMConfig(CFGSolverSettings, DistanceSettings, LoRASettings):
    """Defaults of diffusers' LCM-LoRA scripts (and the LCM paper: N = 50 skipping-step grid, w in [3, 15])."""

    timestep_scaling_factor: float = field(default=10.0, metadata={
        "help": "s in the boundary scalings c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out(t) = s t / "
                "sqrt((s t)^2 + sigma_data^2); larger s makes f_theta closer to the x0 prediction at t > 0."})


class LCM(Method):
    """A LoRA student f_theta(x_t, t) = c_skip(t) x_t + c_out(t) x0_theta(x_t, t) trained to be self-consistent."""

    name = "lcm"
    Config = LCMConfig

    def __init__(self, teacher: Teacher, config: LCMConfig):
        super().__init__(teacher, config)
        self.lora_params = config.attach_lora(teacher.unet, teacher.lora_targets)
        self.nets["unet"] = teacher.unet
        self.grid, self.skip = config.skipping_grid(teacher.schedule.num_train_timesteps)

    def trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"unet": self.lora_params}

    def consistency_function(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """f_theta(x_t, t) = c_skip(t) x_t + c_out(t) x0_theta (LCM eq. 6, boundary f(x, 0) = x)."""
        c_skip, c_out = consistency_boundary_scalings(t, timestep_scaling=self.config.timestep_scaling_factor)
        x0, _ = self.denoiser()(x_t, t, cond)
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        return c_skip.to(x_t.device).view(shape) * x_t.float() + c_out.to(x_t.device).view(shape) * x0

    def sample_timesteps(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """t_{n+k} uniform on the skipping-step grid and t_n = t_{n+k} - k, clamped at 0 (LCM sec. 4.3)."""
        start, prev = skipping_step_pairs(self.grid, self.skip, batch_size)
        return start.to(device), prev.to(device)

    def loss(self, batch: LatentBatch, step: int) -> dict[str, torch.Tensor]:
        latents = batch.latents
        bsz, device = latents.shape[0], latents.device
        # 1. Sample adjacent timesteps t_{n+k} > t_n on the skipping-step grid.
        t_start, t_prev = self.sample_timesteps(bsz, device)
        # 2. Diffuse the clean latents to x_{t_{n+k}} ~ q(x_t | z).
        noise = torch.randn_like(latents)
        x_start = self.teacher.schedule.add_noise(latents, noise, t_start)
        # 3. Sample a guidance scale w ~ U[w_min, w_max] per example.
        w = self.config.sample_guidance(bsz, device)
        # 4. The student's consistency function at t_{n+k}.
        prediction = self.consistency_function(x_start, t_start, batch.cond)
        with torch.no_grad():
            # 5. One DDIM step of the CFG-augmented teacher from t_{n+k} to t_n.
            with self.denoiser().as_teacher() as teacher:
                x_prev = cfg_teacher_ddim_step(teacher, x_start, t_start, t_prev, batch.cond, batch.uncond, w)
            # 6. The target f_{theta^-}(x_{t_n}, t_n): the same LoRA weights, gradient stopped.
            target = self.consistency_function(x_prev, t_prev, batch.cond)
        # 7. Distance between the two ends of the consistency pair.
        return {"unet": distance(prediction, target, self.config.loss_type, self.config.huber_c)}

    def export_defaults(self) -> SamplingSpec:
        return SamplingSpec("LCMScheduler", num_inference_steps=4, guidance_scale=1.0, scheduler_config={
            "original_inference_steps": self.config.num_ddim_timesteps,
            "timestep_scaling": self.config.timestep_scaling_factor})
