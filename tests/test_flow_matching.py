"""Flow-matching teachers (SD3/SD3.5): the schedule, its solver and the exported few-step scheduler, checked by oracles.

x_t = (1 - sigma_t) x0 + sigma_t eps with velocity v = eps - x0 (Rectified Flow; SD3). A model that returns the true
velocity makes every first-order (Euler) step land exactly on the interpolant, so the training solver, diffusers'
own FlowMatchEulerDiscreteScheduler and the shipped FlowFewStepScheduler can each be checked against the known line.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from distill.export import student_scheduler
from distill.families import SD3
from distill.lora import add_lora, kohya_module_names
from distill.methods import METHODS
from distill.pipelines.scheduler_flow import FlowFewStepScheduler
from distill.renoising import chain_timesteps
from distill.schedule import (FlowMatchingSchedule, consistency_boundary_scalings, ddim_timesteps, diffuse_between,
                              phase_edges, posterior_mean_variance)
from distill.solvers import ddim_step
from distill.testing import method_on_teacher, tiny_flux_transformer, tiny_sd3_transformer

SHIFT = 3.0


@pytest.fixture(scope="module")
def schedule() -> FlowMatchingSchedule:
    return FlowMatchingSchedule.from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=SHIFT).config)


def known_line(seed: int = 0, batch: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=generator), torch.randn(batch, 4, 8, 8, generator=generator)


def test_the_table_is_the_teachers_shifted_sigmas(schedule):
    """t = 0..999 holds the sigma of diffusers' training timestep t + 1; the transformer is called with sigma * 1000."""
    reference = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    torch.testing.assert_close(schedule.sigmas, reference.sigmas.flip(0))
    torch.testing.assert_close(schedule.alphas + schedule.sigmas, torch.ones(1000))
    assert float(schedule.sigmas[-1]) == 1.0 and float(schedule.alphas[-1]) == 0.0
    s = torch.tensor([0.25, 0.5, 0.75])  # sigma = shift s / (1 + (shift - 1) s) (SD3 eq. 23)
    torch.testing.assert_close(schedule.sigmas[(s * 1000).long() - 1], SHIFT * s / (1 + (SHIFT - 1) * s))
    t = torch.tensor([999, 500, 0])
    torch.testing.assert_close(schedule.network_timestep(t), reference.timesteps.flip(0)[t])


def test_the_true_velocity_gives_back_x0_and_eps(schedule):
    x0, eps = known_line()
    t = torch.tensor([999, 400, 3])
    x_t = schedule.add_noise(x0, eps, t)
    x0_hat, eps_hat = schedule.to_x0_eps(eps - x0, x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_an_euler_step_of_the_true_velocity_lands_on_the_interpolant(schedule):
    """The training solver (DDIM eq. 12 on the flow path) and diffusers' Euler step agree, and both land on the line."""
    x0, eps = known_line()
    t, t_prev = torch.tensor([999, 600, 250]), torch.tensor([799, 250, -1])
    x_t = schedule.add_noise(x0, eps, t)
    x0_hat, eps_hat = schedule.to_x0_eps(eps - x0, x_t, t)
    landed = ddim_step(schedule, x0_hat, eps_hat, t_prev)
    torch.testing.assert_close(landed[:2], schedule.add_noise(x0[:2], eps[:2], t_prev[:2]))
    torch.testing.assert_close(landed[2], x0[2])  # t = -1: the clean end

    euler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # set_timesteps shifts given sigmas: these are shifted already
    sigma, sigma_prev = schedule.sigmas[t[:2]], schedule.sigmas[t_prev[:2]]
    euler.set_timesteps(sigmas=[float(sigma[0]), float(sigma_prev[0])])
    stepped = euler.step(eps[:1] - x0[:1], euler.timesteps[0], x_t[:1]).prev_sample
    torch.testing.assert_close(stepped, landed[:1], atol=1e-5, rtol=1e-5)


def test_transition_and_posterior_are_the_conditional_gaussians_of_the_path(schedule):
    """q(x_t | x_s) composes with q(x_s | x0) into q(x_t | x0); q(x_s | x_t, x0) is the conditional Gaussian of the
    joint (x_s, x_t) given x0, with Cov = a_{t|s} sigma_s^2 (VDM, Kingma et al. 2021, app. A)."""
    s, t = torch.tensor([100, 480]), torch.tensor([700, 999])
    like = torch.zeros(2, 1, 1, 1)
    a, variance = schedule.transition(s, t, like)
    alpha_s, sigma_s = schedule.alpha(s, like), schedule.sigma(s, like)
    alpha_t, sigma_t = schedule.alpha(t, like), schedule.sigma(t, like)
    torch.testing.assert_close(a * alpha_s, alpha_t)
    torch.testing.assert_close(a**2 * sigma_s**2 + variance, sigma_t**2)
    x0, eps = known_line(batch=2)
    torch.testing.assert_close(diffuse_between(schedule, schedule.add_noise(x0, eps, s), torch.zeros_like(x0), s, t),
                               alpha_t * x0 + a * sigma_s * eps)

    x_t = schedule.add_noise(x0, eps, t)
    mean, posterior_variance = posterior_mean_variance(schedule, x0, x_t, s, t)
    covariance = a * sigma_s**2
    torch.testing.assert_close(mean, alpha_s * x0 + covariance / sigma_t**2 * (x_t - alpha_t * x0))
    torch.testing.assert_close(posterior_variance, sigma_s**2 - covariance**2 / sigma_t**2)


# ------------------------------------------------------------------------------------------ the exported scheduler


def flow_scheduler(**settings) -> FlowFewStepScheduler:
    return FlowFewStepScheduler(shift=SHIFT, **settings)


def test_ode_sampler_of_the_true_velocity_lands_on_the_line_at_every_step(schedule):
    x0, eps = known_line(batch=1)
    for spacing, settings in (("trailing", {"original_inference_steps": 1000}), ("phases", {})):
        scheduler = flow_scheduler(sampler="ode", timestep_spacing=spacing, **settings)
        scheduler.set_timesteps(4)
        sample = schedule.add_noise(x0, eps, scheduler.train_timesteps[:1])
        for timestep, t_next in zip(scheduler.timesteps, scheduler.next_train_timesteps):
            sample = scheduler.step(eps - x0, timestep, sample).prev_sample
            expected = x0 if t_next < 0 else schedule.add_noise(x0, eps, t_next.view(1))
            torch.testing.assert_close(sample, expected, atol=1e-5, rtol=1e-5)


def test_scheduler_grids_are_the_training_grids():
    """LCM's skipping grid, PCM's phase edges, DDIM's trailing spacing and the x0 chain of UFOGen/DMD2."""
    lcm = flow_scheduler(sampler="consistency", timestep_spacing="lcm")
    lcm.set_timesteps(4)
    assert lcm.train_timesteps.tolist() == [999, 759, 499, 259]
    assert set(lcm.train_timesteps.tolist()) <= set(ddim_timesteps(1000, 50).tolist())
    phases = flow_scheduler(sampler="ode", timestep_spacing="phases")
    phases.set_timesteps(4)
    edges = phase_edges(1000, 50, 4)
    assert phases.train_timesteps.tolist() == edges[1:].flip(0).tolist()
    assert phases.next_train_timesteps.tolist() == edges[:-1].flip(0).tolist()
    trailing = flow_scheduler(sampler="ode", timestep_spacing="trailing", original_inference_steps=1000)
    trailing.set_timesteps(4)
    assert trailing.train_timesteps.tolist() == [999, 749, 499, 249]
    chain = flow_scheduler(sampler="consistency", timestep_spacing="lcm", original_inference_steps=4)
    for steps in (1, 2, 4):
        chain.set_timesteps(steps)
        assert chain.train_timesteps.tolist() == chain_timesteps(1000, 4, steps).tolist()


def test_consistency_step_is_the_trained_consistency_function(schedule):
    """denoised = c_skip x_t + c_out x0 with LCM's boundary scalings, then re-noised to the next point with the
    generator's noise; the transformer is called with sigma_t * 1000 of each grid point."""
    scheduler = flow_scheduler(sampler="consistency", timestep_spacing="lcm", timestep_scaling=10.0)
    scheduler.set_timesteps(2)
    torch.testing.assert_close(scheduler.timesteps, schedule.network_timestep(scheduler.train_timesteps))
    generator = torch.Generator().manual_seed(3)
    sample, velocity = known_line(batch=1)
    out = scheduler.step(velocity, scheduler.timesteps[0], sample, generator=generator)
    t = scheduler.train_timesteps[:1]
    x0, _ = schedule.to_x0_eps(velocity, sample, t)
    c_skip, c_out = consistency_boundary_scalings(t)
    denoised = c_skip.view(-1, 1, 1, 1) * sample + c_out.view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(out.denoised, denoised)
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.prev_sample, schedule.add_noise(denoised, noise, scheduler.train_timesteps[1:]))
    last = scheduler.step(velocity, scheduler.timesteps[1], out.prev_sample)
    torch.testing.assert_close(last.prev_sample, last.denoised)  # the last step returns the denoised sample


# ------------------------------------------------------------------------------------------ methods on SD3


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_samples_on_the_grid_it_trains_on(request, family, name):
    """The exported scheduler holds the training sigmas (FLUX.1: with the training resolution's shift) and steps on
    the method's own grid."""
    cls = METHODS[name]
    method, loaded = method_on_teacher(cls, cls.Config(lora_rank=4), request.getfixturevalue(f"{family}_teacher"), 32)
    spec = method.sampling()
    assert spec.scheduler == "FlowFewStepScheduler"
    scheduler = student_scheduler(loaded.scheduler_config, spec)
    assert isinstance(scheduler, FlowFewStepScheduler) and scheduler.config.shift == SHIFT
    torch.testing.assert_close(scheduler.training_sigmas, loaded.schedule.sigmas, rtol=0, atol=0)
    scheduler.set_timesteps(spec.num_inference_steps)
    if name == "lcm":
        assert set(scheduler.train_timesteps.tolist()) <= set(method.grid.tolist())
    elif name == "pcm":
        assert scheduler.train_timesteps.tolist() == method.edges[1:].flip(0).tolist()
    elif name == "dmd2":
        assert scheduler.train_timesteps.tolist() == method.timesteps.tolist()
    elif name == "ufogen":
        assert scheduler.train_timesteps.tolist() == method.chain_timesteps(spec.num_inference_steps).tolist()
    else:  # one-step (SwiftBrush) or phased (rectified) students start from pure noise, sigma = 1
        assert int(scheduler.train_timesteps[0]) == 999 and float(scheduler.timesteps[0]) == 1000.0


def test_the_conditioner_builds_the_sd3_pipelines_embeddings(sd3_teacher):
    """The training condition equals StableDiffusion3Pipeline.encode_prompt's (CLIP-L | CLIP-G | pad ; T5, pooled)."""
    from diffusers import StableDiffusion3Pipeline

    from distill.teacher import inspect_teacher, load_teacher

    loaded = load_teacher(inspect_teacher(str(sd3_teacher)), 32)
    prompts = ["a photo of three", "seven"]
    cond = loaded.conditioner.encode(prompts)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_teacher)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                              max_sequence_length=256)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled)
    assert cond.prompt_embeds.shape[1] == 77 + 256 and cond.time_ids is None
    assert set(cond.unet_kwargs()) == {"encoder_hidden_states", "pooled_projections"}


def test_kohya_names_are_the_ones_comfyui_maps_for_flux():
    """FLUX.1: lora_transformer_<diffusers path>; ComfyUI's FLUX key map (flux_to_diffusers) covers every double-stream
    target and the single-stream blocks' q, k, v (slices of their fused linear1)."""
    from distill.families import FLUX
    from distill.testing import tiny_flux_transformer

    transformer = tiny_flux_transformer()
    add_lora(transformer, FLUX.lora_target_modules, rank=4)
    names = kohya_module_names(transformer, "flux")
    singles = {path.split(".", 2)[2] for path in names if path.startswith("single_transformer_blocks.")}
    assert singles == {"attn.to_q", "attn.to_k", "attn.to_v"} and len(names) == 12 + 3
    assert all(name == "lora_transformer_" + path.replace(".", "_") for path, name in names.items())


def test_kohya_names_are_the_ones_comfyui_maps_for_sd3():
    """lora_transformer_<diffusers path> for every adapted module, each a module ComfyUI's SD3 key map covers: the
    attention projections of both streams (mmdit_to_diffusers) and both feed-forwards (MMDIT_MAP_BLOCK)."""
    comfy_mapped = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                    "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2"}
    transformer = tiny_sd3_transformer()
    add_lora(transformer, SD3.lora_target_modules, rank=4)
    names = kohya_module_names(transformer, "sd3")
    assert len(names) == 12 + 9  # the last block is context_pre_only: no to_add_out and no ff_context
    for path, name in names.items():
        block, rest = path.split(".", 2)[:2], path.split(".", 2)[2]
        assert block[0] == "transformer_blocks" and rest in comfy_mapped, path
        assert name == "lora_transformer_" + path.replace(".", "_")


def transformer_inputs(family: str, batch: int = 2):
    """(tiny transformer taking unpacked latents, non-square latents, network timesteps, network kwargs)."""
    from distill.packing import accept_unpacked_latents

    generator = torch.Generator().manual_seed(0)
    if family == "sd3":
        net = tiny_sd3_transformer(num_layers=4)
        kwargs = {"encoder_hidden_states": torch.randn(batch, 7, 32, generator=generator),
                  "pooled_projections": torch.randn(batch, 64, generator=generator)}
        timestep = torch.tensor([300.0, 900.0])
    else:
        net = accept_unpacked_latents(tiny_flux_transformer())
        kwargs = {"encoder_hidden_states": torch.randn(batch, 7, 32, generator=generator),
                  "pooled_projections": torch.randn(batch, 32, generator=generator),
                  "guidance": torch.full((batch,), 3.5)}
        timestep = torch.tensor([0.3, 0.9])  # FLUX.1 is called with sigma itself
    return net, torch.randn(batch, 4, 16, 12, generator=generator), timestep, kwargs


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_transformer_features_are_the_networks_own_block_outputs(family):
    """The discriminators' features (the stem and first half of the joint blocks, run on their own) are the image
    tokens the full forward computes after those blocks, laid on the latent grid; the bottleneck a full forward
    captures is the last of them; the heads and DMD2's classifier read them."""
    from distill.discriminator import BottleneckClassifier, DiscriminatorHeads, capture_bottleneck, network_features
    from distill.transformer_features import feature_block_indices

    net, x, timestep, kwargs = transformer_inputs(family)
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out[1]))
             for block in net.transformer_blocks]
    with capture_bottleneck(net) as bottleneck:
        net(x, timestep=timestep, **kwargs, return_dict=False)
    for hook in hooks:
        hook.remove()
    features = network_features(net, x, timestep, **kwargs)
    levels = feature_block_indices(len(net.transformer_blocks))
    assert levels == ([0, 1] if family == "sd3" else [0])  # 4 joint blocks: the first half; FLUX's one double block
    assert [f.shape for f in features] == [(2, 32, 8, 6)] * len(levels)  # one token per 2x2 patch of 16x12
    for level, feature in zip(levels, features):
        tokens = feature.flatten(2).transpose(1, 2)  # back to row-major tokens
        torch.testing.assert_close(tokens, outputs[level], rtol=0, atol=0)
    torch.testing.assert_close(bottleneck[0], features[-1], rtol=0, atol=0)
    logits = DiscriminatorHeads.from_unet_config(net.config)(features)
    assert [l.shape for l in logits] == [(2, 1, 8, 6)] * len(levels)
    square = network_features(net, x[..., :12, :], timestep, **kwargs)[-1]
    assert BottleneckClassifier.for_network(net, 12)(square).shape == (2,)


@torch.no_grad()
def test_a_network_subclassed_by_sharding_is_read_as_its_class():
    """FSDP2's fully_shard gives a network the class FSDP<its class>: the features still find its stem and patch."""
    from distill.discriminator import network_features
    from distill.transformer_features import is_transformer, token_patch

    net, x, timestep, kwargs = transformer_inputs("flux")
    expected = network_features(net, x, timestep, **kwargs)
    net.__class__ = type("FSDP" + type(net).__name__, (type(net),), {})
    assert is_transformer(net) and token_patch(net) == 2
    torch.testing.assert_close(network_features(net, x, timestep, **kwargs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family,reads", [("sd3", "encoder"), ("flux", "encoder"), ("sd3", "network"),
                                          ("flux", "network")])
def test_ufogens_trained_discriminator_uses_every_weight_of_its_adapter(request, family, reads):
    """UFOGen's discriminator adapter sits on the joint blocks the features read, minus the last block's text-stream
    outputs that reach no feature (or, --discriminator_reads network, on every module the student adapts): the
    discriminator's loss gives every one of its weights a gradient (as DDP requires) and none to the generator; the
    generator's adversarial loss reaches the generator only."""
    from distill.methods import LatentBatch

    cls = METHODS["ufogen"]
    method, loaded = method_on_teacher(cls, cls.Config(lora_rank=4, reconstruction_weight=0.0,
                                                       discriminator_reads=reads),
                                       request.getfixturevalue(f"{family}_teacher"), 32)
    adapted = [n for n, _ in method.nets["discriminator"].named_parameters() if "lora" in n]
    student = [n for n, _ in method.nets["unet"].named_parameters() if "lora" in n]
    if reads == "encoder":
        assert adapted and not any("to_add_out" in n or "ff_context" in n for n in adapted
                                   if n.startswith("backbone.transformer_blocks.0."))  # block 0 is the last one read
    else:
        assert len(adapted) == len(student)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *loaded.latent_shape, generator=generator)
    cond = loaded.conditioner.encode(["a photo of three", "a photo of seven"])
    torch.manual_seed(0)
    losses = method.loss(LatentBatch(latents, cond, loaded.conditioner.unconditional(2)), 0)
    groups = method.trainable()
    losses["discriminator"].backward(retain_graph=True)
    assert all(p.grad is not None for p in groups["discriminator"])
    assert all(p.grad is None for p in groups["unet"])
    for p in groups["discriminator"]:
        p.grad = None
    losses["unet"].backward()
    assert all(p.grad is None for p in groups["discriminator"])
    assert sum(p.grad.abs().sum().item() for p in groups["unet"] if p.grad is not None) > 0


def test_pairs_of_an_sd3_teacher_are_its_flow_ode_solution(sd3_teacher, tmp_path):
    """generate_pairs' DPM-Solver++ on the flow sigmas (velocity prediction) reaches what 200 Euler steps of the same
    guided flow ODE reach from the same noise, more closely than 25 Euler steps do."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from distill.pair_generation import PairGenerationConfig, load_pair_pipeline, teacher_latents
    from distill.teacher import inspect_teacher

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of three\n")
    config = PairGenerationConfig(pretrained_teacher_model=str(sd3_teacher), output_dir=str(tmp_path / "pairs"),
                                  prompts_file=str(prompts), num_inference_steps=25, guidance_scale=3.0)
    pipe = load_pair_pipeline(inspect_teacher(str(sd3_teacher)))
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pairs = teacher_latents(pipe, noise.clone(), ["a photo of three"], config, 32)

    def euler(steps: int) -> torch.Tensor:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3_teacher, subfolder="scheduler")
        return pipe("a photo of three", latents=noise.clone(), num_inference_steps=steps, guidance_scale=3.0,
                    height=32, width=32, output_type="latent").images

    reference = euler(200)
    error = (pairs - reference).abs().max()
    assert error < 0.02 * reference.abs().max()
    assert error < (euler(25) - reference).abs().max()


# ------------------------------------------------------------------------------------------ FLUX.1


def test_packing_is_fluxpipelines_and_round_trips():
    from diffusers import FluxPipeline

    from distill.packing import latent_image_ids, pack_latents, unpack_latents

    latents = torch.randn(2, 4, 8, 12)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 12), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 8, 12), latents, rtol=0, atol=0)
    torch.testing.assert_close(latent_image_ids(8, 12, "cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


def test_the_flux_network_takes_unpacked_latents_and_passes_packed_ones_through(flux_teacher):
    """The loaded transformer on (B, C, H, W) latents equals the bare transformer on FluxPipeline's packed inputs."""
    from diffusers import FluxTransformer2DModel

    from distill.families import FLUX
    from distill.packing import latent_image_ids, pack_latents, unpack_latents

    hooked = FLUX.load_network(str(flux_teacher))
    bare = FluxTransformer2DModel.from_pretrained(flux_teacher, subfolder="transformer")
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 7, 32, generator=generator)
    kwargs = dict(encoder_hidden_states=text, pooled_projections=torch.randn(2, 32, generator=generator),
                  timestep=torch.tensor([0.9, 0.3]), guidance=torch.tensor([1.0, 3.5]), return_dict=False)
    with torch.no_grad():
        out = hooked(latents, **kwargs)[0]
        packed = pack_latents(latents)
        reference = bare(packed, img_ids=latent_image_ids(16, 16, "cpu", torch.float32), txt_ids=torch.zeros(7, 3),
                         **kwargs)[0]
        passed_through = hooked(packed, img_ids=latent_image_ids(16, 16, "cpu", torch.float32),
                                txt_ids=torch.zeros(7, 3), **kwargs)[0]
    assert out.shape == latents.shape
    torch.testing.assert_close(out, unpack_latents(reference, 16, 16))
    torch.testing.assert_close(passed_through, reference)


def test_flux_conditioner_and_schedule_are_fluxpipelines(flux_teacher):
    """Prompt embeddings as FluxPipeline.encode_prompt builds them, the guidance input, and the training sigmas:
    FluxPipeline's resolution-dependent shift mu at the training size, with the transformer called at sigma."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from distill.teacher import inspect_teacher, load_teacher

    loaded = load_teacher(inspect_teacher(str(flux_teacher)), 32)
    prompts = ["a photo of three", "seven"]
    cond = loaded.conditioner.encode(prompts)
    pipe = FluxPipeline.from_pretrained(flux_teacher)
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=512)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled)
    assert cond.guidance_embedded and cond.extra["guidance"].tolist() == [1.0, 1.0]

    schedule = loaded.schedule
    assert loaded.latent_shape == (4, 16, 16)
    mu = calculate_shift(8 * 8)  # 16x16 latents are 64 packed tokens; FluxPipeline's defaults equal the config's
    assert schedule.mu == pytest.approx(mu)
    shifted = pipe.scheduler.time_shift(mu, 1.0, torch.tensor([0.25, 0.5, 1.0]))
    torch.testing.assert_close(schedule.sigmas[torch.tensor([249, 499, 999])], shifted.float())
    torch.testing.assert_close(schedule.network_timestep(torch.tensor([499])), schedule.sigmas[499:500])


def test_a_guidance_distilled_teacher_is_guided_by_its_guidance_input(flux_teacher):
    """CFG-augmented teacher step on FLUX.1-dev: one call at guidance input 1 + w, no unconditional pass."""
    from distill.conditioning import Cond
    from distill.solvers import cfg_teacher_prediction

    method, loaded = method_on_teacher(METHODS["lcm"], METHODS["lcm"].Config(lora_rank=4), flux_teacher, 32)
    cond = loaded.conditioner.encode(["seven", "three"])
    wrong_uncond = Cond(torch.zeros_like(cond.prompt_embeds), cond.pooled_prompt_embeds, extra=cond.extra)
    x_t, t, w = torch.randn(2, *loaded.latent_shape), torch.tensor([999, 400]), torch.tensor([2.0, 6.0])
    with torch.no_grad(), method.denoiser().as_teacher() as teacher:
        guided = cfg_teacher_prediction(teacher, x_t, t, cond, wrong_uncond, w)
        direct = teacher(x_t, t, cond.with_guidance(torch.tensor([3.0, 7.0])))
        unguided = teacher(x_t, t, cond)
    torch.testing.assert_close(guided[0], direct[0])
    assert (guided[0] - unguided[0]).abs().max() > 1e-4


@pytest.mark.parametrize("family, rows_per_step", [("sd3", 2), ("flux", 1)])
def test_evaluation_counts_a_transformer_teachers_evaluations(request, family, rows_per_step):
    """NFE per image of the stock pipeline: SD3's CFG is two rows per step, FLUX.1-dev's guidance input one."""
    from distill.evaluate.sampling import generate
    from distill.families import get_family

    folder = request.getfixturevalue(f"{family}_teacher")
    pipe = get_family(family).pipeline_class().from_pretrained(folder)
    samples = generate(pipe, ["seven", "three"], num_inference_steps=3, guidance_scale=4.0, height=32, width=32)
    assert samples.images.shape == (2, 32, 32, 3) and samples.nfe_per_image == 3 * rows_per_step


def test_reflow_on_an_sd3_teacher_regresses_the_velocity(sd3_teacher):
    """Rectified diffusion's pairs loss on a flow teacher: || v_theta(x_t, t) - (eps - x0_hat) ||^2 with the pair's
    own noise (Rectified Flow, Liu et al. 2022, eq. 1), v_theta read straight from the transformer."""
    from distill.methods import LatentBatch

    cls = METHODS["rectified"]
    method, loaded = method_on_teacher(cls, cls.Config(lora_rank=4, loss_type="l2"), sd3_teacher)
    torch.nn.init.normal_(next(p for n, p in method.nets["unet"].named_parameters() if "lora_B" in n), std=0.1)
    generator = torch.Generator().manual_seed(0)
    x0_hat, eps = (torch.randn(2, *loaded.latent_shape, generator=generator) for _ in range(2))
    cond = loaded.conditioner.encode(["seven", "three"])
    batch = LatentBatch(x0_hat, cond, loaded.conditioner.unconditional(2), eps)
    torch.manual_seed(3)
    loss = method.loss(batch, 0)["unet"]
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (2,))
    sigma = loaded.schedule.sigmas[t].view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0_hat + sigma * eps
    with torch.no_grad():
        velocity = method.nets["unet"](x_t, timestep=sigma.flatten() * 1000, encoder_hidden_states=cond.prompt_embeds,
                                       pooled_projections=cond.pooled_prompt_embeds).sample
    torch.testing.assert_close(loss.detach(), (velocity - (eps - x0_hat)).pow(2).mean())


def test_a_flux_teacher_without_a_guidance_input_gets_two_pass_cfg(tmp_path):
    """FLUX.1-schnell's shape (no guidance_embeds): no guidance input in the condition, and the CFG-augmented teacher
    step is (1 + w) cond - w uncond over two rows, as on every other teacher."""
    from distill.solvers import cfg_teacher_prediction
    from distill.testing import build_tiny_flux_teacher

    folder = build_tiny_flux_teacher(tmp_path / "schnell", guidance_embeds=False)
    method, loaded = method_on_teacher(METHODS["lcm"], METHODS["lcm"].Config(lora_rank=4), folder, 32)
    cond, uncond = loaded.conditioner.encode(["seven"]), loaded.conditioner.unconditional(1)
    assert not cond.guidance_embedded and not uncond.guidance_embedded
    x_t, t, w = torch.randn(1, *loaded.latent_shape), torch.tensor([500]), torch.tensor([3.0])
    with torch.no_grad(), method.denoiser().as_teacher() as teacher:
        guided = cfg_teacher_prediction(teacher, x_t, t, cond, uncond, w)
        conditional, unconditional = teacher(x_t, t, cond), teacher(x_t, t, uncond)
    torch.testing.assert_close(guided[0], 4.0 * conditional[0] - 3.0 * unconditional[0], atol=1e-5, rtol=1e-5)


def test_a_fully_fine_tuned_transformer_student_exports_and_loads_back(sd3_teacher, tmp_path):
    """SwiftBrush with --full_finetune on an SD3 teacher: the student's whole transformer is saved in transformer/,
    and both ways a user loads it (stock pipeline + transformer/, the exported pipeline folder) sample with it."""
    from diffusers import DiffusionPipeline, SD3Transformer2DModel

    from distill.data import ImageDataConfig
    from distill.evaluate.students import load_student_pipeline, student_layout
    from distill.methods import SwiftBrushConfig
    from distill.trainer import Trainer, TrainConfig

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit two\na red square\n")
    out = tmp_path / "student"
    config = TrainConfig(pretrained_teacher_model=str(sd3_teacher), output_dir=str(out), seed=0, train_batch_size=2,
                         max_train_steps=2, checkpointing_steps=2, validation_steps=0, learning_rate=1e-3,
                         lr_warmup_steps=0, resolution=32)
    Trainer("swiftbrush", SwiftBrushConfig(full_finetune=True), ImageDataConfig(prompts_file=str(prompts)),
            config).run()

    assert not (out / "pytorch_lora_weights.safetensors").exists()
    trained = SD3Transformer2DModel.from_pretrained(out / "transformer").state_dict()
    teacher = SD3Transformer2DModel.from_pretrained(sd3_teacher, subfolder="transformer").state_dict()
    assert any(not torch.equal(trained[k], teacher[k]) for k in trained)
    exported = DiffusionPipeline.from_pretrained(out / "pipeline", trust_remote_code=True)
    shutil.rmtree(out / "pipeline")  # without it, the evaluation loads the stock pipeline with transformer/
    assert student_layout(out) == "transformer"
    stock = load_student_pipeline(sd3_teacher, out)
    for pipe in (stock, exported):
        assert all(torch.equal(v, trained[k]) for k, v in pipe.transformer.state_dict().items())
        images = pipe("a handwritten digit two", num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_ufogen_on_flux_trains_its_discriminator_and_exports_only_the_generator(flux_teacher, image_folder, tmp_path):
    """UFOGen on a FLUX.1-dev teacher through the trainer: the checkpoint holds the discriminator (heads and its
    encoder adapter) trained away from its start, the exported LoRA holds the generator's adapter alone, and the stock
    FluxPipeline with that LoRA samples other images than the teacher in one step."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from distill.data import ImageDataConfig
    from distill.methods import UFOGenConfig
    from distill.trainer import Trainer, TrainConfig

    out = tmp_path / "student"
    config = TrainConfig(pretrained_teacher_model=str(flux_teacher), output_dir=str(out), seed=0, train_batch_size=2,
                         max_train_steps=2, checkpointing_steps=2, validation_steps=0, learning_rate=1e-3,
                         lr_warmup_steps=0, resolution=32)
    Trainer("ufogen", UFOGenConfig(lora_rank=4), ImageDataConfig(train_data_dir=str(image_folder)), config).run()

    discriminator = load_file(out / "checkpoint-2" / "discriminator_trainable.safetensors")
    adapter = {k: v for k, v in discriminator.items() if "lora_B" in k}
    assert adapter and all(k.startswith("backbone.transformer_blocks.0.") for k in adapter)
    assert any(v.abs().sum() > 0 for v in adapter.values())  # zero at the start: the discriminator's encoder trained
    exported = load_file(out / "pytorch_lora_weights.safetensors")
    assert exported and all(k.startswith("transformer.") and "discriminator" not in k for k in exported)
    student = load_file(out / "checkpoint-2" / "unet_trainable.safetensors")
    assert len(exported) == len(student)

    def sample(pipe):
        return pipe("a striped picture number 3", num_inference_steps=1, guidance_scale=3.5, height=32, width=32,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    pipe = FluxPipeline.from_pretrained(flux_teacher)
    before = sample(pipe)
    pipe.load_lora_weights(out)
    after = sample(pipe)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-3
