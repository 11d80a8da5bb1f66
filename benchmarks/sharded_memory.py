"""Memory per GPU with DDP and with FSDP2 at 1, 2 and 8 GPUs: .venv/bin/python benchmarks/sharded_memory.py --out
docs/distributed.md (the parameter, gradient and AdamW sizes of gpu_memory.py, sharded as the trainer shards)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import diffusers
import torch
from torch import nn

import gpu_memory as gm
from distill.discriminator import BottleneckClassifier, DiscriminatorHeads, encoder_modules, feature_channels
from distill.families import SD, UNET_LORA_TARGETS
from distill.sharding import shard_units, unit_parameters

UNIT_CLASSES = SD.shard_unit_classes  # SDXL's are the same blocks

GPUS, STEP_BYTES = (1, 2, 8), 4  # AdamW's step: one fp32 scalar per trainable tensor, not sharded
# (method, student): the second adapter ("fake": the fake score, on a copy of the teacher for a full student;
# "encoder": ufogen's discriminator LoRA), the discriminator network, whether a frozen teacher copy outside the
# sharded networks stays whole on every GPU, and the graphs and no-gradient rows of the activations (gpu_memory).
ROWS = {
    ("lcm, pcm, rectified", "LoRA"): (None, None, False, gm.METHODS["lcm, pcm, rectified (phased)"][1:]),
    ("rectified (pairs, consistency)", "full"): (None, None, False, ((("unet full", 1),), 1)),
    ("rectified (phased)", "full"): (None, None, True, ((("unet full", 1),), 2)),
    ("pcm --adv_weight > 0", "LoRA"): (None, "heads", False, gm.METHODS["pcm --adv_weight > 0"][1:]),
    ("swiftbrush", "LoRA"): ("fake", None, False, gm.METHODS["swiftbrush"][1:]),
    ("swiftbrush", "full"): ("fake", None, False, ((("unet full", 1), ("unet", 1)), 3)),
    ("ufogen", "LoRA"): ("encoder", "heads", False, gm.METHODS["ufogen"][1:]),
    ("dmd2", "LoRA"): ("fake", "classifier", False, gm.METHODS["dmd2"][1:]),
    ("dmd2", "full"): ("fake", "classifier", False, ((("unet full", 1),) + gm.METHODS["dmd2"][1][1:],
                                                     gm.METHODS["dmd2"][2])),
}


def fsdp_units(root: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters each FSDP unit of ``root`` shards (the trainer's ``unit_parameters``), the root's own last."""
    return unit_parameters(root, UNIT_CLASSES)


def shard_numel(p: torch.Tensor, n: int, rank: int | None = None) -> int:
    """Elements of ``p`` on ``rank`` of ``n`` when sharded on dim 0 as torch.chunk splits it (the last ranks may get
    fewer rows, or none); ``rank`` None: the padded shard every rank allocates (dim 0 rounded up to a multiple of n)."""
    rows = p.shape[0] if p.dim() else 1
    per_rank = -(-rows // n)
    mine = per_rank if rank is None else max(0, min(per_rank, rows - rank * per_rank))
    return mine * (p.numel() // max(rows, 1))


def fsdp_rank_bytes(roots: list[nn.Module], n: int, rank: int) -> dict[str, int]:
    """Bytes FSDP2 keeps on ``rank`` of ``n`` for ``roots``: local shards (``to_local()``), padded storage, gradients
    in the parameters' dtype, and AdamW's two states (local shape) plus its unsharded step per trainable tensor."""
    out: Counter = Counter()
    for root in roots:
        for unit in fsdp_units(root):
            for p in unit:
                size, local, padded = p.element_size(), shard_numel(p, n, rank), shard_numel(p, n)
                out["trainable weights" if p.requires_grad else "frozen weights"] += local * size
                out["weight storage (padded)"] += padded * size
                if p.requires_grad:
                    out["gradients"] += local * size
                    out["gradient storage (padded)"] += padded * size
                    out["AdamW states"] += 2 * local * size + STEP_BYTES
    return dict(out)


def gathered_bytes(roots: list[nn.Module], n: int) -> int:
    """FSDP's transient: two units' weights all-gathered in bf16 (one computing, the next prefetched; the two largest,
    an upper bound), plus the unsharded gradients of the unit being reduced (bf16, copied to fp32 to reduce-scatter)."""
    weights, grads = [], []
    for root in roots:
        for unit in fsdp_units(root):
            weights.append(sum(2 * n * shard_numel(p, n) for p in unit))
            grads.append(sum((2 + 4) * n * shard_numel(p, n) for p in unit if p.requires_grad))
    return sum(sorted(weights)[-2:]) + max(grads)


def static_bytes(roots: list[nn.Module], whole: int, n: int, sharded: bool) -> int:
    """Per-GPU bytes of weights, gradients and AdamW states (rank 0, the fullest), plus ``whole`` bytes kept unsharded;
    DDP on several GPUs adds its gradient buckets, a second copy of every trainable gradient."""
    held = fsdp_rank_bytes(roots, n if sharded else 1, 0)
    total = held["weight storage (padded)"] + held.get("gradient storage (padded)", 0) + held.get("AdamW states", 0)
    return whole + total + (0 if sharded or n == 1 else held.get("gradients", 0))


def method_networks(config: dict, second: str | None, extra: str | None, full: bool) -> list[nn.Module]:
    """A method's sharded networks on meta as the method builds them: the UNet (frozen bf16) with the student's LoRA
    or trained whole, a second adapter, a discriminator; trainable weights in fp32 (``cast_training_params``)."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params

    from distill.lora import LoRASettings
    from distill.score_distillation import student_and_fake_score

    settings = LoRASettings(lora_rank=gm.RANK, lora_alpha=gm.RANK)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).to(torch.bfloat16)
        roots: list[nn.Module] = [unet]
        if second:
            encoder = second == "encoder"  # ufogen's discriminator LoRA, on the encoder's modules only
            _, _, view = student_and_fake_score(
                unet, settings, UNET_LORA_TARGETS, full, gm.RANK, gm.RANK, "discriminator" if encoder else "fake_score",
                encoder_modules(unet, list(UNET_LORA_TARGETS)) if encoder else None)
            roots += [view.unet] if view.unet is not unet else []
        else:
            settings.student_parameters(unet, UNET_LORA_TARGETS, full)
        if extra == "heads":
            roots.append(DiscriminatorHeads.from_unet_config(unet.config))
        elif extra == "classifier":
            roots.append(BottleneckClassifier.from_unet_config(unet.config, unet.config.sample_size))
    for root in roots:
        cast_training_params(root, dtype=torch.float32)
    return roots


def family_table(name: str, fam: dict, config: dict) -> list[str]:
    """Markdown rows of one teacher family: GiB per GPU under DDP and FSDP at each GPU count, per method and student."""
    gib = lambda b: f"{b / gm.GIB:.1f}"  # noqa: E731
    head = ["| method | student | activations | " + " | ".join(f"DDP {n}" for n in GPUS) + " | "
            + " | ".join(f"FSDP {n}" for n in GPUS) + " | FSDP gathers |", "|---|---|" + "---|" * (2 + 2 * len(GPUS))]
    unsharded = fam["weights"]["VAE"] + fam["weights"]["text encoders"]
    lines = ["", f"{name}, GiB per GPU, batch 1 per GPU (static: weights + gradients + AdamW states, of which the "
             f"text encoders and VAE, whole on every GPU: {gib(unsharded)} GiB):", "", *head]
    for (method, student), (second, extra, copy, (graphs, nograd)) in ROWS.items():
        roots = method_networks(config, second, extra, student == "full")
        whole = unsharded + (fam["weights"]["UNet"] if copy else 0)
        ddp = [gib(static_bytes(roots, whole, n, False)) for n in GPUS]
        fsdp = [gib(static_bytes(roots, whole, n, True)) for n in GPUS]
        gathers = gib(max(gathered_bytes(roots, n) for n in GPUS))
        act = gib(gm.activations(fam, graphs, nograd, 1, True))
        lines.append(f"| {method} | {student} | {act} | " + " | ".join(ddp + fsdp) + f" | {gathers} |")
    unet = method_networks(config, None, None, False)[0]
    names = {id(m): n for n, m in unet.named_modules()}
    units = shard_units(unet, UNIT_CLASSES)
    own = unit_parameters(unet, UNIT_CLASSES)[:-1]  # what each unit gathers (inner units hold their own)
    sizes = sorted((sum(p.numel() for p in params if not p.requires_grad), names[id(m)])  # the teacher's, no LoRA
                   for m, params in zip(units, own))
    largest = [f"`{n}` {c / 1e6:.0f} M parameters ({2 * c / gm.GIB:.2f} GiB in bf16)" for c, n in sizes[::-1][:2]]
    lines += ["", f"Largest FSDP units of the UNet ({sum(c for c, _ in sizes) / 1e6:.0f} M parameters): "
              + ", ".join(largest) + "."]
    return lines


def tiny_networks(device: str) -> list[nn.Module]:
    """The tiny SDXL-shaped UNet (bf16) with the student LoRA (rank 4, fp32), and discriminator heads (fp32)."""
    from distill.testing import tiny_unet

    unet = gm.build_unet({}, device, lambda: tiny_unet(sdxl=True, cross_attention_dim=32), rank=4)
    with torch.device(device):
        heads = DiscriminatorHeads.from_unet_config(unet.config)
    return [unet, heads]


def local_bytes(roots: list[nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This process's bytes of the sharded weights, gradients and optimizer states, read from the DTensors."""
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    out, grad_storages = Counter(), {}
    for root in roots:
        for p in root.parameters():
            out["trainable weights" if p.requires_grad else "frozen weights"] += local(p).nbytes
            out["weight storage (padded)"] += local(p).untyped_storage().nbytes()
            if p.grad is not None:
                out["gradients"] += local(p.grad).nbytes
                storage = local(p.grad).untyped_storage()
                grad_storages[storage.data_ptr()] = storage.nbytes()
    out["gradient storage (padded)"] = sum(grad_storages.values())
    out["AdamW states"] = sum(local(v).nbytes for state in optimizer.state.values() for v in state.values())
    return dict(out)


def shard_and_step(out: Path) -> None:
    """Under torchrun (gloo): shard the tiny networks as the trainer does (``ShardedNetworks``: fully_shard per unit,
    bf16 compute), one AdamW step on random inputs, then write this process's ``local_bytes`` to out/rank<r>.json."""
    import torch.distributed as dist

    from distill.optimizers import adamw
    from distill.sharding import ShardedNetworks, ShardingSettings

    dist.init_process_group("gloo")
    unet, heads = roots = tiny_networks("cpu")
    trainable = [p for root in roots for p in root.parameters() if p.requires_grad]
    sharded = ShardedNetworks({"unet": unet, "discriminator": heads}, ShardingSettings(), torch.bfloat16,
                              UNIT_CLASSES)
    optimizer = adamw(sharded.live(trainable), lr=1e-4)  # the sharded parameters that replaced them
    x, t, kwargs = gm.inputs(unet, 2, "cpu")
    features = [torch.randn(2, c, 4, 4) for c in feature_channels(unet.config)]
    loss = unet(x, t, **kwargs).sample.float().square().mean() + sum(y.float().mean() for y in heads(features))
    loss.backward()
    optimizer.step()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(local_bytes(roots, optimizer)))
    dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured_tiny(n: int = 2, env: dict | None = None, timeout: float = 300) -> list[dict[str, int]]:
    """``shard_and_step`` in ``n`` processes under torchrun; each process's bytes, by rank."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        argv = [str(torchrun), "--nproc_per_node", str(n), "--master_port", str(free_port()), __file__,
                "--shard_and_step", folder]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in range(n)]


def tiny_check(measured: list[dict[str, int]]) -> list[str]:
    """Markdown: predicted against measured bytes per rank on the tiny teacher; raises if any differ."""
    n, roots = len(measured), tiny_networks("meta")
    predicted = [fsdp_rank_bytes(roots, n, r) for r in range(n)]
    lines = ["| bytes per process (tiny SDXL UNet, LoRA rank 4, heads; 2 processes) | "
             + " | ".join(f"rank {r}: predicted | measured" for r in range(n)) + " |", "|---|" + "---|" * 2 * n]
    for key in predicted[0]:
        lines.append(f"| {key} | " + " | ".join(f"{p[key]:,} | {m[key]:,}" for p, m in zip(predicted, measured)) + " |")
    if predicted != measured:
        raise RuntimeError(f"The sharded sizes differ from the prediction: {measured} != {predicted}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="markdown file whose generated section is replaced (appended if missing)")
    parser.add_argument("--shard_and_step", metavar="FOLDER", help=argparse.SUPPRESS)  # a torchrun worker
    args = parser.parse_args()
    if args.shard_and_step:
        return shard_and_step(Path(args.shard_and_step))
    diffusers.utils.logging.set_verbosity_error()
    check = tiny_check(measured_tiny())
    text = []
    for name, config, encoders, family in (("SD1.5 512 px", gm.SD15_UNET, [gm.CLIP_L], gm.SD),
                                           ("SDXL 1024 px", gm.SDXL_UNET, [gm.CLIP_L, gm.CLIP_BIGG], gm.SDXL)):
        text += family_table(name, gm.family(config, encoders, family.vae_fp32), config)
    title = "Predicted against measured (the trainer's `ShardedNetworks`, 2 CPU processes):"
    text = "\n".join(text[1:] + ["", title, ""] + check)
    print(text)
    if args.out:
        gm.write_section(Path(args.out), text, "benchmarks/sharded_memory.py")


if __name__ == "__main__":
    main()
