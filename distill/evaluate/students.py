"""The pipelines an evaluation samples from: a teacher (folder or Hub id) and students in the layouts this toolkit
exports (a self-contained ``pipeline/`` folder, a LoRA folder, a full fine-tuned ``unet/``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DistillError
from ..export import (FULL_TRANSFORMER_SUBFOLDER, FULL_UNET_SUBFOLDER, PIPELINE_SUBFOLDER, SCHEDULER_SUBFOLDER,
                      scheduler_class)
from ..lora import LORA_WEIGHT_NAME, STUDENT_CONFIG, check_lora_base
from ..teacher import inspect_teacher, pipeline_class, teacher_load_errors

DEFAULT_TEACHER_GUIDANCE = 7.5


def read_student_config(folder: Path) -> dict:
    """The student's distill_config.json ({} when the folder has none)."""
    file = Path(folder) / STUDENT_CONFIG
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DistillError(f"{file} is damaged (not valid JSON). Export the student again.") from None


def student_layout(folder: Path) -> str:
    """"pipeline" (an exported ``pipeline/`` inside), "pipeline_root" (the folder is a pipeline), "lora", or the
    subfolder of a fully fine-tuned network: "unet" or "transformer"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DistillError(f"The student folder {folder} does not exist. Pass the output_dir of a training run.")
    if (folder / PIPELINE_SUBFOLDER / "model_index.json").is_file():
        return "pipeline"
    if (folder / "model_index.json").is_file():
        return "pipeline_root"
    if (folder / LORA_WEIGHT_NAME).is_file():
        return "lora"
    for network in (FULL_UNET_SUBFOLDER, FULL_TRANSFORMER_SUBFOLDER):
        if (folder / network / "config.json").is_file():
            return network
    raise DistillError(f"{folder} is not a student folder: expected {PIPELINE_SUBFOLDER}/model_index.json (an exported "
                       f"pipeline), model_index.json (a pipeline folder), {LORA_WEIGHT_NAME} (a LoRA; needs --teacher) "
                       f"or {FULL_UNET_SUBFOLDER}/ or {FULL_TRANSFORMER_SUBFOLDER}/config.json (a fine-tuned network; "
                       "needs --teacher).")


def load_student_pipeline(teacher: str | os.PathLike | None, student_folder: str | os.PathLike):
    """Any method's student as a user loads it: the exported pipeline folder (custom code travels with it) if
    there is one, else the teacher's stock pipeline with the exported LoRA (or full UNet) and the scheduler named in
    distill_config.json."""
    import diffusers

    folder = Path(student_folder)
    layout = student_layout(folder)
    if layout in ("pipeline", "pipeline_root"):
        path = folder / PIPELINE_SUBFOLDER if layout == "pipeline" else folder
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    else:
        if teacher is None:
            raise DistillError(f"{folder} holds only the student's {'LoRA' if layout == 'lora' else layout}: pass "
                               "--teacher, the base it was distilled from.")
        sampling = read_student_config(folder).get("sampling")
        if not sampling:
            raise DistillError(f"{folder} has no {STUDENT_CONFIG} naming the scheduler to sample with: export the "
                               "student again, or pass its pipeline folder.")
        info = inspect_teacher(str(teacher))
        if layout == "lora":
            check_lora_base(folder, info)  # an SD LoRA onto an SDXL base (or back): one clear error
            pipe = pipeline_class(info).from_pretrained(info.path)
            pipe.load_lora_weights(folder)
        else:
            network = getattr(diffusers, info.family_spec.network_class).from_pretrained(folder / layout)
            pipe = pipeline_class(info).from_pretrained(info.path, **{layout: network})
        pipe.scheduler = scheduler_class(sampling["scheduler"]).from_pretrained(folder, subfolder=SCHEDULER_SUBFOLDER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def student_guidance(student_folder: str | os.PathLike) -> float:
    """The guidance scale the student was exported to sample with (1 for students trained on a guided teacher)."""
    return float(read_student_config(Path(student_folder))["sampling"]["guidance_scale"])


def exported_guidance(student_folder: str | os.PathLike, pipe) -> float:
    """The student's sampling guidance: its pipeline's default, else distill_config.json's, else 1 (no CFG)."""
    default = getattr(pipe.config, "default_guidance_scale", None)
    if default is not None:
        return float(default)
    sampling = read_student_config(Path(student_folder)).get("sampling") or {}
    return float(sampling.get("guidance_scale", 1.0))


def _number(value) -> float | None:
    """A recorded setting as a float (distill_config.json writes unset ones as "None")."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def recorded_teacher_guidance(student_folder: str | os.PathLike) -> float | None:
    """The CFG scale (pipeline form, 1 = off) the student's teacher was guided with in training, if recorded.

    Rectified Diffusion's ``teacher_guidance_scale``, DMD2's ``real_guidance_scale`` and SwiftBrush's
    ``guidance_scale`` are in that form already; LCM/PCM sample w ~ U[w_min, w_max] in the (1 + w) c - w u form
    (LCM, Luo et al. 2023, eq. 9), which is pipeline scale 1 + w: the midpoint 1 + (w_min + w_max) / 2 is reported.
    """
    config = read_student_config(Path(student_folder))
    for key in ("teacher_guidance_scale", "real_guidance_scale", "guidance_scale"):
        if (value := _number(config.get(key))) is not None:
            return value
    w_min, w_max = _number(config.get("w_min")), _number(config.get("w_max"))
    if w_min is not None and w_max is not None:
        return 1.0 + (w_min + w_max) / 2
    return None


def recorded_teacher(student_folder: str | os.PathLike) -> str | None:
    """The teacher the student was distilled from, as its run recorded it."""
    value = read_student_config(Path(student_folder)).get("pretrained_teacher_model")
    return None if value in (None, "None") else str(value)


def load_teacher_pipeline(teacher: str | os.PathLike, scheduler: str | None = None):
    """The teacher's stock pipeline (folder, or Hub id through the cache) with its own scheduler, or ``scheduler``
    (a diffusers scheduler class name) built from the teacher's scheduler config."""
    from diffusers import SchedulerMixin

    cls = None
    if scheduler is not None:
        try:
            cls = scheduler_class(scheduler)
        except (KeyError, AttributeError):
            pass
        if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
            raise DistillError(f"--teacher_scheduler {scheduler} is not a diffusers scheduler class (e.g. "
                               "DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler).")
    info = inspect_teacher(str(teacher))
    with teacher_load_errors(info):
        pipe = pipeline_class(info).from_pretrained(info.path)
    if cls is not None:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
