"""``python -m distill.evaluate`` (console script ``distill-eval``): students at 1, 2, 4 steps beside their teacher.

    python -m distill.evaluate --student lcm=outputs/lcm-sd15 --teacher runwayml/stable-diffusion-v1-5 \\
        --prompts_file coco_30k_captions.txt --reference_dir coco_val2014_resized \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth \\
        --clip_weights open_clip_ViT-B-32.bin --num_samples 5000 --output_dir outputs/eval-lcm

For each sampler (the teacher at --teacher_steps with CFG, each student at each of --student_steps with the
guidance it was exported with) the images are written to <output_dir>/images/<sampler>/<i>.png as they are made
(image i: prompt i, seed --seed + i); a rerun skips the images already there. Then: NFE per image (UNet rows
counted), FID against --reference_dir, CLIP score, latency per image at batch 1, throughput at --batch_size and
peak memory, written to <output_dir>/results.json and results.md.

FID uses the standard FID Inception (the TF graph of 2015-12-05, through torch-fidelity), from a local file:
    wget https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
(pytorch-fid's pt_inception-2015-12-05-6726825d.pth loads too). CLIP score uses open_clip with a local checkpoint
of --clip_model (--clip_weights); without one the CLIP score is skipped.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DistillError
from .generation import generate_to_folder, image_path, measure_speed
from .image_files import LazyImages, image_files
from .students import (DEFAULT_TEACHER_GUIDANCE, exported_guidance, load_student_pipeline, load_teacher_pipeline,
                       recorded_teacher, recorded_teacher_guidance, student_layout)

logger = logging.getLogger(__name__)

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
IMAGES_SUBFOLDER = "images"
TEACHER = "teacher"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distill.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", action="append", default=[], metavar="NAME=FOLDER",
                        help="A student to evaluate (repeatable): a training run's output_dir with an exported "
                             "pipeline/ (or a pipeline folder), or a LoRA / fine-tuned unet/ folder with --teacher.")
    parser.add_argument("--teacher", default=None,
                        help="The teacher (folder or Hub id): the baseline row, and the base of LoRA students. "
                             "Default: the teacher the first student records in its distill_config.json.")
    parser.add_argument("--teacher_steps", type=int, default=25, help="Sampling steps of the teacher baseline.")
    parser.add_argument("--teacher_guidance", type=float, default=None,
                        help="CFG scale of the teacher baseline. Default: the teacher guidance the first student "
                             f"records in its distill_config.json, else {DEFAULT_TEACHER_GUIDANCE}.")
    parser.add_argument("--teacher_scheduler", default=None,
                        help="A diffusers scheduler class for the teacher (e.g. DDIMScheduler), built from its "
                             "scheduler config. Default: the scheduler the teacher ships with.")
    parser.add_argument("--student_steps", default="1,2,4",
                        help="Comma-separated step counts to sample each student at; counts its scheduler refuses "
                             "are skipped with a message.")
    parser.add_argument("--prompts_file", default=None, help="A .txt file of prompts, one per line.")
    parser.add_argument("--dataset_name", default=None,
                        help="Instead of --prompts_file: a dataset whose --caption_column holds the prompts (a "
                             "folder saved with save_to_disk, a .csv/.json/.parquet file, an image folder with "
                             "metadata.jsonl, or a Hub name).")
    parser.add_argument("--caption_column", default="text", help="The prompt column of --dataset_name.")
    parser.add_argument("--reference_dir", default=None,
                        help="Folder of real images (sub-folders included) FID compares each sampler with. "
                             "Without it FID is skipped.")
    parser.add_argument("--inception_weights", default=None,
                        help="Local file of the FID Inception weights (weights-inception-2015-12-05-6726825d.pth "
                             "from torch-fidelity's releases, or pytorch-fid's pt_inception-2015-12-05-6726825d.pth); "
                             "needed with --reference_dir.")
    parser.add_argument("--clip_model", default="ViT-B-32", help="open_clip model name for the CLIP score.")
    parser.add_argument("--clip_weights", default=None,
                        help="Local open_clip checkpoint of --clip_model. Without it the CLIP score is skipped.")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="Images per sampler (prompts are reused in order if there are fewer). Default: one "
                             "per prompt.")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="Images per pipeline call when generating, and the batch size throughput is timed at.")
    parser.add_argument("--seed", type=int, default=0, help="Image i is sampled with the seed --seed + i.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Height and width of the generated images. Default: each pipeline's own.")
    parser.add_argument("--output_dir", required=True, type=Path,
                        help="Where images/, results.json and results.md go; rerunning with it resumes.")
    parser.add_argument("--timing_repeats", type=int, default=3,
                        help="Timed pipeline calls per batch size (median reported, after one warm-up); 0 skips "
                             "the latency, throughput and memory columns.")
    parser.add_argument("--device", default=None, help="Where to sample and score. Default: cuda if available, else cpu.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="Weights dtype of the pipelines (the FID and CLIP networks stay float32).")
    return parser.parse_args(argv)


@dataclass
class Sampler:
    """One row: a pipeline at a step count and guidance scale."""

    name: str
    model: str
    steps: int
    guidance_scale: float
    row: dict = field(default_factory=dict)


def parse_students(values: list[str]) -> dict[str, Path]:
    """``NAME=FOLDER`` flags as {name: folder}, names unique and usable as folder names."""
    students: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not folder:
            raise DistillError(f"--student {value!r}: expected NAME=FOLDER, e.g. --student lcm=outputs/lcm-sd15.")
        if not NAME_PATTERN.match(name) or name == TEACHER:
            raise DistillError(f"--student {value!r}: the name {name!r} must be letters, digits, '.', '_' or '-' "
                               f"(and not {TEACHER!r}): it names the images folder.")
        if name in students:
            raise DistillError(f"--student {name} is given twice; give each student its own name.")
        student_layout(Path(folder))  # a missing folder or an unknown layout: one clear error before any work
        students[name] = Path(folder)
    return students


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DistillError(f"--student_steps {text!r}: expected comma-separated integers, e.g. 1,2,4.") from None
    if not steps or min(steps) < 1:
        raise DistillError(f"--student_steps {text!r}: expected positive step counts, e.g. 1,2,4.")
    return list(dict.fromkeys(steps))


def load_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompts_file or --dataset_name, repeated in order to --num_samples."""
    from ..data import build_prompt_dataset

    if bool(args.prompts_file) == bool(args.dataset_name):
        raise DistillError("Pass exactly one prompt source: --prompts_file (a .txt file, one prompt per line) or "
                           "--dataset_name with --caption_column.")
    if args.prompts_file and Path(args.prompts_file).suffix.lower() != ".txt":
        raise DistillError(f"--prompts_file {args.prompts_file} is not a .txt file: pass one prompt per line in a "
                           ".txt file, or a dataset with --dataset_name.")
    prompts = build_prompt_dataset(args.prompts_file or args.dataset_name, args.caption_column)
    count = len(prompts) if args.num_samples is None else args.num_samples
    if count < 1:
        raise DistillError(f"--num_samples must be at least 1, got {count}.")
    if count > len(prompts):
        logger.info("%d prompts for %d samples: reusing the prompts in order.", len(prompts), count)
    return [prompts[i % len(prompts)] for i in range(count)]


def check_inputs(args: argparse.Namespace) -> None:
    """Every path and number the command reads, before any model loads."""
    for flag, value in (("--batch_size", args.batch_size), ("--teacher_steps", args.teacher_steps)):
        if value < 1:
            raise DistillError(f"{flag} must be at least 1, got {value}.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise DistillError(f"--resolution must be a positive multiple of 8, got {args.resolution}.")
    if args.reference_dir is not None:
        image_files(args.reference_dir)
        if args.inception_weights is None:
            from .inception import HOW_TO_GET

            raise DistillError(f"--reference_dir asks for FID, which needs --inception_weights FILE. {HOW_TO_GET}")
    for flag, value in (("--inception_weights", args.inception_weights), ("--clip_weights", args.clip_weights)):
        if value is not None and not Path(value).expanduser().is_file():
            raise DistillError(f"{flag} {value} does not exist: pass a local weights file (see --help).")


def _accepts_steps(pipe, steps: int) -> str | None:
    """None if the pipeline's scheduler can sample with ``steps`` steps, else its reason."""
    try:
        copy.deepcopy(pipe.scheduler).set_timesteps(steps)
    except (ValueError, RuntimeError) as error:
        return " ".join(str(error).split())
    return None


def _placed(pipe, device: torch.device, dtype: torch.dtype):
    """``pipe`` on ``device``, cast only when a dtype other than the float32 it loads in is asked for."""
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _release(pipe) -> None:
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Evaluation:
    """One run of the command: samplers generated and timed, then scored."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.output_dir
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[args.dtype]
        self.size = args.resolution
        self.samplers: list[Sampler] = []
        self.notes: list[str] = []

    def run_sampler(self, pipe, sampler: Sampler, prompts: list[str]) -> None:
        """Generate the missing images of ``sampler``, then time it."""
        args = self.args
        result = generate_to_folder(pipe, prompts, self.out / IMAGES_SUBFOLDER / sampler.name, sampler.steps,
                                    sampler.guidance_scale, seed=args.seed, batch_size=args.batch_size,
                                    height=self.size, width=self.size, desc=sampler.name)
        logger.info("%s: generated %d new images (%d were on disk), NFE per image %s", sampler.name,
                    result.generated, result.total - result.generated, result.nfe_per_image)
        sampler.row.update(generated=result.generated, images=result.total, nfe_per_image=result.nfe_per_image,
                           image_dir=str(Path(IMAGES_SUBFOLDER) / sampler.name))
        if args.timing_repeats > 0:
            speed = measure_speed(pipe, prompts[0], sampler.steps, sampler.guidance_scale, args.batch_size,
                                  height=self.size, width=self.size, repeats=args.timing_repeats)
            sampler.row.update(latency_ms=speed.latency_ms, throughput=speed.throughput,
                               peak_memory_mib=speed.peak_memory_mib, memory=speed.memory)
        self.samplers.append(sampler)

    def generate(self, students: dict[str, Path], teacher: str, teacher_guidance: float, prompts: list[str]) -> None:
        args = self.args
        pipe = _placed(load_teacher_pipeline(teacher, args.teacher_scheduler), self.device, self.dtype)
        self.run_sampler(pipe, Sampler(TEACHER, str(teacher), args.teacher_steps, teacher_guidance), prompts)
        _release(pipe)
        for name, folder in students.items():
            pipe = _placed(load_student_pipeline(teacher, folder), self.device, self.dtype)
            guidance = exported_guidance(folder, pipe)
            for steps in parse_steps(args.student_steps):
                if (reason := _accepts_steps(pipe, steps)) is not None:
                    note = f"{name} skipped at {steps} steps: its scheduler refuses it ({reason})"
                    logger.warning(note)
                    self.notes.append(note)
                    continue
                self.run_sampler(pipe, Sampler(f"{name}-{steps}step", name, steps, guidance), prompts)
            _release(pipe)

    def sampler_images(self, sampler: Sampler, count: int) -> LazyImages:
        return LazyImages([image_path(self.out / IMAGES_SUBFOLDER / sampler.name, i) for i in range(count)])

    def score_fid(self, count: int) -> None:
        from .inception import inception_features, inception_model
        from .metrics import frechet_distance

        args = self.args
        if args.reference_dir is None:
            self.notes.append("FID skipped: no --reference_dir.")
            return
        references = image_files(args.reference_dir)
        if count < 2 or len(references) < 2:
            self.notes.append("FID skipped: it needs at least 2 generated and 2 reference images.")
            return
        model = inception_model(args.inception_weights, self.device)
        logger.info("FID: Inception features of %d reference images", len(references))
        real = inception_features(LazyImages(references), model, args.batch_size)
        for sampler in self.samplers:
            fake = inception_features(self.sampler_images(sampler, count), model, args.batch_size)
            sampler.row["fid"] = frechet_distance(real, fake)
        self.notes.append(f"FID: {count} images per sampler against {len(references)} reference images in "
                          "the FID Inception's pool3 space (torch-fidelity); FID is biased upward at small sample "
                          "counts, so compare rows at equal counts.")
        _release(model)

    def score_clip(self, prompts: list[str]) -> None:
        from .metrics import clip_model, clip_score

        args = self.args
        if args.clip_weights is None:
            self.notes.append("CLIP score skipped: no --clip_weights.")
            return
        model, tokenizer = clip_model(args.clip_model, args.clip_weights, str(self.device))
        for sampler in self.samplers:
            sampler.row["clip_score"] = clip_score(self.sampler_images(sampler, len(prompts)), prompts, model,
                                                   tokenizer, args.batch_size)
        self.notes.append(f"CLIP score: open_clip {args.clip_model}, 100 * mean max(cos, 0) of image and prompt.")
        _release(model)

    def rows(self) -> list[dict]:
        teacher_nfe = next(s.row["nfe_per_image"] for s in self.samplers if s.name == TEACHER)
        rows = []
        for s in self.samplers:
            nfe = s.row["nfe_per_image"]
            ratio = teacher_nfe / nfe if teacher_nfe and nfe else None
            rows.append({"sampler": s.name, "model": s.model, "steps": s.steps, "guidance_scale": s.guidance_scale,
                         "nfe_per_image": nfe, "compute_vs_teacher": ratio, "fid": s.row.get("fid"),
                         "clip_score": s.row.get("clip_score"), "latency_ms": s.row.get("latency_ms"),
                         "throughput": s.row.get("throughput"), "peak_memory_mib": s.row.get("peak_memory_mib"),
                         "memory": s.row.get("memory"), "generated": s.row["generated"], "images": s.row["images"],
                         "image_dir": s.row["image_dir"]})
        return rows


def _cell(value, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def results_markdown(results: dict) -> str:
    """The results as a markdown table (one row per sampler) with the run's notes below it."""
    rows, settings = results["rows"], results["settings"]
    memory = next((r["memory"] for r in rows if r.get("memory")), "peak memory")
    lines = [f"| sampler | steps | guidance | NFE / image | compute vs teacher | FID | CLIP score | "
             f"latency (ms / image, batch 1) | throughput (images / s, batch {settings['batch_size']}) | "
             f"{memory} (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['guidance_scale']:g} | {_cell(r['nfe_per_image'], 1)} | "
                     f"{_cell(r['compute_vs_teacher'], 1, 'x')} | {_cell(r['fid'])} | {_cell(r['clip_score'])} | "
                     f"{_cell(r['latency_ms'], 1)} | {_cell(r['throughput'])} | {_cell(r['peak_memory_mib'], 0)} |")
    notes = [f"- {note}" for note in results["notes"]]
    notes.append("- compute vs teacher: the teacher's NFE per image divided by the sampler's.")
    return "\n".join(lines + [""] + notes) + "\n"


def evaluate(args: argparse.Namespace) -> dict:
    """The command's work; returns what results.json holds."""
    check_inputs(args)
    students = parse_students(args.student)
    parse_steps(args.student_steps)
    prompts = load_prompts(args)
    teacher = args.teacher or next((t for f in students.values() if (t := recorded_teacher(f))), None)
    if teacher is None:
        raise DistillError("No teacher: pass --teacher (the baseline, and the base of LoRA students).")
    guidance = args.teacher_guidance
    if guidance is None:
        recorded = [g for f in students.values() if (g := recorded_teacher_guidance(f)) is not None]
        guidance = recorded[0] if recorded else DEFAULT_TEACHER_GUIDANCE
        if len(set(recorded)) > 1:
            logger.warning("The students record different teacher guidance scales %s; the teacher row uses %s "
                           "(set --teacher_guidance to choose).", sorted(set(recorded)), guidance)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    run = Evaluation(args)
    run.generate(students, teacher, guidance, prompts)
    run.score_fid(len(prompts))
    run.score_clip(prompts)
    results = {
        "settings": {"teacher": str(teacher), "teacher_steps": args.teacher_steps, "teacher_guidance": guidance,
                     "teacher_scheduler": args.teacher_scheduler,
                     "students": {name: str(folder) for name, folder in students.items()},
                     "num_samples": len(prompts), "batch_size": args.batch_size, "seed": args.seed,
                     "resolution": args.resolution, "reference_dir": args.reference_dir,
                     "inception_weights": args.inception_weights, "clip_model": args.clip_model,
                     "clip_weights": args.clip_weights, "device": str(run.device), "dtype": args.dtype,
                     "timing_repeats": args.timing_repeats},
        "rows": run.rows(),
        "notes": run.notes,
    }
    (args.output_dir / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    (args.output_dir / RESULTS_MD).write_text(results_markdown(results))
    logger.info("Results: %s and %s", args.output_dir / RESULTS_JSON, args.output_dir / RESULTS_MD)
    print(results_markdown(results))
    return results


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    try:
        evaluate(args)
    except DistillError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.stderr.flush()
        return 2
    return 0
