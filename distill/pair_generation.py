"""Generate (initial noise, teacher sample) pairs for Rectified Diffusion (Wang et al. 2024, Algorithm 4), written as
the resumable shards distill/pairs.py reads: the teacher's stock pipeline with multistep DPM-Solver++ maps each noise
to a latent."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import build_prompt_dataset
from .errors import DistillError
from .pairs import SAMPLER, PairManifest, latent_shape, sample_noise, start_or_resume, write_shard
from .teacher import inspect_teacher, native_resolution
from .teacher_files import teacher_fingerprint


@dataclass
class PairGenerationConfig:
    """Settings of train_scripts/generate_pairs.py (defaults: the Rectified Diffusion reference's generation run)."""

    pretrained_teacher_model: str = field(default="", metadata={
        "help": "Teacher: a local SD 1.x/2.x or SDXL diffusers folder, or a Hub id."})
    output_dir: str = field(default="", metadata={
        "help": "Folder of the pair shards; rerun with the same arguments to resume an interrupted run."})
    prompts_file: str | None = field(default=None, metadata={
        "help": "A .txt file, one prompt per line."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "A Hugging Face dataset (name or save_to_disk folder) whose --caption_column holds prompts."})
    train_data_dir: str | None = field(default=None, metadata={
        "help": "A local image folder with metadata.jsonl (or .tar shards) whose captions are the prompts."})
    caption_column: str = field(default="text", metadata={
        "help": "The column holding the prompts."})
    num_samples: int | None = field(default=None, metadata={  # None: one pair per prompt
        "help": "Number of pairs (prompts are cycled); default: one per prompt."})
    num_inference_steps: int = field(default=25, metadata={
        "help": "Steps of the teacher's DPM-Solver++."})
    guidance_scale: float = field(default=5.0, metadata={
        "help": "Classifier-free guidance scale of the teacher (1 disables guidance)."})
    resolution: int | None = field(default=None, metadata={  # None: the teacher's native resolution
        "help": "Image size; default: the teacher's native size."})
    seed: int = field(default=0, metadata={
        "help": "Sample i's noise is drawn from a generator seeded by (seed, i)."})
    shard_size: int = field(default=256, metadata={
        "help": "Pairs per shard file (the unit of resuming)."})
    batch_size: int = field(default=8, metadata={
        "help": "Pairs per teacher call."})

    def __post_init__(self):
        if not self.pretrained_teacher_model:
            raise DistillError("--pretrained_teacher_model is required: a local SD/SDXL folder or a Hub id.")
        if not self.output_dir:
            raise DistillError("--output_dir is required: the folder the pair shards are written to (and resumed "
                               "from); pass it to training as --pairs_dir.")
        sources = [flag for flag, value in (("--prompts_file", self.prompts_file),
                                            ("--dataset_name", self.dataset_name),
                                            ("--train_data_dir", self.train_data_dir)) if value]
        if len(sources) != 1:
            raise DistillError(f"Pass exactly one prompt source (got {len(sources)}): --prompts_file (a .txt file, "
                               "one prompt per line), or --dataset_name / --train_data_dir with --caption_column.")
        for flag in ("num_inference_steps", "shard_size", "batch_size"):
            if getattr(self, flag) < 1:
                raise DistillError(f"--{flag} must be a positive integer, got {getattr(self, flag)}.")
        if self.num_samples is not None and self.num_samples < 1:
            raise DistillError(f"--num_samples must be at least 1, got {self.num_samples}.")
        if self.guidance_scale < 1.0:
            raise DistillError(f"--guidance_scale must be >= 1 (1 disables guidance), got {self.guidance_scale}.")
        if self.seed < 0:
            raise DistillError(f"--seed must be a non-negative integer, got {self.seed}.")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise DistillError(f"--resolution must be a positive multiple of 8, got {self.resolution}.")

    @property
    def prompts_source(self) -> str:
        return self.prompts_file or self.dataset_name or self.train_data_dir


def pair_scheduler(info):
    """The teacher's solver, built from its scheduler config (see dpm_solver_scheduler)."""
    from diffusers import DPMSolverMultistepScheduler

    config = DPMSolverMultistepScheduler.load_config(info.path, subfolder="scheduler")
    return dpm_solver_scheduler(config, info.family_spec.flow_matching)


def dpm_solver_scheduler(teacher_scheduler_config, flow_matching: bool):
    """Multistep DPM-Solver++ (Lu et al. 2022) from t = T - 1 (trailing) down to the clean x0; on a flow-matching
    teacher on its shifted flow sigmas with velocity prediction."""
    from diffusers import DPMSolverMultistepScheduler

    flow = {}
    if flow_matching:
        flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                    flow_shift=teacher_scheduler_config.get("shift", 1.0))
    return DPMSolverMultistepScheduler.from_config(teacher_scheduler_config, algorithm_type="dpmsolver++",
                                                   timestep_spacing="trailing", final_sigmas_type="zero", **flow)


def load_pair_pipeline(info):
    """The stock pipeline of the teacher's family with the pair sampler."""
    family = info.family_spec
    pipe = family.pipeline_class().from_pretrained(info.path, scheduler=pair_scheduler(info),
                                                   **family.pipeline_kwargs(info))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def teacher_latents(pipe, noise: torch.Tensor, prompts: list[str], config: PairGenerationConfig, resolution: int):
    """x0_hat, the teacher's guided ODE solution from the noise eps (Rectified Diffusion, Algorithm 4 input)."""
    return pipe(prompts, latents=noise, num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale, height=resolution, width=resolution,
                output_type="latent").images


def generate_pairs(config: PairGenerationConfig, show_progress: bool = True) -> Path:
    """Write (or finish writing) the pair folder ``config.output_dir``; complete shards are never redone."""
    from tqdm.auto import tqdm


    info = inspect_teacher(config.pretrained_teacher_model)
    prompts = build_prompt_dataset(config.prompts_source, config.caption_column)
    resolution = config.resolution or native_resolution(info)
    shape = latent_shape(info, resolution)
    manifest = PairManifest(
        teacher=config.pretrained_teacher_model, family=info.family, resolution=resolution, latent_shape=list(shape),
        num_samples=config.num_samples or len(prompts), shard_size=config.shard_size,
        num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale, seed=config.seed,
        sampler=SAMPLER, prompts_source=config.prompts_source, num_prompts=len(prompts),
        teacher_path=str(Path(info.path).resolve()), teacher_fingerprint=teacher_fingerprint(info.path))
    folder = Path(config.output_dir)
    todo = start_or_resume(folder, manifest)
    pipe = load_pair_pipeline(info)
    done = manifest.num_samples - sum(len(manifest.shard_range(s)) for s in todo)
    with tqdm(total=manifest.num_samples, initial=done, desc="Pairs", disable=not show_progress) as progress:
        for shard in todo:
            indices = list(manifest.shard_range(shard))
            noise_parts, latent_parts = [], []
            for start in range(0, len(indices), config.batch_size):
                batch = indices[start:start + config.batch_size]
                noise = torch.stack([sample_noise(config.seed, i, shape) for i in batch])
                latents = teacher_latents(pipe, noise, [prompts[i % len(prompts)] for i in batch], config, resolution)
                noise_parts.append(noise)
                latent_parts.append(latents.float().cpu())
                progress.update(len(batch))
            write_shard(folder, shard, torch.cat(noise_parts), torch.cat(latent_parts),
                        [prompts[i % len(prompts)] for i in indices])
    return folder
