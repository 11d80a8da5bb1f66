"""A full disk or a read-only --output_dir ends with one `error:` line that says so, never a torch enforce message.

Each run is the real command line on a real small file system: a tmpfs mounted in a private mount namespace
(``unshare --user --map-root-user --mount``, no privileges needed where the kernel allows user namespaces), sized to
hold one checkpoint but not two, or mounted read-only.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--train_batch_size", "2", "--lora_rank", "4", "--seed", "0", "--validation_steps", "0", "--report_to",
         "none", "--no_export_pipeline", "--resolution", "32"]


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m none /mnt"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not can_mount_tmpfs(), reason="this kernel does not allow a private tmpfs mount")


def train_on_tmpfs(mount: Path, options: str, teacher: Path, data: Path, *flags: str) -> subprocess.CompletedProcess:
    """train_scripts/lcm_lora.py with --output_dir on a fresh tmpfs mounted at ``mount`` with ``options``."""
    mount.mkdir()
    train = [sys.executable, str(REPO / "train_scripts" / "lcm_lora.py"), "--pretrained_teacher_model", str(teacher),
             "--train_data_dir", str(data), "--output_dir", str(mount / "out"), *FLAGS, *flags]
    script = f"mount -t tmpfs -o {options} none {shlex.quote(str(mount))} && exec {shlex.join(train)}"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=subprocess_env())


def one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "enforce fail" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_a_full_disk_while_checkpointing_names_the_intact_checkpoint(sd_teacher, image_folder, tmp_path):
    # One checkpoint of this tiny LoRA takes about 1.2 MB: the second does not fit in 2 MB.
    result = train_on_tmpfs(tmp_path / "disk", "size=2m", sd_teacher, image_folder, "--max_train_steps", "3",
                            "--checkpointing_steps", "1")
    error = one_error(result)
    out = tmp_path / "disk" / "out"
    assert error.startswith(f"error: The disk is full: writing checkpoint-2.partial to {out} failed (")
    assert error.endswith(f"Free some space (or pass --checkpoints_total_limit), then run again: the last intact "
                          f"checkpoint is {out / 'checkpoint-1'}; resume from it with --resume_from_checkpoint "
                          "latest.")


def test_a_read_only_output_dir_is_refused_before_training(sd_teacher, image_folder, tmp_path):
    result = train_on_tmpfs(tmp_path / "ro", "ro,size=1m", sd_teacher, image_folder, "--max_train_steps", "1")
    error = one_error(result)
    assert error == (f"error: --output_dir {tmp_path / 'ro' / 'out'} is not writable (the file system is read-only): "
                     "pass a folder you can write to.")
    assert result.stderr.strip().splitlines() == [error]  # before any model was loaded
