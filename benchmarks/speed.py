"""Training speed per method: samples/s and peak memory on the tiny SD/SDXL teachers, with and without the cache.

    .venv/bin/python benchmarks/speed.py --steps 10 --batch_size 4 --out benchmarks/results/speed.md

"Without cache" encodes every batch with the VAE and the text encoder(s), as a run without --cache_latents does;
"with cache" feeds pre-computed latents and embeddings, as --cache_latents does. Memory is the CUDA peak on a GPU
and the process's peak resident set size on the CPU (which includes the Python runtime and libraries); each
measurement runs in a fresh process so that peaks do not carry over.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill.batching import BatchEncoder
from distill.teacher import inspect_teacher, native_resolution
from distill.methods import METHODS, Teacher
from distill.teacher import load_teacher
from distill.testing import build_tiny_teacher


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(method_name: str, teacher: Path, cached: bool, steps: int, batch_size: int, device) -> dict:
    """Samples per second over ``steps`` optimisation steps after one warm-up step."""
    info = inspect_teacher(str(teacher))
    resolution = native_resolution(info)
    loaded = load_teacher(info, resolution, device=device)
    method_cls = METHODS[method_name]
    config = method_cls.Config(lora_rank=4)
    method = method_cls(Teacher(loaded.network, loaded.schedule, info, loaded.latent_shape), config)
    optimizers = {k: torch.optim.AdamW(v, lr=1e-4) for k, v in method.trainable().items()}
    encoder = BatchEncoder(loaded.vae, loaded.conditioner)
    kind = method_cls.data_kind_for(config)
    raw = {"caption": [f"a handwritten digit {i}" for i in range(batch_size)]}
    if kind in ("images", "pairs"):  # pairs: stored latents stand in for the teacher's samples
        raw["pixel_values"] = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1
    if kind == "pairs":
        raw["noise"] = torch.randn(batch_size, *loaded.latent_shape)
    if cached and kind in ("images", "pairs"):
        batch = encoder(raw, device)
        raw = {"latents": batch.latents, "prompt_embeds": batch.cond.prompt_embeds, "noise": batch.noise,
               "pooled_prompt_embeds": batch.cond.pooled_prompt_embeds, "time_ids": batch.cond.time_ids}
        raw = {k: v for k, v in raw.items() if v is not None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_step(step: int) -> None:
        losses = method.loss(encoder(raw, device), step)
        for name, loss in losses.items():
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

    one_step(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for step in range(steps):
        one_step(step + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    return {"samples_per_s": steps * batch_size / elapsed, "peak_mb": peak_memory_mb(device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.md"))
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "TEACHER", "CACHED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        method, teacher, cached = args.one
        print(json.dumps(measure(method, Path(teacher), cached == "1", args.steps, args.batch_size, device)))
        return 0
    rows = ["| method | teacher | latent cache | samples/s | peak memory (MB) |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        teachers = {name: build_tiny_teacher(Path(tmp) / name, sdxl=name == "sdxl") for name in ("sd", "sdxl")}
        for method in args.methods.split(","):
            for family, folder in teachers.items():
                for cached in (False, True):
                    result = json.loads(subprocess.run(
                        [sys.executable, __file__, "--steps", str(args.steps), "--batch_size", str(args.batch_size),
                         "--one", method, str(folder), str(int(cached))],
                        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                    rows.append(f"| {method} | tiny {family} | {'yes' if cached else 'no'} | "
                                f"{result['samples_per_s']:.1f} | {result['peak_mb']:.0f} |")
                    print(rows[-1], flush=True)
    header = (f"Training speed on {device.type} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
              f"{args.steps} timed steps after one warm-up. Command: python benchmarks/speed.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(rows) + "\n")
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
