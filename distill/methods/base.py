"""The interface every distillation method implements; the trainer never knows which one it runs."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

from ..batching import LatentBatch
from ..teacher import TeacherInfo
from ..denoiser import AdapterView, Denoiser
from ..ema import StudentEMA
from ..schedule import NoiseSchedule


@dataclass(frozen=True)
class SamplingSpec:
    """How the exported student samples: scheduler class and config overrides, step count, guidance scale."""

    scheduler: str  # a diffusers scheduler class, or one shipped in distill.pipelines (see distill/export.py)
    num_inference_steps: int
    guidance_scale: float = 1.0
    scheduler_config: dict = field(default_factory=dict)  # overrides on top of the teacher's scheduler config


# How each sampler of a DDPM student carries over to a student of a flow-matching teacher: the same rule on the same
# timestep grid, done by pipelines/scheduler_flow.py's FlowFewStepScheduler on the teacher's sigmas.
FLOW_SAMPLERS = {
    "LCMScheduler": {"sampler": "consistency", "timestep_spacing": "lcm"},
    "PCMScheduler": {"sampler": "ode", "timestep_spacing": "phases"},
    "DDIMScheduler": {"sampler": "ode", "timestep_spacing": "trailing"},
}
FLOW_KEPT_SETTINGS = ("original_inference_steps", "timestep_scaling")


def on_flow_teacher(spec: SamplingSpec, schedule: NoiseSchedule) -> SamplingSpec:
    """``spec`` for a student of a flow-matching teacher: FlowFewStepScheduler with the same rule and grid, on the
    sigmas the student trained at (a resolution-dependent shift, FLUX.1's, is fixed by its ``mu``)."""
    if spec.scheduler not in FLOW_SAMPLERS:
        raise ValueError(f"no flow-matching counterpart of {spec.scheduler}")
    settings = {k: v for k, v in spec.scheduler_config.items() if k in FLOW_KEPT_SETTINGS}
    if spec.scheduler == "DDIMScheduler":  # trailing spacing on all training timesteps
        settings["original_inference_steps"] = schedule.num_train_timesteps
    if getattr(schedule, "mu", None) is not None:
        settings["mu"] = schedule.mu
    return SamplingSpec("FlowFewStepScheduler", spec.num_inference_steps, spec.guidance_scale,
                        {**FLOW_SAMPLERS[spec.scheduler], **settings})


@dataclass
class Teacher:
    """What a method gets from the trainer: the teacher's UNet (to become the student), its schedule and family."""

    unet: torch.nn.Module
    schedule: NoiseSchedule
    info: TeacherInfo
    latent_shape: tuple[int, int, int] = (4, 64, 64)  # (channels, height, width) of one latent at training size

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The modules a LoRA adapts by default on this teacher's network (its family's list)."""
        return self.info.family_spec.lora_target_modules

    @classmethod
    def of(cls, loaded) -> "Teacher":
        """The method's view of a :class:`~distill.teacher.LoadedTeacher` (its network, schedule, family, shape)."""
        return cls(loaded.network, loaded.schedule, loaded.info, loaded.latent_shape)


class Method(abc.ABC):
    """Base class: ``nets`` holds the trainable networks (the trainer wraps them for distributed training)."""

    name: str = ""  # the command line's name: python -m distill <name>
    # A dataclass of the method's hyperparameters, one flag each (help in field(metadata={"help": ...})). It may define
    # check_against_teacher(num_train_timesteps), which the pre-flight checks call before any weights load.
    Config: type = object
    # What the method trains on: "images" (image-caption data, VAE-encoded), "prompts" (captions only) or
    # "pairs" (teacher noise/latent pairs written by train_scripts/generate_pairs.py).
    data_kind: str = "images"

    def __init__(self, teacher: Teacher, config):
        self.teacher = teacher
        self.config = config
        self.nets: dict[str, torch.nn.Module] = {}
        self.ema: StudentEMA | None = None  # see keep_ema

    def keep_ema(self, params: list[torch.nn.Parameter]) -> None:
        """With --use_ema (``EMASettings``), average the student's ``params`` and validate and export the average."""
        if getattr(self.config, "use_ema", False):
            self.ema = StudentEMA(params, self.config.ema_decay, self.config.ema_warmup)

    @abc.abstractmethod
    def trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters per optimizer, in the order the trainer steps them."""

    @abc.abstractmethod
    def loss(self, batch: LatentBatch, step: int) -> dict[str, torch.Tensor]:
        """Losses keyed like ``trainable``; each reaches only its own group's parameters. A step may return a subset
        (groups updated at different rates): the trainer steps only the returned groups. Decide it from ``step``, the
        optimizer step, which every micro-batch of an accumulation window shares."""

    @abc.abstractmethod
    def export_defaults(self) -> SamplingSpec:
        """The scheduler, steps and guidance the exported student samples with."""

    def sampling(self) -> SamplingSpec:
        """``export_defaults`` for this teacher's family (a flow-matching teacher samples on its own sigmas)."""
        spec = self.export_defaults()
        if not self.teacher.info.family_spec.flow_matching:
            return spec
        return on_flow_teacher(spec, self.teacher.schedule)

    @classmethod
    def data_kind_for(cls, config) -> str:
        """The data kind this configuration trains on (a method with variants may override)."""
        return cls.data_kind

    def learning_rate_for(self, name: str, base_learning_rate: float) -> float:
        """Default learning rate of optimizer ``name`` (--learning_rates overrides it; e.g. a fake score's own lr)."""
        return base_learning_rate

    def adam_betas_for(self, name: str, betas: tuple[float, float]) -> tuple[float, float]:
        """AdamW betas of optimizer ``name`` (default: --adam_beta1, --adam_beta2; e.g. a GAN discriminator's own)."""
        return betas

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer update (updates the EMA, when one is kept)."""
        if self.ema is not None:
            self.ema.step()

    def checkpoint_objects(self) -> list:
        """Extra objects with state_dict/load_state_dict saved in every checkpoint (the EMA, when one is kept)."""
        return [self.ema.average] if self.ema is not None else []

    def student_unet(self) -> torch.nn.Module:
        """The UNet to validate and export: a copy holding the EMA weights when one is kept; a student that is one
        adapter of a shared UNet, an ``AdapterView``, gives that UNet with only the student's adapter on."""
        net = self.nets["unet"]
        bare = getattr(net, "module", net)
        unet = bare.activated() if isinstance(bare, AdapterView) else net
        return self.ema.averaged_copy(getattr(unet, "module", unet)) if self.ema is not None else unet

    def denoiser(self, name: str = "unet") -> Denoiser:
        """The (possibly distributed-wrapped) network ``name`` as a denoiser on the teacher's schedule."""
        return Denoiser(self.nets[name], self.teacher.schedule)
