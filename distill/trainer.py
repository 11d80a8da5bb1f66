"""The one accelerate training loop every method runs through."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import BatchEncoder, CachedLatents
from .conditioning import TeacherInfo, TextConditioner, inspect_teacher, native_resolution
from .data import ImageDataConfig, build_training_set
from .errors import DistillError
from .methods import Method, Teacher, get_method
from .schedule import NoiseSchedule

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written; renamed to checkpoint-N only once complete


def micro_batch_index(step: int, micro: int, accumulation: int, num_processes: int, rank: int) -> int:
    """Position of a micro-batch in the global stream: the same sample gets the same index for any process count.

    accelerate hands batch k of the shuffled epoch to process k % num_processes, so process ``rank`` at its
    micro-step m of optimizer step s sees global batch (s * accumulation + m) * num_processes + rank.
    """
    return (step * accumulation + micro) * num_processes + rank


def micro_batch_seed(seed: int, index: int) -> int:
    """A well-mixed 64-bit seed for global micro-batch ``index`` of a run started with ``seed`` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


EXPORT_FORMATS = ("diffusers", "kohya")


@dataclass
class TrainConfig:
    """Loop settings; names and meanings follow diffusers' LCM distillation scripts."""

    pretrained_teacher_model: str = ""
    pretrained_vae_model_name_or_path: str | None = None
    teacher_revision: str | None = None
    output_dir: str = "lcm-lora-out"
    cache_dir: str | None = None
    seed: int | None = None
    resolution: int | None = None  # None: the teacher's native resolution
    train_batch_size: int = 16
    num_train_epochs: int = 100
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    learning_rates: dict = field(default_factory=dict)  # per-optimizer overrides, e.g. {"fake_score": 1e-3}
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    use_8bit_adam: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    allow_tf32: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    dataloader_num_workers: int = 0
    proportion_empty_prompts: float = 0.0
    vae_encode_batch_size: int = 8
    cache_latents: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_steps: int = 200
    validation_prompts: list = field(default_factory=lambda: ["a photo of an astronaut riding a horse"])
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "distill"
    export_pipeline: bool = True
    export_format: str = "diffusers"  # "kohya" also writes pytorch_lora_weights_kohya.safetensors
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    hub_private_repo: bool = False
    hub_include_pipeline: bool = False

    def __post_init__(self):
        if self.export_format not in EXPORT_FORMATS:
            raise DistillError(f"--export_format must be one of {', '.join(EXPORT_FORMATS)}, got "
                               f"{self.export_format!r}. Use kohya for ComfyUI/AUTOMATIC1111 (the diffusers file is "
                               "always written as well).")
        if self.hub_include_pipeline and not self.push_to_hub:
            raise DistillError("--hub_include_pipeline only applies to an upload: add --push_to_hub "
                               "--hub_model_id <user/repo>, or drop --hub_include_pipeline.")
        if self.hub_include_pipeline and not self.export_pipeline:
            raise DistillError("--hub_include_pipeline uploads the pipeline folder, but --no_export_pipeline skips "
                               "writing it: drop one of the two flags.")


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
        if cfg.resume_from_checkpoint not in (None, "latest") and not Path(cfg.resume_from_checkpoint, "trainer_state.json").is_file():
            raise DistillError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint} is not a checkpoint folder; "
                               "pass 'latest' or a checkpoint-N folder written by an earlier run.")
        dataset, collate = build_training_set(self.method_cls.data_kind_for(self.method_config), self.data_config)
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

        cfg = self.config
        unet = UNet2DConditionModel.from_pretrained(info.path, subfolder="unet", revision=cfg.teacher_revision)
        if cfg.pretrained_vae_model_name_or_path:
            vae = AutoencoderKL.from_pretrained(cfg.pretrained_vae_model_name_or_path)
            vae_dtype = weight_dtype
        else:
            vae = AutoencoderKL.from_pretrained(info.path, subfolder="vae", revision=cfg.teacher_revision)
            vae_dtype = torch.float32 if info.is_sdxl else weight_dtype  # SDXL's own VAE overflows in fp16
        vae.requires_grad_(False).eval().to(device, vae_dtype)
        conditioner = TextConditioner(info, cfg.resolution, weight_dtype, cfg.teacher_revision).to(device)
        from diffusers import DDPMScheduler

        scheduler_config = DDPMScheduler.load_config(info.path, subfolder="scheduler")
        schedule = NoiseSchedule.from_scheduler_config(scheduler_config)
        return unet, vae, conditioner, schedule, scheduler_config

    # ----------------------------------------------------------------------------------------------- run
    def run(self) -> Path:
        """Train, then export; returns the output folder."""
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
            self._remove_partial_checkpoints()
        accelerator.wait_for_everyone()
        resume_path = self._resume_path()
        cfg.seed = self._run_seed(resume_path)
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
        self._register_checkpoint_hooks(accelerator, method)
        for state in method.checkpoint_objects():
            accelerator.register_for_checkpointing(state)

        if accelerator.is_main_process and accelerator.log_with:
            accelerator.init_trackers(cfg.tracker_project_name, config=self._flat_config())

        global_step = self._resume(accelerator, resume_path)
        # An epoch ends with a shorter accumulation window when its batch count is not a multiple of the window.
        first_epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        skip_batches = step_in_epoch * cfg.gradient_accumulation_steps
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
                if global_step % cfg.checkpointing_steps == 0 or global_step == max_steps:
                    self._save_checkpoint(accelerator, global_step)
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
            last = self._checkpoints()
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            on = f" on process {process}" if values.shape[0] > 1 else ""
            raise DistillError(f"The {names[which]} loss became {values[process, which].item()} at step {step + 1}"
                               f"{on}; {where}. Lower --learning_rate, or use --mixed_precision bf16 instead of fp16.")

    def _checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (half-written ones carry a .partial suffix and are ignored)."""
        if not self.output_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.output_dir.iterdir()
                 if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
        return [p for _, p in sorted(found)]

    def _remove_partial_checkpoints(self) -> None:
        """Delete checkpoint-N.partial folders: what a run killed while saving leaves behind (main process only)."""
        for leftover in self.output_dir.glob(f"checkpoint-*{PARTIAL_SUFFIX}"):
            logger.warning("Removing %s: an earlier run stopped while writing it.", leftover)
            shutil.rmtree(leftover)

    def _save_checkpoint(self, accelerator, step: int) -> None:
        """Called by every process (DeepSpeed and FSDP save collectively).

        accelerate.save_state writes checkpoint-N.partial, which becomes checkpoint-N in one atomic rename once
        every process has finished; only then are checkpoints beyond --checkpoints_total_limit removed, so a crash
        at any moment leaves the previous complete checkpoint in place.
        """
        final = self.output_dir / f"checkpoint-{step}"
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"global_step": step, "seed": self.config.seed}
            (partial / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            self._apply_total_limit(keep=final)
        accelerator.wait_for_everyone()

    def _apply_total_limit(self, keep: Path) -> None:
        """Remove the oldest checkpoints other than ``keep`` until at most --checkpoints_total_limit remain."""
        limit = self.config.checkpoints_total_limit
        if limit is None:
            return
        others = [p for p in self._checkpoints() if p != keep]
        for old in others[: max(0, len(others) - (limit - 1))]:
            shutil.rmtree(old)

    def _resume_path(self) -> Path | None:
        """The checkpoint --resume_from_checkpoint names ('latest': the newest complete one), or None."""
        choice = self.config.resume_from_checkpoint
        if not choice:
            return None
        if choice != "latest":
            return Path(choice)
        found = self._checkpoints()
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting fresh.", self.output_dir)
            return None
        return found[-1]

    def _run_seed(self, resume_path: Path | None) -> int:
        """--seed; else the seed of the checkpoint being resumed; else a fresh seed shared by every process."""
        if self.config.seed is not None:
            return self.config.seed
        recorded = None
        if resume_path is not None:
            recorded = json.loads((resume_path / "trainer_state.json").read_text()).get("seed")
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
        return json.loads((path / "trainer_state.json").read_text())["global_step"]

    def _register_checkpoint_hooks(self, accelerator, method: Method) -> None:
        """Checkpoints hold only trainable weights (the LoRA), not a full copy of the teacher."""
        from safetensors.torch import load_file, save_file

        def name_of(model) -> str:
            bare = accelerator.unwrap_model(model)
            return next(n for n, net in method.nets.items() if accelerator.unwrap_model(net) is bare)

        def save_hook(models, weights, output_dir):
            if not weights:  # DeepSpeed and FSDP save their own (sharded) model and optimizer states
                return
            for model in models:
                bare = accelerator.unwrap_model(model)
                state = {k: v.detach().float().cpu().contiguous()
                         for k, v in bare.named_parameters() if v.requires_grad}
                if accelerator.is_main_process:
                    save_file(state, os.path.join(output_dir, f"{name_of(model)}_trainable.safetensors"))
                if weights:
                    weights.pop()

        def load_hook(models, input_dir):
            while models:
                model = models.pop()
                bare = accelerator.unwrap_model(model)
                state = load_file(os.path.join(input_dir, f"{name_of(model)}_trainable.safetensors"))
                result = bare.load_state_dict(state, strict=False)
                if result.unexpected_keys:
                    raise DistillError(f"Checkpoint {input_dir} does not match this model "
                                       f"(unexpected keys such as {result.unexpected_keys[:3]}).")

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

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
        """LoRA folder (output_dir; kohya keys too with --export_format kohya), sample grid, model card, optional
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
        if cfg.export_format == "kohya":
            if is_lora_student(unet):
                kohya = save_lora_kohya(self.output_dir, unet).name
            else:
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
