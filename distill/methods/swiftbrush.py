"""Image-free one-step distillation by variational score distillation (SwiftBrush, Nguyen & Tran 2024, Algorithm 1).

Three networks share the teacher's weights at the start (Algorithm 1, line 2: phi <- psi, theta <- psi):

* the student f_theta: the teacher's UNet, with a LoRA (default) or fully fine-tuned, read at t = T - 1 as a one-step
  generator x0 = (z - sigma_T eps_theta(z, T)) / alpha_T from pure noise z;
* the fake score eps_phi: a second LoRA adapter on the same UNet (on a copy of the teacher taken before training when
  the student is fully fine-tuned), trained by denoising score matching on the student's (detached) samples, so that
  it tracks the score of the student's distribution;
* the real score eps_psi: the frozen teacher with classifier-free guidance: the fake score's UNet with every adapter
  off, which is the untouched teacher whether the student is a LoRA or a fully fine-tuned UNet.

The student moves its samples along the difference of the two scores (the VSD gradient of ProlificDreamer, Wang et al.
2023, as SwiftBrush's Algorithm 1, line 10 writes it); both networks are updated once per step, student first. The
pieces shared with DMD2 live in ``distill.score_distillation``; this file keeps SwiftBrush's choices (timestep ranges,
learning rates, the order of the updates).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..conditioning import Cond
from ..errors import DistillError
from ..lora import LoRASettings
from ..score_distillation import (WEIGHTINGS, fake_score_loss, one_step_x0, score_distillation_surrogate,
                                  student_and_fake_score, vsd_gradient)
from .base import LatentBatch, Method, SamplingSpec, Teacher

__all__ = ["SwiftBrush", "SwiftBrushConfig", "one_step_x0"]
# Learning-rate ratio fake score / student when --fake_score_lr_ratio is not given. SwiftBrush trains a full student
# at 1e-6 and the LoRA fake score at 1e-3 (ratio 1000); a LoRA student's usual rate is about 1e-4, so the same
# absolute fake-score rate is a ratio of 10.
DEFAULT_FAKE_LR_RATIO = {True: 1000.0, False: 10.0}


@dataclass
class SwiftBrushConfig(LoRASettings):
    """SwiftBrush's settings: real-score CFG 4.5, t ~ U[0.02T, 0.98T], a LoRA fake score with its own learning rate."""

    guidance_scale: float = field(default=4.5, metadata={
        "help": "CFG scale w of the real (teacher) score, eps_u + w (eps_c - eps_u); 1 turns guidance off."})
    min_timestep_ratio: float = field(default=0.02, metadata={
        "help": "Score-distillation timesteps t ~ U[min_timestep_ratio T, max_timestep_ratio T]: the lower end."})
    max_timestep_ratio: float = field(default=0.98, metadata={
        "help": "Upper end of the score-distillation timestep range, as a fraction of T."})
    weighting: str = field(default="swiftbrush", metadata={
        "help": "swiftbrush (sigma_t^2) or dmd (normalised x0-space) weighting of the VSD gradient."})
    full_finetune: bool = field(default=False, metadata={
        "help": "Train the whole UNet (SwiftBrush's setting) instead of a LoRA."})
    fake_lora_rank: int = field(default=64, metadata={
        "help": "LoRA rank of the fake score."})
    fake_lora_alpha: float = field(default=64.0, metadata={
        "help": "LoRA alpha of the fake score."})
    fake_score_lr_ratio: float | None = field(default=None, metadata={
        "help": "Fake-score learning rate = --learning_rate x this ratio; default: 10 for a LoRA student, 1000 with "
                "--full_finetune."})

    def __post_init__(self):
        super().__post_init__()
        if self.guidance_scale < 1:
            raise DistillError(f"--guidance_scale must be >= 1 (1 turns guidance off), got {self.guidance_scale}.")
        if not 0 <= self.min_timestep_ratio < self.max_timestep_ratio <= 1:
            raise DistillError("Need 0 <= --min_timestep_ratio < --max_timestep_ratio <= 1, got "
                               f"{self.min_timestep_ratio} and {self.max_timestep_ratio}.")
        if self.weighting not in WEIGHTINGS:
            raise DistillError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}.")
        if self.lora_rank < 1 or self.fake_lora_rank < 1:
            raise DistillError(f"--lora_rank and --fake_lora_rank must be positive, got {self.lora_rank} and "
                               f"{self.fake_lora_rank}.")
        if self.fake_score_lr_ratio is not None and self.fake_score_lr_ratio <= 0:
            raise DistillError(f"--fake_score_lr_ratio must be positive, got {self.fake_score_lr_ratio}.")



class SwiftBrush(Method):
    """A one-step student trained from prompts only against a guided real score and a LoRA fake score."""

    name = "swiftbrush"
    Config = SwiftBrushConfig
    data_kind = "prompts"

    def __init__(self, teacher: Teacher, config: SwiftBrushConfig):
        super().__init__(teacher, config)
        # 2. phi <- psi, theta <- psi: a fake-score LoRA on the teacher's UNet (on a copy of it for a full student),
        # and the student's LoRA on the same UNet (or every weight of it).
        student, self.student_params, fake_score = student_and_fake_score(
            teacher.unet, config, teacher.lora_targets, config.full_finetune, config.fake_lora_rank,
            config.fake_lora_alpha)
        self.fake_params = list(fake_score.parameters())
        self.nets["unet"] = student
        self.nets["fake_score"] = fake_score
        steps = teacher.schedule.num_train_timesteps
        self.t_min = round(config.min_timestep_ratio * steps)
        self.t_max = min(round(config.max_timestep_ratio * steps), steps - 1)

    def trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"unet": self.student_params, "fake_score": self.fake_params}

    def learning_rate_for(self, name: str, base_learning_rate: float) -> float:
        if name != "fake_score":
            return base_learning_rate
        ratio = self.config.fake_score_lr_ratio or DEFAULT_FAKE_LR_RATIO[self.config.full_finetune]
        return base_learning_rate * ratio

    # ------------------------------------------------------------------------------------------- pieces
    def generate(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The student's one-step sample from pure noise (Algorithm 1, line 6)."""
        return one_step_x0(self.denoiser(), z, cond)

    def sample_noise(self, batch_size: int, device) -> torch.Tensor:
        """z ~ N(0, I) in the teacher's latent space (Algorithm 1, line 4)."""
        return torch.randn((batch_size, *self.teacher.latent_shape), device=device)

    def sample_vsd_timesteps(self, batch_size: int, device) -> torch.Tensor:
        """t ~ U{0.02T, ..., 0.98T} for the student's update (Algorithm 1, line 7)."""
        return torch.randint(self.t_min, self.t_max + 1, (batch_size,), device=device)

    def sample_fake_timesteps(self, batch_size: int, device) -> torch.Tensor:
        """t' ~ U{0, ..., T-1} for the fake score's update (Algorithm 1, line 11)."""
        return torch.randint(0, self.teacher.schedule.num_train_timesteps, (batch_size,), device=device)

    def vsd_gradient(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, batch: LatentBatch) -> torch.Tensor:
        """omega(t) (eps_psi^w - eps_phi) at x_t: dL/dx0 of VSD with this run's guidance and weighting (line 10)."""
        return vsd_gradient(self.denoiser("fake_score"), x0, x_t, t, batch.cond, batch.uncond,
                            self.config.guidance_scale, self.config.weighting)

    def student_loss(self, x0: torch.Tensor, batch: LatentBatch) -> torch.Tensor:
        """The VSD surrogate: its gradient w.r.t. the student's sample x0 is the VSD gradient (Algorithm 1, l. 7-10)."""
        # 7. t ~ U[0.02T, 0.98T].
        t = self.sample_vsd_timesteps(x0.shape[0], x0.device)
        # 8-9. Diffuse the student's sample: x_t = alpha_t x0 + sigma_t eps.
        x_t = self.teacher.schedule.add_noise(x0.detach(), torch.randn_like(x0), t)
        # 10. omega(t) (eps_real - eps_fake), applied to x0 through 0.5 ||x0 - sg(x0 - grad)||^2.
        return score_distillation_surrogate(x0, self.vsd_gradient(x0, x_t, t, batch))

    def fake_score_loss(self, x0: torch.Tensor, batch: LatentBatch) -> torch.Tensor:
        """Denoising score matching of the fake score on the student's detached samples (Algorithm 1, l. 11-14)."""
        # 11. t' ~ U[0, T].
        t = self.sample_fake_timesteps(x0.shape[0], x0.device)
        # 12. eps' ~ N(0, I); 13-14. ||eps_phi(alpha_t' x0 + sigma_t' eps', t', y) - eps'||^2.
        eps = torch.randn_like(x0)
        return fake_score_loss(self.denoiser("fake_score"), x0, t, eps, batch.cond)

    def loss(self, batch: LatentBatch, step: int) -> dict[str, torch.Tensor]:
        device = batch.cond.prompt_embeds.device
        # 4. Pure noise z ~ N(0, I); 5. the batch's prompts y.
        z = self.sample_noise(batch.batch_size, device)
        # 6. The student's one-step sample x0 = f_theta(z, y).
        x0 = self.generate(z, batch.cond)
        # 7-10. The student's VSD update, then 11-14. the fake score's update on the same (detached) sample.
        return {"unet": self.student_loss(x0, batch), "fake_score": self.fake_score_loss(x0, batch)}

    def export_defaults(self) -> SamplingSpec:
        # DDIM, trailing grid, final alpha 1: one step at t = T - 1 returns the x0 above exactly (prev_sample = x0).
        return SamplingSpec("DDIMScheduler", num_inference_steps=1, guidance_scale=1.0, scheduler_config={
            "timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False, "thresholding": False})
