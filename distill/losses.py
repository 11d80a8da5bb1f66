"""Distances between student and target outputs."""

from __future__ import annotations

import torch


def distance(prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float = 0.001) -> torch.Tensor:
    """Mean squared error, or the pseudo-Huber distance sqrt(d^2 + c^2) - c (Song & Dhariwal 2023, iCT, sec. 3.3)."""
    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2).mean()
    if loss_type == "huber":
        return (diff.pow(2) + huber_c**2).sqrt().sub(huber_c).mean()
    raise ValueError(f"loss_type must be 'l2' or 'huber', got {loss_type!r}")
