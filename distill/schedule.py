"""Noise schedules of the teachers: alphas, sigmas, parameterisations, grids, scalings.

Notation follows DDIM (Song et al. 2021): x_t = alpha_t * x_0 + sigma_t * eps. A DDPM teacher (SD, SDXL) has
alpha_t = sqrt(alphabar_t) and sigma_t = sqrt(1 - alphabar_t); a flow-matching teacher (SD3, FLUX.1) has
alpha_t = 1 - sigma_t on its shifted sigma grid. Both are tables indexed by an integer training timestep t, so the
methods' grids, phases and chains are the same code for either.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


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
    def from_scheduler_config(cls, config, latent_shape: tuple[int, ...] | None = None) -> "NoiseSchedule":
        """Build from any diffusers scheduler config (betas are recomputed by DDPMScheduler; the latent shape does not
        matter to a DDPM schedule)."""
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(config)
        return cls(scheduler.alphas_cumprod, scheduler.config.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas)

    def network_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep value the network is called with at training timestep t (a DDPM UNet: t itself)."""
        return t

    def transition(self, s: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_{t|s}, sigma^2_{t|s} of q(x_t | x_s) = N(a x_s, sigma^2 I), s < t; VP: a^2 = abar_t / abar_s,
        sigma^2 = 1 - a^2 (DDPM, Ho et al. 2020, eq. 2)."""
        ratio = self.alphas_cumprod[t.cpu().long()] / self.alphas_cumprod[s.cpu().long()]
        return _per_sample(ratio.sqrt(), like), _per_sample(1 - ratio, like)

    def regression_target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What a denoising regression on this teacher compares: eps (DDPM, Ho et al. 2020, eq. 14; the loss of
        Rectified Diffusion and of SwiftBrush's fake score)."""
        return eps

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
        elif self.prediction_type == "flow_prediction":  # v = eps - x0 on x_t = (1 - sigma) x0 + sigma eps
            x0 = x_t - sigma * model_output
            eps = x_t + alpha * model_output
        else:
            x0 = model_output
            eps = (x_t - alpha * x0) / sigma
        return x0, eps


class FlowMatchingSchedule(NoiseSchedule):
    """x_t = (1 - sigma_t) x0 + sigma_t eps with velocity prediction v = eps - x0 (Rectified Flow, Liu et al. 2022;
    SD3, Esser et al. 2024, sec. 2 and eq. 23 for the shift), on the sigma table of diffusers'
    ``FlowMatchEulerDiscreteScheduler``: t = 0..T-1 holds sigma of timestep t + 1, so sigma_{T-1} = 1 is pure noise.

    ``time_scale``: the network is called with sigma_t * time_scale (SD3: T; FLUX.1: 1). ``mu``: the exponential
    shift of a teacher with resolution-dependent shifting (FLUX.1), fixed by the training resolution.
    """

    def __init__(self, sigmas: torch.Tensor, time_scale: float = 1000.0, mu: float | None = None):
        self.sigmas = sigmas.float()
        self.alphas = 1 - self.sigmas
        self.alphas_cumprod = self.alphas**2  # alpha_t^2, for code that reads signal power
        self.prediction_type = "flow_prediction"
        self.time_scale = time_scale
        self.mu = mu

    @classmethod
    def from_scheduler_config(cls, config, latent_shape: tuple[int, ...] | None = None,
                              time_scale: float = 1000.0) -> "FlowMatchingSchedule":
        """The training sigmas of a ``FlowMatchEulerDiscreteScheduler`` config: its static shift, or its
        resolution-dependent one at the image tokens (2x2 latent patches) of ``latent_shape`` (C, H, W)."""
        from .pipelines.scheduler_flow import flow_training_sigmas, resolution_shift

        mu = None
        if config.get("use_dynamic_shifting"):
            if latent_shape is None:
                raise ValueError("a teacher with resolution-dependent shifting needs the latent shape")
            mu = resolution_shift((latent_shape[-2] // 2) * (latent_shape[-1] // 2),
                                  config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                  config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = flow_training_sigmas(config.get("num_train_timesteps", 1000), config.get("shift", 1.0), mu)
        return cls(sigmas, time_scale, mu)

    def regression_target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The velocity v = eps - x0, what a flow-matching teacher regresses (Rectified Flow, Liu et al. 2022, eq. 1;
        reflow on teacher pairs)."""
        return eps - x0

    def network_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t * time_scale, the timestep diffusers' flow pipelines pass to the transformer."""
        return self.sigmas.to(t.device)[t.long()] * self.time_scale

    def transition(self, s: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a = alpha_t / alpha_s, sigma^2 = sigma_t^2 - a^2 sigma_s^2 of q(x_t | x_s) for any Gaussian path (VDM,
        Kingma et al. 2021, sec. 3 and app. A)."""
        a = self.alphas[t.cpu().long()] / self.alphas[s.cpu().long()]
        variance = self.sigmas[t.cpu().long()] ** 2 - a**2 * self.sigmas[s.cpu().long()] ** 2
        return _per_sample(a, like), _per_sample(variance, like)


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


def skipping_step_pairs(grid: torch.Tensor, skip: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t_{n+k} uniform on the skipping-step grid and t_n = t_{n+k} - k clamped at 0 (LCM, Luo et al. 2023, sec. 4.3)."""
    start = grid[torch.randint(0, len(grid), (batch_size,))]
    return start, (start - skip).clamp(min=0)


def phase_edges(num_train_timesteps: int, num_ddim_timesteps: int, multiphase: int) -> torch.Tensor:
    """Edges s_0 = 0 < s_1 < ... < s_M = t_N of M phases on the DDIM grid (PCM, Wang et al. 2024, Algorithm 1 input).

    With the grid t_0 = 0, t_i = i*k - 1 (i = 1..N), edge m is t_{j_m} with j_m = floor(m N / M): the same split of
    the N grid steps into M runs as the reference implementation's ``np.linspace(0, N, M, endpoint=False)``.
    """
    if not 1 <= multiphase <= num_ddim_timesteps:
        raise ValueError(f"multiphase must be in [1, {num_ddim_timesteps}], got {multiphase}")
    grid = torch.cat([torch.zeros(1, dtype=torch.long), ddim_timesteps(num_train_timesteps, num_ddim_timesteps)])
    return grid[torch.arange(multiphase + 1) * num_ddim_timesteps // multiphase]


def phase_lower_edge(t: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """s_m for the phase s_m < t <= s_{m+1} that holds t (PCM, Wang et al. 2024, Algorithm 1, "determine [s_m, s_{m+1}]")."""
    inner = edges[1:-1].to(t.device)
    phase = (t.view(-1, 1) > inner.view(1, -1)).sum(dim=1)
    return edges.to(t.device)[phase]


def diffuse_between(schedule: NoiseSchedule, x_s: torch.Tensor, noise: torch.Tensor, s: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_s) = N(a_{t|s} x_s, sigma^2_{t|s} I) for t >= s (DDPM, Ho et al. 2020, eq. 2)."""
    a, variance = schedule.transition(s, t, x_s)
    return a * x_s + variance.sqrt() * noise


def alpha_sigma_to_clean(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor):
    """alpha_t, sigma_t where t = -1 is the clean end alpha = 1, sigma = 0 (DDIM's final step with set_alpha_to_one)."""
    t = t.cpu().long()
    clean = t < 0
    alpha = torch.where(clean, torch.ones(()), schedule.alphas[t.clamp(min=0)])
    sigma = torch.where(clean, torch.zeros(()), schedule.sigmas[t.clamp(min=0)])
    return _per_sample(alpha, like), _per_sample(sigma, like)


def transition_variance(schedule: NoiseSchedule, s: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """beta_{t|s}, the variance of q(x_t | x_s) for s < t (VP: 1 - abar_t / abar_s; DDPM, Ho et al. 2020, eq. 2)."""
    return schedule.transition(s, t, like)[1]


def posterior_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, s: torch.Tensor,
                            t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_s | x_t, x_0) for s < t (DDPM, Ho et al. 2020, eq. 6-7, beta_t -> beta_{t|s}; any
    Gaussian path: VDM, Kingma et al. 2021, app. A)."""
    a, beta = schedule.transition(s, t, x_t)
    alpha_s, sigma_s, sigma_t = schedule.alpha(s, x_t), schedule.sigma(s, x_t), schedule.sigma(t, x_t)
    mean = (alpha_s * beta * x0 + a * sigma_s**2 * x_t) / sigma_t**2
    return mean, beta * sigma_s**2 / sigma_t**2
