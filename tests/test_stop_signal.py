"""SIGTERM / SIGINT stop a run after the current optimizer step with a checkpoint; a second signal exits at once.

Each run is the real command line in a fresh process (two processes under ``accelerate launch`` for the DDP case),
signalled once training is under way. A stopped run names its checkpoint and the resume command in one line, exits
with 128 + the signal number, and resuming it ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "lcm_lora.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS = 40
FLAGS = ["--train_batch_size", "1", "--lora_rank", "4", "--seed", "0", "--validation_steps", "0", "--report_to",
         "none", "--no_export_pipeline", "--max_train_steps", str(STEPS), "--checkpointing_steps", "1000",
         "--random_flip"]
ONE_PROCESS = ["--gradient_accumulation_steps", "2"]  # the same global batch as two processes of batch 1
TIMEOUT = 600


def start(argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=subprocess_env(**env),
                                start_new_session=True)


def one_process(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(data),
            "--output_dir", str(out), *FLAGS, *ONE_PROCESS, *extra]


def two_processes(teacher: Path, data: Path, out: Path) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(ACCELERATE), "launch", "--config_file", str(REPO / "docs" / "accelerate_configs" / "multi_gpu.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port), str(SCRIPT),
            "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(data), "--output_dir", str(out),
            *FLAGS]


def wait_for(log: Path, pattern: str, process: subprocess.Popen) -> re.Match:
    """Poll ``log`` until ``pattern`` appears (the process must still be running)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        match = re.search(pattern, log.read_text())
        if match:
            return match
        assert process.poll() is None, f"exited with {process.returncode}:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {pattern!r} after {TIMEOUT} s"
        time.sleep(0.005)


def wait_for_training(log: Path, process: subprocess.Popen) -> None:
    """Return once the progress bar shows two finished steps."""
    wait_for(log, rf"\|\s*([2-9]|[1-3]\d)/{STEPS} \[", process)


def finish(process: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError("the run hung after the signal:\n" + log.read_text()[-3000:])
    return code, log.read_text()


def stopped_line(output: str) -> re.Match:
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.startswith("Stopped by")]
    assert len(lines) == 1, output[-3000:]
    match = re.fullmatch(r"Stopped by (SIG\w+) after step (\d+): wrote (\S+)\. Resume with the same launcher and: "
                         r"(.+) --resume_from_checkpoint latest", lines[0])
    assert match, lines[0]
    return match


def lora(out: Path) -> dict:
    return load_file(out / "pytorch_lora_weights.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b) and len(a) > 0
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # training moved the LoRA
    assert {k for k in a if not torch.equal(a[k], b[k])} == set()


@pytest.fixture(scope="module")
def uninterrupted(sd_teacher, image_folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    process = start(one_process(sd_teacher, image_folder, out), out.with_suffix(".log"))
    code, output = finish(process, out.with_suffix(".log"))
    assert code == 0, output[-3000:]
    return lora(out)


def stop_and_check(process: subprocess.Popen, log: Path, out: Path, signum: int) -> int:
    """Signal a running training once; check the exit code, the one line, and the checkpoint; return its step."""
    wait_for_training(log, process)
    os.kill(process.pid, signum)
    code, output = finish(process, log)
    assert code == 128 + signum, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    line = stopped_line(output)
    step = int(line.group(2))
    assert line.group(1) == signal.Signals(signum).name
    assert 2 <= step < STEPS
    assert Path(line.group(3)) == out / f"checkpoint-{step}"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [f"checkpoint-{step}"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    return step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_equals_an_uninterrupted_run(
        signum, uninterrupted, sd_teacher, image_folder, tmp_path):
    out, log = tmp_path / "out", tmp_path / "run.log"
    process = start(one_process(sd_teacher, image_folder, out), log)
    stop_and_check(process, log, out, signum)

    resumed = subprocess.run(one_process(sd_teacher, image_folder, out, "--resume_from_checkpoint", "latest"),
                             capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(lora(out), uninterrupted)


def test_two_processes_stop_together_and_resume_in_one_process(uninterrupted, sd_teacher, image_folder, tmp_path):
    """SIGTERM to the launcher (what a scheduler sends): both workers finish the step and write one checkpoint."""
    out, log = tmp_path / "out", tmp_path / "run.log"
    process = start(two_processes(sd_teacher, image_folder, out), log, ACCELERATE_USE_CPU="true")
    step = stop_and_check(process, log, out, signal.SIGTERM)
    checkpoint = out / f"checkpoint-{step}"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()

    resumed = subprocess.run(one_process(sd_teacher, image_folder, out, "--resume_from_checkpoint", "latest"),
                             capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "same global batch" in resumed.stderr
    assert_same_weights(lora(out), uninterrupted)


def test_a_second_signal_exits_at_once_without_a_checkpoint(sd_teacher, image_folder, tmp_path):
    """The process is paused between the two signals, so the second one surely comes while it is still stopping."""
    out, log = tmp_path / "out", tmp_path / "run.log"
    process = start(one_process(sd_teacher, image_folder, out), log)
    wait_for_training(log, process)
    os.kill(process.pid, signal.SIGINT)
    wait_for(log, "SIGINT received: finishing the current step", process)
    os.kill(process.pid, signal.SIGSTOP)
    time.sleep(1.0)  # longer than the window in which copies of one signal count once
    os.kill(process.pid, signal.SIGINT)
    os.kill(process.pid, signal.SIGCONT)
    code, output = finish(process, log)
    assert code == 128 + signal.SIGINT, output[-3000:]
    assert "SIGINT received again: exiting now without a checkpoint;" in output
    assert "Stopped by" not in output
    assert not (out / "pytorch_lora_weights.safetensors").exists()
