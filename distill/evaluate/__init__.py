"""Evaluation: sampling with NFE counted, FID (the standard Inception through torch-fidelity), CLIP score
(open_clip), resumable generation to disk, and the ``python -m distill.evaluate`` command (see ``cli.py``)."""

from .metrics import clip_model, clip_score, feature_statistics, fid, frechet_distance, hps_score
from .inception import inception_features, inception_model
from .sampling import Samples, count_unet_evaluations, generate

__all__ = ["Samples", "clip_model", "clip_score", "count_unet_evaluations", "feature_statistics", "fid", "hps_score",
           "frechet_distance", "generate", "inception_features", "inception_model"]
