"""Validation grids: the student's samples at 1 step and at its default step count, for fixed prompts and seed."""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def validation_grid(pipe, prompts: list[str], steps: int, guidance_scale: float, resolution: int) -> torch.Tensor:
    """One row of images per step count in {1, steps}, generator seeded with 0 for each row."""
    from torchvision.utils import make_grid

    rows = []
    for count in sorted({1, steps}):
        generator = torch.Generator().manual_seed(0)
        images = pipe(prompts, num_inference_steps=count, guidance_scale=guidance_scale, height=resolution,
                      width=resolution, generator=generator, output_type="pt").images
        rows.append(images.float().cpu())
    return make_grid(torch.cat(rows), nrow=len(prompts))


def save_validation_grid(grid: torch.Tensor, output_dir: Path, step: int, trackers=()) -> Path:
    """output_dir/validation/step-N.png, and the grid to tensorboard when it tracks the run."""
    from torchvision.utils import save_image

    path = output_dir / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step)
    return path
