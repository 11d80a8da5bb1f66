"""``python -m distill.evaluate``: the Frechet distance against its closed form, the FID Inception's layout, resumable
generation, and the command end to end on the tiny SD teacher with an LCM-LoRA student (its grid and quality-vs-NFE
plot included); the digits preset on a 2-step digits teacher, in one process and in two under accelerate launch.

Offline throughout: the FID Inception (torch-fidelity's network) and the CLIP (open_clip's ViT-B-32) have random
weights written by the tests, with the real networks' architectures, so the numbers are checked against the same
functions run in-process, not against published values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from conftest import subprocess_env
from distill.errors import DistillError
from distill.evaluate import clip_model, clip_score, count_unet_evaluations, frechet_distance, hps_score
from distill.evaluate import inception_features
from distill.evaluate import inception_model
from distill.evaluate.cli import load_prompts, main as evaluate_main, parse_args
from distill.evaluate.generation import MANIFEST, generate_to_folder
from distill.evaluate.report import GRID_CELL, PANEL_INCHES, PLOT_DPI, fit_cell
from distill.testing import write_random_inception_weights

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a striped picture number 1", "a red square", "a cat", "a striped picture number 6"]
NUM_SAMPLES = 6  # more than the prompts: they are reused in order
TEACHER_STEPS = 4
LCM_TEACHER_GUIDANCE = 1 + (3.0 + 15.0) / 2  # LCM's default w in [3, 15], (1 + w) form, midpoint


# ------------------------------------------------------------------------------------------- Frechet distance


def exact_gaussian_features(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose sample mean and (n - 1)-normalised covariance are exactly ``mean`` and ``cov``."""
    z = np.random.default_rng(seed).normal(size=(n, mean.size))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    return mean + z @ np.linalg.cholesky(cov).T


def closed_form(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) with scipy's matrix square root (Dowson & Landau 1982)."""
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def random_spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(300, 64)) * 3 + 1
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(feats, feats[::-1]) == pytest.approx(0.0, abs=1e-8)  # a set: order does not matter
    # Fewer samples than dimensions (singular covariances, as with small FID runs): still 0, not NaN.
    few = feats[:20]
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    d = 5
    mu1, mu2 = np.arange(d, dtype=float), np.linspace(-1, 2, d)
    s1, s2 = random_spd(d, 1), random_spd(d, 2)
    expected = closed_form(mu1, s1, mu2, s2)
    assert expected > 1.0
    # Features with exactly these statistics: equal to round-off.
    a, b = exact_gaussian_features(mu1, s1, 50, seed=3), exact_gaussian_features(mu2, s2, 70, seed=4)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # Plain samples of the two Gaussians: within sampling error.
    rng = np.random.default_rng(5)
    a = rng.multivariate_normal(mu1, s1, size=200_000)
    b = rng.multivariate_normal(mu2, s2, size=200_000)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.01)
    # Equal covariances: only the mean term remains.
    c = exact_gaussian_features(mu2, s1, 50, seed=6)
    assert frechet_distance(exact_gaussian_features(mu1, s1, 40, seed=7), c) == pytest.approx(
        float(np.sum((mu1 - mu2) ** 2)), rel=1e-9)


def test_frechet_distance_needs_two_samples():
    with pytest.raises(DistillError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


# ------------------------------------------------------------------------------------------- the FID Inception


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth", seed=0)


def test_inception_has_the_standard_weights_layout(inception_file):
    """Key set and shapes of pytorch-fid's FID network: torchvision's Inception3 with a 1008-class fc and no
    auxiliary head, into which pytorch-fid loads pt_inception-2015-12-05-6726825d.pth strictly."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchvision.models import inception_v3

    model = inception_model(inception_file)
    assert isinstance(model, FeatureExtractorInceptionV3)
    ours = model.state_dict()
    standard = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False).state_dict()
    assert set(ours) == set(standard)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in standard.items()}
    saved = torch.load(inception_file, weights_only=True)
    assert all(torch.equal(ours[k], saved[k]) for k in saved)  # the file's weights, not a fresh initialisation


def test_inception_features_are_2048_d_at_any_size(inception_file):
    model = inception_model(inception_file)
    rng = np.random.default_rng(0)
    small = (rng.random((2, 32, 32, 3)) * 255).astype(np.uint8)
    wide = (rng.random((2, 40, 48, 3)) * 255).astype(np.uint8)
    mixed = inception_features([small[0], wide[0], wide[1], small[1]], model, batch_size=2)
    assert mixed.shape == (4, 2048) and mixed.dtype == np.float64 and np.isfinite(mixed).all()
    alone = np.concatenate([inception_features(small, model), inception_features(wide, model)])
    np.testing.assert_allclose(mixed[[0, 3, 1, 2]], alone, rtol=1e-5, atol=1e-6)
    assert np.abs(mixed[0] - mixed[1]).max() > 1e-3  # different images, different features


def test_inception_weights_url_is_torch_fidelity_own():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    import distill.evaluate.cli as cli
    import distill.evaluate.inception as inception

    assert inception.WEIGHTS_URL == URL_INCEPTION_V3
    assert URL_INCEPTION_V3 in inception.__doc__ and URL_INCEPTION_V3 in cli.__doc__


def test_inception_loader_refuses_missing_and_wrong_weights(tmp_path):
    from torchvision.models import inception_v3

    with pytest.raises(DistillError, match="pass --inception_weights") as raised:
        inception_model(None)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(raised.value)
    with pytest.raises(DistillError, match="does not exist"):
        inception_model(tmp_path / "missing.pth")
    imagenet = tmp_path / "torchvision_inception.pth"  # the network this module used before: 1000 classes, aux head
    torch.save(inception_v3(weights=None, init_weights=False).state_dict(), imagenet)
    with pytest.raises(DistillError, match="is not the FID Inception weights file"):
        inception_model(imagenet)


# ------------------------------------------------------------------------------------------- resumable generation


@pytest.fixture(scope="module")
def ddim_pipe(sd_teacher):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_teacher)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def pngs(folder: Path) -> dict[int, np.ndarray]:
    return {int(p.stem): np.asarray(Image.open(p)) for p in folder.glob("*.png")}


class Interrupt(Exception):
    """Raised from inside the UNet to stop a generation midway, as Ctrl-C or a crash would."""


def test_generation_resumes_with_only_the_missing_images(ddim_pipe, tmp_path):
    prompts = ["a cat", "a dog", "a cow", "a red square", "a striped picture number 3"]
    steps = 2
    reference = generate_to_folder(ddim_pipe, prompts, tmp_path / "reference", steps, 1.0, seed=7, batch_size=5)
    assert (reference.generated, reference.nfe_per_image) == (5, steps)

    # Interrupted in its second batch: the first batch's two images are on disk, nothing half-written.
    folder = tmp_path / "run"
    calls = []

    def stop_in_second_batch(module, args, kwargs):
        calls.append(1)
        if len(calls) > steps:
            raise Interrupt

    handle = ddim_pipe.unet.register_forward_pre_hook(stop_in_second_batch, with_kwargs=True)
    try:
        with pytest.raises(Interrupt):
            generate_to_folder(ddim_pipe, prompts, folder, steps, 1.0, seed=7, batch_size=2)
    finally:
        handle.remove()
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", MANIFEST]

    # The rerun makes images 2-4 only: 3 images x 2 steps UNet rows, in batches of another size.
    with count_unet_evaluations(ddim_pipe.unet) as counter:
        resumed = generate_to_folder(ddim_pipe, prompts, folder, steps, 1.0, seed=7, batch_size=3)
    assert (resumed.generated, resumed.total, counter["rows"], resumed.nfe_per_image) == (3, 5, 3 * steps, steps)
    images, expected = pngs(folder), pngs(tmp_path / "reference")
    assert sorted(images) == list(range(5))
    for i in range(5):  # image i depends on its prompt and seed only (one grey level of batching round-off allowed)
        assert np.abs(images[i].astype(int) - expected[i].astype(int)).max() <= 1, i
    assert np.abs(expected[0].astype(int) - expected[1].astype(int)).max() > 10

    # Deleted images are made again; the others are not touched.
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p.name not in ("1.png", "3.png")}
    (folder / "1.png").unlink()
    (folder / "3.png").unlink()
    with count_unet_evaluations(ddim_pipe.unet) as counter:
        again = generate_to_folder(ddim_pipe, prompts, folder, steps, 1.0, seed=7, batch_size=1)
    assert (again.generated, counter["rows"]) == (2, 2 * steps)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p.name in kept} == kept

    # Nothing missing: no UNet call, and NFE per image still known from the manifest.
    with count_unet_evaluations(ddim_pipe.unet) as counter:
        nothing = generate_to_folder(ddim_pipe, prompts, folder, steps, 1.0, seed=7, batch_size=2)
    assert (nothing.generated, counter["rows"], nothing.nfe_per_image) == (0, 0, steps)

    # More samples later: only the new indices.
    with count_unet_evaluations(ddim_pipe.unet) as counter:
        more = generate_to_folder(ddim_pipe, prompts + ["a blue circle"], folder, steps, 1.0, seed=7, batch_size=2)
    assert (more.generated, counter["rows"]) == (1, steps)


def test_generation_refuses_a_folder_made_with_other_settings(ddim_pipe, tmp_path):
    prompts = ["a cat", "a dog"]
    generate_to_folder(ddim_pipe, prompts, tmp_path, 1, 1.0, seed=0, batch_size=2)
    with pytest.raises(DistillError, match=r"other settings \(num_inference_steps: 1 on disk, 2 now\)"):
        generate_to_folder(ddim_pipe, prompts, tmp_path, 2, 1.0, seed=0, batch_size=2)
    with pytest.raises(DistillError, match="was made for the prompt 'a dog', but prompt 1 is now 'a cow'"):
        generate_to_folder(ddim_pipe, ["a cat", "a cow"], tmp_path, 1, 1.0, seed=0, batch_size=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    Image.new("RGB", (8, 8)).save(foreign / "0.png")
    with pytest.raises(DistillError, match="not made by distill.evaluate"):
        generate_to_folder(ddim_pipe, prompts, foreign, 1, 1.0)


# ------------------------------------------------------------------------------------------- the command


def run_evaluate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.evaluate", *args], capture_output=True, text=True,
                          timeout=600, env=subprocess_env(PYTHONPATH=str(REPO)), cwd=cwd)


@pytest.fixture(scope="module")
def evaluation(sd_teacher, image_folder, inception_file, tmp_path_factory):
    """An LCM-LoRA student (1 training step) evaluated twice with the same output_dir."""
    root = tmp_path_factory.mktemp("evaluate")
    student = root / "student"
    train = subprocess.run([sys.executable, str(REPO / "train_scripts" / "lcm_lora.py"), "--pretrained_teacher_model",
                            str(sd_teacher), "--train_data_dir", str(image_folder), "--output_dir", str(student),
                            "--max_train_steps", "1", "--train_batch_size", "2", "--lora_rank", "4",
                            "--validation_steps", "0", "--report_to", "none", "--seed", "0"],
                           capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)
    assert train.returncode == 0, train.stderr[-3000:]
    import open_clip

    torch.manual_seed(3)  # a draw whose image and text embeddings point the same way (others score every pair 0)
    clip_file = root / "clip-vit-b-32-random.pth"
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), clip_file)
    torch.manual_seed(4)  # HPS v2's checkpoint layout: a DDP state dict under "state_dict"
    hps_file = root / "hps-vit-b-32-random.pt"
    hps_state = {f"module.{key}": value for key, value in open_clip.create_model("ViT-B-32").state_dict().items()}
    torch.save({"state_dict": hps_state}, hps_file)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = root / "out"
    args = ["--student", f"lcm={student}", "--teacher", str(sd_teacher), "--teacher_steps", str(TEACHER_STEPS),
            "--teacher_scheduler", "DDIMScheduler", "--student_steps", "1,2,4,100",
            "--prompts_file", str(root / "prompts.txt"), "--reference_dir", str(image_folder),
            "--inception_weights", str(inception_file), "--clip_weights", str(clip_file),
            "--hps_weights", str(hps_file), "--hps_model", "ViT-B-32", "--num_samples", str(NUM_SAMPLES), "--batch_size", "4", "--resolution", "32", "--timing_repeats", "1",
            "--output_dir", str(out)]
    first = run_evaluate(*args, cwd=root)
    first_json = json.loads((out / "results.json").read_text()) if first.returncode == 0 else None
    mtimes = {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    second = run_evaluate(*args, cwd=root)
    return {"root": root, "out": out, "first": first, "first_json": first_json, "mtimes": mtimes, "second": second,
            "clip_file": clip_file, "hps_file": hps_file, "reference_dir": image_folder, "inception_file": inception_file}


SAMPLERS = ["teacher", "lcm-1step", "lcm-2step", "lcm-4step"]


def test_command_writes_one_row_per_sampler(evaluation):
    assert evaluation["first"].returncode == 0, evaluation["first"].stderr[-3000:]
    results = evaluation["first_json"]
    rows = {row["sampler"]: row for row in results["rows"]}
    assert list(rows) == SAMPLERS
    assert results["settings"]["teacher_guidance"] == LCM_TEACHER_GUIDANCE  # recorded by the student's run
    teacher_nfe = 2 * TEACHER_STEPS  # CFG: a conditional and an unconditional row per step
    assert rows["teacher"]["nfe_per_image"] == teacher_nfe and rows["teacher"]["compute_vs_teacher"] == 1.0
    for steps in (1, 2, 4):
        row = rows[f"lcm-{steps}step"]
        assert (row["steps"], row["guidance_scale"], row["nfe_per_image"]) == (steps, 1.0, steps)  # no CFG
        assert row["compute_vs_teacher"] == teacher_nfe / steps
    for row in rows.values():
        assert row["generated"] == row["images"] == NUM_SAMPLES
        assert np.isfinite(row["fid"]) and row["fid"] > 0
        assert np.isfinite(row["clip_score"]) and 0 <= row["clip_score"] <= 100
        assert -1 <= row["hps"] <= 1 and row["hps"] != 0
        assert row["latency_ms"] > 0 and row["throughput"] > 0 and row["peak_memory_mib"] > 100
        assert row["memory"] == "process peak RSS"
        files = sorted((evaluation["out"] / row["image_dir"]).glob("*.png"))
        assert [int(p.stem) for p in sorted(files, key=lambda p: int(p.stem))] == list(range(NUM_SAMPLES))
        assert Image.open(files[0]).size == (32, 32)
    assert any("lcm skipped at 100 steps" in note for note in results["notes"])  # LCMScheduler allows at most 50
    markdown = (evaluation["out"] / "results.md").read_text()
    for name in SAMPLERS:
        assert f"| {name} |" in markdown
    assert "process peak RSS (MiB)" in markdown and f"| {2 * TEACHER_STEPS / 1:.1f}x |" in markdown


def test_command_scores_match_the_library_functions(evaluation):
    """FID and CLIP score of the JSON equal the same functions run here on the PNGs the command wrote."""
    results = evaluation["first_json"]
    out = evaluation["out"]
    references = np.stack([np.asarray(Image.open(evaluation["reference_dir"] / f"{i}.png").convert("RGB"))
                           for i in range(8)])
    model = inception_model(evaluation["inception_file"])
    real = inception_features(references, model)
    clip, tokenizer = clip_model("ViT-B-32", evaluation["clip_file"])
    hps, hps_tokenizer = clip_model("ViT-B-32", evaluation["hps_file"])
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(NUM_SAMPLES)]
    for row in results["rows"][1:2]:  # the 1-step student
        images = np.stack([np.asarray(Image.open(out / row["image_dir"] / f"{i}.png")) for i in range(NUM_SAMPLES)])
        assert row["fid"] == pytest.approx(frechet_distance(real, inception_features(images, model)), rel=1e-6)
        assert row["clip_score"] > 0
        assert row["clip_score"] == pytest.approx(clip_score(images, prompts, clip, tokenizer), rel=1e-5)
        assert row["hps"] == pytest.approx(hps_score(images, prompts, hps, hps_tokenizer), rel=1e-5, abs=1e-7)
    fids = [row["fid"] for row in results["rows"]]
    assert len(set(fids)) == len(fids)  # each sampler scored on its own images


def test_image_prompt_scores_preprocess_as_open_clip_does():
    """CLIP score and HPS v2 equal the cosines of open_clip's own model + eval transform (resize, centre crop)."""
    import open_clip

    torch.manual_seed(3)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    images = np.random.default_rng(0).integers(0, 256, size=(3, 40, 56, 3), dtype=np.uint8)  # not square
    prompts = ["a cat", "a red square", "a striped picture number 6"]
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([preprocess(Image.fromarray(image)) for image in images]))
        text_emb = model.encode_text(tokenizer(prompts))
    cosines = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
    assert hps_score(images, prompts, model.eval(), tokenizer, batch_size=2) == pytest.approx(float(cosines.mean()),
                                                                                              abs=1e-6)
    expected_clip = float(100 * cosines.clamp(min=0).mean())
    assert clip_score(images, prompts, model, tokenizer, batch_size=2) == pytest.approx(expected_clip, abs=1e-4)


def test_rerun_generates_nothing(evaluation):
    second = evaluation["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    results = json.loads((evaluation["out"] / "results.json").read_text())
    assert [row["generated"] for row in results["rows"]] == [0] * len(SAMPLERS)
    assert "generated 0 new images (6 were on disk)" in second.stderr
    out = evaluation["out"]
    images = out / "images"  # the samples; grid.png and the plot are redrawn from them
    assert {str(p.relative_to(out)): p.stat().st_mtime_ns for p in images.rglob("*.png")} == evaluation["mtimes"]
    first = {row["sampler"]: row for row in evaluation["first_json"]["rows"]}
    for row in results["rows"]:  # same images, same scores; NFE from the manifest
        assert row["nfe_per_image"] == first[row["sampler"]]["nfe_per_image"]
        assert row["fid"] == pytest.approx(first[row["sampler"]]["fid"], rel=1e-9)


def test_prompts_from_a_local_dataset_column_are_reused_in_order(image_folder, tmp_path):
    args = parse_args(["--dataset_name", str(image_folder), "--caption_column", "text", "--num_samples", "10",
                       "--output_dir", str(tmp_path)])
    assert load_prompts(args) == [f"a striped picture number {i % 8}" for i in range(10)]
    args = parse_args(["--dataset_name", str(image_folder), "--output_dir", str(tmp_path)])
    assert len(load_prompts(args)) == 8  # default: one sample per prompt


# ------------------------------------------------------------------------------------------- bad input


def one_line_error(argv: list[str], capsys) -> str:
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_clear_line(tmp_path, capsys, inception_file, sd_teacher):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    base = ["--teacher", str(sd_teacher), "--output_dir", str(tmp_path / "out")]
    assert "does not exist" in one_line_error([*base, "--student", f"s={tmp_path / 'nowhere'}",
                                               "--prompts_file", str(prompts)], capsys)
    (tmp_path / "empty_student").mkdir()
    assert "is not a student folder" in one_line_error([*base, "--student", f"s={tmp_path / 'empty_student'}",
                                                        "--prompts_file", str(prompts)], capsys)
    assert "expected NAME=FOLDER" in one_line_error([*base, "--student", str(tmp_path), "--prompts_file",
                                                     str(prompts)], capsys)
    assert "exactly one prompt source" in one_line_error(base, capsys)
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "contains no prompts" in one_line_error([*base, "--prompts_file", str(tmp_path / "blank.txt")], capsys)
    references = tmp_path / "refs"
    references.mkdir()
    Image.new("RGB", (8, 8)).save(references / "a.png")
    message = one_line_error([*base, "--prompts_file", str(prompts), "--reference_dir", str(references)], capsys)
    assert "needs --inception_weights" in message and "weights-inception-2015-12-05-6726825d.pth" in message
    assert "holds no images" in one_line_error([*base, "--prompts_file", str(prompts), "--reference_dir",
                                                str(tmp_path / "empty_student"), "--inception_weights",
                                                str(inception_file)], capsys)
    assert "--student_steps" in one_line_error([*base, "--prompts_file", str(prompts), "--student_steps", "1,x"],
                                               capsys)
    assert "is not a diffusers scheduler class" in one_line_error([*base, "--prompts_file", str(prompts),
                                                                   "--teacher_scheduler", "StableDiffusionPipeline"],
                                                                  capsys)
    assert not (tmp_path / "out" / "images").exists()  # refused before generating anything


def test_help_explains_every_flag_and_the_weights(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--student", "--teacher", "--teacher_steps", "--teacher_guidance", "--student_steps",
                 "--prompts_file", "--dataset_name", "--caption_column", "--reference_dir", "--inception_weights",
                 "--clip_model", "--clip_weights", "--num_samples", "--batch_size", "--seed", "--resolution",
                 "--output_dir"):
        assert flag in text
    assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" in text


# ------------------------------------------------------------------------------------------- grid and plot


def grid_cells(grid: np.ndarray, rows: int, columns: int) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """The label column and the cells of a grid.png of ``rows`` x ``columns`` images."""
    cell = GRID_CELL
    left = grid.shape[1] - columns * cell
    return grid[:, :left], [[grid[r * cell:(r + 1) * cell, left + c * cell:left + (c + 1) * cell]
                             for c in range(columns)] for r in range(rows)]


def assert_grid_shows(out: Path, rows: list[dict], columns: int) -> np.ndarray:
    """grid.png: one labelled row per sampler, its cells the sampler's first images as written to disk."""
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert grid.shape[0] == len(rows) * GRID_CELL and grid.shape[1] > columns * GRID_CELL
    labels, cells = grid_cells(grid, len(rows), columns)
    for r, row in enumerate(rows):
        assert (labels[r * GRID_CELL:(r + 1) * GRID_CELL] < 100).any(), f"row {r} has no label"
        for c in range(columns):
            expected = np.asarray(fit_cell(np.asarray(Image.open(out / row["image_dir"] / f"{c}.png"))))
            np.testing.assert_array_equal(cells[r][c], expected, err_msg=f"{row['sampler']} image {c}")
    return grid


def test_command_draws_the_grid_and_the_quality_plot(evaluation):
    """After a rerun that generated nothing, grid.png shows the PNGs on disk; the plot has FID, CLIP and HPS panels."""
    assert evaluation["second"].returncode == 0, evaluation["second"].stderr[-3000:]
    out = evaluation["out"]
    results = json.loads((out / "results.json").read_text())
    assert results["files"] == {"grid": "grid.png", "quality_vs_nfe": "quality_vs_nfe.png"}
    assert_grid_shows(out, results["rows"], columns=NUM_SAMPLES)  # --grid_size 8 > 6 samples
    width, height = PANEL_INCHES
    plot = Image.open(out / "quality_vs_nfe.png")
    assert plot.size == (round(3 * width * PLOT_DPI), round(height * PLOT_DPI))  # FID, CLIP score, HPS v2
    assert np.asarray(plot.convert("L")).std() > 10


# ------------------------------------------------------------------------------------------- the digits preset


DIGITS_SAMPLES = 20
DIGITS_FLAGS = ["--teacher_steps", "2", "--student_steps", "1,2", "--num_samples", str(DIGITS_SAMPLES),
                "--batch_size", "4", "--timing_repeats", "1"]
DIGITS_SAMPLERS = ["teacher", "lcm-1step", "lcm-2step"]


@pytest.fixture(scope="module")
def digits_runs(image_folder, tmp_path_factory):
    """``--preset digits`` in one process, then in 2 CPU processes on a copy of its output missing 44 of 60 images."""
    # The digits teacher and its 1-step LCM-LoRA student train 2 and 1 steps. The copy loses the teacher's and the
    # 2-step student's images and one batch of the 1-step student's; accelerate launch as tests/test_multiprocess.py.
    import shutil

    from test_digits import TINY_RECIPE
    from test_multiprocess import ACCELERATE, CONFIGS, finish, free_ports, start

    from distill.demo.digits import build_digits_teacher

    root = tmp_path_factory.mktemp("digits-preset")
    teacher = build_digits_teacher(root / "teacher", **TINY_RECIPE)
    student = root / "student"
    train = subprocess.run([sys.executable, str(REPO / "train_scripts" / "lcm_lora.py"), "--pretrained_teacher_model",
                            str(teacher), "--train_data_dir", str(image_folder), "--output_dir", str(student),
                            "--max_train_steps", "1", "--train_batch_size", "2", "--lora_rank", "4",
                            "--validation_steps", "0", "--report_to", "none", "--seed", "0"],
                           capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)
    assert train.returncode == 0, train.stderr[-3000:]
    args = ["--preset", "digits", "--teacher", str(teacher), "--student", f"lcm={student}", *DIGITS_FLAGS]
    one = run_evaluate(*args, "--output_dir", str(root / "one"), cwd=root)
    assert one.returncode == 0, one.stderr[-3000:]
    two = root / "two"
    shutil.copytree(root / "one", two)
    for gone in ("teacher", "lcm-2step"):
        shutil.rmtree(two / "images" / gone)
    for i in range(4, 8):  # the second batch of 4
        (two / "images" / "lcm-1step" / f"{i}.png").unlink()
    launch = start([str(ACCELERATE), "launch", "--config_file", str(CONFIGS / "multi_gpu.yaml"), "--num_processes", "2",
                    "--mixed_precision", "no", "--main_process_port", str(free_ports(1)[0]), "-m", "distill.evaluate",
                    *args, "--output_dir", str(two)], two, ACCELERATE_USE_CPU="true")  # its log: two.log
    return {"root": root, "teacher": teacher, "one": one, "two": finish(launch, two)}


def test_digits_preset_scores_fd_and_accuracy_beside_the_real_data_floor(digits_runs):
    from distill.demo import digit_scores, real_data_fd
    from distill.demo.digits import caption_for, digits_split, train_digits_classifier

    out = digits_runs["root"] / "one"
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert (settings["preset"], settings["teacher"], settings["teacher_guidance"]) == (
        "digits", str(digits_runs["teacher"]), 4.0)  # the benchmark's CFG, not the student's recorded LCM range
    assert (settings["teacher_scheduler"], settings["resolution"]) == ("DDIMScheduler (trailing spacing)", 32)
    assert list(results["metrics"]) == ["fd", "accuracy"]
    rows = {row["sampler"]: row for row in results["rows"]}
    assert list(rows) == DIGITS_SAMPLERS
    assert [rows[name]["nfe_per_image"] for name in DIGITS_SAMPLERS] == [2 * 2, 1, 2]  # the teacher with CFG
    labels = np.arange(DIGITS_SAMPLES) % 10  # zero to nine, repeated
    manifest = json.loads((out / "images" / "teacher" / MANIFEST).read_text())
    assert manifest["prompts"] == [caption_for(label) for label in labels]

    # The scores equal the benchmark's functions run here on the PNGs, with the classifier cached beside the teacher.
    classifier = train_digits_classifier(cache_path=digits_runs["teacher"] / "classifier.pt")
    real = classifier.features(digits_split("test")[0])
    for name, row in rows.items():
        assert "fid" not in row and "clip_score" not in row
        images = np.stack([np.asarray(Image.open(out / row["image_dir"] / f"{i}.png"))
                           for i in range(DIGITS_SAMPLES)])
        expected = digit_scores(images, labels, classifier, real)
        assert row["fd"] == pytest.approx(expected["fd"], rel=1e-6) and row["fd"] > 0
        assert row["accuracy"] == expected["accuracy"] and 0 <= row["accuracy"] <= 1
    floor = results["real_data"]
    assert floor["sampler"] == "real digits" and floor["fd_images"] == DIGITS_SAMPLES
    assert floor["fd"] == pytest.approx(real_data_fd(classifier, real, DIGITS_SAMPLES), rel=1e-6)
    assert floor["accuracy"] == classifier.test_accuracy
    assert 0 < floor["fd"] < min(row["fd"] for row in rows.values())  # real digits beat an untrained teacher
    markdown = (out / "results.md").read_text()
    assert "| FD (digit classifier) | prompt accuracy |" in markdown
    assert f"| real digits | - | - | - | - | {floor['fd']:.2f} | {floor['accuracy']:.3f} |" in markdown

    assert_grid_shows(out, results["rows"], columns=8)  # --grid_size's default
    width, height = PANEL_INCHES
    assert Image.open(out / "quality_vs_nfe.png").size == (round(2 * width * PLOT_DPI), round(height * PLOT_DPI))


def test_two_processes_make_the_images_of_one_process(digits_runs):
    """Every PNG of the 2-process run equals the 1-process one pixel for pixel; so do the scores and the grid."""
    # Each process makes whole batches of the 1-process run: the same images per batch with the same per-image seeds,
    # on one CPU thread, so the same arithmetic (images in other batches would differ by batching round-off).
    two = digits_runs["two"]
    assert two.returncode == 0, two.stderr[-3000:]
    root = digits_runs["root"]
    one_results = json.loads((root / "one" / "results.json").read_text())
    two_results = json.loads((root / "two" / "results.json").read_text())
    assert two_results["settings"]["num_processes"] == 2 and one_results["settings"]["num_processes"] == 1
    assert [row["generated"] for row in two_results["rows"]] == [DIGITS_SAMPLES, 4, DIGITS_SAMPLES]
    assert "teacher: generated 20 new images (0 were on disk) by 2 processes" in two.stderr
    assert "lcm-1step: generated 4 new images (16 were on disk) by 2 processes" in two.stderr
    # The main process made batches 0, 2 and 4 of the teacher's 5 (it alone counts UNet rows); the other 1 and 3.
    manifest = json.loads((root / "two" / "images" / "teacher" / MANIFEST).read_text())
    assert (manifest["images_counted"], manifest["unet_rows"]) == (12, 12 * 2 * 2)
    one_images, two_images = pngs_under(root / "one" / "images"), pngs_under(root / "two" / "images")
    assert sorted(two_images) == sorted(one_images) and len(one_images) == len(DIGITS_SAMPLERS) * DIGITS_SAMPLES
    differing = [name for name in one_images if not np.array_equal(one_images[name], two_images[name])]
    assert differing == []
    assert np.abs(one_images["teacher/0.png"].astype(int) - one_images["teacher/1.png"].astype(int)).max() > 10
    for a, b in zip(one_results["rows"], two_results["rows"]):
        assert (a["sampler"], a["nfe_per_image"], a["fd"], a["accuracy"]) == (
            b["sampler"], b["nfe_per_image"], b["fd"], b["accuracy"])
    np.testing.assert_array_equal(np.asarray(Image.open(root / "one" / "grid.png")),
                                  np.asarray(Image.open(root / "two" / "grid.png")))


def pngs_under(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in folder.rglob("*.png")}


def test_digits_preset_refuses_flags_it_replaces(tmp_path, capsys):
    base = ["--preset", "digits", "--teacher", str(tmp_path / "teacher"), "--output_dir", str(tmp_path / "out")]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    message = one_line_error([*base, "--prompts_file", str(prompts), "--clip_weights", str(prompts)], capsys)
    assert "brings its own prompts, reference images and metrics: drop --prompts_file, --clip_weights" in message
    assert "multiple of 10, got 15" in one_line_error([*base, "--num_samples", "15"], capsys)
    assert "scores 32x32 images: drop --resolution 64" in one_line_error([*base, "--resolution", "64"], capsys)
    assert not (tmp_path / "teacher").exists()  # refused before building a teacher
