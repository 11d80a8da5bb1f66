"""Training speed per method: samples/s and peak memory on the tiny SD/SDXL teachers, with and without the cache.

    .venv/bin/python benchmarks/speed.py --steps 10 --batch_size 4 --out benchmarks/results/speed.md

With ``--baseline DIR`` (a checkout of another revision, e.g. ``git worktree add DIR HEAD~1``) every configuration
is measured with that revision's code too, alternately with this one's, so that drift in the machine's speed affects
both columns alike; the table then shows both and their ratio.

"Without cache" encodes every batch with the VAE and the text encoder(s), as a run without --cache_latents does;
"with cache" feeds pre-computed latents and embeddings, as --cache_latents does. Memory is the CUDA peak on a GPU
and the process's peak resident set size on the CPU (which includes the Python runtime and libraries); each
measurement runs in a fresh process so that peaks do not carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill.batching import BatchEncoder
from distill.teacher import inspect_teacher, native_resolution
from distill.memory_format import frozen_weights_channels_last
from distill.methods import METHODS, Teacher
from distill.optimizers import adamw
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
    optimizers = {k: adamw(v, lr=1e-4) for k, v in method.trainable().items()}  # the trainer's AdamW
    frozen_weights_channels_last([loaded.network, loaded.vae, *method.nets.values()])  # the trainer's default layout
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


def measure_in_subprocess(checkout: Path | None, config: list[str], args) -> dict:
    """``measure`` in a fresh process (so that memory peaks do not carry over), with the code of ``checkout`` (another
    revision's folder) or of this one (None)."""
    script = checkout / "benchmarks" / "speed.py" if checkout else Path(__file__)
    paths = [str(checkout)] if checkout else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script), "--steps", str(args.steps), "--batch_size", str(args.batch_size),
                          "--one", *config], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.md"))
    parser.add_argument("--baseline", type=Path, default=None,
                        help="A checkout of another revision to measure alternately with this one (before/after).")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "TEACHER", "CACHED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        method, teacher, cached = args.one
        print(json.dumps(measure(method, Path(teacher), cached == "1", args.steps, args.batch_size, device)))
        return 0
    if args.baseline:
        rows = ["| method | teacher | latent cache | samples/s before | samples/s | speed-up | peak memory before (MB) "
                "| peak memory (MB) |", "|---|---|---|---|---|---|---|---|"]
    else:
        rows = ["| method | teacher | latent cache | samples/s | peak memory (MB) |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        teachers = {name: build_tiny_teacher(Path(tmp) / name, sdxl=name == "sdxl") for name in ("sd", "sdxl")}
        for method in args.methods.split(","):
            for family, folder in teachers.items():
                for cached in (False, True):
                    config = [method, str(folder), str(int(cached))]
                    cells = [method, f"tiny {family}", "yes" if cached else "no"]
                    if args.baseline:
                        before = measure_in_subprocess(args.baseline.resolve(), config, args)
                        after = measure_in_subprocess(None, config, args)
                        cells += [f"{before['samples_per_s']:.1f}", f"{after['samples_per_s']:.1f}",
                                  f"{after['samples_per_s'] / before['samples_per_s']:.2f}x",
                                  f"{before['peak_mb']:.0f}", f"{after['peak_mb']:.0f}"]
                    else:
                        result = measure_in_subprocess(None, config, args)
                        cells += [f"{result['samples_per_s']:.1f}", f"{result['peak_mb']:.0f}"]
                    rows.append("| " + " | ".join(cells) + " |")
                    print(rows[-1], flush=True)
    command = [a if args.baseline is None or Path(a) != args.baseline else "BEFORE"
               for a in (sys.argv[1:] if argv is None else argv)]
    header = (f"Training speed on {device.type} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
              f"{args.steps} timed steps after one warm-up. Command: python benchmarks/speed.py {' '.join(command)}")
    if args.baseline:
        revision = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True).stdout.strip() or "another revision"
        header += f" (BEFORE: a checkout of {revision}, measured alternately with this revision)"
    header += "\n\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(rows) + "\n")
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
