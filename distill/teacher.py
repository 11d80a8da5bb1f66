"""Load a teacher: its denoiser network, noise schedule, conditioner, VAE and latent shape, for any registered family."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import TeacherInfo, TextConditioner, teacher_load_errors
from .schedule import NoiseSchedule


@dataclass
class LoadedTeacher:
    """Everything a run needs from the teacher folder; ``network`` becomes the student (adapters on top)."""

    info: TeacherInfo
    network: torch.nn.Module
    schedule: NoiseSchedule
    scheduler_config: dict
    conditioner: TextConditioner
    vae: torch.nn.Module
    latent_shape: tuple[int, int, int]

    @property
    def family(self) -> str:
        return self.info.family


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along each side (8 for SD and SDXL)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_teacher(info: TeacherInfo, resolution: int, weight_dtype: torch.dtype = torch.float32, device="cpu",
                 vae_path: str | None = None, revision: str | None = None) -> LoadedTeacher:
    """Load the teacher ``info`` describes, frozen, on ``device``: network and text encoders in ``weight_dtype``.

    Its family (``info.family_spec``) says which network, conditioner and noise schedule that is.
    """
    from diffusers import AutoencoderKL, DDPMScheduler

    family = info.family_spec
    with teacher_load_errors(info):  # damaged weight files: one error line, not a traceback from deep inside
        network = family.load_network(info.path, revision)
        if vae_path:
            vae = AutoencoderKL.from_pretrained(vae_path)
            vae_dtype = weight_dtype
        else:
            vae = AutoencoderKL.from_pretrained(info.path, subfolder="vae", revision=revision)
            vae_dtype = torch.float32 if family.vae_fp32 else weight_dtype  # e.g. SDXL's own VAE overflows in fp16
        conditioner = family.conditioner(info, resolution, weight_dtype, revision)
    network.requires_grad_(False).to(device, weight_dtype)
    vae.requires_grad_(False).eval().to(device, vae_dtype)
    conditioner.to(device)
    scheduler_config = DDPMScheduler.load_config(info.path, subfolder="scheduler")  # any scheduler's config file
    latent_shape = (network.config.in_channels, *(2 * [resolution // vae_scale_factor(vae)]))
    return LoadedTeacher(info, network, family.noise_schedule(scheduler_config), scheduler_config, conditioner, vae,
                         latent_shape)
