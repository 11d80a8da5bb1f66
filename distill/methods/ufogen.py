"""UFOGen: one-step text-to-image generation with a diffusion-GAN objective (Xu et al. 2023, sec. 4).

The generator is the teacher's UNet with a LoRA: from x_t it predicts x0' = G_theta(x_t, t). Training pairs are
T / K timesteps apart (t-1 := max(t - T/K, 0)). The real x_{t-1} is drawn from q(x_{t-1} | x0), the fake x'_{t-1}
from q(x_{t-1} | x0') (UFOGen's parameterisation, sec. 4.1; "posterior" draws both from q(x_{t-1} | x_t, .) as
DDGAN / SIDDM do). A discriminator tells them apart: by default, as in the paper, one initialised from the pre-trained
UNet and trained (its encoder, through a LoRA adapter of its own on the student's UNet, plus one head per feature
level), with the reference code's logistic loss whose logits are clamped at +-0.5 (``--discriminator_backbone frozen``
and ``--adversarial_loss hinge`` give heads on the frozen teacher's encoder, as PCM's). The generator also minimises
the reconstruction term gamma_t ||x0' - x0||^2 to which SIDDM's KL term reduces (sec. 4.1, appendix A.2.2). Both
networks train at --learning_rate (the reference: Adam at 1e-4 for both). Sampling: x0' = G(x_T, T) is the one-step
sample; with more steps x0' is re-noised to the next point of the K-point chain with fresh noise and denoised again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..conditioning import Cond
from ..discriminator import DiscriminatorHeads, TrainedEncoderDiscriminator, encoder_modules, teacher_features
from ..ema import EMASettings
from ..errors import DistillError
from ..lora import LoRASettings
from ..losses import ADVERSARIAL_LOSSES, adversarial_losses, gan_losses, generator_gan_loss, split_real_fake
from ..renoising import chain_timesteps, renoising_sample, x0_chain_scheduler_config
from ..schedule import posterior_mean_variance, transition_variance
from ..score_distillation import student_and_fake_score
from ..solvers import check_fits_teacher
from .base import LatentBatch, Method, SamplingSpec, Teacher

DISCRIMINATOR = "discriminator"
PREVIOUS_SAMPLES = ("marginal", "posterior")
TIMESTEP_SAMPLINGS = ("uniform", "chain")
NOISE_INPUT_PREVIOUS = ("chain", "uniform")
DISCRIMINATOR_BACKBONES = ("frozen", "lora")
DISCRIMINATOR_READS = ("encoder", "network")


@dataclass
class UFOGenConfig(EMASettings, LoRASettings):
    """UFOGen's objective with the reference implementation's defaults (K = 4 steps of T / 4, lambda = 1)."""

    num_denoising_steps: int = field(default=4, metadata={
        "help": "K: training pairs are T / K timesteps apart; the exported sampler (1 step by default) takes up to K."})
    timestep_sampling: str = field(default="uniform", metadata={
        "help": "How the generator's t is drawn: uniform, t ~ U{1, ..., T-1} (UFOGen; the reference code), or chain, "
                "only the K points t_k = k T/K - 1 its sampler visits (t = T-1 is the one-step sample's)."})
    noise_input_fraction: float = field(default=0.0, metadata={
        "help": "Fraction of each batch trained at the one-step sampler's t = T-1 on pure noise x_T = eps, the input "
                "the sampler gives it (0: UFOGen, every input x_t ~ q(x_t | x0)). SD's schedules end at a non-zero "
                "SNR: q(x_{T-1} | x0) still carries sqrt(abar_{T-1}) x0, 6.8% of x0 for SD, which a generator trained "
                "only on it learns to read and the sampler's pure noise does not have (Lin et al. 2024)."})
    noise_input_previous_timestep: str = field(default="chain", metadata={
        "help": "t-1 of the pure-noise rows (--noise_input_fraction): chain, T-1 - T/K, the chain's next point "
                "(UFOGen's pair), or uniform on {0, ..., T-1 - T/K}: the one-step sample is judged at every noise level "
                "up to the chain's, low ones included (q(x_s | x0') matches q(x_s) at every s when x0' matches the "
                "data, as in Diffusion-GAN)."})
    previous_sample: str = field(default="marginal", metadata={
        "help": "How x_{t-1} is drawn from x0: marginal, q(x_{t-1} | x0) (UFOGen), or posterior, q(x_{t-1} | x_t, x0) "
                "(DDGAN/SIDDM)."})
    adversarial_weight: float = field(default=1.0, metadata={
        "help": "Weight of the generator's adversarial loss."})
    adversarial_loss: str = field(default="logistic", metadata={
        "help": "GAN loss: hinge, or logistic (non-saturating, logits clamped at +-0.5 as the reference code does)."})
    discriminator_backbone: str = field(default="lora", metadata={
        "help": "frozen: heads on the frozen teacher's encoder features; lora: the encoder is trained too, through a "
                "LoRA adapter of its own on the same UNet (initialised as the teacher, as UFOGen's discriminator)."})
    discriminator_reads: str = field(default="encoder", metadata={
        "help": "Which features of the pre-trained network the discriminator's heads read: encoder (down and mid "
                "blocks; a transformer's first half) or network (a full forward: also the up blocks, at the latent's "
                "resolution; a transformer's final tokens), as UFOGen's discriminator is the whole network."})
    discriminator_zero_init: bool = field(default=False, metadata={
        "help": "Start the last layer of each discriminator head at zero, so every logit starts at 0 (the reference "
                "code zero-initialises its discriminator's output layer)."})
    discriminator_lora_rank: int | None = field(default=None, metadata={
        "help": "LoRA rank of the discriminator's encoder (--discriminator_backbone lora; default: --lora_rank)."})
    discriminator_adam_beta1: float | None = field(default=None, metadata={
        "help": "AdamW beta1 of the discriminator (default: --adam_beta1; the reference code uses 0 for it)."})
    discriminator_update_interval: int = field(default=1, metadata={
        "help": "The discriminator trains on every N-th optimizer step, from step 0 (the generator on every step); "
                "the reference code uses 2."})
    reconstruction_weight: float = field(default=1.0, metadata={
        "help": "Weight lambda of the reconstruction term gamma_t ||x0' - x0||^2."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_denoising_steps < 1:
            raise DistillError(f"--num_denoising_steps must be at least 1 (the reference uses 4), got "
                               f"{self.num_denoising_steps}.")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise DistillError(f"--timestep_sampling must be uniform (UFOGen) or chain, got "
                               f"{self.timestep_sampling!r}.")
        if not 0.0 <= self.noise_input_fraction <= 1.0:
            raise DistillError(f"--noise_input_fraction must be in [0, 1], got {self.noise_input_fraction}.")
        if self.noise_input_previous_timestep not in NOISE_INPUT_PREVIOUS:
            raise DistillError(f"--noise_input_previous_timestep must be chain or uniform, got "
                               f"{self.noise_input_previous_timestep!r}.")
        if self.previous_sample not in PREVIOUS_SAMPLES:
            raise DistillError(f"--previous_sample must be marginal (UFOGen) or posterior (DDGAN/SIDDM), got "
                               f"{self.previous_sample!r}.")
        if self.adversarial_loss not in ADVERSARIAL_LOSSES:
            raise DistillError(f"--adversarial_loss must be one of {', '.join(ADVERSARIAL_LOSSES)}, got "
                               f"{self.adversarial_loss!r}.")
        if self.discriminator_backbone not in DISCRIMINATOR_BACKBONES:
            raise DistillError(f"--discriminator_backbone must be frozen or lora, got {self.discriminator_backbone!r}.")
        if self.discriminator_reads not in DISCRIMINATOR_READS:
            raise DistillError(f"--discriminator_reads must be encoder or network, got {self.discriminator_reads!r}.")
        if self.discriminator_lora_rank is not None and self.discriminator_lora_rank < 1:
            raise DistillError(f"--discriminator_lora_rank must be positive, got {self.discriminator_lora_rank}.")
        if self.discriminator_adam_beta1 is not None and not 0 <= self.discriminator_adam_beta1 < 1:
            raise DistillError(f"--discriminator_adam_beta1 must be in [0, 1), got {self.discriminator_adam_beta1}.")
        if self.discriminator_update_interval < 1:
            raise DistillError(f"--discriminator_update_interval must be at least 1 (the reference uses 2), got "
                               f"{self.discriminator_update_interval}.")
        if self.adversarial_weight < 0 or self.reconstruction_weight < 0:
            raise DistillError(f"--adversarial_weight and --reconstruction_weight must be >= 0, got "
                               f"{self.adversarial_weight} and {self.reconstruction_weight}.")
        if self.adversarial_weight == 0 and self.reconstruction_weight == 0:
            raise DistillError("--adversarial_weight and --reconstruction_weight are both 0: the generator would "
                               "not train. Keep at least one positive (UFOGen uses 1 and 1).")

    def check_against_teacher(self, num_train_timesteps: int) -> None:
        """The K-point chain must fit the teacher's T training timesteps (called before any weights load)."""
        check_fits_teacher("num_denoising_steps", self.num_denoising_steps, num_train_timesteps)


class UFOGen(Method):
    """A LoRA generator x0' = G_theta(x_t, t) trained against a diffusion-GAN discriminator on the encoder half of
    the teacher's network."""

    name = "ufogen"
    Config = UFOGenConfig

    def __init__(self, teacher: Teacher, config: UFOGenConfig):
        super().__init__(teacher, config)
        num_train_timesteps = teacher.schedule.num_train_timesteps
        config.check_against_teacher(num_train_timesteps)
        self.gap = num_train_timesteps // config.num_denoising_steps
        self.whole_network = config.discriminator_reads == "network"
        heads = DiscriminatorHeads.from_unet_config(teacher.unet.config, self.whole_network,
                                                  config.discriminator_zero_init).to(teacher.unet.device)
        if config.discriminator_backbone == "lora":
            rank = config.discriminator_lora_rank or config.lora_rank
            targets = config.targets(teacher.lora_targets)
            student, self.lora_params, backbone = student_and_fake_score(
                teacher.unet, config, teacher.lora_targets, False, rank, rank * config.lora_alpha / config.lora_rank,
                adapter=DISCRIMINATOR, fake_targets=targets if self.whole_network else encoder_modules(teacher.unet,
                                                                                                     targets))
            self.nets["unet"] = student
            self.nets[DISCRIMINATOR] = TrainedEncoderDiscriminator(backbone, heads, self.whole_network)
        else:
            self.lora_params = config.attach_lora(teacher.unet, teacher.lora_targets)
            self.nets["unet"] = teacher.unet
            self.nets[DISCRIMINATOR] = heads
        self.keep_ema(self.lora_params)  # the reference samples from an EMA of the generator (--use_ema)

    def trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"unet": self.lora_params, DISCRIMINATOR: list(self.nets[DISCRIMINATOR].parameters())}

    def adam_betas_for(self, name: str, betas: tuple[float, float]) -> tuple[float, float]:
        """--discriminator_adam_beta1 for the discriminator (SIDDM/UFOGen reference code: Adam betas (0, 0.999))."""
        if name == DISCRIMINATOR and self.config.discriminator_adam_beta1 is not None:
            return self.config.discriminator_adam_beta1, betas[1]
        return betas

    def sample_timesteps(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """t ~ U{1, ..., T-1} (UFOGen sec. 4; reference code), or t uniform on the sampler's K-point chain, and
        its t-1 (``previous_timestep``)."""
        if self.config.timestep_sampling == "chain":
            chain = self.chain_timesteps(self.config.num_denoising_steps)
            t = chain[torch.randint(0, len(chain), (batch_size,))]
        else:
            t = torch.randint(1, self.teacher.schedule.num_train_timesteps, (batch_size,))
        return t.to(device), self.previous_timestep(t).to(device)

    def previous_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """t-1 := max(t - T/K, 0): one large denoising step, the chain's next point (UFOGen sec. 4.1)."""
        return (t - self.gap).clamp(min=0)

    def generator_inputs(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, t-1): x_t ~ q(x_t | x0) (UFOGen sec. 4.1), except that the first round(f B) rows
        (--noise_input_fraction f) sit at the one-step sampler's t = T-1 and read pure noise, as sampling does
        (SD's terminal SNR is not zero: Lin et al. 2024), with t-1 the chain's next point or (uniform) any lower one
        (Diffusion-GAN, Wang et al. 2023, sec. 3: matching diffused distributions at any level matches the data)."""
        t, t_prev = self.sample_timesteps(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x_t = self.teacher.schedule.add_noise(x0, noise, t)
        pure = round(self.config.noise_input_fraction * x0.shape[0])
        if pure:
            t, t_prev = t.clone(), t_prev.clone()
            one_step_t = self.chain_timesteps(1).to(t)
            chain_next = self.previous_timestep(one_step_t)
            t[:pure], t_prev[:pure] = one_step_t, chain_next
            if self.config.noise_input_previous_timestep == "uniform":
                t_prev[:pure] = torch.randint(0, int(chain_next) + 1, (pure,)).to(t_prev)
            x_t = torch.cat([noise[:pure].to(x_t.dtype), x_t[pure:]])
        return x_t, t, t_prev

    def generate(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The generator's sample x0' = G_theta(x_t, t), read from the UNet's eps/v/x0 output (UFOGen sec. 4.1)."""
        x0, _ = self.denoiser()(x_t, t, cond)
        return x0

    def previous_sample(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
        """x_{t-1} ~ q(x_{t-1} | x0) (UFOGen sec. 4.1), or ~ q(x_{t-1} | x_t, x0) (DDGAN; Ho et al. 2020, eq. 6-7)."""
        if self.config.previous_sample == "marginal":
            return self.teacher.schedule.add_noise(x0, noise, t_prev)
        mean, variance = posterior_mean_variance(self.teacher.schedule, x0, x_t.float(), t_prev, t)
        return mean + variance.sqrt() * noise

    def reconstruction_weight(self, t: torch.Tensor, t_prev: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """gamma_t = (1 - beta_t) abar_{t-1} / (2 beta_t) = abar_t / (2 beta_{t|t-1}) (UFOGen sec. 4.1, app. A.2.2)."""
        abar_t = self.teacher.schedule.alpha(t, like) ** 2
        return abar_t / (2 * transition_variance(self.teacher.schedule, t_prev, t, like))

    def chain_timesteps(self, num_steps: int) -> torch.Tensor:
        """num_steps evenly spaced points, from T-1 down, of the K-point chain t_k = k T/K - 1 (UFOGen sec. 4.1)."""
        return chain_timesteps(self.teacher.schedule.num_train_timesteps, self.config.num_denoising_steps, num_steps)

    def sample(self, noise: torch.Tensor, cond: Cond, timesteps: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """UFOGen sampling: x0' = G(x_t, t), then re-noise x0' to the next t with fresh noise (UFOGen sec. 4.1)."""
        return renoising_sample(lambda x, t: self.generate(x, t, cond), noise, timesteps, self.teacher.schedule,
                                generator)

    def loss(self, batch: LatentBatch, step: int) -> dict[str, torch.Tensor]:
        x0 = batch.latents.float()
        # 1-2. Sample t and the previous point t-1 = t - T/K of the K-step chain; diffuse the clean latents to
        #      x_t ~ q(x_t | x0) (with --noise_input_fraction, some rows read the sampler's pure noise at t = T-1).
        x_t, t, t_prev = self.generator_inputs(x0)
        # 3. The generator's clean sample x0' = G_theta(x_t, t).
        x0_fake = self.generate(x_t, t, batch.cond)
        # 4. Real x_{t-1} from x0 and fake x'_{t-1} from x0', with independent noise.
        real = self.previous_sample(x0, x_t, t, t_prev, torch.randn_like(x0))
        fake = self.previous_sample(x0_fake, x_t, t, t_prev, torch.randn_like(x0))
        # 5-6. The discriminator at t-1: the generator's GAN loss through the fake; on the discriminator's steps also
        #      the discriminator's own, on real and detached fake.
        train_discriminator = self.discriminator_steps(step)
        adversarial, discriminator = self.adversarial_losses(real, fake, t_prev, batch.cond, train_discriminator)
        # 7. Reconstruction gamma_t ||x0' - x0||^2, SIDDM's KL term between q(x_t | x'_{t-1}) and q(x_t | x_{t-1}).
        gamma = self.reconstruction_weight(t, t_prev, x0)
        reconstruction = (gamma * (x0_fake - x0).pow(2)).mean()
        # 8. Generator: lambda_adv * adversarial + lambda_rec * reconstruction; the discriminator trains on its own.
        generator = self.config.adversarial_weight * adversarial + self.config.reconstruction_weight * reconstruction
        if not train_discriminator:
            return {"unet": generator}
        return {"unet": generator, DISCRIMINATOR: discriminator}

    def discriminator_steps(self, step: int) -> bool:
        """Whether optimizer step ``step`` updates the discriminator: every N-th, from step 0 (the reference code
        updates it on even steps only)."""
        return step % self.config.discriminator_update_interval == 0

    def adversarial_losses(self, real: torch.Tensor, fake: torch.Tensor, t_prev: torch.Tensor, cond: Cond,
                           train_discriminator: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(generator, discriminator) GAN losses at t-1 (UFOGen sec. 4.1, eq. 4): the generator's reaches the
        generator through x'_{t-1} with D frozen; D's reaches D only, on real and detached fake (None, and D not run
        on them, when ``train_discriminator`` is False)."""
        kind, discriminator = self.config.adversarial_loss, self.nets[DISCRIMINATOR]
        bare = getattr(discriminator, "module", discriminator)
        if self.config.discriminator_backbone == "frozen":  # encoder features shared by both losses
            fake_features = teacher_features(self.denoiser(), fake, t_prev, cond, self.whole_network)
            if not train_discriminator:
                return generator_gan_loss(kind, bare.frozen(fake_features)), None
            with torch.no_grad():
                real_features = teacher_features(self.denoiser(), real, t_prev, cond, self.whole_network)
            return adversarial_losses(discriminator, real_features, fake_features, kind)
        timestep = self.teacher.schedule.network_timestep(t_prev)
        generator_logits = bare.frozen(fake, timestep, cond)
        if not train_discriminator:
            return generator_gan_loss(kind, generator_logits), None
        both = discriminator(torch.cat([real, fake.detach()]), torch.cat([timestep, timestep]), Cond.cat([cond, cond]))
        return gan_losses(kind, generator_logits, *split_real_fake(both))

    def export_defaults(self) -> SamplingSpec:
        return SamplingSpec("LCMScheduler", num_inference_steps=1, guidance_scale=1.0,
                            scheduler_config=x0_chain_scheduler_config(self.config.num_denoising_steps))
