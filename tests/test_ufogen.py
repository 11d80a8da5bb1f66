"""UFOGen (diffusion-GAN) with real tiny SD/SDXL teachers, real peft LoRA, the shared discriminator and diffusers.

In-process: the loss recomputed by hand from the paper's algorithm, gradient isolation between the generator's and
the discriminator's losses, the frozen teacher, the DDPM posterior against diffusers' DDPMScheduler, and the exported
scheduler against the training generator (1 step: x0' itself; 2 and 4 steps: the re-noising chain). As a user runs
it: train_scripts/ufogen.py in a subprocess on both tiny teachers, the result loaded in fresh processes outside the
repository (stock pipeline + LoRA + scheduler, and the self-contained pipeline folder), and bad flags.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler
from safetensors.torch import load_file

from conftest import subprocess_env
from distill.conditioning import TextConditioner

from distill.discriminator import feature_channels, unet_encoder_features, whole_network_features
from distill.errors import DistillError
from distill.export import student_pipeline, student_scheduler
from distill.methods import LatentBatch, UFOGen, UFOGenConfig
from distill.schedule import posterior_mean_variance
from distill.testing import method_on_teacher

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "ufogen.py"
PROMPT = "a striped picture number 3"


def make_method(folder, **config) -> tuple[UFOGen, TextConditioner]:
    method, teacher = method_on_teacher(UFOGen, UFOGenConfig(lora_rank=4, **config), folder, 32)
    return method, teacher.conditioner


def make_batch(conditioner: TextConditioner, seed: int = 0) -> LatentBatch:
    torch.manual_seed(seed)
    prompts = ["a handwritten digit seven", "a red square"]
    return LatentBatch(torch.randn(2, 4, 16, 16), conditioner.encode(prompts), conditioner.unconditional(2))


def move_off_teacher(method: UFOGen) -> None:
    """Give the LoRA non-zero B matrices so the student differs from the teacher."""
    torch.manual_seed(1)
    for name, p in method.nets["unet"].named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)


def ddpm_alphas_cumprod(folder) -> torch.Tensor:
    """abar_t from diffusers' own DDPMScheduler: the oracle the schedule code is checked against."""
    return DDPMScheduler.from_config(DDPMScheduler.load_config(folder, subfolder="scheduler")).alphas_cumprod


# ------------------------------------------------------------------------------------------ the training objective


def hand_gan_losses(kind: str, real_logits, fake_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator, discriminator) losses written out: hinge, or the logistic loss with logits clamped at +-0.5."""
    softplus = torch.nn.functional.softplus
    if kind == "hinge":
        d = [torch.relu(1 - r).mean() + torch.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits)]
        g = [-f.mean() for f in fake_logits]
    else:
        d = [softplus(-r.clamp(max=0.5)).mean() + softplus(f.clamp(min=-0.5)).mean()
             for r, f in zip(real_logits, fake_logits)]
        g = [softplus(-f.clamp(max=0.5)).mean() for f in fake_logits]
    return sum(g) / len(g), sum(d) / len(d)


@pytest.mark.parametrize("backbone,loss_kind", [("frozen", "hinge"), ("lora", "logistic")])
def test_loss_recomputed_by_hand(teacher, backbone, loss_kind):
    """Both losses from the same random draws, written out from UFOGen's algorithm with diffusers' alphas: heads on
    the frozen teacher's encoder with the hinge loss, and (the default) an encoder with its own trained adapter with
    the clamped logistic loss."""
    method, conditioner = make_method(teacher, adversarial_weight=0.5, reconstruction_weight=2.0,
                                      discriminator_backbone=backbone, adversarial_loss=loss_kind)
    move_off_teacher(method)
    discriminator = method.nets["discriminator"]
    torch.manual_seed(2)
    for name, p in discriminator.named_parameters():  # a discriminator encoder that is not the teacher's
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch = make_batch(conditioner)
    torch.manual_seed(7)
    losses = method.loss(batch, 0)

    abar = ddpm_alphas_cumprod(teacher)
    torch.manual_seed(7)
    t = torch.randint(1, 1000, (2,))
    t_prev = (t - 250).clamp(min=0)  # K = 4 steps of T / 4
    x0 = batch.latents

    def bc(values):
        return values.view(-1, 1, 1, 1)

    x_t = bc(abar[t].sqrt()) * x0 + bc((1 - abar[t]).sqrt()) * torch.randn_like(x0)
    real_noise, fake_noise = torch.randn_like(x0), torch.randn_like(x0)
    unet = getattr(method.nets["unet"], "unet", method.nets["unet"])  # the UNet every adapter lives on
    heads = discriminator.heads if backbone == "lora" else discriminator
    kwargs = batch.cond.unet_kwargs()
    with torch.no_grad():
        unet.set_adapter("default")
        eps = unet(x_t, t, **kwargs).sample  # the tiny teachers predict eps
        x0_fake = (x_t - bc((1 - abar[t]).sqrt()) * eps) / bc(abar[t].sqrt())
        real = bc(abar[t_prev].sqrt()) * x0 + bc((1 - abar[t_prev]).sqrt()) * real_noise
        fake = bc(abar[t_prev].sqrt()) * x0_fake + bc((1 - abar[t_prev]).sqrt()) * fake_noise
        if backbone == "frozen":
            unet.disable_adapters()
        else:
            unet.set_adapter("discriminator")
        real_logits = heads(unet_encoder_features(unet, real, t_prev, **kwargs))
        fake_logits = heads(unet_encoder_features(unet, fake, t_prev, **kwargs))
        unet.enable_adapters()
        unet.set_adapter("default")
    assert len(real_logits) == 3  # two down blocks and the mid block
    g_adv, d_loss = hand_gan_losses(loss_kind, real_logits, fake_logits)
    gamma = abar[t] / (2 * (1 - abar[t] / abar[t_prev]))  # (1 - beta_t) abar_{t-1} / (2 beta_t)
    reconstruction = (bc(gamma) * (x0_fake - x0) ** 2).mean()
    torch.testing.assert_close(losses["discriminator"].detach(), d_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["unet"].detach(), 0.5 * g_adv + 2.0 * reconstruction, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("previous_sample,backbone,loss_kind,reads", [
    ("marginal", "frozen", "hinge", "encoder"), ("posterior", "frozen", "hinge", "encoder"),
    ("marginal", "lora", "logistic", "encoder"), ("marginal", "lora", "logistic", "network")])
def test_each_loss_reaches_only_its_own_parameters(sd_teacher, previous_sample, backbone, loss_kind, reads):
    """The trainer's order with real backward passes: generator loss first, then the discriminator's; with a frozen
    teacher encoder under the heads, or an encoder (or the whole network) trained through a LoRA adapter of its own on
    the same UNet."""
    method, conditioner = make_method(sd_teacher, previous_sample=previous_sample, reconstruction_weight=0.0,
                                      discriminator_backbone=backbone, adversarial_loss=loss_kind,
                                      discriminator_reads=reads)
    move_off_teacher(method)
    groups = method.trainable()
    assert list(groups) == ["unet", "discriminator"]
    lora, discriminator = groups["unet"], groups["discriminator"]
    unet = getattr(method.nets["unet"], "unet", method.nets["unet"])  # the shared UNet behind an AdapterView
    teacher_weights = [p for n, p in unet.named_parameters() if "lora" not in n]
    assert all("lora" in n for n, p in method.nets["unet"].named_parameters() if p.requires_grad)
    assert {id(p) for p in discriminator} == {id(p) for p in method.nets["discriminator"].parameters()}
    assert {id(p) for p in discriminator}.isdisjoint(id(p) for p in lora)
    backbone_weights = [n for n, p in method.nets["discriminator"].named_parameters() if "lora" in n]
    if backbone == "frozen":
        assert backbone_weights == []
    elif reads == "encoder":  # the discriminator's adapter covers the encoder (down and mid blocks) only
        assert 0 < len(backbone_weights) < len(lora)
        assert all(n.startswith(("backbone.down_blocks.", "backbone.mid_block.")) for n in backbone_weights)
    else:  # the whole network: the adapter covers every module the student's does
        assert len(backbone_weights) == len(lora)
        assert any(n.startswith("backbone.up_blocks.") for n in backbone_weights)
    losses = method.loss(make_batch(conditioner), 0)

    # The adversarial term alone (no reconstruction) reaches the LoRA through the discriminator's encoder ...
    losses["unet"].backward()
    assert sum(p.grad.abs().sum().item() for p in lora if p.grad is not None) > 0
    # ... but neither the discriminator (heads, and its encoder adapter) nor the teacher's own weights.
    assert all(p.grad is None for p in discriminator)
    assert all(p.grad is None for p in teacher_weights)
    for p in lora:
        p.grad = None
    losses["discriminator"].backward()
    assert all(p.grad is None for p in lora) and all(p.grad is None for p in teacher_weights)
    assert all(p.grad is not None for p in discriminator)
    assert sum(p.grad.abs().sum().item() for p in discriminator) > 0
    if backbone == "lora":  # the backbone itself learns (its B matrices start at zero; their gradient does not)
        assert all(p.grad.abs().sum().item() > 0 for n, p in method.nets["discriminator"].named_parameters()
                   if "lora_B" in n)


@pytest.mark.parametrize("reads", ["encoder", "network"])
def test_zero_initialised_heads_start_every_logit_at_zero_and_learn_from_their_last_layer(sd_teacher, reads):
    """--discriminator_zero_init: each head's last convolution starts at zero, so every logit is exactly 0, the
    generator's first adversarial gradient is zero (d logit / d feature is the zero layer), and the discriminator's
    first gradient reaches that layer's weights alone (the layers under it sit behind the zero weights)."""
    method, conditioner = make_method(sd_teacher, reconstruction_weight=0.0, discriminator_zero_init=True,
                                      discriminator_reads=reads, adversarial_loss="logistic")
    move_off_teacher(method)
    discriminator = method.nets["discriminator"]
    heads = discriminator.heads
    last_layers = [head.layers[-1] for head in heads.heads]
    assert all(layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0 for layer in last_layers)
    features = [torch.randn(2, c, 4, 4) for c in feature_channels(method.teacher.unet.config, reads == "network")]
    assert all(torch.equal(logits, torch.zeros_like(logits)) for logits in heads(features))

    losses = method.loss(make_batch(conditioner), 0)
    losses["unet"].backward()
    lora = method.trainable()["unet"]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lora)
    losses["discriminator"].backward()
    # (the last layer's bias is not asked to move: at logit 0, real and fake rows pull it equally and oppositely)
    last_weights = {id(layer.weight) for layer in last_layers}
    last_biases = {id(layer.bias) for layer in last_layers}
    for p in heads.parameters():
        if id(p) not in last_biases:
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (id(p) in last_weights)

    default_heads, _ = make_method(sd_teacher, discriminator_reads=reads)
    assert all(head.layers[-1].weight.abs().sum() > 0 for head in default_heads.nets["discriminator"].heads.heads)


def test_the_whole_network_features_end_in_what_the_unet_outputs(sd_teacher):
    """--discriminator_reads network: one full forward gives the encoder's feature maps (equal to the encoder-only
    pass) and the up blocks' outputs, the last of which the UNet's output layers turn into its own prediction."""
    method, conditioner = make_method(sd_teacher)
    unet = getattr(method.nets["unet"], "unet", method.nets["unet"])
    batch = make_batch(conditioner)
    x, t, kwargs = batch.latents, torch.tensor([999, 300]), batch.cond.unet_kwargs()
    with torch.no_grad():
        unet.disable_adapters()
        encoder = unet_encoder_features(unet, x, t, **kwargs)
        features = whole_network_features(unet, x, t, **kwargs)
        output = unet(x, t, **kwargs).sample
        unet.enable_adapters()
    channels = feature_channels(unet.config, whole_network=True)
    assert len(features) == len(encoder) + len(unet.up_blocks) == len(channels)
    assert [f.shape[1] for f in features] == channels and features[-1].shape[-2:] == x.shape[-2:]
    torch.testing.assert_close(features[:len(encoder)], encoder, rtol=0, atol=0)
    last = unet.conv_out(unet.conv_act(unet.conv_norm_out(features[-1])))
    torch.testing.assert_close(last, output, rtol=0, atol=0)


@pytest.mark.parametrize("beta1", [None, 0.0])
def test_the_discriminator_gets_its_own_adam_beta1(sd_teacher, beta1):
    """--discriminator_adam_beta1 sets the discriminator's AdamW beta1 alone (the reference code's Adam(0, 0.999));
    unset, both optimizers take --adam_beta1."""
    from distill.optimizers import build_optimizers
    from distill.train_config import TrainConfig

    method, _ = make_method(sd_teacher, discriminator_adam_beta1=beta1)
    cfg = TrainConfig(adam_beta1=0.8, adam_beta2=0.99)
    optimizers, _ = build_optimizers(method.trainable(), method, cfg, total_batch=1, max_steps=2, num_processes=1)
    assert optimizers["unet"].param_groups[0]["betas"] == (0.8, 0.99)
    assert optimizers["discriminator"].param_groups[0]["betas"] == (0.8 if beta1 is None else beta1, 0.99)


@pytest.mark.parametrize("backbone", ["lora", "frozen"])
def test_the_discriminator_trains_on_every_nth_step_only(sd_teacher, backbone):
    """--discriminator_update_interval 2 (the reference code's cadence): on even steps both losses, with D run on real
    and fake; on odd steps the generator's loss alone, equal to the even step's generator loss on the same draw, and
    D run once (the generator's frozen read of the fake)."""
    method, conditioner = make_method(sd_teacher, discriminator_update_interval=2, discriminator_backbone=backbone,
                                      adversarial_loss="logistic")
    move_off_teacher(method)
    batch = make_batch(conditioner)
    calls = []
    method.nets["discriminator"].register_forward_hook(lambda module, args, output: calls.append(args[0]))

    def losses_at(step):
        calls.clear()
        torch.manual_seed(7)
        return method.loss(batch, step), [len(x) if torch.is_tensor(x) else len(x[0]) for x in calls]

    trained, trained_calls = losses_at(0)
    skipped, skipped_calls = losses_at(1)
    assert set(trained) == {"unet", "discriminator"} and set(skipped) == {"unet"}
    assert trained_calls == [2, 4] and skipped_calls == [2]  # the fake batch, then real + fake; the fake only
    torch.testing.assert_close(skipped["unet"], trained["unet"])
    assert set(losses_at(2)[0]) == {"unet", "discriminator"}


def test_training_moves_the_student_and_the_heads_but_not_the_teacher(sd_teacher):
    method, conditioner = make_method(sd_teacher)
    batch = make_batch(conditioner)
    optimizers = {name: torch.optim.AdamW(params, lr=1e-2) for name, params in method.trainable().items()}
    probe_x, probe_t = torch.randn(2, 4, 16, 16), torch.tensor([999, 400])
    heads_before = [p.detach().clone() for p in method.trainable()["discriminator"]]
    with torch.no_grad():
        with method.denoiser().as_teacher() as teacher:
            teacher_before, _ = teacher(probe_x, probe_t, batch.cond)
        student_before = method.generate(probe_x, probe_t, batch.cond)
    torch.testing.assert_close(student_before, teacher_before)  # LoRA B starts at zero: G starts as the teacher

    for step in range(2):
        losses = method.loss(batch, step)
        assert all(loss.ndim == 0 and torch.isfinite(loss) for loss in losses.values())
        for name, loss in losses.items():
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

    with torch.no_grad():
        with method.denoiser().as_teacher() as teacher:
            teacher_after, _ = teacher(probe_x, probe_t, batch.cond)
        student_after = method.generate(probe_x, probe_t, batch.cond)
    torch.testing.assert_close(teacher_after, teacher_before)
    assert (student_after - teacher_before).abs().max() > 1e-4
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, method.trainable()["discriminator"]))


def test_ema_of_the_generator_is_what_is_exported(sd_teacher):
    """--use_ema with the trained discriminator encoder on the same UNet: the exported UNet carries the average of
    the generator's adapter, and the live weights of everything else (the discriminator's adapter included)."""
    method, conditioner = make_method(sd_teacher, discriminator_backbone="lora", use_ema=True, ema_decay=0.5)
    batch = make_batch(conditioner)
    optimizers = {name: torch.optim.AdamW(params, lr=1e-2) for name, params in method.trainable().items()}
    for step in range(3):
        for name, loss in method.loss(batch, step).items():
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        method.on_step_end(step)
    live_unet = method.nets["unet"].unet
    live = dict(live_unet.named_parameters())
    generator_names = [name for name, _ in method.nets["unet"].named_parameters()]
    averaged = dict(method.student_unet().named_parameters())
    assert method.student_unet() is not live_unet
    for name, shadow in zip(generator_names, method.ema.average.shadow_params):
        assert torch.equal(averaged[name], shadow)
    assert any(not torch.equal(averaged[name], live[name]) for name in generator_names)
    others = [name for name in live if name not in generator_names]
    assert any(".discriminator." in name for name in others)
    assert all(torch.equal(averaged[name], live[name]) for name in others)
    assert method.checkpoint_objects() == [method.ema.average]


def test_ema_without_warm_up_averages_at_the_set_decay_from_the_second_update(sd_teacher):
    """--no_ema_warmup (the UFOGen reference's EMA): the first update copies the weights, every later one averages at
    exactly --ema_decay, theta_ema <- d theta_ema + (1 - d) theta; with the warm-up, update n averages at
    min(d, n / (9 + n)) (diffusers' EMAModel)."""
    for warmup in (False, True):
        method, conditioner = make_method(sd_teacher, use_ema=True, ema_decay=0.9, ema_warmup=warmup)
        batch = make_batch(conditioner)
        optimizers = {name: torch.optim.AdamW(params, lr=1e-2) for name, params in method.trainable().items()}
        expected = None
        for step in range(3):
            for name, loss in method.loss(batch, step).items():
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
            live = [p.detach().clone() for p in method.lora_params]
            decay = 0.0 if step == 0 else min(0.9, (1 + step) / (10 + step)) if warmup else 0.9
            expected = live if expected is None else [decay * e + (1 - decay) * w for e, w in zip(expected, live)]
            method.on_step_end(step)
            for shadow, want in zip(method.ema.average.shadow_params, expected):
                torch.testing.assert_close(shadow, want, rtol=0, atol=1e-6)
        assert method.ema.average.cur_decay_value == pytest.approx(3 / 12 if warmup else 0.9)


# ------------------------------------------------------------------------------------------ the math against oracles


def test_posterior_is_diffusers_ddpm_step_over_the_large_gap(sd_teacher):
    """q(x_{t-1} | x_t, x0) with t-1 = t - T/K: diffusers' DDPMScheduler step (x0 prediction, fixed_small variance)."""
    method, _ = make_method(sd_teacher, previous_sample="posterior")
    config = DDPMScheduler.load_config(sd_teacher, subfolder="scheduler")
    ddpm = DDPMScheduler.from_config(config, prediction_type="sample", clip_sample=False,
                                     variance_type="fixed_small")
    chain = method.chain_timesteps(4)
    ddpm.set_timesteps(timesteps=chain.tolist())
    torch.manual_seed(0)
    x0, x_t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t, t_prev in zip(chain[:-1], chain[1:]):
        expected = ddpm.step(x0, int(t), x_t, generator=torch.Generator().manual_seed(3)).prev_sample
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
        ours = method.previous_sample(x0, x_t, t.view(1), t_prev.view(1), noise)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # Adjacent steps: Ho et al.'s beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
    _, variance = posterior_mean_variance(method.teacher.schedule, x0, x_t, torch.tensor([0]), torch.tensor([1]))
    abar = ddpm.alphas_cumprod
    torch.testing.assert_close(variance.flatten()[0], (1 - abar[0]) / (1 - abar[1]) * ddpm.betas[1])


def test_timesteps_are_one_large_step_apart(sd_teacher):
    method, _ = make_method(sd_teacher, num_denoising_steps=2)
    torch.manual_seed(0)
    t, t_prev = method.sample_timesteps(4096, "cpu")
    assert t.min() >= 1 and t.max() <= 999 and t.max() >= 990
    torch.testing.assert_close(t_prev, (t - 500).clamp(min=0))
    assert method.chain_timesteps(2).tolist() == [999, 499] and method.chain_timesteps(1).tolist() == [999]


def test_chain_timesteps_train_each_step_the_sampler_takes(sd_teacher):
    """--timestep_sampling chain: t is one of the K points the exported sampler visits, each about equally often, and
    t-1 is the next point of that chain (the last one's is 0, the clean sample)."""
    method, _ = make_method(sd_teacher, timestep_sampling="chain")
    torch.manual_seed(0)
    t, t_prev = method.sample_timesteps(4000, "cpu")
    chain = method.chain_timesteps(4).tolist()
    assert chain == [999, 749, 499, 249]
    counts = {point: int((t == point).sum()) for point in chain}
    assert sum(counts.values()) == 4000 and all(900 < count < 1100 for count in counts.values())
    following = dict(zip(chain, chain[1:] + [0]))
    assert all(following[int(a)] == int(b) for a, b in zip(t, t_prev))


def test_noise_input_rows_read_pure_noise_at_the_one_step_samplers_timestep(sd_teacher):
    """--noise_input_fraction 0.25: a quarter of the rows sit at t = T-1 (the one-step sampler's) with t-1 = T-1 - T/K
    and read x_T = eps, so they do not depend on x0; every other row is x_t ~ q(x_t | x0), which at t = T-1 still
    carries sqrt(abar_{T-1}) x0. Fraction 0 draws exactly the inputs and timesteps UFOGen draws."""
    x0 = torch.randn(8, 4, 8, 8)
    inputs = {}
    for fraction in (0.0, 0.25):
        method, _ = make_method(sd_teacher, noise_input_fraction=fraction)
        for scale in (1.0, 2.0):
            torch.manual_seed(0)
            inputs[fraction, scale] = method.generator_inputs(x0 * scale)
    x_t, t, t_prev = inputs[0.25, 1.0]
    assert t[:2].tolist() == [999, 999] and t_prev[:2].tolist() == [749, 749]
    torch.testing.assert_close(x_t[:2], inputs[0.25, 2.0][0][:2], rtol=0, atol=0)
    torch.manual_seed(0)
    method.sample_timesteps(8, "cpu")
    torch.testing.assert_close(x_t[:2], torch.randn_like(x0)[:2], rtol=0, atol=0)
    torch.testing.assert_close(x_t[2:], inputs[0.0, 1.0][0][2:], rtol=0, atol=0)
    assert torch.equal(t[2:], inputs[0.0, 1.0][1][2:])
    for fraction in (0.0, 0.25):  # every diffused row moves with x0: (x_t(2 x0) - x_t(x0)) = alpha_t x0
        rows = slice(round(fraction * 8), 8)
        x_a, t_a, _ = inputs[fraction, 1.0]
        x_b = inputs[fraction, 2.0][0]
        alpha = method.teacher.schedule.alpha(t_a[rows], x0)
        torch.testing.assert_close(x_b[rows] - x_a[rows], alpha * x0[rows], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    t_ufogen, t_prev_ufogen = method.sample_timesteps(8, "cpu")
    assert torch.equal(inputs[0.0, 1.0][1], t_ufogen) and torch.equal(inputs[0.0, 1.0][2], t_prev_ufogen)


def test_noise_input_rows_can_be_judged_at_any_lower_noise_level(sd_teacher):
    """--noise_input_previous_timestep uniform: the pure-noise rows keep t = T-1 and their input, and their t-1 is
    drawn on {0, ..., T-1 - T/K}, spread over all of it; the other rows keep t-1 = t - T/K (clamped at 0)."""
    x0 = torch.randn(64, 4, 4, 4)
    chain, _ = make_method(sd_teacher, noise_input_fraction=0.5)
    uniform, _ = make_method(sd_teacher, noise_input_fraction=0.5, noise_input_previous_timestep="uniform")
    torch.manual_seed(0)
    x_chain, t_chain, _ = chain.generator_inputs(x0)
    draws = []
    for seed in range(20):
        torch.manual_seed(seed)
        x_t, t, t_prev = uniform.generator_inputs(x0)
        if seed == 0:
            torch.testing.assert_close(x_t, x_chain, rtol=0, atol=0)
            assert torch.equal(t, t_chain)
        assert (t[:32] == 999).all()
        assert torch.equal(t_prev[32:], (t[32:] - 250).clamp(min=0))
        draws.append(t_prev[:32])
    judged = torch.cat(draws)
    assert 0 <= judged.min() < 25 and 725 < judged.max() <= 749 and len(judged.unique()) > 400


def test_exported_scheduler_samples_the_training_generator(teacher):
    """The stock pipeline with the exported scheduler returns exactly UFOGen's sample from the same noise: at one step
    the generator's x0' = G(x_T, T), with 2 and 4 steps the chain that re-noises x0' to the next t with fresh noise."""
    from diffusers import AutoencoderKL

    method, conditioner = make_method(teacher)
    move_off_teacher(method)
    defaults = method.export_defaults()
    assert defaults.num_inference_steps == 1 and defaults.guidance_scale == 1.0
    scheduler = student_scheduler(DDPMScheduler.load_config(teacher, subfolder="scheduler"), defaults)
    assert isinstance(scheduler, LCMScheduler)
    vae = AutoencoderKL.from_pretrained(teacher, subfolder="vae")
    pipe = student_pipeline(method.teacher.info, method.student_unet(), vae, conditioner, scheduler)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = conditioner.encode([PROMPT])
    for steps in (1, 2, 4):
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == method.chain_timesteps(steps).tolist()
        latents = pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0, height=32, width=32,
                       latents=noise.clone(), generator=torch.Generator().manual_seed(1), output_type="latent").images
        expected = method.sample(noise, cond, method.chain_timesteps(steps), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
        if steps == 1:
            with torch.no_grad():
                torch.testing.assert_close(latents, method.generate(noise, torch.tensor([999]), cond), rtol=1e-5,
                                           atol=1e-5)


def test_bad_method_config():
    with pytest.raises(DistillError, match="num_denoising_steps"):
        UFOGenConfig(num_denoising_steps=0)
    with pytest.raises(DistillError, match="previous_sample"):
        UFOGenConfig(previous_sample="ancestral")
    with pytest.raises(DistillError, match="both 0"):
        UFOGenConfig(adversarial_weight=0.0, reconstruction_weight=0.0)
    with pytest.raises(DistillError, match="adversarial_weight"):
        UFOGenConfig(adversarial_weight=-1.0)
    with pytest.raises(DistillError, match="--adversarial_loss"):
        UFOGenConfig(adversarial_loss="wasserstein")
    with pytest.raises(DistillError, match="--discriminator_backbone"):
        UFOGenConfig(discriminator_backbone="full")
    with pytest.raises(DistillError, match="--discriminator_adam_beta1"):
        UFOGenConfig(discriminator_adam_beta1=1.0)
    with pytest.raises(DistillError, match="--timestep_sampling"):
        UFOGenConfig(timestep_sampling="logit_normal")
    with pytest.raises(DistillError, match="--discriminator_update_interval"):
        UFOGenConfig(discriminator_update_interval=0)
    with pytest.raises(DistillError, match="--discriminator_reads"):
        UFOGenConfig(discriminator_reads="decoder")
    with pytest.raises(DistillError, match="--ema_decay"):
        UFOGenConfig(ema_decay=1.0)
    with pytest.raises(DistillError, match="--noise_input_fraction"):
        UFOGenConfig(noise_input_fraction=1.5)
    with pytest.raises(DistillError, match="--noise_input_previous_timestep"):
        UFOGenConfig(noise_input_previous_timestep="any")


# ------------------------------------------------------------------------------------------ as a user runs it

FLAGS = ["--train_batch_size", "2", "--lora_rank", "4", "--seed", "0", "--validation_steps", "0",
         "--report_to", "none", "--checkpointing_steps", "3", "--max_train_steps", "3", "--learning_rate", "1e-3"]


def run(argv: list[str], cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600,
                          env=subprocess_env(**env), cwd=cwd)


def tail(result: subprocess.CompletedProcess, lines: int = 30) -> str:
    return "\n".join(result.stderr.replace("\r", "\n").splitlines()[-lines:])


LOADING = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    teacher, out, family, prompt, dest = sys.argv[1:6]
    images = {}

    def sample(pipe, steps, **kwargs):
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        return pipe(prompt, height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs).images

    stock = (StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline).from_pretrained(teacher)
    stock.set_progress_bar_config(disable=True)
    stock.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    images["teacher_1"] = sample(stock, 1, guidance_scale=1.0)
    stock.load_lora_weights(out)
    for steps in (1, 2, 4):
        images[f"stock_{steps}"] = sample(stock, steps, guidance_scale=1.0)
    folder = DiffusionPipeline.from_pretrained(out + "/pipeline", trust_remote_code=True)
    folder.set_progress_bar_config(disable=True)
    for steps in (None, 1, 2, 4):
        images[f"folder_{steps}"] = sample(folder, steps)
    try:
        sample(folder, 5)
        too_many = ""
    except ValueError as error:
        too_many = str(error)
    np.savez(dest + "/images.npz", **images)
    print(json.dumps({
        "class": type(folder).__name__,
        "scheduler": type(folder.scheduler).__name__,
        "default_num_inference_steps": folder.config.default_num_inference_steps,
        "default_guidance_scale": folder.config.default_guidance_scale,
        "distill_imported": sorted(m for m in sys.modules if m == "distill" or m.startswith("distill.")),
        "too_many": too_many,
    }))
""")


@dataclass
class UFOGenRun:
    family: str
    out: Path
    train: subprocess.CompletedProcess
    load: subprocess.CompletedProcess
    cwd: Path


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def ufogen_run(request, tmp_path_factory, image_folder) -> UFOGenRun:
    """3 training steps on the tiny teacher, then both exports loaded in a fresh process outside the repository."""
    family = request.param
    teacher = request.getfixturevalue(f"{family}_teacher")
    out = tmp_path_factory.mktemp(f"ufogen-{family}") / "out"
    train = run([str(SCRIPT), "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(image_folder),
                 "--output_dir", str(out), *FLAGS])
    cwd = tmp_path_factory.mktemp(f"ufogen-load-{family}")
    load = run(["-c", LOADING, str(teacher), str(out), family, PROMPT, str(cwd)], cwd=cwd,
               HF_MODULES_CACHE=str(cwd / "hf_modules"))
    return UFOGenRun(family, out, train, load, cwd)


def test_command_line_trains_both_networks_and_exports(ufogen_run):
    assert ufogen_run.train.returncode == 0, tail(ufogen_run.train)
    out = ufogen_run.out
    assert "loss/discriminator=" in ufogen_run.train.stderr and "loss/unet=" in ufogen_run.train.stderr
    checkpoint = out / "checkpoint-3"
    assert {"unet_trainable.safetensors", "discriminator_trainable.safetensors"} <= {p.name for p in
                                                                                    checkpoint.iterdir()}
    discriminator = load_file(checkpoint / "discriminator_trainable.safetensors")
    backbone = [key for key in discriminator if key.startswith("backbone.")]  # its encoder adapter, B trained off 0
    assert any(key.startswith("heads.") for key in discriminator)
    assert backbone and all(".discriminator." in key and key.startswith(("backbone.down_blocks.", "backbone.mid_block."))
                            for key in backbone)
    assert set(backbone) | {key for key in discriminator if key.startswith("heads.")} == set(discriminator)
    assert any(discriminator[key].abs().max() > 0 for key in backbone if "lora_B" in key)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(key.startswith("unet.") and "lora" in key for key in lora)
    assert not any("discriminator" in key for key in lora)  # the export holds the generator's adapter alone
    assert any(value.abs().max() > 0 for key, value in lora.items() if "lora_B" in key)  # trained off zero
    sampling = json.loads((out / "distill_config.json").read_text())["sampling"]
    assert sampling == {"scheduler": "LCMScheduler", "num_inference_steps": 1, "guidance_scale": 1.0}
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["original_inference_steps"] == 4 and scheduler["timestep_scaling"] == 1e6
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    card = (out / "README.md").read_text()
    assert "UFOGen" in card and "num_inference_steps=1" in card and "| num_denoising_steps | 4 |" in card


def test_students_load_in_a_fresh_process_and_agree(ufogen_run):
    assert ufogen_run.train.returncode == 0, tail(ufogen_run.train)
    assert ufogen_run.load.returncode == 0, tail(ufogen_run.load)
    report = json.loads(ufogen_run.load.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("FewStep") and report["scheduler"] == "LCMScheduler"
    assert report["default_num_inference_steps"] == 1 and report["default_guidance_scale"] == 1.0
    assert report["distill_imported"] == []
    assert "num_inference_steps" in report["too_many"]  # only the trained K-point chain can be sampled
    images = np.load(ufogen_run.cwd / "images.npz")
    for key in images.files:
        assert images[key].shape == (1, 32, 32, 3) and np.isfinite(images[key]).all(), key
    # The self-contained folder samples one step by default, and what the stock pipeline + LoRA samples.
    np.testing.assert_array_equal(images["folder_None"], images["folder_1"])
    for steps in (1, 2, 4):
        np.testing.assert_allclose(images[f"folder_{steps}"], images[f"stock_{steps}"], rtol=0, atol=1e-3)
    assert np.abs(images["stock_1"] - images["teacher_1"]).max() > 1e-3  # the LoRA changed the one-step sample
    assert np.abs(images["stock_1"] - images["stock_2"]).max() > 1e-3


@pytest.mark.parametrize("flags, message", [
    (["--previous_sample", "ancestral"], "--previous_sample must be marginal"),
    (["--adversarial_weight", "0", "--reconstruction_weight", "0"], "both 0"),
    (["--discriminator_backbone", "full"], "--discriminator_backbone must be frozen or lora"),
])
def test_bad_flags_exit_2_with_one_error_line(sd_teacher, image_folder, tmp_path, flags, message):
    result = run([str(SCRIPT), "--pretrained_teacher_model", str(sd_teacher), "--train_data_dir", str(image_folder),
                  "--output_dir", str(tmp_path / "out"), *flags])
    assert result.returncode == 2, tail(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
