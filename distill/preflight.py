"""Every user-caused problem a run can detect from flags, files and configs, found before any model is loaded."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoints import PARTIAL_SUFFIX, STATE_FILE, check_output_dir, read_state, resume_checkpoint
from .sharding import check_sharding_flags, requested_sharding
from .teacher import TeacherInfo, inspect_teacher, native_resolution
from .data import ImageDataConfig, build_training_set
from .errors import DistillError
from .train_config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    """What the checks resolved: teacher, resolution, seed, checkpoint to resume, the data settings and dataset."""

    info: TeacherInfo
    resolution: int
    seed: int
    seed_was_drawn: bool  # no --seed and none recorded in the checkpoint: a fresh one, to be logged
    resume_path: Path | None
    data_config: ImageDataConfig
    dataset: torch.utils.data.Dataset
    collate: object


def _check_against_teacher(info: TeacherInfo, method_config) -> None:
    """The method config's own hooks: check_against_family, given the teacher's family, and check_against_teacher,
    given the teacher's T from its scheduler config alone."""
    family_check = getattr(method_config, "check_against_family", None)  # optional: what the network must offer
    if family_check is not None:
        family_check(info.family_spec)
    check = getattr(method_config, "check_against_teacher", None)  # optional: configs without timestep counts
    scheduler_file = Path(info.path, "scheduler", "scheduler_config.json")
    if check is None or not scheduler_file.is_file():
        return
    check(json.loads(scheduler_file.read_text()).get("num_train_timesteps", 1000))


def _check_optional_packages(cfg: TrainConfig) -> None:
    """Flags that need a package this install may not have."""
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise DistillError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
    if cfg.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError as error:
            raise DistillError("--enable_xformers_memory_efficient_attention needs xformers: "
                               "pip install xformers (PyTorch's SDPA is used by default).") from error


def _check_resume_flag(choice: str | None) -> None:
    """--resume_from_checkpoint names 'latest' or a complete checkpoint folder."""
    if choice and choice.rstrip("/").endswith(PARTIAL_SUFFIX):
        raise DistillError(f"--resume_from_checkpoint {choice} is a checkpoint whose saving "
                           "never finished; pass 'latest' or a complete checkpoint-N folder.")
    if choice not in (None, "latest") and not Path(choice, STATE_FILE).is_file():
        raise DistillError(f"--resume_from_checkpoint {choice} is not a checkpoint folder; "
                           "pass 'latest' or a checkpoint-N folder written by an earlier run.")


def run_seed(given: int | None, resume_path: Path | None) -> tuple[int, bool]:
    """(seed, drawn): --seed; else the resumed checkpoint's; else a fresh one shared by every process."""
    if given is not None:
        return given, False
    recorded = read_state(resume_path).get("seed") if resume_path is not None else None
    if recorded is not None:
        return recorded, False
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # The process group of a multi-process launch, for the broadcast, made as the Accelerator later makes it: on a CPU
    # launch (ACCELERATE_USE_CPU) without cpu=True accelerate would see one process and fix that for the whole run.
    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    return broadcast_object_list([int(np.random.SeedSequence().entropy % 2**32)])[0], True


def check_inputs(method_cls, method_config, data_config: ImageDataConfig, cfg: TrainConfig) -> Inputs:
    """Check the teacher, flags, output folder and data; resolve resolution, seed and resume point.

    The configs are not changed: the data settings come back with the resolved resolution and seed (the seed of
    augmentations and of a --max_train_samples subset is the run's seed).
    """
    if not cfg.pretrained_teacher_model:
        raise DistillError("--pretrained_teacher_model is required: a local SD/SDXL folder or a Hub id.")
    info = inspect_teacher(cfg.pretrained_teacher_model, cfg.cache_dir, cfg.teacher_revision)
    _check_against_teacher(info, method_config)
    if cfg.mixed_precision == "fp16" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        logger.warning("--mixed_precision fp16 on a machine without CUDA: fp16 on a CPU is about 5x slower than "
                       "fp32; pass --mixed_precision no (or bf16).")
    resolution = cfg.resolution if cfg.resolution is not None else native_resolution(info)
    if cfg.max_train_steps is not None and cfg.max_train_steps <= 0:
        raise DistillError(f"--max_train_steps must be positive, got {cfg.max_train_steps}.")
    multiple = info.family_spec.resolution_multiple
    if resolution % multiple:
        raise DistillError(f"--resolution must be a multiple of {multiple} for an {info.family_spec.label} teacher, "
                           f"got {resolution}.")
    if cfg.dataloader_num_workers is not None and cfg.dataloader_num_workers < 0:
        raise DistillError(f"--dataloader_num_workers must be 0 or more, got {cfg.dataloader_num_workers}.")
    _check_optional_packages(cfg)
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise DistillError("--push_to_hub needs --hub_model_id (the repo to create or update).")
    if cfg.seed is not None and not 0 <= cfg.seed < 2**32:
        raise DistillError(f"--seed must be in [0, 2**32 - 1], got {cfg.seed}.")
    _check_resume_flag(cfg.resume_from_checkpoint)
    check_output_dir(Path(cfg.output_dir))
    resume_path = resume_checkpoint(cfg.resume_from_checkpoint, Path(cfg.output_dir))
    check_sharding_flags(cfg, requested_sharding(), resume_path)
    seed, drawn = run_seed(cfg.seed, resume_path)
    data_config = dataclasses.replace(data_config, resolution=resolution, seed=seed)
    dataset, collate = build_training_set(method_cls.data_kind_for(method_config), data_config, info)
    return Inputs(info, resolution, seed, drawn, resume_path, data_config, dataset, collate)
