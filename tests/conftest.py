"""Session fixtures: tiny SD- and SDXL-shaped teachers saved to disk, and a small real image folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.testing import build_tiny_flux_teacher, build_tiny_sd3_teacher, build_tiny_teacher

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per pytest-xdist worker (two workers share the two cores); two when the suite runs in one process.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def sd_teacher(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("teachers") / "tiny-sd", sdxl=False, seed=0)


@pytest.fixture(scope="session")
def sdxl_teacher(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("teachers") / "tiny-sdxl", sdxl=True, seed=0)


@pytest.fixture(scope="session")
def sd3_teacher(tmp_path_factory) -> Path:
    """A tiny SD3-shaped teacher: flow-matching transformer, two CLIP encoders and T5 (distill.testing)."""
    return build_tiny_sd3_teacher(tmp_path_factory.mktemp("teachers") / "tiny-sd3", seed=0)


@pytest.fixture(scope="session")
def flux_teacher(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev-shaped teacher: packed latents, guidance input, CLIP-L pooled + T5 (distill.testing)."""
    return build_tiny_flux_teacher(tmp_path_factory.mktemp("teachers") / "tiny-flux", seed=0)


@pytest.fixture(scope="session", params=["sd", "sdxl"])
def teacher(request, sd_teacher, sdxl_teacher) -> Path:
    return sd_teacher if request.param == "sd" else sdxl_teacher


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Eight real PNGs (non-square, varied content) with captions in metadata.jsonl."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(8):
            base = np.zeros((40, 48, 3), dtype=np.uint8)
            base[:, : 6 * (i + 1)] = 255 * (i % 2)
            noise = (rng.random((40, 48, 3)) * 60).astype(np.uint8)
            Image.fromarray(base + noise).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a striped picture number {i}"}) + "\n")
    return folder


def subprocess_env(**extra: str) -> dict:
    """Environment of the fresh processes tests start: offline, and one OpenMP thread.

    On a 2-core machine shared with the test runner, two OpenMP threads per child make a 6-step run take about a
    minute instead of about 10 s (spinning threads wait for a busy core).
    """
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}
