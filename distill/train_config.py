"""The settings of the training loop, one field per flag (names and meanings of diffusers' LCM distillation scripts)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import DistillError

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
    torch_compile: bool = field(default=False, metadata={
        "help": "Compile the network's repeated blocks with torch.compile (diffusers' regional compilation): faster "
                "steps after a one-off compile at the start (about a minute on a GPU, longer on the CPU)."})
    channels_last: bool = field(default=True, metadata={
        "help": "Store the frozen convolution weights of the UNet and VAE channels-last (NHWC), which the GPU and CPU "
                "convolution kernels run faster on (trainable weights stay contiguous; sharded runs keep every "
                "weight contiguous).",
        "help_off": "Keep every weight in PyTorch's default contiguous (NCHW) layout."})
    enable_xformers_memory_efficient_attention: bool = field(default=False, metadata={
        "help": "Use xformers attention (pip install xformers); PyTorch's SDPA is used otherwise."})
    dataloader_num_workers: int | None = field(default=None, metadata={
        "help": "Data-loading worker processes (0: load in the training process); default: 4 on a GPU, where batches "
                "then load (into pinned memory) while the step runs, 0 on the CPU."})
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
