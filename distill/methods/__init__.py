"""Distillation methods: one file each, registered below with one line each (see docs/adding_a_method.md)."""

from .base import LatentBatch, Method, SamplingSpec, Teacher
from .dmd2 import DMD2, DMD2Config
from .lcm import LCM, LCMConfig
from .pcm import PCM, PCMConfig
from .rectified import RectifiedConfig, RectifiedDiffusion
from .swiftbrush import SwiftBrush, SwiftBrushConfig
from .ufogen import UFOGen, UFOGenConfig

# The registry: one line per method. Its ``name`` is the command line's (python -m distill <name>).
REGISTERED: list[type[Method]] = [
    LCM,
    PCM,
    RectifiedDiffusion,
    SwiftBrush,
    UFOGen,
    DMD2,
]


def by_name(classes: list[type[Method]]) -> dict[str, type[Method]]:
    """{cls.name: cls}, refusing an empty or repeated name."""
    names = [cls.name for cls in classes]
    repeated = sorted({name for name in names if not name or names.count(name) > 1})
    if repeated:
        raise ValueError(f"Every registered method needs its own non-empty name; repeated or empty: {repeated}")
    return dict(zip(names, classes))


METHODS: dict[str, type[Method]] = by_name(REGISTERED)


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    if name not in METHODS:
        raise KeyError(f"Unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["DMD2", "DMD2Config", "LCM", "LCMConfig", "LatentBatch", "METHODS", "Method", "PCM", "PCMConfig", "REGISTERED", "RectifiedConfig",
           "RectifiedDiffusion", "SamplingSpec", "SwiftBrush", "SwiftBrushConfig", "Teacher", "UFOGen", "UFOGenConfig",
           "get_method"]
