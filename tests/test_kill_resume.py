"""A run killed with SIGKILL mid-training and resumed from its last checkpoint ends exactly where an uninterrupted run
with the same seed ends; a checkpoint left half-written by a crash is never resumed from.

Each micro-batch's random draws are seeded from (seed, global micro-batch index) and augmentations from (seed, epoch,
index), so the resumed run needs nothing but the weights, optimizer, scheduler and step stored in the checkpoint.
Checkpoints are written as checkpoint-N.partial and renamed to checkpoint-N once complete.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "lcm_lora.py"
STEPS = 8
# 8 images in batches of 1 with 3 accumulation steps: optimizer steps of 3, 3 and 2 batches per epoch, so every
# checkpoint after the first epoch is mid-epoch, behind a shorter accumulation window.
FLAGS = ["--train_batch_size", "1", "--gradient_accumulation_steps", "3", "--lora_rank", "4", "--seed", "0",
         "--validation_steps", "0", "--report_to", "none", "--no_export_pipeline", "--max_train_steps", str(STEPS),
         "--checkpointing_steps", "2", "--random_flip", "--proportion_empty_prompts", "0.3"]
TIMEOUT = 600


def command(teacher: Path, data: Path, out: Path, *extra: str, flags: list[str] = FLAGS) -> list[str]:
    return [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(data),
            "--output_dir", str(out), *flags, *extra]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    """A training process writing its output to ``log`` (a pipe nobody reads while it runs could fill up)."""
    with open(log, "w") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=subprocess_env())


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=subprocess_env())


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def kill_once_written(process: subprocess.Popen, log: Path, checkpoint: Path) -> None:
    """SIGKILL ``process`` as soon as ``checkpoint`` exists, while it is still training."""
    deadline = time.monotonic() + TIMEOUT
    while not checkpoint.is_dir():
        assert process.poll() is None, f"exited with {process.returncode} before {checkpoint.name}:\n" + tail(
            log.read_text())
        assert time.monotonic() < deadline, f"no {checkpoint.name} after {TIMEOUT} s"
        time.sleep(0.02)
    assert process.poll() is None, "finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def test_sigkill_then_resume_latest_equals_an_uninterrupted_run(sd_teacher, image_folder, tmp_path):
    full_out, killed_out = tmp_path / "uninterrupted", tmp_path / "killed"
    full = start(command(sd_teacher, image_folder, full_out), tmp_path / "uninterrupted.log")
    killed = start(command(sd_teacher, image_folder, killed_out), tmp_path / "killed.log")
    kill_once_written(killed, tmp_path / "killed.log", killed_out / "checkpoint-4")
    assert full.wait(timeout=TIMEOUT) == 0, tail((tmp_path / "uninterrupted.log").read_text())

    complete = sorted((p for p in killed_out.glob("checkpoint-*") if not p.name.endswith(".partial")),
                      key=lambda p: int(p.name.split("-")[1]))
    assert not (killed_out / "pytorch_lora_weights.safetensors").exists()  # it really died mid-training
    latest = complete[-1]
    assert 4 <= json.loads((latest / "trainer_state.json").read_text())["global_step"] < STEPS

    # What a crash while saving leaves: a newer checkpoint folder that never got renamed, here with a truncated
    # weights file and a step that would skip the rest of training if resume believed it.
    leftover = killed_out / "checkpoint-100.partial"
    leftover.mkdir()
    (leftover / "trainer_state.json").write_text(json.dumps({"global_step": 100, "seed": 0}))
    weights = (latest / "unet_trainable.safetensors").read_bytes()
    (leftover / "unet_trainable.safetensors").write_bytes(weights[: len(weights) // 2])

    resumed = run(command(sd_teacher, image_folder, killed_out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, tail(resumed.stderr)
    assert f"Loading states from {latest}" in resumed.stderr
    assert f"Removing {leftover}" in resumed.stderr
    assert not list(killed_out.glob("*.partial"))
    assert (killed_out / f"checkpoint-{STEPS}").is_dir()

    reference = load_file(full_out / "pytorch_lora_weights.safetensors")
    result = load_file(killed_out / "pytorch_lora_weights.safetensors")
    assert set(reference) == set(result) and len(reference) > 0
    assert any(reference[k].abs().max() > 0 for k in reference if "lora_B" in k)  # training moved the LoRA
    differing = {k: (reference[k] - result[k]).abs().max().item()
                 for k in reference if not torch.equal(reference[k], result[k])}
    assert differing == {}


def test_resuming_from_a_partial_checkpoint_is_refused(sd_teacher, image_folder, tmp_path):
    partial = tmp_path / "out" / "checkpoint-4.partial"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text(json.dumps({"global_step": 4, "seed": 0}))
    result = run(command(sd_teacher, image_folder, tmp_path / "out", "--resume_from_checkpoint", str(partial)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --resume_from_checkpoint {partial} is a checkpoint whose saving never finished; pass 'latest' or a "
        "complete checkpoint-N folder.")
    assert partial.is_dir()  # refused before anything was touched


def test_a_run_without_seed_logs_and_records_its_seed_and_a_resume_reuses_it(sd_teacher, image_folder, tmp_path):
    flags = list(FLAGS)
    del flags[flags.index("--seed"): flags.index("--seed") + 2]
    flags[flags.index("--max_train_steps") + 1] = "2"
    flags[flags.index("--checkpointing_steps") + 1] = "1"
    first = run(command(sd_teacher, image_folder, tmp_path / "first", flags=flags))
    assert first.returncode == 0, tail(first.stderr)
    logged = int(re.search(r"No --seed given: this run uses seed (\d+)", first.stderr).group(1))
    for step in (1, 2):
        state = json.loads((tmp_path / "first" / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert (state["global_step"], state["seed"], state["identity"]["seed"]) == (step, logged, logged)
    resumed = run(command(sd_teacher, image_folder, tmp_path / "resumed", "--resume_from_checkpoint",
                          str(tmp_path / "first" / "checkpoint-1"), flags=flags))
    assert resumed.returncode == 0, tail(resumed.stderr)
    assert "No --seed given" not in resumed.stderr
    a = load_file(tmp_path / "first" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert set(a) == set(b) and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
