"""--config: a run's own run_config.yaml repeats it exactly; flags on the command line override the file.

Every run writes its resolved settings (resolution and seed included, never the Hub token or the resume flag) to
output_dir/run_config.yaml. Passing that file back with --config and another --output_dir must give the same weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "lcm_lora.py"


def train(*argv: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=600,
                            cwd=REPO, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_run_config_repeats_the_run_and_the_command_line_overrides_it(sd_teacher, image_folder, tmp_path):
    first = tmp_path / "first"
    train("--pretrained_teacher_model", str(sd_teacher), "--train_data_dir", str(image_folder), "--output_dir",
          str(first), "--train_batch_size", "2", "--lora_rank", "4", "--max_train_steps", "2", "--validation_steps",
          "0", "--report_to", "none", "--no_export_pipeline", "--random_flip", "--learning_rate", "3e-4",
          "--hub_token", "secret")
    settings = yaml.safe_load((first / "run_config.yaml").read_text())
    assert settings["method"] == "lcm" and settings["learning_rate"] == 3e-4 and settings["random_flip"] is True
    assert settings["resolution"] == 32  # the tiny teacher's native size, resolved
    assert isinstance(settings["seed"], int)  # drawn by the run, recorded so that it repeats
    assert "hub_token" not in settings and "resume_from_checkpoint" not in settings
    assert settings["export_pipeline"] is False and settings["validation_prompts"] == [
        "a photo of an astronaut riding a horse"]

    repeat = tmp_path / "repeat"
    train("--config", str(first / "run_config.yaml"), "--output_dir", str(repeat))
    a, b = load_file(first / "pytorch_lora_weights.safetensors"), load_file(repeat / "pytorch_lora_weights.safetensors")
    assert set(a) == set(b) and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((repeat / "run_config.yaml").read_text()) == {**settings, "output_dir": str(repeat)}

    override = tmp_path / "override"
    train("--config", str(first / "run_config.yaml"), "--output_dir", str(override), "--max_train_steps", "1",
          "--learning_rates", "unet=1e-3")
    recorded = json.loads((override / "distill_config.json").read_text())
    assert recorded["max_train_steps"] == 1 and recorded["learning_rate"] == 3e-4
    assert recorded["learning_rates"] == "{'unet': 0.001}"
