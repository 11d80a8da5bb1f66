"""The only module that knows SD 1.x/2.x from SDXL.

SD conditions its UNet on one CLIP text encoder's last hidden state. SDXL concatenates the
penultimate hidden states of two encoders, adds the second encoder's pooled projection and six
"micro-conditioning" time ids (original size, crop top-left, target size) through
``added_cond_kwargs`` (Podell et al. 2023, SDXL, sec. 2.2). Methods only ever see :class:`Cond`.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DistillError

SD = "sd"
SDXL = "sdxl"

logger = logging.getLogger(__name__)


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
    name: str = ""  # the folder or Hub id as the user gave it (``path`` is the resolved local folder)

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
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DistillError(f"{index_file} is damaged (not valid JSON). Re-download the teacher.") from None
    components = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}  # [null, null]: absent
    needed = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    missing = sorted(needed - components)
    if missing:
        raise DistillError(
            f"{path} ({index.get('_class_name')}) is not a Stable Diffusion or SDXL pipeline: it has no "
            f"{', '.join(missing)}. Only SD 1.x/2.x and SDXL text-to-image teachers can be distilled."
        )
    if "text_encoder_2" in components and index["text_encoder_2"][0] is not None:
        info = TeacherInfo(
            str(folder), SDXL, ["text_encoder", "text_encoder_2"], ["tokenizer", "tokenizer_2"],
            bool(index.get("force_zeros_for_empty_prompt", True)), name=str(path),
        )
    else:
        info = TeacherInfo(str(folder), SD, ["text_encoder"], ["tokenizer"], name=str(path))
    _check_components_agree(info, path)
    for component in ("unet", "vae", *info.text_encoders):
        _check_weight_files(folder / component)
    return info


FAMILY_NAMES = {SD: "SD 1.x/2.x", SDXL: "SDXL"}


def component_config(folder: Path, component: str, path: str) -> dict:
    """``<component>/config.json`` of a teacher, or a DistillError saying it is missing or unreadable."""
    file = folder / component / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise DistillError(f"{path} is incomplete: {component}/config.json is missing. Re-download the teacher "
                           "(or save it again with save_pretrained).") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DistillError(f"{file} is damaged (not valid JSON). Re-download the teacher's {component}/ "
                           "folder.") from None


def _check_components_agree(info: TeacherInfo, path: str) -> None:
    """Refuse a folder whose UNet does not belong to its text encoders (e.g. an SDXL unet/ inside an SD folder).

    SDXL's UNet takes ``added_cond_kwargs`` (addition_embed_type "text_time": pooled embeds of text_encoder_2 and
    six time ids) and cross-attends to both encoders' states concatenated; SD's takes neither (Podell et al. 2023).
    """
    folder = Path(info.path)
    unet = component_config(folder, "unet", path)
    encoders = [component_config(folder, name, path) for name in info.text_encoders]
    problems = []
    text_time = unet.get("addition_embed_type") == "text_time"
    if text_time and not info.is_sdxl:
        problems.append("unet/config.json is an SDXL UNet (addition_embed_type 'text_time') but model_index.json "
                        "has no text_encoder_2, as in SD 1.x/2.x")
    if info.is_sdxl and not text_time:
        problems.append(f"unet/config.json is an SD 1.x/2.x UNet (addition_embed_type "
                        f"{unet.get('addition_embed_type')!r}, not 'text_time') but model_index.json has "
                        "text_encoder_2, as in SDXL")
    widths = [e.get("hidden_size") for e in encoders]
    cross = unet.get("cross_attention_dim")
    if all(isinstance(w, int) for w in widths) and cross is not None:
        width = sum(widths)
        if any(c != width for c in (cross if isinstance(cross, (list, tuple)) else [cross])):
            sources = " + ".join(f"{name} hidden_size {w}" for name, w in zip(info.text_encoders, widths))
            problems.append(f"the UNet cross-attends to {cross}-wide text embeddings (cross_attention_dim) but the "
                            f"text encoders give {width} ({sources})")
    projection = encoders[-1].get("projection_dim")
    if info.is_sdxl and text_time and None not in (projection, unet.get("addition_time_embed_dim"),
                                                   unet.get("projection_class_embeddings_input_dim")):
        expected = projection + 6 * unet["addition_time_embed_dim"]
        if unet["projection_class_embeddings_input_dim"] != expected:
            problems.append(f"the UNet's projection_class_embeddings_input_dim is "
                            f"{unet['projection_class_embeddings_input_dim']}, but text_encoder_2's pooled "
                            f"projection ({projection}) and six time ids give {expected}")
    if problems:
        raise DistillError(f"{path} mixes components of different models: {'; '.join(problems)}. Replace the "
                           "mismatched folder (usually unet/) with the one from the same model, or re-download the "
                           "complete teacher.")


WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")  # what from_pretrained reads, no variant
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _safetensors_damage(file: Path) -> str | None:
    """Why a .safetensors file cannot be complete (its header must describe exactly the bytes it holds), or None.

    Reads the header only, so even a 10 GB UNet is checked in milliseconds.
    """
    size = file.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for a safetensors header"
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > min(size - 8, MAX_HEADER_BYTES):
            return f"its header claims {header_size} bytes but the file holds {size}"
        try:
            header = json.loads(f.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not valid safetensors JSON"
    if 8 + header_size + end != size:
        return f"it holds {size} bytes but its header describes {8 + header_size + end}"
    return None


def _check_weight_files(component: Path) -> None:
    """Refuse a teacher component whose safetensors weights are cut short or missing (an interrupted download)."""
    files = [component / name for name in WEIGHT_NAMES if (component / name).is_file()]
    for name in WEIGHT_NAMES:  # sharded weights: <name>.index.json lists the shard files
        index = component / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DistillError(f"The teacher's weights index {index} is damaged (not a valid weight map). "
                                   f"Re-download the teacher's {component.name}/ folder.") from None
            files += [component / shard for shard in shards]
    if not files and not any(component.glob("*.safetensors")) and not any(component.glob("*.bin")):
        raise DistillError(f"The teacher's {component.name}/ folder ({component}) holds no weights file (e.g. "
                           f"{WEIGHT_NAMES[0 if component.name in ('unet', 'vae') else 1]}). Re-download the "
                           "teacher.")
    for file in files:
        if not file.is_file():
            raise DistillError(f"The teacher's weights file {file} is missing (its index lists it): an interrupted "
                               f"download. Re-download the teacher's {component.name}/ folder and rerun.")
        damage = _safetensors_damage(file)
        if damage:
            raise DistillError(f"The teacher's weights file {file} is damaged ({damage}): an interrupted download "
                               f"or copy cut it short. Re-download {component.name}/{file.name} (or the whole "
                               "teacher) and rerun.")


@contextmanager
def teacher_load_errors(info: TeacherInfo):
    """Turn a failure while reading the teacher's weights (a file inspect_teacher could not vet, e.g. a truncated
    .bin) into one DistillError naming the file diffusers/transformers complained about; out-of-memory passes."""
    try:
        yield
    except (DistillError, torch.OutOfMemoryError, KeyboardInterrupt):
        raise
    except Exception as error:
        detail = " ".join(str(error).split())
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise DistillError(f"Could not load the teacher {info.name or info.path} ({type(error).__name__}: {detail}). "
                           "A file of it is probably damaged or incomplete (an interrupted download): re-download "
                           "the teacher and rerun.") from None


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

    truncation_warned = False  # the over-long caption warning is logged once per conditioner (one per run)

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

    def _warn_truncated(self, tokenizer, prompts: list[str]) -> None:
        """Log once how many captions of a batch exceed the tokenizer's model_max_length and so are truncated."""
        if self.truncation_warned:
            return
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
        long = [prompt for prompt, length in zip(prompts, lengths) if length > tokenizer.model_max_length]
        if long:
            self.truncation_warned = True
            example = long[0] if len(long[0]) <= 60 else long[0][:60] + "..."
            logger.warning(
                "%d of %d captions in this batch are longer than the text encoder's limit of %d tokens "
                "(model_max_length) and were truncated, e.g. %r. Shorten them to keep their ends; this warning "
                "is shown once.", len(long), len(prompts), tokenizer.model_max_length, example,
            )

    def _hidden_states(self, index: int, prompts: list[str]):
        tokenizer, encoder = self.tokenizers[index], self.text_encoders[index]
        if index == 0:
            self._warn_truncated(tokenizer, prompts)
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

