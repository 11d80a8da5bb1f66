"""``python -m distill.evaluate`` (console script ``distill-eval``): students at 1, 2, 4 steps beside their teacher.

    python -m distill.evaluate --student lcm=outputs/lcm-sd15 --teacher runwayml/stable-diffusion-v1-5 \\
        --prompts_file coco_30k_captions.txt --reference_dir coco_val2014_resized \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth \\
        --clip_weights open_clip_ViT-B-32.bin --num_samples 5000 --output_dir outputs/eval-lcm

For each sampler (the teacher at --teacher_steps with CFG, each student at each of --student_steps with the
guidance it was exported with) the images are written to <output_dir>/images/<sampler>/<i>.png as they are made
(image i: prompt i, seed --seed + i); a rerun skips the images already there. Then: NFE per image (UNet rows
counted), FID against --reference_dir, CLIP score, latency per image at batch 1, throughput at --batch_size and
peak memory, written to <output_dir>/results.json and results.md, with grid.png (the first --grid_size images of
every sampler, one row each) and quality_vs_nfe.png (each score against NFE per image).

Several GPUs: the same command under accelerate launch; each process makes its share of the batches and the main
process scores and writes the results:
    accelerate launch --config_file docs/accelerate_configs/multi_gpu.yaml --num_processes 8 -m distill.evaluate ...

The digits benchmark (distill.demo) is a preset: its teacher (outputs/digits-teacher, built if missing), prompts,
held-out real digits, and its digit classifier's Frechet distance and prompt accuracy in place of FID and CLIP score:
    python -m distill.evaluate --preset digits --student lcm=outputs/digits-demo/lcm-lora \\
        --output_dir outputs/eval-digits

FID uses the standard FID Inception (the TF graph of 2015-12-05, through torch-fidelity), from a local file:
    wget https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
(pytorch-fid's pt_inception-2015-12-05-6726825d.pth loads too). CLIP score uses open_clip with a local checkpoint
of --clip_model (--clip_weights); without one the CLIP score is skipped. HPS v2 (human preference score) is open_clip's
ViT-H-14 with the HPS v2 or v2.1 checkpoint of xswu/HPSv2 (--hps_weights, for example HPS_v2.1_compressed.pt);
without one it is skipped.
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
from .presets import PRESETS, DigitsPreset
from .report import CLIP_SCORE, FID, HPS, plot_quality_vs_nfe, save_grid
from .students import (DEFAULT_TEACHER_GUIDANCE, exported_guidance, load_student_pipeline, load_teacher_pipeline,
                       recorded_teacher, recorded_teacher_guidance, student_layout)

logger = logging.getLogger(__name__)

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
GRID_PNG, PLOT_PNG = "grid.png", "quality_vs_nfe.png"
IMAGES_SUBFOLDER = "images"
TEACHER = "teacher"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distill.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=PRESETS,
                        help="A benchmark's teacher, prompts, reference set and metrics in one flag. digits: the "
                             "digits teacher (--teacher, default outputs/digits-teacher, built if missing) with DDIM "
                             "at the CFG scale the folder records, the digit prompts, the held-out test digits, and "
                             "the digit classifier's Frechet distance and prompt accuracy in place of FID and CLIP "
                             "score.")
    parser.add_argument("--student", action="append", default=[], metavar="NAME=FOLDER",
                        help="A student to evaluate (repeatable): a training run's output_dir with an exported "
                             "pipeline/ (or a pipeline folder), or a LoRA / fine-tuned unet/ folder with --teacher.")
    parser.add_argument("--teacher", default=None,
                        help="The teacher (folder or Hub id): the baseline row, and the base of LoRA students. "
                             "Default: the teacher the first student records in its distill_config.json; with "
                             "--preset digits, outputs/digits-teacher.")
    parser.add_argument("--teacher_steps", type=int, default=25, help="Sampling steps of the teacher baseline.")
    parser.add_argument("--teacher_guidance", type=float, default=None,
                        help="CFG scale of the teacher baseline. Default: the preset's, else the teacher guidance "
                             "the first student records in its distill_config.json, else "
                             f"{DEFAULT_TEACHER_GUIDANCE}.")
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
    parser.add_argument("--hps_weights", default=None,
                        help="Local HPS v2 checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt of "
                             "xswu/HPSv2) for the human preference score. Without it HPS v2 is skipped.")
    parser.add_argument("--hps_model", default="ViT-H-14",
                        help="open_clip architecture the --hps_weights fine-tune (ViT-H-14 for HPS v2 and v2.1).")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="Images per sampler (prompts are reused in order if there are fewer). Default: one "
                             "per prompt; 300 with --preset digits (a multiple of 10 there).")
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
    parser.add_argument("--grid_size", type=int, default=8,
                        help="Images per row of grid.png (the first ones: the same prompts and seeds in every row); "
                             "0 skips the grid.")
    parser.add_argument("--device", default=None,
                        help="Where to sample and score. Default: this process's GPU (one per process under "
                             "accelerate launch) if there is one, else cpu.")
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
    if args.grid_size < 0:
        raise DistillError(f"--grid_size must be 0 (no grid) or more, got {args.grid_size}.")
    if args.preset is not None:
        given = [flag for flag, value in (("--prompts_file", args.prompts_file), ("--dataset_name", args.dataset_name),
                                          ("--reference_dir", args.reference_dir),
                                          ("--inception_weights", args.inception_weights),
                                          ("--clip_weights", args.clip_weights),
                                          ("--hps_weights", args.hps_weights)) if value is not None]
        if given:
            raise DistillError(f"--preset {args.preset} brings its own prompts, reference images and metrics: "
                               f"drop {', '.join(given)}.")
        if args.resolution not in (None, DigitsPreset.resolution):
            raise DistillError(f"--preset {args.preset} scores {DigitsPreset.resolution}x{DigitsPreset.resolution} "
                               f"images: drop --resolution {args.resolution}.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise DistillError(f"--resolution must be a positive multiple of 8, got {args.resolution}.")
    if args.reference_dir is not None:
        image_files(args.reference_dir)
        if args.inception_weights is None:
            from .inception import HOW_TO_GET

            raise DistillError(f"--reference_dir asks for FID, which needs --inception_weights FILE. {HOW_TO_GET}")
    for flag, value in (("--inception_weights", args.inception_weights), ("--clip_weights", args.clip_weights),
                        ("--hps_weights", args.hps_weights)):
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
    """One run of the command: samplers generated by every process and timed, then scored and drawn by the main one."""

    def __init__(self, args: argparse.Namespace, state, preset: DigitsPreset | None = None):
        self.args = args
        self.state = state
        self.preset = preset
        self.out: Path = args.output_dir
        gpu = state.device if state.device.type == "cuda" else torch.device("cpu")
        self.device = torch.device(args.device) if args.device else gpu
        self.dtype = DTYPES[args.dtype]
        self.size = preset.resolution if preset else args.resolution
        self.metrics = preset.metrics if preset else (FID, CLIP_SCORE, HPS)
        self.samplers: list[Sampler] = []
        self.notes: list[str] = []
        self.real_data: dict | None = None

    def run_sampler(self, pipe, sampler: Sampler, prompts: list[str]) -> None:
        """Generate the missing images of ``sampler`` (every process its share), then time it (main process)."""
        args, state = self.args, self.state
        result = generate_to_folder(pipe, prompts, self.out / IMAGES_SUBFOLDER / sampler.name, sampler.steps,
                                    sampler.guidance_scale, seed=args.seed, batch_size=args.batch_size,
                                    height=self.size, width=self.size, desc=sampler.name, state=state)
        processes = f" by {state.num_processes} processes" if state.num_processes > 1 else ""
        logger.info("%s: generated %d new images (%d were on disk)%s, NFE per image %s", sampler.name,
                    result.generated, result.total - result.generated, processes, result.nfe_per_image)
        sampler.row.update(generated=result.generated, images=result.total, nfe_per_image=result.nfe_per_image,
                           image_dir=str(Path(IMAGES_SUBFOLDER) / sampler.name))
        if args.timing_repeats > 0:
            if state.is_main_process:  # the others wait, so they take no compute from the timed calls
                speed = measure_speed(pipe, prompts[0], sampler.steps, sampler.guidance_scale, args.batch_size,
                                      height=self.size, width=self.size, repeats=args.timing_repeats)
                sampler.row.update(latency_ms=speed.latency_ms, throughput=speed.throughput,
                                   peak_memory_mib=speed.peak_memory_mib, memory=speed.memory)
            state.wait_for_everyone()
        self.samplers.append(sampler)

    def teacher_pipeline(self, teacher: str):
        """The teacher with --teacher_scheduler, else the preset's sampler, else the scheduler it ships with."""
        if self.preset is not None and self.args.teacher_scheduler is None:
            return self.preset.load_teacher()
        return load_teacher_pipeline(teacher, self.args.teacher_scheduler)

    def generate(self, students: dict[str, Path], teacher: str, teacher_guidance: float, prompts: list[str]) -> None:
        args = self.args
        pipe = _placed(self.teacher_pipeline(teacher), self.device, self.dtype)
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

    def score(self, prompts: list[str]) -> None:
        """The preset's scores, else FID and CLIP score, into each sampler's row."""
        if self.preset is None:
            self.score_fid(len(prompts))
            self.score_image_text(prompts, CLIP_SCORE, args_model="clip_model", args_weights="clip_weights",
                                  note="open_clip {model}, 100 * mean max(cos, 0) of image and prompt.")
            self.score_image_text(prompts, HPS, args_model="hps_model", args_weights="hps_weights",
                                  note="human preference score v2 (open_clip {model} fine-tuned on human "
                                       "preferences), mean cos of image and prompt.")
            return
        images = {s.name: self.sampler_images(s, len(prompts))[:] for s in self.samplers}
        scores, self.real_data, notes = self.preset.score(images)
        for sampler in self.samplers:
            sampler.row.update(scores[sampler.name])
        self.notes.extend(notes)

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

    def score_image_text(self, prompts: list[str], metric, args_model: str, args_weights: str, note: str) -> None:
        """An open_clip image-prompt score (CLIP score or HPS v2) of every sampler, if its weights were given."""
        from .metrics import clip_model, clip_score, hps_score

        model_name, weights = getattr(self.args, args_model), getattr(self.args, args_weights)
        if weights is None:
            self.notes.append(f"{metric.column} skipped: no --{args_weights}.")
            return
        score = {CLIP_SCORE.key: clip_score, HPS.key: hps_score}[metric.key]
        model, tokenizer = clip_model(model_name, weights, str(self.device))
        for sampler in self.samplers:
            sampler.row[metric.key] = score(self.sampler_images(sampler, len(prompts)), prompts, model, tokenizer,
                                            self.args.batch_size)
        self.notes.append(f"{metric.column}: " + note.format(model=model_name))
        _release(model)

    def rows(self) -> list[dict]:
        teacher_nfe = next(s.row["nfe_per_image"] for s in self.samplers if s.name == TEACHER)
        rows = []
        for s in self.samplers:
            nfe = s.row["nfe_per_image"]
            ratio = teacher_nfe / nfe if teacher_nfe and nfe else None
            rows.append({"sampler": s.name, "model": s.model, "steps": s.steps, "guidance_scale": s.guidance_scale,
                         "nfe_per_image": nfe, "compute_vs_teacher": ratio,
                         **{metric.key: s.row.get(metric.key) for metric in self.metrics},
                         "latency_ms": s.row.get("latency_ms"), "throughput": s.row.get("throughput"),
                         "peak_memory_mib": s.row.get("peak_memory_mib"), "memory": s.row.get("memory"),
                         "generated": s.row["generated"], "images": s.row["images"], "image_dir": s.row["image_dir"]})
        return rows

    def write_grid(self, rows: list[dict], count: int) -> str | None:
        """grid.png from the PNGs on disk: one labelled row per sampler, its first --grid_size images."""
        columns = min(self.args.grid_size, count)
        if not columns:
            return None
        grid = {r["sampler"] if r["nfe_per_image"] is None else f"{r['sampler']}\n{r['nfe_per_image']:g} NFE":
                [image_path(self.out / r["image_dir"], i) for i in range(columns)] for r in rows}
        save_grid(grid, self.out / GRID_PNG)
        self.notes.append(f"{GRID_PNG}: images 0 to {columns - 1} of each sampler (the same prompts and seeds in every "
                          "row).")
        return GRID_PNG

    def write_plot(self, rows: list[dict]) -> str | None:
        """quality_vs_nfe.png: each computed score against NFE per image, one line per student."""
        metrics = [m for m in self.metrics if any(r[m.key] is not None for r in rows)]
        if not metrics:
            self.notes.append(f"{PLOT_PNG} not drawn: no score was computed.")
            return None
        families = {r["sampler"]: r["model"] for r in rows}
        teacher = next(r for r in rows if r["sampler"] == TEACHER)
        families[TEACHER] = f"teacher ({teacher['steps']} steps, CFG {teacher['guidance_scale']:g})"
        real = self.real_data or {}
        references = {m.key: (real[m.key], real["sampler"]) for m in metrics if real.get(m.key) is not None}
        plot_quality_vs_nfe({r["sampler"]: r for r in rows}, families, metrics, self.out / PLOT_PNG,
                            nfe_key="nfe_per_image", references=references)
        return PLOT_PNG


def _cell(value, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def results_markdown(results: dict) -> str:
    """The results as a markdown table (one row per sampler, then any real-data row) with the run's notes below it."""
    rows, settings, metrics = results["rows"], results["settings"], results["metrics"]
    memory = next((r["memory"] for r in rows if r.get("memory")), "peak memory")
    header = ["sampler", "steps", "guidance", "NFE / image", "compute vs teacher",
              *(m["column"] for m in metrics.values()), "latency (ms / image, batch 1)",
              f"throughput (images / s, batch {settings['batch_size']})", f"{memory} (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows + ([results["real_data"]] if results.get("real_data") else []):
        guidance = r.get("guidance_scale")
        cells = [r["sampler"], str(r.get("steps", "-")), "-" if guidance is None else f"{guidance:g}",
                 _cell(r.get("nfe_per_image"), 1), _cell(r.get("compute_vs_teacher"), 1, "x"),
                 *(_cell(r.get(key), m["decimals"]) for key, m in metrics.items()),
                 _cell(r.get("latency_ms"), 1), _cell(r.get("throughput")), _cell(r.get("peak_memory_mib"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {note}" for note in results["notes"]]
    notes.append("- compute vs teacher: the teacher's NFE per image divided by the sampler's.")
    return "\n".join(lines + [""] + notes) + "\n"


def teacher_guidance(args: argparse.Namespace, students: dict[str, Path], preset: DigitsPreset | None) -> float:
    """--teacher_guidance, else the preset's, else the first the students record, else the default."""
    if args.teacher_guidance is not None:
        return args.teacher_guidance
    if preset is not None:
        return preset.teacher_guidance
    recorded = [g for f in students.values() if (g := recorded_teacher_guidance(f)) is not None]
    guidance = recorded[0] if recorded else DEFAULT_TEACHER_GUIDANCE
    if len(set(recorded)) > 1:
        logger.warning("The students record different teacher guidance scales %s; the teacher row uses %s "
                       "(set --teacher_guidance to choose).", sorted(set(recorded)), guidance)
    return guidance


def evaluate(args: argparse.Namespace, state=None) -> dict | None:
    """The command's work on every process; returns what results.json holds on the main process, None elsewhere."""
    from accelerate import PartialState

    state = state or PartialState()
    check_inputs(args)
    students = parse_students(args.student)
    parse_steps(args.student_steps)
    preset = DigitsPreset.create(args.teacher, args.num_samples, state) if args.preset else None
    prompts = preset.prompts if preset else load_prompts(args)
    teacher = preset.teacher if preset else args.teacher or next(
        (t for f in students.values() if (t := recorded_teacher(f))), None)
    if teacher is None:
        raise DistillError("No teacher: pass --teacher (the baseline, and the base of LoRA students).")
    guidance = teacher_guidance(args, students, preset)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    run = Evaluation(args, state, preset)
    run.generate(students, teacher, guidance, prompts)
    if not state.is_main_process:
        return None
    run.score(prompts)
    rows = run.rows()
    files = {"grid": run.write_grid(rows, len(prompts)), "quality_vs_nfe": run.write_plot(rows)}
    results = {
        "settings": {"preset": args.preset, "teacher": str(teacher), "teacher_steps": args.teacher_steps,
                     "teacher_guidance": guidance,
                     "teacher_scheduler": args.teacher_scheduler or (preset.teacher_scheduler if preset else None),
                     "students": {name: str(folder) for name, folder in students.items()},
                     "num_samples": len(prompts), "batch_size": args.batch_size, "seed": args.seed,
                     "resolution": run.size, "reference_dir": args.reference_dir,
                     "inception_weights": args.inception_weights, "clip_model": args.clip_model,
                     "clip_weights": args.clip_weights, "hps_model": args.hps_model,
                     "hps_weights": args.hps_weights, "device": str(run.device), "dtype": args.dtype,
                     "timing_repeats": args.timing_repeats, "num_processes": state.num_processes,
                     "grid_size": args.grid_size},
        "metrics": {m.key: {"column": m.column, "decimals": m.decimals} for m in run.metrics},
        "rows": rows,
        "real_data": run.real_data,
        "files": files,
        "notes": run.notes,
    }
    (args.output_dir / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    (args.output_dir / RESULTS_MD).write_text(results_markdown(results))
    logger.info("Results: %s and %s", args.output_dir / RESULTS_JSON, args.output_dir / RESULTS_MD)
    print(results_markdown(results))
    return results


def main(argv=None) -> int:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    args = parse_args(argv)
    state = PartialState(cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if state.is_main_process else logging.WARNING)
    try:
        evaluate(args, state)
    except DistillError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.stderr.flush()
        return 2
    state.destroy_process_group()
    return 0
