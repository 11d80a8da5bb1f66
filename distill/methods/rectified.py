"""Rectified Diffusion (Wang et al. 2024): retrain on the teacher's own coupled noise-sample pairs.

Three variants (``--rectified_variant``):

- ``pairs`` (Algorithm 4): eps-prediction training on stored pairs (eps, x0_hat) written by
  train_scripts/generate_pairs.py, with x_t = alpha_t x0_hat + sigma_t eps. The student learns the first-order ODE
  through each pair, so DDIM sampling (which follows exactly that ODE) needs few steps.
- ``phased``: no stored pairs. Inside each of M phases the CFG teacher solves its ODE online (DDIM on the skipping-step
  grid) from a noised training latent at the phase's upper edge to its lower edge; the two ends define a line
  (eps = Delta(x/alpha) / Delta(sigma/alpha)) and the student, from any point of that line, must land on the lower end.
- ``consistency``: consistency distillation along the first-order ODE of each stored pair, whose exact solution is
  known: the student's x0 prediction at t_{n+k} must equal its (stop-gradient) prediction at t_n, and x0_hat itself at
  the clean end.

Every variant samples with DDIMScheduler (trailing timesteps, ``set_alpha_to_one=True`` so the last step returns the
x0 prediction), which is the first-order solver the student was trained to follow.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..denoiser import Denoiser
from ..ema import EMASettings
from ..errors import DistillError
from ..lora import LoRASettings
from ..losses import DistanceSettings, distance
from ..schedule import ddim_timesteps, phase_edges
from ..solvers import cfg_teacher_prediction, check_fits_teacher, ddim_step, line_through
from .base import LatentBatch, Method, SamplingSpec, Teacher

VARIANTS = ("pairs", "phased", "consistency")
CLEAN = -1  # the timestep index standing for the clean end (alpha = 1, sigma = 0)


@dataclass
class RectifiedConfig(EMASettings, DistanceSettings, LoRASettings):
    """Defaults of the Rectified Diffusion reference (phased: 40-step DDIM grid in 4 phases, teacher CFG w = 2)."""

    rectified_variant: str = field(default="pairs", metadata={
        "help": "pairs (Algorithm 4, needs --pairs_dir), phased (online teacher inside --num_phases phases, image "
                "data) or consistency (consistency distillation along each pair's line)."})
    num_ddim_timesteps: int = field(default=40, metadata={
        "help": "N, the number of points on the teacher's DDIM grid (phased and consistency variants); a multiple of "
                "--num_phases."})
    num_phases: int = field(default=4, metadata={
        "help": "Phases M of the phased variant; --num_ddim_timesteps must be a multiple."})
    teacher_guidance_scale: float = field(default=3.0, metadata={  # pipeline form: w = 2 in LCM's (1 + w) c - w u
        "help": "CFG scale (pipeline form, 1 disables guidance) of the phased variant's online teacher."})
    num_inference_steps: int | None = field(default=None, metadata={
        "help": "Default number of steps of the exported sampler; default: --num_phases (phased) or 2 (pairs, "
                "consistency)."})
    full_finetune: bool = field(default=False, metadata={
        "help": "Train the whole UNet instead of a LoRA."})

    def __post_init__(self):
        super().__post_init__()
        if self.rectified_variant not in VARIANTS:
            raise DistillError(f"--rectified_variant must be one of {', '.join(VARIANTS)}, got "
                               f"{self.rectified_variant!r}.")
        if not 1 <= self.num_phases <= self.num_ddim_timesteps <= 1000:
            raise DistillError(f"Need 1 <= --num_phases <= --num_ddim_timesteps <= 1000, got num_phases="
                               f"{self.num_phases}, num_ddim_timesteps={self.num_ddim_timesteps}.")
        if self.num_ddim_timesteps % self.num_phases:
            raise DistillError(f"--num_ddim_timesteps ({self.num_ddim_timesteps}) must be a multiple of --num_phases "
                               f"({self.num_phases}) so every phase has the same number of teacher steps; e.g. "
                               f"--num_ddim_timesteps {self.num_phases * 10}.")
        if self.teacher_guidance_scale < 1.0:
            raise DistillError(f"--teacher_guidance_scale must be >= 1 (1 disables guidance), got "
                               f"{self.teacher_guidance_scale}.")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise DistillError(f"--num_inference_steps must be >= 1, got {self.num_inference_steps}.")

    def check_against_teacher(self, num_train_timesteps: int) -> None:
        """The N-point DDIM grid must fit the teacher's T training timesteps (called before any weights load)."""
        check_fits_teacher("num_ddim_timesteps", self.num_ddim_timesteps, num_train_timesteps)


class RectifiedDiffusion(Method):
    """An eps-prediction student (LoRA or full UNet, optional EMA) on the teacher's first-order ODE."""

    name = "rectified"
    Config = RectifiedConfig
    data_kind = "pairs"

    def __init__(self, teacher: Teacher, config: RectifiedConfig):
        super().__init__(teacher, config)
        # The phased variant needs the teacher while a fully fine-tuned UNet trains: keep a frozen copy.
        self.frozen_teacher = (copy.deepcopy(teacher.unet).requires_grad_(False).eval()
                               if config.full_finetune and config.rectified_variant == "phased" else None)
        self.params = config.student_parameters(teacher.unet, teacher.lora_targets, config.full_finetune)
        self.nets["unet"] = teacher.unet
        self.keep_ema(self.params)
        num_train = teacher.schedule.num_train_timesteps
        config.check_against_teacher(num_train)
        self.grid = ddim_timesteps(num_train, config.num_ddim_timesteps)
        self.skip = num_train // config.num_ddim_timesteps
        self.steps_per_phase = config.num_ddim_timesteps // config.num_phases
        # Upper edges s_1 < ... < s_M of the phases; phase m spans (s_m - steps_per_phase * k, s_m], the first one
        # ending at the clean end, where a trailing DDIM sampler's last step lands.
        self.upper_edges = phase_edges(num_train, config.num_ddim_timesteps, config.num_phases)[1:]

    @classmethod
    def data_kind_for(cls, config: RectifiedConfig) -> str:
        return "images" if config.rectified_variant == "phased" else "pairs"

    # ------------------------------------------------------------------------------------------ interface
    def trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"unet": self.params}

    def loss(self, batch: LatentBatch, step: int) -> dict[str, torch.Tensor]:
        variant = self.config.rectified_variant
        if variant == "phased":
            return {"unet": self.phased_loss(batch)}
        if batch.noise is None:
            raise DistillError(f"The {variant} variant trains on noise-latent pairs: pass --pairs_dir.")
        if variant == "consistency":
            return {"unet": self.consistency_loss(batch)}
        return {"unet": self.pairs_loss(batch)}

    def export_defaults(self) -> SamplingSpec:
        steps = self.config.num_inference_steps
        if steps is None:
            steps = self.config.num_phases if self.config.rectified_variant == "phased" else 2
        return SamplingSpec("DDIMScheduler", num_inference_steps=steps, guidance_scale=1.0, scheduler_config={
            "timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False})

    # ------------------------------------------------------------------------------------------ pieces
    def teacher_denoiser(self):
        """The frozen teacher: a separate copy (full fine-tune) or the UNet with its LoRA adapters disabled."""
        if self.frozen_teacher is not None:
            return Denoiser(self.frozen_teacher, self.teacher.schedule).as_teacher()
        return self.denoiser().as_teacher()

    def sample_timesteps(self, batch_size: int, device) -> torch.Tensor:
        """t ~ U{0, ..., T-1} (Rectified Diffusion, Algorithm 4, "sample time t uniformly")."""
        return torch.randint(0, self.teacher.schedule.num_train_timesteps, (batch_size,), device=device)

    def sample_grid_pair(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """t_{n+k} uniform on the skipping-step grid t_i = i k - 1 and t_n = t_{n+k} - k (-1: the clean end)."""
        start = self.grid[torch.randint(0, len(self.grid), (batch_size,))]
        return start.to(device), (start - self.skip).to(device)

    def sample_phase(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A phase per sample, its edges (upper s_m, lower s_{m-1}) and t ~ U{s_{m-1} + 1, ..., s_m} inside it."""
        upper = self.upper_edges[torch.randint(0, len(self.upper_edges), (batch_size,))]
        lower = upper - self.steps_per_phase * self.skip
        t = lower + 1 + (torch.rand(batch_size) * (upper - lower).float()).long()
        return upper.to(device), lower.to(device), t.to(device)

    @torch.no_grad()
    def teacher_phase_solve(self, x_start: torch.Tensor, upper: torch.Tensor, batch: LatentBatch) -> torch.Tensor:
        """The CFG teacher's DDIM solution from the phase's upper edge down the grid to its lower edge."""
        schedule = self.teacher.schedule
        w = torch.full((x_start.shape[0],), self.config.teacher_guidance_scale - 1.0, device=x_start.device)
        x, t = x_start, upper
        with self.teacher_denoiser() as teacher:
            for _ in range(self.steps_per_phase):
                x0, eps = cfg_teacher_prediction(teacher, x, t, batch.cond, batch.uncond, w)
                x = ddim_step(schedule, x0, eps, t - self.skip)
                t = t - self.skip
        return x

    def student_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The student's x0 prediction, i.e. the end of its first-order ODE from x_t."""
        x0, _ = self.denoiser()(x_t, t, cond)
        return x0

    # ------------------------------------------------------------------------------------------ losses
    def pairs_loss(self, batch: LatentBatch) -> torch.Tensor:
        """Rectified Diffusion eps-prediction loss on a coupled pair (Wang et al. 2024, Algorithm 4); on a flow-matching
        teacher reflow's velocity regression (Rectified Flow, Liu et al. 2022, eq. 1 on teacher pairs)."""
        x0_hat, eps = batch.latents, batch.noise
        schedule = self.teacher.schedule
        # 1. Sample t uniformly on the teacher's training timesteps.
        t = self.sample_timesteps(x0_hat.shape[0], x0_hat.device)
        # 2. x_t = alpha_t x0_hat + sigma_t eps with the pair's own noise (not fresh noise).
        x_t = schedule.add_noise(x0_hat, eps, t)
        # 3. Predict with the student.
        x0_pred, eps_hat = self.denoiser()(x_t, t, batch.cond)
        # 4. L = || eps_hat - eps ||^2 (flow teacher: || v_hat - (eps - x0_hat) ||^2).
        return distance(schedule.regression_target(x0_pred, eps_hat), schedule.regression_target(x0_hat, eps),
                        self.config.loss_type, self.config.huber_c)

    def phased_loss(self, batch: LatentBatch) -> torch.Tensor:
        """Phased Rectified Diffusion: straighten the teacher's ODE inside each phase (Wang et al. 2024, phased)."""
        latents = batch.latents
        bsz, device = latents.shape[0], latents.device
        # 1. Pick a phase (s_{m-1}, s_m] per sample and a timestep t inside it.
        upper, lower, t = self.sample_phase(bsz, device)
        # 2. Diffuse the training latent to the phase's upper edge: x_{s_m} ~ q(x_{s_m} | z).
        x_start = self.teacher.schedule.add_noise(latents, torch.randn_like(latents), upper)
        # 3. Solve the CFG teacher's ODE online from s_m to s_{m-1} (DDIM on the skipping-step grid).
        x_end = self.teacher_phase_solve(x_start, upper, batch)
        # 4. The line joining the two ends: its noise eps = Delta(x / alpha) / Delta(sigma / alpha) and its x0 ...
        x0_line, eps = line_through(self.teacher.schedule, x_start, x_end, upper, lower)
        # 5. ... and the point of that line at t.
        x_t = ddim_step(self.teacher.schedule, x0_line, eps, t)
        # 6. The student's prediction, followed along its own first-order ODE to the lower edge.
        x0_hat, eps_hat = self.denoiser()(x_t, t, batch.cond)
        prediction = ddim_step(self.teacher.schedule, x0_hat, eps_hat, lower)
        # 7. Distance to the teacher's end of the phase.
        return distance(prediction, x_end, self.config.loss_type, self.config.huber_c)

    def consistency_loss(self, batch: LatentBatch) -> torch.Tensor:
        """Consistency distillation along the pair's exact first-order ODE (Rectified Diffusion (CD); CM, Song 2023)."""
        x0_hat, eps = batch.latents, batch.noise
        schedule = self.teacher.schedule
        # 1. Sample adjacent grid timesteps t_{n+k} > t_n (t_n = -1 is the clean end).
        t_start, t_prev = self.sample_grid_pair(x0_hat.shape[0], x0_hat.device)
        # 2. Both points lie on the pair's line x_t = alpha_t x0_hat + sigma_t eps: the exact ODE step.
        x_start = schedule.add_noise(x0_hat, eps, t_start)
        x_prev = ddim_step(schedule, x0_hat, eps, t_prev)
        # 3. The student's consistency function (its x0 prediction) at t_{n+k}.
        prediction = self.student_x0(x_start, t_start, batch.cond)
        with torch.no_grad():
            # 4. The target: the same network at t_n, gradient stopped; x0_hat itself at the clean end.
            clean = (t_prev < 0).view(-1, *([1] * (x0_hat.dim() - 1)))
            target = torch.where(clean, x0_hat, self.student_x0(x_prev, t_prev.clamp(min=0), batch.cond))
        # 5. Distance between the two ends of the consistency pair.
        return distance(prediction, target, self.config.loss_type, self.config.huber_c)
