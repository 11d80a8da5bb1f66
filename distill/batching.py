"""Turning data-loader batches (images + captions, or cached latents + embeddings) into latent batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .conditioning import Cond, TextConditioner


@dataclass
class LatentBatch:
    """A training batch in latent space: prompt and empty-prompt conditions, with what the data kind provides.

    ``latents``: clean latents (``images`` and ``pairs`` data; None for ``prompts``).
    ``noise``: the initial noise coupled to ``latents`` (``pairs`` data only).
    """

    latents: torch.Tensor | None
    cond: Cond
    uncond: Cond
    noise: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.cond.prompt_embeds.shape[0]


class BatchEncoder:
    """VAE-encodes images and text-encodes captions, then drops prompts with probability p for CFG."""

    def __init__(self, vae, conditioner: TextConditioner, proportion_empty_prompts: float = 0.0,
                 vae_encode_batch_size: int = 8):
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts}")
        self.vae = vae
        self.conditioner = conditioner
        self.proportion_empty_prompts = proportion_empty_prompts
        self.vae_encode_batch_size = vae_encode_batch_size
        self._uncond: Cond | None = None

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """z = scaling_factor * (sample of the VAE posterior - shift_factor) (Rombach et al. 2022, sec. 3; SD3 and
        FLUX.1 VAEs set a shift_factor)."""
        chunks = []
        for chunk in pixel_values.split(self.vae_encode_batch_size):
            chunk = chunk.to(self.vae.device, self.vae.dtype)
            chunks.append(self.vae.encode(chunk).latent_dist.sample())
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (torch.cat(chunks).float() - shift) * self.vae.config.scaling_factor

    def encode_text(self, batch: dict) -> Cond:
        """The prompt condition of an image batch (SDXL also gets its micro-conditioning)."""
        return self.conditioner.encode(batch["caption"], batch.get("original_size"), batch.get("crop_top_left"))

    def uncond(self, batch_size: int) -> Cond:
        """The empty-prompt condition, computed once."""
        if self._uncond is None:
            self._uncond = self.conditioner.unconditional(1)
        return self._uncond.map(lambda t: t.expand(batch_size, *t.shape[1:]))

    def __call__(self, batch: dict, device) -> LatentBatch:
        """A LatentBatch on ``device`` from images + captions, cached latents + embeddings, captions only, or pairs."""
        if "pixel_values" in batch:
            latents = self.encode_images(batch["pixel_values"])
        else:
            latents = batch["latents"].float() if "latents" in batch else None
        if "prompt_embeds" in batch:
            extra = {key[len(EXTRA_PREFIX):]: value for key, value in batch.items() if key.startswith(EXTRA_PREFIX)}
            cond = Cond(batch["prompt_embeds"], batch.get("pooled_prompt_embeds"), batch.get("time_ids"), extra)
        else:
            cond = self.encode_text(batch)
        cond = cond.to(device, torch.float32)
        latents = None if latents is None else latents.to(device)
        noise = batch["noise"].float().to(device) if "noise" in batch else None
        batch_size = cond.prompt_embeds.shape[0]
        uncond = self.uncond(batch_size).to(device, torch.float32)
        if uncond.time_ids is not None:  # micro-conditioning describes the image, not the prompt
            uncond = Cond(uncond.prompt_embeds, uncond.pooled_prompt_embeds, cond.time_ids)
        if self.proportion_empty_prompts > 0:
            keep = torch.rand(batch_size) >= self.proportion_empty_prompts
            cond = cond.where(keep, uncond)
        return LatentBatch(latents, cond, uncond, noise)


EXTRA_PREFIX = "extra."  # cached Cond.extra inputs (FLUX.1-dev's guidance) are stored as "extra.<name>"


class CachedLatents(torch.utils.data.Dataset):
    """Latents and text embeddings of a whole dataset, computed once and stored as safetensors."""

    KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "time_ids")

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["latents"])

    def __getitem__(self, index: int) -> dict:
        return {k: v[index] for k, v in self.tensors.items()}

    @classmethod
    def build(cls, dataset, collate_fn, encoder: BatchEncoder, path: Path, batch_size: int = 8,
              show_progress: bool = True) -> "CachedLatents":
        """Encode ``dataset`` once (or load the file at ``path`` if it exists)."""
        from safetensors.torch import load_file, save_file

        if path.is_file():
            return cls(load_file(path))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in tqdm(loader, desc="Caching latents and text embeddings", disable=not show_progress):
            cond = encoder.encode_text(batch)
            values = dict(zip(cls.KEYS, (encoder.encode_images(batch["pixel_values"]), *cond.tensors())))
            values.update({EXTRA_PREFIX + name: value for name, value in cond.extra.items()})
            for key, value in values.items():
                if value is not None:
                    parts.setdefault(key, []).append(value.float().cpu())
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file(tensors, partial)
        partial.replace(path)
        return cls(tensors)
