"""Checkpoints: atomic save, listing, verification, total limit and the choice of the one to resume.

A checkpoint is written as ``checkpoint-N.partial`` by every process (accelerate's ``save_state``) and renamed to
``checkpoint-N`` in one step once complete, so a crash at any moment leaves the previous complete checkpoint. Only
the trainable weights are stored (the save/load hooks), not a copy of the frozen teacher.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable

from .errors import DistillError

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written; renamed to checkpoint-N only once complete
STATE_FILE = "trainer_state.json"
LOW_DISK_BYTES = 64 * 2**20  # below this much free space, a failed write is reported as a full disk


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones carry a .partial suffix and are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete checkpoint-N.partial folders: what a run killed while saving leaves behind (main process only)."""
    for leftover in output_dir.glob(f"checkpoint-*{PARTIAL_SUFFIX}"):
        logger.warning("Removing %s: an earlier run stopped while writing it.", leftover)
        shutil.rmtree(leftover)


def damaged_files(checkpoint: Path) -> list[str]:
    """Files of ``checkpoint`` that cannot be read back: truncated safetensors or torch archives, broken JSON.

    Cheap: reads safetensors headers (which must cover the whole file), zip directories of torch.save files (at
    their end, so a truncated file has none), the JSON files and a sharded state's metadata (whose extents the shard
    files must cover); never the tensors themselves.
    """
    from safetensors import safe_open

    if not (checkpoint / STATE_FILE).is_file():
        return [STATE_FILE]
    damaged = []
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix in (".bin", ".pkl", ".pt", ".pth"):
                zipfile.ZipFile(path).close()
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception:  # noqa: BLE001 - any failure to read back means the file is damaged
            damaged.append(str(path.relative_to(checkpoint)))
    from .sharding import SHARDED_STATE, damaged_shards

    if (checkpoint / SHARDED_STATE).is_dir():
        damaged += damaged_shards(checkpoint / SHARDED_STATE)
    return damaged


def newest_intact(output_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files all read back, warning about damaged newer ones."""
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        broken = damaged_files(checkpoint)
        if not broken:
            return checkpoint
        logger.warning("Skipping %s: %s cannot be read back (damaged).", checkpoint, ", ".join(broken))
    return None


def read_state(checkpoint: Path) -> dict:
    """The trainer state recorded in ``checkpoint`` (step, seed, run identity)."""
    return json.loads((checkpoint / STATE_FILE).read_text())


def resume_checkpoint(choice: str | None, output_dir: Path) -> Path | None:
    """The checkpoint --resume_from_checkpoint names ('latest': the newest intact one), or None."""
    if not choice:
        return None
    if choice != "latest":
        checkpoint = Path(choice)
        broken = damaged_files(checkpoint)
        if broken:
            raise DistillError(f"--resume_from_checkpoint {checkpoint} is damaged: {', '.join(broken)} cannot be read "
                               "back. Resume an earlier checkpoint-N, or 'latest' (the newest intact one).")
        return checkpoint
    found = newest_intact(output_dir)
    if found is None:
        logger.warning("--resume_from_checkpoint latest: no intact checkpoint in %s, starting fresh.", output_dir)
    return found


def _disk_is_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed write was (most likely) for lack of space: ENOSPC, or almost no free space left."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < LOW_DISK_BYTES
    except OSError:
        return False


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, total_limit: int | None,
                    write_shards: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint-``step`` atomically; called by every process (DeepSpeed and sharded runs save collectively:
    ``write_shards(folder)`` writes each process's shards into the checkpoint folder).

    A write that fails on any process (a full disk, a read-only folder) stops every process together with one
    message that names the intact checkpoint to resume from; the half-written folder is removed.
    """
    import torch

    final = output_dir / f"checkpoint-{step}"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    failure: BaseException | None = None
    try:
        accelerator.save_state(str(partial))
        if write_shards is not None:
            write_shards(partial)
        if accelerator.is_main_process:
            (partial / STATE_FILE).write_text(json.dumps(state))
    except Exception as error:  # noqa: BLE001 - torch.save reports a full disk as a RuntimeError, safetensors as its own
        failure = error
    failed = accelerator.gather(torch.tensor([failure is not None], device=accelerator.device)).any().item()
    if failed:
        _report_failed_save(accelerator, output_dir, partial, failure)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        apply_total_limit(output_dir, keep=final, limit=total_limit)
    accelerator.wait_for_everyone()
    return final


def _report_failed_save(accelerator, output_dir: Path, partial: Path, failure: BaseException | None) -> None:
    """Remove the half-written checkpoint and stop with the reason and the checkpoint to resume from."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    intact = newest_intact(output_dir)
    resume = (f"the last intact checkpoint is {intact}; resume from it with --resume_from_checkpoint latest" if intact
              else "no earlier checkpoint exists, so the run must start again")
    if failure is None:
        raise DistillError(f"Another process could not write {partial.name}; {resume}.")
    if _disk_is_full(failure, output_dir):
        free = shutil.disk_usage(output_dir).free / 2**20
        raise DistillError(f"The disk is full: writing {partial.name} to {output_dir} failed ({free:.0f} MiB free). "
                           f"Free some space (or pass --checkpoints_total_limit), then run again: {resume}.")
    raise DistillError(f"Writing {partial.name} to {output_dir} failed: {failure}. Fix the folder, then run again: "
                       f"{resume}.")


def apply_total_limit(output_dir: Path, keep: Path, limit: int | None) -> None:
    """Remove the oldest checkpoints other than ``keep`` until at most ``limit`` remain."""
    if limit is None:
        return
    others = [p for p in complete_checkpoints(output_dir) if p != keep]
    for old in others[: max(0, len(others) - (limit - 1))]:
        shutil.rmtree(old)


def register_trainable_only_hooks(accelerator, nets: dict) -> None:
    """Save and load only the trainable weights of each network in ``nets`` (the LoRA), not the frozen teacher."""
    from safetensors.torch import load_file, save_file

    def name_of(model) -> str:
        bare = accelerator.unwrap_model(model)
        return next(n for n, net in nets.items() if accelerator.unwrap_model(net) is bare)

    def save_hook(models, weights, output_dir):
        if not weights:  # DeepSpeed and FSDP save their own (sharded) model and optimizer states
            return
        for model in models:
            bare = accelerator.unwrap_model(model)
            state = {k: v.detach().float().cpu().contiguous()
                     for k, v in bare.named_parameters() if v.requires_grad}
            if accelerator.is_main_process:
                save_file(state, os.path.join(output_dir, f"{name_of(model)}_trainable.safetensors"))
            if weights:
                weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            bare = accelerator.unwrap_model(model)
            state = load_file(os.path.join(input_dir, f"{name_of(model)}_trainable.safetensors"))
            result = bare.load_state_dict(state, strict=False)
            if result.unexpected_keys:
                raise DistillError(f"Checkpoint {input_dir} does not match this model "
                                   f"(unexpected keys such as {result.unexpected_keys[:3]}).")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def check_output_dir(output_dir: Path) -> None:
    """Refuse an --output_dir that is a file or lies on a read-only or unwritable file system, before any work."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DistillError(f"--output_dir {output_dir} is a file, not a folder: pass a folder path (it is created "
                           "if missing).")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DistillError(f"--output_dir {output_dir} cannot be created: {existing} is a file.")
    probe = existing / f".distill-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = "the file system is read-only" if error.errno == errno.EROFS else error.strerror
        raise DistillError(f"--output_dir {output_dir} is not writable ({reason}): pass a folder you can write "
                           "to.") from error
