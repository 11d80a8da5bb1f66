"""train_scripts/generate_pairs.py and distill.pairs: resumable pair shards, checked against the stock pipeline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from conftest import subprocess_env
from distill.data import ImageDataConfig, build_training_set
from distill.errors import DistillError
from distill.pairs import collate_pairs, load_pair_dataset, sample_noise
from distill.testing import build_tiny_teacher

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "generate_pairs.py"
PROMPTS = ["a handwritten digit seven", "a red square", "a blue circle"]


def generate_argv(teacher: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(teacher), "--prompts_file", str(prompts),
            "--output_dir", str(out), "--seed", "3", *extra]


def generate(teacher: Path, prompts: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(generate_argv(teacher, prompts, out, *extra), capture_output=True, text=True,
                          timeout=600, env=subprocess_env(), cwd=REPO)


def shards(folder: Path) -> list[dict]:
    return [load_file(path) for path in sorted(folder.glob("shard-*.safetensors"))]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def small_pairs(request, tmp_path_factory, prompts_file) -> tuple[str, Path, Path, subprocess.CompletedProcess]:
    """Four pairs of each tiny teacher in shards of three (the last shard holds one)."""
    teacher = request.getfixturevalue(f"{request.param}_teacher")
    out = tmp_path_factory.mktemp(f"pairs-{request.param}") / "pairs"
    result = generate(teacher, prompts_file, out, "--num_samples", "4", "--shard_size", "3", "--batch_size", "2",
                      "--guidance_scale", "4.5")
    return request.param, teacher, out, result


def test_pairs_equal_the_stock_pipeline_from_the_same_noise(small_pairs):
    """Oracle: every stored latent is what the stock pipeline with DPM-Solver makes of the stored noise."""
    family, teacher, out, result = small_pairs
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "pairs.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["num_inference_steps"] == 25
    assert manifest["guidance_scale"] == 4.5 and manifest["family"] == family
    dataset = load_pair_dataset(out)
    assert len(dataset) == 4
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    scheduler = DPMSolverMultistepScheduler.from_pretrained(teacher, subfolder="scheduler",
                                                            timestep_spacing="trailing")
    pipe = cls.from_pretrained(teacher, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    for index in (0, 3):
        item = dataset[index]
        assert item["caption"] == PROMPTS[index % 3]  # prompts are cycled, blank lines skipped
        torch.testing.assert_close(item["noise"], sample_noise(3, index, tuple(manifest["latent_shape"])))
        expected = pipe(item["caption"], latents=item["noise"][None], num_inference_steps=25, guidance_scale=4.5,
                        height=32, width=32, output_type="latent").images[0]
        torch.testing.assert_close(item["latents"], expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(dataset[0]["latents"], dataset[3]["latents"])


def test_sigkill_after_the_first_shard_then_restart_gives_the_uninterrupted_pairs(sd_teacher, prompts_file,
                                                                                 tmp_path):
    flags = ("--num_samples", "10", "--shard_size", "2", "--batch_size", "2")
    full = generate(sd_teacher, prompts_file, tmp_path / "full", *flags)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    process = subprocess.Popen(generate_argv(sd_teacher, prompts_file, out, *flags), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=subprocess_env(), cwd=REPO)
    deadline = time.monotonic() + 300
    while not (out / "shard-00000.safetensors").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert process.returncode == -signal.SIGKILL
    assert "shard-00000.safetensors" in written and len(written) < 5  # killed mid-run, some shards missing
    with pytest.raises(DistillError, match="incomplete"):
        load_pair_dataset(out)

    resumed = generate(sd_teacher, prompts_file, out, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{2 * len(written)}/10" in resumed.stderr.replace("\r", "\n")  # the progress bar starts after them
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())
    for a, b in zip(shards(tmp_path / "full"), shards(out), strict=True):
        assert a.keys() == b.keys() == {"noise", "latents"}
        for key in a:
            assert torch.equal(a[key], b[key]), key
    full_set, resumed_set = load_pair_dataset(tmp_path / "full"), load_pair_dataset(out)
    assert [resumed_set[i]["caption"] for i in range(10)] == [PROMPTS[i % 3] for i in range(10)]
    noises = torch.stack([resumed_set[i]["noise"] for i in range(10)]).flatten(1)
    assert torch.cdist(noises, noises).add(torch.eye(10)).min() > 0  # no duplicated pair
    assert all(torch.equal(full_set[i]["latents"], resumed_set[i]["latents"]) for i in range(10))


def test_training_data_path_reads_the_pairs(small_pairs):
    _, _, out, result = small_pairs
    assert result.returncode == 0, result.stderr[-3000:]
    dataset, collate = build_training_set("pairs", ImageDataConfig(pairs_dir=str(out)))
    batch = collate([dataset[i] for i in range(3)])
    assert collate is collate_pairs
    assert batch["noise"].shape == batch["latents"].shape == (3, 4, 16, 16)
    assert batch["caption"] == PROMPTS


def test_broken_pair_folders_are_reported(small_pairs, tmp_path):
    _, _, out, result = small_pairs
    assert result.returncode == 0, result.stderr[-3000:]
    with pytest.raises(DistillError, match="does not exist"):
        load_pair_dataset(tmp_path / "missing")
    with pytest.raises(DistillError, match="not a pair folder"):
        load_pair_dataset(tmp_path)
    with pytest.raises(DistillError, match="--pairs_dir"):
        build_training_set("pairs", ImageDataConfig())
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "shard-00001.safetensors").unlink()
    with pytest.raises(DistillError, match="1 of 2 shards are missing"):
        load_pair_dataset(broken)
    (broken / "shard-00001.safetensors").write_bytes((out / "shard-00001.safetensors").read_bytes()[:50])
    with pytest.raises(DistillError, match="not a readable pair shard"):
        load_pair_dataset(broken)
    shutil.copy(out / "shard-00000.safetensors", broken / "shard-00001.safetensors")  # 3 pairs where 1 belongs
    with pytest.raises(DistillError, match="expected"):
        load_pair_dataset(broken)


def run_expecting_error(argv: list[str], message: str) -> None:
    """The command exits with status 2 and one "error:" line containing ``message``, no traceback."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], (argv, result.stderr[-2000:])
    assert "Traceback" not in result.stderr


def test_resuming_with_other_settings_is_refused(small_pairs, prompts_file):
    """Resuming with other settings would mix two kinds of pairs in one folder."""
    _, teacher, out, result = small_pairs
    assert result.returncode == 0, result.stderr[-3000:]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run_expecting_error(generate_argv(teacher, prompts_file, out, "--num_samples", "4", "--shard_size", "3",
                                      "--guidance_scale", "2.0"), "different settings (guidance_scale)")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_bad_generation_input_exits_2_with_one_error_line(sd_teacher, prompts_file, tmp_path):
    cases = [
        ([sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(sd_teacher), "--output_dir",
          str(tmp_path / "x")], "exactly one prompt source"),
        (generate_argv(sd_teacher, prompts_file, tmp_path / "y", "--guidance_scale", "0.5"), "--guidance_scale"),
        (generate_argv(sd_teacher, tmp_path / "none.txt", tmp_path / "z"), "does not exist"),
    ]
    for argv, message in cases:
        run_expecting_error(argv, message)
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


# ------------------------------------------------------------------------------------ pairs of another teacher

TRAIN = REPO / "train_scripts" / "rectified_diffusion.py"


def train_argv(teacher: Path, pairs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TRAIN), "--pretrained_teacher_model", str(teacher), "--pairs_dir", str(pairs),
            "--output_dir", str(out), "--max_train_steps", "1", "--train_batch_size", "2", "--lora_rank", "4",
            "--seed", "0", "--validation_steps", "0", "--report_to", "none", *extra]


def error_line(argv: list[str]) -> str:
    """The one "error:" line of a command that must exit with status 2 before training (no traceback)."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, (argv, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    return errors[0]


def pair_check(pairs: Path, teacher: Path, resolution: int = 32):
    """The training data path with the run's teacher, as Trainer._validate_inputs calls it."""
    from distill.teacher import inspect_teacher

    return build_training_set("pairs", ImageDataConfig(pairs_dir=str(pairs), resolution=resolution),
                              inspect_teacher(str(teacher)))


def test_pairs_of_the_other_family_are_refused_before_training(small_pairs, sd_teacher, sdxl_teacher, tmp_path):
    """Before: rectified_diffusion.py trained an SDXL teacher on SD pairs (and back) without a word."""
    family, teacher, out, result = small_pairs
    assert result.returncode == 0, result.stderr[-3000:]
    other = sdxl_teacher if family == "sd" else sd_teacher
    line = error_line(train_argv(other, out, tmp_path / "run"))
    assert line.startswith(f"error: The pairs in {out} do not match this run's teacher and resolution (family "), line
    assert f"they were made by {teacher} (" in line and f"this run's teacher is {other} (" in line
    assert ("Generate pairs with this teacher: train_scripts/generate_pairs.py --pretrained_teacher_model "
            f"{other}") in line
    assert not (tmp_path / "run").exists()  # refused while validating inputs, before any model was loaded


def test_pairs_of_a_same_shaped_teacher_are_refused_by_its_fingerprint(small_pairs, tmp_path):
    """Same family, same latent shape, other weights (a fine-tune, say): the UNet fingerprint in pairs.json differs.
    The same teacher under another path (a copy, or a Hub id vs its local snapshot) is accepted."""
    family, teacher, out, result = small_pairs
    assert result.returncode == 0, result.stderr[-3000:]
    other = build_tiny_teacher(tmp_path / "other", sdxl=family == "sdxl", seed=1)
    line = error_line(train_argv(other, out, tmp_path / "run"))
    assert line.startswith(f"error: The pairs in {out} do not match this run's teacher and resolution (UNet "
                           "fingerprint "), line
    copy = shutil.copytree(teacher, tmp_path / "copy")
    dataset, _ = pair_check(out, copy)
    assert len(dataset) == 4


def test_pairs_at_another_resolution_are_refused(small_pairs):
    _, teacher, out, result = small_pairs
    assert result.returncode == 0, result.stderr[-3000:]
    with pytest.raises(DistillError, match=r"\(latent shape \(4, 16, 16\) vs \(4, 32, 32\)\).*Train at --resolution "
                                           r"32, or generate pairs at this resolution"):
        pair_check(out, teacher, resolution=64)


def test_manifests_without_a_fingerprint_still_work(small_pairs, tmp_path):
    """pairs.json written before teacher_path/teacher_fingerprint: the teacher is judged by name or folder."""
    family, teacher, out, result = small_pairs
    assert result.returncode == 0, result.stderr[-3000:]
    old = shutil.copytree(out, tmp_path / "old")
    manifest = json.loads((old / "pairs.json").read_text())
    for key in ("teacher_path", "teacher_fingerprint"):
        del manifest[key]
    (old / "pairs.json").write_text(json.dumps(manifest))
    assert len(pair_check(old, teacher)[0]) == 4  # the same folder
    assert len(pair_check(old, shutil.copytree(teacher, tmp_path / "copy"))[0]) == 4  # a copy: same weights
    other = build_tiny_teacher(tmp_path / "other", sdxl=family == "sdxl", seed=1)
    with pytest.raises(DistillError, match="another teacher named in pairs.json"):
        pair_check(old, other)


def test_rerun_regenerates_truncated_and_wrong_sized_shards(small_pairs, prompts_file, tmp_path):
    """Before: a rerun over a shard cut to half its bytes printed "Pairs written" and left it broken."""
    _, teacher, out, result = small_pairs
    assert result.returncode == 0, result.stderr[-3000:]
    damaged = shutil.copytree(out, tmp_path / "damaged")
    first, second = damaged / "shard-00000.safetensors", damaged / "shard-00001.safetensors"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    shutil.copy(out / "shard-00000.safetensors", second)  # readable, but 3 pairs where 1 belongs
    rerun = generate(teacher, prompts_file, damaged, "--num_samples", "4", "--shard_size", "3", "--batch_size", "2",
                     "--guidance_scale", "4.5")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    warnings = [line for line in rerun.stderr.splitlines() if "WARNING" in line and "damaged" in line]
    assert len(warnings) == 1 and "shard-00000.safetensors, shard-00001.safetensors" in warnings[0], rerun.stderr
    for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
        assert (damaged / name).read_bytes() == (out / name).read_bytes(), name  # exactly the pairs it should hold
    assert len(load_pair_dataset(damaged)) == 4
