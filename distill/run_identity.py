"""What a checkpoint was trained as, and the check that a resumed run trains the same thing.

Every checkpoint records the run's identity: the method, the teacher (its name and a fingerprint of its UNet's
configuration and weights), and every setting. On resume each setting is compared: a setting that changes what is trained (the
data, the batch, the learning rate, the LoRA, the method's hyperparameters) stops the run with one line listing every
difference; a setting that only changes bookkeeping or speed (checkpointing, validation, logging, export, attention
kernels) is accepted with a warning.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DistillError
from .teacher_files import teacher_fingerprint

# Settings a resumed run may change: they do not change the weights a step produces (beyond float noise for the
# precision and kernel switches), only what is logged, saved or exported, or how long training goes on.
CHANGEABLE_ON_RESUME = frozenset({
    "output_dir", "cache_dir", "checkpointing_steps", "checkpoints_total_limit",
    "validation_steps", "validation_prompts", "report_to", "logging_dir", "tracker_project_name", "export_pipeline",
    "export_format", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "hub_include_pipeline",
    "dataloader_num_workers", "gradient_checkpointing", "enable_xformers_memory_efficient_attention", "allow_tf32",
    "torch_compile", "channels_last",
    "mixed_precision", "vae_encode_batch_size", "max_train_steps", "num_train_epochs", "num_inference_steps",
    "pretrained_teacher_model",  # compared through the teacher fingerprint; the same teacher may move
})
# The process count and the accumulation window may trade against each other at the same global batch: samples are
# drawn by global micro-batch index (see trainer.micro_batch_index), so only their product must stay.
BATCH_SPLIT = ("gradient_accumulation_steps", "num_processes")
NOT_RECORDED = frozenset({"hub_token", "resume_from_checkpoint"})
IDENTITY_KEYS = ("method", "teacher_family", "teacher_fingerprint", "num_processes")


def _normalise(value):
    """Local paths compare by their absolute location; other values as JSON scalars or strings."""
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def run_identity(method: str, settings: dict, teacher_path: str, family: str, num_processes: int) -> dict:
    """The identity recorded in each checkpoint: method, teacher family and fingerprint, every setting."""
    identity = {"method": method, "teacher_family": family, "teacher_fingerprint": teacher_fingerprint(teacher_path)[:16],
                "num_processes": num_processes}
    identity.update({k: _normalise(v) for k, v in settings.items() if k not in NOT_RECORDED})
    return identity


def _flag(name: str) -> str:
    return name if name in IDENTITY_KEYS else f"--{name}"


def compare_identity(recorded: dict, current: dict) -> tuple[list[str], list[str]]:
    """(differences that change what is trained, harmless differences), each as 'name: old -> new'.

    The identity keys come first; a setting only one of two different methods has is not listed.
    """
    blocking, harmless = [], []
    for name in [*IDENTITY_KEYS, *sorted((set(recorded) & set(current)) - set(IDENTITY_KEYS))]:
        if name in BATCH_SPLIT:
            continue
        old, new = recorded.get(name), current.get(name)
        if old == new:
            continue
        (harmless if name in CHANGEABLE_ON_RESUME else blocking).append(f"{_flag(name)}: {old!r} -> {new!r}")
    old_split = [recorded.get(k) for k in BATCH_SPLIT]
    new_split = [current.get(k) for k in BATCH_SPLIT]
    if old_split != new_split:
        text = (f"--gradient_accumulation_steps x processes: {old_split[0]} x {old_split[1]} -> "
                f"{new_split[0]} x {new_split[1]}")
        same_window = None not in old_split and old_split[0] * old_split[1] == new_split[0] * new_split[1]
        (harmless if same_window else blocking).append(text + (" (same global batch)" if same_window else ""))
    return blocking, harmless


def check_resume(checkpoint: Path, state: dict, current: dict, max_train_steps: int | None) -> list[str]:
    """Stop with one error listing what differs from the checkpoint's run; return warnings for harmless changes."""
    step = state.get("global_step", 0)
    if max_train_steps is not None and step > max_train_steps:
        raise DistillError(f"{checkpoint.name} is at step {step}, beyond --max_train_steps {max_train_steps}: the "
                           f"export would be step-{step} weights described as {max_train_steps} steps. Pass "
                           f"--max_train_steps {step} or more, or resume an earlier checkpoint.")
    recorded = state.get("identity")
    if recorded is None:
        return [f"{checkpoint} records no run settings (written by an older version): its method and settings "
                "cannot be checked against this run."]
    blocking, harmless = compare_identity(recorded, current)
    if blocking:
        raise DistillError(f"{checkpoint} was trained with other settings than this run: {'; '.join(blocking)}. "
                           f"Resume with the checkpoint's settings (see {checkpoint / 'trainer_state.json'}), or "
                           "train from scratch in a new --output_dir.")
    return [f"Resuming {checkpoint.name} with changed settings that do not change what is trained: "
            f"{'; '.join(harmless)}."] if harmless else []
