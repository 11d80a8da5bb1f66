"""``--preset digits``: the digits benchmark of ``distill.demo`` as a preset of ``python -m distill.evaluate``.

The teacher is the digits teacher folder (built with ``distill.demo.digits.build_digits_teacher`` if the folder holds
no pipeline; an existing one is used as it is), sampled with DDIM (trailing spacing) at the CFG scale the folder records (chosen on the train split when it
was built), as the benchmark does.
The prompts are the ten digit captions, zero to nine repeated (image i shows digit i % 10, so the first images of a
grid span the digits); the reference set is the held-out test split; and the metrics are those of the digit
classifier (trained on the train split only, cached beside the teacher): the Frechet distance in its 64-d features
in place of FID's Inception, and prompt accuracy in place of the CLIP score. The real-data floor, the same distance
for as many real train digits, is reported beside them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..demo.digits import (CLASSIFIER_FILE, DIGIT_WORDS, IMAGE_SIZE, build_digits_teacher, digits_split,
                           teacher_guidance, train_digits_classifier)
from ..demo.run import digit_prompts, digit_scores, load_teacher_pipeline, real_data_fd
from ..errors import DistillError
from .report import Metric

DIGITS = "digits"
PRESETS = (DIGITS,)
DIGITS_TEACHER = Path("outputs/digits-teacher")
DIGITS_SAMPLES = 300  # 30 per digit, as benchmarks/quality.py scores
FD = Metric("fd", "FD (digit classifier)", "Frechet distance to real test digits (lower is better)")
ACCURACY = Metric("accuracy", "prompt accuracy", "prompt accuracy (digit classifier)", decimals=3)


@dataclass
class DigitsPreset:
    """The digits benchmark's teacher, prompts, labels and scoring."""

    teacher: Path
    prompts: list[str]
    labels: np.ndarray
    metrics = (FD, ACCURACY)
    resolution = IMAGE_SIZE
    teacher_scheduler = "DDIMScheduler (trailing spacing)"

    @classmethod
    def create(cls, teacher: str | os.PathLike | None, num_samples: int | None, state) -> DigitsPreset:
        """The preset for ``num_samples`` images per sampler; the main process builds a missing teacher."""
        count = DIGITS_SAMPLES if num_samples is None else num_samples
        if count < len(DIGIT_WORDS) or count % len(DIGIT_WORDS):
            raise DistillError(f"--preset {DIGITS} samples every digit equally: --num_samples must be a positive "
                               f"multiple of {len(DIGIT_WORDS)}, got {count}.")
        folder = Path(teacher) if teacher is not None else DIGITS_TEACHER
        if state.is_main_process and not (folder / "model_index.json").is_file():
            build_digits_teacher(folder)
        state.wait_for_everyone()
        prompts, labels = digit_prompts(count // len(DIGIT_WORDS), interleaved=True)
        return cls(folder, prompts, labels)

    @property
    def teacher_guidance(self) -> float:
        """The CFG scale the teacher folder records (chosen on the train split when it was built)."""
        return teacher_guidance(self.teacher)

    def load_teacher(self):
        """The teacher pipeline with the benchmark's DDIM scheduler."""
        return load_teacher_pipeline(self.teacher)

    def score(self, images: dict[str, np.ndarray]) -> tuple[dict[str, dict], dict, list[str]]:
        """FD and accuracy of each sampler's images, the real-data row, and notes on both."""
        classifier = train_digits_classifier(cache_path=self.teacher / CLASSIFIER_FILE)
        test_images = digits_split("test")[0]
        real = classifier.features(test_images)
        scores = {name: digit_scores(sampled, self.labels, classifier, real) for name, sampled in images.items()}
        floor_count = min(len(self.prompts), len(digits_split("train")[0]))
        real_row = {"sampler": "real digits", "fd": real_data_fd(classifier, real, floor_count),
                    "accuracy": classifier.test_accuracy, "fd_images": floor_count}
        notes = [f"FD: Frechet distance to the {len(test_images)} held-out test digits in the digit classifier's "
                 f"64-d features; the real-digits row is the floor: {floor_count} real train digits against the "
                 "same test digits.",
                 f"prompt accuracy: the fraction of images the classifier (test accuracy "
                 f"{classifier.test_accuracy:.3f}, the real-digits row) reads as the prompted digit."]
        return scores, real_row, notes
