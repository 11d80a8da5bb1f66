"""Phased consistency distillation with a CFG-augmented teacher solver (PCM, Wang et al. 2024, Algorithm 1).

The teacher's PF-ODE is split at M edges s_0 = 0 < s_1 < ... < s_M on the DDIM grid. Inside phase [s_m, s_{m+1}] the
student f^m_theta(x_t, t) maps x_t to x_{s_m}, the start of its phase, with one DDIM jump of its own (x0, eps)
prediction; consistency is only asked within a phase, so M steps sample exactly on the trained edges. An optional
adversarial term compares the student's and the target's x_{s_m}, re-noised to a time inside the phase, with a
discriminator made of the frozen teacher's encoder features and small trainable heads (hinge loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..discriminator import DiscriminatorHeads, teacher_features
from ..errors import DistillError
from ..lora import LoRASettings
from ..losses import DistanceSettings, distance, adversarial_losses
from ..schedule import diffuse_between, phase_edges, phase_lower_edge, skipping_step_pairs
from ..solvers import CFGSolverSettings, cfg_teacher_ddim_step, ddim_step, teacher_ddim_step
from .base import LatentBatch, Method, SamplingSpec, Teacher

DISCRIMINATOR = "discriminator"


@dataclass
class PCMConfig(CFGSolverSettings, DistanceSettings, LoRASettings):
    """Defaults of the reference PCM-LoRA training scripts (SD 1.5, 4 phases, N = 50, w in [4, 5], Huber loss).

    ``adv_weight`` > 0 adds the adversarial term (the reference uses 0.1 with ``adv_lr`` 1e-5); 0 trains plain PCD.
    ``not_apply_cfg_solver`` makes the teacher step unguided (train with --proportion_empty_prompts > 0, e.g. 0.1),
    so the student keeps the teacher's CFG at inference: it is exported with guidance 1 + (w_min + w_max) / 2.
    """

    multiphase: int = field(default=4, metadata={
        "help": "Phases M the ODE trajectory is split into (each with its own consistency target); also the exported "
                "number of sampling steps. The reference uses 1, 2, 4 or 8."})
    w_min: float = field(default=4.0, metadata={
        "help": "Minimum guidance scale w sampled for the CFG-augmented teacher ((1+w) cond - w uncond)."})
    w_max: float = field(default=5.0, metadata={
        "help": "Maximum guidance scale w sampled for the CFG-augmented teacher."})
    not_apply_cfg_solver: bool = field(default=False, metadata={
        "help": "Unguided teacher steps, so the student keeps the teacher's CFG at inference (exported with guidance "
                "1 + (w_min + w_max) / 2); train with --proportion_empty_prompts > 0, e.g. 0.1."})
    loss_type: str = field(default="huber", metadata={  # the reference scripts' default
        "help": "Distance between student and target: l2 or huber (pseudo-Huber, sqrt(d^2 + c^2) - c)."})
    adv_weight: float = field(default=0.0, metadata={
        "help": "Weight of the adversarial term (0: plain phased consistency distillation; the reference uses 0.1)."})
    adv_lr: float = field(default=1e-5, metadata={
        "help": "Learning rate of the discriminator heads when --adv_weight > 0."})

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.multiphase <= self.num_ddim_timesteps:
            raise DistillError(f"--multiphase must be between 1 and --num_ddim_timesteps ({self.num_ddim_timesteps}) "
                               f"so every phase holds a DDIM step, got {self.multiphase}; the reference uses 1, 2, 4 "
                               "or 8.")
        if self.adv_weight < 0:
            raise DistillError(f"--adv_weight must be >= 0 (0 turns the adversarial term off), got {self.adv_weight}.")
        if self.adv_lr <= 0:
            raise DistillError(f"--adv_lr must be positive, got {self.adv_lr}.")


class PCM(Method):
    """A LoRA student whose phased consistency function f^m_theta maps x_t to the start s_m of its phase."""

    name = "pcm"
    Config = PCMConfig

    def __init__(self, teacher: Teacher, config: PCMConfig):
        super().__init__(teacher, config)
        num_train_timesteps = teacher.schedule.num_train_timesteps
        self.grid, self.skip = config.skipping_grid(num_train_timesteps)
        self.lora_params = config.attach_lora(teacher.unet, teacher.lora_targets)
        self.nets["unet"] = teacher.unet
        self.edges = phase_edges(num_train_timesteps, config.num_ddim_timesteps, config.multiphase)
        if config.adv_weight > 0:
            self.nets[DISCRIMINATOR] = DiscriminatorHeads.from_unet_config(teacher.unet.config)

    def trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        groups = {"unet": self.lora_params}
        if DISCRIMINATOR in self.nets:
            groups[DISCRIMINATOR] = [p for p in self.nets[DISCRIMINATOR].parameters() if p.requires_grad]
        return groups

    def learning_rate_for(self, name: str, base_learning_rate: float) -> float:
        return self.config.adv_lr if name == DISCRIMINATOR else base_learning_rate

    def consistency_function(self, x_t: torch.Tensor, t: torch.Tensor, edge: torch.Tensor, cond) -> torch.Tensor:
        """f^m_theta(x_t, t) = alpha_{s_m} x0_theta + sigma_{s_m} eps_theta, and x_t at t = s_m (PCM, Algorithm 1)."""
        x0, eps = self.denoiser()(x_t, t, cond)
        jumped = ddim_step(self.teacher.schedule, x0, eps, edge)
        at_edge = (t == edge).view(-1, *([1] * (x_t.dim() - 1)))
        return torch.where(at_edge, x_t.float(), jumped)

    def teacher_step(self, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, batch: LatentBatch,
                     w: torch.Tensor) -> torch.Tensor:
        """One DDIM step of the teacher from t to t_prev: CFG-augmented, or conditional only (no-CFG solver)."""
        with self.denoiser().as_teacher() as teacher:
            if self.config.not_apply_cfg_solver:
                return teacher_ddim_step(teacher, x_t, t, t_prev, batch.cond)
            return cfg_teacher_ddim_step(teacher, x_t, t, t_prev, batch.cond, batch.uncond, w)

    def sample_adversarial_timesteps(self, edge: torch.Tensor) -> torch.Tensor:
        """t' ~ U[s_m, s_m + T / M) inside the phase, where both ends are re-noised (reference implementation)."""
        width = self.teacher.schedule.num_train_timesteps // self.config.multiphase
        offset = (torch.rand(edge.shape, device=edge.device) * width).long()
        return (edge + offset).clamp(max=self.teacher.schedule.num_train_timesteps - 1)

    def loss(self, batch: LatentBatch, step: int) -> dict[str, torch.Tensor]:
        latents = batch.latents
        bsz, device = latents.shape[0], latents.device
        # 1. Sample t_{n+k} on the DDIM grid, t_n = t_{n+k} - k, and the phase [s_m, s_{m+1}] holding t_{n+k}.
        t_start, t_prev = (t.to(device) for t in skipping_step_pairs(self.grid, self.skip, bsz))
        edge = phase_lower_edge(t_start, self.edges)
        # 2. Diffuse the clean latents to x_{t_{n+k}} ~ N(alpha z, sigma^2 I).
        x_start = self.teacher.schedule.add_noise(latents, torch.randn_like(latents), t_start)
        # 3. Sample a guidance scale w ~ U[w_min, w_max] per example.
        w = self.config.sample_guidance(bsz, device)
        # 4. The student's end of the pair: x~_{s_m} = f^m_theta(x_{t_{n+k}}, t_{n+k}).
        prediction = self.consistency_function(x_start, t_start, edge, batch.cond)
        with torch.no_grad():
            # 5. One DDIM step of the (CFG-augmented) teacher from t_{n+k} to t_n.
            x_prev = self.teacher_step(x_start, t_start, t_prev, batch, w)
            # 6. The target x^_{s_m} = f^m_{theta^-}(x_{t_n}, t_n): same LoRA weights, gradient stopped.
            target = self.consistency_function(x_prev, t_prev, edge, batch.cond)
        # 7. Consistency within the phase: d(x~_{s_m}, x^_{s_m}).
        loss = distance(prediction, target, self.config.loss_type, self.config.huber_c)
        if DISCRIMINATOR not in self.nets:
            return {"unet": loss}
        # 8. Re-noise both ends from s_m to t' inside the phase: x~_{t'} (fake) and x^_{t'} (real).
        t_adv = self.sample_adversarial_timesteps(edge)
        fake = diffuse_between(self.teacher.schedule, prediction, torch.randn_like(prediction), edge, t_adv)
        real = diffuse_between(self.teacher.schedule, target, torch.randn_like(target), edge, t_adv)
        # 9. Teacher encoder features: through the fake sample for the generator, without gradient for the real one.
        fake_features = teacher_features(self.denoiser(), fake, t_adv, batch.cond)
        with torch.no_grad():
            real_features = teacher_features(self.denoiser(), real, t_adv, batch.cond)
        # 10. Hinge losses: the generator's -D(x~_{t'}) through frozen heads, and the discriminator's
        #     relu(1 - D(x^_{t'})) + relu(1 + D(x~_{t'})) on detached features.
        generator, discriminator = adversarial_losses(self.nets[DISCRIMINATOR], real_features, fake_features)
        # 11. Generator loss: consistency + lambda * adversarial; the discriminator's loss is stepped after it.
        return {"unet": loss + self.config.adv_weight * generator, DISCRIMINATOR: discriminator}

    def export_defaults(self) -> SamplingSpec:
        guidance = 1.0 + (self.config.w_min + self.config.w_max) / 2 if self.config.not_apply_cfg_solver else 1.0
        return SamplingSpec("PCMScheduler", num_inference_steps=self.config.multiphase, guidance_scale=guidance,
                            scheduler_config={"original_inference_steps": self.config.num_ddim_timesteps,
                                              "multiphase": self.config.multiphase, "gamma": 0.0})
