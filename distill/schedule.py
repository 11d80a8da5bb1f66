"""Noise schedule of a discrete-time (DDPM) teacher: alphas, sigmas, parameterisations, grids, scalings.

Notation follows DDIM (Song et al. 2021): x_t = alpha_t * x_0 + sigma_t * eps with
alpha_t = sqrt(alphabar_t) and sigma_t = sqrt(1 - alphabar_t).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B] tensor against a [B, ...] tensor."""
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """alpha_t, sigma_t of the teacher's training scheduler (DDPM, Ho et al. 2020, eq. 4)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type}")
        self.alphas_cumprod = alphas_cumprod.double().float()
        self.alphas = self.alphas_cumprod.sqrt()
        self.sigmas = (1 - self.alphas_cumprod).sqrt()
        self.prediction_type = prediction_type

    @classmethod
    def from_scheduler_config(cls, config) -> "NoiseSchedule":
        """Build from any diffusers scheduler config (betas are recomputed by DDPMScheduler)."""
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(config)
        return cls(scheduler.alphas_cumprod, scheduler.config.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(self.alphas[t.cpu().long()], like)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(self.sigmas[t.cpu().long()], like)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) (DDPM eq. 4)."""
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * eps

    def to_x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Convert an eps-, v- or x0-prediction into (x0, eps) (v-prediction: Salimans & Ho 2022, eq. 9)."""
        alpha, sigma = self.alpha(t, x_t), self.sigma(t, x_t)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - sigma * eps) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x_t - sigma * model_output
            eps = alpha * model_output + sigma * x_t
        else:
            x0 = model_output
            eps = (x_t - alpha * x0) / sigma
        return x0, eps


def ddim_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The skipping-step grid t_i = i*k - 1, i = 1..N, k = T // N (LCM, Luo et al. 2023, sec. 4.3; LCMScheduler's grid)."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in [1, {num_train_timesteps}], got {num_ddim_timesteps}")
    step = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * step - 1


def consistency_boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """c_skip, c_out with c_skip(0)=1, c_out(0)=0 (Consistency Models, Song et al. 2023, eq. 7; LCM's discrete form)."""
    scaled = timestep_scaling * t.double()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()
