"""Sharded training (FSDP2): launched as a user launches it, with docs/accelerate_configs/fsdp.yaml on the CPU.

``ACCELERATE_USE_CPU=true accelerate launch --config_file docs/accelerate_configs/fsdp.yaml --num_processes 2`` starts
two processes over gloo; accelerate exports the config's FSDP settings and the trainer shards every network itself
(distill/sharding.py), the code path GPU runs take too.

Same global batch: 2 sharded processes x batch 2 against 1 process x batch 2 x --gradient_accumulation_steps 2. The
runs see the same samples and random draws (as in tests/test_multiprocess.py), but their weights are not equal bit
for bit as DDP's are: a sharded process computes with weights gathered into FSDP's buffers and its gradients are
reduce-scattered, which changes the last bits of some gradients. Adam's first steps move a weight by about the
learning rate whatever its gradient's size, so such noise in a near-zero gradient can move one weight by up to one
learning rate per step the other way. The stated tolerance: at most 1% of the weights differ by more than 1e-6, and
none by more than 2 x learning rate x steps. (A run whose processes trained on the same batch, or did not average
their gradients, changes far more weights than that.) A sharded run resumed after SIGKILL equals the uninterrupted
sharded run bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import subprocess_env
from test_multiprocess import finish, free_ports, start, tail

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "train_scripts"
FSDP_CONFIG = REPO / "docs" / "accelerate_configs" / "fsdp.yaml"
ACCELERATE = Path(sys.executable).with_name("accelerate")
TORCHRUN = Path(sys.executable).with_name("torchrun")
LEARNING_RATE = 1e-4
LCM_STEPS = 4
LCM_FLAGS = ["--train_batch_size", "2", "--lora_rank", "4", "--seed", "0", "--validation_steps", "0", "--report_to",
             "none", "--no_export_pipeline", "--max_train_steps", str(LCM_STEPS), "--checkpointing_steps", "1",
             "--learning_rate", str(LEARNING_RATE), "--random_flip", "--proportion_empty_prompts", "0.3"]
SB_STEPS = 3
SB_FLAGS = ["--train_batch_size", "2", "--lora_rank", "4", "--fake_lora_rank", "4", "--seed", "0",
            "--validation_steps", "0", "--report_to", "none", "--no_export_pipeline", "--max_train_steps",
            str(SB_STEPS), "--checkpointing_steps", str(SB_STEPS), "--learning_rate", str(LEARNING_RATE)]
GAN_STEPS = 3  # dmd2 (GAN term, backward simulation over K = 4) and ufogen (trained encoder discriminator)
GAN_FLAGS = ["--train_batch_size", "2", "--lora_rank", "4", "--seed", "0", "--validation_steps", "0", "--report_to",
             "none", "--no_export_pipeline", "--max_train_steps", str(GAN_STEPS), "--checkpointing_steps", "1",
             "--learning_rate", str(LEARNING_RATE)]
DMD2_FLAGS = ["--resolution", "32", "--fake_lora_rank", "4", "--gen_cls_loss_weight", "0.01",
              "--guidance_cls_loss_weight", "0.01", "--dfake_gen_update_ratio", "1"]
TIMEOUT = 600


def plain(script: str, out: Path, *args: str) -> subprocess.Popen:
    """One process without sharding, two accumulation steps (global batch 4), with the contiguous weights sharded runs
    keep (channels-last convolutions sum in another order: float noise in more weights than the tolerance allows)."""
    argv = [sys.executable, SCRIPTS / script, "--output_dir", out, *args, "--gradient_accumulation_steps", "2",
            "--no_channels_last"]
    return start([str(a) for a in argv], out)


def sharded(script: str, out: Path, processes: int, port: int, *args: str) -> subprocess.Popen:
    """accelerate launch with the FSDP config (global batch 4 at batch 2 per process)."""
    accumulation = ["--gradient_accumulation_steps", str(4 // (2 * processes))]
    argv = [ACCELERATE, "launch", "--config_file", FSDP_CONFIG, "--num_processes", processes, "--mixed_precision", "no",
            "--main_process_port", port, SCRIPTS / script, "--output_dir", out, *args, *accumulation]
    return start([str(a) for a in argv], out, ACCELERATE_USE_CPU="true")


def kill_once_written(process: subprocess.Popen, checkpoint: Path) -> None:
    """SIGKILL the launcher and its workers as soon as ``checkpoint`` exists, while they still train."""
    deadline = time.monotonic() + TIMEOUT
    while not checkpoint.is_dir():
        assert process.poll() is None, f"exited with {process.returncode} before {checkpoint.name}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert process.poll() is None, "finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@dataclass
class Runs:
    root: Path
    lcm_one: subprocess.CompletedProcess
    lcm_two: subprocess.CompletedProcess
    lcm_resumed: subprocess.CompletedProcess  # 2 sharded processes, SIGKILLed after checkpoint-2, resumed
    lcm_one_from_two: subprocess.CompletedProcess  # 1 sharded process from the 2-process run's checkpoint-2
    sb_one: subprocess.CompletedProcess
    sb_two: subprocess.CompletedProcess
    dmd2_one: subprocess.CompletedProcess
    dmd2_two: subprocess.CompletedProcess
    ufogen_one: subprocess.CompletedProcess
    ufogen_two: subprocess.CompletedProcess
    ufogen_one_from_two: subprocess.CompletedProcess  # with its EMA, resumed in 1 sharded process


@pytest.fixture(scope="module")
def runs(sd_teacher, sdxl_teacher, image_folder, tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("sharded")
    prompts = root / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na striped picture\na green digit\n")
    lcm = ["--pretrained_teacher_model", sd_teacher, "--train_data_dir", image_folder, *LCM_FLAGS]
    sb = ["--pretrained_teacher_model", sd_teacher, "--prompts_file", prompts, *SB_FLAGS]
    dmd2 = ["--pretrained_teacher_model", sdxl_teacher, "--train_data_dir", image_folder, *GAN_FLAGS, *DMD2_FLAGS]
    # UFOGen exports the EMA of its generator (--use_ema): averages sharded, checkpointed and gathered.
    ufogen = ["--pretrained_teacher_model", sd_teacher, "--train_data_dir", image_folder, *GAN_FLAGS, "--use_ema"]
    ports = free_ports(8)
    # Two launches at a time: the machine has two cores.
    lcm_one = plain("lcm_lora.py", root / "lcm-one", *lcm)
    lcm_two = sharded("lcm_lora.py", root / "lcm-two", 2, ports[0], *lcm)
    done = {"lcm_one": finish(lcm_one, root / "lcm-one"), "lcm_two": finish(lcm_two, root / "lcm-two")}
    killed = sharded("lcm_lora.py", root / "lcm-killed", 2, ports[1], *lcm)
    sb_one = plain("swiftbrush.py", root / "sb-one", *sb)
    kill_once_written(killed, root / "lcm-killed" / "checkpoint-2")
    resumed = sharded("lcm_lora.py", root / "lcm-killed", 2, ports[2], *lcm, "--resume_from_checkpoint", "latest")
    done["lcm_resumed"] = finish(resumed, root / "lcm-killed")
    done["sb_one"] = finish(sb_one, root / "sb-one")
    one_from_two = sharded("lcm_lora.py", root / "lcm-one-from-two", 1, ports[3], *lcm, "--resume_from_checkpoint",
                           root / "lcm-two" / "checkpoint-2")
    # With gradient checkpointing too: recomputing blocks in the backward pass changes nothing.
    sb_two = sharded("swiftbrush.py", root / "sb-two", 2, ports[4], *sb, "--gradient_checkpointing")
    done["lcm_one_from_two"] = finish(one_from_two, root / "lcm-one-from-two")
    done["sb_two"] = finish(sb_two, root / "sb-two")
    for name, script, args, port in [("dmd2", "dmd2.py", dmd2, ports[5]), ("ufogen", "ufogen.py", ufogen, ports[6])]:
        one = plain(script, root / f"{name}-one", *args)
        two = sharded(script, root / f"{name}-two", 2, port, *args)
        done[f"{name}_one"], done[f"{name}_two"] = finish(one, root / f"{name}-one"), finish(two, root / f"{name}-two")
    ufogen_resumed = sharded("ufogen.py", root / "ufogen-one-from-two", 1, ports[7], *ufogen,
                             "--resume_from_checkpoint", root / "ufogen-two" / "checkpoint-1")
    done["ufogen_one_from_two"] = finish(ufogen_resumed, root / "ufogen-one-from-two")
    return Runs(root, **done)


def assert_equal_up_to_float_noise(reference: dict, result: dict, steps: int) -> None:
    """The tolerance of the module docstring: the same training up to the last bits of some gradients."""
    assert set(reference) == set(result) and len(reference) > 0
    assert any(reference[k].abs().max() > 0 for k in reference if "lora_B" in k)  # training moved the LoRA
    diff = torch.cat([(reference[k] - result[k]).abs().flatten() for k in reference])
    assert (diff > 1e-6).float().mean().item() <= 0.01, f"{(diff > 1e-6).sum().item()} of {diff.numel()} differ"
    assert diff.max().item() <= 2 * LEARNING_RATE * steps


def assert_sharded_over(checkpoint: Path, processes: int) -> None:
    """The checkpoint's trainable weights and optimizer states were written in ``processes`` shards each: the run
    really was sharded (an unsharded run writes no sharded_state, and a whole tensor is one chunk)."""
    from torch.distributed.checkpoint import FileSystemReader

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["sharded_processes"] == processes
    metadata = FileSystemReader(str(checkpoint / "sharded_state")).read_metadata().state_dict_metadata
    weights = {k: v for k, v in metadata.items() if k.startswith("model.")}
    moments = {k: v for k, v in metadata.items() if k.startswith("optim.state.") and k.endswith("exp_avg")}
    assert weights and len(moments) == len(weights)
    for name, tensor in {**weights, **moments}.items():  # one piece per process (possibly empty), together whole
        assert len(tensor.chunks) == processes, name
        assert sum(chunk.sizes[0] for chunk in tensor.chunks) == tensor.size[0], name
    assert not list(checkpoint.glob("*trainable.safetensors")) and not list(checkpoint.glob("optimizer*.bin"))


def test_two_sharded_processes_train_what_one_process_trains(runs):
    assert runs.lcm_one.returncode == 0, tail(runs.lcm_one)
    assert runs.lcm_two.returncode == 0, tail(runs.lcm_two)
    assert "Sharded 1 network(s) over 2 process(es) with FSDP2: FSDPUNet2DConditionModel" in runs.lcm_two.stderr
    assert "total batch 4" in runs.lcm_one.stderr and "total batch 4" in runs.lcm_two.stderr
    assert_sharded_over(runs.root / "lcm-two" / f"checkpoint-{LCM_STEPS}", 2)
    assert_equal_up_to_float_noise(load_file(runs.root / "lcm-one" / "pytorch_lora_weights.safetensors"),
                                   load_file(runs.root / "lcm-two" / "pytorch_lora_weights.safetensors"), LCM_STEPS)
    # The export, gathered on the main process, is the stock diffusers LoRA file the unsharded run writes.
    assert (runs.root / "lcm-two" / "pytorch_lora_weights_kohya.safetensors").is_file()


def test_a_method_with_two_networks_shards_both_and_trains_what_one_process_trains(runs):
    """SwiftBrush: the student's and the fake score's adapters on one UNet, two optimizers, both sharded (and the
    sharded run with --gradient_checkpointing)."""
    assert runs.sb_one.returncode == 0, tail(runs.sb_one)
    assert runs.sb_two.returncode == 0, tail(runs.sb_two)
    assert "Sharded 1 network(s) over 2 process(es)" in runs.sb_two.stderr
    checkpoint = runs.root / "sb-two" / f"checkpoint-{SB_STEPS}"
    assert_sharded_over(checkpoint, 2)
    from torch.distributed.checkpoint import FileSystemReader

    names = FileSystemReader(str(checkpoint / "sharded_state")).read_metadata().state_dict_metadata
    adapters = {name.split(".")[-2] for name in names if name.startswith("model.") and ".lora_" in name}
    assert adapters == {"default", "fake_score"}
    assert_equal_up_to_float_noise(load_file(runs.root / "sb-one" / "pytorch_lora_weights.safetensors"),
                                   load_file(runs.root / "sb-two" / "pytorch_lora_weights.safetensors"), SB_STEPS)


@pytest.mark.parametrize("name, networks", [("dmd2", "FSDPUNet2DConditionModel, FSDPBottleneckClassifier"),
                                            ("ufogen", "FSDPUNet2DConditionModel, FSDPDiscriminatorHeads")])
def test_methods_with_a_discriminator_train_sharded_what_one_process_trains(runs, name, networks):
    """DMD2 (its classifier read frozen by the generator; a backward-simulation depth that must be the same on every
    process, or their all-gathers mismatch) and UFOGen (a discriminator on the student's own UNet, read frozen)."""
    one, two = getattr(runs, f"{name}_one"), getattr(runs, f"{name}_two")
    assert one.returncode == 0, tail(one)
    assert two.returncode == 0, tail(two)
    assert f"Sharded 2 network(s) over 2 process(es) with FSDP2: {networks}" in two.stderr
    assert_sharded_over(runs.root / f"{name}-two" / f"checkpoint-{GAN_STEPS}", 2)
    assert_equal_up_to_float_noise(load_file(runs.root / f"{name}-one" / "pytorch_lora_weights.safetensors"),
                                   load_file(runs.root / f"{name}-two" / "pytorch_lora_weights.safetensors"),
                                   GAN_STEPS)


def test_the_ema_is_sharded_checkpointed_and_resumed_with_another_process_count(runs):
    """UFOGen --use_ema: the averages are saved in the sharded state beside the weights they track, a 1-process
    resume of the 2-process checkpoint-1 reads them back, and both export the same averages."""
    from torch.distributed.checkpoint import FileSystemReader

    assert runs.ufogen_one_from_two.returncode == 0, tail(runs.ufogen_one_from_two)
    metadata = FileSystemReader(str(runs.root / "ufogen-two" / "checkpoint-1" / "sharded_state")).read_metadata()
    names = metadata.state_dict_metadata
    averages = {k.removeprefix("ema.") for k in names if k.startswith("ema.") and k != "ema.step"}
    student = {k.removeprefix("model.") for k in names if k.startswith("model.") and ".lora_" in k
               and ".default." in k}
    assert averages and averages == student  # the student's adapter is averaged, the discriminator's is not
    assert all(len(names[f"ema.{k}"].chunks) == 2 for k in averages)
    assert_equal_up_to_float_noise(load_file(runs.root / "ufogen-two" / "pytorch_lora_weights.safetensors"),
                                   load_file(runs.root / "ufogen-one-from-two" / "pytorch_lora_weights.safetensors"),
                                   GAN_STEPS - 1)


def test_sigkill_then_resume_under_sharding_equals_the_uninterrupted_run(runs):
    assert runs.lcm_resumed.returncode == 0, tail(runs.lcm_resumed)
    assert "Loading states from" in runs.lcm_resumed.stderr
    reference = load_file(runs.root / "lcm-two" / "pytorch_lora_weights.safetensors")
    resumed = load_file(runs.root / "lcm-killed" / "pytorch_lora_weights.safetensors")
    assert set(reference) == set(resumed) and len(reference) > 0
    differing = {k: (reference[k] - resumed[k]).abs().max().item() for k in reference
                 if not torch.equal(reference[k], resumed[k])}
    assert differing == {}


def test_a_sharded_checkpoint_resumes_with_another_process_count(runs):
    """checkpoint-2 of the 2-process run, resumed by one sharded process with two accumulation steps."""
    assert runs.lcm_one_from_two.returncode == 0, tail(runs.lcm_one_from_two)
    assert f"Loading states from {runs.root / 'lcm-two' / 'checkpoint-2'}" in runs.lcm_one_from_two.stderr
    assert "Sharded 1 network(s) over 1 process(es)" in runs.lcm_one_from_two.stderr
    assert_sharded_over(runs.root / "lcm-one-from-two" / f"checkpoint-{LCM_STEPS}", 1)
    assert_equal_up_to_float_noise(load_file(runs.root / "lcm-two" / "pytorch_lora_weights.safetensors"),
                                   load_file(runs.root / "lcm-one-from-two" / "pytorch_lora_weights.safetensors"),
                                   LCM_STEPS - 2)


def test_a_truncated_shard_makes_its_checkpoint_damaged(runs, tmp_path):
    """--resume_from_checkpoint latest skips a sharded checkpoint whose shard file was cut short."""
    import shutil

    from distill.checkpoints import damaged_files, newest_intact

    assert runs.lcm_two.returncode == 0, tail(runs.lcm_two)
    for step in (1, 2):
        shutil.copytree(runs.root / "lcm-two" / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    assert damaged_files(tmp_path / "checkpoint-2") == []
    shard = tmp_path / "checkpoint-2" / "sharded_state" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert damaged_files(tmp_path / "checkpoint-2") == ["sharded_state/__1_0.distcp"]
    assert newest_intact(tmp_path) == tmp_path / "checkpoint-1"


FROZEN_SCRIPT = '''
import sys
import torch, torch.distributed as dist
from distill.discriminator import DiscriminatorHeads, frozen_parameters, unet_encoder_features
from distill.denoiser import AdapterView
from distill.lora import add_lora
from distill.sharding import ShardedNetworks, ShardingSettings
from distill.testing import tiny_unet

dist.init_process_group("gloo")
torch.manual_seed(0)
unet = tiny_unet(False, 32)
add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4)
heads = DiscriminatorHeads.from_unet_config(unet.config)
nets = {"unet": AdapterView(unet, "default"), "heads": heads}
params = {"unet": list(nets["unet"].parameters()), "heads": list(heads.parameters())}
sharded = ShardedNetworks(nets, ShardingSettings(), None)
live = {name: sharded.live(group) for name, group in params.items()}
torch.manual_seed(1 + dist.get_rank())
x = torch.randn(2, 4, 16, 16, requires_grad=True)
t, text = torch.tensor([10, 700]), torch.randn(2, 77, 32)
with frozen_parameters(nets["unet"]):
    features = unet_encoder_features(unet, x, t, text)
logits = heads.frozen(features)
sum(l.mean() for l in logits).backward()
frozen = all(p.grad is None for group in live.values() for p in group)
reached_input = x.grad is not None and x.grad.abs().sum().item() > 0
features = unet_encoder_features(unet, x, t, text)
sum(l.mean() for l in heads(features)).backward()
trained = all(p.grad is not None for p in live["heads"]) and any(p.grad is not None for p in live["unet"])
with open(f"{sys.argv[1]}.{dist.get_rank()}", "w") as result:  # one file per process: stdout interleaves
    result.write(f"frozen={frozen} input={reached_input} trained={trained}")
dist.destroy_process_group()
'''


def test_frozen_calls_reach_only_inputs_when_the_networks_are_sharded(tmp_path):
    """A discriminator read frozen (the generator's loss) leaves every sharded weight without a gradient, although
    FSDP computes with freshly gathered weights, and still passes the gradient to its input."""
    script = tmp_path / "frozen.py"
    script.write_text(FROZEN_SCRIPT)
    result = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_ports(1)[0]),
                             str(script), str(tmp_path / "result")], capture_output=True, text=True,
                            timeout=TIMEOUT, cwd=REPO, env=subprocess_env())
    assert result.returncode == 0, tail(subprocess.CompletedProcess([], 1, "", result.stdout + result.stderr))
    for rank in (0, 1):
        assert (tmp_path / f"result.{rank}").read_text() == "frozen=True input=True trained=True"


def test_sharding_settings_come_from_the_accelerate_fsdp_config(monkeypatch, tmp_path):
    from distill.errors import DistillError
    from distill.sharding import SHARDED_STATE, check_sharding_flags, requested_sharding
    from distill.train_config import TrainConfig

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert requested_sharding() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(DistillError, match="fsdp_version: 2"):
        requested_sharding()
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "BasicTransformerBlock, ResnetBlock2D")
    assert requested_sharding().reshard_after_forward is False
    assert requested_sharding().unit_classes == ("BasicTransformerBlock", "ResnetBlock2D")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(DistillError, match="fsdp_offload_params"):
        requested_sharding()
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    settings = requested_sharding()

    for flags, message in [({"mixed_precision": "fp16"}, "bf16"), ({"torch_compile": True}, "--torch_compile")]:
        with pytest.raises(DistillError, match=message):
            check_sharding_flags(TrainConfig(**flags), settings, None)
    unsharded, sharded_checkpoint = tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"
    unsharded.mkdir()
    (sharded_checkpoint / SHARDED_STATE).mkdir(parents=True)
    with pytest.raises(DistillError, match="written without sharding"):
        check_sharding_flags(TrainConfig(), settings, unsharded)
    with pytest.raises(DistillError, match=r"written sharded \(FSDP\)"):
        check_sharding_flags(TrainConfig(), None, sharded_checkpoint)
    check_sharding_flags(TrainConfig(mixed_precision="bf16"), settings, sharded_checkpoint)


def test_every_methods_networks_are_sharded_once(sd_teacher):
    """The units fully_shard wraps: a UNet shared by several adapters once, each other network once."""
    from distill.families import SD
    from distill.methods import get_method
    from distill.sharding import shard_roots, shard_units
    from distill.testing import method_on_teacher

    seen = {}
    for name, overrides in [("lcm", {}), ("swiftbrush", {}), ("dmd2", {"gen_cls_loss_weight": 0.01}),
                            ("ufogen", {}), ("pcm", {"adv_weight": 0.1})]:
        cls = get_method(name)
        method, _ = method_on_teacher(cls, cls.Config(lora_rank=4, **overrides), sd_teacher)
        roots = shard_roots(method.nets)
        seen[name] = [type(root).__name__ for root in roots]
        trainable = {id(p) for group in method.trainable().values() for p in group}
        covered = {id(p) for root in roots for p in root.parameters()}
        assert trainable <= covered, name
        unet = roots[0]
        units = shard_units(unet, SD.shard_unit_classes)
        assert {id(p) for unit in units for p in unit.parameters()} == {id(p) for p in unet.parameters()}, name
        assert all(u in units for u in unet.down_blocks) and unet.conv_in in units and unet.mid_block in units
        resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
        blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
        assert resnets and blocks and all(m in units for m in resnets + blocks)
        # Innermost first (fully_shard wraps inner units before the blocks that hold them).
        assert units.index(unet.down_blocks[1].attentions[0]) > units.index(blocks[0])
        assert not any(isinstance(p, torch.nn.ModuleList) for p in units)
    assert seen == {"lcm": ["UNet2DConditionModel"], "swiftbrush": ["UNet2DConditionModel"],
                    "dmd2": ["UNet2DConditionModel", "BottleneckClassifier"],
                    "ufogen": ["UNet2DConditionModel", "DiscriminatorHeads"],
                    "pcm": ["UNet2DConditionModel", "DiscriminatorHeads"]}
