"""Settings that run but waste time or parameters are named once, at start, by one warning line each.

One real command line (a 1-step run on the tiny teacher) checks both warnings through the path a user takes:
--mixed_precision fp16 on a machine without CUDA, and a --lora_rank larger than some adapted layers can use.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
FP16_ON_CPU = "--mixed_precision fp16 on a machine without CUDA: fp16 on a CPU is about 5x slower than fp32"
RANK_TOO_LARGE = "--lora_rank 64 is larger than "


def warning_lines(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if " WARNING " in line and text in line]


def test_fp16_on_cpu_and_oversized_rank_warn_once(tmp_path, sd_teacher, image_folder):
    flags = ["--pretrained_teacher_model", str(sd_teacher), "--train_data_dir", str(image_folder),
             "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", "--train_batch_size", "1",
             "--resolution", "32", "--seed", "0", "--validation_steps", "0", "--report_to", "none",
             "--no_export_pipeline", "--mixed_precision", "fp16", "--lora_rank", "64"]
    result = subprocess.run([sys.executable, str(REPO / "train_scripts" / "lcm_lora.py"), *flags],
                            capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    if not torch.cuda.is_available():
        assert len(warning_lines(result.stderr, FP16_ON_CPU)) == 1, result.stderr[-3000:]
        assert "--mixed_precision no" in warning_lines(result.stderr, FP16_ON_CPU)[0]
    rank = warning_lines(result.stderr, RANK_TOO_LARGE)
    assert len(rank) == 1, result.stderr[-3000:]
    # It says how many layers, which one is the smallest, and the rank that fits every layer (the tiny UNet's
    # narrowest adapted layers have 32 channels).
    assert " of the " in rank[0] and "adapted layers" in rank[0] and "Lower --lora_rank to 32" in rank[0], rank[0]


def test_rank_warning_names_the_layers_only_when_rank_exceeds_them(sd_teacher):
    from diffusers import UNet2DConditionModel

    from distill.families import UNET_LORA_TARGETS
    from distill.lora import add_lora, rank_warning

    unet = UNet2DConditionModel.from_pretrained(sd_teacher, subfolder="unet")
    add_lora(unet, UNET_LORA_TARGETS, rank=4)
    assert rank_warning(unet, 32) is None  # every adapted layer of the tiny UNet has at least 32 in and out
    message = rank_warning(unet, 33, "--fake_lora_rank")
    assert message.startswith("--fake_lora_rank 33 is larger than ") and "to 32 or less" in message
