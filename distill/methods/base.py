"""The interface every distillation method implements; the trainer never knows which one it runs."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..conditioning import Cond, TeacherInfo
from ..denoiser import Denoiser
from ..schedule import NoiseSchedule


@dataclass
class Teacher:
    """What a method gets from the trainer: the teacher's UNet (to become the student), its schedule and family."""

    unet: torch.nn.Module
    schedule: NoiseSchedule
    info: TeacherInfo


@dataclass
class LatentBatch:
    """A training batch in latent space: clean latents with their prompt and empty-prompt conditions."""

    latents: torch.Tensor
    cond: Cond
    uncond: Cond


class Method(abc.ABC):
    """Base class: ``nets`` holds the trainable networks (the trainer wraps them for distributed training)."""

    name: str = ""
    Config: type = object

    def __init__(self, teacher: Teacher, config):
        self.teacher = teacher
        self.config = config
        self.nets: dict[str, torch.nn.Module] = {}

    @abc.abstractmethod
    def trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters per optimizer, in the order the trainer steps them."""

    @abc.abstractmethod
    def loss(self, batch: LatentBatch, step: int) -> dict[str, torch.Tensor]:
        """One loss per optimizer (same keys as ``trainable``); each loss only reaches its own parameters."""

    @abc.abstractmethod
    def export_defaults(self) -> dict:
        """Scheduler class and config overrides, steps and guidance the exported student samples with."""

    def denoiser(self, name: str = "unet") -> Denoiser:
        """The (possibly distributed-wrapped) network ``name`` as a denoiser on the teacher's schedule."""
        return Denoiser(self.nets[name], self.teacher.schedule)
