"""The per-GPU memory derivation of benchmarks/sharded_memory.py against real FSDP2 sharding.

Two processes (torchrun, gloo, CPU) shard the tiny SDXL-shaped UNet with a rank-4 LoRA, plus discriminator heads,
with the trainer's own ``ShardedNetworks`` (``fully_shard`` per unit), take one AdamW step, and report the bytes each
rank holds; the prediction from parameter shapes must equal them to the byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from conftest import subprocess_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sharded_memory  # noqa: E402


def test_shard_sizes_follow_torch_chunk():
    p = torch.empty(5, 3, device="meta")
    assert [sharded_memory.shard_numel(p, 4, r) for r in range(4)] == [6, 6, 3, 0]  # rows 2, 2, 1, 0
    assert sharded_memory.shard_numel(p, 4) == 6  # every rank allocates 2 padded rows
    assert sharded_memory.shard_numel(p, 1, 0) == sharded_memory.shard_numel(p, 1) == 15


def test_predicted_bytes_equal_real_fsdp2_shards():
    measured = sharded_memory.measured_tiny(2, subprocess_env(), timeout=240)
    roots = sharded_memory.tiny_networks("meta")
    predicted = [sharded_memory.fsdp_rank_bytes(roots, 2, rank) for rank in range(2)]
    assert measured == predicted
    whole = sharded_memory.fsdp_rank_bytes(roots, 1, 0)  # one process: the unsharded sizes
    for key in ("frozen weights", "trainable weights", "gradients"):
        assert sum(m[key] for m in measured) == whole[key]  # the local pieces partition each tensor
    for key in ("weight storage (padded)", "gradient storage (padded)"):
        assert sum(m[key] for m in measured) >= whole[key]  # padding only adds
    assert measured[0]["weight storage (padded)"] == measured[1]["weight storage (padded)"]
    assert measured[0]["AdamW states"] > measured[1]["AdamW states"]  # the heads' one-row weights: rank 1 has none


def test_one_gpu_fsdp_equals_ddp_and_eight_gpus_divide_a_full_sdxl_student():
    roots = sharded_memory.method_networks(sharded_memory.gm.SDXL_UNET, None, None, full=True)  # meta: no weights
    static = lambda n, sharded: sharded_memory.static_bytes(roots, 0, n, sharded)  # noqa: E731
    assert static(1, True) == static(1, False)
    assert static(2, False) == static(8, False) > static(1, False)  # DDP: everything replicated, plus its buckets
    assert static(1, True) / 8 <= static(8, True) < static(1, True) / 8 * 1.001  # padding and AdamW's steps only
