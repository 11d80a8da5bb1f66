"""DMD2: its losses and backward simulation against hand-written oracles; train_scripts/dmd2.py as a user runs it."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, LCMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from conftest import subprocess_env
from distill.conditioning import TextConditioner
from distill.denoiser import Denoiser
from distill.errors import DistillError
from distill.methods import DMD2, DMD2Config, LatentBatch
from distill.renoising import chain_timesteps, renoising_sample, sampler_input
from distill.schedule import NoiseSchedule
from distill.teacher import inspect_teacher, pipeline_class
from distill.testing import method_on_teacher

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "dmd2.py"
LATENT_SHAPE = (4, 16, 16)  # the tiny teachers at 32 px, VAE downsampling 2
PROMPTS = ["a handwritten digit seven", "a red square"]
PROMPT = "a striped picture number 3"
NOISE_SEED, SAMPLER_SEED = 3, 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while this file runs (restored after): on two cores shared with the training subprocesses and
    other work, two spinning threads make each tiny UNet call up to a hundred times slower (see subprocess_env)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_method(folder, **config) -> tuple[DMD2, TextConditioner]:
    config = DMD2Config(**{"lora_rank": 4, "fake_lora_rank": 4, **config})
    method, teacher = method_on_teacher(DMD2, config, folder, 32)
    return method, teacher.conditioner


def make_batch(conditioner: TextConditioner, seed: int = 0) -> LatentBatch:
    """Two prompts with stand-in real latents (the GAN term's real rows)."""
    torch.manual_seed(seed)
    return LatentBatch(torch.randn(2, *LATENT_SHAPE), conditioner.encode(PROMPTS), conditioner.unconditional(2))


def perturb(params, seed: int, std: float = 0.02) -> None:
    """Move weights off their start (LoRA B matrices start at zero), so a network differs from the teacher."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator) * std)


def lora_params(net: torch.nn.Module, kind: str = "lora_") -> list[torch.nn.Parameter]:
    return [p for name, p in net.named_parameters() if kind in name]


def ddpm_alphas_cumprod(folder) -> torch.Tensor:
    """abar_t from diffusers' own DDPMScheduler: the oracle every hand-written noising below uses."""
    return DDPMScheduler.from_config(DDPMScheduler.load_config(folder, subfolder="scheduler")).alphas_cumprod


def bc(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def noised(abar: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return bc(abar[t].sqrt()) * x0 + bc((1 - abar[t]).sqrt()) * noise


def x0_by_hand(unet, x_t: torch.Tensor, t: torch.Tensor, cond, abar: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) from one plain UNet call (the tiny teachers predict eps)."""
    eps = unet(x_t, t, **cond.unet_kwargs()).sample
    return (x_t - bc((1 - abar[t]).sqrt()) * eps) / bc(abar[t].sqrt())


@contextlib.contextmanager
def adapters_off(unet):
    """The frozen teacher through diffusers' own switch: every LoRA adapter of the shared UNet disabled."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@contextlib.contextmanager
def mid_block_output(unet):
    """The output of ``unet``'s mid block in its latest forward (what DMD2's classifier reads)."""
    captured = []
    handle = unet.mid_block.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def generator_x0(method: DMD2, batch: LatentBatch, seed: int = 5) -> torch.Tensor:
    """The generator's one-step sample from pure noise at T-1, with its graph to the student's weights."""
    noise = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))
    return method.generate(noise, torch.full((2,), 999), batch.cond)


# ------------------------------------------------------------------------------------------ the method's math


def test_distribution_matching_gradient_vanishes_when_the_fake_score_is_the_real_score(teacher):
    """Without guidance the real score is the conditional teacher, and the fake score starts as the teacher (LoRA
    B = 0): the two scores agree, so the distribution matching gradient is zero at any generator sample."""
    method, conditioner = make_method(teacher, real_guidance_scale=1.0)
    perturb(method.trainable()["unet"], seed=2)  # any generator: the gradient vanishes whatever its sample
    batch = make_batch(conditioner)
    with torch.no_grad():
        x0 = generator_x0(method, batch)
    x0.requires_grad_(True)
    torch.manual_seed(11)
    method.distribution_matching_loss(x0, batch).backward()
    assert x0.grad is not None
    assert (x0.grad * x0.numel()).abs().max() < 1e-5


def test_distribution_matching_gradient_is_dmds_written_out(teacher):
    """With a fake score off the teacher, dL/dx0 (times x0.numel(): the surrogate is a mean) is DMD's gradient
    (p_real - p_fake) / mean|p_real|, p = x0 - x0_pred, x0_real the guided teacher, from the same random draws."""
    method, conditioner = make_method(teacher)  # the family's real guidance scale
    perturb(lora_params(method.nets["fake_score"]), seed=1)
    batch = make_batch(conditioner)
    with torch.no_grad():
        x0 = generator_x0(method, batch)
    x0.requires_grad_(True)
    torch.manual_seed(11)
    loss = method.distribution_matching_loss(x0, batch)
    loss.backward()

    abar = ddpm_alphas_cumprod(teacher)
    w = method.config.real_guidance_scale
    torch.manual_seed(11)
    t = torch.randint(20, 981, (2,))  # t ~ U[0.02 T, 0.98 T]
    x_t = noised(abar, x0.detach(), torch.randn_like(x0), t)
    unet = method.teacher.unet
    with torch.no_grad():
        with adapters_off(unet):
            x0_cond = x0_by_hand(unet, x_t, t, batch.cond, abar)
            x0_uncond = x0_by_hand(unet, x_t, t, batch.uncond, abar)
        x0_real = x0_uncond + w * (x0_cond - x0_uncond)
        x0_fake = x0_by_hand(method.nets["fake_score"], x_t, t, batch.cond, abar)
    p_real, p_fake = x0.detach() - x0_real, x0.detach() - x0_fake
    expected = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert expected.abs().max() > 1e-3
    tolerance = 1e-4 * expected.abs().max().item()
    torch.testing.assert_close(x0.grad * x0.numel(), expected, rtol=1e-4, atol=tolerance)
    torch.testing.assert_close(loss.detach(), 0.5 * expected.pow(2).mean(), rtol=1e-4, atol=1e-9)


def test_generator_gan_loss_reaches_only_the_generator(teacher):
    """softplus(-D(bottleneck of the fake score at the noised sample)), recomputed by hand; its gradient reaches the
    student's LoRA and neither the fake score nor the classifier, whose requires_grad flags are restored after."""
    method, conditioner = make_method(teacher)
    fake, classifier = method.nets["fake_score"], method.nets["discriminator"]
    perturb(method.trainable()["unet"], seed=2)
    perturb(lora_params(fake), seed=3)
    perturb(classifier.parameters(), seed=4)
    batch = make_batch(conditioner)
    x0 = generator_x0(method, batch)
    torch.manual_seed(13)
    loss = method.generator_gan_loss(x0, batch)
    loss.backward()

    student = method.trainable()["unet"]
    fake_params, classifier_params = list(fake.parameters()), list(classifier.parameters())
    assert student and fake_params and classifier_params
    assert sum(p.grad.abs().sum().item() for p in student if p.grad is not None) > 0
    assert all(p.grad is None or not p.grad.any() for p in fake_params + classifier_params)
    assert all(p.requires_grad for p in fake_params + classifier_params)
    assert all(p.grad is None for name, p in method.teacher.unet.named_parameters() if "lora_" not in name)

    abar = ddpm_alphas_cumprod(teacher)
    torch.manual_seed(13)
    t = torch.randint(0, 1000, (2,))  # the diffusion GAN: the classifier reads x0 noised to t ~ U{0..999}
    x_t = noised(abar, x0.detach(), torch.randn_like(x0), t)
    with torch.no_grad(), mid_block_output(method.teacher.unet) as bottleneck:
        fake(x_t, t, **batch.cond.unet_kwargs())
        expected = F.softplus(-classifier(bottleneck[-1])).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_guidance_loss_reaches_only_the_fake_score_and_classifier(teacher):
    """Denoising score matching of the fake score on the detached sample plus 1e-2 times the classifier's
    softplus(D(fake)) + softplus(-D(real)), recomputed by hand; its gradient never reaches the student."""
    method, conditioner = make_method(teacher)
    fake, classifier = method.nets["fake_score"], method.nets["discriminator"]
    perturb(method.trainable()["unet"], seed=2)
    perturb(lora_params(fake, "lora_B"), seed=3)  # so that the A matrices get gradients too
    batch = make_batch(conditioner)
    x0 = generator_x0(method, batch)
    assert x0.requires_grad
    torch.manual_seed(17)
    loss = method.guidance_loss(x0, batch)
    loss.backward()

    assert all(p.grad is None for p in method.trainable()["unet"])
    assert all(p.grad is None for name, p in method.teacher.unet.named_parameters() if "lora_" not in name)
    classifier_params = list(classifier.parameters())
    assert classifier_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in classifier_params)
    for kind in ("lora_A", "lora_B"):
        params = lora_params(fake, kind)
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), kind

    abar = ddpm_alphas_cumprod(teacher)
    sample = x0.detach()
    torch.manual_seed(17)
    t = torch.randint(0, 1000, (2,))  # t ~ U[0, T)
    eps = torch.randn_like(sample)
    classifier_inputs = []
    for clean in (sample, batch.latents):  # fake rows, then real rows, each noised to its own t ~ U{0..999}
        t_cls = torch.randint(0, 1000, (2,))
        classifier_inputs.append((noised(abar, clean, torch.randn_like(clean), t_cls), t_cls))
    with torch.no_grad():
        eps_fake = fake(noised(abar, sample, eps, t), t, **batch.cond.unet_kwargs()).sample
        logits = []
        for x_t, t_cls in classifier_inputs:
            with mid_block_output(method.teacher.unet) as bottleneck:
                fake(x_t, t_cls, **batch.cond.unet_kwargs())
            logits.append(classifier(bottleneck[-1]))
    expected = (eps_fake - eps).pow(2).mean() + 1e-2 * (F.softplus(logits[0]).mean() + F.softplus(-logits[1]).mean())
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_generator_updates_on_every_nth_step_and_the_fake_score_on_every_step(sd_teacher):
    method, conditioner = make_method(sd_teacher, dfake_gen_update_ratio=3)
    batch = make_batch(conditioner)
    for step in range(7):
        losses = method.loss(batch, step)
        assert list(losses) == (["unet", "fake_score"] if step % 3 == 0 else ["fake_score"]), step
        assert all(loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad for loss in losses.values()), step


@pytest.mark.parametrize("family, defaults, chain", [
    ("sd", {"real_guidance_scale": 1.75, "dfake_gen_update_ratio": 10, "gen_cls_loss_weight": 1e-3,
            "num_denoising_step": 1}, [999]),
    ("sdxl", {"real_guidance_scale": 8.0, "dfake_gen_update_ratio": 5, "gen_cls_loss_weight": 5e-3,
              "num_denoising_step": 4}, [999, 749, 499, 249]),
])
def test_family_defaults_are_the_references_and_explicit_values_win(request, family, defaults, chain):
    folder = request.getfixturevalue(f"{family}_teacher")
    method, _ = make_method(folder)
    assert {key: getattr(method.config, key) for key in defaults} == defaults
    assert method.timesteps.tolist() == chain
    assert method.export_defaults().num_inference_steps == len(chain)
    chosen = {"real_guidance_scale": 3.0, "dfake_gen_update_ratio": 2, "gen_cls_loss_weight": 0.5,
              "num_denoising_step": 2}
    method, _ = make_method(folder, **chosen)
    assert {key: getattr(method.config, key) for key in chosen} == chosen
    assert method.timesteps.tolist() == [999, 499]


def test_backward_simulation_trains_each_step_on_the_generators_own_input(sdxl_teacher):
    """K = 4: the input at chain step k is the sampler's, made by the current generator from the drawn noise
    (k generator calls, each x0 re-noised to the next chain point with fresh noise); k = 0 is the noise itself."""
    method, conditioner = make_method(sdxl_teacher)
    perturb(method.trainable()["unet"], seed=2)  # a generator off the teacher: its own inputs differ from the teacher's
    batch = make_batch(conditioner)
    chain = [999, 749, 499, 249]
    abar = ddpm_alphas_cumprod(sdxl_teacher)
    shape = (2, *LATENT_SHAPE)

    steps = {}  # an optimizer step for each chain step
    for step in range(200):
        steps.setdefault(method.simulated_chain_step(step), step)
        if len(steps) == 4:
            break
    assert sorted(steps) == [0, 1, 2, 3]
    assert method.simulated_chain_step(steps[2]) == 2  # a function of the step alone

    def generate(x, t):
        return method.generate(x, t, batch.cond)

    for k, step in sorted(steps.items()):
        seed = 10 + k
        torch.manual_seed(seed)
        x_t, t = method.generator_inputs(batch, "cpu", step)
        assert t.tolist() == [chain[k]] * 2, k

        torch.manual_seed(seed)
        noise = torch.randn(shape)
        after_draws = torch.get_rng_state()
        with torch.no_grad():
            x = noise
            for i in range(k):  # the sampler, written out
                step = torch.full((2,), chain[i])
                x = noised(abar, x0_by_hand(method.nets["unet"], x, step, batch.cond, abar), torch.randn(shape),
                           torch.full((2,), chain[i + 1]))
        torch.set_rng_state(after_draws)
        by_sampler = sampler_input(generate, noise, torch.tensor(chain), method.teacher.schedule, k)
        torch.testing.assert_close(x_t, x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_t, by_sampler, rtol=0, atol=0)
        if k == 0:
            assert torch.equal(x_t, noise)
        else:
            assert (x_t - noise).abs().max() > 0.1


def test_data_kind_follows_the_losses():
    assert DMD2.data_kind_for(DMD2Config()) == "images"  # the GAN term's real images (the family default weight)
    assert DMD2.data_kind_for(DMD2Config(gen_cls_loss_weight=1e-3)) == "images"
    assert DMD2.data_kind_for(DMD2Config(gen_cls_loss_weight=0.0)) == "prompts"
    assert DMD2.data_kind_for(DMD2Config(gen_cls_loss_weight=0.0, regression_loss_weight=0.25)) == "pairs"
    for kwargs in ({"regression_loss_weight": 0.25}, {"regression_loss_weight": 0.25, "gen_cls_loss_weight": 1e-3}):
        with pytest.raises(DistillError, match="--regression_loss_weight"):
            DMD2Config(**kwargs)
    with pytest.raises(DistillError, match="all 0"):
        DMD2Config(dm_loss_weight=0.0, gen_cls_loss_weight=0.0, regression_loss_weight=0.0)


def test_regression_loss_is_dmd_v1s_one_step_regression_onto_teacher_pairs(sd_teacher):
    """With only the regression term on, the generator's loss is ||G(z_pair, T-1) - x_pair||^2 on the pairs' own noise
    (DMD v1 sec. 3.3), whatever chain step the distribution matching rows use, and only the generator gets gradients."""
    method, conditioner = make_method(sd_teacher, gen_cls_loss_weight=0.0, dm_loss_weight=0.0,
                                      regression_loss_weight=1.0, num_denoising_step=4)
    perturb(lora_params(method.nets["unet"]), seed=4)
    torch.manual_seed(3)
    batch = LatentBatch(torch.randn(2, *LATENT_SHAPE), conditioner.encode(PROMPTS), conditioner.unconditional(2),
                        noise=torch.randn(2, *LATENT_SHAPE))
    losses = method.loss(batch, 0)
    with torch.no_grad():
        t = torch.full((2,), 999)
        expected = (method.denoiser()(batch.noise, t, batch.cond)[0] - batch.latents).pow(2).mean()
    torch.testing.assert_close(losses["unet"].detach(), expected, rtol=1e-4, atol=1e-6)
    assert expected > 1e-3
    losses["unet"].backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in lora_params(method.nets["unet"]))
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in method.nets["fake_score"].parameters())


# ------------------------------------------------------------------------------------------ as a user runs it

COMMON = ["--resolution", "32", "--train_batch_size", "2", "--lora_rank", "4", "--fake_lora_rank", "4",
          "--checkpointing_steps", "2", "--validation_steps", "0", "--report_to", "none", "--seed", "0",
          "--learning_rate", "1e-3"]


def train(teacher: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(teacher), "--output_dir", str(out), *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)


def tail(result: subprocess.CompletedProcess | None, lines: int = 30) -> str:
    return "not run" if result is None else "\n".join(result.stderr.replace("\r", "\n").splitlines()[-lines:])


LOADING = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    folder, prompt, noise_seed, sampler_seed, dest = sys.argv[1:6]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(int(noise_seed)))
    latents, timesteps = {}, {}
    for steps in (1, 4):
        latents[str(steps)] = pipe(prompt, num_inference_steps=steps, height=32, width=32, latents=noise.clone(),
                                   generator=torch.Generator().manual_seed(int(sampler_seed)),
                                   output_type="latent").images.numpy()
        pipe.scheduler.set_timesteps(steps)
        timesteps[str(steps)] = pipe.scheduler.timesteps.tolist()
    np.savez(dest + "/latents.npz", **latents)
    print(json.dumps({
        "class": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "timesteps": timesteps,
        "default_num_inference_steps": pipe.config.default_num_inference_steps,
        "default_guidance_scale": pipe.config.default_guidance_scale,
        "distill_imported": sorted(m for m in sys.modules if m == "distill" or m.startswith("distill.")),
    }))
""")


@dataclass
class SDXLRuns:
    full_out: Path
    resumed_out: Path
    full: subprocess.CompletedProcess
    partial: subprocess.CompletedProcess
    resumed: subprocess.CompletedProcess | None
    load: subprocess.CompletedProcess | None
    cwd: Path


@pytest.fixture(scope="module")
def sdxl_runs(sdxl_teacher, image_folder, tmp_path_factory) -> SDXLRuns:
    """6 steps on the tiny SDXL teacher (ratio 3: generator steps 0 and 3); the same run stopped after 4 steps and
    resumed to 6 from its latest checkpoint; the exported pipeline folder loaded in a fresh process outside the repo."""
    root = tmp_path_factory.mktemp("dmd2-sdxl")
    flags = ["--train_data_dir", str(image_folder), *COMMON, "--dfake_gen_update_ratio", "3"]
    full = train(sdxl_teacher, root / "full", *flags, "--max_train_steps", "6")
    partial = train(sdxl_teacher, root / "resumed", *flags, "--max_train_steps", "4")
    resumed = None
    if partial.returncode == 0:
        resumed = train(sdxl_teacher, root / "resumed", *flags, "--max_train_steps", "6",
                        "--resume_from_checkpoint", "latest")
    cwd = root / "load"
    cwd.mkdir()
    load = None
    if full.returncode == 0:
        load = subprocess.run([sys.executable, "-c", LOADING, str(root / "full" / "pipeline"), PROMPT,
                               str(NOISE_SEED), str(SAMPLER_SEED), str(cwd)], capture_output=True, text=True,
                              timeout=600, env=subprocess_env(HF_MODULES_CACHE=str(cwd / "hf_modules")), cwd=cwd)
    return SDXLRuns(root / "full", root / "resumed", full, partial, resumed, load, cwd)


def adam_steps(checkpoint: Path, index: int) -> set[int]:
    """The Adam step counts of every parameter state in the checkpoint's ``index``-th optimizer."""
    name = "optimizer.bin" if index == 0 else f"optimizer_{index}.bin"
    state = torch.load(checkpoint / name, map_location="cpu", weights_only=False)["state"]
    assert state, name
    return {int(entry["step"]) for entry in state.values()}


def scheduler_epoch(checkpoint: Path, index: int) -> int:
    name = "scheduler.bin" if index == 0 else f"scheduler_{index}.bin"
    return torch.load(checkpoint / name, map_location="cpu", weights_only=False)["last_epoch"]


def test_resumed_run_ends_bit_for_bit_where_the_uninterrupted_run_ends(sdxl_runs):
    assert sdxl_runs.full.returncode == 0, tail(sdxl_runs.full)
    assert sdxl_runs.partial.returncode == 0, tail(sdxl_runs.partial)
    assert sdxl_runs.resumed.returncode == 0, tail(sdxl_runs.resumed)
    # It did resume (a run that ignored --resume_from_checkpoint and restarted would end with the same weights: every
    # micro-batch's draws depend only on the seed and its position).
    assert f"Loading states from {sdxl_runs.resumed_out / 'checkpoint-4'}" in sdxl_runs.resumed.stderr, \
        tail(sdxl_runs.resumed)
    full = load_file(sdxl_runs.full_out / "pytorch_lora_weights.safetensors")
    resumed = load_file(sdxl_runs.resumed_out / "pytorch_lora_weights.safetensors")
    assert full and set(full) == set(resumed)
    assert any(value.abs().max() > 0 for key, value in full.items() if "lora_B" in key)  # trained off zero
    assert [key for key in full if not torch.equal(full[key], resumed[key])] == []
    for name in ("unet_trainable", "fake_score_trainable", "discriminator_trainable"):
        a = load_file(sdxl_runs.full_out / "checkpoint-6" / f"{name}.safetensors")
        b = load_file(sdxl_runs.resumed_out / "checkpoint-6" / f"{name}.safetensors")
        assert a and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("which", ["full_out", "resumed_out"])
def test_generator_steps_every_third_step_across_a_resume(sdxl_runs, which):
    """Ratio 3 over 6 steps: the generator's optimizer stepped at steps 0 and 3, the fake score's (with the
    classifier) at every step; every learning-rate schedule follows the optimizer step count."""
    assert sdxl_runs.full.returncode == 0, tail(sdxl_runs.full)
    assert sdxl_runs.resumed is not None and sdxl_runs.resumed.returncode == 0, tail(sdxl_runs.resumed)
    checkpoint = getattr(sdxl_runs, which) / "checkpoint-6"
    assert adam_steps(checkpoint, 0) == {2}
    assert adam_steps(checkpoint, 1) == {6}
    assert scheduler_epoch(checkpoint, 0) == scheduler_epoch(checkpoint, 1) == 6
    assert adam_steps(getattr(sdxl_runs, which) / "checkpoint-4", 0) == {2}  # steps 0 and 3 of 0..3


def test_exported_pipeline_samples_in_a_fresh_process_on_the_trained_chain(sdxl_runs):
    assert sdxl_runs.full.returncode == 0, tail(sdxl_runs.full)
    assert sdxl_runs.load.returncode == 0, tail(sdxl_runs.load)
    report = json.loads(sdxl_runs.load.stdout.strip().splitlines()[-1])
    assert report["class"] == "FewStepStableDiffusionXLPipeline" and report["scheduler"] == "LCMScheduler"
    assert report["distill_imported"] == []
    assert report["default_num_inference_steps"] == 4 and report["default_guidance_scale"] == 1.0
    assert report["timesteps"]["4"] == chain_timesteps(1000, 4).tolist() == [999, 749, 499, 249]
    assert report["timesteps"]["1"] == chain_timesteps(1000, 4, 1).tolist() == [999]
    latents = np.load(sdxl_runs.cwd / "latents.npz")
    for steps in ("1", "4"):
        assert latents[steps].shape == (1, *LATENT_SHAPE) and np.isfinite(latents[steps]).all(), steps
    assert np.abs(latents["1"] - latents["4"]).max() > 1e-2  # the chain re-noises and denoises three more times


def test_exported_sample_is_the_training_sampler(sdxl_teacher, sdxl_runs):
    """The folder's LCMScheduler steps are distill's re-noising sampler run on the student (the teacher with the
    exported LoRA): same noise, same generator for the fresh noise, at 1 and 4 steps."""
    assert sdxl_runs.full.returncode == 0, tail(sdxl_runs.full)
    assert sdxl_runs.load.returncode == 0, tail(sdxl_runs.load)
    info = inspect_teacher(str(sdxl_teacher))
    pipe = pipeline_class(info).from_pretrained(sdxl_teacher)
    pipe.load_lora_weights(sdxl_runs.full_out)
    schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler.config)
    student = Denoiser(pipe.unet, schedule)
    cond = TextConditioner(info, 32).encode([PROMPT])
    noise = torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(NOISE_SEED))
    latents = np.load(sdxl_runs.cwd / "latents.npz")
    with torch.no_grad():
        for steps in (1, 4):
            expected = renoising_sample(lambda x, t: student(x, t, cond)[0], noise, chain_timesteps(1000, 4, steps),
                                        schedule, generator=torch.Generator().manual_seed(SAMPLER_SEED))
            torch.testing.assert_close(torch.from_numpy(latents[str(steps)]), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def sd_prompts_run(sd_teacher, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("dmd2-sd-prompts")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join([*PROMPTS, PROMPT, "a blue circle on a table"]) + "\n")
    out = root / "out"
    return out, train(sd_teacher, out, "--prompts_file", str(prompts), "--gen_cls_loss_weight", "0", *COMMON,
                      "--max_train_steps", "2")


def test_prompts_only_run_exports_a_one_step_student(sd_prompts_run):
    """SD 1.x without the GAN term: prompts are enough, and the export samples the 1-point chain."""
    out, result = sd_prompts_run
    assert result.returncode == 0, tail(result)
    checkpoint = sorted(p.name for p in (out / "checkpoint-2").glob("*.safetensors"))
    assert checkpoint == ["fake_score_trainable.safetensors", "unet_trainable.safetensors"]  # no classifier
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and any(value.abs().max() > 0 for key, value in lora.items() if "lora_B" in key)
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "LCMScheduler" and config["original_inference_steps"] == 1
    scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]
    sampling = json.loads((out / "distill_config.json").read_text())["sampling"]
    assert sampling == {"scheduler": "LCMScheduler", "num_inference_steps": 1, "guidance_scale": 1.0}
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]


def test_sd_run_resumes_bit_for_bit(sd_teacher, sd_prompts_run, tmp_path):
    """SD 1.x without the GAN term (two optimizers, no classifier): the prompts-only run's checkpoint-2, resumed with
    'latest' to step 11, ends where an uninterrupted 11-step run ends. With the family's ratio 10 the generator
    steps at 0 and 10, so its second update happens after the resume, from its restored Adam state."""
    out, first = sd_prompts_run
    assert first.returncode == 0, tail(first)
    prompts = ["--prompts_file", str(out.parent / "prompts.txt"), "--gen_cls_loss_weight", "0", *COMMON,
               "--max_train_steps", "11"]
    resumed_out = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed_out / "checkpoint-2")  # the checkpoint only, not the 2-step export
    resumed = train(sd_teacher, resumed_out, *prompts, "--resume_from_checkpoint", "latest", "--no_export_pipeline")
    assert resumed.returncode == 0, tail(resumed)
    # It really resumed (a fresh run draws the same per-micro-batch seeds and would end at the same weights too).
    assert f"Loading states from {resumed_out / 'checkpoint-2'}" in resumed.stderr, tail(resumed)
    full = train(sd_teacher, tmp_path / "full", *prompts, "--no_export_pipeline")
    assert full.returncode == 0, tail(full)
    for run in (tmp_path / "full", resumed_out):
        assert adam_steps(run / "checkpoint-11", 0) == {2} and adam_steps(run / "checkpoint-11", 1) == {11}, run
        assert not (run / "checkpoint-11" / "discriminator_trainable.safetensors").exists()
    a = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed_out / "pytorch_lora_weights.safetensors")
    assert a and set(a) == set(b) and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for name in ("unet_trainable", "fake_score_trainable"):
        a = load_file(tmp_path / "full" / "checkpoint-11" / f"{name}.safetensors")
        b = load_file(resumed_out / "checkpoint-11" / f"{name}.safetensors")
        assert a and set(a) == set(b) and [k for k in a if not torch.equal(a[k], b[k])] == [], name


def test_full_finetune_exports_a_unet(sd_teacher, image_folder, tmp_path):
    """--full_finetune with the GAN term: the export is the trained UNet (no LoRA file), a one-step LCMScheduler."""
    out = tmp_path / "out"
    result = train(sd_teacher, out, "--train_data_dir", str(image_folder), "--full_finetune", *COMMON,
                   "--dfake_gen_update_ratio", "1", "--max_train_steps", "2", "--no_export_pipeline")
    assert result.returncode == 0, tail(result)
    assert (out / "unet" / "config.json").is_file() and not (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "checkpoint-2" / "discriminator_trainable.safetensors").is_file()
    student = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    teacher = UNet2DConditionModel.from_pretrained(sd_teacher, subfolder="unet").state_dict()
    assert student and set(student) == set(teacher)
    assert not any("lora_" in key for key in student)
    moved = [k for k in teacher if not torch.equal(student[k], teacher[k])]
    assert len(moved) > len(teacher) // 2, f"{len(moved)} of {len(teacher)} tensors trained"
    assert max((student[k] - teacher[k]).abs().max().item() for k in moved) > 1e-4
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "LCMScheduler" and config["original_inference_steps"] == 1
    scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]


def test_two_processes_train_what_one_process_trains(sd_teacher, image_folder, tmp_path):
    """DDP with three networks: the generator steps on every second step only, and the fake score runs twice per
    generator step (through its DDP wrapper with gradients, and unwrapped and frozen for the generator's GAN term).
    2 processes x batch 2 end with the generator, fake score and classifier of 1 process x batch 2 x 2 accumulation
    steps: the same samples, the same per-micro-batch random draws, averaged gradients equal to accumulated ones."""
    common = ["--pretrained_teacher_model", str(sd_teacher), "--train_data_dir", str(image_folder), *COMMON,
              "--dfake_gen_update_ratio", "2", "--max_train_steps", "4", "--no_export_pipeline"]
    one = subprocess.run([sys.executable, str(SCRIPT), *common, "--output_dir", str(tmp_path / "one"),
                          "--gradient_accumulation_steps", "2"], capture_output=True, text=True, timeout=600,
                         env=subprocess_env(), cwd=REPO)
    assert one.returncode == 0, tail(one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).with_name("accelerate")
    config = REPO / "docs" / "accelerate_configs" / "multi_gpu.yaml"
    two = subprocess.run([str(launcher), "launch", "--config_file", str(config),
                          "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port),
                          str(SCRIPT), *common, "--output_dir", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=600, env=subprocess_env(ACCELERATE_USE_CPU="true"), cwd=REPO)
    assert two.returncode == 0, tail(two)
    assert "total batch 4" in one.stderr and "total batch 4" in two.stderr
    assert (tmp_path / "two" / "checkpoint-4" / "random_states_1.pkl").is_file()  # really two processes
    for run in ("one", "two"):  # the generator stepped at steps 0 and 2, the fake score and classifier at all four
        assert adam_steps(tmp_path / run / "checkpoint-4", 0) == {2}, run
        assert adam_steps(tmp_path / run / "checkpoint-4", 1) == {4}, run
    # Tolerance 0, as SwiftBrush's 2-process test: each process computes what one accumulation micro-batch computes
    # (same batch of 2, same draws), and halving is exact in floating point, so DDP's (g1 + g2) / 2 equals
    # accumulate's g1 / 2 + g2 / 2 bit for bit; any difference is a different computation, not rounding.
    one_lora = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    two_lora = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert one_lora and set(one_lora) == set(two_lora)
    assert any(v.abs().max() > 0 for k, v in one_lora.items() if "lora_B" in k)  # trained off zero
    assert {k: (one_lora[k] - two_lora[k]).abs().max().item() for k in one_lora
            if not torch.equal(one_lora[k], two_lora[k])} == {}
    for name in ("fake_score_trainable", "discriminator_trainable"):
        a = load_file(tmp_path / "one" / "checkpoint-4" / f"{name}.safetensors")
        b = load_file(tmp_path / "two" / "checkpoint-4" / f"{name}.safetensors")
        assert a and set(a) == set(b), name
        assert {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])} == {}, name
    fake = load_file(tmp_path / "one" / "checkpoint-4" / "fake_score_trainable.safetensors")
    assert any(v.abs().max() > 0 for k, v in fake.items() if "lora_B" in k)
    earlier = load_file(tmp_path / "one" / "checkpoint-2" / "discriminator_trainable.safetensors")
    later = load_file(tmp_path / "one" / "checkpoint-4" / "discriminator_trainable.safetensors")
    assert any(not torch.equal(earlier[k], later[k]) for k in later)  # the classifier trained between checkpoints
