"""Resumable generation to disk, and speed and memory of a sampler.

``generate_to_folder`` writes image ``i`` (prompt ``i``, seeded with ``seed + i``) to ``<folder>/<i>.png`` as soon as
its batch is made. An image depends on neither the batch size nor on which images already exist, so a rerun skips
the indices on disk and makes only the missing ones. ``generation.json`` beside the images records the sampling
settings and prompts (a rerun with other settings is refused instead of mixing two samplers in one folder) and the
UNet rows counted so far, from which NFE per image is reported even when a rerun generates nothing.

Under ``accelerate launch`` the missing images are cut into the batches one process would make, and process k makes
batches k, k + P, k + 2P, ... of them (P processes): every batch holds the same images as in a 1-process run, so the
images are the same whatever the process count. Only the main process writes the manifest (and counts the UNet rows
of its batches: NFE per image is the same for every image of a sampler), and every process waits for the others
before returning, so the folder is complete when the call returns.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DistillError
from .image_files import write_png
from .sampling import count_unet_evaluations, denoiser_network, to_uint8

MANIFEST = "generation.json"


@dataclass
class GenerationResult:
    """What ``generate_to_folder`` did: images made by this call (all processes), images on disk, NFE per image."""

    folder: Path
    generated: int
    total: int
    nfe_per_image: float | None


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index}.png"


def missing_indices(folder: Path, count: int) -> list[int]:
    """Indices in [0, count) without an image in ``folder``."""
    return [i for i in range(count) if not image_path(folder, i).is_file()]


def _write_manifest(folder: Path, manifest: dict) -> None:
    partial = folder / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=1))
    os.replace(partial, folder / MANIFEST)


def _open_manifest(folder: Path, settings: dict, prompts: list[str]) -> dict:
    """The folder's manifest, checked against this run's settings and prompts (new: written before any image)."""
    file = folder / MANIFEST
    if not file.is_file():
        if any(folder.glob("*.png")):
            raise DistillError(f"{folder} holds images but no {MANIFEST}: they were not made by distill.evaluate. "
                               "Use another --output_dir, or empty that folder.")
        manifest = {"settings": settings, "prompts": list(prompts), "unet_rows": 0, "images_counted": 0}
        _write_manifest(folder, manifest)
        return manifest
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DistillError(f"{file} is damaged (not valid JSON). Delete {folder} to generate its images again.") from None
    changed = {k: (manifest["settings"].get(k), v) for k, v in settings.items() if manifest["settings"].get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: {old!r} on disk, {new!r} now" for k, (old, new) in changed.items())
        raise DistillError(f"The images in {folder} were made with other settings ({listed}). Use another "
                           "--output_dir, or delete that folder to generate them again.")
    recorded = manifest["prompts"]
    for i, (old, new) in enumerate(zip(recorded, prompts)):
        if old != new:
            raise DistillError(f"The image {image_path(folder, i)} was made for the prompt {old!r}, but prompt {i} "
                               f"is now {new!r}. Use another --output_dir, or delete {folder}.")
    if len(prompts) > len(recorded):
        manifest["prompts"] = recorded + list(prompts[len(recorded):])
        _write_manifest(folder, manifest)
    return manifest


@torch.no_grad()
def generate_to_folder(pipe, prompts: list[str], folder: str | os.PathLike, num_inference_steps: int,
                       guidance_scale: float, seed: int = 0, batch_size: int = 8, height: int | None = None,
                       width: int | None = None, desc: str | None = None, state=None) -> GenerationResult:
    """Image ``i`` (``prompts[i]``, seed ``seed + i``) to ``folder/i.png`` unless on disk; processes share batches."""
    from accelerate import PartialState

    state = state or PartialState()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed,
                "height": height, "width": width}
    if state.is_main_process:
        manifest = _open_manifest(folder, settings, prompts)
    todo = missing_indices(folder, len(prompts))
    state.wait_for_everyone()  # every process has listed the same missing images before any is written
    batches = [todo[start: start + batch_size] for start in range(0, len(todo), batch_size)]
    mine = batches[state.process_index::state.num_processes]
    done = len(prompts) - len(todo)
    pipe.set_progress_bar_config(disable=True)
    with count_unet_evaluations(denoiser_network(pipe)) as counter, \
            tqdm(total=done + sum(map(len, mine)), initial=done, desc=desc or folder.name, unit="image",
                 dynamic_ncols=True, disable=not state.is_main_process) as bar:
        for batch in mine:
            rows_before = counter["rows"]
            out = pipe([prompts[i] for i in batch], num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, height=height, width=width, output_type="np",
                       generator=[torch.Generator().manual_seed(seed + i) for i in batch])
            for index, image in zip(batch, to_uint8(out.images)):
                write_png(image_path(folder, index), image)
            if state.is_main_process:
                manifest["unet_rows"] += counter["rows"] - rows_before
                manifest["images_counted"] += len(batch)
                _write_manifest(folder, manifest)
            bar.update(len(batch))
    state.wait_for_everyone()  # every image is on disk, and the main process's manifest is written
    if not state.is_main_process:
        manifest = json.loads((folder / MANIFEST).read_text())
    nfe = manifest["unet_rows"] / manifest["images_counted"] if manifest["images_counted"] else None
    return GenerationResult(folder, len(todo), len(prompts), nfe)


@dataclass
class Speed:
    """Latency per image at batch 1, throughput at a batch size, and the peak memory seen (which kind: ``memory``)."""

    latency_ms: float
    throughput: float
    batch_size: int
    peak_memory_mib: float
    memory: str


def process_peak_rss_mib() -> float:
    """This process's peak resident set size so far (getrusage's ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@torch.no_grad()
def measure_speed(pipe, prompt: str, num_inference_steps: int, guidance_scale: float, batch_size: int,
                  height: int | None = None, width: int | None = None, repeats: int = 3) -> Speed:
    """Median wall time of ``repeats`` calls at batch 1 (ms per image) and at ``batch_size`` (images per second),
    each size warmed up once first. Peak memory: CUDA's peak allocation during these calls on a GPU; on the CPU the
    process's peak RSS so far (which includes every model loaded before)."""
    device = pipe.device
    cuda = device.type == "cuda"
    pipe.set_progress_bar_config(disable=True)

    def seconds(n: int) -> float:
        started = time.perf_counter()
        pipe([prompt] * n, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
             width=width, output_type="np", generator=torch.Generator().manual_seed(0))  # "np": waits for the GPU
        return time.perf_counter() - started

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timings = {}
    for n in (1, batch_size):
        if n not in timings:
            seconds(n)  # warm-up: first-call allocation, kernel selection
            timings[n] = statistics.median(seconds(n) for _ in range(max(repeats, 1)))
    if cuda:
        peak, memory = torch.cuda.max_memory_allocated(device) / 2**20, "CUDA peak allocated"
    else:
        peak, memory = process_peak_rss_mib(), "process peak RSS"
    return Speed(1000 * timings[1], batch_size / timings[batch_size], batch_size, peak, memory)
