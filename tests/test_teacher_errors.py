"""A damaged or mismatched teacher, and a LoRA loaded onto the wrong base family, end in one clear error.

Teacher cases run the real command line (train_scripts/lcm_lora.py) in a fresh process: exit status 2, exactly one
`error:` line starting with the expected text (`<...>` stands for a part that varies), no traceback. The LoRA cases
call the library functions that load an exported LoRA folder onto a base pipeline (distill.demo's
load_student_pipeline, which benchmarks/quality.py uses, and distill.export's export_pipeline_folder).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from distill.errors import DistillError

REPO = Path(__file__).resolve().parents[1]
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def message_pattern(message: str) -> re.Pattern:
    """The start of an error text, with each <...> standing for any non-empty text."""
    return re.compile(".+?".join(re.escape(part) for part in re.split(r"<[^<>]+>", message)))


def run_training(teacher: Path, images: Path, out: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "train_scripts" / "lcm_lora.py"), "--pretrained_teacher_model", str(teacher),
            "--train_data_dir", str(images), "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2",
            "--lora_rank", "4", "--seed", "0", "--max_train_steps", "1", "--validation_steps", "0",
            "--report_to", "none"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)


def assert_one_error(result: subprocess.CompletedProcess, message: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert message_pattern("error: " + message).match(errors[0]), (message, errors[0])
    return errors[0]


def copy_teacher(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def cut_to(path: Path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


# ----------------------------------------------------------------------------------------------- damaged weights


def test_truncated_unet_weights_name_the_file_and_the_fix(sd_teacher, image_folder, tmp_path):
    teacher = copy_teacher(sd_teacher, tmp_path / "teacher")
    cut_to(teacher / UNET_WEIGHTS, (teacher / UNET_WEIGHTS).stat().st_size // 2)
    result = run_training(teacher, image_folder, tmp_path / "out")
    line = assert_one_error(result, "The teacher's weights file <path> is damaged (<detail>): an interrupted download "
                                    "or copy cut it short. Re-download unet/diffusion_pytorch_model.safetensors")
    assert str(teacher / UNET_WEIGHTS) in line
    assert not (tmp_path / "out").exists()  # found from the file's header, before anything was loaded or written


def test_text_encoder_cut_inside_its_header_is_reported_too(sd_teacher, image_folder, tmp_path):
    teacher = copy_teacher(sd_teacher, tmp_path / "teacher")
    cut_to(teacher / "text_encoder" / "model.safetensors", 100)
    result = run_training(teacher, image_folder, tmp_path / "out")
    line = assert_one_error(result, "The teacher's weights file <path> is damaged (<detail>)")
    assert "text_encoder/model.safetensors" in line and not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_config_fail_as_one_error_line(sd_teacher, sdxl_teacher, image_folder, tmp_path):
    """An intact file that from_pretrained still cannot load (the SDXL weights under the SD UNet's config): the
    teacher-loading guard in Trainer._load_teacher turns the deep diffusers error into one line."""
    teacher = copy_teacher(sd_teacher, tmp_path / "teacher")
    shutil.copy(sdxl_teacher / UNET_WEIGHTS, teacher / UNET_WEIGHTS)
    result = run_training(teacher, image_folder, tmp_path / "out")
    assert_one_error(result, "Could not load the teacher <path> (<error>). A file of it is probably damaged or "
                             "incomplete (an interrupted download): re-download the teacher and rerun.")


# ----------------------------------------------------------------------------------------------- mixed components


def test_sdxl_unet_inside_an_sd_folder_says_what_is_inconsistent(sd_teacher, sdxl_teacher, image_folder, tmp_path):
    """Before: TypeError "argument of type 'NoneType' is not iterable" from the UNet's forward at the first step."""
    teacher = copy_teacher(sd_teacher, tmp_path / "teacher")
    shutil.rmtree(teacher / "unet")
    shutil.copytree(sdxl_teacher / "unet", teacher / "unet")
    result = run_training(teacher, image_folder, tmp_path / "out")
    line = assert_one_error(result, "<path> mixes components of different models: unet/config.json is an SDXL UNet "
                                    "(addition_embed_type 'text_time') but model_index.json has no text_encoder_2, as "
                                    "in SD 1.x/2.x")
    assert "cross_attention_dim" in line and "Replace the mismatched folder (usually unet/)" in line
    assert not (tmp_path / "out").exists()


def test_sd_unet_inside_an_sdxl_folder_is_refused(sd_teacher, sdxl_teacher, image_folder, tmp_path):
    teacher = copy_teacher(sdxl_teacher, tmp_path / "teacher")
    shutil.rmtree(teacher / "unet")
    shutil.copytree(sd_teacher / "unet", teacher / "unet")
    result = run_training(teacher, image_folder, tmp_path / "out")
    assert_one_error(result, "<path> mixes components of different models: unet/config.json is an SD 1.x/2.x UNet")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- LoRA onto a base


def exported_lora(teacher: Path, folder: Path) -> Path:
    """A LoRA student folder as training exports it (export_lora_folder), from an untrained adapter."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    from distill.teacher import inspect_teacher
    from distill.export import export_lora_folder
    from distill.families import UNET_LORA_TARGETS
    from distill.lora import add_lora
    from distill.methods import SamplingSpec

    info = inspect_teacher(str(teacher))
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    add_lora(unet, UNET_LORA_TARGETS, rank=4)
    scheduler = LCMScheduler.from_pretrained(teacher, subfolder="scheduler")
    sampling = SamplingSpec("LCMScheduler", num_inference_steps=4, guidance_scale=1.0)
    return export_lora_folder(folder, unet, info, scheduler, sampling,
                              {"method": "lcm", "pretrained_teacher_model": str(teacher)})


@pytest.fixture(scope="module")
def loras(sd_teacher, sdxl_teacher, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {"sd": exported_lora(sd_teacher, root / "sd"), "sdxl": exported_lora(sdxl_teacher, root / "sdxl")}


@pytest.mark.parametrize("family, base_family", [("sd", "sdxl"), ("sdxl", "sd")])
def test_lora_onto_the_other_family_is_refused_before_loading(family, base_family, loras, request):
    from distill.demo import load_student_pipeline

    base = request.getfixturevalue(f"{base_family}_teacher")
    names = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
    with pytest.raises(DistillError) as raised:
        load_student_pipeline(base, loras[family])
    message = str(raised.value)
    assert message_pattern(f"The LoRA in <folder> was distilled from an {names[family]} teacher (<teacher>), but the "
                           f"base <path> is {names[base_family]}: a LoRA loads only onto the family it was trained "
                           "on.").match(message), message
    assert str(loras[family]) in message and str(base) in message and "\n" not in message


def test_pipeline_export_refuses_the_other_family_and_writes_nothing(loras, sdxl_teacher, tmp_path):
    from diffusers import LCMScheduler

    from distill.teacher import inspect_teacher
    from distill.export import export_pipeline_folder
    from distill.methods import SamplingSpec

    scheduler = LCMScheduler.from_pretrained(sdxl_teacher, subfolder="scheduler")
    with pytest.raises(DistillError, match="was distilled from an SD 1.x/2.x teacher"):
        export_pipeline_folder(tmp_path / "pipeline", str(sdxl_teacher), inspect_teacher(str(sdxl_teacher)),
                               loras["sd"], scheduler, SamplingSpec("LCMScheduler", num_inference_steps=4))
    assert not (tmp_path / "pipeline").exists()


def test_lora_without_a_recorded_family_is_checked_by_its_text_width(loras, sdxl_teacher, tmp_path):
    """Folders exported before the family was recorded: the cross-attention key width tells the bases apart."""
    from distill.demo import load_student_pipeline

    folder = shutil.copytree(loras["sd"], tmp_path / "old-export")
    config = json.loads((folder / "distill_config.json").read_text())
    del config["teacher_family"]
    (folder / "distill_config.json").write_text(json.dumps(config))
    with pytest.raises(DistillError) as raised:
        load_student_pipeline(sdxl_teacher, folder)
    assert message_pattern("The LoRA in <folder> was trained for a UNet that reads 32-wide text embeddings, but the "
                           "base <path> (SDXL) reads 64-wide ones").match(str(raised.value)), str(raised.value)


def test_lora_onto_its_own_family_still_loads(loras, sd_teacher):
    from diffusers import StableDiffusionPipeline

    from distill.demo import load_student_pipeline

    pipe = load_student_pipeline(sd_teacher, loras["sd"])
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.get_active_adapters()
