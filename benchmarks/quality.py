"""Quality versus NFE on the digits benchmark: the teacher's samplers at 1-50 steps against distilled students.

    .venv/bin/python -m distill.demo --output_dir outputs/digits-demo          # trains the LCM-LoRA student
    .venv/bin/python benchmarks/quality.py --student lcm=outputs/digits-demo/lcm-lora \
        --out benchmarks/results/digits

The flow-matching benchmark is the same with the digits teacher in Stable Diffusion 3 format (built on first use):

    .venv/bin/python benchmarks/quality.py --teacher_family sd3 --teacher_dir outputs/digits-sd3-teacher \
        --student lcm=<a run of train_scripts/lcm_lora.py on that teacher> --out benchmarks/results/digits-sd3

Scores (see distill/demo/run.py): prompt accuracy of a digit classifier trained on the train split only, and the
Frechet distance in that classifier's feature space to the held-out test digits; NFE counted on the UNet, wall
time per image. Writes quality.md (table and targets) and quality_vs_nfe.png. Students alone beside one teacher
sampler, resumable and on several GPUs: ``python -m distill.evaluate --preset digits`` (the same scores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from distill.demo import (digit_prompts, load_student_pipeline, load_teacher_pipeline, metrics_table, real_data_fd,
                          score, student_guidance)
from distill.demo.digits import (CLASSIFIER_FILE, TEACHER_FAMILIES, build_digits_teacher, digits_split,
                                 teacher_family, teacher_guidance, train_digits_classifier)
from distill.evaluate import generate
from distill.pair_generation import dpm_solver_scheduler
from distill.evaluate.presets import ACCURACY, FD
from distill.evaluate.report import plot_quality_vs_nfe

# Per teacher family: the reference sampler (the first-order solver the targets compare with), its full step count,
# and the teacher step counts scored by default.
REFERENCE_SAMPLER = {"sd": "DDIM", "sd3": "Euler"}
REFERENCE_STEPS = {"sd": 25, "sd3": 28}
TEACHER_STEPS = {"sd": (1, 2, 4, 8, 25, 50), "sd3": (1, 2, 4, 8, 28)}
STUDENT_STEPS = (1, 2, 4)


def teacher_runs(teacher: Path, guidance: float, steps) -> dict:
    """The teacher's first-order sampler (DDIM with trailing spacing; on a flow teacher its own Euler scheduler) and
    DPM-Solver++ (2M; on a flow teacher on its shifted flow sigmas) at each step count."""
    family = teacher_family(teacher)
    first_order = load_teacher_pipeline(teacher)
    dpm = load_teacher_pipeline(teacher)
    dpm.scheduler = dpm_solver_scheduler(first_order.scheduler.config, flow_matching=family == "sd3")
    name = f"teacher {REFERENCE_SAMPLER[family]}"
    runs = {f"{name} {n}": (name, first_order, n, guidance) for n in steps}
    runs.update({f"teacher DPM-Solver++ {n}": ("teacher DPM-Solver++", dpm, n, guidance) for n in steps})
    return runs


def targets(results: dict, method: str, family: str = "sd") -> list[str]:
    """The benchmark's pass/fail targets for one student: at 4 NFE FD within 5% of the teacher's full-step reference
    sampler and accuracy not lower; at 1 NFE FD at least 40% below the teacher's 1-step reference sampler."""
    sampler, full = REFERENCE_SAMPLER[family], REFERENCE_STEPS[family]
    reference, one_step_name = f"teacher {sampler} {full}", f"teacher {sampler} 1"
    if reference not in results or one_step_name not in results:
        return [f"- {method}: targets not evaluated (they need the teacher's {sampler} 1 and {full} in "
                "--teacher_steps)"]
    ref, one_step = results[reference], results[one_step_name]
    lines = []
    four = results.get(f"{method} 4")
    if four:
        ok = four["fd"] <= 1.05 * ref["fd"] and four["accuracy"] >= ref["accuracy"]
        lines.append(f"- {method} at 4 NFE: FD {four['fd']:.2f} vs teacher {sampler}-{full} {ref['fd']:.2f} (target "
                     f"<= {1.05 * ref['fd']:.2f}), accuracy {four['accuracy']:.3f} vs {ref['accuracy']:.3f}: "
                     f"{'met' if ok else 'NOT met'}")
    one = results.get(f"{method} 1")
    if one:
        ok = one["fd"] <= 0.6 * one_step["fd"]
        lines.append(f"- {method} at 1 NFE: FD {one['fd']:.2f} vs teacher {sampler}-1 {one_step['fd']:.2f} (target "
                     f"<= {0.6 * one_step['fd']:.2f}): {'met' if ok else 'NOT met'}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_dir", type=Path, default=Path("outputs/digits-teacher"))
    parser.add_argument("--teacher_family", choices=TEACHER_FAMILIES, default=None,
                        help="The digits teacher to build: sd (a UNet, DDPM) or sd3 (an MMDiT in Stable Diffusion 3 "
                             "format, flow matching). Default: the family of the teacher in --teacher_dir, else sd.")
    parser.add_argument("--student", action="append", default=[], metavar="NAME=OUTPUT_DIR",
                        help="A distilled student to score (repeatable): a training run's output_dir, loaded from "
                             "its pipeline folder, e.g. lcm=outputs/digits-demo/lcm-lora.")
    parser.add_argument("--teacher_guidance", type=float, default=None,
                        help="CFG scale of the teacher rows. Default: the one the teacher folder records (chosen "
                             "on the train split when it was built).")
    parser.add_argument("--images_per_digit", type=int, default=30)
    parser.add_argument("--teacher_steps", default=None,
                        help="Teacher step counts to score, comma-separated (default: 1,2,4,8,25,50 on an sd "
                             "teacher, 1,2,4,8,28 on an sd3 one); pass an empty string to score students only "
                             "(the targets then need the teacher's figures from an earlier run).")
    parser.add_argument("--student_steps", default=",".join(map(str, STUDENT_STEPS)),
                        help="Student step counts to score, comma-separated.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits"))
    args = parser.parse_args(argv)

    teacher = build_digits_teacher(args.teacher_dir, seed=args.seed,
                                   family=args.teacher_family or teacher_family(args.teacher_dir))
    kind = teacher_family(teacher)
    if args.teacher_steps is None:
        args.teacher_steps = ",".join(map(str, TEACHER_STEPS[kind]))
    if args.teacher_guidance is None:
        args.teacher_guidance = teacher_guidance(teacher)
    classifier = train_digits_classifier(cache_path=args.teacher_dir / CLASSIFIER_FILE, seed=args.seed)
    real_features = classifier.features(digits_split("test")[0])
    prompts, labels = digit_prompts(args.images_per_digit)
    runs = teacher_runs(teacher, args.teacher_guidance, _step_counts(args.teacher_steps))
    for spec in args.student:
        name, folder = spec.split("=", 1)
        student = load_student_pipeline(teacher, Path(folder))
        runs.update({f"{name} {n}": (name, student, n, student_guidance(Path(folder)))
                     for n in _step_counts(args.student_steps)})

    results, families = {}, {}
    for run, (label, pipe, steps, guidance) in runs.items():
        try:
            samples = generate(pipe, prompts, steps, guidance, seed=args.seed)
        except ValueError as error:  # e.g. a K-step UFOGen scheduler asked for more than K steps
            print(f"{run}: skipped, the student's scheduler refuses {steps} steps ({error})", flush=True)
            continue
        results[run] = score(samples, labels, classifier, real_features)
        families[run] = label
        print(run, results[run], flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=2))
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(args, command, kind, results, families, classifier, real_features, len(prompts))
    print((args.out / "quality.md").read_text())
    return 0


def write_report(args, command: str, kind: str, results: dict, families: dict, classifier, real_features,
                 images: int) -> None:
    """quality.md (the table and each student's targets) and quality_vs_nfe.png in args.out."""
    floor = real_data_fd(classifier, real_features, images)
    lines = [f"Command: `{command}` on {torch.get_num_threads()} CPU threads.\n",
             f"Digits benchmark: {args.images_per_digit} images per digit, teacher CFG {args.teacher_guidance}, "
             f"classifier test accuracy {classifier.test_accuracy:.3f}; FD of {images} real train digits to "
             f"the test digits (the floor): {floor:.2f}.\n",
             metrics_table(results)]
    for spec in args.student:
        lines += targets(results, spec.split("=", 1)[0], kind)
    (args.out / "quality.md").write_text("\n".join(lines) + "\n")
    plot_quality_vs_nfe(results, families, (FD, ACCURACY), args.out / "quality_vs_nfe.png",
                        references={FD.key: (floor, "real train digits (floor)")})


def _step_counts(text: str) -> list[int]:
    """Comma-separated step counts ("" = none)."""
    return [int(s) for s in text.split(",") if s.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
