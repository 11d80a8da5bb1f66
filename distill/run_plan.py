"""The run's resolved settings, decided once: what the flags left open (resolution, seed, resume point, step count).

The configs a run was given are never changed; everything derived from them lives here, and the fully resolved
settings are written to ``output_dir/run_config.yaml``, which repeats the run when passed back with ``--config``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoints import read_state
from .errors import DistillError
from .run_identity import check_resume, run_identity

logger = logging.getLogger(__name__)
RUN_CONFIG_FILE = "run_config.yaml"
NOT_REPEATED = ("hub_token", "resume_from_checkpoint")  # never written to run_config.yaml


@dataclass(frozen=True)
class RunPlan:
    """Resolution, seed, weight dtype, checkpoint to resume, and every setting with those resolved."""

    method: str
    resolution: int
    seed: int
    weight_dtype: torch.dtype
    resume_path: Path | None
    settings: dict
    identity: dict

    def scalar_settings(self) -> dict:
        """Every setting as a scalar (for trackers and distill_config.json); never the Hub token."""
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.settings.items()
                if k != "hub_token"}

    def write_run_config(self, output_dir: Path) -> Path:
        """output_dir/run_config.yaml: the method and every resolved setting, readable by --config."""
        import yaml

        repeatable = {"method": self.method, **{k: v for k, v in self.settings.items() if k not in NOT_REPEATED}}
        path = output_dir / RUN_CONFIG_FILE
        path.write_text(yaml.safe_dump(repeatable, sort_keys=False))
        return path


def plan_run(method: str, method_config, inputs, cfg, accelerator) -> RunPlan:
    """Resolve the run (after the inputs are checked, before any model loads); a resume must train the same thing."""
    resume_path, seed = inputs.resume_path, inputs.seed
    if inputs.seed_was_drawn:
        logger.info("No --seed given: this run uses seed %d (pass --seed %d to repeat it).", seed, seed)
    settings = {**asdict(inputs.data_config), **asdict(cfg), **asdict(method_config),
                "resolution": inputs.resolution, "seed": seed}
    identity = run_identity(method, settings, inputs.info.path, inputs.info.family, accelerator.num_processes)
    if resume_path is not None:
        for warning in check_resume(resume_path, read_state(resume_path), identity, cfg.max_train_steps):
            logger.warning(warning)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return RunPlan(method, inputs.resolution, seed, weight_dtype, resume_path, settings, identity)


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps per epoch, steps to train and the real total batch, once the data loader is known."""

    steps_per_epoch: int
    max_steps: int
    total_batch: int

    @staticmethod
    def of(cfg, num_samples: int, batches_per_process: int, num_processes: int) -> "StepPlan":
        """An epoch ends with a shorter accumulation window when its batch count is not a multiple of the window."""
        if batches_per_process == 0:
            raise DistillError(f"The dataset ({num_samples} samples in batches of --train_batch_size "
                               f"{cfg.train_batch_size}) gives no batch to each of the {num_processes} processes: "
                               "add data, or lower --train_batch_size or the number of processes.")
        steps_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
        batch = min(cfg.train_batch_size, num_samples)
        if batch < cfg.train_batch_size:
            logger.warning("The dataset has %d samples, fewer than --train_batch_size %d: every batch holds %d "
                           "samples, so the total batch is %d, not %d.", num_samples, cfg.train_batch_size, batch,
                           batch * num_processes * cfg.gradient_accumulation_steps,
                           cfg.train_batch_size * num_processes * cfg.gradient_accumulation_steps)
        return StepPlan(steps_per_epoch, cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch,
                        batch * num_processes * cfg.gradient_accumulation_steps)
