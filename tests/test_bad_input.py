"""User errors end train_scripts/lcm_lora.py before training starts: exit code 2, one `error:` line, no traceback.

Every case runs the real command line in a fresh process. "Before training starts" is checked three ways: the run
is quick, stderr holds nothing but the error line (no model-loading progress bar, no accelerate log), and the output
folder was never created (the trainer creates it only after validating its inputs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "lcm_lora.py"
MAX_SECONDS = 15.0


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = subprocess_env()
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                            env=env, cwd=REPO)
    return result, time.perf_counter() - start


def copy_images(source: Path, target: Path, count: int = 2) -> list[str]:
    target.mkdir(parents=True, exist_ok=True)
    names = [f"{i}.png" for i in range(count)]
    for name in names:
        shutil.copy(source / name, target / name)
    return names


def write_metadata(folder: Path, records: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# Each case: (tmp_path, sd_teacher, image_folder) -> (flags replacing the defaults, phrases the error line names).


def missing_teacher_folder(tmp, teacher, images):
    return {"--pretrained_teacher_model": str(tmp / "no-such-teacher")}, ["does not exist",
                                                                         "--pretrained_teacher_model"]


def missing_teacher_looks_like_hub_id(tmp, teacher, images):
    # A relative path with one slash is taken for a Hub id; the Hub is unreachable (HF_HUB_OFFLINE=1).
    return {"--pretrained_teacher_model": "no-such-dir/tiny-sd"}, ["Could not find the teacher no-such-dir/tiny-sd"]


def teacher_is_another_pipeline(tmp, teacher, images):
    folder = tmp / "dit"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "_diffusers_version": "0.42.1", "id2label": {"0": "tench"},
        "scheduler": ["diffusers", "KarrasDiffusionSchedulers"], "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    return {"--pretrained_teacher_model": str(folder)}, ["DiTPipeline", "not a Stable Diffusion or SDXL pipeline",
                                                         "text_encoder", "unet"]


def teacher_is_an_empty_folder(tmp, teacher, images):
    folder = tmp / "empty-teacher"
    folder.mkdir()
    return {"--pretrained_teacher_model": str(folder)}, ["not a diffusers pipeline folder", "model_index.json"]


def dataset_folder_is_empty(tmp, teacher, images):
    folder = tmp / "empty-data"
    folder.mkdir()
    return {"--train_data_dir": str(folder)}, ["contains no images", "--train_data_dir"]


def dataset_metadata_has_no_rows(tmp, teacher, images):
    folder = tmp / "no-rows"
    copy_images(images, folder)
    (folder / "metadata.jsonl").write_text("\n")
    return {"--train_data_dir": str(folder)}, ["is empty (0 rows)"]


def dataset_has_an_unreadable_image(tmp, teacher, images):
    folder = tmp / "broken"
    names = copy_images(images, folder)
    (folder / "broken.png").write_bytes(os.urandom(2048))
    write_metadata(folder, [{"file_name": n, "text": "a striped picture"} for n in names + ["broken.png"]])
    return {"--train_data_dir": str(folder)}, ["1 image file(s)", "broken.png", "cannot be read"]


def metadata_lacks_the_caption_column(tmp, teacher, images):
    folder = tmp / "captions"
    names = copy_images(images, folder)
    write_metadata(folder, [{"file_name": n, "caption": "a striped picture"} for n in names])
    return {"--train_data_dir": str(folder)}, ["Caption column 'text' not found", "caption", "--caption_column"]


def w_min_above_w_max(tmp, teacher, images):
    return {"--w_min": "8", "--w_max": "4"}, ["--w_min", "--w_max", "w_min=8.0", "w_max=4.0"]


def resume_path_does_not_exist(tmp, teacher, images):
    path = tmp / "run" / "checkpoint-40"
    return {"--resume_from_checkpoint": str(path)}, [f"--resume_from_checkpoint {path} is not a checkpoint folder"]


def resume_path_is_not_a_checkpoint(tmp, teacher, images):
    # A common slip: the run's output folder instead of one of its checkpoint-N folders.
    path = tmp / "previous-run"
    path.mkdir()
    (path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    return {"--resume_from_checkpoint": str(path)}, [f"--resume_from_checkpoint {path} is not a checkpoint folder"]


def resume_path_is_a_half_written_checkpoint(tmp, teacher, images):
    path = tmp / "run" / "checkpoint-4.partial"
    path.mkdir(parents=True)
    (path / "unet_trainable.safetensors").write_bytes(b"")
    return {"--resume_from_checkpoint": str(path)}, ["is not a checkpoint folder"]


CASES = [
    missing_teacher_folder,
    missing_teacher_looks_like_hub_id,
    teacher_is_another_pipeline,
    teacher_is_an_empty_folder,
    dataset_folder_is_empty,
    dataset_metadata_has_no_rows,
    dataset_has_an_unreadable_image,
    metadata_lacks_the_caption_column,
    w_min_above_w_max,
    resume_path_does_not_exist,
    resume_path_is_not_a_checkpoint,
    resume_path_is_a_half_written_checkpoint,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_user_error_stops_before_training(case, tmp_path, sd_teacher, image_folder):
    overrides, phrases = case(tmp_path, sd_teacher, image_folder)
    out = tmp_path / "out"
    flags = {"--pretrained_teacher_model": str(sd_teacher), "--train_data_dir": str(image_folder),
             "--output_dir": str(out), "--max_train_steps": "2", "--train_batch_size": "2", "--lora_rank": "4",
             "--seed": "0", "--validation_steps": "0", "--report_to": "none", **overrides}
    result, seconds = run_cli(*[part for item in flags.items() for part in item])

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], (phrase, errors[0])
    # Nothing else was printed (no model-loading bar, no accelerate log) and nothing written: the run stopped while
    # validating its inputs.
    assert result.stderr.strip().splitlines() == errors, result.stderr[-3000:]
    assert not out.exists()
    assert result.stdout == ""
    assert seconds < MAX_SECONDS, f"{case.__name__} took {seconds:.1f} s"
