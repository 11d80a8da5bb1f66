"""Pure ODE-solver steps on the teacher's probability-flow ODE."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .conditioning import Cond
from .denoiser import Denoiser
from .errors import DistillError
from .schedule import NoiseSchedule, alpha_sigma_to_clean, ddim_timesteps


def check_fits_teacher(flag: str, steps: int, num_train_timesteps: int) -> None:
    """A count of points on the teacher's timesteps (a grid, a chain) may not exceed its T."""
    if steps > num_train_timesteps:
        raise DistillError(f"--{flag} ({steps}) cannot exceed the teacher's {num_train_timesteps} training "
                           f"timesteps; pass at most {num_train_timesteps}.")


@dataclass
class CFGSolverSettings:
    """The CFG-augmented teacher solver of consistency distillation: w ~ U[w_min, w_max] on an N-point DDIM grid
    (LCM, Luo et al. 2023, sec. 4.2-4.3; PCM reuses it); configs of such methods inherit these flags."""

    w_min: float = field(default=3.0, metadata={
        "help": "Minimum guidance scale w sampled for the CFG-augmented teacher ((1+w) cond - w uncond)."})
    w_max: float = field(default=15.0, metadata={
        "help": "Maximum guidance scale w sampled for the CFG-augmented teacher."})
    num_ddim_timesteps: int = field(default=50, metadata={
        "help": "N, the number of points on the teacher's DDIM skipping-step grid (at most the teacher's training "
                "timesteps)."})

    def __post_init__(self):
        if not 0 <= self.w_min <= self.w_max:
            raise DistillError(f"Need 0 <= --w_min <= --w_max, got w_min={self.w_min}, w_max={self.w_max}.")
        if self.num_ddim_timesteps < 1:
            raise DistillError(f"--num_ddim_timesteps must be at least 1, got {self.num_ddim_timesteps}.")
        parent = getattr(super(), "__post_init__", None)  # the other settings a config mixes in
        if parent is not None:
            parent()

    def check_against_teacher(self, num_train_timesteps: int) -> None:
        """The N-point grid must fit the teacher's T training timesteps (called before any weights load)."""
        check_fits_teacher("num_ddim_timesteps", self.num_ddim_timesteps, num_train_timesteps)
        parent = getattr(super(), "check_against_teacher", None)  # the other settings a config mixes in
        if parent is not None:
            parent(num_train_timesteps)

    def skipping_grid(self, num_train_timesteps: int) -> tuple[torch.Tensor, int]:
        """The DDIM grid t_1..t_N and its skip k = T // N, checked against the teacher's T."""
        check_fits_teacher("num_ddim_timesteps", self.num_ddim_timesteps, num_train_timesteps)
        return ddim_timesteps(num_train_timesteps, self.num_ddim_timesteps), num_train_timesteps // self.num_ddim_timesteps

    def sample_guidance(self, batch_size: int, device) -> torch.Tensor:
        """One guidance scale w ~ U[w_min, w_max] per example (LCM Algorithm 1, line 4)."""
        return torch.rand(batch_size, device=device) * (self.w_max - self.w_min) + self.w_min


def ddim_step(schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM step x_{t_prev} = alpha_{t_prev} x0 + sigma_{t_prev} eps (Song et al. 2021, eq. 12, eta=0);
    on a flow-matching teacher the Euler step of the flow ODE. t_prev = -1 is the clean end."""
    alpha, sigma = alpha_sigma_to_clean(schedule, t_prev, x0)
    return alpha * x0 + sigma * eps


def guided(cond_value: torch.Tensor, uncond_value: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """CFG in LCM's form (1 + w) * cond - w * uncond (LCM, Luo et al. 2023, eq. 9), w per sample."""
    w = w.to(cond_value.dtype).view(-1, *([1] * (cond_value.dim() - 1)))
    return cond_value + w * (cond_value - uncond_value)


@torch.no_grad()
def cfg_teacher_prediction(teacher: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond,
                           w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided (x0, eps) of the teacher, conditional and unconditional in one batched UNet call; a guidance-distilled
    teacher (FLUX.1-dev) is guided by its guidance input, one call at scale 1 + w (Meng et al. 2023, guidance
    distillation)."""
    if cond.guidance_embedded:
        return teacher(x_t, t, cond.with_guidance(1 + w.float()))
    x0, eps = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat([cond, uncond]))
    (cond_x0, uncond_x0), (cond_eps, uncond_eps) = x0.chunk(2), eps.chunk(2)
    return guided(cond_x0, uncond_x0, w), guided(cond_eps, uncond_eps, w)


@torch.no_grad()
def cfg_teacher_ddim_step(teacher: Denoiser, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, cond: Cond,
                          uncond: Cond, w: torch.Tensor) -> torch.Tensor:
    """One DDIM step of the CFG-augmented PF-ODE from t to t_prev (LCM, Luo et al. 2023, Algorithm 1, line 5)."""
    x0, eps = cfg_teacher_prediction(teacher, x_t, t, cond, uncond, w)
    return ddim_step(teacher.schedule, x0, eps, t_prev)


@torch.no_grad()
def teacher_ddim_step(teacher: Denoiser, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                      cond: Cond) -> torch.Tensor:
    """One DDIM step of the conditional PF-ODE without guidance (PCM's ``not_apply_cfg_solver``; DDIM eq. 12)."""
    x0, eps = teacher(x_t, t, cond)
    return ddim_step(teacher.schedule, x0, eps, t_prev)


def line_through(schedule: NoiseSchedule, x_start: torch.Tensor, x_end: torch.Tensor, s_start: torch.Tensor,
                 s_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) of the first-order trajectory x_s = alpha_s x0 + sigma_s eps through two points (Rectified Diffusion,
    Wang et al. 2024, phased: eps = Delta(x / alpha) / Delta(sigma / alpha)), solved without dividing by alpha, which
    is 0 at a flow-matching teacher's pure-noise end."""
    alpha_s, sigma_s = alpha_sigma_to_clean(schedule, s_start, x_start)
    alpha_e, sigma_e = alpha_sigma_to_clean(schedule, s_end, x_start)
    determinant = alpha_s * sigma_e - alpha_e * sigma_s
    return (sigma_e * x_start - sigma_s * x_end) / determinant, (alpha_s * x_end - alpha_e * x_start) / determinant
