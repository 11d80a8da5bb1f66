"""Text conditioning: the :class:`Cond` methods pass around opaquely, and each teacher family's text conditioner.

SD conditions its UNet on one CLIP text encoder's last hidden state. SDXL concatenates the
penultimate hidden states of two encoders, adds the second encoder's pooled projection and six
"micro-conditioning" time ids (original size, crop top-left, target size) through
``added_cond_kwargs`` (Podell et al. 2023, SDXL, sec. 2.2). Which conditioner a teacher gets is decided by its
family (distill/families.py); methods only ever see :class:`Cond`. Also here: reading and vetting a teacher folder.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .errors import DistillError

if TYPE_CHECKING:
    from .families import TeacherFamily

logger = logging.getLogger(__name__)


@dataclass
class Cond:
    """Conditioning for a batch, opaque to methods: pass it to the denoiser as is.

    ``extra`` holds further per-sample network inputs, passed straight into the network call by name (as
    k-diffusion's ``extra_args``): a step-size or guidance embedding needs no change to the denoiser.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def unet_kwargs(self) -> dict:
        """Keyword arguments for the network's forward (``UNet2DConditionModel.forward``), ``extra`` included."""
        kwargs: dict = {"encoder_hidden_states": self.prompt_embeds, **self.extra}
        if self.pooled_prompt_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids}
        return kwargs

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Cond":
        """The condition with ``fn`` applied to every tensor, ``extra`` included (absent ones stay None)."""
        return Cond(*(None if t is None else fn(t) for t in self.tensors()),
                    extra={name: fn(t) for name, t in self.extra.items()})

    def to(self, device=None, dtype=None) -> "Cond":
        """Move every tensor of the condition, casting the floating-point ones to ``dtype``."""
        return self.map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def tensors(self) -> tuple:
        """The text tensors in constructor order (prompt, pooled, time ids); ``extra`` is kept by name."""
        return (self.prompt_embeds, self.pooled_prompt_embeds, self.time_ids)

    def where(self, mask: torch.Tensor, other: "Cond") -> "Cond":
        """Per-sample choice: ``self`` where mask is True, ``other`` elsewhere (for prompt dropout)."""

        def pick(a, b):
            if a is None:
                return None
            m = mask.view(-1, *([1] * (a.dim() - 1))).to(a.device)
            return torch.where(m, a, b.to(a.device, a.dtype))

        _same_extra([self, other])
        return Cond(*(pick(a, b) for a, b in zip(self.tensors(), other.tensors())),
                    extra={name: pick(t, other.extra[name]) for name, t in self.extra.items()})

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, index) -> "Cond":
        """The samples ``index`` selects, in every tensor alike."""
        return self.map(lambda t: t[index])

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch dimension (every condition must carry the same ``extra`` inputs)."""
        columns = zip(*(c.tensors() for c in conds))
        extra = {name: torch.cat([c.extra[name] for c in conds]) for name in _same_extra(conds)}
        return Cond(*(None if col[0] is None else torch.cat(col) for col in columns), extra=extra)


def _same_extra(conds: list[Cond]) -> list[str]:
    """The names of the extra inputs the conditions share; a ValueError when they differ (rows would misalign)."""
    names = [sorted(c.extra) for c in conds]
    if any(n != names[0] for n in names):
        raise ValueError(f"conditions with different extra inputs cannot be combined: {names}")
    return names[0]


@dataclass
class TeacherInfo:
    """What a teacher folder is: its family (distill/families.py) and what model_index.json says of it."""

    path: str
    family_spec: TeacherFamily
    force_zeros_for_empty_prompt: bool = False
    name: str = ""  # the folder or Hub id as the user gave it (``path`` is the resolved local folder)

    @property
    def family(self) -> str:
        """The family's name ("sd", "sdxl"), as distill_config.json, checkpoints and pairs.json record it."""
        return self.family_spec.name


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
    from .families import detect_family  # families.py builds on this module's conditioners

    family = detect_family(folder, index, path)
    info = TeacherInfo(str(folder), family, family.force_zeros(index), name=str(path))
    for component in (family.network_subfolder, "vae", *family.text_encoders):
        _check_weight_files(folder / component)
    return info


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
    """Tokenizers and frozen text encoders of a teacher, turning prompts into :class:`Cond`.

    ``TextConditioner(info, ...)`` builds the conditioner class of ``info``'s family (as ``pathlib.Path(...)``
    builds a ``PosixPath``); each subclass says how its family's encoder outputs become a Cond.
    """

    encoder_classes: tuple[str, ...] = ()  # transformers classes of the family's text encoders, in order
    output_hidden_states = False  # whether encode reads intermediate hidden states
    truncation_warned = False  # the over-long caption warning is logged once per conditioner (one per run)

    def __new__(cls, info: TeacherInfo | None = None, *args, **kwargs):
        if cls is TextConditioner and info is not None:
            cls = info.family_spec.conditioner
        return super().__new__(cls)

    def __init__(self, info: TeacherInfo, resolution: int, dtype=torch.float32, revision: str | None = None):
        import transformers
        from transformers import AutoTokenizer

        self.info = info
        self.resolution = resolution
        self.tokenizers = [AutoTokenizer.from_pretrained(info.path, subfolder=n, revision=revision)
                           for n in info.family_spec.tokenizers]
        self.text_encoders = [
            getattr(transformers, cls).from_pretrained(info.path, subfolder=name, revision=revision, torch_dtype=dtype)
            .requires_grad_(False).eval()
            for cls, name in zip(self.encoder_classes, info.family_spec.text_encoders, strict=True)
        ]

    def to(self, device) -> "TextConditioner":
        """Move the text encoders to ``device``."""
        for encoder in self.text_encoders:
            encoder.to(device)
        return self

    @property
    def device(self):
        return self.text_encoders[0].device

    def encode(self, prompts: list[str], original_size=None, crop_top_left=None) -> Cond:
        """The condition of each prompt (``original_size``/``crop_top_left``: per-image sizes, where the family
        conditions on them)."""
        raise NotImplementedError

    def empty_prompt(self) -> Cond:
        """The condition of the empty prompt, for one sample."""
        return self.encode([""])

    def unconditional(self, batch_size: int) -> Cond:
        """The CFG 'empty prompt' condition, repeated ``batch_size`` times."""
        return self.empty_prompt().map(lambda t: t.expand(batch_size, *t.shape[1:]).clone())

    @classmethod
    def config_problems(cls, network: dict, encoders: dict[str, dict]) -> list[str]:
        """What in the network's config does not fit this conditioner's output (the text embeddings' width), given
        the text encoders' configs by component name; an empty list when they fit."""
        widths = [e.get("hidden_size") for e in encoders.values()]
        cross = network.get("cross_attention_dim")
        if not all(isinstance(w, int) for w in widths) or cross is None:
            return []
        width = sum(widths)
        if all(c == width for c in (cross if isinstance(cross, (list, tuple)) else [cross])):
            return []
        sources = " + ".join(f"{name} hidden_size {w}" for name, w in zip(encoders, widths))
        return [f"the UNet cross-attends to {cross}-wide text embeddings (cross_attention_dim) but the text encoders "
                f"give {width} ({sources})"]

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
        return encoder(ids.to(encoder.device), output_hidden_states=self.output_hidden_states)


class SDTextConditioner(TextConditioner):
    """SD 1.x/2.x: the last hidden state of one CLIP text encoder (Rombach et al. 2022, sec. 3.3)."""

    encoder_classes = ("CLIPTextModel",)

    @torch.no_grad()
    def encode(self, prompts: list[str], original_size=None, crop_top_left=None) -> Cond:
        """The text encoder's last hidden state per prompt (image sizes are not conditioned on)."""
        return Cond(self._hidden_states(0, prompts).last_hidden_state)


class SDXLTextConditioner(TextConditioner):
    """SDXL: penultimate states of two CLIP encoders, the second one's pooled projection and six micro-conditioning
    time ids (Podell et al. 2023, sec. 2.1-2.2)."""

    encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    output_hidden_states = True

    @torch.no_grad()
    def encode(self, prompts: list[str], original_size=None, crop_top_left=None) -> Cond:
        """Both encoders' penultimate states concatenated, the pooled projection and the time ids per prompt."""
        outputs = [self._hidden_states(i, prompts) for i in range(2)]
        prompt_embeds = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
        pooled = outputs[1].text_embeds
        return Cond(prompt_embeds, pooled, self.time_ids(len(prompts), original_size, crop_top_left))

    def empty_prompt(self) -> Cond:
        """The empty prompt's condition; zeros when the teacher sets force_zeros_for_empty_prompt (as SDXL does)."""
        empty = self.encode([""])
        if not self.info.force_zeros_for_empty_prompt:
            return empty
        return Cond(torch.zeros_like(empty.prompt_embeds), torch.zeros_like(empty.pooled_prompt_embeds),
                    empty.time_ids)

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

    @classmethod
    def config_problems(cls, network: dict, encoders: dict[str, dict]) -> list[str]:
        """The width check, plus: the UNet's added embedding must take the last encoder's pooled projection and
        six time ids (projection_class_embeddings_input_dim = projection_dim + 6 * addition_time_embed_dim)."""
        problems = super().config_problems(network, encoders)
        projection = list(encoders.values())[-1].get("projection_dim")
        time_dim = network.get("addition_time_embed_dim")
        added_in = network.get("projection_class_embeddings_input_dim")
        if None not in (projection, time_dim, added_in) and added_in != projection + 6 * time_dim:
            problems.append(f"the UNet's projection_class_embeddings_input_dim is {added_in}, but "
                            f"{list(encoders)[-1]}'s pooled projection ({projection}) and six time ids give "
                            f"{projection + 6 * time_dim}")
        return problems


def native_resolution(info: TeacherInfo) -> int:
    """The image size the teacher was trained at (its family reads it from the network and VAE configs)."""
    return info.family_spec.native_resolution(info.path)


def pipeline_class(info: TeacherInfo):
    """The stock diffusers pipeline class of the teacher's family."""
    return info.family_spec.pipeline_class()
