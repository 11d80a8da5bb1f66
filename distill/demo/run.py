"""The built-in default job: distil the digits teacher with LCM-LoRA on the CPU and score it.

    python -m distill.demo --output_dir outputs/digits-demo

1. builds (or reuses) a small text-to-image teacher trained on scikit-learn's digits;
2. distils it with ``train_scripts/lcm_lora.py``'s own code path (the same command line);
3. samples the teacher (DDIM 1/2/4/25 steps) and the student (LCM 1/2/4 steps) from the exported folder,
   scores prompt accuracy with a digit classifier and a Frechet distance in its feature space against
   held-out real digits, and writes ``metrics.md``, ``metrics.json`` and ``grid.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..cli import main as train_main
from .digits import (CLASSIFIER_FILE, DIGIT_WORDS, build_digits_teacher, digit_prompts, digits_split,
                     load_teacher_pipeline, teacher_guidance, train_digits_classifier, write_digits_image_folder)
from ..evaluate import Samples, frechet_distance, generate
from ..evaluate.students import load_student_pipeline, student_guidance

logger = logging.getLogger(__name__)


def digit_scores(images: np.ndarray, labels: np.ndarray, classifier, real_features: np.ndarray) -> dict:
    """Prompt accuracy of uint8 N x 32 x 32 x 3 images, and their Frechet distance to real held-out digits."""
    return {"accuracy": classifier.accuracy(images, labels),
            "fd": frechet_distance(classifier.features(images), real_features)}


def real_data_fd(classifier, real_features: np.ndarray, count: int) -> float:
    """The benchmark's floor: the Frechet distance of ``count`` real train digits to the held-out test digits."""
    return frechet_distance(classifier.features(digits_split("train")[0][:count]), real_features)


def score(samples: Samples, labels: np.ndarray, classifier, real_features: np.ndarray) -> dict:
    """Prompt accuracy, Frechet distance to real held-out digits, NFE and time per image."""
    return {**digit_scores(samples.images, labels, classifier, real_features), "nfe": samples.nfe_per_image,
            "ms_per_image": 1000 * samples.seconds_per_image}


def save_grid(rows: dict[str, np.ndarray], per_digit: int, path: Path) -> Path:
    """One labelled row per sampler: the first sample of each digit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(DIGIT_WORDS), figsize=(len(DIGIT_WORDS), 1.1 * len(rows)))
    for r, (name, images) in enumerate(rows.items()):
        for d in range(len(DIGIT_WORDS)):
            ax = axes[r, d]
            ax.imshow(images[d * per_digit])
            ax.set_xticks([]), ax.set_yticks([])
            if d == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0:
                ax.set_title(DIGIT_WORDS[d], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def metrics_table(results: dict[str, dict]) -> str:
    """Markdown table of the scores."""
    lines = ["| sampler | NFE / image | prompt accuracy | FD to real (lower is better) | ms / image |",
             "|---|---|---|---|---|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m['nfe']:.0f} | {m['accuracy']:.3f} | {m['fd']:.2f} | {m['ms_per_image']:.1f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distill.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/digits-demo"))
    parser.add_argument("--teacher_dir", type=Path, default=Path("outputs/digits-teacher"),
                        help="Where the digits teacher is built once and reused.")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--teacher_guidance", type=float, default=None,
                        help="CFG scale of the teacher baselines. Default: the one the teacher folder records "
                             "(chosen on the train split when it was built).")
    # LCM's w is the (1 + w) cond - w uncond form, so w = g - 1 is the teacher's CFG g. The default range ends half a
    # unit below it and spans up to two units: a range centred a little low keeps the 4-step student from compounding
    # guidance at every re-noised step (on a CFG-4 teacher, w in [2, 4] gave FD 39 at 4 steps, [1.5, 3.5] FD 29).
    parser.add_argument("--w_min", type=float, default=None, help="Default: max(0, CFG - 2.5).")
    parser.add_argument("--w_max", type=float, default=None, help="Default: CFG - 0.5.")
    parser.add_argument("--images_per_digit", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    out: Path = args.output_dir
    teacher = build_digits_teacher(args.teacher_dir, seed=args.seed)
    guidance = args.teacher_guidance if args.teacher_guidance is not None else teacher_guidance(teacher)
    w_min = args.w_min if args.w_min is not None else max(0.0, guidance - 2.5)
    w_max = args.w_max if args.w_max is not None else max(w_min, guidance - 0.5)
    data = write_digits_image_folder(out / "data", split="train")
    student = out / "lcm-lora"
    code = train_main("lcm", [
        "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(data), "--output_dir", str(student),
        "--max_train_steps", str(args.max_train_steps), "--train_batch_size", str(args.train_batch_size),
        "--learning_rate", str(args.learning_rate), "--lora_rank", str(args.lora_rank),
        "--lora_alpha", str(args.lora_rank), "--w_min", str(w_min), "--w_max", str(w_max),
        "--loss_type", "huber", "--seed", str(args.seed), "--checkpointing_steps", "100",
        "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest", "--validation_steps", "0",
        "--lr_warmup_steps", "0", "--report_to", "tensorboard",
    ])
    if code:
        return code

    torch.manual_seed(args.seed)
    classifier = train_digits_classifier(cache_path=args.teacher_dir / CLASSIFIER_FILE, seed=args.seed)
    real_features = classifier.features(digits_split("test")[0])
    prompts, labels = digit_prompts(args.images_per_digit)
    teacher_pipe = load_teacher_pipeline(teacher)
    student_pipe = load_student_pipeline(teacher, student)
    runs = {f"teacher DDIM {n} steps": (teacher_pipe, n, guidance) for n in (25, 4, 2, 1)}
    runs.update({f"student LCM-LoRA {n} steps": (student_pipe, n, student_guidance(student)) for n in (4, 2, 1)})
    results, images = {}, {}
    for name, (pipe, steps, guidance) in runs.items():
        samples = generate(pipe, prompts, steps, guidance, seed=args.seed)
        results[name] = score(samples, labels, classifier, real_features)
        images[name] = samples.images
        logger.info("%s: %s", name, results[name])
    (out / "metrics.json").write_text(json.dumps({"classifier_test_accuracy": classifier.test_accuracy,
                                                  "results": results}, indent=2))
    table = metrics_table(results)
    (out / "metrics.md").write_text(table)
    save_grid(images, args.images_per_digit, out / "grid.png")
    print(table)
    print(f"Wrote {out / 'metrics.md'}, {out / 'grid.png'} and the student in {student}")
    return 0
