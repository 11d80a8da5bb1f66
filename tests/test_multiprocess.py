"""Two processes (DDP over gloo on the CPU) train exactly what one process trains at the same global batch.

The 2-process runs go through ``accelerate launch --config_file docs/accelerate_configs/multi_gpu.yaml`` with
``--num_processes 2`` and ``ACCELERATE_USE_CPU=true``: the config's launcher (torch.distributed.run) starts two
processes, and accelerate puts them on the CPU with the gloo backend. (``accelerate launch --cpu --num_processes 2``
starts a single process unless an MPI host file is given.)

Same global batch: 2 processes x batch 2 against 1 process x batch 2 x --gradient_accumulation_steps 2. accelerate
hands batch k of the shuffled epoch to process k % 2, DDP averages the two gradients, and the trainer seeds every
micro-batch's random draws from (seed, global micro-batch index), so both runs see the same samples with the same
noise, timesteps, guidance scales, flips and prompt dropout, and must end with the same LoRA.

The runs of the module start together in one fixture (4 launches, 6 training processes on the CPU); a 1-process
resume of the 2-process checkpoint follows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "lcm_lora.py"
CONFIGS = REPO / "docs" / "accelerate_configs"
ACCELERATE = Path(sys.executable).with_name("accelerate")
FLAGS = ["--train_batch_size", "2", "--lora_rank", "4", "--seed", "0", "--validation_steps", "0",
         "--report_to", "none", "--no_export_pipeline", "--max_train_steps", "2", "--checkpointing_steps", "1"]
RANDOM_DATA = ["--random_flip", "--proportion_empty_prompts", "0.3"]  # more draws that must agree
NAN_DIGIT = "5"  # the caption "a striped picture number 5" becomes NaN in the broken teacher
TIMEOUT = 600


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start(argv: list[str], out: Path, **env: str) -> subprocess.Popen:
    """A launch in its own process group, its output (stdout and stderr) in ``out``.log."""
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=subprocess_env(**env),
                                start_new_session=True)


def one_process(teacher: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    """train_scripts/lcm_lora.py in one process with two accumulation steps (global batch 4)."""
    argv = [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(data),
            "--output_dir", str(out), *FLAGS, "--gradient_accumulation_steps", "2", *extra]
    return start(argv, out)


def two_processes(teacher: Path, data: Path, out: Path, port: int, *extra: str) -> subprocess.Popen:
    """The same command under accelerate launch with the DDP config, two processes of batch 2 (global batch 4)."""
    argv = [str(ACCELERATE), "launch", "--config_file", str(CONFIGS / "multi_gpu.yaml"), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", str(port), str(SCRIPT),
            "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(data), "--output_dir", str(out),
            *FLAGS, *extra]
    return start(argv, out, ACCELERATE_USE_CPU="true")


def finish(process: subprocess.Popen, out: Path) -> subprocess.CompletedProcess:
    """Wait for a launch (its output as ``stderr``); on timeout kill its process group (launcher and workers)."""
    try:
        code = process.wait(timeout=TIMEOUT)
        note = ""
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
        note = f"\n[killed after {TIMEOUT} s: the run hung]"
    return subprocess.CompletedProcess(process.args, code, "", out.with_suffix(".log").read_text() + note)


def tail(result: subprocess.CompletedProcess, lines: int = 30) -> str:
    return "\n".join(result.stderr.replace("\r", "\n").splitlines()[-lines:])


def nan_teacher(teacher: Path, folder: Path) -> Path:
    """A copy of ``teacher`` whose text encoder turns the token NAN_DIGIT into NaN (so only that caption's loss is)."""
    from transformers import CLIPTokenizer

    shutil.copytree(teacher, folder)
    token = CLIPTokenizer.from_pretrained(folder / "tokenizer")(NAN_DIGIT, add_special_tokens=False).input_ids
    assert len(token) == 1, token
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("token_embedding.weight"))
    state[name][token[0]] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    return folder


@dataclass
class Runs:
    root: Path
    one: subprocess.CompletedProcess
    two: subprocess.CompletedProcess
    nan_one: subprocess.CompletedProcess
    nan_two: subprocess.CompletedProcess
    one_from_two: subprocess.CompletedProcess  # 1 process resumed from the 2-process run's checkpoint-1


@pytest.fixture(scope="module")
def runs(sd_teacher, image_folder, tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("multiprocess")
    broken = nan_teacher(sd_teacher, root / "nan-teacher")
    ports = free_ports(2)
    outs = [root / name for name in ("one", "two", "nan-one", "nan-two", "one-from-two")]
    started = [
        one_process(sd_teacher, image_folder, outs[0], *RANDOM_DATA),
        two_processes(sd_teacher, image_folder, outs[1], ports[0], *RANDOM_DATA),
        one_process(broken, image_folder, outs[2]),
        two_processes(broken, image_folder, outs[3], ports[1]),
    ]
    finished = [finish(process, out) for process, out in zip(started, outs)]
    resumed = one_process(sd_teacher, image_folder, outs[4], *RANDOM_DATA,
                          "--resume_from_checkpoint", str(outs[1] / "checkpoint-1"))
    return Runs(root, *finished, finish(resumed, outs[4]))


def test_two_processes_equal_one_process_at_the_same_global_batch(runs):
    assert runs.one.returncode == 0, tail(runs.one)
    assert runs.two.returncode == 0, tail(runs.two)
    # Both really ran with a global batch of 4; the 2-process run really had two processes.
    assert "total batch 4" in runs.one.stderr and "total batch 4" in runs.two.stderr
    assert {p.name for p in (runs.root / "two" / "checkpoint-1").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    one = load_file(runs.root / "one" / "pytorch_lora_weights.safetensors")
    two = load_file(runs.root / "two" / "pytorch_lora_weights.safetensors")
    assert set(one) == set(two) and len(one) > 0
    # Training moved the LoRA (its B matrices start at zero), so equality is not that of two untrained adapters.
    assert any(one[k].abs().max() > 0 for k in one if "lora_B" in k)
    # Same samples, same random draws, gradient averaging equal to accumulation: the same weights, bit for bit.
    differing = {k: (one[k] - two[k]).abs().max().item() for k in one if not torch.equal(one[k], two[k])}
    assert differing == {}


def test_a_checkpoint_resumes_with_another_process_count_at_the_same_global_batch(runs):
    """checkpoint-1 of the 2-process run, resumed in 1 process with 2 accumulation steps, ends where both runs end."""
    assert runs.two.returncode == 0, tail(runs.two)
    assert runs.one_from_two.returncode == 0, tail(runs.one_from_two)
    assert f"Loading states from {runs.root / 'two' / 'checkpoint-1'}" in runs.one_from_two.stderr
    two = load_file(runs.root / "two" / "pytorch_lora_weights.safetensors")
    resumed = load_file(runs.root / "one-from-two" / "pytorch_lora_weights.safetensors")
    assert set(two) == set(resumed) and len(two) > 0
    differing = {k: (two[k] - resumed[k]).abs().max().item() for k in two if not torch.equal(two[k], resumed[k])}
    assert differing == {}


def test_every_process_reaches_checkpointing_and_the_run_finishes(runs):
    assert runs.two.returncode == 0, tail(runs.two)
    out = runs.root / "two"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for step in (1, 2):
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert (state["global_step"], state["seed"], state["identity"]["num_processes"]) == (step, 0, 2)
    checkpoint = load_file(out / "checkpoint-2" / "unet_trainable.safetensors")
    exported = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(checkpoint) == len(exported) > 0
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "README.md").is_file()


def test_a_nan_on_one_process_stops_every_process_at_the_same_step(runs):
    """Only the batch holding caption NAN_DIGIT turns NaN; the other process must not wait forever in all-reduce."""
    assert runs.nan_one.returncode == 2, tail(runs.nan_one)
    single = re.search(r"error: The unet loss became nan at step (\d+); (.*)\. Lower", runs.nan_one.stderr)
    assert single, tail(runs.nan_one)
    assert runs.nan_two.returncode not in (0, -signal.SIGKILL), tail(runs.nan_two)
    both = set(re.findall(r"error: The unet loss became nan at step (\d+) on process (\d); (.*)\. Lower",
                          runs.nan_two.stderr))
    # Each of the two processes printed the same message: the step of the 1-process run, the process that held
    # the NaN batch, and the last checkpoint written before it.
    assert len(both) == 1, tail(runs.nan_two)
    step, process, where = both.pop()
    assert step == single.group(1) and process in ("0", "1")
    assert runs.nan_two.stderr.count(f"loss became nan at step {step} on process {process}") == 2
    last_good = int(step) - 1
    if last_good:
        assert where == f"the last good checkpoint is {runs.root / 'nan-two' / f'checkpoint-{last_good}'}"
    else:
        assert where == "no checkpoint was written yet"
    written = sorted(p.name for p in (runs.root / "nan-two").glob("checkpoint-*"))
    assert written == [f"checkpoint-{s}" for s in range(1, last_good + 1)]


def test_accelerate_configs_are_valid_for_accelerate_launch():
    """Every example config loads with accelerate's own reader (which rejects unknown keys), and every key of its
    fsdp_config / deepspeed_config section is an option accelerate launch knows."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    options = vars(launch_command_parser().parse_args(["train.py"]))
    expected = {"multi_gpu.yaml": (DistributedType.MULTI_GPU, 1), "multi_node.yaml": (DistributedType.MULTI_GPU, 2),
                "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 1), "fsdp.yaml": (DistributedType.FSDP, 1)}
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, (kind, machines) in expected.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert (config.distributed_type, config.num_machines) == (kind, machines), name
        assert config.num_processes % config.num_machines == 0, name
        for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
            unknown = [k for k in (getattr(config, section) or {}) if prefix + k.removeprefix(prefix) not in options]
            assert unknown == [], (name, unknown)
    deepspeed = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config
    assert deepspeed["zero_stage"] == 2 and "gradient_accumulation_steps" not in deepspeed
    assert load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2  # what the trainer shards with
    node = load_config_from_file(str(CONFIGS / "multi_node.yaml"))
    assert node.main_process_ip and node.main_process_port


SEED_SCRIPT = '''
import sys
from pathlib import Path

from accelerate import Accelerator
from distill.preflight import run_seed

seed, drawn = run_seed(None, None)
accelerator = Accelerator()
report = f"rank={accelerator.process_index} processes={accelerator.num_processes} seed={seed} drawn={drawn}"
Path(sys.argv[1], f"rank{accelerator.process_index}.txt").write_text(report)
# As the trainer ends: a rank leaving with its gloo group alive while the other has gone can abort at exit.
accelerator.wait_for_everyone()
accelerator.end_training()
'''


def test_a_cpu_launch_without_seed_draws_one_seed_for_one_run_of_two_processes(tmp_path):
    """Without --seed the seed is drawn once and broadcast; on a CPU launch (ACCELERATE_USE_CPU) that broadcast must
    not make accelerate see one process, which left two independent runs racing for the same checkpoint folder."""
    script = tmp_path / "seed.py"
    script.write_text(SEED_SCRIPT)
    argv = [ACCELERATE, "launch", "--config_file", CONFIGS / "multi_gpu.yaml", "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", str(free_ports(1)[0]), script, tmp_path]
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=subprocess_env(ACCELERATE_USE_CPU="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    # Each rank writes its own report: two processes printing to one pipe can lose or merge lines.
    lines = sorted(path.read_text() for path in tmp_path.glob("rank*.txt"))
    assert [line.split()[:2] for line in lines] == [["rank=0", "processes=2"], ["rank=1", "processes=2"]]
    seeds = {line.split()[2] for line in lines}
    assert len(seeds) == 1 and all(line.endswith("drawn=True") for line in lines)
