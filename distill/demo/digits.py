"""The real-data built-in default: scikit-learn's 8x8 handwritten digits as a tiny text-to-image task.

scikit-learn ships 1,797 8x8 digit images (``sklearn.datasets.load_digits``), so everything here works
offline. The digits are upsampled to 32x32 RGB (white digit on black) and captioned
"a handwritten digit seven". This module provides:

* a fixed, stratified train/test split and a Hugging Face "imagefolder" export of it;
* a small latent-diffusion teacher trained on the train split in a few CPU minutes and saved in the
  standard diffusers Stable Diffusion layout (reusing the tiny model builders of ``distill.testing``), or in the
  Stable Diffusion 3 layout (flow matching; see ``flow_digits.py``);
* a small CNN digit classifier (accuracy against the prompted digit, and features for a
  Frechet distance, computed by distill.evaluate.frechet_distance).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distill.errors import DistillError

from .teacher_training import (aim_linear, caption_directions, drop_captions, ema_copy, ema_update, optimizer_step,
                               warmup_cosine)

logger = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 32
SPLITS = ("train", "test")
SPLIT_SEED = 0
TEST_FRACTION = 0.2
METADATA_FILE = "metadata.jsonl"
TEACHER_MARKER = "digits_teacher.json"
TEACHER_FORMAT = 1
TEXT_HIDDEN_SIZE = 32
CLASSIFIER_FILE = "classifier.pt"  # the digit classifier, cached inside the teacher folder
DEFAULT_GUIDANCE = 4.0  # the CFG scale of a teacher folder that records none
TEACHER_FAMILIES = ("sd", "sd3")  # a Stable Diffusion UNet (DDPM) or a Stable Diffusion 3 MMDiT (flow matching)
# Steps of the samples the CFG scale is chosen on, with the teacher's reference sampler (the benchmark's teacher row)
GUIDANCE_SELECTION_STEPS = {"sd": 25, "sd3": 28}


# --------------------------------------------------------------------------------------------- data


def caption_for(label: int) -> str:
    """The caption of a digit class, e.g. 7 -> "a handwritten digit seven"."""
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits upsampled to uint8 N x 32 x 32 x 3, with their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _upsample(digits.images), digits.target.astype(np.int64)


def _upsample(images8: np.ndarray) -> np.ndarray:
    """Bilinearly upsample N x 8 x 8 digits with values 0..16 to uint8 RGB N x 32 x 32 x 3 (0..255)."""
    small = torch.from_numpy(images8.astype(np.float32) * (255.0 / 16.0))[:, None]
    large = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    gray = large.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    return np.repeat(gray[..., None], 3, axis=-1)


@functools.lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    """Sorted indices of the fixed stratified 80/20 train/test split."""
    from sklearn.model_selection import train_test_split

    labels = _all_digits()[1]
    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 N x 32 x 32 x 3, white on black) and int64 labels of the fixed "train" or "test" split."""
    if split not in SPLITS:
        raise DistillError(f"Unknown digits split {split!r}; use one of {SPLITS}.")
    images, labels = _all_digits()
    indices = _split_indices()[split]
    return images[indices].copy(), labels[indices].copy()


def digit_prompts(per_digit: int, interleaved: bool = False) -> tuple[list[str], np.ndarray]:
    """``per_digit`` prompts per digit with their labels: digit-major, or zero to nine repeated if ``interleaved``."""
    digits = np.arange(len(DIGIT_WORDS))
    labels = np.tile(digits, per_digit) if interleaved else np.repeat(digits, per_digit)
    return [caption_for(label) for label in labels], labels


def load_teacher_pipeline(teacher: Path):
    """The teacher's reference sampler: an SD3 teacher with its own flow Euler scheduler, an SD teacher with DDIM
    (trailing spacing, so 1-step DDIM starts from pure noise)."""
    from diffusers import DDIMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

    if teacher_family(teacher) == "sd3":
        return StableDiffusion3Pipeline.from_pretrained(teacher)
    pipe = StableDiffusionPipeline.from_pretrained(teacher)
    # clip_sample=False as in real SD configs: clipping predicted latents to [-1, 1] would ruin them.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False)
    return pipe


def teacher_family(teacher: str | os.PathLike) -> str:
    """ "sd3" for a digits teacher folder in Stable Diffusion 3 format, else "sd" (also for a folder without one)."""
    try:
        index = json.loads((Path(teacher) / "model_index.json").read_text())
    except (OSError, ValueError):
        return "sd"
    return "sd3" if index.get("_class_name") == "StableDiffusion3Pipeline" else "sd"


def write_digits_image_folder(folder: str | os.PathLike, split: str = "train") -> Path:
    """Write a split as PNGs plus an imagefolder metadata.jsonl ({"file_name", "text"}); skip if complete."""
    from PIL import Image

    folder = Path(folder)
    images, labels = digits_split(split)
    records = [
        {"file_name": f"{split}_{i:05d}.png", "text": caption_for(label)} for i, label in enumerate(labels)
    ]
    if _image_folder_complete(folder, records):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for record, image in zip(records, images):
        Image.fromarray(image).save(folder / record["file_name"])
    _write_text_atomically(folder / METADATA_FILE, "".join(json.dumps(r) + "\n" for r in records))
    return folder


def _image_folder_complete(folder: Path, records: list[dict]) -> bool:
    """Whether folder already holds exactly these metadata records and all their image files."""
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        return False
    existing = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    return existing == records and all((folder / r["file_name"]).is_file() for r in records)


def _write_text_atomically(path: Path, text: str) -> None:
    """Write text to path via a temporary sibling and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _to_unit_pixels(images) -> torch.Tensor:
    """Float N x 3 x 32 x 32 in [0, 1] from uint8 (0..255) or float ([0, 1]) NHWC/NCHW arrays, tensors or PIL lists."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])
    pixels = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    if pixels.shape[-1] in (1, 3) and pixels.shape[1] not in (1, 3):
        pixels = pixels.permute(0, 3, 1, 2)
    if tuple(pixels.shape[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DistillError(f"Expected {IMAGE_SIZE}x{IMAGE_SIZE} digit images, got shape {tuple(pixels.shape)}.")
    return pixels.expand(-1, 3, -1, -1).contiguous()


# --------------------------------------------------------------------------------------- classifier


class DigitsClassifier(nn.Module):
    """Small CNN digit classifier on 32x32 RGB images with pixel values in [0, 1]."""

    def __init__(self, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(3, 32),  # 16x16
            _conv_block(32, 64),  # 8x8
            _conv_block(64, 64),  # 4x4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, len(DIGIT_WORDS))
        self.test_accuracy: float | None = None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits for float N x 3 x 32 x 32 pixels in [0, 1]."""
        return self.head(self.body(pixels))

    @torch.no_grad()
    def features(self, images, batch_size: int = 256) -> np.ndarray:
        """Penultimate-layer (64-d) features of images (see _to_unit_pixels for accepted formats)."""
        self.eval()
        pixels = _to_unit_pixels(images)
        return torch.cat([self.body(chunk) for chunk in pixels.split(batch_size)]).numpy()

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        """Predicted digit labels of images (uint8 0..255 or float 0..1, NHWC or NCHW, or PIL images)."""
        self.eval()
        pixels = _to_unit_pixels(images)
        return torch.cat([self(chunk).argmax(1) for chunk in pixels.split(batch_size)]).numpy()

    def accuracy(self, images, labels) -> float:
        """Fraction of images predicted as their label."""
        return float((self.predict(images) == np.asarray(labels)).mean())


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU, then 2x downsampling."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def _random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (zero fill), a cheap augmentation."""
    size = pixels.shape[-1]
    padded = F.pad(pixels, [max_shift] * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(pixels), 2), generator=generator).tolist()
    return torch.stack([p[:, dy : dy + size, dx : dx + size] for p, (dy, dx) in zip(padded, offsets)])


def _fit_classifier(model: DigitsClassifier, seed: int, epochs: int = 12, batch_size: int = 64) -> None:
    """Train the classifier on the train split with AdamW and random shifts."""
    images, labels = digits_split("train")
    pixels, targets = _to_unit_pixels(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(pixels) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(pixels), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(_random_shift(pixels[batch], 2, generator)), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def train_digits_classifier(
    cache_path: str | os.PathLike | None = None, seed: int = 0, num_threads: int | None = None
) -> DigitsClassifier:
    """Train (or load from cache_path) the digit classifier; its test-split accuracy is in .test_accuracy."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
    cache_path = Path(cache_path) if cache_path is not None else None
    if cache_path is not None and cache_path.is_file():
        model.load_state_dict(torch.load(cache_path, map_location="cpu", weights_only=True))
    else:
        with _cpu_threads(num_threads):
            _fit_classifier(model, seed)
        if cache_path is not None:
            _save_state_dict_atomically(model, cache_path)
    model.eval()
    model.test_accuracy = model.accuracy(*digits_split("test"))
    logger.info("Digits classifier test accuracy: %.4f", model.test_accuracy)
    return model


def _save_state_dict_atomically(model: nn.Module, path: Path) -> None:
    """torch.save a state_dict via a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ teacher


@dataclasses.dataclass(frozen=True)
class TeacherRecipe:
    """Every parameter that determines a digits teacher build (recorded in the cache marker)."""

    seed: int = 0
    family: str = "sd"  # one of TEACHER_FAMILIES
    vae_steps: int = 200
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5  # per latent element, relative to the per-pixel MSE
    text_encoder_steps: int = 0  # 0 = keep the random text encoder as it is
    text_encoder_lr: float = 1e-2
    denoiser_steps: int = 3000  # the UNet's or the transformer's
    denoiser_batch_size: int = 32
    denoiser_lr: float = 1e-3
    unet_channels: tuple[int, ...] = (64, 128)  # family sd
    transformer_width: int = 64  # family sd3: attention heads of 32 channels
    transformer_layers: int = 4
    flow_shift: float = 3.0  # family sd3: the sigma shift of SD3's scheduler config
    caption_dropout: float = 0.1
    high_noise_weight_cap: float = 5.0  # epsilon-loss weight clamp(1 / SNR, 1, cap); 1 = plain DDPM loss
    cross_attention_init_dims: int = 4  # 0 = diffusers' default random init
    cross_attention_init_gain: float = 3.0
    ema_decay: float = 0.999  # cap on the usual (1 + step) / (10 + step) warm-up
    warmup_steps: int = 50
    guidance_candidates: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0)  # tried on the train split; () = 4.0
    guidance_selection_images: int = 200

    def to_json(self) -> dict:
        """The recipe as a JSON-comparable dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _idle_cores() -> int:
    """CPU cores not busy with other processes (cores minus the 1-minute load average), at least 1."""
    cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


@contextlib.contextmanager
def _cpu_threads(num_threads: int | None = None):
    """Run the block with num_threads torch threads (default: the idle cores), then restore the old count.

    Oversubscribed CPUs make torch's OpenMP threads wait on each other, which can slow tiny models
    down tenfold, so by default only the cores that look idle are used.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads or _idle_cores())
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_digits_teacher(
    folder: str | os.PathLike,
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = None,
    **recipe_overrides,
) -> Path:
    """Train (or reuse if cached) the digits latent-diffusion teacher and save it as a diffusers folder: Stable
    Diffusion (a UNet) by default, Stable Diffusion 3 (an MMDiT, flow matching) with ``family="sd3"``."""
    folder = Path(folder)
    recipe = TeacherRecipe(seed=seed, **recipe_overrides)
    if recipe.family not in TEACHER_FAMILIES:
        raise DistillError(f"Unknown digits teacher family {recipe.family!r}; use one of {TEACHER_FAMILIES}.")
    if _teacher_is_cached(folder, recipe):
        return folder
    _check_replaceable(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    with _cpu_threads(num_threads):
        _train_and_save_teacher(tmp, recipe, progress)
        guidance = _choose_guidance(tmp, recipe)
    marker = {"format": TEACHER_FORMAT, "recipe": recipe.to_json(), **guidance,
              "build_seconds": time.perf_counter() - started}
    (tmp / TEACHER_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    _move_into_place(tmp, folder)
    return folder


def _choose_guidance(folder: Path, recipe: TeacherRecipe) -> dict:
    """The CFG scale whose DDIM samples are closest to the train split in the classifier's features.

    The benchmark scores against the held-out test split, so the scale is chosen on the train split (with other
    seeds than the benchmark's) and the test split is never looked at.
    """
    if not recipe.guidance_candidates:
        return {"guidance_scale": DEFAULT_GUIDANCE}
    from ..evaluate import frechet_distance, generate

    per_digit = max(1, recipe.guidance_selection_images // len(DIGIT_WORDS))
    prompts, _ = digit_prompts(per_digit, interleaved=True)
    classifier = train_digits_classifier(cache_path=folder / CLASSIFIER_FILE, seed=recipe.seed)
    train_features = classifier.features(digits_split("train")[0])
    pipe = load_teacher_pipeline(folder)
    distances = {}
    for guidance in recipe.guidance_candidates:
        samples = generate(pipe, prompts, GUIDANCE_SELECTION_STEPS[recipe.family], guidance, seed=recipe.seed + 1000)
        distances[float(guidance)] = frechet_distance(classifier.features(samples.images), train_features)
        logger.info("digits teacher: CFG %.2f, FD to the train split %.2f", guidance, distances[float(guidance)])
    return {"guidance_scale": min(distances, key=distances.get),
            "guidance_selection": {"steps": GUIDANCE_SELECTION_STEPS[recipe.family], "images": len(prompts),
                                   "fd_to_train_split": {str(g): fd for g, fd in distances.items()}}}


def teacher_guidance(folder: str | os.PathLike) -> float:
    """The CFG scale a digits teacher folder was chosen to sample with (DEFAULT_GUIDANCE if it records none)."""
    marker = _read_marker(Path(folder)) or {}
    return float(marker.get("guidance_scale", DEFAULT_GUIDANCE))


def _read_marker(folder: Path) -> dict | None:
    """The teacher marker of folder, or None if absent or unreadable."""
    try:
        return json.loads((folder / TEACHER_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _teacher_is_cached(folder: Path, recipe: TeacherRecipe) -> bool:
    """Whether folder holds a complete teacher built with exactly this recipe."""
    marker = _read_marker(folder)
    return (
        (folder / "model_index.json").is_file()
        and marker is not None
        and marker.get("format") == TEACHER_FORMAT
        and marker.get("recipe") == recipe.to_json()
    )


def _check_replaceable(folder: Path) -> None:
    """Refuse to overwrite a non-empty folder that is not a digits teacher."""
    if folder.exists() and any(folder.iterdir()) and _read_marker(folder) is None:
        raise DistillError(
            f"{folder} is not empty and is not a digits teacher folder; pass a new or empty folder instead."
        )


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished tmp folder to folder, replacing a stale teacher if there is one."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _train_and_save_teacher(tmp: Path, recipe: TeacherRecipe, progress: bool) -> None:
    """Train the VAE then the denoiser on the train split and save the pipeline into tmp."""
    from tqdm.auto import tqdm

    from distill.testing import build_tiny_teacher, tiny_text_encoder

    images, labels = digits_split("train")
    pixels = _to_unit_pixels(images) * 2.0 - 1.0
    if recipe.family == "sd3":
        from .flow_digits import train_and_save_sd3_teacher

        with tqdm(total=recipe.vae_steps + recipe.denoiser_steps, disable=not progress, desc="digits teacher") as bar:
            vae = _train_vae(pixels, recipe, bar)
            captions = [caption_for(label) for label in range(len(DIGIT_WORDS))] + [""]  # the empty one last
            train_and_save_sd3_teacher(tmp, vae, _encode_latents(vae, pixels), labels, captions, recipe, bar)
        return
    text_encoder = tiny_text_encoder(TEXT_HIDDEN_SIZE, TEXT_HIDDEN_SIZE, with_projection=False, seed=recipe.seed + 1)
    total = recipe.text_encoder_steps + recipe.vae_steps + recipe.denoiser_steps
    with tqdm(total=total, disable=not progress, desc="digits teacher") as bar:
        _train_text_encoder(text_encoder, recipe, bar)
        vae = _train_vae(pixels, recipe, bar)
        latents = _encode_latents(vae, pixels)
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        unet = _train_unet(latents * vae.config.scaling_factor, labels, _caption_embeddings(text_encoder), recipe, bar)
    build_tiny_teacher(tmp, seed=recipe.seed, unet=unet, vae=vae, text_encoder=text_encoder)


def _train_vae(pixels: torch.Tensor, recipe: TeacherRecipe, bar):
    """Fit the tiny AutoencoderKL to reconstruct pixels in [-1, 1] (MSE + small KL)."""
    from distill.testing import tiny_vae

    vae = tiny_vae(recipe.seed, use_quant_conv=recipe.family == "sd").train()  # SD3's VAE has no quant convs
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, recipe.warmup_steps, recipe.vae_steps)
    bar.set_description("digits teacher: vae")
    for _ in range(recipe.vae_steps):
        batch = pixels[torch.randint(0, len(pixels), (recipe.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + recipe.kl_weight * posterior.kl().mean() / latents[0].numel()
        optimizer_step(optimizer, schedule, loss)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def _encode_latents(vae, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unscaled VAE posterior means of all pixels (the decoder was trained to tolerate posterior noise)."""
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(batch_size)])


def _caption_ids() -> torch.Tensor:
    """Token ids of the ten captions plus the empty one (row 10), padded as the SD pipeline pads them."""
    from distill.testing import clip_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = clip_tokenizer(scratch)
    captions = [caption_for(label) for label in range(len(DIGIT_WORDS))] + [""]
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def _caption_embeddings(text_encoder) -> torch.Tensor:
    """Hidden states of the ten captions plus the empty one (index 10), exactly as the SD pipeline encodes them."""
    return text_encoder(_caption_ids())[0]


def _train_text_encoder(text_encoder, recipe: TeacherRecipe, bar) -> None:
    """Teach the frozen-at-export text encoder to tell the eleven captions apart, in place.

    A random CLIP text encoder maps the ten captions to nearly the same states (they differ in one token), so a
    linear probe reads the caption from every hidden state at and after the digit word (causal attention carries
    it to the padding), trained with cross-entropy; the UNet then sees captions that differ in every direction.
    """
    if not recipe.text_encoder_steps:
        return
    ids = _caption_ids()
    first_digit_position = int((ids[: len(DIGIT_WORDS)] != ids[0]).any(dim=0).nonzero()[0])
    targets = torch.arange(len(ids)).unsqueeze(1).expand(-1, ids.shape[1] - first_digit_position)
    generator = torch.Generator().manual_seed(recipe.seed + 3)
    probe = nn.Linear(text_encoder.config.hidden_size, len(ids))
    with torch.no_grad():
        probe.weight.copy_(0.02 * torch.randn(probe.weight.shape, generator=generator))
        probe.bias.zero_()
    parameters = [*text_encoder.parameters(), *probe.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=recipe.text_encoder_lr)
    text_encoder.train()
    bar.set_description("digits teacher: text encoder")
    for _ in range(recipe.text_encoder_steps):
        states = text_encoder(ids)[0][:, first_digit_position:]
        loss = F.cross_entropy(probe(states).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update()
    text_encoder.eval().requires_grad_(False)


def _train_unet(latents: torch.Tensor, labels, caption_embeds: torch.Tensor, recipe: TeacherRecipe, bar):
    """Train the tiny UNet with the epsilon-prediction DDPM loss on scaled latents; return its EMA weights."""
    from distill.testing import ddpm_scheduler, tiny_unet

    unet = tiny_unet(False, TEXT_HIDDEN_SIZE, seed=recipe.seed, block_out_channels=recipe.unet_channels).train()
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    if recipe.cross_attention_init_dims:
        directions = caption_directions(caption_embeds, recipe.cross_attention_init_dims)
        _aim_cross_attention(unet, directions, recipe.cross_attention_init_gain, generator)
    ema = ema_copy(unet)
    weights = _timestep_weights(ddpm_scheduler().alphas_cumprod.float(), recipe.high_noise_weight_cap)
    labels = torch.as_tensor(labels)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.denoiser_lr, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, recipe.warmup_steps, recipe.denoiser_steps)
    bar.set_description("digits teacher: unet")
    for step in range(recipe.denoiser_steps):
        batch = torch.randint(0, len(labels), (recipe.denoiser_batch_size,), generator=generator)
        context = caption_embeds[drop_captions(labels[batch], len(DIGIT_WORDS), recipe.caption_dropout, generator)]
        loss = _epsilon_loss(unet, latents[batch], context, weights, generator)
        optimizer_step(optimizer, schedule, loss)
        ema_update(ema, unet, min(recipe.ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update()
    return ema.eval().requires_grad_(False)


def _timestep_weights(alphas_cumprod: torch.Tensor, cap: float) -> dict[str, torch.Tensor]:
    """Per-timestep noising coefficients and loss weights clamp(1 / SNR, 1, cap).

    With epsilon prediction, high-noise timesteps (where the caption decides which digit appears) have tiny
    losses; up-weighting them (at most by cap) makes the teacher learn the prompt much sooner.
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return {
        "signal": alphas_cumprod.sqrt(),
        "noise": (1 - alphas_cumprod).sqrt(),
        "loss": (1 / snr).clamp(min=1.0, max=max(cap, 1.0)),
    }


def _epsilon_loss(unet, latents, context, weights: dict[str, torch.Tensor], generator) -> torch.Tensor:
    """DDPM loss: (weighted) MSE between the UNet's noise prediction and the noise added at a random timestep."""
    timesteps = torch.randint(0, len(weights["loss"]), (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    signal, noise_level = (weights[key][timesteps].view(-1, 1, 1, 1) for key in ("signal", "noise"))
    noisy = signal * latents + noise_level * noise
    errors = (unet(noisy, timesteps, context).sample - noise).square().mean(dim=(1, 2, 3))
    return (weights["loss"][timesteps] * errors).mean()


@torch.no_grad()
def _aim_cross_attention(unet, directions: torch.Tensor, gain: float, generator: torch.Generator) -> None:
    """Initialise every cross-attention key/value projection to read (only) the caption-separating directions."""
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            for linear in (module.to_k, module.to_v):
                aim_linear(linear, directions, gain, generator)
