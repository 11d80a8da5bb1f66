"""DMD2: distribution matching distillation with a two time-scale update rule, a GAN term and a multi-step generator
trained by backward simulation (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image
Synthesis"; reference code tianweiy/DMD2).

Three networks start as the teacher:

* the generator G_theta: the teacher's UNet with a LoRA (default) or fully tuned; a K-step generator reads the
  K-point chain T-1, ..., T/K - 1 (999/749/499/249 for K = 4) and is trained at step k on the input that running
  itself through steps 0..k-1 produces (backward simulation, sec. 4.5), so training inputs are the inference inputs;
* the fake score mu_fake: a second LoRA adapter of the same UNet (of a copy of the teacher for a full student),
  trained by denoising score matching on the generator's detached samples (sec. 3 / DMD sec. 3.2);
* the real score mu_real: the frozen teacher with classifier-free guidance (the fake score's UNet, adapters off).

Per step the fake score (and, with the GAN term, a classifier on its bottleneck, sec. 4.3) is updated; the generator
is updated on every ``dfake_gen_update_ratio``-th step only (the two time-scale update rule, sec. 4.2), first, from
the same sample. The generator minimises the distribution matching loss (its gradient is the difference of the two
scores in x0 space, normalised per sample), plus the non-saturating GAN loss on the fake score's bottleneck, plus
(optionally, DMD v1 sec. 3.3) a regression to teacher noise/sample pairs. The score pieces shared with SwiftBrush
live in ``distill.score_distillation``, the sampler in ``distill.renoising``, the classifier in
``distill.discriminator``.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..conditioning import Cond
from ..discriminator import BottleneckClassifier, adapter_bottleneck, capture_bottleneck
from ..errors import DistillError
from ..lora import LoRASettings
from ..losses import distance, score_distillation_surrogate
from ..renoising import chain_timesteps, sampler_input, x0_chain_scheduler_config
from ..score_distillation import student_and_fake_score, vsd_gradient
from ..solvers import check_fits_teacher
from .base import LatentBatch, Method, SamplingSpec, Teacher

__all__ = ["DMD2", "DMD2Config", "REFERENCE_DEFAULTS"]
CLASSIFIER = "discriminator"
# The reference's settings per teacher family where they differ (experiments/sdv1.5 and experiments/sdxl): the real
# score's guidance, fake-score updates per generator update, the generator's GAN weight, and the generator's steps.
REFERENCE_DEFAULTS = {
    "sd": {"real_guidance_scale": 1.75, "dfake_gen_update_ratio": 10, "gen_cls_loss_weight": 1e-3,
           "num_denoising_step": 1},
    "sdxl": {"real_guidance_scale": 8.0, "dfake_gen_update_ratio": 5, "gen_cls_loss_weight": 5e-3,
             "num_denoising_step": 4},
    # No reference run: SDXL's settings, the guidance of diffusers' SD3 pipeline (7.0), and the GAN term off (its
    # classifier reads the transformer's half-depth tokens, a choice no reference run has measured; SDXL uses 5e-3).
    "sd3": {"real_guidance_scale": 7.0, "dfake_gen_update_ratio": 5, "gen_cls_loss_weight": 0.0,
            "num_denoising_step": 4},
    # Nor on FLUX.1: the same, with FluxPipeline's default guidance 3.5 (FLUX.1-dev's guidance input).
    "flux": {"real_guidance_scale": 3.5, "dfake_gen_update_ratio": 5, "gen_cls_loss_weight": 0.0,
             "num_denoising_step": 4},
}


def family_default_help(what: str, key: str) -> str:
    """Help text naming the reference's default of ``key`` for each family."""
    values = ", ".join(f"{name} {REFERENCE_DEFAULTS[family][key]:g}"
                       for name, family in (("SD 1.x/2.x", "sd"), ("SDXL", "sdxl")))
    return f"{what} Default: the reference's for the teacher's family ({values})."


@dataclass
class DMD2Config(LoRASettings):
    """DMD2's settings, named as the reference code names them; None means the reference's value for the family."""

    lora_alpha: float = field(default=8.0, metadata={
        "help": "LoRA alpha of the generator (the reference's SDXL LoRA run: rank 64, alpha 8)."})
    real_guidance_scale: float | None = field(default=None, metadata={
        "help": family_default_help("CFG scale of the real (teacher) score, eps_u + w (eps_c - eps_u).",
                                    "real_guidance_scale")})
    dfake_gen_update_ratio: int | None = field(default=None, metadata={
        "help": family_default_help("Fake-score (and classifier) updates per generator update: the generator "
                                    "steps on every N-th optimizer step.", "dfake_gen_update_ratio")})
    min_step_percent: float = field(default=0.02, metadata={
        "help": "Distribution matching timesteps t ~ U[min_step_percent T, max_step_percent T]: the lower end."})
    max_step_percent: float = field(default=0.98, metadata={
        "help": "Upper end of the distribution matching timestep range, as a fraction of T."})
    dm_loss_weight: float = field(default=1.0, metadata={
        "help": "Weight of the distribution matching loss in the generator's loss (0: the GAN term alone)."})
    gen_cls_loss_weight: float | None = field(default=None, metadata={
        "help": family_default_help("Weight of the generator's GAN loss; 0 turns the GAN term off (the method then "
                                    "trains from prompts only).", "gen_cls_loss_weight")})
    guidance_cls_loss_weight: float = field(default=1e-2, metadata={
        "help": "Weight of the classifier's loss in the fake score's loss."})
    diffusion_gan_max_timestep: int = field(default=1000, metadata={
        "help": "The classifier reads samples noised to t ~ U[0, this) (the reference's --diffusion_gan); 0 reads "
                "clean samples at t = 0."})
    num_denoising_step: int | None = field(default=None, metadata={
        "help": family_default_help("K: the generator's steps, on the chain T-1, ..., T/K - 1 (999, 749, 499, 249 "
                                    "for K = 4).", "num_denoising_step")})
    backward_simulation: bool = field(default=True, metadata={
        "help": "K > 1: train step k on the input the generator itself produces by running steps 0..k-1 from "
                "noise (sec. 4.5); off: on dataset images noised to t_k (needs images)."})
    regression_loss_weight: float = field(default=0.0, metadata={
        "help": "Weight of DMD v1's regression of the generator's one-step sample onto teacher noise/sample pairs "
                "(--pairs_dir from train_scripts/generate_pairs.py); 0 turns it off."})
    regression_loss_type: str = field(default="l2", metadata={
        "help": "Distance of the regression loss in latent space: l2 or huber (DMD v1 uses LPIPS on images)."})
    guidance_lr: float | None = field(default=None, metadata={
        "help": "Learning rate of the fake score and classifier (default: --learning_rate, as the reference's equal "
                "--generator_lr and --guidance_lr)."})
    full_finetune: bool = field(default=False, metadata={
        "help": "Train the whole UNet (the reference's SD1.5 setting) instead of a LoRA."})
    fake_lora_rank: int = field(default=64, metadata={
        "help": "LoRA rank of the fake score (the reference tunes a full copy; a LoRA keeps one UNet in memory)."})
    fake_lora_alpha: float = field(default=64.0, metadata={
        "help": "LoRA alpha of the fake score."})

    def __post_init__(self):
        super().__post_init__()
        if self.real_guidance_scale is not None and self.real_guidance_scale < 1:
            raise DistillError(f"--real_guidance_scale must be >= 1 (1 turns guidance off), got "
                               f"{self.real_guidance_scale}.")
        if self.dfake_gen_update_ratio is not None and self.dfake_gen_update_ratio < 1:
            raise DistillError(f"--dfake_gen_update_ratio must be at least 1, got {self.dfake_gen_update_ratio}.")
        if not 0 <= self.min_step_percent < self.max_step_percent <= 1:
            raise DistillError("Need 0 <= --min_step_percent < --max_step_percent <= 1, got "
                               f"{self.min_step_percent} and {self.max_step_percent}.")
        weights = {"dm_loss_weight": self.dm_loss_weight, "gen_cls_loss_weight": self.gen_cls_loss_weight,
                   "guidance_cls_loss_weight": self.guidance_cls_loss_weight,
                   "regression_loss_weight": self.regression_loss_weight}
        negative = [f"--{name} {value}" for name, value in weights.items() if value is not None and value < 0]
        if negative:
            raise DistillError(f"Loss weights must be >= 0, got {', '.join(negative)}.")
        if self.dm_loss_weight == 0 and self.gen_cls_loss_weight == 0 and self.regression_loss_weight == 0:
            raise DistillError("--dm_loss_weight, --gen_cls_loss_weight and --regression_loss_weight are all 0: the "
                               "generator would not train.")
        if self.regression_loss_weight > 0 and self.gan:
            raise DistillError("--regression_loss_weight trains on teacher pairs (--pairs_dir) and the GAN term on "
                               "real images: a run reads one dataset. Set --gen_cls_loss_weight 0 with the regression "
                               "loss, or --regression_loss_weight 0 with the GAN term.")
        if self.regression_loss_weight > 0 and not self.backward_simulation:
            raise DistillError("--no_backward_simulation noises dataset images; with --regression_loss_weight the "
                               "dataset is teacher pairs. Keep backward simulation on.")
        if self.regression_loss_type not in ("l2", "huber"):
            raise DistillError(f"--regression_loss_type must be l2 or huber, got {self.regression_loss_type!r}.")
        if self.num_denoising_step is not None and self.num_denoising_step < 1:
            raise DistillError(f"--num_denoising_step must be at least 1, got {self.num_denoising_step}.")
        if self.diffusion_gan_max_timestep < 0:
            raise DistillError(f"--diffusion_gan_max_timestep must be >= 0, got {self.diffusion_gan_max_timestep}.")
        if self.guidance_lr is not None and self.guidance_lr <= 0:
            raise DistillError(f"--guidance_lr must be positive, got {self.guidance_lr}.")
        if self.lora_rank < 1 or self.fake_lora_rank < 1:
            raise DistillError(f"--lora_rank and --fake_lora_rank must be positive, got {self.lora_rank} and "
                               f"{self.fake_lora_rank}.")

    @property
    def gan(self) -> bool:
        """Whether the GAN term is on (its generator weight, the family's default when not given, is positive)."""
        return self.gen_cls_loss_weight is None or self.gen_cls_loss_weight > 0

    def check_against_teacher(self, num_train_timesteps: int) -> None:
        """K steps and the classifier's timestep range must fit the teacher's T (called before weights load)."""
        if self.num_denoising_step is not None:
            check_fits_teacher("num_denoising_step", self.num_denoising_step, num_train_timesteps)
        if self.diffusion_gan_max_timestep > num_train_timesteps:
            raise DistillError(f"--diffusion_gan_max_timestep ({self.diffusion_gan_max_timestep}) cannot exceed the "
                               f"teacher's {num_train_timesteps} training timesteps.")

    def for_family(self, family: str) -> "DMD2Config":
        """This configuration with every value left to the reference filled in for ``family``."""
        if family not in REFERENCE_DEFAULTS:
            raise DistillError(f"DMD2 has reference defaults for {sorted(REFERENCE_DEFAULTS)} teachers, not "
                               f"{family!r}.")
        filled = {key: value for key, value in REFERENCE_DEFAULTS[family].items() if getattr(self, key) is None}
        return replace(self, **filled)


class DMD2(Method):
    """A K-step generator trained by distribution matching against a guided real score and a LoRA fake score."""

    name = "dmd2"
    Config = DMD2Config
    data_kind = "images"

    @classmethod
    def data_kind_for(cls, config: DMD2Config) -> str:
        """Pairs for the regression loss; images for the GAN term's real samples (or images noised to t_k without
        backward simulation); prompts otherwise."""
        if config.regression_loss_weight > 0:
            return "pairs"
        return "images" if config.gan or not config.backward_simulation else "prompts"

    def __init__(self, teacher: Teacher, config: DMD2Config):
        config = config.for_family(teacher.info.family)
        config.check_against_teacher(teacher.schedule.num_train_timesteps)
        super().__init__(teacher, config)
        student, self.student_params, fake_score = student_and_fake_score(
            teacher.unet, config, teacher.lora_targets, config.full_finetune, config.fake_lora_rank,
            config.fake_lora_alpha)
        self.nets["unet"] = student
        self.nets["fake_score"] = fake_score
        self.guidance_params = list(fake_score.parameters())
        if config.gan:
            classifier = BottleneckClassifier.for_network(teacher.unet, teacher.latent_shape[-1])
            self.nets[CLASSIFIER] = classifier.to(teacher.unet.device)
            self.guidance_params += list(classifier.parameters())
        steps = teacher.schedule.num_train_timesteps
        self.t_min = int(config.min_step_percent * steps)
        self.t_max = min(int(config.max_step_percent * steps), steps - 1)
        self.timesteps = chain_timesteps(steps, config.num_denoising_step)

    def trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        # The fake score and the classifier are one optimizer, as the reference's guidance model: the classifier's
        # loss reaches both.
        return {"unet": self.student_params, "fake_score": self.guidance_params}

    def learning_rate_for(self, name: str, base_learning_rate: float) -> float:
        if name == "fake_score" and self.config.guidance_lr is not None:
            return self.config.guidance_lr
        return base_learning_rate

    def generator_steps(self, step: int) -> bool:
        """Whether optimizer step ``step`` updates the generator: every N-th, from step 0 (sec. 4.2)."""
        return step % self.config.dfake_gen_update_ratio == 0

    # ------------------------------------------------------------------------------------------ the generator
    def generate(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The generator's sample x0 = (x_t - sigma_t eps_theta(x_t, t)) / alpha_t (any prediction type)."""
        x0, _ = self.denoiser()(x_t, t, cond)
        return x0

    def simulated_chain_step(self, step: int) -> int:
        """k ~ U{0..K-1} for backward simulation, one per optimizer step: the same on every process and micro-batch
        (the reference broadcasts it), so sharded processes run the same number of generator calls."""
        return int(torch.randint(0, len(self.timesteps), (1,), generator=torch.Generator().manual_seed(step)))

    def generator_inputs(self, batch: LatentBatch, device, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t): where the generator is trained this step. K = 1: pure noise at T-1. K > 1 with backward
        simulation: chain step k (``simulated_chain_step``), its input made by the current generator (sec. 4.5);
        without: dataset latents noised to t_k, k per sample, pure noise at T-1 (the reference's --denoising)."""
        shape = (batch.batch_size, *self.teacher.latent_shape)
        noise = torch.randn(shape, device=device)
        chain = self.timesteps.to(device)
        if len(chain) == 1:
            return noise, chain.expand(shape[0])
        if self.config.backward_simulation:
            k = self.simulated_chain_step(step)
            x_t = sampler_input(lambda x, t: self.generate(x, t, batch.cond), noise, chain, self.teacher.schedule, k)
            return x_t, chain[k].expand(shape[0])
        t = chain[torch.randint(0, len(chain), (shape[0],), device=device)]
        x_t = self.teacher.schedule.add_noise(batch.latents.float(), noise, t)
        pure = (t == self.teacher.schedule.num_train_timesteps - 1).view(-1, 1, 1, 1)
        return torch.where(pure, noise, x_t), t

    def distribution_matching_loss(self, x0: torch.Tensor, batch: LatentBatch) -> torch.Tensor:
        """0.5 ||x0 - sg(x0 - g)||^2 with g = (x0_fake - x0_real) / mean|x0 - x0_real| at x_t ~ q(x_t | x0),
        t ~ U[0.02T, 0.98T]: the gradient of KL(p_fake || p_real) (DMD, Yin et al. 2024, sec. 3.2; DMD2 sec. 3)."""
        t = torch.randint(self.t_min, self.t_max + 1, (x0.shape[0],), device=x0.device)
        x_t = self.teacher.schedule.add_noise(x0.detach(), torch.randn_like(x0), t)
        gradient = vsd_gradient(self.denoiser("fake_score"), x0, x_t, t, batch.cond, batch.uncond,
                                self.config.real_guidance_scale, "dmd")
        return score_distillation_surrogate(x0, torch.nan_to_num(gradient))

    def classifier_timesteps(self, batch_size: int, device) -> torch.Tensor:
        """t ~ U{0, ..., diffusion_gan_max_timestep - 1} for the classifier's inputs (t = 0 when that is 0)."""
        if self.config.diffusion_gan_max_timestep == 0:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        return torch.randint(0, self.config.diffusion_gan_max_timestep, (batch_size,), device=device)

    def classifier_input(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t): a sample as the classifier reads it, noised to its own random timestep (the diffusion GAN)."""
        t = self.classifier_timesteps(x0.shape[0], x0.device)
        return self.teacher.schedule.add_noise(x0, torch.randn_like(x0), t), t

    def generator_gan_loss(self, x0: torch.Tensor, batch: LatentBatch) -> torch.Tensor:
        """softplus(-D(x0)): the non-saturating GAN loss, D the classifier on the fake score's bottleneck, both
        frozen so that the loss reaches only the generator (DMD2 sec. 4.3)."""
        x_t, t = self.classifier_input(x0)
        fake_score = getattr(self.nets["fake_score"], "module", self.nets["fake_score"])
        features = adapter_bottleneck(fake_score, x_t, self.teacher.schedule.network_timestep(t), batch.cond)
        classifier = getattr(self.nets[CLASSIFIER], "module", self.nets[CLASSIFIER])
        return F.softplus(-classifier.frozen(features)).mean()

    def generator_loss(self, batch: LatentBatch, x_t: torch.Tensor,
                       t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the generator's loss, its sample x0): distribution matching + GAN + regression, one generator call."""
        config = self.config
        regression = config.regression_loss_weight > 0
        if regression:  # the pairs' noise at T-1 rides in the same call (one forward with gradients per step)
            last = torch.full_like(t, self.teacher.schedule.num_train_timesteps - 1)
            x_all = self.generate(torch.cat([x_t, batch.noise.float()]), torch.cat([t, last]),
                                  Cond.cat([batch.cond, batch.cond]))
            x0, x0_pairs = x_all.chunk(2)
        else:
            x0 = self.generate(x_t, t, batch.cond)
        loss = x0.new_zeros(())
        if config.dm_loss_weight > 0:
            loss = loss + config.dm_loss_weight * self.distribution_matching_loss(x0, batch)
        if config.gan:
            loss = loss + config.gen_cls_loss_weight * self.generator_gan_loss(x0, batch)
        if regression:
            loss = loss + config.regression_loss_weight * distance(x0_pairs, batch.latents,
                                                                   config.regression_loss_type)
        return loss, x0

    # ----------------------------------------------------------------------------- the fake score (guidance)
    def guidance_loss(self, x0: torch.Tensor, batch: LatentBatch) -> torch.Tensor:
        """Denoising score matching of the fake score on the generator's detached samples, t ~ U[0, T) (DMD sec.
        3.2), plus the classifier's softplus(D(fake)) + softplus(-D(real)) on its bottleneck (DMD2 sec. 4.3): one
        fake-score call over the score-matching rows and the classifier's fake and real rows."""
        x0 = x0.detach()
        batch_size = x0.shape[0]
        t = torch.randint(0, self.teacher.schedule.num_train_timesteps, (batch_size,), device=x0.device)
        eps = torch.randn_like(x0)
        rows, steps, conds = [self.teacher.schedule.add_noise(x0, eps, t)], [t], [batch.cond]
        if self.config.gan:
            for sample in (x0, batch.latents.float()):
                x_t, t_cls = self.classifier_input(sample)
                rows.append(x_t), steps.append(t_cls), conds.append(batch.cond)
        fake_score = self.denoiser("fake_score")
        network = getattr(fake_score.module, "unet", fake_score.module)
        with capture_bottleneck(network) if self.config.gan else contextlib.nullcontext() as bottleneck:
            x0_fake, eps_fake = fake_score(torch.cat(rows), torch.cat(steps), Cond.cat(conds))
        schedule = self.teacher.schedule
        loss = distance(schedule.regression_target(x0_fake[:batch_size], eps_fake[:batch_size]),
                        schedule.regression_target(x0, eps), "l2")
        if self.config.gan:
            logits_fake, logits_real = self.nets[CLASSIFIER](bottleneck[0][batch_size:]).chunk(2)
            classification = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
            loss = loss + self.config.guidance_cls_loss_weight * classification
        return loss

    def loss(self, batch: LatentBatch, step: int) -> dict[str, torch.Tensor]:
        device = batch.cond.prompt_embeds.device
        # The generator's sample from where it is trained (with gradients on its update steps only).
        x_t, t = self.generator_inputs(batch, device, step)
        losses = {}
        if self.generator_steps(step):
            losses["unet"], x0 = self.generator_loss(batch, x_t, t)
        else:
            with torch.no_grad():
                x0 = self.generate(x_t, t, batch.cond)
        # The fake score (and classifier) on the same sample, every step.
        losses["fake_score"] = self.guidance_loss(x0, batch)
        return losses

    def export_defaults(self) -> SamplingSpec:
        # LCMScheduler on the K-point chain with x0 passed through: each step is the generator's x0, re-noised with
        # fresh noise to the next chain point (distill.renoising); K steps by default, fewer take evenly spaced points.
        return SamplingSpec("LCMScheduler", num_inference_steps=self.config.num_denoising_step, guidance_scale=1.0,
                            scheduler_config=x0_chain_scheduler_config(self.config.num_denoising_step))

