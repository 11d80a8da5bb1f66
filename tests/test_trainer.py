"""The accelerate trainer in-process: validation images, tensorboard logs, and a clear stop on a non-finite loss."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from distill.data import ImageDataConfig
from distill.errors import DistillError
from distill.methods import LCMConfig
from distill.trainer import Trainer, TrainConfig


def tiny_run(teacher, images, out, **overrides) -> Trainer:
    config = TrainConfig(pretrained_teacher_model=str(teacher), output_dir=str(out), seed=0, train_batch_size=2,
                         max_train_steps=2, checkpointing_steps=1, validation_steps=2,
                         validation_prompts=["a cat", "a dog", "a cow"], export_pipeline=False, **overrides)
    return Trainer("lcm", LCMConfig(lora_rank=4), ImageDataConfig(train_data_dir=str(images)), config)


def nan_teacher(teacher, folder):
    """A copy of ``teacher`` whose UNet outputs NaN (its conv_out weights are NaN)."""
    shutil.copytree(teacher, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("conv_out.weight"))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, weights)
    return folder


def test_validation_grid_and_tensorboard_logs(sd_teacher, image_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tiny_run(sd_teacher, image_folder, tmp_path / "run").run()
    grid = Image.open(out / "validation" / "step-2.png")
    # two rows (1 step and 4 steps) of three 32x32 images, with torchvision's 2-pixel padding
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent)).Reload()
    assert [e.step for e in events.Scalars("loss/unet")] == [1, 2]
    assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars("loss/unet"))
    assert "validation" in events.Tags()["images"]


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(sd_teacher, image_folder, tmp_path):
    broken = nan_teacher(sd_teacher, tmp_path / "broken-teacher")
    with pytest.raises(DistillError, match=r"loss became nan at step 1; no checkpoint was written yet"):
        tiny_run(broken, image_folder, tmp_path / "run").run()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_damaged_checkpoint_is_never_called_the_last_good_one(sd_teacher, image_folder, tmp_path):
    """A complete-looking checkpoint whose weights file is cut short does not read back, so it is not named."""
    broken = nan_teacher(sd_teacher, tmp_path / "broken-teacher")
    damaged = tmp_path / "run" / "checkpoint-5"
    damaged.mkdir(parents=True)
    (damaged / "trainer_state.json").write_text('{"global_step": 5, "seed": 0}')
    save_file({"w": torch.zeros(64)}, damaged / "unet_trainable.safetensors")
    cut = (damaged / "unet_trainable.safetensors").read_bytes()
    (damaged / "unet_trainable.safetensors").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(DistillError, match=r"loss became nan at step 1; no checkpoint reads back intact\."):
        tiny_run(broken, image_folder, tmp_path / "run").run()


def test_a_dataset_with_no_batch_per_process_is_a_clear_error():
    """3 samples in batches of 2 over 2 processes: accelerate gives no full batch to one process per epoch."""
    from distill.run_plan import StepPlan

    with pytest.raises(DistillError, match=r"The dataset \(3 samples in batches of --train_batch_size 2\) gives no "
                                           r"batch to each of the 2 processes"):
        StepPlan.of(TrainConfig(train_batch_size=2), num_samples=3, batches_per_process=0, num_processes=2)
    plan = StepPlan.of(TrainConfig(train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=None,
                                   num_train_epochs=3), num_samples=8, batches_per_process=3, num_processes=1)
    assert (plan.steps_per_epoch, plan.max_steps, plan.total_batch) == (2, 6, 4)


def test_a_batch_larger_than_the_dataset_warns_once_with_the_real_total_batch(caplog):
    from distill.run_plan import StepPlan

    with caplog.at_level("WARNING", logger="distill.run_plan"):
        plan = StepPlan.of(TrainConfig(train_batch_size=16, gradient_accumulation_steps=2, max_train_steps=5),
                           num_samples=6, batches_per_process=1, num_processes=1)
    assert plan.total_batch == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["The dataset has 6 samples, fewer than --train_batch_size 16: every batch holds 6 samples, "
                        "so the total batch is 12, not 32."]
