"""Phased consistency distillation (PCM): phase edges, the exported scheduler, the loss, the discriminator, the CLI.

The scheduler is checked against the training code (same edges, same consistency function, same (x0, eps)
conversion), against an oracle (a model returning the true noise of a known x0 lands exactly on the DDIM solution at
each edge), and through the paths a user takes: train_scripts/pcm_lora.py run as a subprocess on the tiny SD and SDXL
teachers, the LoRA folder loaded into the stock pipeline with the shipped scheduler, and the pipeline folder loaded
with trust_remote_code in a fresh process outside the repository.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, TCDScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from conftest import subprocess_env
from distill.conditioning import TextConditioner
from distill.teacher import inspect_teacher, pipeline_class
from distill.discriminator import DiscriminatorHeads, feature_channels, unet_encoder_features
from distill.errors import DistillError
from distill.export import student_scheduler
from distill.losses import hinge_discriminator_loss, hinge_generator_loss
from distill.methods import PCM, LatentBatch, PCMConfig, SamplingSpec
from distill.pipelines.scheduler_pcm import PCMScheduler
from distill.schedule import (NoiseSchedule, ddim_timesteps, diffuse_between, phase_edges, phase_lower_edge,
                              skipping_step_pairs)
from distill.solvers import cfg_teacher_ddim_step, ddim_step, teacher_ddim_step
from distill.testing import method_on_teacher

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "pcm_lora.py"
PROMPT = "a striped picture number 3"


def teacher_scheduler_config(folder) -> dict:
    return DDPMScheduler.load_config(folder, subfolder="scheduler")


def make_method(folder, **config) -> tuple[PCM, TextConditioner]:
    method, teacher = method_on_teacher(PCM, PCMConfig(lora_rank=4, **config), folder)
    torch.nn.init.normal_(method.trainable()["unet"][1], std=0.02)  # move the student off the teacher
    return method, teacher.conditioner


def make_batch(conditioner: TextConditioner, seed: int = 0) -> LatentBatch:
    torch.manual_seed(seed)
    prompts = ["a handwritten digit seven", "a red square"]
    return LatentBatch(torch.randn(2, 4, 16, 16), conditioner.encode(prompts), conditioner.unconditional(2))


def pcm_scheduler(folder, num_ddim_timesteps: int = 50, multiphase: int = 4, **overrides) -> PCMScheduler:
    """The scheduler exactly as training exports it (distill.export.student_scheduler with the method's overrides)."""
    defaults = SamplingSpec("PCMScheduler", num_inference_steps=multiphase, scheduler_config={
        "original_inference_steps": num_ddim_timesteps, "multiphase": multiphase, **overrides})
    scheduler = student_scheduler(teacher_scheduler_config(folder), defaults)
    assert isinstance(scheduler, PCMScheduler)
    return scheduler


# ------------------------------------------------------------------------------------------ phase edges


@pytest.mark.parametrize("num_ddim_timesteps", [50, 40])
@pytest.mark.parametrize("multiphase", [1, 2, 4, 8])
def test_phase_edges_are_the_scheduler_timesteps_and_lie_on_the_ddim_grid(sd_teacher, multiphase,
                                                                          num_ddim_timesteps):
    edges = phase_edges(1000, num_ddim_timesteps, multiphase)
    grid = ddim_timesteps(1000, num_ddim_timesteps)
    assert len(edges) == multiphase + 1 and edges[0] == 0 and edges[-1] == grid[-1]
    assert torch.all(edges[1:] > edges[:-1])
    assert set(edges[1:].tolist()) <= set(grid.tolist())

    scheduler = pcm_scheduler(sd_teacher, num_ddim_timesteps, multiphase)
    scheduler.set_timesteps(multiphase)
    assert scheduler.timesteps.tolist() == edges[1:].flip(0).tolist()  # one step per phase, from its top edge
    assert scheduler.prev_timesteps.tolist() == edges[:-1].flip(0).tolist()  # ... to its bottom edge

    # Training: every start t_{n+k} of the grid lies in (s_m, s_{m+1}], its teacher step stays in the phase, and the
    # top start of each phase is the timestep the scheduler evaluates the student at.
    skip = 1000 // num_ddim_timesteps
    lower = phase_lower_edge(grid, edges)
    assert torch.all(lower < grid) and torch.all((grid - skip).clamp(min=0) >= lower)
    tops = [int(grid[lower == s].max()) for s in edges[:-1]]
    assert tops == edges[1:].tolist()
    # Fewer steps that divide M land on a subset of the trained edges.
    for steps in (n for n in (1, 2, 4) if multiphase % n == 0):
        scheduler.set_timesteps(steps)
        assert set(scheduler.timesteps.tolist()) <= set(edges.tolist())


def test_stock_schedulers_miss_the_pcm_edges(sd_teacher):
    """Why PCM ships its own scheduler: TCD's / LCM's grid and DDIM trailing do not step on the trained edges."""
    config = teacher_scheduler_config(sd_teacher)
    edges = phase_edges(1000, 50, 4)
    tcd = TCDScheduler.from_config(config, original_inference_steps=50)
    tcd.set_timesteps(4)
    ddim = DDIMScheduler.from_config(config, timestep_spacing="trailing")
    ddim.set_timesteps(4)
    assert edges[1:].flip(0).tolist() == [999, 739, 499, 239]
    assert tcd.timesteps.tolist() == [999, 759, 499, 259]
    assert ddim.timesteps.tolist() == [999, 749, 499, 249]


# ------------------------------------------------------------------------------------------ scheduler math


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_scheduler_oracle_lands_on_the_ddim_solution_at_every_edge(sd_teacher, prediction_type):
    """With the true x0 and noise of a known sample, each step lands exactly on add_noise(x0, eps, s_m)."""
    scheduler = pcm_scheduler(sd_teacher, prediction_type=prediction_type)
    schedule = NoiseSchedule(scheduler.alphas_cumprod, prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    eps = torch.randn(2, 4, 8, 8, generator=generator)

    def oracle(t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = schedule.alpha(t.view(1), x0), schedule.sigma(t.view(1), x0)
        return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]

    scheduler.set_timesteps(4)
    sample = schedule.add_noise(x0, eps, scheduler.timesteps[:1])
    for t, edge in zip(scheduler.timesteps, scheduler.prev_timesteps):
        output = scheduler.step(oracle(t), t, sample)
        sample = output.prev_sample
        torch.testing.assert_close(output.denoised, x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sample, schedule.add_noise(x0, eps, edge.view(1)), atol=1e-4, rtol=1e-4)
    assert int(scheduler.prev_timesteps[-1]) == 0


def test_scheduler_prediction_conversion_is_the_training_one(sd_teacher):
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        scheduler = pcm_scheduler(sd_teacher, prediction_type=prediction_type)
        schedule = NoiseSchedule.from_scheduler_config({**teacher_scheduler_config(sd_teacher),
                                                        "prediction_type": prediction_type})
        torch.testing.assert_close(scheduler.alphas_cumprod, schedule.alphas_cumprod, atol=0, rtol=0)
        t = torch.tensor([739])
        x_t, output = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        for ours, theirs in zip(scheduler.predicted_x0_eps(output, t, x_t), schedule.to_x0_eps(output, x_t, t)):
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_stochastic_step_keeps_the_marginal_and_is_deterministic_at_gamma_zero(sd_teacher):
    """TCD's gamma: x at the next edge still has the marginal q(x_s | x0); no noise on the last step or at gamma 0."""
    scheduler = pcm_scheduler(sd_teacher)
    schedule = NoiseSchedule(scheduler.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 256, 256, generator=generator), torch.randn(1, 4, 256, 256, generator=generator)
    scheduler.set_timesteps(4)
    t, edge = scheduler.timesteps[1], scheduler.prev_timesteps[1]  # 739 -> 499
    x_t = schedule.add_noise(x0, eps, t.view(1))
    deterministic = schedule.add_noise(x0, eps, edge.view(1))
    for gamma in (0.0, 0.3, 1.0):
        scheduler.set_timesteps(4)
        scheduler.set_begin_index(1)
        out = scheduler.step(eps, t, x_t, gamma=gamma, generator=torch.Generator().manual_seed(1)).prev_sample
        residual = (out - schedule.alpha(edge.view(1), x0) * x0) / schedule.sigma(edge.view(1), x0)
        if gamma == 0:
            torch.testing.assert_close(out, deterministic, atol=1e-4, rtol=1e-4)
            continue
        jump = int((1 - gamma) * int(edge))
        expected_corr = float((scheduler.alphas_cumprod[edge] / scheduler.alphas_cumprod[jump]).sqrt()
                              * schedule.sigmas[jump] / schedule.sigmas[edge])
        corr = float((residual * eps).mean() / residual.std() / eps.std())
        assert abs(float(residual.std()) - 1) < 0.01, gamma
        assert abs(corr - expected_corr) < 0.01 and corr < 0.99, (gamma, corr, expected_corr)
    # The last step (to s_0 = 0) adds no noise, whatever gamma.
    scheduler = pcm_scheduler(sd_teacher, gamma=0.7)
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(3)
    x_239 = schedule.add_noise(x0, eps, torch.tensor([239]))
    last = scheduler.step(eps, torch.tensor(239), x_239, generator=torch.Generator().manual_seed(1)).prev_sample
    torch.testing.assert_close(last, schedule.add_noise(x0, eps, torch.tensor([0])), atol=1e-4, rtol=1e-4)


def test_scheduler_step_equals_the_training_consistency_function(sd_teacher):
    """Same x_t, same model output: the deterministic step is exactly f^m_theta of training, for every phase."""
    method, conditioner = make_method(sd_teacher, multiphase=4)
    cond = conditioner.encode(["a cat"])
    scheduler = pcm_scheduler(sd_teacher, multiphase=4)
    scheduler.set_timesteps(4)
    sample = torch.randn(1, 4, 16, 16)
    seen_edges = []
    for t in scheduler.timesteps:
        t_batch = t.view(1)
        edge = phase_lower_edge(t_batch, method.edges)
        seen_edges.append(int(edge))
        with torch.no_grad():
            model_output = method.denoiser().raw(sample, t_batch, cond)
            expected = method.consistency_function(sample, t_batch, edge, cond)
            x0, _ = method.denoiser()(sample, t_batch, cond)
        output = scheduler.step(model_output, t, sample)
        torch.testing.assert_close(output.prev_sample, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(output.denoised, x0, atol=1e-5, rtol=1e-5)
        sample = output.prev_sample
    assert seen_edges == method.edges[:-1].flip(0).tolist()


# ------------------------------------------------------------------------------------------ the method


def test_consistency_function_boundary_and_phase_of_each_start(sd_teacher):
    method, conditioner = make_method(sd_teacher, multiphase=4)
    cond = conditioner.encode(["a cat", "a dog"])
    x = torch.randn(2, 4, 16, 16)
    edge = torch.tensor([239, 499])
    with torch.no_grad():
        torch.testing.assert_close(method.consistency_function(x, edge, edge, cond), x)  # f^m(x, s_m) = x
    assert method.edges.tolist() == [0, 239, 499, 739, 999]
    torch.manual_seed(0)
    t_start, t_prev = skipping_step_pairs(method.grid, method.skip, 4096)
    lower = phase_lower_edge(t_start, method.edges)
    upper = method.edges[torch.searchsorted(method.edges, lower) + 1]
    assert torch.all((lower < t_start) & (t_start <= upper) & (t_prev >= lower))
    assert set(t_start.tolist()) == set(method.grid.tolist())


@pytest.mark.parametrize("adversarial", [False, True])
def test_loss_recomputed_by_hand(sd_teacher, adversarial):
    """PCM Algorithm 1 with the same random draws, from the library's primitives."""
    method, conditioner = make_method(sd_teacher, loss_type="l2", w_min=3.0, w_max=3.0, multiphase=2,
                                      adv_weight=0.5 if adversarial else 0.0)
    batch = make_batch(conditioner)
    torch.manual_seed(11)
    losses = method.loss(batch, 0)

    schedule, student = method.teacher.schedule, method.denoiser()
    torch.manual_seed(11)
    t_start, t_prev = skipping_step_pairs(method.grid, method.skip, 2)
    edge = torch.where(t_start > 499, torch.tensor(499), torch.tensor(0))  # M = 2: edges 0, 499, 999
    x = schedule.add_noise(batch.latents, torch.randn_like(batch.latents), t_start)
    w = torch.rand(2) * 0 + 3.0  # w_min == w_max (the draw keeps the random stream aligned)
    with torch.no_grad():
        x0, eps = student(x, t_start, batch.cond)
        prediction = ddim_step(schedule, x0, eps, edge)  # t_{n+k} > s_m: one DDIM jump to the edge
        with student.as_teacher() as teacher:
            x_prev = cfg_teacher_ddim_step(teacher, x, t_start, t_prev, batch.cond, batch.uncond, w)
        x0_prev, eps_prev = student(x_prev, t_prev, batch.cond)
        at_edge = (t_prev == edge).view(-1, 1, 1, 1)
        target = torch.where(at_edge, x_prev, ddim_step(schedule, x0_prev, eps_prev, edge))
        expected = (prediction - target).pow(2).mean()
        if adversarial:
            t_adv = (edge + (torch.rand(2) * 500).long()).clamp(max=999)
            fake = diffuse_between(schedule, prediction, torch.randn_like(prediction), edge, t_adv)
            real = diffuse_between(schedule, target, torch.randn_like(target), edge, t_adv)
            assert torch.all((t_adv >= edge) & (t_adv < edge + 500))
            heads = method.nets["discriminator"]
            with student.as_teacher() as teacher:
                fake_logits = heads(unet_encoder_features(teacher.module, fake, t_adv, **batch.cond.unet_kwargs()))
                real_logits = heads(unet_encoder_features(teacher.module, real, t_adv, **batch.cond.unet_kwargs()))
            expected = expected + 0.5 * -torch.stack([f.mean() for f in fake_logits]).mean()
            d_expected = torch.stack([torch.relu(1 - r).mean() + torch.relu(1 + f).mean()
                                      for r, f in zip(real_logits, fake_logits)]).mean()
            torch.testing.assert_close(losses["discriminator"].detach(), d_expected, atol=1e-5, rtol=1e-5)
    assert list(losses) == (["unet", "discriminator"] if adversarial else ["unet"])
    torch.testing.assert_close(losses["unet"].detach(), expected, atol=1e-6, rtol=1e-5)


def test_no_cfg_solver_uses_the_conditional_teacher_step(sd_teacher):
    method, conditioner = make_method(sd_teacher, not_apply_cfg_solver=True, w_min=2.0, w_max=4.0)
    batch = make_batch(conditioner)
    t, t_prev = torch.tensor([999, 519]), torch.tensor([979, 499])
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad(), method.denoiser().as_teacher() as teacher:
        x0, eps = teacher(x, t, batch.cond)
        expected = ddim_step(method.teacher.schedule, x0, eps, t_prev)
        torch.testing.assert_close(teacher_ddim_step(teacher, x, t, t_prev, batch.cond), expected)
    with torch.no_grad():
        torch.testing.assert_close(method.teacher_step(x, t, t_prev, batch, torch.full((2,), 3.0)), expected)
    assert method.export_defaults().guidance_scale == 4.0  # 1 + (w_min + w_max) / 2, applied at inference
    assert make_method(sd_teacher)[0].export_defaults().guidance_scale == 1.0  # guidance baked in


def test_each_loss_reaches_only_its_own_parameters(sd_teacher):
    """Stepped as the trainer steps them (unet, then discriminator): LoRA-only and heads-only gradients."""
    method, conditioner = make_method(sd_teacher, adv_weight=0.1)
    groups = method.trainable()
    assert list(groups) == ["unet", "discriminator"]
    unet, heads = method.nets["unet"], method.nets["discriminator"]
    assert all("lora" in n for n, p in unet.named_parameters() if p.requires_grad)
    assert {id(p) for p in groups["discriminator"]} == {id(p) for p in heads.parameters()}
    assert method.learning_rate_for("discriminator", 1e-4) == 1e-5 and method.learning_rate_for("unet", 1e-4) == 1e-4
    optimizers = {k: torch.optim.AdamW(v, lr=1e-2) for k, v in groups.items()}
    batch = make_batch(conditioner)
    probe_x, probe_t = torch.randn_like(batch.latents), torch.tensor([500, 500])
    with torch.no_grad(), method.denoiser().as_teacher() as teacher:
        teacher_before, _ = teacher(probe_x, probe_t, batch.cond)
    heads_before = [p.detach().clone() for p in heads.parameters()]

    for step in range(2):
        losses = method.loss(batch, step)
        for name, loss in losses.items():
            assert loss.ndim == 0 and torch.isfinite(loss)
            loss.backward()
            own = sum(p.grad.abs().sum().item() for p in groups[name] if p.grad is not None)
            assert own > 0, name
            for other, params in groups.items():
                if other != name:
                    assert all(p.grad is None for p in params), (name, other)
            assert all(p.grad is None for n, p in unet.named_parameters() if "lora" not in n)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, heads.parameters()))
    with torch.no_grad(), method.denoiser().as_teacher() as teacher:
        torch.testing.assert_close(teacher(probe_x, probe_t, batch.cond)[0], teacher_before)


def test_adversarial_term_reaches_the_lora(sd_teacher):
    """Same draws, adversarial weight 0.1 versus 0: the generator's hinge term changes the LoRA gradient."""
    method, conditioner = make_method(sd_teacher, adv_weight=0.1)
    batch = make_batch(conditioner)
    lora = method.trainable()["unet"]
    grads = []
    for weight in (0.1, 0.0):
        method.config = dataclasses.replace(method.config, adv_weight=weight)
        torch.manual_seed(3)
        method.loss(batch, 0)["unet"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora if p.grad is not None]))
        assert all(p.grad is None for p in method.nets["discriminator"].parameters())
        for p in lora:
            p.grad = None
    assert (grads[0] - grads[1]).abs().max() > 0


# ------------------------------------------------------------------------------------------ discriminator


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_encoder_features_are_the_unets_own_down_and_mid_outputs(family, sd_teacher, sdxl_teacher):
    folder = sd_teacher if family == "sd" else sdxl_teacher
    info = inspect_teacher(str(folder))
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").requires_grad_(False)
    cond = TextConditioner(info, 32).encode(["a cat", "a dog"])
    sample, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    captured = []
    hooks = [block.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for block in [*unet.down_blocks, unet.mid_block]]
    with torch.no_grad():
        unet(sample, t, **cond.unet_kwargs())
    for hook in hooks:
        hook.remove()
    sample.requires_grad_(True)
    features = unet_encoder_features(unet, sample, t, **cond.unet_kwargs())
    assert len(features) == len(captured) == len(feature_channels(unet.config))
    for ours, theirs, channels in zip(features, captured, feature_channels(unet.config)):
        assert ours.shape[1] == channels
        torch.testing.assert_close(ours, theirs)
    # Differentiable with respect to the input (the generator's gradient path), frozen weights untouched.
    heads = DiscriminatorHeads.from_unet_config(unet.config)
    hinge_generator_loss(heads.frozen(features)).backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0
    assert all(p.grad is None for p in heads.parameters()) and all(p.grad is None for p in unet.parameters())


def test_hinge_losses():
    real, fake = [torch.tensor([2.0, 0.5]), torch.tensor([[0.0]])], [torch.tensor([-3.0, 0.0]), torch.tensor([[1.0]])]
    # level 1: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; relu(1-3)=0, relu(1+0)=1 -> 0.5. level 2: 1 + 2 = 3.
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), torch.tensor((0.75 + 3.0) / 2))
    torch.testing.assert_close(hinge_generator_loss(fake), torch.tensor(-(-1.5 + 1.0) / 2))


# ------------------------------------------------------------------------------------------ configuration


def test_bad_config_values():
    for kwargs, match in [({"multiphase": 0}, "multiphase"), ({"multiphase": 60}, "multiphase"),
                          ({"w_min": 5, "w_max": 1}, "w_min"), ({"loss_type": "l1"}, "loss_type"),
                          ({"adv_weight": -0.1}, "adv_weight"), ({"adv_lr": 0}, "adv_lr"),
                          ({"huber_c": 0}, "huber_c"), ({"num_ddim_timesteps": 0}, "num_ddim_timesteps")]:
        with pytest.raises(DistillError, match=match):
            PCMConfig(**kwargs)


@pytest.mark.parametrize("flags, flag", [(["--multiphase", "0"], "--multiphase"),
                                         (["--adv_weight", "-1"], "--adv_weight")])
def test_bad_flags_exit_2_with_one_error_line(tmp_path, flags, flag):
    argv = [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(tmp_path / "missing"),
            "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), *flags]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and flag in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ end to end

RUNS = {  # family -> extra flags: SD plain PCD with 2 phases, SDXL with the adversarial term and 4 phases
    "sd": ["--multiphase", "2"],
    "sdxl": ["--adv_weight", "0.1", "--learning_rates", "discriminator=1e-3"],
}

FOLDER_LOADING = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    folder, prompt, dest = sys.argv[1:4]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for steps in (1, 2, 4, None):
        kwargs = {} if steps is None else {"num_inference_steps": steps}
        images[f"steps_{steps}"] = pipe(prompt, height=32, width=32, generator=torch.Generator().manual_seed(0),
                                        output_type="np", **kwargs).images
    np.savez(dest + "/folder.npz", **images)
    pipe.scheduler.set_timesteps(pipe.config.default_num_inference_steps)
    print(json.dumps({
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_module": type(pipe.scheduler).__module__,
        "timesteps": pipe.scheduler.timesteps.tolist(),
        "default_num_inference_steps": pipe.config.default_num_inference_steps,
        "default_guidance_scale": pipe.config.default_guidance_scale,
        "distill_imported": sorted(m for m in sys.modules if m == "distill" or m.startswith("distill.")),
    }))
""")


def run_all(commands: list[tuple[list[str], Path, dict]]) -> list[subprocess.CompletedProcess]:
    """Start the processes together (each with one thread) and wait for all of them."""
    procs = [(argv, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                     env=env)) for argv, cwd, env in commands]
    results = []
    for argv, proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
    return results


def tail(result: subprocess.CompletedProcess, lines: int = 30) -> str:
    return "\n".join(result.stderr.replace("\r", "\n").splitlines()[-lines:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sd_teacher, sdxl_teacher, image_folder) -> dict:
    """train_scripts/pcm_lora.py on both tiny teachers, then each pipeline folder loaded in a fresh process."""
    root = tmp_path_factory.mktemp("pcm-cli")
    teachers = {"sd": sd_teacher, "sdxl": sdxl_teacher}
    commands = []
    for family, extra in RUNS.items():
        argv = [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(teachers[family]),
                "--train_data_dir", str(image_folder), "--output_dir", str(root / family), "--max_train_steps", "3",
                "--checkpointing_steps", "3", "--train_batch_size", "2", "--lora_rank", "4", "--seed", "0",
                "--validation_steps", "0", "--report_to", "none", *extra]
        commands.append((argv, REPO, subprocess_env()))
    training = dict(zip(RUNS, run_all(commands)))
    loads = {}
    ok = [f for f in RUNS if training[f].returncode == 0]
    cwd = {f: root / f"load-{f}" for f in ok}
    for f in ok:
        cwd[f].mkdir()
    commands = [([sys.executable, "-c", FOLDER_LOADING, str(root / f / "pipeline"), PROMPT, str(cwd[f])], cwd[f],
                 subprocess_env(HF_MODULES_CACHE=str(cwd[f] / "hf_modules"))) for f in ok]
    loads = dict(zip(ok, run_all(commands)))
    return {"root": root, "teachers": teachers, "training": training, "loads": loads, "cwd": cwd}


@pytest.mark.parametrize("family", list(RUNS))
def test_cli_exports_lora_scheduler_and_checkpoints(trained, family):
    result = trained["training"][family]
    assert result.returncode == 0, tail(result)
    out = trained["root"] / family
    adversarial = "--adv_weight" in RUNS[family]
    multiphase = 2 if family == "sd" else 4
    assert {"pytorch_lora_weights.safetensors", "scheduler", "README.md", "pipeline"} <= {p.name for p in out.iterdir()}
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") and "lora" in k for k in lora)  # no discriminator in the LoRA
    checkpoint = sorted(p.name for p in (out / "checkpoint-3").iterdir() if p.suffix == ".safetensors")
    assert checkpoint == (["discriminator_trainable.safetensors", "unet_trainable.safetensors"] if adversarial
                          else ["unet_trainable.safetensors"])
    if adversarial:
        heads = load_file(out / "checkpoint-3" / "discriminator_trainable.safetensors")
        fresh = DiscriminatorHeads.from_unet_config(UNet2DConditionModel.load_config(trained["teachers"][family],
                                                                                     subfolder="unet"))
        assert set(heads) == {k for k, _ in fresh.named_parameters()}
        assert any("loss/discriminator" in line for line in result.stderr.replace("\r", "\n").splitlines())
    sampling = json.loads((out / "distill_config.json").read_text())["sampling"]
    assert sampling == {"scheduler": "PCMScheduler", "num_inference_steps": multiphase, "guidance_scale": 1.0}
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "PCMScheduler" and config["multiphase"] == multiphase
    assert (out / "scheduler" / "scheduler_pcm.py").read_text() == (REPO / "pipelines" / "scheduler_pcm.py").read_text()
    card = (out / "README.md").read_text()
    assert "PCMScheduler" in card and f"num_inference_steps={multiphase}" in card and "phase" in card
    assert f"| multiphase | {multiphase} |" in card


@pytest.mark.parametrize("family", list(RUNS))
def test_stock_pipeline_with_lora_and_shipped_scheduler_matches_the_pipeline_folder(trained, family):
    """The LoRA folder in the stock pipeline (scheduler class read from the folder) and the self-contained folder in
    a fresh process (another cwd, no distill import) sample the same images at 1, 2 and 4 steps."""
    from diffusers.utils.dynamic_modules_utils import get_class_from_dynamic_module

    assert trained["training"][family].returncode == 0, tail(trained["training"][family])
    load = trained["loads"][family]
    assert load.returncode == 0, tail(load)
    report = json.loads(load.stdout.strip().splitlines()[-1])
    out = trained["root"] / family
    multiphase = 2 if family == "sd" else 4
    assert report["scheduler"] == "PCMScheduler" and not report["scheduler_module"].startswith("distill")
    assert report["distill_imported"] == []
    assert report["timesteps"] == phase_edges(1000, 50, multiphase)[1:].flip(0).tolist()
    assert report["default_num_inference_steps"] == multiphase and report["default_guidance_scale"] == 1.0
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["scheduler"] == ["scheduler_pcm", "PCMScheduler"]

    scheduler_cls = get_class_from_dynamic_module(str(out), "scheduler_pcm.py", subfolder="scheduler",
                                                  class_name="PCMScheduler", trust_remote_code=True)
    pipe = pipeline_class(inspect_teacher(str(trained["teachers"][family]))).from_pretrained(
        trained["teachers"][family])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_cls.from_pretrained(out, subfolder="scheduler")
    pipe.load_lora_weights(out)
    folder = np.load(trained["cwd"][family] / "folder.npz")
    for steps in (1, 2, 4):
        stock = pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0, height=32, width=32,
                     generator=torch.Generator().manual_seed(0), output_type="np").images
        assert stock.shape == (1, 32, 32, 3) and np.isfinite(stock).all()
        np.testing.assert_allclose(folder[f"steps_{steps}"], stock, rtol=0, atol=2e-3)
    np.testing.assert_array_equal(folder["steps_None"], folder[f"steps_{multiphase}"])
    assert np.abs(folder["steps_1"] - folder["steps_4"]).max() > 1e-3
