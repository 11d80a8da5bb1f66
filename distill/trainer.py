"""The one accelerate training loop every method runs through: ``Trainer.run`` is the recipe, the rest components."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import BatchEncoder, CachedLatents
from .checkpoints import (complete_checkpoints, newest_intact, read_state, register_trainable_only_hooks,
                          remove_partial_checkpoints, save_checkpoint)
from .data import ImageDataConfig
from .errors import DistillError
from .export import export_student, student_pipeline, student_scheduler
from .memory_format import frozen_weights_channels_last
from .methods import Method, Teacher, get_method
from .optimizers import build_optimizers
from .preflight import Inputs, check_inputs
from .run_plan import RunPlan, StepPlan, plan_run
from .sharding import (SHARDED_STATE, ShardedNetworks, accelerate_without_fsdp, ensure_process_group,
                       requested_sharding)
from .stop_signals import TrainingStopped, stop_signals_handled
from .teacher import LoadedTeacher, load_teacher
from .train_config import EXPORT_FORMATS, TrainConfig
from .validation import save_validation_grid, validation_grid

__all__ = ["EXPORT_FORMATS", "TrainConfig", "Trainer", "micro_batch_index", "micro_batch_seed"]
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


def check_distributed_setup(accelerator, method_name: str, method: Method | None = None) -> None:
    """Stop on setups this loop cannot run correctly, naming the accelerate config that works instead."""
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if accelerator.distributed_type == DistributedType.FSDP or (
            deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3):
        kind = "DeepSpeed ZeRO-3" if deepspeed else "accelerate's own FSDP wrapping"
        raise DistillError(f"{kind} is not supported: to shard the weights, launch with an FSDP2 config "
                           "(docs/accelerate_configs/fsdp.yaml), with which the trainer shards every network of every "
                           "method; see docs/distributed.md.")
    if deepspeed and method is not None and len(method.nets) > 1:
        raise DistillError(f"The {method_name} method trains {len(method.nets)} networks "
                           f"({', '.join(method.nets)}), and accelerate's DeepSpeed integration wraps one model "
                           "per run. Launch with FSDP2 (docs/accelerate_configs/fsdp.yaml) or DDP "
                           "(docs/accelerate_configs/multi_gpu.yaml) instead.")


def started_as_module() -> bool:
    """Whether this process is ``python -m distill ...`` (also under ``accelerate launch -m distill``)."""
    return getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None) == "distill.__main__"


def python_command(argv: list[str]) -> list[str]:
    """``argv`` (sys.argv-like) as the python command line that started it: ``python -m distill ...`` for the module."""
    return ["python", "-m", "distill", *argv[1:]] if started_as_module() else ["python", *argv]


def stepped_groups(groups: dict, losses: dict) -> list[str]:
    """The groups this step's losses update, in ``trainable()`` order (a method may return a subset on a step)."""
    unknown = sorted(set(losses) - set(groups))
    if unknown or not losses:
        raise KeyError(f"Method.loss returned losses {sorted(losses)}: each must name a group of trainable() "
                       f"({', '.join(groups)}), and at least one is needed.")
    return [name for name in groups if name in losses]


def batches_per_process(loader, accelerator) -> int:
    """Batches one process sees per epoch once accelerate shards ``loader`` (its BatchSamplerShard's length)."""
    from accelerate.data_loader import BatchSamplerShard

    if accelerator.num_processes == 1:
        return len(loader)
    return len(BatchSamplerShard(loader.batch_sampler, accelerator.num_processes, accelerator.process_index))


def loader_workers(requested: int | None, device: torch.device) -> int:
    """--dataloader_num_workers, or by default 4 on a GPU (the next batches load while a step runs) and 0 on the CPU
    (where workers would take cores from the step itself)."""
    if requested is not None:
        return requested
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


class Trainer:
    """Runs one distillation: check the inputs, plan, load the teacher, build the method, train, export."""

    def __init__(self, method_name: str, method_config, data_config: ImageDataConfig, config: TrainConfig):
        self.method_cls = get_method(method_name)
        self.method_config = method_config
        self.data_config = data_config
        self.config = config
        self.output_dir = Path(config.output_dir)

    def run(self) -> Path:
        """Train, then export; returns the output folder. SIGTERM/SIGINT stop after a step with a checkpoint."""
        with stop_signals_handled() as self.stop:
            return self._run()

    def _run(self) -> Path:
        cfg, name = self.config, self.method_cls.name
        # 1. Every user error that flags, files and configs reveal, before any model loads.
        inputs = check_inputs(self.method_cls, self.method_config, self.data_config, cfg)
        # 2. Processes, output folder, and the resolved plan (seed, resolution, resume point: checked against it).
        self.sharding = requested_sharding()
        accelerator = self.accelerator = self._accelerator()
        check_distributed_setup(accelerator, name)
        self._prepare_output_dir()
        plan = self.plan = plan_run(name, self.method_config, inputs, cfg, accelerator)
        if accelerator.is_main_process:
            plan.write_run_config(self.output_dir)
        from accelerate.utils import set_seed

        set_seed(plan.seed)
        if cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        # 3. The teacher, and the method on top of it (the student starts as the teacher).
        teacher = self.teacher = load_teacher(inputs.info, plan.resolution, plan.weight_dtype, accelerator.device,
                                              cfg.pretrained_vae_model_name_or_path, cfg.teacher_revision)
        method, groups = self._build_method(teacher)
        self.sharded = self._shard(method, groups) if self.sharding else None
        # 4. Data, step counts, optimizers; everything through accelerate.
        encoder = BatchEncoder(teacher.vae, teacher.conditioner, cfg.proportion_empty_prompts, cfg.vae_encode_batch_size)
        train_set, loader = self._data(inputs, encoder, plan)
        steps = StepPlan.of(cfg, len(train_set), batches_per_process(loader, accelerator), accelerator.num_processes)
        optimizers, schedulers = build_optimizers(groups, method, cfg, steps.total_batch, steps.max_steps,
                                                  accelerator.num_processes)
        optimizers, schedulers, loader = self._prepare(method, optimizers, schedulers, loader)
        if accelerator.is_main_process and accelerator.log_with:
            accelerator.init_trackers(cfg.tracker_project_name, config=plan.scalar_settings())
        # 5. Resume, train, export.
        global_step = self._resume(plan)
        logger.info("%d examples, %d steps, total batch %d", len(train_set), steps.max_steps, steps.total_batch)
        self._train(loader, train_set, encoder, groups, optimizers, schedulers, steps, global_step)
        accelerator.wait_for_everyone()
        student = self._student_unet()
        if accelerator.is_main_process:
            export_student(self.output_dir, method, student, teacher, cfg, plan)
        accelerator.end_training()
        return self.output_dir

    # ----------------------------------------------------------------------------------------------- set-up
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

        cfg = self.config
        project = ProjectConfiguration(project_dir=str(self.output_dir),
                                       logging_dir=str(self.output_dir / cfg.logging_dir))
        # Sharded runs: accelerate launches plain data-parallel processes and the trainer shards (distill/sharding.py).
        with accelerate_without_fsdp() if self.sharding else contextlib.nullcontext():
            accelerator = Accelerator(
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                mixed_precision=cfg.mixed_precision,
                log_with=None if cfg.report_to in (None, "", "none") else cfg.report_to,
                project_config=project,
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            )
        if self.sharding:
            ensure_process_group(accelerator.device)
        return accelerator

    def _prepare_output_dir(self) -> None:
        """Create the output folder and remove what a run killed while checkpointing left (main process)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(self.output_dir)
        self.accelerator.wait_for_everyone()

    def _build_method(self, teacher: LoadedTeacher) -> tuple[Method, dict]:
        """The method on the teacher's network, its trainable groups (kept in fp32 under mixed precision)."""
        from diffusers.training_utils import cast_training_params

        cfg = self.config
        method = self.method = self.method_cls(Teacher.of(teacher), self.method_config)
        check_distributed_setup(self.accelerator, self.method_cls.name, method)
        groups = method.trainable()
        for net in method.nets.values():
            cast_training_params(net, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            teacher.network.enable_gradient_checkpointing()
        if cfg.enable_xformers_memory_efficient_attention:
            teacher.network.enable_xformers_memory_efficient_attention()
        if cfg.channels_last and not self.sharding:  # FSDP2 shards flat views of the weights: keep them contiguous
            frozen_weights_channels_last([teacher.network, teacher.vae, *method.nets.values()])
        if cfg.torch_compile:
            teacher.network.compile_repeated_blocks()
        return method, groups

    def _shard(self, method: Method, groups: dict) -> ShardedNetworks:
        """Shard every network of ``method`` across the processes (FSDP2) and point ``groups`` at the shards."""
        dtype = {"bf16": torch.bfloat16}.get(self.config.mixed_precision)
        classes = self.sharding.unit_classes or self.teacher.info.family_spec.shard_unit_classes
        sharded = ShardedNetworks(method.nets, self.sharding, dtype, classes)
        for name in groups:
            groups[name] = sharded.live(groups[name])
        if method.ema is not None:
            method.ema = method.ema.tracking(sharded.live(method.ema.params))
        logger.info("Sharded %d network(s) over %d process(es) with FSDP2: %s", len(sharded.roots),
                    self.accelerator.num_processes, ", ".join(type(root).__name__ for root in sharded.roots))
        return sharded

    def _data(self, inputs: Inputs, encoder: BatchEncoder, plan: RunPlan):
        """(training set, data loader): the dataset, or its VAE/text-encoder cache with --cache_latents."""
        cfg, accelerator = self.config, self.accelerator
        train_set, collate = inputs.dataset, inputs.collate
        if cfg.cache_latents and self.method_cls.data_kind_for(self.method_config) == "images":
            cache_file = self.output_dir / "cache" / "latents.safetensors"
            with accelerator.main_process_first():
                train_set = CachedLatents.build(train_set, collate, encoder, cache_file, cfg.vae_encode_batch_size,
                                                show_progress=accelerator.is_local_main_process)
            collate = None
            encoder.uncond(1)  # the one embedding steps still need, computed while the encoders are on the device
            encoder.conditioner.to("cpu")  # until validation and export bring them back
        # accelerate's seedable sampler reseeds this generator from (seed, epoch) at every epoch: the same order on
        # every process and after a resume.
        on_gpu = accelerator.device.type == "cuda"
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.train_batch_size, shuffle=True,
                                             collate_fn=collate, pin_memory=on_gpu,
                                             num_workers=loader_workers(cfg.dataloader_num_workers, accelerator.device),
                                             drop_last=len(train_set) >= cfg.train_batch_size,
                                             generator=torch.Generator().manual_seed(plan.seed))
        if len(loader) == 0:
            raise DistillError("The dataset yields no batch; lower --train_batch_size or add data.")
        return train_set, loader

    def _prepare(self, method: Method, optimizers: dict, schedulers: dict, loader):
        """Wrap networks, optimizers, schedulers and loader for the launch; register what checkpoints hold."""
        accelerator = self.accelerator
        if self.sharded is not None:
            return self._prepare_sharded(method, optimizers, schedulers, loader)
        names = list(method.nets)
        prepared = accelerator.prepare(*method.nets.values(), *optimizers.values(), *schedulers.values(), loader)
        method.nets = dict(zip(names, prepared[: len(names)]))
        optimizers = dict(zip(optimizers, prepared[len(names): len(names) + len(optimizers)]))
        schedulers = dict(zip(schedulers, prepared[len(names) + len(optimizers): -1]))
        if accelerator.gradient_accumulation_steps != self.config.gradient_accumulation_steps:
            raise DistillError(f"accelerate was configured with gradient_accumulation_steps "
                               f"{accelerator.gradient_accumulation_steps} (a DeepSpeed config, or accelerate launch "
                               f"--gradient_accumulation_steps), but --gradient_accumulation_steps is "
                               f"{self.config.gradient_accumulation_steps}: remove it there and set only the script's "
                               "flag.")
        register_trainable_only_hooks(accelerator, method.nets)
        for state in method.checkpoint_objects():
            accelerator.register_for_checkpointing(state)
        return optimizers, schedulers, prepared[-1]

    def _prepare_sharded(self, method: Method, optimizers: dict, schedulers: dict, loader):
        """The sharded networks stay as they are (no DDP); optimizers and schedulers get accelerate's wrappers, which
        skip the steps inside an accumulation window, but not its checkpointing: the optimizer states are sharded and
        written by ``ShardedNetworks.save``. The schedulers are saved as registered objects."""
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.scheduler import AcceleratedScheduler

        accelerator = self.accelerator
        optimizers = {name: AcceleratedOptimizer(opt, device_placement=False) for name, opt in optimizers.items()}
        schedulers = {name: AcceleratedScheduler(scheduler, optimizers[name],
                                                 step_with_optimizer=accelerator.step_scheduler_with_optimizer,
                                                 split_batches=accelerator.split_batches)
                      for name, scheduler in schedulers.items()}
        self.optimizers = optimizers
        sharded_ema = method.ema.average if method.ema is not None else None  # in the sharded state, not here
        for state in [*schedulers.values(), *(o for o in method.checkpoint_objects() if o is not sharded_ema)]:
            accelerator.register_for_checkpointing(state)
        return optimizers, schedulers, accelerator.prepare(loader)

    def _bare_optimizers(self) -> list:
        """The torch optimizers inside accelerate's wrappers (what the sharded checkpoint reads and writes)."""
        return [opt.optimizer for opt in self.optimizers.values()]

    def _resume(self, plan: RunPlan) -> int:
        """Load the planned checkpoint (weights, optimizers, schedulers, sampler) and return its global step."""
        if plan.resume_path is None:
            return 0
        self.accelerator.load_state(str(plan.resume_path))
        if self.sharded is not None:
            self.sharded.load(plan.resume_path / SHARDED_STATE, self._bare_optimizers(), self.method.ema)
        # Checkpoints are written between optimizer steps: a new accumulation window starts, whatever the window
        # length of the run that wrote it (load_state restores that run's micro-batch count).
        self.accelerator.step = 0
        return read_state(plan.resume_path)["global_step"]

    # ----------------------------------------------------------------------------------------------- training
    def _train(self, loader, train_set, encoder, groups, optimizers, schedulers, steps: StepPlan, global_step: int):
        """Optimizer steps from ``global_step`` to ``steps.max_steps``, checkpointing, validating, obeying signals."""
        cfg, accelerator = self.config, self.accelerator
        first_epoch, step_in_epoch = divmod(global_step, steps.steps_per_epoch)
        skip_batches = step_in_epoch * cfg.gradient_accumulation_steps
        progress = tqdm(range(steps.max_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        epoch = first_epoch
        while global_step < steps.max_steps:
            for has_epochs in (loader, train_set):
                if hasattr(has_epochs, "set_epoch"):
                    has_epochs.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
            skip_batches = 0
            micro = 0  # micro-batch within the current accumulation window
            for batch in epoch_loader:
                losses = self._train_micro_batch(batch, encoder, groups, optimizers, schedulers, global_step, micro)
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                micro = 0
                self.method.on_step_end(global_step)
                global_step += 1
                progress.update(1)
                logs = {f"loss/{k}": accelerator.gather(v.detach()).mean().item() for k, v in losses.items()}
                logs["lr"] = next(iter(schedulers.values())).get_last_lr()[0]
                progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
                accelerator.log(logs, step=global_step)
                self._after_step(global_step, steps.max_steps)
                if global_step >= steps.max_steps:
                    break
            epoch += 1
        progress.close()

    def _train_micro_batch(self, batch, encoder, groups, optimizers, schedulers, step: int, micro: int) -> dict:
        """Encode, compute the method's losses, and step the optimizer of each returned loss (accelerate handles
        accumulation); groups without a loss this step keep their weights and optimizer state. Every group's
        learning-rate schedule follows the optimizer step count (DMD2's reference steps both of its schedulers every
        iteration), so a group updated every N-th step warms up over --lr_warmup_steps steps, not N times as many."""
        accelerator, method = self.accelerator, self.method
        self._seed_micro_batch(step, micro)
        with accelerator.accumulate(*method.nets.values()):
            losses = method.loss(encoder(batch, accelerator.device), step)
            names = stepped_groups(groups, losses)
            self._check_finite(losses, step)
            for name in names:
                accelerator.backward(losses[name])
                if accelerator.sync_gradients and self.config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(groups[name], self.config.max_grad_norm)
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
            for scheduler in schedulers.values():
                scheduler.step()
        return losses

    def _after_step(self, step: int, max_steps: int) -> None:
        """Checkpoint on schedule and at the end, stop on a signal, validate on schedule."""
        cfg = self.config
        saved = step % cfg.checkpointing_steps == 0 or step == max_steps
        if saved:
            self._save_checkpoint(step)
        self._stop_if_signalled(step, saved)
        if cfg.validation_steps and step % cfg.validation_steps == 0:
            self._validate(step)

    def _seed_micro_batch(self, step: int, micro: int) -> None:
        """Seed torch's RNG (CPU and every accelerator device) from (seed, global micro-batch index).

        Noise, timesteps, guidance scales, prompt dropout and VAE posterior samples then depend only on which
        sample is drawn, not on the process count or on where a resumed run started: two processes at batch B
        draw what one process at batch B with two accumulation steps draws.
        """
        accelerator = self.accelerator
        index = micro_batch_index(step, micro, self.config.gradient_accumulation_steps, accelerator.num_processes,
                                  accelerator.process_index)
        torch.manual_seed(micro_batch_seed(self.plan.seed, index))

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

    def _save_checkpoint(self, step: int) -> None:
        """checkpoint-``step`` (every process calls it), recording the step, the seed and the run's identity."""
        state = {"global_step": step, "seed": self.plan.seed, "identity": self.plan.identity}
        if self.sharded is not None:
            state["sharded_processes"] = self.accelerator.num_processes
        write_shards = None if self.sharded is None else (
            lambda folder: self.sharded.save(folder / SHARDED_STATE, self._bare_optimizers(), self.method.ema))
        self.stop.last_checkpoint = save_checkpoint(self.accelerator, self.output_dir, step, state,
                                                    self.config.checkpoints_total_limit, write_shards)

    def _stop_if_signalled(self, step: int, saved: bool) -> None:
        """After an optimizer step: if any process got SIGTERM/SIGINT, checkpoint (unless just done) and stop."""
        import torch.distributed as dist

        accelerator = self.accelerator
        signum = torch.tensor([self.stop.signum or 0], device=accelerator.device)
        if accelerator.num_processes > 1:
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        if not signum.item():
            return
        if not saved:
            self._save_checkpoint(step)
        checkpoint = self.output_dir / f"checkpoint-{step}"
        argv = [a for i, a in enumerate(sys.argv) if not (a.startswith("--resume_from_checkpoint") or
                                                          (i and sys.argv[i - 1] == "--resume_from_checkpoint"))]
        stopped = TrainingStopped(int(signum.item()), f"Stopped by {signal.Signals(int(signum.item())).name} after "
                                  f"step {step}: wrote {checkpoint}. Resume with the same launcher and: "
                                  f"{shlex.join(python_command(argv))} --resume_from_checkpoint latest")
        if accelerator.is_main_process:
            print(stopped, file=sys.stderr, flush=True)
        raise stopped

    def _student_unet(self) -> torch.nn.Module | None:
        """The student's UNet to validate and export (every process calls it; the main process gets the UNet): a
        sharded run gathers a full copy, with only the student's adapter on."""
        if self.sharded is None:
            main = self.accelerator.is_main_process
            return self.accelerator.unwrap_model(self.method.student_unet()) if main else None
        from .denoiser import AdapterView, with_mixed_precision

        net = self.method.nets["unet"]
        root = net.unet if isinstance(net, AdapterView) else net
        plain = self.sharded.gathered(root, self.accelerator.device, self.method.ema)
        if plain is None:
            return None
        if isinstance(net, AdapterView):
            return AdapterView(plain, net.adapter).activated()
        return with_mixed_precision(plain)

    def _validate(self, step: int) -> Path | None:
        """A grid of validation images at 1 step and at the method's default step count (on the main process)."""
        unet = self._student_unet()
        if not self.accelerator.is_main_process:
            return None
        sampling = self.method.sampling()
        teacher = self.teacher
        with teacher.conditioner.placed_on(self.accelerator.device):
            pipe = student_pipeline(teacher.info, unet, teacher.vae, teacher.conditioner,
                                    student_scheduler(teacher.scheduler_config, sampling))
            grid = validation_grid(pipe, self.config.validation_prompts, sampling.num_inference_steps,
                                   sampling.guidance_scale, self.plan.resolution)
        return save_validation_grid(grid, self.output_dir, step, self.accelerator.trackers)
