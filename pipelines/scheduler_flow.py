"""Few-step sampler of a student distilled from a flow-matching teacher (SD3 / SD3.5, FLUX.1), on the teacher's sigmas.

This file travels inside exported pipeline folders and imports only torch and diffusers. The training toolkit indexes
the teacher's sigmas by integer timestep t = 0..T-1 (sigma_t is the sigma of ``FlowMatchEulerDiscreteScheduler``'s
training timestep t + 1, with its shift) and calls the transformer with sigma_t * T (FLUX.1: sigma_t); this scheduler
uses the same table (``flow_training_sigmas``, which the toolkit imports from this file),
so every step lands exactly on a trained sigma. x_t = (1 - sigma_t) x0 + sigma_t eps, and the network predicts the
velocity v = eps - x0 (Rectified Flow, Liu et al. 2022; SD3, Esser et al. 2024).

Two step rules, on three grids:
- ``sampler="consistency"``: x0 -> c_skip x_t + c_out x0, then re-noised to the next timestep with fresh noise
  (multistep consistency sampling, Song et al. 2023, Algorithm 1; LCMScheduler's rule), on LCMScheduler's grid
  (``timestep_spacing="lcm"``: n evenly spaced points of the ``original_inference_steps``-point skipping grid).
- ``sampler="ode"``: the deterministic first-order step x_prev = alpha_prev x0 + sigma_prev eps, i.e. an Euler step
  of the flow ODE (DDIM eq. 12), on DDIM's trailing grid (``"trailing"``, ending at the clean sample) or on PCM's
  phase edges (``"phases"``, each step from a phase's upper edge to its lower one).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("consistency", "ode")
SPACINGS = ("lcm", "trailing", "phases")


@dataclass
class FlowFewStepSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    denoised: torch.Tensor


def flow_training_sigmas(num_train_timesteps: int, shift: float, mu: float | None = None) -> torch.Tensor:
    """sigma_t for t = 0..T-1, ascending: FlowMatchEulerDiscreteScheduler's training sigmas with its static shift, or
    (``mu`` given, FLUX.1) with the resolution-dependent exponential shift e^mu / (e^mu + 1 / sigma - 1)."""
    table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift,
                                            use_dynamic_shifting=mu is not None)
    sigmas = table.sigmas if mu is None else table.time_shift(mu, 1.0, table.sigmas)
    return sigmas.flip(0).float()


def resolution_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """mu of the exponential shift, linear in the number of image tokens (FLUX.1's pipelines; SD3, Esser et al. 2024,
    sec. 5.3.2)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def flow_timestep_grid(num_train_timesteps: int, original_inference_steps: int, num_steps: int, spacing: str,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, next timesteps) of ``num_steps`` steps, top down; -1 is the clean end (alpha 1, sigma 0)."""
    k = num_train_timesteps // original_inference_steps
    skipping = torch.arange(1, original_inference_steps + 1) * k - 1
    if spacing == "lcm":  # LCMScheduler.set_timesteps: n evenly spaced points of the reversed skipping grid
        steps = skipping.flip(0)[(torch.arange(num_steps) * original_inference_steps) // num_steps]
        return steps, torch.cat([steps[1:], steps[-1:]])
    if spacing == "trailing":  # DDIMScheduler's "trailing" spacing, ending at the clean sample
        steps = (num_train_timesteps - torch.arange(num_steps) * num_train_timesteps / num_steps).round().long() - 1
        return steps, torch.cat([steps[1:], torch.tensor([-1])])
    # PCM's phase edges s_0 = 0 < ... < s_n on the skipping grid (PCM, Wang et al. 2024, Algorithm 1)
    grid = torch.cat([torch.zeros(1, dtype=torch.long), skipping])
    edges = grid[torch.arange(num_steps + 1) * original_inference_steps // num_steps]
    return edges[1:].flip(0), edges[:-1].flip(0)


class FlowFewStepScheduler(SchedulerMixin, ConfigMixin):
    """Consistency or first-order few-step sampling on a flow-matching teacher's trained sigmas."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 3.0,
        original_inference_steps: int = 50,
        sampler: str = "consistency",
        timestep_spacing: str = "lcm",
        timestep_scaling: float = 10.0,
        sigma_data: float = 0.5,
        mu: float | None = None,
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
        self.training_sigmas = flow_training_sigmas(num_train_timesteps, shift, mu)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        # Where re-noising draws from when step() gets no generator: diffusers' SD3 pipeline passes none, so the
        # few-step pipeline sets the caller's generator here (None: torch's global generator).
        self.noise_generator = None
        self._step_index = None
        self._begin_index = None

    # Copied from scheduler_pcm.PCMScheduler: the step-index bookkeeping every scheduler needs. Each scheduler file
    # travels alone inside exported folders, so it cannot import the other.
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

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas=None, mu: float | None = None) -> None:
        """The grid of ``num_inference_steps`` steps; ``timesteps`` holds sigma_t * T, what diffusers' flow pipelines
        call the transformer with (FLUX.1's divide it by T). The student samples on the sigmas it was trained at:
        of ``sigmas``, which FluxPipeline passes instead of the step count, only the number is used, and ``mu`` is
        fixed in the config."""
        if num_inference_steps is None:
            if sigmas is None:
                raise ValueError("Pass num_inference_steps (or sigmas, of which only the number is used).")
            num_inference_steps = len(sigmas)
        if not 1 <= num_inference_steps <= self.config.original_inference_steps:
            raise ValueError(f"num_inference_steps must be in [1, {self.config.original_inference_steps}] "
                             f"(original_inference_steps), got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.train_timesteps, self.next_train_timesteps = flow_timestep_grid(
            self.config.num_train_timesteps, self.config.original_inference_steps, num_inference_steps,
            self.config.timestep_spacing)
        self.timesteps = (self.training_sigmas[self.train_timesteps] * self.config.num_train_timesteps).to(device)
        self.sigmas = self.training_sigmas[self.train_timesteps]
        self._step_index = None
        self._begin_index = None

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        timestep = torch.as_tensor(timestep, dtype=self.timesteps.dtype).to(self.timesteps.device)
        matches = (self.timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of this schedule's {self.timesteps.tolist()}")
        self._step_index = int(matches[0])

    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t = 1 - sigma_t and sigma_t, with t = -1 the clean end."""
        sigma = self.training_sigmas[t] if t >= 0 else torch.zeros(())
        return (1 - sigma).to(like.device, like.dtype), sigma.to(like.device, like.dtype)

    def boundary_scalings(self, t: torch.Tensor) -> tuple[float, float]:
        """c_skip, c_out of the consistency function at integer timestep t (LCM's discrete form of CM eq. 7)."""
        scaled = self.config.timestep_scaling * float(t)
        c_skip = self.config.sigma_data**2 / (scaled**2 + self.config.sigma_data**2)
        return c_skip, scaled / (scaled**2 + self.config.sigma_data**2) ** 0.5

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """One step from ``timestep`` to the next point of the grid (see the module docstring)."""
        if self.num_inference_steps is None:
            raise ValueError("Call set_timesteps before step.")
        if self._step_index is None:
            self._init_step_index(timestep)
        t, t_next = self.train_timesteps[self._step_index], self.next_train_timesteps[self._step_index]
        output_dtype = sample.dtype
        sample, velocity = sample.float(), model_output.float()
        alpha, sigma = self._alpha_sigma(t, sample)
        x0, eps = sample - sigma * velocity, sample + alpha * velocity  # v = eps - x0
        last = self._step_index == self.num_inference_steps - 1
        if self.config.sampler == "consistency":
            c_skip, c_out = self.boundary_scalings(t)
            denoised = c_skip * sample + c_out * x0
            if last:
                prev_sample = denoised
            else:
                alpha_next, sigma_next = self._alpha_sigma(t_next, sample)
                generator = self.noise_generator if generator is None else generator
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
                prev_sample = alpha_next * denoised + sigma_next * noise
        else:
            denoised = x0
            alpha_next, sigma_next = self._alpha_sigma(t_next, sample)
            prev_sample = alpha_next * x0 + sigma_next * eps
        self._step_index += 1
        prev_sample, denoised = prev_sample.to(output_dtype), denoised.to(output_dtype)
        if not return_dict:
            return prev_sample, denoised
        return FlowFewStepSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma eps at a transformer timestep sigma * T (img2img pipelines call this)."""
        sigma = torch.as_tensor(timestep, dtype=torch.float32).flatten()[0] / self.config.num_train_timesteps
        return ((1 - sigma) * sample.float() + sigma * noise.float()).to(sample.dtype)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save the config and, beside it, this file: the folder then loads without the training toolkit."""
        os.makedirs(save_directory, exist_ok=True)
        target = os.path.join(save_directory, os.path.basename(__file__))
        if os.path.abspath(target) != os.path.abspath(__file__):
            shutil.copyfile(__file__, target)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
