"""Schedule, solver and consistency-scaling math, checked by oracles and against diffusers' schedulers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, LCMScheduler

from distill.conditioning import Cond
from distill.denoiser import Denoiser
from distill.losses import distance
from distill.schedule import NoiseSchedule, consistency_boundary_scalings, ddim_timesteps
from distill.solvers import cfg_teacher_ddim_step, ddim_step, guided
from distill.testing import ddpm_scheduler


class OracleUNet(torch.nn.Module):
    """A 'UNet' that knows the clean sample x0 and returns the exact eps / v / x0 for any x_t."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a dtype

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        alpha, sigma = self.schedule.alpha(timestep, sample), self.schedule.sigma(timestep, sample)
        x0 = self.x0.repeat(sample.shape[0] // self.x0.shape[0], 1, 1, 1)
        eps = (sample - alpha * x0) / sigma
        output = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}
        return (output[self.schedule.prediction_type],)


def schedule_for(prediction_type: str) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(ddpm_scheduler(prediction_type).config) if prediction_type == "epsilon" \
        else NoiseSchedule(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         prediction_type=prediction_type).alphas_cumprod, prediction_type)


def dummy_cond(batch: int) -> Cond:
    return Cond(torch.zeros(batch, 77, 32))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_of_an_exact_teacher_lands_on_the_forward_process(prediction_type):
    schedule = schedule_for(prediction_type)
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t, t_prev = torch.tensor([999, 519, 39]), torch.tensor([979, 499, 19])
    teacher = Denoiser(OracleUNet(x0, schedule), schedule)
    x_t = schedule.add_noise(x0, eps, t)
    w = torch.tensor([0.0, 3.0, 14.5])  # guidance cannot move an exact, prompt-independent teacher
    x_prev = cfg_teacher_ddim_step(teacher, x_t, t, t_prev, dummy_cond(3), dummy_cond(3), w)
    torch.testing.assert_close(x_prev, schedule.add_noise(x0, eps, t_prev), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parameterisations_round_trip(prediction_type):
    schedule = schedule_for(prediction_type)
    torch.manual_seed(1)
    x0, eps, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([5, 250, 600, 990])
    x_t = schedule.add_noise(x0, eps, t)
    (output,) = OracleUNet(x0, schedule)(x_t, t)
    got_x0, got_eps = schedule.to_x0_eps(output, x_t, t)
    torch.testing.assert_close(got_x0, x0, atol=5e-3, rtol=1e-3)
    torch.testing.assert_close(got_eps, eps, atol=5e-3, rtol=1e-3)


def test_schedule_matches_diffusers_add_noise():
    scheduler = DDPMScheduler.from_config(ddpm_scheduler().config)
    schedule = NoiseSchedule.from_scheduler_config(scheduler.config)
    x0, eps, t = torch.randn(5, 4, 4, 4), torch.randn(5, 4, 4, 4), torch.tensor([0, 1, 400, 800, 999])
    torch.testing.assert_close(schedule.add_noise(x0, eps, t), scheduler.add_noise(x0, eps, t))


def test_guidance_is_lcm_form():
    cond, uncond = torch.full((2, 3), 2.0), torch.full((2, 3), 0.5)
    out = guided(cond, uncond, torch.tensor([0.0, 4.0]))
    assert out[0].tolist() == [2.0] * 3  # w = 0: conditional prediction
    assert out[1].tolist() == [5 * 2.0 - 4 * 0.5] * 3  # (1 + w) cond - w uncond


def test_ddim_step_is_linear_in_x0_and_eps():
    schedule = schedule_for("epsilon")
    t_prev = torch.tensor([0, 499])
    x0, eps = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    out = ddim_step(schedule, x0, eps, t_prev).flatten()
    torch.testing.assert_close(out, schedule.alphas_cumprod[t_prev].sqrt())


def test_skipping_step_grid_is_lcm_schedulers_origin_grid():
    grid = ddim_timesteps(1000, 50)
    assert grid[0].item() == 19 and grid[-1].item() == 999 and len(grid) == 50
    assert torch.all(grid[1:] - grid[:-1] == 20)
    for steps in (1, 2, 4, 8):
        scheduler = LCMScheduler.from_config(ddpm_scheduler().config, original_inference_steps=50)
        scheduler.set_timesteps(steps)
        assert set(scheduler.timesteps.tolist()) <= set(grid.tolist())
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def test_boundary_scalings():
    c_skip, c_out = consistency_boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(x, 0) = x
    assert c_skip[2].item() < 1e-6 and abs(c_out[2].item() - 1.0) < 1e-6  # pure x0-prediction at t = T
    assert c_skip[0] > c_skip[1] > c_skip[2] and c_out[0] < c_out[1] < c_out[2]  # monotone in t
    scheduler = LCMScheduler.from_config(ddpm_scheduler().config)
    for t in (0, 19, 259, 999):
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        got_skip, got_out = consistency_boundary_scalings(torch.tensor([t]))
        assert abs(got_skip.item() - ref_skip) < 1e-6 and abs(got_out.item() - ref_out) < 1e-6


def test_pseudo_huber_between_l2_and_l1():
    small, large, zero = torch.full((4,), 1e-5), torch.full((4,), 3.0), torch.zeros(4)
    c = 0.001
    assert distance(small, zero, "huber", c) == pytest.approx(1e-10 / (2 * c), rel=1e-2)  # ~ d^2 / 2c near 0
    assert distance(large, zero, "huber", c) == pytest.approx(3.0 - c, rel=1e-5)  # ~ |d| - c far away
    assert distance(large, zero, "l2") == pytest.approx(9.0)
    with pytest.raises(ValueError):
        distance(large, zero, "l1")


def test_clamped_logistic_gan_loss_stops_pushing_past_the_margin():
    """softplus form below the margin, constant (zero gradient) beyond it: the generator cannot keep exploiting D."""
    from distill.losses import LOGISTIC_MARGIN, clamped_logistic_discriminator_loss, clamped_logistic_generator_loss

    m = LOGISTIC_MARGIN
    logits = torch.tensor([-2.0, 0.0, m - 0.1, m + 0.1, 3.0], requires_grad=True)
    clamped_logistic_generator_loss([logits]).backward()
    sigmoid = torch.sigmoid(logits.detach())
    # d/dz softplus(-z) / n = -(1 - sigmoid(z)) / n below the margin; nothing above it.
    expected = torch.where(logits.detach() < m, -(1 - sigmoid) / 5, torch.zeros(5))
    torch.testing.assert_close(logits.grad, expected)
    torch.testing.assert_close(clamped_logistic_generator_loss([torch.tensor([-1.0, 4.0])]),
                               (F.softplus(torch.tensor(1.0)) + F.softplus(torch.tensor(-m))) / 2)

    real = torch.tensor([-1.0, m + 1.0], requires_grad=True)
    fake = torch.tensor([1.0, -m - 1.0], requires_grad=True)
    clamped_logistic_discriminator_loss([real], [fake]).backward()
    # D pushes a real logit up and a fake logit down only until they clear the margin.
    assert real.grad[0] < 0 and real.grad[1] == 0
    assert fake.grad[0] > 0 and fake.grad[1] == 0
