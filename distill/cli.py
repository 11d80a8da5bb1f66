"""Command lines: flags generated from the config dataclasses, named as in diffusers' LCM distillation scripts."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from .data import ImageDataConfig
from .errors import DistillError
from .methods import get_method
from .trainer import Trainer, TrainConfig

HELP = {
    "pretrained_teacher_model": "Teacher: a local SD 1.x/2.x or SDXL diffusers folder, or a Hub id.",
    "dataset_name": "A Hugging Face datasets name, or a folder written by Dataset.save_to_disk.",
    "train_data_dir": "A local folder of images with metadata.jsonl, or webdataset .tar shards.",
    "resolution": "Training resolution; default: the teacher's native size (512 for SD 1.x, 1024 for SDXL).",
    "w_min": "Minimum guidance scale w sampled for the CFG-augmented teacher ((1+w) cond - w uncond).",
    "w_max": "Maximum guidance scale w sampled for the CFG-augmented teacher.",
    "num_ddim_timesteps": "N, the number of points on the teacher's DDIM skipping-step grid.",
    "loss_type": "Distance between student and target: l2 or huber (pseudo-Huber).",
    "proportion_empty_prompts": "Fraction of captions replaced by the empty prompt.",
    "resume_from_checkpoint": "'latest' or a checkpoint-N folder to resume from.",
    "checkpoints_total_limit": "Keep at most this many checkpoints (oldest removed first).",
    "cache_latents": "Encode the dataset with the VAE and text encoders once and train from the cache.",
    "learning_rates": "Per-optimizer learning rates, e.g. --learning_rates fake_score=1e-3.",
    "export_pipeline": "Also write a self-contained pipeline folder (output_dir/pipeline).",
    "lora_target_modules": "Comma-separated module names to adapt (default: diffusers' LCM-LoRA list).",
    "rectified_variant": "pairs (Algorithm 4, needs --pairs_dir), phased (online teacher inside --num_phases "
                         "phases, image data) or consistency (consistency distillation along each pair's line).",
    "num_phases": "Phases M of the phased variant; --num_ddim_timesteps must be a multiple.",
    "teacher_guidance_scale": "CFG scale (pipeline form) of the online teacher.",
    "full_finetune": "Train the whole UNet instead of a LoRA.",
    "use_ema": "Keep and export an EMA of the trained weights (diffusers EMAModel).",
    "ema_decay": "Decay of the EMA of the trained weights.",
    "pairs_dir": "Folder of teacher (noise, latent) pairs written by train_scripts/generate_pairs.py.",
    "prompts_file": "Prompt-only methods: a .txt file with one prompt per line.",
    "num_inference_steps": "Default number of steps of the exported sampler.",
    "guidance_scale": "CFG scale w of the real (teacher) score, eps_u + w (eps_c - eps_u).",
    "min_timestep_ratio": "Score-distillation timesteps t ~ U[min_timestep_ratio T, max_timestep_ratio T].",
    "max_timestep_ratio": "Upper end of the score-distillation timestep range, as a fraction of T.",
    "weighting": "swiftbrush (sigma_t^2) or dmd (normalised x0-space) weighting of the VSD gradient.",
    "fake_lora_rank": "LoRA rank of the fake score.",
    "fake_lora_alpha": "LoRA alpha of the fake score.",
    "fake_score_lr_ratio": "Fake-score learning rate = --learning_rate x this ratio.",
    "export_format": "diffusers, or kohya to also write pytorch_lora_weights_kohya.safetensors (ComfyUI/A1111).",
    "push_to_hub": "Upload the student (weights, scheduler/, model card, samples.png) to --hub_model_id.",
    "hub_model_id": "The Hub model repo to create or update, e.g. user/lcm-lora-sdxl.",
    "hub_include_pipeline": "With --push_to_hub, also upload the self-contained pipeline/ folder.",
    "hub_private_repo": "With --push_to_hub, create the repo as private.",
}
# Flags of diffusers' scripts that this toolkit accepts under the same name but handles elsewhere or ignores.
ALIASES = {"train_shards_path_or_url": "train_data_dir"}
ACCEPTED_NO_EFFECT = {
    "local_rank": "set by the launcher; accelerate reads it from the environment",
    "cast_teacher_unet": "the teacher is the student's UNet with LoRA disabled, already in the weight dtype",
    "revision": "use --teacher_revision",
    "variant": "weights are read in the teacher's stored precision",
}


def _base_type(hint):
    """The scalar type of an annotation such as ``int | None`` or ``list[str]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (list, dict):
        return typing.get_origin(hint), (args[0] if args else str)
    if args:
        return _base_type(args[0])
    return hint, None


def _parse_mapping(text: str) -> dict:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected name=value[,name=value], got {text!r}")
    return {k: float(v) for k, v in pairs}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, seen: set[str]) -> None:
    """One --flag per dataclass field (booleans become store_true, lists comma-separated)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in seen:
            continue
        seen.add(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind, item = _base_type(hints[f.name])
        help_text = HELP.get(f.name, "") + f" (default: {default})"
        flag = f"--{f.name}"
        if kind is bool and default is False:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif kind is bool:
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=help_text)
        elif kind is list:
            parser.add_argument(flag, type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                                default=None, help=help_text)
        elif kind is dict:
            parser.add_argument(flag, type=_parse_mapping, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def build_parser(method_name: str) -> argparse.ArgumentParser:
    """The parser for one method's command line."""
    method_cls = get_method(method_name)
    parser = argparse.ArgumentParser(description=f"Distil an SD/SDXL teacher with {method_name}.")
    seen: set[str] = set()
    for cls in (TrainConfig, ImageDataConfig, method_cls.Config):
        add_dataclass_flags(parser, cls, seen)
    parser.add_argument("--validation_prompt", dest="validation_prompts", type=lambda s: [s], default=None,
                        help="A single validation prompt (same as --validation_prompts with one prompt).")
    for alias, target in ALIASES.items():
        parser.add_argument(f"--{alias}", dest=target, default=None, help=f"Same as --{target}.")
    for name, reason in ACCEPTED_NO_EFFECT.items():
        parser.add_argument(f"--{name}", default=None, help=f"Accepted for compatibility: {reason}.")
    return parser


def _pick(cls, values: dict):
    """Build ``cls`` from the parsed values it knows, keeping its defaults for flags not given."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names and v is not None})


def configs_from_args(method_name: str, argv: list[str] | None = None):
    """Parse a command line into (method config, data config, train config)."""
    values = vars(build_parser(method_name).parse_args(argv))
    if values.get("validation_prompts") is None:
        values.pop("validation_prompts")
    train = _pick(TrainConfig, values)
    data_values = {**values, "cache_dir": train.cache_dir, "seed": train.seed}
    return _pick(get_method(method_name).Config, values), _pick(ImageDataConfig, data_values), train


def main(method_name: str, argv: list[str] | None = None) -> int:
    """Entry point of train_scripts/<method>.py: user errors end in one clear line, not a traceback."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        method_config, data_config, train_config = configs_from_args(method_name, argv)
        Trainer(method_name, method_config, data_config, train_config).run()
    except DistillError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
