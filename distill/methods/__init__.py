"""Distillation methods, registered by name."""

from .base import LatentBatch, Method, Teacher
from .lcm import LCM, LCMConfig
from .pcm import PCM, PCMConfig
from .rectified import RectifiedConfig, RectifiedDiffusion
from .swiftbrush import SwiftBrush, SwiftBrushConfig
from .ufogen import UFOGen, UFOGenConfig

METHODS: dict[str, type[Method]] = {LCM.name: LCM, PCM.name: PCM, SwiftBrush.name: SwiftBrush,
                                 RectifiedDiffusion.name: RectifiedDiffusion, UFOGen.name: UFOGen}


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    if name not in METHODS:
        raise KeyError(f"Unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "LCM", "LCMConfig", "LatentBatch", "Method", "PCM", "PCMConfig", "RectifiedConfig", "RectifiedDiffusion", "SwiftBrush", "SwiftBrushConfig",
           "Teacher", "UFOGen", "UFOGenConfig", "get_method"]
