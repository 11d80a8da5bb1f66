"""Sampling for evaluation: images from a pipeline with UNet evaluations (NFE) and wall time counted."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Samples:
    """Generated images (uint8 N x H x W x 3) with their cost."""

    images: np.ndarray
    nfe_per_image: float
    seconds_per_image: float


@contextlib.contextmanager
def count_unet_evaluations(unet: torch.nn.Module):
    """Count UNet evaluations as rows pushed through forward (a CFG step on a batch of one counts 2)."""
    counter = {"rows": 0}

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        counter["rows"] += sample.shape[0]

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@torch.no_grad()
def generate(pipe, prompts: list[str], num_inference_steps: int, guidance_scale: float, seed: int = 0,
             batch_size: int = 50, height: int | None = None, width: int | None = None) -> Samples:
    """Images for ``prompts`` in batches with a fixed seed; NFE per image and seconds per image measured."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    with count_unet_evaluations(pipe.unet) as counter:
        started = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            out = pipe(prompts[start: start + batch_size], num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, generator=generator, height=height, width=width,
                       output_type="np")
            chunks.append((np.clip(out.images, 0, 1) * 255).round().astype(np.uint8))
        elapsed = time.perf_counter() - started
    return Samples(np.concatenate(chunks), counter["rows"] / len(prompts), elapsed / len(prompts))


def _to_float_nchw(images: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float N x 3 x size x size (bilinear resize)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


def inception_model(weights: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """torchvision's Inception-v3 up to its 2048-d pool layer, the FID feature space (Heusel et al. 2017, sec. 4).

    ``weights``: a local state-dict file (for example torchvision's ImageNet Inception-v3 weights). Without it the
    network is randomly initialised, which is only useful for testing the code path offline. Figures from
    torchvision's weights are comparable with each other, not with the TF-Inception numbers papers report.
    """
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=False, init_weights=weights is None)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("AuxLogits")})
    model.fc = torch.nn.Identity()
    return model.eval().to(device)


@torch.no_grad()
def inception_features(images: np.ndarray, model: torch.nn.Module, batch_size: int = 50) -> np.ndarray:
    """Pool features of uint8 N x H x W x 3 images, resized to 299 and ImageNet-normalised."""
    device = next(model.parameters()).device
    x = _to_float_nchw(images, 299, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return torch.cat([model(chunk.to(device)).cpu() for chunk in x.split(batch_size)]).double().numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits (FID, Heusel et al. 2017, eq. 6).

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b (real and non-negative for
    two PSD matrices), which stays stable when the covariances are singular (fewer samples than features).
    """
    feats_a, feats_b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mean_a, mean_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(feats_a, rowvar=False)), np.atleast_2d(np.cov(feats_b, rowvar=False))
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def fid(real_images: np.ndarray, fake_images: np.ndarray, inception_weights: str | None = None,
        device: str = "cpu") -> float:
    """FID between two uint8 image sets in Inception-v3 feature space."""
    model = inception_model(inception_weights, device)
    return frechet_distance(inception_features(real_images, model), inception_features(fake_images, model))


def clip_model(model_name: str = "ViT-B-32", pretrained: str | None = None, device: str = "cpu"):
    """An open_clip model and its tokenizer; ``pretrained`` is a local checkpoint file (no download happens here)."""
    import open_clip

    model = open_clip.create_model(model_name, pretrained=pretrained, device=device).eval()
    return model, open_clip.get_tokenizer(model_name)


@torch.no_grad()
def clip_score(images: np.ndarray, prompts: list[str], model, tokenizer, batch_size: int = 50) -> float:
    """100 * mean max(cos(E_img, E_txt), 0) over image-prompt pairs (CLIPScore, Hessel et al. 2021, eq. 1)."""
    import open_clip

    device = next(model.parameters()).device
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    pixels = _to_float_nchw(images, size, mean, std)
    scores = []
    for start in range(0, len(prompts), batch_size):
        image_emb = model.encode_image(pixels[start: start + batch_size].to(device))
        text_emb = model.encode_text(tokenizer(prompts[start: start + batch_size]).to(device))
        cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
        scores.append(cos.clamp(min=0))
    return float(100 * torch.cat(scores).mean())
