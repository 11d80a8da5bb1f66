"""An exponential moving average of a student's trained weights, validated and exported in their place."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .errors import DistillError


@dataclass
class EMASettings:
    """--use_ema and --ema_decay, as in diffusers' training scripts; configs of methods that keep an EMA inherit them."""

    use_ema: bool = field(default=False, metadata={
        "help": "Keep and export an EMA of the trained weights (diffusers EMAModel)."})
    ema_decay: float = field(default=0.9999, metadata={
        "help": "Decay of the EMA of the trained weights (--use_ema), in (0, 1)."})

    def __post_init__(self):
        if not 0.0 < self.ema_decay < 1.0:
            raise DistillError(f"--ema_decay must be in (0, 1), got {self.ema_decay}; e.g. 0.9999.")
        parent = getattr(super(), "__post_init__", None)  # the other settings a config mixes in
        if parent is not None:
            parent()


class StudentEMA:
    """theta_ema <- d theta_ema + (1 - d) theta after every update (diffusers' EMAModel, its warm-up included)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.average = EMAModel(params, decay=decay)

    def step(self) -> None:
        self.average.step(self.params)

    def tracking(self, params: list[torch.nn.Parameter]) -> "StudentEMA":
        """A fresh average, with this one's decay, of ``params`` (the sharded parameters that replaced the tracked
        ones when sharded training wraps the networks, before any step)."""
        return StudentEMA(params, self.average.decay)

    def averaged_copy(self, unet: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``unet`` (which holds the tracked parameters) with the averages in place of the live weights."""
        names = {id(p): name for name, p in unet.named_parameters()}
        averaged = copy.deepcopy(unet)
        by_name = dict(averaged.named_parameters())
        self.average.copy_to([by_name[names[id(p)]] for p in self.params])
        return averaged
