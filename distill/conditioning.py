"""The only module that knows SD 1.x/2.x from SDXL.

SD conditions its UNet on one CLIP text encoder's last hidden state. SDXL concatenates the
penultimate hidden states of two encoders, adds the second encoder's pooled projection and six
"micro-conditioning" time ids (original size, crop top-left, target size) through
``added_cond_kwargs`` (Podell et al. 2023, SDXL, sec. 2.2). Methods only ever see :class:`Cond`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DistillError

SD = "sd"
SDXL = "sdxl"


@dataclass
class Cond:
    """Text conditioning for a batch, opaque to methods: pass it to the denoiser as is."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self) -> dict:
        """Keyword arguments for ``UNet2DConditionModel.forward``."""
        kwargs: dict = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids}
        return kwargs

    def to(self, device=None, dtype=None) -> "Cond":
        """Move (and cast) every tensor of the condition."""
        return Cond(*(None if t is None else t.to(device=device, dtype=dtype) for t in self.tensors()))

    def tensors(self) -> tuple:
        return (self.prompt_embeds, self.pooled_prompt_embeds, self.time_ids)

    def where(self, mask: torch.Tensor, other: "Cond") -> "Cond":
        """Per-sample choice: ``self`` where mask is True, ``other`` elsewhere (for prompt dropout)."""

        def pick(a, b):
            if a is None:
                return None
            m = mask.view(-1, *([1] * (a.dim() - 1))).to(a.device)
            return torch.where(m, a, b.to(a.dtype))

        return Cond(*(pick(a, b) for a, b in zip(self.tensors(), other.tensors())))

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, index) -> "Cond":
        return Cond(*(None if t is None else t[index] for t in self.tensors()))

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch dimension."""
        columns = zip(*(c.tensors() for c in conds))
        return Cond(*(None if col[0] is None else torch.cat(col) for col in columns))


@dataclass
class TeacherInfo:
    """What a teacher folder is: its family and the names of its components."""

    path: str
    family: str
    text_encoders: list[str] = field(default_factory=list)
    tokenizers: list[str] = field(default_factory=list)
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.family == SDXL


def inspect_teacher(path: str, cache_dir: str | None = None, revision: str | None = None) -> TeacherInfo:
    """Read a teacher's model_index.json (local folder, or Hub id resolved through the cache) and classify it."""
    folder = Path(path)
    if not folder.exists():
        folder = _resolve_hub_snapshot(path, cache_dir, revision)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise DistillError(
            f"{path} is not a diffusers pipeline folder (no model_index.json). Point "
            "--pretrained_teacher_model at a Stable Diffusion 1.x/2.x or SDXL folder saved with save_pretrained."
        )
    index = json.loads(index_file.read_text())
    components = {k for k, v in index.items() if isinstance(v, list)}
    needed = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    missing = sorted(needed - components)
    if missing:
        raise DistillError(
            f"{path} ({index.get('_class_name')}) is not a Stable Diffusion or SDXL pipeline: it has no "
            f"{', '.join(missing)}. Only SD 1.x/2.x and SDXL text-to-image teachers can be distilled."
        )
    if "text_encoder_2" in components and index["text_encoder_2"][0] is not None:
        return TeacherInfo(
            str(folder), SDXL, ["text_encoder", "text_encoder_2"], ["tokenizer", "tokenizer_2"],
            bool(index.get("force_zeros_for_empty_prompt", True)),
        )
    return TeacherInfo(str(folder), SD, ["text_encoder"], ["tokenizer"])


def _resolve_hub_snapshot(repo_id: str, cache_dir: str | None, revision: str | None) -> Path:
    """Download (or find in the cache) a teacher's files from the Hub."""
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise DistillError(f"Teacher folder {repo_id} does not exist. Check --pretrained_teacher_model.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, revision=revision,
                                      allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as error:  # network, auth or missing repo: all user-facing
        raise DistillError(
            f"Could not find the teacher {repo_id}: it is not a local folder and the Hub lookup failed "
            f"({type(error).__name__}). Pass a local folder, or check the repo id and your connection."
        ) from error


class TextConditioner:
    """Tokenizers and frozen text encoders of a teacher, turning prompts into :class:`Cond`."""

    def __init__(self, info: TeacherInfo, resolution: int, dtype=torch.float32, revision: str | None = None):
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        self.info = info
        self.resolution = resolution
        self.tokenizers = [AutoTokenizer.from_pretrained(info.path, subfolder=n, revision=revision)
                           for n in info.tokenizers]
        classes = [CLIPTextModel, CLIPTextModelWithProjection][: len(info.text_encoders)]
        self.text_encoders = [
            cls.from_pretrained(info.path, subfolder=name, revision=revision, torch_dtype=dtype)
            .requires_grad_(False).eval()
            for cls, name in zip(classes, info.text_encoders)
        ]

    def to(self, device) -> "TextConditioner":
        for encoder in self.text_encoders:
            encoder.to(device)
        return self

    @property
    def device(self):
        return self.text_encoders[0].device

    @torch.no_grad()
    def encode(self, prompts: list[str], original_size=None, crop_top_left=None) -> Cond:
        """Encode prompts (SD: last hidden state; SDXL: penultimate states of both encoders + pooled + time ids)."""
        if not self.info.is_sdxl:
            return Cond(self._hidden_states(0, prompts).last_hidden_state)
        outputs = [self._hidden_states(i, prompts) for i in range(2)]
        prompt_embeds = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
        pooled = outputs[1].text_embeds
        return Cond(prompt_embeds, pooled, self.time_ids(len(prompts), original_size, crop_top_left))

    def unconditional(self, batch_size: int) -> Cond:
        """The CFG 'empty prompt' condition (SDXL teachers use zeros when force_zeros_for_empty_prompt)."""
        empty = self.encode([""])
        if self.info.is_sdxl and self.info.force_zeros_for_empty_prompt:
            empty = Cond(torch.zeros_like(empty.prompt_embeds), torch.zeros_like(empty.pooled_prompt_embeds),
                         empty.time_ids)
        return Cond(*(None if t is None else t.expand(batch_size, *t.shape[1:]).clone() for t in empty.tensors()))

    def time_ids(self, batch_size: int, original_size=None, crop_top_left=None) -> torch.Tensor:
        """SDXL micro-conditioning (original_size, crop_top_left, target_size) per sample."""
        target = torch.tensor([self.resolution, self.resolution], dtype=torch.float32)
        if original_size is None:
            original_size = target.expand(batch_size, 2)
        if crop_top_left is None:
            crop_top_left = torch.zeros(batch_size, 2)
        ids = torch.cat([torch.as_tensor(original_size).float().view(batch_size, 2),
                         torch.as_tensor(crop_top_left).float().view(batch_size, 2),
                         target.expand(batch_size, 2)], dim=1)
        return ids.to(self.device)

    def _hidden_states(self, index: int, prompts: list[str]):
        tokenizer, encoder = self.tokenizers[index], self.text_encoders[index]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return encoder(ids.to(encoder.device), output_hidden_states=self.info.is_sdxl)


def native_resolution(info: TeacherInfo) -> int:
    """The image size the teacher was trained at: UNet sample size times the VAE's downsampling factor."""
    unet = json.loads((Path(info.path) / "unet" / "config.json").read_text())
    vae = json.loads((Path(info.path) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def pipeline_class(info: TeacherInfo):
    """The stock diffusers pipeline class for this teacher family."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if info.is_sdxl else StableDiffusionPipeline

