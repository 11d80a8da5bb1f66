"""The one accelerate training loop every method runs through."""

from __future__ import annotations

import logging
import math
import shlex
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import BatchEncoder, CachedLatents
from .checkpoints import (PARTIAL_SUFFIX, STATE_FILE, check_output_dir, complete_checkpoints, newest_intact,
                          read_state, register_trainable_only_hooks, remove_partial_checkpoints, resume_checkpoint,
                          save_checkpoint)
from .conditioning import TeacherInfo, TextConditioner, inspect_teacher, native_resolution
from .data import ImageDataConfig, build_training_set
from .errors import DistillError
from .methods import Method, Teacher, get_method
from .run_identity import check_resume, run_identity
from .schedule import NoiseSchedule
from .stop_signals import TrainingStopped, stop_signals_handled

logger = logging.getLogger(__name__)


def micro_batch_index(step: int, micro: int, accumulation: int, num_processes: int, rank: int) -> int:
    """Position of a micro-batch in the global stream: the same sample gets the same index for any process count.

    accelerate hands batch k of the shuffled epoch to process k % num_processes, so process ``rank`` at its
    micro-step m of optimizer step s sees global batch (s * accumulation + m) * num_processes + rank.
    """
    return (step * accumulation + micro) * num_processes + rank


def micro_batch_seed(seed: int, index: int) -> int:
    """A well-mixed 64-bit seed for global micro-batch ``index`` of a run started with ``seed`` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


# both: the diffusers (peft-key) LoRA file and the kohya-key one; diffusers: only the first; kohya: both (older name).
EXPORT_FORMATS = ("both", "diffusers", "kohya")


@dataclass
class TrainConfig:
    """Loop settings; names and meanings follow diffusers' LCM distillation scripts (each field's help is its flag's)."""

    pretrained_teacher_model: str = field(default="", metadata={
        "help": "Teacher: a local SD 1.x/2.x or SDXL diffusers folder, or a Hub id."})
    pretrained_vae_model_name_or_path: str | None = field(default=None, metadata={
        "help": "A VAE (folder or Hub id) to use instead of the teacher's, e.g. madebyollin/sdxl-vae-fp16-fix."})
    teacher_revision: str | None = field(default=None, metadata={
        "help": "Revision (branch, tag or commit) of a Hub teacher."})
    output_dir: str = field(default="lcm-lora-out", metadata={
        "help": "Folder of checkpoints, validation grids, the exported weights and the pipeline folder."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Cache folder for Hub teachers and datasets (default: the Hugging Face cache)."})
    seed: int | None = field(default=None, metadata={
        "help": "Seed of the whole run (noise, timesteps, data order); without it a fresh seed is drawn and logged."})
    resolution: int | None = field(default=None, metadata={  # None: the teacher's native resolution
        "help": "Training resolution, a multiple of 8; default: the teacher's native size (512 for SD 1.x, 1024 for "
                "SDXL)."})
    train_batch_size: int = field(default=16, metadata={
        "help": "Samples per batch on each process."})
    num_train_epochs: int = field(default=100, metadata={
        "help": "Passes over the data; --max_train_steps overrides it."})
    max_train_steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps to train (overrides --num_train_epochs)."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Batches accumulated per optimizer step; total batch = batch size x processes x this."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute UNet activations during the backward pass: less memory, slower steps."})
    learning_rate: float = field(default=1e-4, metadata={
        "help": "Learning rate of the student's AdamW (and of every other optimizer unless overridden)."})
    learning_rates: dict = field(default_factory=dict, metadata={  # per-optimizer overrides, e.g. {"fake_score": 1e-3}
        "help": "Per-optimizer learning rates as name=value[,name=value], e.g. --learning_rates fake_score=1e-3 "
                "(names: unet, fake_score, discriminator)."})
    scale_lr: bool = field(default=False, metadata={
        "help": "Multiply the learning rates by the total batch size."})
    lr_scheduler: str = field(default="constant", metadata={
        "help": "Learning-rate schedule of diffusers' get_scheduler: constant, constant_with_warmup, linear, cosine, "
                "cosine_with_restarts or polynomial."})
    lr_warmup_steps: int = field(default=500, metadata={
        "help": "Warm-up steps of the learning-rate schedule (the plain constant schedule has none)."})
    use_8bit_adam: bool = field(default=False, metadata={
        "help": "Use bitsandbytes' 8-bit AdamW to save optimizer memory (pip install bitsandbytes)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Clip each network's gradient norm to this value (0 turns clipping off)."})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no, fp16 or bf16 (default: accelerate's config); trainable weights stay fp32. fp16 needs a GPU."})
    allow_tf32: bool = field(default=False, metadata={
        "help": "Allow TF32 matrix products on Ampere and newer GPUs (faster, slightly less precise)."})
    enable_xformers_memory_efficient_attention: bool = field(default=False, metadata={
        "help": "Use xformers attention (pip install xformers); PyTorch's SDPA is used otherwise."})
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "Data-loading worker processes (0: load in the training process)."})
    proportion_empty_prompts: float = field(default=0.0, metadata={
        "help": "Fraction of captions replaced by the empty prompt."})
    vae_encode_batch_size: int = field(default=8, metadata={
        "help": "Images per VAE encoder call (training batches and --cache_latents)."})
    cache_latents: bool = field(default=False, metadata={
        "help": "Encode the dataset with the VAE and text encoders once and train from the cache."})
    checkpointing_steps: int = field(default=500, metadata={
        "help": "Save a resumable checkpoint (output_dir/checkpoint-N) every this many steps, and at the last step."})
    checkpoints_total_limit: int | None = field(default=None, metadata={
        "help": "Keep at most this many checkpoints, removing the oldest first (default: keep all)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'latest' or a checkpoint-N folder to resume from."})
    validation_steps: int = field(default=200, metadata={
        "help": "Write a grid of validation images (output_dir/validation) every this many steps; 0 turns it off."})
    validation_prompts: list = field(default_factory=lambda: ["a photo of an astronaut riding a horse"], metadata={
        "help": "Comma-separated prompts of the validation grid."})
    report_to: str = field(default="tensorboard", metadata={
        "help": "Tracker for losses and validation images: tensorboard, wandb, comet_ml, all, or none."})
    logging_dir: str = field(default="logs", metadata={
        "help": "Tracker log folder, inside --output_dir."})
    tracker_project_name: str = field(default="distill", metadata={
        "help": "Project name given to the tracker."})
    export_pipeline: bool = field(default=True, metadata={
        "help": "Also write a self-contained pipeline folder (output_dir/pipeline).",
        "help_off": "Do not write the self-contained pipeline folder (output_dir/pipeline); the weights, scheduler "
                    "config and model card are still written."})
    export_format: str = field(default="both", metadata={
        "help": "both (default): pytorch_lora_weights.safetensors for diffusers' load_lora_weights and "
                "pytorch_lora_weights_kohya.safetensors for ComfyUI/Forge/AUTOMATIC1111; diffusers: only the first; "
                "kohya: same as both."})
    push_to_hub: bool = field(default=False, metadata={
        "help": "Upload the student (weights, scheduler/, model card, samples.png) to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={
        "help": "The Hub model repo to create or update, e.g. user/lcm-lora-sdxl."})
    hub_token: str | None = field(default=None, metadata={
        "help": "Hub token for --push_to_hub (default: the one saved by `hf auth login`)."})
    hub_private_repo: bool = field(default=False, metadata={
        "help": "With --push_to_hub, create the repo as private."})
    hub_include_pipeline: bool = field(default=False, metadata={
        "help": "With --push_to_hub, also upload the self-contained pipeline/ folder."})

    def __post_init__(self):
        if self.export_format not in EXPORT_FORMATS:
            raise DistillError(f"--export_format must be one of {', '.join(EXPORT_FORMATS)}, got "
                               f"{self.export_format!r}. Leave it at both (the default: the diffusers file and the "
                               "kohya file for ComfyUI/Forge/AUTOMATIC1111), or pass diffusers for the diffusers file "
                               "only.")
        if self.hub_include_pipeline and not self.push_to_hub:
            raise DistillError("--hub_include_pipeline only applies to an upload: add --push_to_hub "
                               "--hub_model_id <user/repo>, or drop --hub_include_pipeline.")
        if self.hub_include_pipeline and not self.export_pipeline:
            raise DistillError("--hub_include_pipeline uploads the pipeline folder, but --no_export_pipeline skips "
                               "writing it: drop one of the two flags.")
        if self.train_batch_size < 1:
            raise DistillError(f"--train_batch_size must be at least 1, got {self.train_batch_size}; e.g. "
                               "--train_batch_size 4 (and --gradient_accumulation_steps for a larger total batch).")
        if self.gradient_accumulation_steps < 1:
            raise DistillError(f"--gradient_accumulation_steps must be at least 1, got "
                               f"{self.gradient_accumulation_steps}; pass 1 to step the optimizer after every batch.")
        if self.checkpointing_steps < 1:
            raise DistillError(f"--checkpointing_steps must be a positive number of steps, got "
                               f"{self.checkpointing_steps}; e.g. 500 (a checkpoint is also written at the last step).")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise DistillError(f"--checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}; "
                               "leave it out to keep every checkpoint.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise DistillError(f"--learning_rate must be a positive finite number, got {self.learning_rate}; e.g. 1e-4 "
                               "for a LoRA student.")
        for name, value in self.learning_rates.items():
            if not (math.isfinite(value) and value > 0):
                raise DistillError(f"--learning_rates {name} must be a positive finite number, got {value}; e.g. "
                                   f"--learning_rates {name}=1e-4.")
        if not self.validation_prompts or any(not str(p).strip() for p in self.validation_prompts):
            raise DistillError(f"--validation_prompts needs non-blank prompts, got {self.validation_prompts!r}: pass "
                               "text such as --validation_prompt 'a photo of a cat', or leave the flag out for the "
                               "default prompt.")


class Trainer:
    """Builds teacher, data and method, then runs, checkpoints, resumes, validates and exports."""

    def __init__(self, method_name: str, method_config, data_config: ImageDataConfig, config: TrainConfig):
        self.method_cls = get_method(method_name)
        self.method_config = method_config
        self.data_config = data_config
        self.config = config
        self.output_dir = Path(config.output_dir)

    # ----------------------------------------------------------------------------------------------- set-up
    def _validate_inputs(self) -> tuple[TeacherInfo, torch.utils.data.Dataset, object]:
        """Every user-caused problem is reported here, before any model is loaded."""
        cfg = self.config
        if not cfg.pretrained_teacher_model:
            raise DistillError("--pretrained_teacher_model is required: a local SD/SDXL folder or a Hub id.")
        info = inspect_teacher(cfg.pretrained_teacher_model, cfg.cache_dir, cfg.teacher_revision)
        scheduler_file = Path(info.path, "scheduler", "scheduler_config.json")
        if scheduler_file.is_file():  # the teacher's T, from its config file alone (no weights are read here)
            import json

            num_train_timesteps = json.loads(scheduler_file.read_text()).get("num_train_timesteps", 1000)
            for flag in ("num_ddim_timesteps", "num_denoising_steps"):  # any method's grid on the teacher's timesteps
                steps = getattr(self.method_config, flag, None)
                if steps is not None and steps > num_train_timesteps:
                    raise DistillError(f"--{flag} ({steps}) cannot exceed the teacher's {num_train_timesteps} training "
                                       f"timesteps; pass at most {num_train_timesteps}.")
        if cfg.mixed_precision == "fp16" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            logger.warning("--mixed_precision fp16 on a machine without CUDA: fp16 on a CPU is about 5x slower than "
                           "fp32; pass --mixed_precision no (or bf16).")
        if cfg.resolution is None:
            cfg.resolution = native_resolution(info)
            self.data_config.resolution = cfg.resolution
        if cfg.max_train_steps is not None and cfg.max_train_steps <= 0:
            raise DistillError(f"--max_train_steps must be positive, got {cfg.max_train_steps}.")
        if cfg.resolution % 8:
            raise DistillError(f"--resolution must be a multiple of 8, got {cfg.resolution}.")
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as error:
                raise DistillError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        if cfg.enable_xformers_memory_efficient_attention:
            try:
                import xformers  # noqa: F401
            except ImportError as error:
                raise DistillError("--enable_xformers_memory_efficient_attention needs xformers: "
                                   "pip install xformers (PyTorch's SDPA is used by default).") from error
        if cfg.push_to_hub and not cfg.hub_model_id:
            raise DistillError("--push_to_hub needs --hub_model_id (the repo to create or update).")
        if cfg.seed is not None and not 0 <= cfg.seed < 2**32:
            raise DistillError(f"--seed must be in [0, 2**32 - 1], got {cfg.seed}.")
        if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint.rstrip("/").endswith(PARTIAL_SUFFIX):
            raise DistillError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint} is a checkpoint whose saving "
                               "never finished; pass 'latest' or a complete checkpoint-N folder.")
        if cfg.resume_from_checkpoint not in (None, "latest") and not Path(cfg.resume_from_checkpoint, STATE_FILE).is_file():
            raise DistillError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint} is not a checkpoint folder; "
                               "pass 'latest' or a checkpoint-N folder written by an earlier run.")
        check_output_dir(self.output_dir)
        dataset, collate = build_training_set(self.method_cls.data_kind_for(self.method_config), self.data_config, info)
        return info, dataset, collate

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

        cfg = self.config
        project = ProjectConfiguration(project_dir=str(self.output_dir),
                                       logging_dir=str(self.output_dir / cfg.logging_dir))
        return Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to in (None, "", "none") else cfg.report_to,
            project_config=project,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )

    def _load_teacher(self, info: TeacherInfo, weight_dtype, device):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from .conditioning import teacher_load_errors

        cfg = self.config
        with teacher_load_errors(info):  # damaged weight files: one error line, not a traceback from deep inside
            unet = UNet2DConditionModel.from_pretrained(info.path, subfolder="unet", revision=cfg.teacher_revision)
            if cfg.pretrained_vae_model_name_or_path:
                vae = AutoencoderKL.from_pretrained(cfg.pretrained_vae_model_name_or_path)
                vae_dtype = weight_dtype
            else:
                vae = AutoencoderKL.from_pretrained(info.path, subfolder="vae", revision=cfg.teacher_revision)
                vae_dtype = torch.float32 if info.is_sdxl else weight_dtype  # SDXL's own VAE overflows in fp16
            conditioner = TextConditioner(info, cfg.resolution, weight_dtype, cfg.teacher_revision)
        vae.requires_grad_(False).eval().to(device, vae_dtype)
        conditioner.to(device)
        from diffusers import DDPMScheduler

        scheduler_config = DDPMScheduler.load_config(info.path, subfolder="scheduler")
        schedule = NoiseSchedule.from_scheduler_config(scheduler_config)
        return unet, vae, conditioner, schedule, scheduler_config

    # ----------------------------------------------------------------------------------------------- run
    def run(self) -> Path:
        """Train, then export; returns the output folder. SIGTERM/SIGINT stop after a step with a checkpoint."""
        with stop_signals_handled() as self.stop:
            return self._run()

    def _run(self) -> Path:
        cfg = self.config
        info, dataset, collate = self._validate_inputs()
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        accelerator = self._accelerator()
        self.accelerator = accelerator
        self._check_distributed_setup(accelerator)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(self.output_dir)
        accelerator.wait_for_everyone()
        resume_path = resume_checkpoint(cfg.resume_from_checkpoint, self.output_dir)
        cfg.seed = self._run_seed(resume_path)
        self.identity = run_identity(self.method_cls.name, self._flat_config(), info.path, info.family,
                                     accelerator.num_processes)
        if resume_path is not None:
            for warning in check_resume(resume_path, read_state(resume_path), self.identity, cfg.max_train_steps):
                logger.warning(warning)
        set_seed(cfg.seed)
        if cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

        unet, vae, conditioner, schedule, scheduler_config = self._load_teacher(info, weight_dtype, accelerator.device)
        self.info, self.vae, self.conditioner, self.scheduler_config = info, vae, conditioner, scheduler_config
        unet.to(accelerator.device, weight_dtype)
        latent_shape = (unet.config.in_channels, *(2 * [cfg.resolution // self._vae_scale_factor(vae)]))
        method: Method = self.method_cls(Teacher(unet, schedule, info, latent_shape), self.method_config)
        self.method = method
        self._check_distributed_setup(accelerator, method)
        groups = method.trainable()
        for net in method.nets.values():
            cast_training_params(net, dtype=torch.float32)  # trainable weights stay fp32 under mixed precision
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()

        encoder = BatchEncoder(vae, conditioner, cfg.proportion_empty_prompts, cfg.vae_encode_batch_size)
        train_set = dataset
        if cfg.cache_latents and self.method_cls.data_kind_for(self.method_config) == "images":
            cache_file = self.output_dir / "cache" / "latents.safetensors"
            with accelerator.main_process_first():
                train_set = CachedLatents.build(dataset, collate, encoder, cache_file, cfg.vae_encode_batch_size,
                                                show_progress=accelerator.is_local_main_process)
            collate = None
        # accelerate's seedable sampler reseeds this generator from (seed, epoch) at every epoch: the same order on
        # every process and after a resume.
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.train_batch_size, shuffle=True,
                                             collate_fn=collate, num_workers=cfg.dataloader_num_workers,
                                             drop_last=len(train_set) >= cfg.train_batch_size,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        if len(loader) == 0:
            raise DistillError("The dataset yields no batch; lower --train_batch_size or add data.")

        steps_per_epoch = math.ceil(self._batches_per_process(loader, accelerator) / cfg.gradient_accumulation_steps)
        max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
        total_batch = cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
        optimizers, schedulers = {}, {}
        optimizer_cls = self._optimizer_class()
        for name, params in groups.items():
            base_lr = cfg.learning_rates.get(name, method.learning_rate_for(name, cfg.learning_rate))
            lr = base_lr * (total_batch if cfg.scale_lr else 1)
            optimizers[name] = optimizer_cls(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
            schedulers[name] = get_scheduler(cfg.lr_scheduler, optimizer=optimizers[name],
                                             num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                             num_training_steps=max_steps * accelerator.num_processes)

        names = list(method.nets)
        prepared = accelerator.prepare(*method.nets.values(), *optimizers.values(), *schedulers.values(), loader)
        method.nets = dict(zip(names, prepared[: len(names)]))
        optimizers = dict(zip(optimizers, prepared[len(names): len(names) + len(optimizers)]))
        schedulers = dict(zip(schedulers, prepared[len(names) + len(optimizers): -1]))
        loader = prepared[-1]
        if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
            raise DistillError(f"accelerate was configured with gradient_accumulation_steps "
                               f"{accelerator.gradient_accumulation_steps} (a DeepSpeed config, or accelerate launch "
                               f"--gradient_accumulation_steps), but --gradient_accumulation_steps is "
                               f"{cfg.gradient_accumulation_steps}: remove it there and set only the script's flag.")
        register_trainable_only_hooks(accelerator, method.nets)
        for state in method.checkpoint_objects():
            accelerator.register_for_checkpointing(state)

        if accelerator.is_main_process and accelerator.log_with:
            accelerator.init_trackers(cfg.tracker_project_name, config=self._flat_config())

        global_step = self._resume(accelerator, resume_path)
        # An epoch ends with a shorter accumulation window when its batch count is not a multiple of the window.
        first_epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        skip_batches = step_in_epoch * cfg.gradient_accumulation_steps
        if len(train_set) < cfg.train_batch_size:
            logger.warning("The dataset has %d samples, fewer than --train_batch_size %d: every batch holds %d "
                           "samples, so the total batch is %d, not %d.", len(train_set), cfg.train_batch_size,
                           len(train_set), total_batch // cfg.train_batch_size * len(train_set), total_batch)
            total_batch = total_batch // cfg.train_batch_size * len(train_set)
        logger.info("%d examples, %d steps, total batch %d", len(train_set), max_steps, total_batch)
        progress = tqdm(range(max_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        epoch = first_epoch
        while global_step < max_steps:
            for has_epochs in (loader, train_set):
                if hasattr(has_epochs, "set_epoch"):
                    has_epochs.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
            skip_batches = 0
            micro = 0  # micro-batch within the current accumulation window
            for batch in epoch_loader:
                self._seed_micro_batch(global_step, micro)
                with accelerator.accumulate(*method.nets.values()):
                    latent_batch = encoder(batch, accelerator.device)
                    losses = method.loss(latent_batch, global_step)
                    self._check_finite(losses, global_step)
                    for name, loss in losses.items():
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(groups[name], cfg.max_grad_norm)
                        optimizers[name].step()
                        schedulers[name].step()
                        optimizers[name].zero_grad(set_to_none=True)
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                micro = 0
                method.on_step_end(global_step)
                global_step += 1
                progress.update(1)
                logs = {f"loss/{k}": accelerator.gather(v.detach()).mean().item() for k, v in losses.items()}
                logs["lr"] = next(iter(schedulers.values())).get_last_lr()[0]
                progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
                accelerator.log(logs, step=global_step)
                saved = global_step % cfg.checkpointing_steps == 0 or global_step == max_steps
                if saved:
                    self._save_checkpoint(accelerator, global_step)
                self._stop_if_signalled(accelerator, global_step, saved)
                if cfg.validation_steps and global_step % cfg.validation_steps == 0 and accelerator.is_main_process:
                    self._validate(global_step)
                if global_step >= max_steps:
                    break
            epoch += 1
        progress.close()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._export()
        accelerator.end_training()
        return self.output_dir

    # ----------------------------------------------------------------------------------------------- pieces
    @staticmethod
    def _vae_scale_factor(vae) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def _optimizer_class(self):
        if self.config.use_8bit_adam:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit
        return torch.optim.AdamW

    def _check_distributed_setup(self, accelerator, method: Method | None = None) -> None:
        """Stop on setups this loop cannot run correctly, naming the accelerate config that works instead."""
        from accelerate.utils import DistributedType

        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if accelerator.distributed_type == DistributedType.FSDP or (
                deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3):
            kind = "FSDP" if not deepspeed else "DeepSpeed ZeRO-3"
            raise DistillError(f"{kind} shards the weights across processes, but validation and export read the whole "
                               "student on the main process. Launch with DDP (docs/accelerate_configs/multi_gpu.yaml) "
                               "or DeepSpeed ZeRO-2 (docs/accelerate_configs/deepspeed_zero2.yaml); see "
                               "docs/distributed.md.")
        if deepspeed and method is not None and len(method.nets) > 1:
            raise DistillError(f"The {self.method_cls.name} method trains {len(method.nets)} networks "
                               f"({', '.join(method.nets)}), and accelerate's DeepSpeed integration wraps one model "
                               "per run. Launch with DDP instead (docs/accelerate_configs/multi_gpu.yaml).")

    def _batches_per_process(self, loader, accelerator) -> int:
        """Batches one process sees per epoch once accelerate shards ``loader`` (its BatchSamplerShard's length)."""
        from accelerate.data_loader import BatchSamplerShard

        if accelerator.num_processes == 1:
            return len(loader)
        return len(BatchSamplerShard(loader.batch_sampler, accelerator.num_processes, accelerator.process_index))

    def _seed_micro_batch(self, step: int, micro: int) -> None:
        """Seed torch's RNG (CPU and every accelerator device) from (seed, global micro-batch index).

        Noise, timesteps, guidance scales, prompt dropout and VAE posterior samples then depend only on which
        sample is drawn, not on the process count or on where a resumed run started: two processes at batch B
        draw what one process at batch B with two accumulation steps draws.
        """
        accelerator = self.accelerator
        index = micro_batch_index(step, micro, self.config.gradient_accumulation_steps, accelerator.num_processes,
                                  accelerator.process_index)
        torch.manual_seed(micro_batch_seed(self.config.seed, index))

    def _check_finite(self, losses: dict, step: int) -> None:
        """Stop every process together (a lone process stopping would leave the others waiting in all-reduce)."""
        names = list(losses)
        local = torch.stack([losses[name].detach().float().reshape(()) for name in names])
        values = self.accelerator.gather(local[None]).reshape(-1, len(names))
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            process, which = bad[0].tolist()
            last = newest_intact(self.output_dir)  # only a checkpoint whose files read back is called good
            where = (f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                     if not complete_checkpoints(self.output_dir) else "no checkpoint reads back intact")
            on = f" on process {process}" if values.shape[0] > 1 else ""
            raise DistillError(f"The {names[which]} loss became {values[process, which].item()} at step {step + 1}"
                               f"{on}; {where}. Lower --learning_rate, or use --mixed_precision bf16 instead of fp16.")

    def _save_checkpoint(self, accelerator, step: int) -> None:
        """checkpoint-``step`` (every process calls it), recording the step, the seed and the run's identity."""
        state = {"global_step": step, "seed": self.config.seed, "identity": self.identity}
        self.stop.last_checkpoint = save_checkpoint(accelerator, self.output_dir, step, state,
                                                    self.config.checkpoints_total_limit)

    def _stop_if_signalled(self, accelerator, step: int, saved: bool) -> None:
        """After an optimizer step: if any process got SIGTERM/SIGINT, checkpoint (unless just done) and stop."""
        import torch.distributed as dist

        signum = torch.tensor([self.stop.signum or 0], device=accelerator.device)
        if accelerator.num_processes > 1:
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        if not signum.item():
            return
        if not saved:
            self._save_checkpoint(accelerator, step)
        checkpoint = self.output_dir / f"checkpoint-{step}"
        argv = [a for i, a in enumerate(sys.argv) if not (a.startswith("--resume_from_checkpoint") or
                                                          (i and sys.argv[i - 1] == "--resume_from_checkpoint"))]
        stopped = TrainingStopped(int(signum.item()), f"Stopped by {signal.Signals(int(signum.item())).name} after "
                                  f"step {step}: wrote {checkpoint}. Resume with the same launcher and: "
                                  f"{shlex.join(['python', *argv])} --resume_from_checkpoint latest")
        if accelerator.is_main_process:
            print(stopped, file=sys.stderr, flush=True)
        raise stopped

    def _run_seed(self, resume_path: Path | None) -> int:
        """--seed; else the seed of the checkpoint being resumed; else a fresh seed shared by every process."""
        if self.config.seed is not None:
            return self.config.seed
        recorded = None
        if resume_path is not None:
            recorded = read_state(resume_path).get("seed")
        if recorded is not None:
            return recorded
        from accelerate.utils import broadcast_object_list

        seed = broadcast_object_list([int(np.random.SeedSequence().entropy % 2**32)])[0]
        logger.info("No --seed given: this run uses seed %d (pass --seed %d to repeat it).", seed, seed)
        return seed

    def _resume(self, accelerator, path: Path | None) -> int:
        """Load checkpoint ``path`` (weights, optimizers, schedulers, sampler) and return its global step."""
        if path is None:
            return 0
        accelerator.load_state(str(path))
        # Checkpoints are written between optimizer steps: a new accumulation window starts, whatever the window
        # length of the run that wrote it (load_state restores that run's micro-batch count).
        accelerator.step = 0
        return read_state(path)["global_step"]

    def _student_scheduler(self):
        from .export import student_scheduler

        return student_scheduler(self.scheduler_config, self.method.export_defaults())

    @torch.no_grad()
    def _validate(self, step: int) -> Path:
        """A grid of validation images at 1 step and at the method's default step count."""
        from torchvision.utils import make_grid, save_image

        from .export import student_pipeline

        defaults = self.method.export_defaults()
        unet = self.accelerator.unwrap_model(self.method.student_unet())
        pipe = student_pipeline(self.info, unet, self.vae, self.conditioner, self._student_scheduler())
        rows = []
        for steps in sorted({1, defaults["num_inference_steps"]}):
            generator = torch.Generator().manual_seed(0)
            images = pipe(self.config.validation_prompts, num_inference_steps=steps,
                          guidance_scale=defaults["guidance_scale"], height=self.config.resolution,
                          width=self.config.resolution, generator=generator, output_type="pt").images
            rows.append(images.float().cpu())
        grid = make_grid(torch.cat(rows), nrow=len(self.config.validation_prompts))
        path = self.output_dir / "validation" / f"step-{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", grid, step)
        return path

    def _flat_config(self) -> dict:
        """Every setting of the run as scalars (for trackers and distill_config.json); never the Hub token."""
        flat = {**asdict(self.data_config), **asdict(self.config), **asdict(self.method_config)}
        flat.pop("hub_token", None)
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}

    def _export(self) -> None:
        """LoRA folder (output_dir; kohya keys too unless --export_format diffusers), sample grid, model card, optional
        pipeline folder (output_dir/pipeline), optional upload to the Hub."""
        from .export import (PIPELINE_SUBFOLDER, copy_sample_grid, export_lora_folder, export_pipeline_folder,
                             is_lora_student, push_to_hub, write_model_card)
        from .lora import save_lora_kohya

        cfg = self.config
        defaults = self.method.export_defaults()
        scheduler = self._student_scheduler()
        unet = self.accelerator.unwrap_model(self.method.student_unet())
        run_config = {"method": self.method_cls.name, **self._flat_config()}
        export_lora_folder(self.output_dir, unet, self.info, scheduler, defaults, run_config)
        kohya = None
        if cfg.export_format != "diffusers":
            if is_lora_student(unet):
                kohya = save_lora_kohya(self.output_dir, unet, self.info).name
            elif cfg.export_format == "kohya":
                logger.warning("--export_format kohya applies to LoRA students; this one is a full UNet (unet/).")
        samples = copy_sample_grid(self.output_dir)
        hyper = {k: v for k, v in asdict(self.method_config).items() if not isinstance(v, list)}
        hyper.update(learning_rate=cfg.learning_rate, train_batch_size=cfg.train_batch_size,
                     max_train_steps=cfg.max_train_steps, resolution=cfg.resolution)
        with_pipeline = cfg.export_pipeline and (cfg.hub_include_pipeline or not cfg.push_to_hub)
        write_model_card(self.output_dir, self.method_cls.name, self.info, cfg.pretrained_teacher_model, defaults,
                         hyper, repo_id=cfg.hub_model_id if cfg.push_to_hub else None,
                         samples=samples.name if samples else None,
                         pipeline_subfolder=PIPELINE_SUBFOLDER if with_pipeline else None, kohya_file=kohya)
        if cfg.export_pipeline:
            export_pipeline_folder(self.output_dir / PIPELINE_SUBFOLDER, self.info.path, self.info, self.output_dir,
                                   scheduler, defaults)
        if cfg.push_to_hub:
            push_to_hub(self.output_dir, cfg.hub_model_id, cfg.hub_token, private=cfg.hub_private_repo,
                        include_pipeline=cfg.hub_include_pipeline)
