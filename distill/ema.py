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
    ema_warmup: bool = field(default=True, metadata={
        "help": "Warm the EMA's decay up as diffusers' EMAModel does: min(--ema_decay, (1 + n) / (10 + n)) at update n.",
        "help_off": "Average at --ema_decay from the second update on (the first copies the weights), as the UFOGen "
                    "reference code's EMA of 0.99 does; with the warm-up the decay stays below 0.99 until update 890."})

    def __post_init__(self):
        if not 0.0 < self.ema_decay < 1.0:
            raise DistillError(f"--ema_decay must be in (0, 1), got {self.ema_decay}; e.g. 0.9999.")
        parent = getattr(super(), "__post_init__", None)  # the other settings a config mixes in
        if parent is not None:
            parent()


class StudentEMA:
    """theta_ema <- d theta_ema + (1 - d) theta after every update (diffusers' EMAModel; ``warmup``: its warm-up
    d_n = min(decay, (1 + n) / (10 + n)), else d_n = decay from the second update on)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, warmup: bool = True):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.warmup = warmup
        self.average = EMAModel(params, decay=decay, min_decay=0.0 if warmup else decay)

    def step(self) -> None:
        self.average.step(self.params)

    def tracking(self, params: list[torch.nn.Parameter]) -> "StudentEMA":
        """A fresh average, with this one's decay, of ``params`` (the sharded parameters that replaced the tracked
        ones when sharded training wraps the networks, before any step)."""
        return StudentEMA(params, self.average.decay, self.warmup)

    def averaged_copy(self, unet: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``unet`` (which holds the tracked parameters) with the averages in place of the live weights."""
        names = {id(p): name for name, p in unet.named_parameters()}
        averaged = copy.deepcopy(unet)
        by_name = dict(averaged.named_parameters())
        self.average.copy_to([by_name[names[id(p)]] for p in self.params])
        return averaged
