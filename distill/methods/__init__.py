"""Distillation methods, registered by name."""

from .base import LatentBatch, Method, Teacher
from .lcm import LCM, LCMConfig

METHODS: dict[str, type[Method]] = {LCM.name: LCM}


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    if name not in METHODS:
        raise KeyError(f"Unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "LCM", "LCMConfig", "LatentBatch", "Method", "Teacher", "get_method"]
