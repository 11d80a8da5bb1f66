"""Image-set metrics: Frechet distance and FID (torch-fidelity), CLIP score and HPS v2 (open_clip)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DistillError
from .inception import inception_features, inception_model


def feature_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and covariance of N x D features, as torch-fidelity's ``fid_features_to_statistics`` computes them."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    features = np.ascontiguousarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise DistillError(f"A Frechet distance needs at least 2 feature vectors per set, got shape {features.shape}.")
    stats = fid_features_to_statistics(torch.from_numpy(features))
    return {"mu": stats["mu"], "sigma": np.atleast_2d(stats["sigma"])}


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits (FID, Heusel et al. 2017, eq. 6).

    torch-fidelity's ``fid_statistics_to_metric`` (TTUR's formula): Tr((S_a S_b)^(1/2)) is the sum of the square
    roots of the eigenvalues of S_a S_b, stable when the covariances are singular (fewer samples than features).
    Round-off below zero is reported as 0.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    value = fid_statistics_to_metric(feature_statistics(feats_a), feature_statistics(feats_b), verbose=False)
    return float(max(value[KEY_METRIC_FID], 0.0))


def fid(real_images: np.ndarray, fake_images: np.ndarray, inception_weights: str | os.PathLike | None = None,
        device: str = "cpu", batch_size: int = 50) -> float:
    """FID between two sets of uint8 H x W x 3 images in the FID Inception's pool3 space (weights: a local file)."""
    model = inception_model(inception_weights, device)
    return frechet_distance(inception_features(real_images, model, batch_size),
                            inception_features(fake_images, model, batch_size))


def clip_model(model_name: str = "ViT-B-32", pretrained: str | os.PathLike | None = None, device: str = "cpu"):
    """An open_clip model and its tokenizer; ``pretrained`` is a local checkpoint file (no download happens here)."""
    import open_clip

    if pretrained is not None and not Path(pretrained).expanduser().is_file():
        raise DistillError(f"The CLIP weights file {pretrained} does not exist. Pass a local open_clip checkpoint "
                           f"of {model_name} (for example open_clip_pytorch_model.bin of laion/CLIP-{model_name}-...).")
    if model_name not in open_clip.list_models():
        raise DistillError(f"open_clip has no model {model_name!r}. Pass one of open_clip.list_models(), "
                           "e.g. ViT-B-32 or ViT-L-14.")
    try:
        model = open_clip.create_model(model_name, pretrained=None if pretrained is None else str(pretrained),
                                       device=device)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:  # another architecture's weights, or not a checkpoint at all
        detail = " ".join(str(error).split())[:300]
        raise DistillError(f"Cannot load {pretrained} into open_clip's {model_name} ({type(error).__name__}: "
                           f"{detail}). Pass that model's checkpoint, or the --clip_model the file was made for.") from None
    return model.eval(), open_clip.get_tokenizer(model_name)


def clip_preprocess(model):
    """open_clip's evaluation transform for ``model`` (its own resize, centre crop and normalisation), on PIL images."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


@torch.no_grad()
def image_text_cosines(images: np.ndarray, prompts: list[str], model, tokenizer, batch_size: int = 50) -> torch.Tensor:
    """cos(E_img, E_txt) of each uint8 H x W x 3 image and its prompt, images preprocessed as open_clip does."""
    from PIL import Image

    device = next(model.parameters()).device
    preprocess = clip_preprocess(model)
    cosines = []
    for start in range(0, len(prompts), batch_size):
        pixels = torch.stack([preprocess(Image.fromarray(np.asarray(image)))
                              for image in images[start: start + batch_size]])
        image_emb = model.encode_image(pixels.to(device))
        text_emb = model.encode_text(tokenizer(prompts[start: start + batch_size]).to(device))
        cosines.append(torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1).float().cpu())
    return torch.cat(cosines)


def clip_score(images: np.ndarray, prompts: list[str], model, tokenizer, batch_size: int = 50) -> float:
    """100 * mean max(cos(E_img, E_txt), 0) over image-prompt pairs (CLIPScore, Hessel et al. 2021, eq. 1)."""
    return float(100 * image_text_cosines(images, prompts, model, tokenizer, batch_size).clamp(min=0).mean())


def hps_score(images: np.ndarray, prompts: list[str], model, tokenizer, batch_size: int = 50) -> float:
    """Mean HPS v2 (Wu et al. 2023, sec. 5): cos(E_img, E_txt) of a CLIP ViT-H-14 fine-tuned on human preferences."""
    return float(image_text_cosines(images, prompts, model, tokenizer, batch_size).mean())
