"""Distances between student and target outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import DistillError


def distance(prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float = 0.001) -> torch.Tensor:
    """Mean squared error, or the pseudo-Huber distance sqrt(d^2 + c^2) - c (Song & Dhariwal 2023, iCT, sec. 3.3)."""
    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2).mean()
    if loss_type == "huber":
        return (diff.pow(2) + huber_c**2).sqrt().sub(huber_c).mean()
    raise ValueError(f"loss_type must be 'l2' or 'huber', got {loss_type!r}")


@dataclass
class DistanceSettings:
    """--loss_type and --huber_c, as in diffusers' LCM scripts; configs of methods that use ``distance`` inherit them."""

    loss_type: str = field(default="l2", metadata={
        "help": "Distance between student and target: l2 or huber (pseudo-Huber, sqrt(d^2 + c^2) - c)."})
    huber_c: float = field(default=0.001, metadata={
        "help": "c of the pseudo-Huber distance (--loss_type huber)."})

    def __post_init__(self):
        if self.loss_type not in ("l2", "huber"):
            raise DistillError(f"--loss_type must be l2 or huber, got {self.loss_type!r}.")
        if self.huber_c <= 0:
            raise DistillError(f"--huber_c must be positive, got {self.huber_c}.")
        parent = getattr(super(), "__post_init__", None)  # the other settings a config mixes in
        if parent is not None:
            parent()


def hinge_discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """relu(1 - D(real)) + relu(1 + D(fake)) over positions and levels (hinge GAN, Lim & Ye 2017; PCM Algorithm 1)."""
    terms = [torch.relu(1 - r.float()).mean() + torch.relu(1 + f.float()).mean()
             for r, f in zip(real_logits, fake_logits)]
    return torch.stack(terms).mean()


def hinge_generator_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """-D(fake), averaged over positions and feature levels (the hinge GAN generator loss, Lim & Ye 2017)."""
    return -torch.stack([f.float().mean() for f in fake_logits]).mean()


def score_distillation_surrogate(x0: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x0 - sg(x0 - g))^2), whose gradient w.r.t. x0 is g / x0.numel() (VSD / DMD surrogate loss).

    Score distillation gives dL/dx0 = g = omega(t) (eps_real - eps_fake) directly (SwiftBrush, Algorithm 1, line 10)
    but no loss; this is the loss with that gradient, as SwiftBrush's and DMD2's code write it: the target
    x0 - g is a constant, so d/dx0 of 0.5 (x0 - target)^2 is x0 - target = g, per element, before the mean.
    """
    target = (x0 - gradient).detach()
    return 0.5 * (x0.float() - target.float()).pow(2).mean()


# Logit margin of the clamped logistic GAN loss, as the SIDDM/UFOGen reference code clamps its logits.
LOGISTIC_MARGIN = 0.5


def clamped_logistic_discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor],
                                        margin: float = LOGISTIC_MARGIN) -> torch.Tensor:
    """softplus(-min(D(real), m)) + softplus(max(D(fake), -m)): the logistic GAN loss (Goodfellow et al. 2014) with
    the logits clamped at the margin m, so D stops pushing once real > m and fake < -m (SIDDM/UFOGen reference)."""
    terms = [torch.nn.functional.softplus(-r.float().clamp(max=margin)).mean()
             + torch.nn.functional.softplus(f.float().clamp(min=-margin)).mean()
             for r, f in zip(real_logits, fake_logits)]
    return torch.stack(terms).mean()


def clamped_logistic_generator_loss(fake_logits: list[torch.Tensor], margin: float = LOGISTIC_MARGIN) -> torch.Tensor:
    """softplus(-min(D(fake), m)): the non-saturating generator loss (Goodfellow et al. 2014, sec. 3), bounded: no
    gradient once a fake scores above the margin m, so the generator cannot keep exploiting the discriminator."""
    return torch.stack([torch.nn.functional.softplus(-f.float().clamp(max=margin)).mean()
                        for f in fake_logits]).mean()


ADVERSARIAL_LOSSES = {
    "hinge": (hinge_generator_loss, hinge_discriminator_loss),
    "logistic": (clamped_logistic_generator_loss, clamped_logistic_discriminator_loss),
}


def gan_losses(kind: str, generator_logits: list[torch.Tensor], real_logits: list[torch.Tensor],
               fake_logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator, discriminator) losses of ``kind`` ("hinge" or "logistic") from the discriminator's logits: on the
    fakes as the generator sees them (weights frozen), and on real and detached fakes as the discriminator sees them."""
    generator_loss, discriminator_loss = ADVERSARIAL_LOSSES[kind]
    return generator_loss(generator_logits), discriminator_loss(real_logits, fake_logits)


def generator_gan_loss(kind: str, generator_logits: list[torch.Tensor]) -> torch.Tensor:
    """The generator's loss of ``kind`` alone, from the logits of its fakes (on steps the discriminator skips)."""
    return ADVERSARIAL_LOSSES[kind][0](generator_logits)


def split_real_fake(logits: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-level logits of one discriminator pass over cat([real, fake]), split into (real, fake) lists."""
    real, fake = zip(*(level.chunk(2) for level in logits))
    return list(real), list(fake)


def adversarial_losses(heads: torch.nn.Module, real_features: list[torch.Tensor], fake_features: list[torch.Tensor],
                       kind: str = "hinge") -> tuple[torch.Tensor, torch.Tensor]:
    """(generator, discriminator) GAN losses of discriminator heads on feature maps: hinge (Lim & Ye 2017, eq. 5-6)
    or the clamped logistic loss (``kind="logistic"``).

    The generator's term reaches the fake features but not the heads (their weights are detached); the
    discriminator's term reaches the heads only (features detached), in one pass over real and fake.
    """
    generator_logits = getattr(heads, "module", heads).frozen(fake_features)
    both = heads([torch.cat([r.detach(), f.detach()]) for r, f in zip(real_features, fake_features)])
    return gan_losses(kind, generator_logits, *split_real_fake(both))
