"""In-memory sampling for evaluation: images from a pipeline with UNet evaluations (NFE) and wall time counted."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Samples:
    """Generated images (uint8 N x H x W x 3) with their cost."""

    images: np.ndarray
    nfe_per_image: float
    seconds_per_image: float


def to_uint8(images: np.ndarray) -> np.ndarray:
    """A pipeline's ``output_type="np"`` images (floats in [0, 1]) as uint8 N x H x W x 3."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def denoiser_network(pipe) -> torch.nn.Module:
    """The pipeline's denoiser network: its UNet (SD, SDXL) or transformer (SD3, FLUX.1)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


@contextlib.contextmanager
def count_unet_evaluations(unet: torch.nn.Module):
    """Count denoiser evaluations as rows pushed through forward (a CFG step on a batch of one counts 2)."""
    counter = {"rows": 0}

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        counter["rows"] += sample.shape[0]

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@torch.no_grad()
def generate(pipe, prompts: list[str], num_inference_steps: int, guidance_scale: float, seed: int = 0,
             batch_size: int = 50, height: int | None = None, width: int | None = None) -> Samples:
    """Images for ``prompts`` in batches with a fixed seed; NFE per image and seconds per image measured."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    with count_unet_evaluations(denoiser_network(pipe)) as counter:
        started = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            out = pipe(prompts[start: start + batch_size], num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, generator=generator, height=height, width=width,
                       output_type="np")
            chunks.append(to_uint8(out.images))
        elapsed = time.perf_counter() - started
    return Samples(np.concatenate(chunks), counter["rows"] / len(prompts), elapsed / len(prompts))
