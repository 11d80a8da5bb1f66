"""Exports of a trained student: LoRA folder, self-contained pipeline folder, model card, Hub upload."""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .conditioning import TextConditioner
from .teacher import TeacherInfo
from .lora import KOHYA_WEIGHT_NAME, check_lora_base, save_lora

if TYPE_CHECKING:
    from .methods.base import SamplingSpec

PIPELINE_MODULE = "pipeline_few_step"  # the file in pipelines/ holding each family's few_step_pipeline class
SCHEDULER_SUBFOLDER = "scheduler"
FULL_UNET_SUBFOLDER = "unet"  # where a fully fine-tuned student's UNet goes instead of LoRA weights (SD, SDXL)
FULL_TRANSFORMER_SUBFOLDER = "transformer"  # the same for a transformer teacher (SD3)
SCHEDULER_FILES = {"LCMScheduler": None,  # scheduler class -> file in distill.pipelines when not a stock class
                   "PCMScheduler": "scheduler_pcm", "FlowFewStepScheduler": "scheduler_flow"}


def scheduler_class(name: str):
    """A diffusers scheduler class by name, or a custom one shipped in distill.pipelines (and in exported folders)."""
    import importlib

    import diffusers

    if hasattr(diffusers, name):
        return getattr(diffusers, name)
    return getattr(importlib.import_module(f"distill.pipelines.{SCHEDULER_FILES[name]}"), name)


def student_scheduler(teacher_scheduler_config, sampling: SamplingSpec):
    """The scheduler the student samples with, configured from the teacher's betas and the method's overrides."""
    return scheduler_class(sampling.scheduler).from_config(teacher_scheduler_config, **sampling.scheduler_config)


def student_pipeline(info: TeacherInfo, unet, vae, conditioner: TextConditioner, scheduler):
    """The family's stock pipeline assembled from in-memory components (for validation images)."""
    family = info.family_spec
    pipe = family.pipeline_class()(vae=vae, scheduler=scheduler, **{family.network_subfolder: unet},
                                   **family.text_components(conditioner), **family.pipeline_kwargs(info))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_lora_student(unet) -> bool:
    """True when the student is a peft LoRA on the teacher's UNet, False for a fully fine-tuned UNet."""
    return bool(getattr(getattr(unet, "module", unet), "peft_config", None))


def export_lora_folder(folder: Path, unet, info: TeacherInfo, scheduler, sampling: SamplingSpec,
                       run_config: dict) -> Path:
    """``pytorch_lora_weights.safetensors`` (or ``unet/`` for a fully fine-tuned student) + ``scheduler/`` +
    ``distill_config.json``: what a stock pipeline needs to sample from the student."""
    folder.mkdir(parents=True, exist_ok=True)
    if is_lora_student(unet):
        save_lora(folder, unet, info)
    else:
        getattr(unet, "module", unet).save_pretrained(folder / info.family_spec.network_subfolder)
    scheduler.save_pretrained(folder / SCHEDULER_SUBFOLDER)
    recorded = {k: v for k, v in asdict(sampling).items() if k != "scheduler_config"}  # that one is in scheduler/
    record = {**run_config, "teacher_family": info.family, "sampling": recorded}  # check_lora_base reads the family
    (folder / "distill_config.json").write_text(json.dumps(record, indent=2, default=str))
    return folder


def export_pipeline_folder(folder: Path, teacher_path: str, info: TeacherInfo, lora_folder: Path, scheduler,
                           sampling: SamplingSpec, torch_dtype=torch.float32) -> Path:
    """A folder ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` samples from in 1-4 steps.

    The teacher is loaded, the LoRA fused into its UNet (or the UNet replaced by a fully fine-tuned one), the
    scheduler replaced, and the custom pipeline file (plus the scheduler file when the scheduler is not stock
    diffusers) copied in and named in model_index.json.
    """
    check_lora_base(lora_folder, info)
    base = info.family_spec.pipeline_class().from_pretrained(teacher_path, dtype=torch_dtype)
    family = info.family_spec
    if (lora_folder / family.network_subfolder / "config.json").is_file():
        import diffusers

        network = getattr(diffusers, family.network_class).from_pretrained(lora_folder, dtype=torch_dtype,
                                                                           subfolder=family.network_subfolder)
        setattr(base, family.network_subfolder, network)
    else:
        base.load_lora_weights(lora_folder)
        base.fuse_lora()
        base.unload_lora_weights()
    components = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor")}
    components.update(scheduler=scheduler, **info.family_spec.pipeline_kwargs(info))
    pipe_cls = _load_few_step_class(info)
    pipe = pipe_cls(**components, default_num_inference_steps=sampling.num_inference_steps,
                    default_guidance_scale=sampling.guidance_scale)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    _install_custom_code(tmp, info, sampling)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


def _load_few_step_class(info: TeacherInfo):
    """The shipped pipeline class, imported from the very file that is copied into exported folders."""
    from . import pipelines  # the repository's pipelines/ folder, installed as distill.pipelines

    name = info.family_spec.few_step_pipeline
    return getattr(__import__(f"{pipelines.__name__}.{PIPELINE_MODULE}", fromlist=[name]), name)


def _install_custom_code(folder: Path, info: TeacherInfo, sampling: SamplingSpec) -> None:
    """Copy the pipeline (and custom scheduler) source into ``folder`` and point model_index.json at them."""
    source = resources.files("distill.pipelines")
    (folder / f"{PIPELINE_MODULE}.py").write_text(source.joinpath(f"{PIPELINE_MODULE}.py").read_text())
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = [PIPELINE_MODULE, info.family_spec.few_step_pipeline]
    scheduler_file = SCHEDULER_FILES.get(sampling.scheduler)
    if scheduler_file is not None:
        target = folder / SCHEDULER_SUBFOLDER / f"{scheduler_file}.py"
        target.write_text(source.joinpath(f"{scheduler_file}.py").read_text())
        index["scheduler"] = [scheduler_file, sampling.scheduler]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


SAMPLES_FILE = "samples.png"  # the last validation grid, copied next to the model card
GENERIC_CARD = "generic.md"  # the model card template of a method without model_cards/<method>.md
PIPELINE_SUBFOLDER = "pipeline"
# What a LoRA/student folder holds for the Hub: weights (diffusers and kohya keys, or a full UNet), the scheduler,
# the card, its sample grid and the run's settings. Anything else in output_dir (checkpoint-N/, logs/, cache/,
# validation/, half-written *.partial folders) stays local.
HUB_STUDENT_FILES = ["pytorch_lora_weights.safetensors", KOHYA_WEIGHT_NAME, f"{FULL_UNET_SUBFOLDER}/*",
                     f"{FULL_TRANSFORMER_SUBFOLDER}/*", f"{SCHEDULER_SUBFOLDER}/*", "README.md", SAMPLES_FILE,
                     "distill_config.json"]
HUB_PIPELINE_FILES = [f"{PIPELINE_SUBFOLDER}/*"]
HUB_NEVER = ["*.partial", "*.partial/*", "checkpoint-*", "logs/*", "cache/*", "validation/*"]


def copy_sample_grid(output_dir: Path) -> Path | None:
    """Copy the newest validation grid (``validation/step-N.png``) to ``samples.png``; None when there is none."""
    grids = sorted((output_dir / "validation").glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    if not grids:
        return None
    target = output_dir / SAMPLES_FILE
    shutil.copyfile(grids[-1], target)
    return target


def _scheduler_import(scheduler: str) -> str:
    """The import line for the student's scheduler: stock diffusers, or the file shipped in ``scheduler/``."""
    import diffusers

    if hasattr(diffusers, scheduler):
        return f"from diffusers import {scheduler}"
    return f"from {SCHEDULER_FILES.get(scheduler) or scheduler} import {scheduler}  # file in this repo's scheduler/"


def _table_rows(values: dict | None) -> str:
    return "\n".join(f"| {k} | {v} |" for k, v in sorted((values or {}).items()))


def card_template(method: str) -> str:
    """The text of ``model_cards/<method>.md``, or of ``model_cards/generic.md`` for a method without its own."""
    cards = resources.files("distill.model_cards")
    own = cards.joinpath(f"{method}.md")
    return (own if own.is_file() else cards.joinpath(GENERIC_CARD)).read_text()


def method_description(method_cls: type) -> str | None:
    """What the generic card says about a method: its class docstring (not one inherited from the base class)."""
    doc = method_cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else None


def write_model_card(folder: Path, method: str, info: TeacherInfo, teacher_id: str, sampling: SamplingSpec,
                     hyperparameters: dict, metrics: dict | None = None, repo_id: str | None = None,
                     samples: str | None = None, pipeline_subfolder: str | None = None,
                     kohya_file: str | None = None, description: str | None = None) -> Path:
    """``README.md`` from ``model_cards/<method>.md`` or the generic template (huggingface_hub ModelCard): usage
    with the right scheduler, steps and guidance, hyperparameters, metrics and, when given, the method's description,
    the sample grid and the pipeline folder."""
    from huggingface_hub import ModelCard, ModelCardData

    template = card_template(method)
    data = ModelCardData(library_name="diffusers", base_model=teacher_id, license="other",
                         tags=["text-to-image", "diffusers", "lora", "distillation", method])
    card = ModelCard.from_template(
        data,
        template_str=template,
        method=method,
        teacher=teacher_id,
        pipeline_class=info.family_spec.stock_pipeline,
        scheduler=sampling.scheduler,
        scheduler_import=_scheduler_import(sampling.scheduler),
        steps=sampling.num_inference_steps,
        guidance=sampling.guidance_scale,
        hyperparameters=_table_rows(hyperparameters),
        metrics=_table_rows(metrics) or "| not measured | |",
        repo_id=repo_id or "<this repo>",
        samples=samples,
        pipeline_subfolder=pipeline_subfolder,
        kohya_file=kohya_file,
        description=description,
    )
    path = folder / "README.md"
    card.save(path)
    return path


def hub_upload_patterns(include_pipeline: bool) -> tuple[list[str], list[str]]:
    """(allow_patterns, ignore_patterns) for ``upload_folder``: the student files, optionally ``pipeline/``."""
    return HUB_STUDENT_FILES + (HUB_PIPELINE_FILES if include_pipeline else []), list(HUB_NEVER)


def push_to_hub(folder: Path, repo_id: str, token: str | None = None, private: bool = False,
                include_pipeline: bool = False) -> str:
    """Create (or reuse) the model repo and upload the student folder in one commit with huggingface_hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    allow, ignore = hub_upload_patterns(include_pipeline)
    api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), repo_type="model", allow_patterns=allow,
                      ignore_patterns=ignore, commit_message="Upload distilled student")
    return repo.repo_id


def export_student(output_dir: Path, method, unet, teacher, cfg, plan) -> None:
    """Everything a finished run writes: LoRA folder (kohya keys too unless --export_format diffusers), sample grid,
    model card, optional pipeline folder (output_dir/pipeline), optional upload to the Hub."""
    import logging

    from .lora import save_lora_kohya

    sampling = method.sampling()
    scheduler = student_scheduler(teacher.scheduler_config, sampling)
    export_lora_folder(output_dir, unet, teacher.info, scheduler, sampling,
                       {"method": plan.method, **plan.scalar_settings()})
    kohya = None
    if cfg.export_format != "diffusers":
        if is_lora_student(unet):
            kohya = save_lora_kohya(output_dir, unet, teacher.info).name
        elif cfg.export_format == "kohya":
            logging.getLogger(__name__).warning(
                "--export_format kohya applies to LoRA students; this one is a full UNet (unet/).")
    samples = copy_sample_grid(output_dir)
    hyper = {k: v for k, v in asdict(method.config).items() if not isinstance(v, list)}
    hyper.update(learning_rate=cfg.learning_rate, train_batch_size=cfg.train_batch_size,
                 max_train_steps=cfg.max_train_steps, resolution=plan.resolution)
    with_pipeline = cfg.export_pipeline and (cfg.hub_include_pipeline or not cfg.push_to_hub)
    write_model_card(output_dir, plan.method, teacher.info, cfg.pretrained_teacher_model, sampling, hyper,
                     repo_id=cfg.hub_model_id if cfg.push_to_hub else None, samples=samples.name if samples else None,
                     pipeline_subfolder=PIPELINE_SUBFOLDER if with_pipeline else None, kohya_file=kohya,
                     description=method_description(type(method)))
    if cfg.export_pipeline:
        export_pipeline_folder(output_dir / PIPELINE_SUBFOLDER, teacher.info.path, teacher.info, output_dir, scheduler,
                               sampling)
    if cfg.push_to_hub:
        push_to_hub(output_dir, cfg.hub_model_id, cfg.hub_token, private=cfg.hub_private_repo,
                    include_pipeline=cfg.hub_include_pipeline)
