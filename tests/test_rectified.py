"""Rectified Diffusion: the three losses by hand, the exported DDIM sampler against the training solver, and the
command line end to end (pairs from generate_pairs.py, LoRA and full-UNet students loaded back in fresh processes)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conftest import subprocess_env
from distill.conditioning import TextConditioner
from distill.errors import DistillError
from distill.export import student_scheduler
from distill.methods import LatentBatch, RectifiedConfig, RectifiedDiffusion
from distill.schedule import FlowMatchingSchedule
from distill.solvers import ddim_step, line_through
from distill.testing import method_on_teacher

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train_scripts" / "rectified_diffusion.py"
GENERATE = REPO / "train_scripts" / "generate_pairs.py"
PROMPT = "a handwritten digit seven"


def make_method(folder, **config) -> tuple[RectifiedDiffusion, TextConditioner]:
    method, teacher = method_on_teacher(RectifiedDiffusion, RectifiedConfig(**{"lora_rank": 4, **config}), folder, 32)
    return method, teacher.conditioner


def make_batch(conditioner: TextConditioner, seed: int = 0) -> LatentBatch:
    generator = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
    return LatentBatch(latents, conditioner.encode([PROMPT, "a red square"]), conditioner.unconditional(2), noise)


def move_off_teacher(method: RectifiedDiffusion) -> None:
    """Perturb the LoRA B matrices (zero at start) so the student differs from the teacher."""
    with torch.no_grad():
        for name, param in method.nets["unet"].named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ the math


def first_order_transfer(schedule, x_t, eps, t, t_to):
    """The test's own first-order ODE step x_to = alpha_to (x_t - sigma_t eps) / alpha_t + sigma_to eps (DDIM eq. 12);
    t = -1 is the clean end."""
    def coefficients(step):
        step = step.view(-1, 1, 1, 1)
        alpha = torch.where(step < 0, 1.0, schedule.alphas[step.clamp(min=0)])
        return alpha, torch.where(step < 0, 0.0, schedule.sigmas[step.clamp(min=0)])

    (alpha_t, sigma_t), (alpha_to, sigma_to) = coefficients(t), coefficients(t_to)
    return alpha_to * (x_t - sigma_t * eps) / alpha_t + sigma_to * eps


def test_first_order_ode_oracle(sd_teacher):
    """On a known line x_t = alpha_t x0 + sigma_t eps: a DDIM step lands on the line, line_through recovers x0, eps."""
    method, _ = make_method(sd_teacher)
    schedule = method.teacher.schedule
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t, s = torch.tensor([999, 500, 30]), torch.tensor([600, 249, -1])
    x_t = schedule.add_noise(x0, eps, t)
    landed = ddim_step(schedule, x0, eps, s)
    torch.testing.assert_close(landed[:2], schedule.add_noise(x0[:2], eps[:2], s[:2]))
    torch.testing.assert_close(landed[2], x0[2])  # t = -1 is the clean end
    torch.testing.assert_close(landed, first_order_transfer(schedule, x_t, eps, t, s), atol=1e-5, rtol=1e-5)
    line_x0, line_eps = line_through(schedule, x_t, landed, t, s)
    torch.testing.assert_close(line_eps, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(line_x0, x0, atol=1e-4, rtol=1e-4)


def test_line_through_a_flow_teachers_pure_noise_end():
    """On a flow-matching teacher sigma_{T-1} = 1 (alpha 0): the line through x_{T-1} = eps and a later point is still
    found, where the division by alpha of Delta(x / alpha) / Delta(sigma / alpha) would give nan."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = FlowMatchingSchedule.from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert float(schedule.alphas[999]) == 0.0
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, s = torch.tensor([999, 999]), torch.tensor([499, -1])
    x_t = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, eps)
    line_x0, line_eps = line_through(schedule, x_t, ddim_step(schedule, x0, eps, s), t, s)
    torch.testing.assert_close(line_x0, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(line_eps, eps, atol=1e-5, rtol=1e-5)


def test_exported_ddim_step_is_the_training_solver(sd_teacher):
    """DDIMScheduler (trailing, set_alpha_to_one) steps between the phase edges exactly like the training solver."""
    method, conditioner = make_method(sd_teacher, rectified_variant="phased")
    move_off_teacher(method)
    defaults = method.export_defaults()
    assert defaults.num_inference_steps == 4 and defaults.scheduler == "DDIMScheduler"
    scheduler = student_scheduler(DDPMScheduler.load_config(sd_teacher, subfolder="scheduler"), defaults)
    assert isinstance(scheduler, DDIMScheduler)
    scheduler.set_timesteps(defaults.num_inference_steps)
    edges = method.upper_edges.flip(0)
    assert scheduler.timesteps.tolist() == edges.tolist() == [999, 749, 499, 249]
    lower = edges - method.steps_per_phase * method.skip
    assert lower.tolist() == [749, 499, 249, -1]

    # A known x0 and eps: every step lands on the interpolation, the last one on x0 itself.
    x0, eps = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    sample = method.teacher.schedule.add_noise(x0, eps, torch.tensor([999]))
    for t, t_prev in zip(scheduler.timesteps, lower):
        sample = scheduler.step(eps, t, sample).prev_sample
        expected = x0 if t_prev < 0 else method.teacher.schedule.add_noise(x0, eps, t_prev.view(1))
        torch.testing.assert_close(sample, expected, atol=1e-5, rtol=1e-5)

    # The trained student's own output: the scheduler step equals the loss's first-order transfer.
    cond = conditioner.encode([PROMPT])
    sample = torch.randn(1, 4, 16, 16)
    for t, t_prev in zip(scheduler.timesteps, lower):
        with torch.no_grad():
            output = method.denoiser().raw(sample, t.view(1), cond)
            _, eps_hat = method.denoiser()(sample, t.view(1), cond)
        expected = first_order_transfer(method.teacher.schedule, sample, eps_hat, t.view(1), t_prev.view(1))
        sample = scheduler.step(output, t, sample).prev_sample
        torch.testing.assert_close(sample, expected, atol=1e-5, rtol=1e-5)


def test_pairs_loss_by_hand(teacher):
    """Algorithm 4: x_t = alpha_t x0_hat + sigma_t eps with the pair's noise, L = ||eps_hat - eps||^2."""
    method, conditioner = make_method(teacher)
    move_off_teacher(method)
    batch = make_batch(conditioner)
    torch.manual_seed(5)
    loss = method.loss(batch, 0)["unet"]
    torch.manual_seed(5)
    t = torch.randint(0, 1000, (2,))
    alpha_bar = method.teacher.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * batch.latents + (1 - alpha_bar).sqrt() * batch.noise
    with torch.no_grad():
        eps_hat = method.nets["unet"](x_t, t, encoder_hidden_states=batch.cond.prompt_embeds,
                                      **_added(batch)).sample
    torch.testing.assert_close(loss.detach(), (eps_hat - batch.noise).pow(2).mean())


def _added(batch: LatentBatch) -> dict:
    cond = batch.cond
    if cond.pooled_prompt_embeds is None:
        return {}
    return {"added_cond_kwargs": {"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids}}


def test_phased_loss_by_hand(sd_teacher):
    """Teacher CFG DDIM inside the phase, the line through its ends, the student's DDIM step to the lower edge."""
    method, conditioner = make_method(sd_teacher, rectified_variant="phased", num_ddim_timesteps=4, num_phases=2,
                                      teacher_guidance_scale=2.5)
    move_off_teacher(method)
    batch = make_batch(conditioner)
    torch.manual_seed(11)
    loss = method.loss(batch, 0)["unet"]

    torch.manual_seed(11)
    upper, lower, t = method.sample_phase(2, "cpu")
    assert set(upper.tolist()) <= {499, 999} and torch.equal(lower, upper - 500)
    assert torch.all((lower < t) & (t <= upper))
    schedule = method.teacher.schedule
    x = schedule.add_noise(batch.latents, torch.randn_like(batch.latents), upper)
    x_start, s = x, upper
    unet = method.nets["unet"]
    with torch.no_grad():
        unet.disable_adapters()
        for _ in range(2):  # 4 grid steps in 2 phases
            eps_c = unet(x, s, encoder_hidden_states=batch.cond.prompt_embeds).sample
            eps_u = unet(x, s, encoder_hidden_states=batch.uncond.prompt_embeds).sample
            eps = eps_u + 2.5 * (eps_c - eps_u)  # the stock pipeline's guidance formula
            x = first_order_transfer(schedule, x, eps, s, s - 250)
            s = s - 250
        unet.enable_adapters()
        x_end = x
        alpha_s, sigma_s = schedule.alphas[upper].view(-1, 1, 1, 1), schedule.sigmas[upper].view(-1, 1, 1, 1)
        alpha_e, sigma_e = schedule.alphas[lower].view(-1, 1, 1, 1), schedule.sigmas[lower].view(-1, 1, 1, 1)
        line_eps = (x_end / alpha_e - x_start / alpha_s) / (sigma_e / alpha_e - sigma_s / alpha_s)
        x_t = first_order_transfer(schedule, x_start, line_eps, upper, t)
        eps_hat = unet(x_t, t, encoder_hidden_states=batch.cond.prompt_embeds).sample
        prediction = first_order_transfer(schedule, x_t, eps_hat, t, lower)
    torch.testing.assert_close(loss.detach(), (prediction - x_end).pow(2).mean(), atol=1e-6, rtol=1e-4)
    # x_t lies on the line: starting again from x_t with the line's noise reaches the teacher's end.
    torch.testing.assert_close(first_order_transfer(schedule, x_t, line_eps, t, lower), x_end, atol=1e-4, rtol=1e-4)


def test_consistency_loss_by_hand(sd_teacher):
    """The student's x0 at t_{n+k} against its stop-gradient x0 at t_n on the same line (x0_hat at the clean end)."""
    method, conditioner = make_method(sd_teacher, rectified_variant="consistency", num_ddim_timesteps=4,
                                      num_phases=1)
    move_off_teacher(method)
    batch = make_batch(conditioner)
    torch.manual_seed(0)
    loss = method.loss(batch, 0)["unet"]
    torch.manual_seed(0)
    start, prev = method.sample_grid_pair(2, "cpu")
    assert start.tolist() == [249, 999] and prev.tolist() == [-1, 749]  # one clean-end case, one interior case
    schedule = method.teacher.schedule
    with torch.no_grad():
        x_start = schedule.add_noise(batch.latents, batch.noise, start)
        prediction = method.student_x0(x_start, start, batch.cond)
        x_prev = schedule.add_noise(batch.latents[1:], batch.noise[1:], prev[1:])
        targets = torch.stack([batch.latents[0], method.student_x0(x_prev, prev[1:], batch.cond[1:])[0]])
    torch.testing.assert_close(loss.detach(), (prediction - targets).pow(2).mean(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("variant", ["pairs", "phased", "consistency"])
def test_lora_gradients_reach_only_the_lora(sd_teacher, variant):
    method, conditioner = make_method(sd_teacher, rectified_variant=variant, num_ddim_timesteps=8)
    unet = method.nets["unet"]
    params = method.trainable()["unet"]
    assert params and {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert all("lora" in n for n, p in unet.named_parameters() if p.requires_grad)
    method.loss(make_batch(conditioner), 0)["unet"].backward()
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora" not in n)
    assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0


def test_full_finetune_phased_keeps_a_frozen_teacher_and_ema(sd_teacher):
    method, conditioner = make_method(sd_teacher, rectified_variant="phased", num_ddim_timesteps=4, num_phases=2,
                                      full_finetune=True, use_ema=True, ema_decay=0.5)
    unet, teacher_copy = method.nets["unet"], method.frozen_teacher
    assert teacher_copy is not unet and not any(p.requires_grad for p in teacher_copy.parameters())
    assert len(method.trainable()["unet"]) == len(list(unet.parameters()))
    before = {k: v.clone() for k, v in teacher_copy.state_dict().items()}
    optimizer = torch.optim.AdamW(method.trainable()["unet"], lr=1e-3)
    batch = make_batch(conditioner)
    for step in range(2):
        optimizer.zero_grad()
        method.loss(batch, step)["unet"].backward()
        assert all(p.grad is None for p in teacher_copy.parameters())
        optimizer.step()
        method.on_step_end(step)
    assert all(torch.equal(before[k], v) for k, v in teacher_copy.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    averaged = method.student_unet()
    assert averaged is not unet
    for shadow, param in zip(method.ema.average.shadow_params, averaged.parameters()):
        assert torch.equal(shadow, param)
    # The average lies strictly between the teacher and the current weights for some parameter.
    live = dict(unet.named_parameters())
    assert any(not torch.equal(p, live[n]) for n, p in averaged.named_parameters())


def test_bad_method_config():
    with pytest.raises(DistillError, match="--rectified_variant"):
        RectifiedConfig(rectified_variant="reflow")
    with pytest.raises(DistillError, match="multiple of --num_phases"):
        RectifiedConfig(num_ddim_timesteps=10, num_phases=4)
    with pytest.raises(DistillError, match="--ema_decay"):
        RectifiedConfig(ema_decay=1.5)
    with pytest.raises(DistillError, match="--loss_type"):
        RectifiedConfig(loss_type="l1")
    assert RectifiedDiffusion.data_kind_for(RectifiedConfig(rectified_variant="phased")) == "images"
    assert RectifiedDiffusion.data_kind_for(RectifiedConfig(rectified_variant="consistency")) == "pairs"


# ------------------------------------------------------------------------------------------ command line

FLAGS = ["--train_batch_size", "2", "--seed", "0", "--validation_steps", "0", "--report_to", "none",
         "--checkpointing_steps", "100", "--lr_warmup_steps", "0", "--learning_rate", "1e-3"]

LOADING = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel

    teacher, out, family, prompt, dest = sys.argv[1:6]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    def sample(p, **kwargs):
        return p(prompt, height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np",
                 **kwargs).images
    teacher_images = sample(pipe, num_inference_steps=2, guidance_scale=1.0)
    import os
    if os.path.isdir(out + "/unet"):
        pipe.unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    else:
        pipe.load_lora_weights(out)
    stock = sample(pipe, num_inference_steps=2, guidance_scale=1.0)
    folder = DiffusionPipeline.from_pretrained(out + "/pipeline", trust_remote_code=True)
    folder.set_progress_bar_config(disable=True)
    np.savez(dest, teacher=teacher_images, stock=stock, folder=sample(folder))
    print(json.dumps({
        "scheduler": type(folder.scheduler).__name__,
        "scheduler_config": {k: folder.scheduler.config[k] for k in ("timestep_spacing", "set_alpha_to_one")},
        "defaults": [folder.config.default_num_inference_steps, folder.config.default_guidance_scale],
        "class": type(folder).__name__,
        "distill_imported": sorted(m for m in sys.modules if m == "distill" or m.startswith("distill.")),
    }))
""")


def run(argv: list[str], cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=subprocess_env(**env), cwd=cwd)


def tail(result: subprocess.CompletedProcess) -> str:
    return "\n".join(result.stderr.replace("\r", "\n").splitlines()[-30:])


def check_student(teacher: Path, out: Path, family: str, tmp: Path) -> dict:
    """Load the export in a fresh process outside the repository: stock pipeline + weights, and the folder."""
    loaded = run([sys.executable, "-c", LOADING, str(teacher), str(out), family, PROMPT, str(tmp / "images.npz")],
                 cwd=tmp, HF_MODULES_CACHE=str(tmp / "hf_modules"))
    assert loaded.returncode == 0, tail(loaded)
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert report["scheduler"] == "DDIMScheduler" and report["distill_imported"] == []
    assert report["scheduler_config"] == {"timestep_spacing": "trailing", "set_alpha_to_one": True}
    images = np.load(tmp / "images.npz")
    assert images["folder"].shape == (1, 32, 32, 3) and np.isfinite(images["folder"]).all()
    # The folder (weights fused in, 2 steps by default) samples what the stock pipeline + student samples ...
    np.testing.assert_allclose(images["folder"], images["stock"], rtol=0, atol=1e-3)
    # ... which is not the teacher: training changed the weights.
    assert np.abs(images["stock"] - images["teacher"]).max() > 1e-3
    return report


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_pairs_then_lora_training_end_to_end(family, request, tmp_path):
    teacher = request.getfixturevalue(f"{family}_teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na red square\n")
    pairs = tmp_path / "pairs"
    generated = run([sys.executable, str(GENERATE), "--pretrained_teacher_model", str(teacher), "--prompts_file",
                     str(prompts), "--output_dir", str(pairs), "--num_samples", "4", "--shard_size", "2",
                     "--num_inference_steps", "4"])
    assert generated.returncode == 0, tail(generated)
    out = tmp_path / "out"
    trained = run([sys.executable, str(TRAIN), "--pretrained_teacher_model", str(teacher), "--pairs_dir", str(pairs),
                   "--output_dir", str(out), "--max_train_steps", "3", "--lora_rank", "4", *FLAGS])
    assert trained.returncode == 0, tail(trained)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    config = json.loads((out / "distill_config.json").read_text())
    assert config["method"] == "rectified" and config["rectified_variant"] == "pairs"
    assert config["sampling"] == {"scheduler": "DDIMScheduler", "num_inference_steps": 2, "guidance_scale": 1.0}
    assert "DDIMScheduler" in (out / "README.md").read_text()
    report = check_student(teacher, out, family, tmp_path)
    assert report["defaults"] == [2, 1.0]


def test_phased_full_finetune_with_ema_end_to_end(sd_teacher, image_folder, tmp_path):
    out = tmp_path / "out"
    trained = run([sys.executable, str(TRAIN), "--pretrained_teacher_model", str(sd_teacher), "--train_data_dir",
                   str(image_folder), "--output_dir", str(out), "--rectified_variant", "phased", "--num_ddim_timesteps",
                   "4", "--num_phases", "2", "--full_finetune", "--use_ema", "--ema_decay", "0.5",
                   "--max_train_steps", "2", *FLAGS])
    assert trained.returncode == 0, tail(trained)
    assert (out / "unet" / "config.json").is_file() and not (out / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((out / "distill_config.json").read_text())["sampling"]["num_inference_steps"] == 2
    check_student(sd_teacher, out, "sd", tmp_path)


def test_bad_command_lines_exit_2_with_one_error_line(sd_teacher, tmp_path):
    base = [sys.executable, str(TRAIN), "--pretrained_teacher_model", str(sd_teacher), "--output_dir",
            str(tmp_path / "out"), *FLAGS]
    cases = [
        (["--pairs_dir", str(tmp_path), "--rectified_variant", "reflow"], "--rectified_variant"),
        (["--pairs_dir", str(tmp_path / "missing")], "does not exist"),
        ([], "--pairs_dir"),
        (["--pairs_dir", str(tmp_path), "--num_ddim_timesteps", "10"], "multiple of --num_phases"),
    ]
    for extra, message in cases:
        result = run(base + extra)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], (extra, tail(result))
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
