"""A checkpoint records what it was trained as; a resume that would train something else stops with one line.

One 2-step run writes checkpoint-1 and checkpoint-2; each case resumes from them with the real command line in a
fresh process. Settings that change what is trained (method, batch, LoRA rank, learning rate, data) are refused,
listing each difference as old -> new; bookkeeping settings (checkpointing) are accepted with a warning; a damaged
checkpoint is never resumed from nor called good.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
FLAGS = {"--train_batch_size": "2", "--lora_rank": "4", "--seed": "0", "--validation_steps": "0", "--report_to": "none",
         "--no_export_pipeline": "", "--max_train_steps": "2", "--checkpointing_steps": "1", "--resolution": "32"}


def run(script: str, teacher: Path, data: Path, out: Path, **overrides: str) -> subprocess.CompletedProcess:
    flags = {"--pretrained_teacher_model": str(teacher), "--train_data_dir": str(data), "--output_dir": str(out),
             **FLAGS, **overrides}
    argv = [part for flag, value in flags.items() for part in (flag, value) if part != ""]
    return subprocess.run([sys.executable, str(REPO / "train_scripts" / script), *argv], capture_output=True,
                          text=True, timeout=600, cwd=REPO, env=subprocess_env())


@pytest.fixture(scope="module")
def trained(sd_teacher, image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("identity") / "run"
    result = run("lcm_lora.py", sd_teacher, image_folder, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def resumed_copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_each_checkpoint_records_method_teacher_and_settings(trained, sd_teacher):
    state = json.loads((trained / "checkpoint-2" / "trainer_state.json").read_text())
    identity = state["identity"]
    assert state["global_step"] == 2 and state["seed"] == 0
    assert identity["method"] == "lcm" and identity["teacher_family"] == "sd"
    assert identity["train_batch_size"] == 2 and identity["lora_rank"] == 4 and identity["resolution"] == 32
    assert identity["pretrained_teacher_model"] == str(sd_teacher.resolve())
    assert len(identity["teacher_fingerprint"]) == 16


@pytest.mark.parametrize("script, overrides, differences", [
    ("pcm_lora.py", {}, ["method: 'lcm' -> 'pcm'", "--loss_type: 'l2' -> 'huber'", "--w_min: 3.0 -> 4.0"]),
    ("lcm_lora.py", {"--train_batch_size": "1", "--lora_rank": "8"},
     ["--lora_rank: 4 -> 8", "--train_batch_size: 2 -> 1"]),
    ("lcm_lora.py", {"--gradient_accumulation_steps": "2", "--learning_rate": "0.001"},
     ["--learning_rate: 0.0001 -> 0.001", "--gradient_accumulation_steps x processes: 1 x 1 -> 2 x 1"]),
], ids=["other-method", "batch-and-rank", "lr-and-accumulation"])
def test_a_resume_that_changes_what_is_trained_is_refused(script, overrides, differences, trained, sd_teacher,
                                                         image_folder, tmp_path):
    out = resumed_copy(trained, tmp_path)
    result = run(script, sd_teacher, image_folder, out, **overrides, **{"--resume_from_checkpoint": "latest",
                                                                       "--max_train_steps": "3"})
    error = one_error(result)
    assert error.startswith(f"error: {out / 'checkpoint-2'} was trained with other settings than this run: ")
    for difference in differences:
        assert difference in error
    assert "--checkpointing_steps" not in error and "--max_train_steps" not in error
    assert not (out / "checkpoint-3").exists()


def test_another_teacher_is_refused(trained, sdxl_teacher, image_folder, tmp_path):
    error = one_error(run("lcm_lora.py", sdxl_teacher, image_folder, resumed_copy(trained, tmp_path),
                          **{"--resume_from_checkpoint": "latest", "--max_train_steps": "3"}))
    assert "teacher_family: 'sd' -> 'sdxl'" in error and "teacher_fingerprint:" in error


def test_a_checkpoint_beyond_max_train_steps_is_refused(trained, sd_teacher, image_folder, tmp_path):
    out = resumed_copy(trained, tmp_path)
    error = one_error(run("lcm_lora.py", sd_teacher, image_folder, out,
                          **{"--resume_from_checkpoint": "latest", "--max_train_steps": "1"}))
    assert error == ("error: checkpoint-2 is at step 2, beyond --max_train_steps 1: the export would be step-2 "
                     "weights described as 1 steps. Pass --max_train_steps 2 or more, or resume an earlier "
                     "checkpoint.")
    assert json.loads((out / "distill_config.json").read_text())["max_train_steps"] == 2  # the export is untouched


def test_a_harmless_change_continues_with_a_warning(trained, sd_teacher, image_folder, tmp_path):
    out = resumed_copy(trained, tmp_path)
    result = run("lcm_lora.py", sd_teacher, image_folder, out, **{"--resume_from_checkpoint": "latest",
                                                                   "--max_train_steps": "3",
                                                                   "--checkpointing_steps": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in result.stderr.splitlines() if "Resuming checkpoint-2 with changed settings" in line)
    assert warning.endswith("Resuming checkpoint-2 with changed settings that do not change what is trained: "
                            f"--checkpointing_steps: 1 -> 3; --max_train_steps: 2 -> 3; --output_dir: "
                            f"'{trained.resolve()}' -> '{out.resolve()}'.")
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["identity"]["max_train_steps"] == 3
    assert json.loads((out / "distill_config.json").read_text())["max_train_steps"] == 3


def test_a_damaged_checkpoint_is_skipped_by_latest_and_refused_by_name(trained, sd_teacher, image_folder, tmp_path):
    out = resumed_copy(trained, tmp_path)
    weights = out / "checkpoint-2" / "unet_trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    error = one_error(run("lcm_lora.py", sd_teacher, image_folder, out,
                          **{"--resume_from_checkpoint": str(out / "checkpoint-2")}))
    assert error == (f"error: --resume_from_checkpoint {out / 'checkpoint-2'} is damaged: "
                     "unet_trainable.safetensors cannot be read back. Resume an earlier checkpoint-N, or 'latest' "
                     "(the newest intact one).")

    result = run("lcm_lora.py", sd_teacher, image_folder, out, **{"--resume_from_checkpoint": "latest"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"Skipping {out / 'checkpoint-2'}: unet_trainable.safetensors cannot be read back (damaged)."
            in result.stderr)
    assert f"Loading states from {out / 'checkpoint-1'}" in result.stderr
