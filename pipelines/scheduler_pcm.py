"""Phased consistency sampling for PCM students (Wang et al. 2024, "Phased Consistency Models").

This file travels inside exported folders and imports only torch and diffusers. A student trained with M phases
maps x_t, for t in the phase (s_m, s_{m+1}], to x_{s_m}: alpha_{s_m} x0 + sigma_{s_m} eps of its own prediction.
Sampling in n steps visits the phase edges of an n-phase split of the DDIM grid of ``original_inference_steps``
points, s_m = t_{floor(m N / n)} with t_0 = 0 and t_i = i * (T // N) - 1: with n = M these are exactly the trained
edges (999, 739, 499, 239 -> 0 for M = 4, N = 50), and with n dividing M a subset of them. diffusers' TCDScheduler
and LCMScheduler step on t_{N - floor(i N / n)} instead (999, 759, 499, 259 for n = 4) and DDIMScheduler "trailing"
on 999, 749, 499, 249: none of them lands on PCM's edges.

``gamma`` > 0 is TCD's strategic stochastic step (Zheng et al. 2024): jump to s' = floor((1 - gamma) s), below the
next edge s, then diffuse forward from s' back to s with fresh noise. ``gamma = 0`` (default) is deterministic.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class PCMSchedulerOutput(BaseOutput):
    """``prev_sample``: x at the next edge (the next model input); ``denoised``: the step's x0 prediction."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


def pcm_phase_edges(num_train_timesteps: int, original_inference_steps: int, num_phases: int) -> torch.Tensor:
    """Edges s_0 = 0 < ... < s_n of an n-phase split of the DDIM grid (PCM, Algorithm 1), ascending."""
    step = num_train_timesteps // original_inference_steps
    grid = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, original_inference_steps + 1) * step - 1])
    return grid[torch.arange(num_phases + 1) * original_inference_steps // num_phases]


class PCMScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic phased sampling on the trained edges, with TCD-style stochasticity ``gamma``."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        original_inference_steps: int = 50,
        multiphase: int = 4,
        gamma: float = 0.0,
    ):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        # The teacher's betas, computed by diffusers' own DDPM scheduler (the same one the training schedule uses).
        ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule=beta_schedule, trained_betas=trained_betas,
                             rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.alphas_cumprod = ddpm.alphas_cumprod.float()
        self.alphas = self.alphas_cumprod.sqrt()
        self.sigmas = (1 - self.alphas_cumprod).sqrt()
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.set_timesteps(multiphase)
        self.num_inference_steps = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """The index of the first timestep (pipelines call this for img2img)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def phase_edges(self, num_inference_steps: int) -> torch.Tensor:
        """Ascending edges s_0 = 0 < ... < s_n sampled in ``num_inference_steps`` steps."""
        if not 1 <= num_inference_steps <= self.config.original_inference_steps:
            raise ValueError(f"num_inference_steps must be in [1, {self.config.original_inference_steps}] "
                             f"(original_inference_steps), got {num_inference_steps}")
        return pcm_phase_edges(self.config.num_train_timesteps, self.config.original_inference_steps,
                               num_inference_steps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Timesteps s_n > ... > s_1: the upper edge of every phase, top down; each step lands on the next edge."""
        edges = self.phase_edges(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = edges[1:].flip(0).to(device)
        self.prev_timesteps = edges[:-1].flip(0).to(device)
        self._step_index = None
        self._begin_index = None

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        timestep = torch.as_tensor(timestep).to(self.timesteps.device)
        matches = (self.timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {int(timestep)} is not one of this schedule's {self.timesteps.tolist()}")
        self._step_index = int(matches[0])

    def _coefficients(self, timesteps: torch.Tensor, sample: torch.Tensor):
        """alpha_t, sigma_t (x_t = alpha_t x0 + sigma_t eps) broadcast against ``sample``."""
        index = torch.as_tensor(timesteps).long().cpu().view(-1)
        shape = (-1,) + (1,) * (sample.dim() - 1)
        alpha = self.alphas[index].to(sample.device).view(shape)
        sigma = self.sigmas[index].to(sample.device).view(shape)
        return alpha, sigma

    def predicted_x0_eps(self, model_output: torch.Tensor, timestep, sample: torch.Tensor):
        """(x0, eps) from an eps-, v- or x0-prediction (v: Salimans & Ho 2022, eq. 9)."""
        alpha, sigma = self._coefficients(timestep, sample)
        if self.config.prediction_type == "epsilon":
            return (sample - sigma * model_output) / alpha, model_output
        if self.config.prediction_type == "v_prediction":
            return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
        return model_output, (sample - alpha * model_output) / sigma

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, gamma: float | None = None,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """From the edge-top ``timestep`` to the next edge s: DDIM jump to s' = floor((1 - gamma) s), then re-noise
        to s when s' < s (gamma = 0: exactly the trained phased consistency function)."""
        if self.num_inference_steps is None:
            raise ValueError("Call set_timesteps before step.")
        if self._step_index is None:
            self._init_step_index(timestep)
        gamma = self.config.gamma if gamma is None else gamma
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        edge = self.prev_timesteps[self._step_index].cpu()
        jump_to = torch.floor((1 - gamma) * edge.double()).long()
        output_dtype = sample.dtype
        x0, eps = self.predicted_x0_eps(model_output.float(), timestep, sample.float())
        alpha_jump, sigma_jump = self._coefficients(jump_to, x0)
        prev_sample = alpha_jump * x0 + sigma_jump * eps
        if jump_to < edge:
            ratio = self.alphas_cumprod[edge] / self.alphas_cumprod[jump_to]
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            prev_sample = ratio.sqrt() * prev_sample + (1 - ratio).sqrt() * noise
        self._step_index += 1
        prev_sample, x0 = prev_sample.to(output_dtype), x0.to(output_dtype)
        if not return_dict:
            return prev_sample, x0
        return PCMSchedulerOutput(prev_sample=prev_sample, denoised=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) (DDPM, Ho et al. 2020, eq. 4)."""
        alpha, sigma = self._coefficients(timesteps, original_samples)
        return (alpha * original_samples + sigma * noise).to(original_samples.dtype)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save the config and, beside it, this file: the folder then loads without the training toolkit."""
        os.makedirs(save_directory, exist_ok=True)
        target = os.path.join(save_directory, os.path.basename(__file__))
        if os.path.abspath(target) != os.path.abspath(__file__):
            shutil.copyfile(__file__, target)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
