"""Text conditioning: the :class:`Cond` methods pass around opaquely, and each teacher family's text conditioner.

SD conditions its UNet on one CLIP text encoder's last hidden state. SDXL concatenates the
penultimate hidden states of two encoders, adds the second encoder's pooled projection and six
"micro-conditioning" time ids (original size, crop top-left, target size) through
``added_cond_kwargs`` (Podell et al. 2023, SDXL, sec. 2.2). Which conditioner a teacher gets is decided by its
family (distill/families.py); methods only ever see :class:`Cond`.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .teacher import TeacherInfo

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
        """Keyword arguments for the network's forward, ``extra`` included. Pooled embeddings with micro-conditioning
        time ids go to a UNet's ``added_cond_kwargs`` (SDXL); without time ids, to a transformer's
        ``pooled_projections`` (SD3)."""
        kwargs: dict = {"encoder_hidden_states": self.prompt_embeds, **self.extra}
        if self.pooled_prompt_embeds is not None and self.time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids}
        elif self.pooled_prompt_embeds is not None:
            kwargs["pooled_projections"] = self.pooled_prompt_embeds
        return kwargs

    @property
    def guidance_embedded(self) -> bool:
        """Whether the network reads the guidance scale as an input (a guidance-distilled teacher: FLUX.1-dev)."""
        return "guidance" in self.extra

    def with_guidance(self, scale: torch.Tensor) -> "Cond":
        """The condition with guidance-scale input ``scale`` per sample."""
        return Cond(*self.tensors(), extra={**self.extra, "guidance": scale.to(self.prompt_embeds.device)})

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


class TextConditioner(abc.ABC):
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

    @contextlib.contextmanager
    def placed_on(self, device):
        """The text encoders on ``device`` for the block, then back where they were (the trainer moves them to the
        CPU once ``--cache_latents`` has stored every embedding: T5-XXL alone holds 8.9 GiB of GPU memory)."""
        previous = self.device
        self.to(device)
        try:
            yield self
        finally:
            self.to(previous)

    @abc.abstractmethod
    def encode(self, prompts: list[str], original_size=None, crop_top_left=None) -> Cond:
        """The condition of each prompt (``original_size``/``crop_top_left``: per-image sizes, where the family
        conditions on them)."""

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


class SD3TextConditioner(TextConditioner):
    """SD3 / SD3.5: two CLIP encoders' penultimate states, zero-padded to T5's width and followed along the sequence by
    T5's last states; the two pooled projections concatenated (Esser et al. 2024, sec. 5.2 and fig. 2)."""

    encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    output_hidden_states = True
    max_sequence_length = 256  # T5 tokens, the default of diffusers' StableDiffusion3Pipeline

    @torch.no_grad()
    def encode(self, prompts: list[str], original_size=None, crop_top_left=None) -> Cond:
        """The joint text sequence [CLIP-L | CLIP-G | 0 ; T5] and the pooled projections, as the SD3 pipeline
        builds them (image sizes are not conditioned on)."""
        clip = [self._hidden_states(i, prompts) for i in range(2)]
        clip_states = torch.cat([o.hidden_states[-2] for o in clip], dim=-1)
        t5_states = self._t5_states(prompts)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        pooled = torch.cat([o.text_embeds for o in clip], dim=-1)
        return Cond(torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2), pooled)

    def _t5_states(self, prompts: list[str]) -> torch.Tensor:
        """T5's last hidden states of the prompts, padded to ``max_sequence_length`` tokens."""
        tokenizer, encoder = self.tokenizers[2], self.text_encoders[2]
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(encoder.device))[0]

    @classmethod
    def config_problems(cls, network: dict, encoders: dict[str, dict]) -> list[str]:
        """The transformer must read T5-wide states (joint_attention_dim = T5's d_model) at least as wide as both CLIP
        states together, and the two pooled projections (pooled_projection_dim = the sum of their projection_dim)."""
        clip, t5 = list(encoders.values())[:2], list(encoders.values())[2]
        joint, pooled = network.get("joint_attention_dim"), network.get("pooled_projection_dim")
        width, projections = t5.get("d_model"), [e.get("projection_dim") for e in clip]
        problems = []
        if None not in (joint, width) and joint != width:
            problems.append(f"the transformer reads {joint}-wide text states (joint_attention_dim) but text_encoder_3 "
                            f"gives {width} (d_model)")
        if None not in (pooled, *projections) and pooled != sum(projections):
            problems.append(f"the transformer's pooled_projection_dim is {pooled}, but the two CLIP encoders' pooled "
                            f"projections give {sum(projections)}")
        return problems


class FluxTextConditioner(TextConditioner):
    """FLUX.1: T5's last hidden states as the text sequence and CLIP-L's pooled output (Black Forest Labs 2024, as
    diffusers' FluxPipeline encodes prompts); a guidance-distilled teacher (FLUX.1-dev, ``guidance_embeds``) also reads
    the guidance scale, which the condition carries as ``extra["guidance"]`` (1 unless a solver sets it)."""

    encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    max_sequence_length = 512  # T5 tokens, the default of diffusers' FluxPipeline

    def __init__(self, info: TeacherInfo, resolution: int, dtype=torch.float32, revision: str | None = None):
        from .teacher_files import component_config

        super().__init__(info, resolution, dtype, revision)
        network = component_config(Path(info.path), info.family_spec.network_subfolder, info.path)
        self.guidance_embeds = bool(network.get("guidance_embeds"))

    @torch.no_grad()
    def encode(self, prompts: list[str], original_size=None, crop_top_left=None) -> Cond:
        """T5 states, CLIP-L's pooled output and, for a guidance-distilled teacher, guidance 1 per prompt."""
        pooled = self._hidden_states(0, prompts).pooler_output
        tokenizer, encoder = self.tokenizers[1], self.text_encoders[1]
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        return_tensors="pt").input_ids
        states = encoder(ids.to(encoder.device))[0]
        extra = {"guidance": torch.ones(len(prompts), device=states.device)} if self.guidance_embeds else {}
        return Cond(states, pooled.to(states.dtype), extra=extra)

    @classmethod
    def config_problems(cls, network: dict, encoders: dict[str, dict]) -> list[str]:
        """The transformer must read T5-wide states (joint_attention_dim = T5's d_model) and CLIP-L's pooled output
        (pooled_projection_dim = its hidden_size)."""
        clip, t5 = list(encoders.values())
        pairs = [("joint_attention_dim", t5.get("d_model"), "text_encoder_2's d_model"),
                 ("pooled_projection_dim", clip.get("hidden_size"), "text_encoder's hidden_size")]
        return [f"the transformer's {key} is {network.get(key)} but {source} is {value}"
                for key, value, source in pairs if None not in (network.get(key), value) and network[key] != value]
