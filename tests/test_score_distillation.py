"""distill/score_distillation.py: the math of score distillation as oracles, and the fake score as a second LoRA
adapter on the student's own UNet.

The oracles need no golden numbers: a denoiser that knows the clean sample returns the exact noise, so the fake score's
denoising loss is zero and the one-step generator inverts the forward process; the DMD weighting equals its x0-space
definition. The adapter tests pin what makes one UNet serve as teacher, student and fake score: the switch sets what
peft's own switches set but never requires_grad; each view holds and runs one adapter; each loss reaches exactly its
own adapter, also with gradient checkpointing, where the UNet is recomputed during the backward pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from distill.conditioning import TextConditioner
from distill.denoiser import AdapterView, Denoiser, using_adapter
from distill.families import UNET_LORA_TARGETS
from distill.lora import ADAPTER_NAME, LoRASettings, lora_state_dict, switch_adapter
from distill.methods import LatentBatch, SwiftBrush, SwiftBrushConfig, Teacher
from distill.schedule import NoiseSchedule
from distill.score_distillation import (FAKE_SCORE_ADAPTER, fake_score_loss, one_step_x0, real_and_fake_scores,
                                        real_score,
                                        student_and_fake_score, vsd_weight)
from distill.teacher import inspect_teacher, native_resolution

LATENT_SHAPE = (4, 16, 16)
ADAPTERS = (ADAPTER_NAME, FAKE_SCORE_ADAPTER)


def schedule_of(folder) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(DDPMScheduler.load_config(folder, subfolder="scheduler"))


class KnowsTheSample:
    """A denoiser that knows the clean sample x0: for any x_t = alpha_t x0 + sigma_t eps it returns the exact (x0, eps)."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule):
        self.x0, self.schedule = x0, schedule

    def __call__(self, x_t, t, cond):
        x0 = self.x0.detach()
        return x0, (x_t - self.schedule.alpha(t, x_t) * x0) / self.schedule.sigma(t, x_t)


def perturb(params, seed: int, std: float = 0.02) -> None:
    """Move LoRA weights off their start (B = 0), so that each adapter changes the UNet's output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator) * std)


def batch_for(folder) -> LatentBatch:
    info = inspect_teacher(str(folder))
    conditioner = TextConditioner(info, native_resolution(info))
    prompts = ["a handwritten digit seven", "a red square"]
    return LatentBatch(None, conditioner.encode(prompts), conditioner.unconditional(len(prompts)))


@pytest.fixture
def shared(sd_teacher):
    """The tiny teacher's UNet with the student's LoRA and the fake score's LoRA, both moved off zero."""
    unet = UNet2DConditionModel.from_pretrained(sd_teacher, subfolder="unet")
    student, student_params, fake = student_and_fake_score(unet, LoRASettings(lora_rank=4), UNET_LORA_TARGETS, False, 4, 4.0)
    perturb(student_params, seed=1)
    perturb(fake.parameters(), seed=2)
    return unet, student, student_params, fake


# ------------------------------------------------------------------------------------------ the math


def test_fake_score_loss_is_zero_for_a_denoiser_that_returns_the_true_noise(sd_teacher):
    schedule = schedule_of(sd_teacher)
    torch.manual_seed(0)
    x0 = torch.randn(3, *LATENT_SHAPE, requires_grad=True)
    t, eps = torch.tensor([0, 500, 999]), torch.randn(3, *LATENT_SHAPE)
    loss = fake_score_loss(KnowsTheSample(x0, schedule), x0, t, eps, None)
    assert loss.item() < 1e-10
    # A denoiser that knows another sample is wrong by alpha_t / sigma_t (x0 - other) in eps: exactly that squared.
    other = torch.randn_like(x0)
    wrong = fake_score_loss(KnowsTheSample(other, schedule), x0, t, eps, None)
    expected = ((schedule.alpha(t, x0) / schedule.sigma(t, x0)) * (x0 - other)).pow(2).mean()
    torch.testing.assert_close(wrong, expected.detach(), rtol=1e-4, atol=0)
    assert not wrong.requires_grad  # sg(x0): the fake score's loss never reaches the generator


def test_one_step_generator_inverts_the_forward_process_at_the_last_timestep(sd_teacher):
    schedule = schedule_of(sd_teacher)
    torch.manual_seed(1)
    x0, eps = torch.randn(2, *LATENT_SHAPE), torch.randn(2, *LATENT_SHAPE)
    t_last = torch.full((2,), schedule.num_train_timesteps - 1)
    z = schedule.add_noise(x0, eps, t_last)
    torch.testing.assert_close(one_step_x0(KnowsTheSample(x0, schedule), z, None), x0)


def test_dmd_weighting_is_the_normalised_x0_space_gradient(sd_teacher):
    """omega (eps_real - eps_fake) = (x0_fake - x0_real) / mean|x0 - x0_real| for both scores read at the same x_t
    (DMD's gradient in x0 space); SwiftBrush's weighting is sigma_t^2."""
    schedule = schedule_of(sd_teacher)
    torch.manual_seed(2)
    x0, x_t = torch.randn(3, *LATENT_SHAPE), torch.randn(3, *LATENT_SHAPE)
    eps_real, eps_fake = torch.randn(3, *LATENT_SHAPE), torch.randn(3, *LATENT_SHAPE)
    t = torch.tensor([20, 400, 980])
    alpha, sigma = schedule.alpha(t, x_t), schedule.sigma(t, x_t)
    x0_real, x0_fake = (x_t - sigma * eps_real) / alpha, (x_t - sigma * eps_fake) / alpha
    dmd = vsd_weight(schedule, t, x0, x0_real, "dmd") * (eps_real - eps_fake)
    expected = (x0_fake - x0_real) / (x0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(dmd, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vsd_weight(schedule, t, x0, x0_real, "swiftbrush"), sigma**2)


def test_real_score_is_the_guided_teacher_with_every_adapter_off(sd_teacher, shared):
    unet, student, _, fake = shared
    pristine = Denoiser(UNet2DConditionModel.from_pretrained(sd_teacher, subfolder="unet"), schedule_of(sd_teacher))
    batch = batch_for(sd_teacher)
    torch.manual_seed(3)
    x_t, t = torch.randn(2, *LATENT_SHAPE), torch.tensor([300, 700])
    with torch.no_grad():
        _, eps_c = pristine(x_t, t, batch.cond)
        _, eps_u = pristine(x_t, t, batch.uncond)
        for view in (student, fake):  # either adapter's network, adapters off, is the teacher
            _, guided = real_score(Denoiser(view, pristine.schedule), x_t, t, batch.cond, batch.uncond, 4.5)
            torch.testing.assert_close(guided, eps_u + 4.5 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
            _, conditional = real_score(Denoiser(view, pristine.schedule), x_t, t, batch.cond, batch.uncond, 1.0)
            torch.testing.assert_close(conditional, eps_c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("full_student", [False, True])
def test_one_batched_call_gives_the_real_and_fake_scores_of_separate_passes(sd_teacher, full_student):
    """Rows [cond | uncond] with every adapter off and rows [cond] with the fake score's adapter, in one UNet call
    (peft's mixed-adapter batch), equal the guided teacher and the fake score run one by one; the adapter choice
    that was on before comes back."""
    unet = UNet2DConditionModel.from_pretrained(sd_teacher, subfolder="unet")
    student, student_params, fake = student_and_fake_score(unet, LoRASettings(lora_rank=4), UNET_LORA_TARGETS,
                                                           full_student, 4, 4.0)
    perturb(student_params if not full_student else [], seed=1)
    perturb(fake.parameters(), seed=2)
    schedule, batch = schedule_of(sd_teacher), batch_for(sd_teacher)
    torch.manual_seed(5)
    x_t, t = torch.randn(2, *LATENT_SHAPE), torch.tensor([250, 850])
    fake_score = Denoiser(fake, schedule)
    before = layer_states(fake.unet)
    x0_real, eps_real, eps_fake = real_and_fake_scores(fake_score, x_t, t, batch.cond, batch.uncond, 3.0)
    assert layer_states(fake.unet) == before
    with torch.no_grad():
        expected_x0, expected_eps = real_score(fake_score, x_t, t, batch.cond, batch.uncond, 3.0)
        _, expected_fake = fake_score(x_t, t, batch.cond)
        with fake_score.as_teacher() as teacher:
            _, teacher_eps = teacher(x_t, t, batch.cond)
    # float noise of a 6-row against a 2-row matrix product; x0 = (x_t - sigma eps) / alpha scales it by sigma / alpha
    torch.testing.assert_close(eps_real, expected_eps, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(eps_fake, expected_fake, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(x0_real, expected_x0, rtol=1e-4, atol=2e-4)
    assert (expected_fake - teacher_eps).abs().max() > 1e-3  # the fake adapter's rows really ran with it


# ------------------------------------------------------------------------------------------ adapters


def layer_states(unet) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(list(m.active_adapters), m.disable_adapters) for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("choice", [FAKE_SCORE_ADAPTER, ADAPTER_NAME, None, [ADAPTER_NAME, FAKE_SCORE_ADAPTER]])
def test_switch_sets_what_peft_sets_but_never_requires_grad(shared, choice):
    unet = shared[0]
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    assert sum(flags.values()) > 0 and not all(flags.values())
    reference = copy.deepcopy(unet)  # switched through peft's public API, which also rewrites requires_grad
    if choice is None:
        reference.disable_adapters()
    else:
        reference.set_adapter(choice)
        reference.enable_adapters()
    switch_adapter(unet, choice)
    assert layer_states(unet) == layer_states(reference)
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == flags
    with pytest.raises(ValueError, match="no LoRA adapter"):
        switch_adapter(unet, "no_such_adapter")


def test_each_view_holds_one_adapter_under_the_unets_names(shared):
    unet, student, student_params, fake = shared
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    names = {view.adapter: {name for name, _ in view.named_parameters()} for view in (student, fake)}
    for adapter, held in names.items():
        assert held == {name for name in trainable if f".{adapter}." in name}
    assert names[ADAPTER_NAME] | names[FAKE_SCORE_ADAPTER] == trainable
    assert [id(p) for p in student.parameters()] == [id(p) for p in student_params]
    assert sum(p.numel() for p in unet.parameters()) > 10 * sum(p.numel() for p in fake.parameters())


def test_each_view_runs_its_own_adapter_and_as_teacher_runs_none(sd_teacher, shared):
    unet, student, _, fake = shared
    schedule = schedule_of(sd_teacher)
    cond = batch_for(sd_teacher).cond
    torch.manual_seed(4)
    x_t, t = torch.randn(2, *LATENT_SHAPE), torch.tensor([100, 900])
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for view in (student, fake):
            reference.set_adapter(view.adapter)
            expected = Denoiser(reference, schedule).raw(x_t, t, cond)
            torch.testing.assert_close(Denoiser(view, schedule).raw(x_t, t, cond), expected)
        reference.disable_adapters()
        teacher = Denoiser(reference, schedule).raw(x_t, t, cond)
        for net in (student, fake, unet):
            with Denoiser(net, schedule).as_teacher() as frozen:
                torch.testing.assert_close(frozen.raw(x_t, t, cond), teacher)
        outputs = [Denoiser(view, schedule).raw(x_t, t, cond) for view in (student, fake)]
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4 and (outputs[0] - teacher).abs().max() > 1e-4
    # Nesting: the block's choice holds inside it and the previous one comes back after it.
    with using_adapter(unet, FAKE_SCORE_ADAPTER):
        with using_adapter(unet, None):
            assert layer_states(unet)[0][1] is True
        assert layer_states(unet)[0] == ([FAKE_SCORE_ADAPTER], False)
    assert layer_states(unet)[0] == ([ADAPTER_NAME], False)


def swiftbrush(folder, **config) -> SwiftBrush:
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    return SwiftBrush(Teacher(unet, schedule_of(folder), inspect_teacher(str(folder)), LATENT_SHAPE),
                      SwiftBrushConfig(lora_rank=4, fake_lora_rank=4, **config))


def gradients_by_loss(method: SwiftBrush, batch: LatentBatch) -> dict[str, dict[str, torch.Tensor]]:
    """As the trainer does: every loss first, then one backward per loss; the gradients each backward leaves."""
    unet = method.teacher.unet
    torch.manual_seed(7)
    losses = method.loss(batch, 0)
    found = {}
    for name, loss in losses.items():
        loss.backward()
        found[name] = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
        for p in unet.parameters():
            p.grad = None
    return found


def test_each_loss_reaches_exactly_its_adapter_with_and_without_gradient_checkpointing(sd_teacher):
    """Student loss -> only the student's LoRA; fake-score loss -> only the fake score's. With gradient checkpointing
    the UNet is recomputed in each backward pass, after both forwards ran: the same gradients, to the bit."""
    method = swiftbrush(sd_teacher)
    unet = method.teacher.unet
    perturb(method.trainable()["unet"], seed=5)
    perturb(method.trainable()["fake_score"], seed=6)
    batch = batch_for(sd_teacher)
    plain = gradients_by_loss(method, batch)
    for name, adapter in (("unet", ADAPTER_NAME), ("fake_score", FAKE_SCORE_ADAPTER)):
        own = {n for n, _ in method.nets[name].named_parameters()}
        assert set(plain[name]) == own and all(f".{adapter}." in n for n in own), name
        assert sum(g.abs().sum() for g in plain[name].values()) > 0, name
    unet.enable_gradient_checkpointing()
    checkpointed = gradients_by_loss(method, batch)
    assert checkpointed.keys() == plain.keys()
    for name in plain:
        assert checkpointed[name].keys() == plain[name].keys()
        assert all(torch.equal(checkpointed[name][n], plain[name][n]) for n in plain[name]), name
    assert all(p.requires_grad for p in [*method.trainable()["unet"], *method.trainable()["fake_score"]])


def test_the_exported_student_is_the_students_adapter_alone(sd_teacher):
    method = swiftbrush(sd_teacher)
    perturb(method.trainable()["unet"], seed=8)
    perturb(method.trainable()["fake_score"], seed=9)
    unet = method.teacher.unet
    switch_adapter(unet, FAKE_SCORE_ADAPTER)  # whatever ran last (a fake-score backward with checkpointing)
    exported = method.student_unet()
    assert exported is unet and layer_states(unet)[0] == ([ADAPTER_NAME], False)
    state = lora_state_dict(exported)
    assert len(state) == len(method.trainable()["unet"]) and not any(FAKE_SCORE_ADAPTER in k for k in state)
    schedule = method.teacher.schedule
    cond = batch_for(sd_teacher).cond
    x_t, t = torch.randn(2, *LATENT_SHAPE), torch.tensor([999, 999])
    with torch.no_grad():
        torch.testing.assert_close(Denoiser(exported, schedule).raw(x_t, t, cond),
                                   method.denoiser().raw(x_t, t, cond))


def test_a_half_precision_student_unet_runs_as_accelerate_prepares_networks(sdxl_teacher):
    """Mixed precision: the UNet (bf16) runs under autocast with float32 outputs, as the trainer's prepared networks
    do; validation feeds its latents to SDXL's float32 VAE."""
    unet = UNet2DConditionModel.from_pretrained(sdxl_teacher, subfolder="unet").to(torch.bfloat16)
    method = SwiftBrush(Teacher(unet, schedule_of(sdxl_teacher), inspect_teacher(str(sdxl_teacher)), LATENT_SHAPE),
                        SwiftBrushConfig(lora_rank=4, fake_lora_rank=4))
    cond = batch_for(sdxl_teacher).cond.to(dtype=torch.bfloat16)
    with torch.no_grad():
        sample = method.student_unet()(torch.randn(2, *LATENT_SHAPE, dtype=torch.bfloat16), torch.tensor([999, 999]),
                                       **cond.unet_kwargs()).sample
    assert sample.dtype == torch.float32 and unet.dtype == torch.bfloat16


def test_a_full_student_keeps_a_separate_copy_of_the_teacher_for_the_fake_score(sd_teacher):
    unet = UNet2DConditionModel.from_pretrained(sd_teacher, subfolder="unet")
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    student, params, fake = student_and_fake_score(unet, LoRASettings(lora_rank=4), UNET_LORA_TARGETS, True, 4, 4.0)
    assert student is unet and not getattr(unet, "peft_config", None) and params == list(unet.parameters())
    assert isinstance(fake, AdapterView) and fake.unet is not unet
    with torch.no_grad():
        for p in params:
            p.add_(1.0)  # the student changes every weight; the fake score's UNet is still the teacher
    copied = dict(fake.unet.named_parameters())

    def in_copy(name: str) -> torch.Tensor:  # peft moves an adapted layer's own weights to <layer>.base_layer.<leaf>
        layer, leaf = name.rsplit(".", 1)
        return copied.get(name, copied.get(f"{layer}.base_layer.{leaf}"))

    assert all(torch.equal(in_copy(n), before[n]) for n in before)
