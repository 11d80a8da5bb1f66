"""User errors end the command line before training starts: exit code 2, one `error:` line, no traceback.

One case per row of the README table "What you see when input is wrong"; the table and the cases are checked to list
the same messages. Each case runs the real command line in a fresh process and the `error:` line must start with the
row's message, where `<...>` stands for a part that varies (a path, a value). "Before training starts" is checked
three ways: the run is quick, stderr holds nothing but the error line (no model-loading progress bar, no accelerate
log), and the output folder was never created (the trainer creates it only after validating its inputs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
README_SECTION = "## What you see when input is wrong"
MAX_SECONDS = 15.0


def run_cli(script: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "train_scripts" / script), *args], capture_output=True,
                            text=True, timeout=120, env=subprocess_env(), cwd=REPO)
    return result, time.perf_counter() - start


def copy_images(source: Path, target: Path, count: int = 2) -> list[str]:
    target.mkdir(parents=True, exist_ok=True)
    names = [f"{i}.png" for i in range(count)]
    for name in names:
        shutil.copy(source / name, target / name)
    return names


def write_metadata(folder: Path, records: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def image_folder_with_lines(tmp: Path, images: Path, lines: list[str]) -> dict:
    folder = tmp / "data"
    copy_images(images, folder)
    (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return {"--train_data_dir": str(folder)}


def saved_dataset(tmp: Path, images: Path, columns: dict, split: str = "train") -> str:
    """A dataset written with save_to_disk (a DatasetDict with one split), as --dataset_name takes it."""
    import datasets
    from PIL import Image

    rows = {name: [Image.open(images / f"{i}.png") if name == "image" else value for i in range(2)]
            for name, value in columns.items()}
    folder = tmp / "saved-dataset"
    datasets.DatasetDict({split: datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))
    return str(folder)


# Each setup: (tmp_path, sd_teacher, image_folder) -> flags replacing the defaults (None removes a flag).

# --- the teacher
def teacher_flag_missing(tmp, teacher, images):
    return {"--pretrained_teacher_model": None}


def teacher_folder_missing(tmp, teacher, images):
    return {"--pretrained_teacher_model": str(tmp / "no-such-teacher")}


def teacher_hub_id_not_found(tmp, teacher, images):
    # A relative path with one slash is taken for a Hub id; the Hub is unreachable (HF_HUB_OFFLINE=1).
    return {"--pretrained_teacher_model": "no-such-dir/tiny-sd"}


def teacher_is_another_pipeline(tmp, teacher, images):
    folder = tmp / "dit"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "_diffusers_version": "0.42.1", "id2label": {"0": "tench"},
        "scheduler": ["diffusers", "KarrasDiffusionSchedulers"], "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    return {"--pretrained_teacher_model": str(folder)}


def teacher_is_an_empty_folder(tmp, teacher, images):
    folder = tmp / "empty-teacher"
    folder.mkdir()
    return {"--pretrained_teacher_model": str(folder)}


# --- a local image folder (--train_data_dir)
def both_dataset_flags(tmp, teacher, images):
    return {"--dataset_name": "someone/pictures"}


def data_dir_missing(tmp, teacher, images):
    return {"--train_data_dir": str(tmp / "no-such-data")}


def data_dir_is_a_plain_file(tmp, teacher, images):
    path = tmp / "captions.csv"
    path.write_text("file_name,text\n0.png,a cat\n")
    return {"--train_data_dir": str(path)}


def data_folder_is_empty(tmp, teacher, images):
    folder = tmp / "empty-data"
    folder.mkdir()
    return {"--train_data_dir": str(folder)}


def data_folder_has_no_metadata(tmp, teacher, images):
    folder = tmp / "no-metadata"
    copy_images(images, folder)
    return {"--train_data_dir": str(folder)}


def metadata_line_is_not_json(tmp, teacher, images):
    return image_folder_with_lines(tmp, images, ['{"file_name": "0.png", "text": "a cat"}', "file_name=1.png"])


def metadata_line_is_not_an_object(tmp, teacher, images):
    return image_folder_with_lines(tmp, images, ['["0.png", "a cat"]'])


def metadata_line_lacks_file_name(tmp, teacher, images):
    return image_folder_with_lines(tmp, images, ['{"image": "0.png", "text": "a cat"}'])


def metadata_lacks_the_caption_column(tmp, teacher, images):
    return image_folder_with_lines(tmp, images, ['{"file_name": "0.png", "caption": "a cat"}'])


def caption_is_not_text(tmp, teacher, images):
    return image_folder_with_lines(tmp, images, ['{"file_name": "0.png", "text": 7}'])


def metadata_names_missing_images(tmp, teacher, images):
    return image_folder_with_lines(tmp, images, ['{"file_name": "0.png", "text": "a cat"}',
                                                 '{"file_name": "gone.png", "text": "a dog"}'])


def metadata_has_no_rows(tmp, teacher, images):
    return image_folder_with_lines(tmp, images, [""])


def image_cannot_be_read(tmp, teacher, images):
    folder = tmp / "broken"
    names = copy_images(images, folder)
    (folder / "broken.png").write_bytes(os.urandom(2048))
    write_metadata(folder, [{"file_name": n, "text": "a striped picture"} for n in names + ["broken.png"]])
    return {"--train_data_dir": str(folder)}


def image_column_on_a_local_folder(tmp, teacher, images):
    return {"--image_column": "picture"}


# --- webdataset shards
def shard_is_not_a_tar(tmp, teacher, images):
    path = tmp / "shard-00000.tar"
    path.write_bytes(os.urandom(4096))
    return {"--train_data_dir": str(path)}


def shard_pattern_matches_nothing(tmp, teacher, images):
    return {"--train_data_dir": str(tmp / "shards" / "{00000..00003}.tar")}


# --- a datasets dataset (--dataset_name)
def dataset_path_missing(tmp, teacher, images):
    return {"--train_data_dir": None, "--dataset_name": "./no-such-dataset"}


def dataset_not_on_the_hub(tmp, teacher, images):
    return {"--train_data_dir": None, "--dataset_name": "someone/no-such-dataset"}


def dataset_has_no_train_split(tmp, teacher, images):
    return {"--train_data_dir": None,
            "--dataset_name": saved_dataset(tmp, images, {"image": None, "text": "a cat"}, split="test")}


def dataset_lacks_the_caption_column(tmp, teacher, images):
    return {"--train_data_dir": None, "--dataset_name": saved_dataset(tmp, images, {"image": None, "label": 3})}


# --- prompt-only and pair-trained methods
def prompts_missing(tmp, teacher, images):
    return {"--train_data_dir": None}


def prompt_file_missing(tmp, teacher, images):
    return {"--train_data_dir": None, "--prompts_file": str(tmp / "no-prompts.txt")}


def prompt_file_is_blank(tmp, teacher, images):
    path = tmp / "prompts.txt"
    path.write_text("\n   \n")
    return {"--train_data_dir": None, "--prompts_file": str(path)}


def pairs_missing(tmp, teacher, images):
    return {"--train_data_dir": None}


def pair_folder_missing(tmp, teacher, images):
    return {"--train_data_dir": None, "--pairs_dir": str(tmp / "no-pairs")}


def pair_folder_has_no_manifest(tmp, teacher, images):
    folder = tmp / "pairs"
    folder.mkdir()
    return {"--train_data_dir": None, "--pairs_dir": str(folder)}


# --- flags
def w_min_above_w_max(tmp, teacher, images):
    return {"--w_min": "8", "--w_max": "4"}


def unknown_loss_type(tmp, teacher, images):
    return {"--loss_type": "l1"}


def max_train_steps_zero(tmp, teacher, images):
    return {"--max_train_steps": "0"}


def resolution_not_multiple_of_8(tmp, teacher, images):
    return {"--resolution": "36"}


def resolution_negative(tmp, teacher, images):
    return {"--resolution": "-8"}


def max_train_samples_zero(tmp, teacher, images):
    return {"--max_train_samples": "0"}


def unknown_interpolation(tmp, teacher, images):
    return {"--interpolation_type": "cubic-ish"}


def seed_out_of_range(tmp, teacher, images):
    return {"--seed": "-1"}


# --- export and upload
def unknown_export_format(tmp, teacher, images):
    return {"--export_format": "ckpt"}


def push_without_repo(tmp, teacher, images):
    return {"--push_to_hub": ""}


def pipeline_upload_without_push(tmp, teacher, images):
    return {"--hub_include_pipeline": ""}


def pipeline_upload_without_pipeline(tmp, teacher, images):
    return {"--push_to_hub": "", "--hub_model_id": "someone/student", "--hub_include_pipeline": "",
            "--no_export_pipeline": ""}


# --- resuming
def resume_path_missing(tmp, teacher, images):
    return {"--resume_from_checkpoint": str(tmp / "run" / "checkpoint-40")}


def resume_path_is_the_output_folder(tmp, teacher, images):
    # A common slip: the run's output folder instead of one of its checkpoint-N folders.
    path = tmp / "previous-run"
    path.mkdir()
    (path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    return {"--resume_from_checkpoint": str(path)}


def resume_path_is_half_written(tmp, teacher, images):
    path = tmp / "run" / "checkpoint-4.partial"
    path.mkdir(parents=True)
    (path / "unet_trainable.safetensors").write_bytes(b"")
    return {"--resume_from_checkpoint": str(path)}


# --- loop flags checked when the command line is parsed (TrainConfig), and method grids against the teacher's T
def train_batch_size_zero(tmp, teacher, images):
    return {"--train_batch_size": "0"}


def gradient_accumulation_steps_zero(tmp, teacher, images):
    return {"--gradient_accumulation_steps": "0"}


def checkpointing_steps_zero(tmp, teacher, images):
    return {"--checkpointing_steps": "0"}


def checkpointing_steps_negative(tmp, teacher, images):
    return {"--checkpointing_steps": "-5"}


def checkpoints_total_limit_zero(tmp, teacher, images):
    return {"--checkpoints_total_limit": "0"}


def learning_rate_negative(tmp, teacher, images):
    return {"--learning_rate": "-0.0001"}


def learning_rate_zero(tmp, teacher, images):
    return {"--learning_rate": "0"}


def learning_rate_nan(tmp, teacher, images):
    return {"--learning_rate": "nan"}


def learning_rate_inf(tmp, teacher, images):
    return {"--learning_rate": "inf"}


def learning_rates_value_negative(tmp, teacher, images):
    return {"--learning_rates": "unet=-0.001"}


def learning_rates_value_nan(tmp, teacher, images):
    return {"--learning_rates": "fake_score=nan"}


def validation_prompt_blank(tmp, teacher, images):
    return {"--validation_prompt": "   "}


def validation_prompts_empty(tmp, teacher, images):
    return {"--validation_prompts": " , "}


def num_ddim_timesteps_above_teacher(tmp, teacher, images):
    return {"--num_ddim_timesteps": "2000"}  # the tiny teacher, like SD/SDXL, has T = 1000


def num_denoising_steps_above_teacher(tmp, teacher, images):
    return {"--num_denoising_steps": "1001"}


def config_file_missing(tmp, teacher, images):
    return {"--config": str(tmp / "no-such-run.yaml")}


def config_file_has_an_unknown_setting(tmp, teacher, images):
    (tmp / "run.yaml").write_text("learning_rate: 1e-4\nlearning_rat: 2e-4\n")
    return {"--config": str(tmp / "run.yaml")}


def config_file_of_another_method(tmp, teacher, images):
    (tmp / "run.yaml").write_text("method: pcm\nmultiphase: 4\n")
    return {"--config": str(tmp / "run.yaml")}


def output_dir_is_a_file(tmp, teacher, images):
    (tmp / "a-file").write_text("not a folder")
    return {"--output_dir": str(tmp / "a-file")}


@dataclass(frozen=True)
class Case:
    setup: Callable[[Path, Path, Path], dict]
    message: str  # how the error line starts, as in the README table; <...> is a part that varies
    script: str = "lcm_lora.py"


CASES = [
    Case(teacher_flag_missing, "--pretrained_teacher_model is required: a local SD/SDXL folder or a Hub id."),
    Case(teacher_folder_missing, "Teacher folder <path> does not exist. Check --pretrained_teacher_model."),
    Case(teacher_hub_id_not_found, "Could not find the teacher <id>: it is not a local folder and the Hub lookup "
                                   "failed"),
    Case(teacher_is_another_pipeline, "<path> (<class>) is not a Stable Diffusion pipeline of a known family "
                                      "(<families>): it has no <components>."),
    Case(teacher_is_an_empty_folder, "<path> is not a diffusers pipeline folder (no model_index.json)."),
    Case(both_dataset_flags, "Exactly one of --dataset_name and --train_data_dir is needed, but <which>."),
    Case(data_dir_missing, "--train_data_dir '<path>' does not exist."),
    Case(data_dir_is_a_plain_file, "--train_data_dir '<path>' is a file but not a .tar shard."),
    Case(data_folder_is_empty, "<folder> contains no images (<extensions>) and no .tar shards."),
    Case(data_folder_has_no_metadata, "<folder> has no metadata.jsonl."),
    Case(metadata_line_is_not_json, "<folder>/metadata.jsonl line <n> is not valid JSON"),
    Case(metadata_line_is_not_an_object, "<folder>/metadata.jsonl line <n> is JSON but not an object"),
    Case(metadata_line_lacks_file_name, '<folder>/metadata.jsonl line <n> has no "file_name" key'),
    Case(metadata_lacks_the_caption_column, "Caption column 'text' not found in <folder>/metadata.jsonl line <n>"),
    Case(caption_is_not_text, "The caption of <folder>/metadata.jsonl line <n> is <value> (<type>); captions must "
                              "be a string or a non-empty list of strings."),
    Case(metadata_names_missing_images, "<folder>/metadata.jsonl names <n> file(s) that do not exist in <folder>"),
    Case(metadata_has_no_rows, "The dataset <name> is empty (0 rows)."),
    Case(image_cannot_be_read, "<n> image file(s) in <name> cannot be read: <files>."),
    Case(image_column_on_a_local_folder, "Image column '<column>' does not exist in this local folder"),
    Case(shard_is_not_a_tar, "Cannot read the tar shard <path>"),
    Case(shard_pattern_matches_nothing, "The shard pattern '<pattern>' expands to <n> file(s) but <m> do not exist"),
    Case(dataset_path_missing, "The dataset path '<path>' does not exist. Check --dataset_name"),
    Case(dataset_not_on_the_hub, "Cannot load the dataset '<name>' from the Hugging Face Hub"),
    Case(dataset_has_no_train_split, "The dataset <name> has no 'train' split"),
    Case(dataset_lacks_the_caption_column, "Caption column 'text' not found in <name>; the columns are: <columns>."),
    Case(prompts_missing, "This method trains on prompts only: pass --prompts_file", "swiftbrush.py"),
    Case(prompt_file_missing, "The prompt file <path> does not exist.", "swiftbrush.py"),
    Case(prompt_file_is_blank, "<path> contains no prompts.", "swiftbrush.py"),
    Case(pairs_missing, "This method trains on teacher noise-latent pairs: pass --pairs_dir",
         "rectified_diffusion.py"),
    Case(pair_folder_missing, "The pair folder <path> does not exist.", "rectified_diffusion.py"),
    Case(pair_folder_has_no_manifest, "<folder> is not a pair folder (no pairs.json).", "rectified_diffusion.py"),
    Case(w_min_above_w_max, "Need 0 <= --w_min <= --w_max, got w_min=<a>, w_max=<b>."),
    Case(unknown_loss_type, "--loss_type must be l2 or huber, got '<value>'."),
    Case(max_train_steps_zero, "--max_train_steps must be positive, got <n>."),
    Case(resolution_not_multiple_of_8, "--resolution must be a multiple of <m> for an <family> teacher, got <n>."),
    Case(resolution_negative, "--resolution must be a positive integer, got <n>."),
    Case(max_train_samples_zero, "--max_train_samples must be a positive number of samples, got <n>."),
    Case(unknown_interpolation, "Unknown interpolation type '<name>'. Pass --interpolation_type with one of:"),
    Case(seed_out_of_range, "--seed must be in [0, 2**32 - 1], got <n>."),
    Case(unknown_export_format, "--export_format must be one of both, diffusers, kohya, got '<value>'."),
    Case(push_without_repo, "--push_to_hub needs --hub_model_id (the repo to create or update)."),
    Case(pipeline_upload_without_push, "--hub_include_pipeline only applies to an upload: add --push_to_hub"),
    Case(pipeline_upload_without_pipeline, "--hub_include_pipeline uploads the pipeline folder, but "
                                           "--no_export_pipeline skips writing it"),
    Case(resume_path_missing, "--resume_from_checkpoint <path> is not a checkpoint folder;"),
    Case(resume_path_is_the_output_folder, "--resume_from_checkpoint <path> is not a checkpoint folder;"),
    Case(resume_path_is_half_written, "--resume_from_checkpoint <path> is a checkpoint whose saving never finished;"),
    Case(train_batch_size_zero, "--train_batch_size must be at least 1, got <n>;"),
    Case(gradient_accumulation_steps_zero, "--gradient_accumulation_steps must be at least 1, got <n>;"),
    Case(checkpointing_steps_zero, "--checkpointing_steps must be a positive number of steps, got <n>;"),
    Case(checkpointing_steps_negative, "--checkpointing_steps must be a positive number of steps, got <n>;"),
    Case(checkpoints_total_limit_zero, "--checkpoints_total_limit must be at least 1, got <n>;"),
    Case(learning_rate_negative, "--learning_rate must be a positive finite number, got <value>;"),
    Case(learning_rate_zero, "--learning_rate must be a positive finite number, got <value>;"),
    Case(learning_rate_nan, "--learning_rate must be a positive finite number, got <value>;"),
    Case(learning_rate_inf, "--learning_rate must be a positive finite number, got <value>;"),
    Case(learning_rates_value_negative, "--learning_rates <name> must be a positive finite number, got <value>;"),
    Case(learning_rates_value_nan, "--learning_rates <name> must be a positive finite number, got <value>;",
         "swiftbrush.py"),
    Case(validation_prompt_blank, "--validation_prompts needs non-blank prompts, got <prompts>:"),
    Case(validation_prompts_empty, "--validation_prompts needs non-blank prompts, got <prompts>:"),
    Case(num_ddim_timesteps_above_teacher, "--<flag> (<n>) cannot exceed the teacher's <T> training timesteps;"),
    Case(num_denoising_steps_above_teacher, "--<flag> (<n>) cannot exceed the teacher's <T> training timesteps;",
         "ufogen.py"),
    Case(output_dir_is_a_file, "--output_dir <path> is a file, not a folder:"),
    Case(config_file_missing, "--config <path> does not exist:"),
    Case(config_file_has_an_unknown_setting, "--config <path> has unknown settings: <names>."),
    Case(config_file_of_another_method, "--config <path> is the settings of a <method> run, not <method>:"),
]


def message_pattern(message: str) -> re.Pattern:
    """The start of an `error:` line, with each <...> standing for any non-empty text."""
    parts = re.split(r"<[^<>]+>", message)
    return re.compile("error: " + ".+?".join(re.escape(part) for part in parts))


def readme_messages() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    table = section.split("|---|---|---|\n", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    return [re.search(r"`([^`]+)`", row.split("|")[2]).group(1) for row in rows]


def test_readme_table_lists_exactly_these_cases():
    messages = readme_messages()
    assert len(messages) == len(set(messages))
    assert set(messages) == {case.message for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.setup.__name__ for c in CASES])
def test_user_error_stops_before_training(case, tmp_path, sd_teacher, image_folder):
    overrides = case.setup(tmp_path, sd_teacher, image_folder)
    out = tmp_path / "out"
    flags = {"--pretrained_teacher_model": str(sd_teacher), "--train_data_dir": str(image_folder),
             "--output_dir": str(out), "--max_train_steps": "2", "--train_batch_size": "2", "--lora_rank": "4",
             "--seed": "0", "--validation_steps": "0", "--report_to": "none", **overrides}
    argv = [part for flag, value in flags.items() if value is not None for part in (flag, value) if part != ""]
    result, seconds = run_cli(case.script, *argv)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert message_pattern(case.message).match(errors[0]), (case.message, errors[0])
    # Nothing else was printed (no model-loading bar, no accelerate log) and nothing written: the run stopped while
    # validating its inputs.
    assert result.stderr.strip().splitlines() == errors, result.stderr[-3000:]
    assert not out.exists()
    assert result.stdout == ""
    assert seconds < MAX_SECONDS, f"{case.setup.__name__} took {seconds:.1f} s"
