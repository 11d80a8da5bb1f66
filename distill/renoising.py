"""The multi-step sampler of an x0 generator: denoise to x0 in one call, re-noise x0 to the next point of a K-point
chain with fresh noise, denoise again (UFOGen, Xu et al. 2023, sec. 4.1; DMD2, Yin et al. 2024, sec. 4.4).

DMD2's backward simulation (sec. 4.5) trains the generator at step k of this chain on the input the chain itself
produces at step k; ``sampler_input`` is that input. The exported student samples with diffusers' ``LCMScheduler``
configured by ``x0_chain_scheduler_config``, whose steps are exactly this sampler's (a test compares the two).
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import NoiseSchedule, ddim_timesteps

# LCMScheduler's denoised output is c_skip(t) x_t + c_out(t) x0'; with the timestep scaled by 1e6, c_out(t) = 1 and
# c_skip(t) < 1e-15 on every chain timestep (t >= 1), so the scheduler returns the generator's x0' itself.
X0_TIMESTEP_SCALING = 1e6

Generate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t per row) -> x0


def chain_timesteps(num_train_timesteps: int, chain_length: int, num_steps: int | None = None) -> torch.Tensor:
    """``num_steps`` evenly spaced points, from T-1 down, of the K-point chain t_k = k T/K - 1 (K = ``chain_length``;
    DMD2's SDXL list 999, 749, 499, 249 for K = 4; LCMScheduler's grid for ``original_inference_steps`` = K)."""
    num_steps = chain_length if num_steps is None else num_steps
    if not 1 <= num_steps <= chain_length:
        raise ValueError(f"num_steps must be in [1, {chain_length}], got {num_steps}")
    chain = ddim_timesteps(num_train_timesteps, chain_length).flip(0)
    return chain[torch.arange(num_steps) * chain_length // num_steps]


def _fresh_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


@torch.no_grad()
def sampler_input(generate: Generate, noise: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule,
                  stop: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_{t_stop}: what the sampler feeds the generator at its step ``stop`` (0: the noise itself), made by running
    the generator through steps 0 .. stop-1 (DMD2's backward simulation, sec. 4.5)."""
    x = noise
    for i in range(stop):
        t = timesteps[i].view(1).expand(len(x)).to(x.device)
        x0 = generate(x, t)
        x = schedule.add_noise(x0, _fresh_noise(x, generator), timesteps[i + 1].view(1).expand(len(x)))
    return x


@torch.no_grad()
def renoising_sample(generate: Generate, noise: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """x0 after every step of the chain: G(x_t, t), re-noised to the next t with fresh noise, ... (UFOGen sec. 4.1)."""
    x = sampler_input(generate, noise, timesteps, schedule, len(timesteps) - 1, generator)
    return generate(x, timesteps[-1].view(1).expand(len(x)).to(x.device))


def x0_chain_scheduler_config(chain_length: int) -> dict:
    """``LCMScheduler`` overrides that make its steps this module's sampler on the K-point chain."""
    return {"original_inference_steps": chain_length, "timestep_scaling": X0_TIMESTEP_SCALING}
