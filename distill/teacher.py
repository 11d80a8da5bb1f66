"""What a teacher folder is (its family, checked from its files) and loading it: its denoiser network, noise schedule, conditioner, VAE and latent shape, for any registered family."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .conditioning import TextConditioner
from .errors import DistillError
from .families import TeacherFamily, detect_family
from .schedule import NoiseSchedule
from .teacher_files import check_weight_files, resolve_hub_snapshot


@dataclass
class TeacherInfo:
    """What a teacher folder is: its family (distill/families.py) and what model_index.json says of it."""

    path: str
    family_spec: TeacherFamily
    force_zeros_for_empty_prompt: bool = False
    name: str = ""  # the folder or Hub id as the user gave it (``path`` is the resolved local folder)

    @property
    def family(self) -> str:
        """The family's name ("sd", "sdxl"), as distill_config.json, checkpoints and pairs.json record it."""
        return self.family_spec.name


def inspect_teacher(path: str, cache_dir: str | None = None, revision: str | None = None) -> TeacherInfo:
    """Read a teacher's model_index.json (local folder, or Hub id resolved through the cache) and classify it."""
    folder = Path(path)
    if not folder.exists():
        folder = resolve_hub_snapshot(path, cache_dir, revision)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise DistillError(
            f"{path} is not a diffusers pipeline folder (no model_index.json). Point --pretrained_teacher_model at "
            "a Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 folder saved with save_pretrained."
        )
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DistillError(f"{index_file} is damaged (not valid JSON). Re-download the teacher.") from None
    family = detect_family(folder, index, path)
    info = TeacherInfo(str(folder), family, family.force_zeros(index), name=str(path))
    for component in (family.network_subfolder, "vae", *family.text_encoders):
        check_weight_files(folder / component)
    return info



@contextmanager
def teacher_load_errors(info: TeacherInfo):
    """Turn a failure while reading the teacher's weights (a file inspect_teacher could not vet, e.g. a truncated
    .bin) into one DistillError naming the file diffusers/transformers complained about; out-of-memory passes."""
    try:
        yield
    except (DistillError, torch.OutOfMemoryError, KeyboardInterrupt):
        raise
    except Exception as error:
        detail = " ".join(str(error).split())
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise DistillError(f"Could not load the teacher {info.name or info.path} ({type(error).__name__}: {detail}). "
                           "A file of it is probably damaged or incomplete (an interrupted download): re-download "
                           "the teacher and rerun.") from None


def native_resolution(info: TeacherInfo) -> int:
    """The image size the teacher was trained at (its family reads it from the network and VAE configs)."""
    return info.family_spec.native_resolution(info.path)


def pipeline_class(info: TeacherInfo):
    """The stock diffusers pipeline class of the teacher's family."""
    return info.family_spec.pipeline_class()


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
    latent_shape = (vae.config.latent_channels, *(2 * [resolution // vae_scale_factor(vae)]))
    return LoadedTeacher(info, network, family.noise_schedule(scheduler_config, latent_shape), scheduler_config,
                         conditioner, vae, latent_shape)
