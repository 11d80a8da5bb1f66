"""The LCM method and the SD/SDXL conditioning it runs on, with real tiny teachers, peft LoRA and diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler

from distill.conditioning import TextConditioner
from distill.teacher import inspect_teacher, native_resolution
from distill.errors import DistillError
from distill.families import SD, SDXL
from distill.methods import LCM, LCMConfig, LatentBatch
from distill.solvers import cfg_teacher_ddim_step
from distill.testing import method_on_teacher


def make_method(folder, **config) -> tuple[LCM, TextConditioner]:
    method, teacher = method_on_teacher(LCM, LCMConfig(lora_rank=4, **config), folder)
    return method, teacher.conditioner


def make_batch(conditioner: TextConditioner, seed: int = 0) -> LatentBatch:
    torch.manual_seed(seed)
    prompts = ["a handwritten digit seven", "a red square"]
    return LatentBatch(torch.randn(2, 4, 16, 16), conditioner.encode(prompts), conditioner.unconditional(2))


def test_family_detection_and_conditioning_shapes(sd_teacher, sdxl_teacher):
    sd, sdxl = inspect_teacher(str(sd_teacher)), inspect_teacher(str(sdxl_teacher))
    assert (sd.family_spec, sdxl.family_spec) == (SD, SDXL) and (sd.family, sdxl.family) == ("sd", "sdxl")
    assert native_resolution(sd) == 32 == native_resolution(sdxl)

    sd_cond = TextConditioner(sd, 32).encode(["a cat", "a dog"])
    assert sd_cond.prompt_embeds.shape == (2, 77, 32) and sd_cond.pooled_prompt_embeds is None
    assert set(sd_cond.unet_kwargs()) == {"encoder_hidden_states"}

    conditioner = TextConditioner(sdxl, 32)
    cond = conditioner.encode(["a cat", "a dog"], original_size=[[40, 48], [32, 32]], crop_top_left=[[0, 8], [0, 0]])
    assert cond.prompt_embeds.shape == (2, 77, 64)  # penultimate states of both encoders, concatenated
    assert cond.pooled_prompt_embeds.shape == (2, 32)
    assert cond.time_ids.tolist() == [[40, 48, 0, 8, 32, 32], [32, 32, 0, 0, 32, 32]]
    assert not torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[1])


def test_unconditional_embeddings(sd_teacher, sdxl_teacher):
    sd = TextConditioner(inspect_teacher(str(sd_teacher)), 32)
    torch.testing.assert_close(sd.unconditional(3).prompt_embeds, sd.encode([""] * 3).prompt_embeds)
    sdxl = TextConditioner(inspect_teacher(str(sdxl_teacher)), 32).unconditional(2)
    assert torch.count_nonzero(sdxl.prompt_embeds) == 0 and torch.count_nonzero(sdxl.pooled_prompt_embeds) == 0


def test_not_a_teacher(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        inspect_teacher(str(tmp_path / "missing"))
    with pytest.raises(DistillError, match="not a diffusers pipeline"):
        inspect_teacher(str(tmp_path))


def test_student_starts_as_teacher_and_boundary_holds(teacher):
    method, conditioner = make_method(teacher)
    batch = make_batch(conditioner)
    t = torch.tensor([999, 259])
    x_t = method.teacher.schedule.add_noise(batch.latents, torch.randn_like(batch.latents), t)
    with torch.no_grad():
        student_x0, _ = method.denoiser()(x_t, t, batch.cond)
        with method.denoiser().as_teacher() as teacher_denoiser:
            teacher_x0, _ = teacher_denoiser(x_t, t, batch.cond)
        torch.testing.assert_close(student_x0, teacher_x0)  # LoRA B starts at zero
        at_zero = method.consistency_function(x_t, torch.zeros(2, dtype=torch.long), batch.cond)
    torch.testing.assert_close(at_zero, x_t)  # f(x, 0) = x


def test_loss_trains_only_the_lora_and_leaves_the_teacher_unchanged(teacher):
    method, conditioner = make_method(teacher, loss_type="huber")
    unet = method.nets["unet"]
    lora = method.trainable()["unet"]
    assert lora and all("lora" in n for n, p in unet.named_parameters() if p.requires_grad)
    batch = make_batch(conditioner)
    probe_t = torch.tensor([500, 500])
    probe_x = torch.randn_like(batch.latents)
    with torch.no_grad(), method.denoiser().as_teacher() as teacher_denoiser:
        teacher_before, _ = teacher_denoiser(probe_x, probe_t, batch.cond)

    optimizer = torch.optim.AdamW(lora, lr=1e-2)
    for step in range(2):
        loss = method.loss(batch, step)["unet"]
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() >= 0
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in unet.named_parameters() if "lora" not in n)
        assert sum(p.grad.abs().sum().item() for p in lora if p.grad is not None) > 0
        optimizer.step()

    with torch.no_grad():
        with method.denoiser().as_teacher() as teacher_denoiser:
            teacher_after, _ = teacher_denoiser(probe_x, probe_t, batch.cond)
        student_after, _ = method.denoiser()(probe_x, probe_t, batch.cond)
    torch.testing.assert_close(teacher_after, teacher_before)
    assert (student_after - teacher_before).abs().max() > 1e-4


def test_loss_target_is_one_cfg_teacher_step_then_the_student(sd_teacher):
    """Recompute the loss by hand from the paper's algorithm with the same random draws."""
    method, conditioner = make_method(sd_teacher, loss_type="l2", w_min=2.0, w_max=2.0)
    torch.nn.init.normal_(method.trainable()["unet"][1], std=0.01)  # move the student off the teacher
    batch = make_batch(conditioner)
    torch.manual_seed(7)
    loss = method.loss(batch, 0)["unet"]

    torch.manual_seed(7)
    t_start, t_prev = method.sample_timesteps(2, "cpu")
    x = method.teacher.schedule.add_noise(batch.latents, torch.randn_like(batch.latents), t_start)
    w = torch.full((2,), 2.0)  # w_min == w_max; nothing random is drawn after this point
    with torch.no_grad():
        prediction = method.consistency_function(x, t_start, batch.cond)
        with method.denoiser().as_teacher() as teacher_denoiser:
            x_prev = cfg_teacher_ddim_step(teacher_denoiser, x, t_start, t_prev, batch.cond, batch.uncond, w)
        target = method.consistency_function(x_prev, t_prev, batch.cond)
    torch.testing.assert_close(loss.detach(), (prediction - target).pow(2).mean())
    assert torch.all(t_start - t_prev <= 20) and torch.all(t_prev >= 0)


def test_lcm_scheduler_step_equals_training_consistency_function(sd_teacher):
    """The exported scheduler's denoised output is exactly the trained f_theta(x_t, t)."""
    method, conditioner = make_method(sd_teacher, num_ddim_timesteps=50)
    torch.nn.init.normal_(method.trainable()["unet"][1], std=0.01)
    defaults = method.export_defaults()
    scheduler = LCMScheduler.from_config(DDPMScheduler.load_config(sd_teacher, subfolder="scheduler"),
                                         **defaults.scheduler_config)
    scheduler.set_timesteps(4)
    cond = conditioner.encode(["a cat"])
    sample = torch.randn(1, 4, 16, 16)
    for t in scheduler.timesteps:
        t_batch = t.view(1)
        with torch.no_grad():
            model_output = method.denoiser().raw(sample, t_batch, cond)
            expected = method.consistency_function(sample, t_batch, cond)
        denoised = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(0)).denoised
        torch.testing.assert_close(denoised, expected, atol=1e-5, rtol=1e-5)


def test_bad_method_config():
    with pytest.raises(DistillError, match="w_min"):
        LCMConfig(w_min=5, w_max=1)
    with pytest.raises(DistillError, match="loss_type"):
        LCMConfig(loss_type="l1")
