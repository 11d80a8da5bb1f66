"""Score distillation: what SwiftBrush and DMD2 share (a one-step generator moved along real score minus fake score).

* the one-step generator x0 = f_theta(z, y): the teacher's UNet read once at t = T - 1, with a LoRA or fully tuned;
* the real score eps_psi: the frozen teacher (every adapter off) with classifier-free guidance;
* the fake score eps_phi: a second LoRA adapter, "fake_score", on the same UNet, so that a LoRA student keeps one UNet
  in memory; a fully fine-tuned student changes the UNet's own weights, so its fake score is a LoRA on a copy of the
  teacher taken before training (whose adapters off are then the real score);
* the VSD/DMD gradient omega(t) (eps_real - eps_fake) w.r.t. x0, and the surrogate loss that has it as gradient;
* the fake score's denoising score matching on the generator's detached samples.

Student and fake score are each an ``AdapterView`` (one adapter of the shared UNet as a network of its own), so the
trainer's optimizers, DDP wrappers and checkpoints each hold one adapter.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch

from .conditioning import Cond
from .denoiser import AdapterView, Denoiser
from .lora import ADAPTER_NAME, LoRASettings, add_lora, adapters_by_row, rank_warning
from .losses import distance, score_distillation_surrogate
from .schedule import NoiseSchedule
from .solvers import cfg_teacher_prediction, guided

__all__ = ["FAKE_SCORE_ADAPTER", "WEIGHTINGS", "add_fake_score", "fake_score_loss", "one_step_x0",
           "real_and_fake_scores", "real_score", "score_distillation_surrogate", "student_and_fake_score",
           "vsd_gradient", "vsd_weight"]

FAKE_SCORE_ADAPTER = "fake_score"
WEIGHTINGS = ("swiftbrush", "dmd")
logger = logging.getLogger(__name__)


def add_fake_score(unet: torch.nn.Module, rank: int, alpha: float, target_modules: list[str],
                   separate: bool, adapter: str = FAKE_SCORE_ADAPTER) -> AdapterView:
    """phi <- psi: a new LoRA whose B is zero, so that it starts as the teacher (SwiftBrush, Algorithm 1, line 2).

    On ``unet`` itself as adapter ``adapter`` ("fake_score"), or with ``separate`` on a copy of ``unet`` taken now, before the
    student changes anything. Everything of ``unet`` is frozen; the caller unfreezes the adapter once the student
    is set up (peft's student LoRA freezes the whole UNet again).
    """
    if separate:
        unet = copy.deepcopy(unet)
        add_lora(unet, target_modules, rank, alpha, 0.0, rank_flag="--fake_lora_rank")
        return AdapterView(unet, ADAPTER_NAME)
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights="gaussian",
                        target_modules=list(target_modules))
    unet.add_adapter(config, adapter_name=adapter)
    return AdapterView(unet, adapter)


def student_and_fake_score(unet: torch.nn.Module, student: LoRASettings, family_targets: tuple[str, ...],
                           full_finetune: bool, fake_rank: int, fake_alpha: float,
                           adapter: str = FAKE_SCORE_ADAPTER, fake_targets: list[str] | None = None,
                           ) -> tuple[torch.nn.Module, list[torch.nn.Parameter], AdapterView]:
    """phi <- psi, theta <- psi (SwiftBrush, Algorithm 1, line 2): (student network, its trainable weights, fake score).

    The student is LoRA "default" on ``unet`` (an ``AdapterView``) or, with ``full_finetune``, ``unet`` itself. The
    fake score (adapter ``adapter``; UFOGen's trained discriminator backbone is made the same way) is made first (a
    copy must be the untouched teacher; the same random draws as before either way), on ``fake_targets`` (default:
    the student's modules).
    """
    fake_score = add_fake_score(unet, fake_rank, fake_alpha, fake_targets or student.targets(family_targets),
                                separate=full_finetune, adapter=adapter)
    with warnings.catch_warnings():  # peft warns about a second adapter on one model: here that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        params = student.student_parameters(unet, family_targets, full_finetune)
    fake_score.requires_grad_(True)
    if full_finetune:
        return unet, params, fake_score
    warning = rank_warning(unet, fake_rank, "--fake_lora_rank")  # the layers the student's LoRA adapts, too
    if warning:
        logger.warning(warning)
    return AdapterView(unet, ADAPTER_NAME), params, fake_score


def one_step_x0(generator: Denoiser, z: torch.Tensor, cond: Cond) -> torch.Tensor:
    """x0 = f_theta(z, y) = (z - sigma_T eps_theta(z, T)) / alpha_T at t = T - 1 (SwiftBrush, Algorithm 1, line 6)."""
    t = torch.full((z.shape[0],), generator.schedule.num_train_timesteps - 1, dtype=torch.long, device=z.device)
    x0, _ = generator(z, t, cond)
    return x0


@torch.no_grad()
def real_score(net: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond,
               guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided (x0, eps) of the frozen teacher, ``net`` with every adapter off: eps_u + w (eps_c - eps_u) (Ho & Salimans
    2022, eq. 6 with their w = w - 1), the real score eps_psi^w of SwiftBrush (Algorithm 1, line 10) and DMD (sec. 3.2).

    The standard form of diffusers' pipelines and of SwiftBrush's and DMD2's code; w = 1 is the conditional score.
    """
    with net.as_teacher() as teacher:
        return cfg_teacher_prediction(teacher, x_t, t, cond, uncond, lcm_form_weight(guidance_scale, x_t))


def lcm_form_weight(guidance_scale: float, like: torch.Tensor) -> torch.Tensor:
    """w = guidance_scale - 1 per row of ``like``: the standard CFG scale in LCM's (1 + w) cond - w uncond form
    (``solvers.guided``)."""
    return torch.full((like.shape[0],), guidance_scale - 1.0, device=like.device)


def vsd_weight(schedule: NoiseSchedule, t: torch.Tensor, x0: torch.Tensor, x0_real: torch.Tensor,
               weighting: str) -> torch.Tensor:
    """omega(t): sigma_t^2 (SwiftBrush's code) or sigma_t / (alpha_t mean|x0 - x0_real|) (DMD, Yin et al. 2024,
    sec. 3.2: the per-sample normalisation of the reference code, grad / mean|x0 - x0_real|).

    DMD writes its gradient in x0 space, (x0_fake - x0_real) / mean|x0 - x0_real|; with x0 = (x_t - sigma_t eps) /
    alpha_t for both scores at the same x_t this is the eps-space gradient times sigma_t / alpha_t / mean|...|.
    """
    sigma = schedule.sigma(t, x0)
    if weighting == "swiftbrush":
        return sigma**2
    normaliser = (x0 - x0_real).abs().mean(dim=tuple(range(1, x0.dim())), keepdim=True).clamp_min(1e-8)
    return sigma / (schedule.alpha(t, x0) * normaliser)


@torch.no_grad()
def real_and_fake_scores(fake_score: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond,
                         guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0_real, eps_real, eps_fake): ``real_score`` and the conditional fake score eps_phi(x_t, t, y) at the same x_t,
    in one batched UNet call: rows [cond | uncond] with every adapter off, rows [cond] with the fake score's adapter.

    ``fake_score`` is an ``AdapterView`` (one adapter of a shared UNet, or of the teacher's copy for a full student);
    peft runs each adapter on its own rows (``lora.adapters_by_row``), so this equals the three separate passes.
    """
    view = fake_score.module
    n = x_t.shape[0]
    w = lcm_form_weight(guidance_scale, x_t)
    if cond.guidance_embedded:  # a guidance-distilled teacher: the real score is one row at guidance scale 1 + w
        with adapters_by_row(view.unet, [None] * n + [view.adapter] * n):
            rows = Cond.cat([cond.with_guidance(1 + w), cond])
            x0, eps = fake_score(torch.cat([x_t] * 2), torch.cat([t] * 2), rows)
        (x0_real, _), (eps_real, eps_fake) = x0.chunk(2), eps.chunk(2)
        return x0_real, eps_real, eps_fake
    with adapters_by_row(view.unet, [None] * (2 * n) + [view.adapter] * n):
        x0, eps = fake_score(torch.cat([x_t] * 3), torch.cat([t] * 3), Cond.cat([cond, uncond, cond]))
    (x0_cond, x0_uncond, _), (eps_cond, eps_uncond, eps_fake) = x0.chunk(3), eps.chunk(3)
    return guided(x0_cond, x0_uncond, w), guided(eps_cond, eps_uncond, w), eps_fake


@torch.no_grad()
def vsd_gradient(fake_score: Denoiser, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                 uncond: Cond, guidance_scale: float, weighting: str) -> torch.Tensor:
    """omega(t) (eps_psi^w(x_t, t, y) - eps_phi(x_t, t, y)): dL/dx0 of VSD (ProlificDreamer, Wang et al. 2023, eq. 9;
    SwiftBrush, Algorithm 1, line 10), or of DMD's KL(p_fake || p_real) (Yin et al. 2024, sec. 3.2) with
    ``weighting`` "dmd".

    The real score is the fake score's network with its adapters off (the teacher, whether the fake score is an adapter
    of the student's UNet or of a copy). The fake score is conditional only (Algorithm 1 writes eps_phi(x_t, t, y);
    DMD2 keeps fake guidance at 1). With scores s = -eps / sigma_t, a descent step -g = omega sigma_t (s_real - s_fake)
    moves the sample up the guided teacher's log-density and down the student's own: it lowers KL(p_student||p_teacher).
    """
    x0_real, eps_real, eps_fake = real_and_fake_scores(fake_score, x_t, t, cond, uncond, guidance_scale)
    return vsd_weight(fake_score.schedule, t, x0.detach(), x0_real, weighting) * (eps_real - eps_fake)


def fake_score_loss(fake_score: Denoiser, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                    cond: Cond) -> torch.Tensor:
    """||eps_phi(alpha_t sg(x0) + sigma_t eps, t, y) - eps||^2: denoising score matching of the fake score on the
    generator's samples (SwiftBrush, Algorithm 1, lines 13-14; ProlificDreamer; DMD sec. 3.2, in eps form; in velocity
    form on a flow-matching teacher, ``NoiseSchedule.regression_target``)."""
    schedule = fake_score.schedule
    x_t = schedule.add_noise(x0.detach(), eps, t)
    x0_fake, eps_fake = fake_score(x_t, t, cond)
    return distance(schedule.regression_target(x0_fake, eps_fake), schedule.regression_target(x0.detach(), eps), "l2")
