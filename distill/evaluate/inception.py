"""The FID feature network: the TensorFlow Inception graph of 2015-12-05 as torch-fidelity builds it in PyTorch.

FID (Heusel et al. 2017) is defined on the 2048-d pool3 features of that graph, fed images resized to 299 x 299
the way TensorFlow 1.x resized them. ``inception_model`` is torch-fidelity's ``FeatureExtractorInceptionV3``
(registered there as "inception-v3-compat"), the network torch-fidelity, pytorch-fid and clean-fid compute FID
with; torchvision's ImageNet Inception-v3 is a different network and gives numbers not comparable with papers.

The weights come from a local file; nothing here downloads. torch-fidelity's copy (about 95 MB):

    wget https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth

pytorch-fid's port of the same graph, ``pt_inception-2015-12-05-6726825d.pth``
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth), uses
the same parameter names and shapes (torchvision's Inception3 naming with a 1008-class ``fc``) and loads too.
Pass the file with ``--inception_weights``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import DistillError

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name of this network
FEATURE = "2048"  # the pool3 layer FID uses (torch-fidelity's default layer for "fid")
FEATURE_DIM = 2048
HOW_TO_GET = f"Download the FID Inception weights once (e.g. wget {WEIGHTS_URL}) and pass the file."


def inception_model(weights: str | os.PathLike | None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's FID Inception (pool3, 2048-d) with its weights read strictly from the local file ``weights``."""
    if weights is None:
        raise DistillError(f"FID needs the Inception weights: pass --inception_weights FILE. {HOW_TO_GET}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise DistillError(f"The Inception weights file {path} does not exist. {HOW_TO_GET}")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        model = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FEATURE], feature_extractor_weights_path=str(path))
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:  # not a torch file, or another network's weights (load_state_dict is strict)
        detail = " ".join(str(error).split())[:300]
        raise DistillError(f"{path} is not the FID Inception weights file ({type(error).__name__}: {detail}). "
                           f"{HOW_TO_GET}") from None
    return model.to(device)


def _same_size_batches(images: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive images of one size stacked into N x H x W x 3 batches of at most ``batch_size``."""
    batch: list[np.ndarray] = []
    for image in images:
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield np.stack(batch)


@torch.no_grad()
def inception_features(images: np.ndarray | Iterable[np.ndarray], model: torch.nn.Module,
                       batch_size: int = 50) -> np.ndarray:
    """float64 N x 2048 pool3 features of uint8 H x W x 3 images of any size (the network resizes them to 299)."""
    device = next(model.parameters()).device
    features = [model(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device))[0].cpu()
                for batch in _same_size_batches(images, batch_size)]
    return torch.cat(features).double().numpy() if features else np.zeros((0, FEATURE_DIM))
