"""End to end: train_scripts/lcm_lora.py run as a user runs it, on the tiny SD and SDXL teachers.

Each training command runs once per teacher in a module-scoped fixture; the tests then inspect what it left on disk
and what it printed. The exported student is loaded in fresh processes, the two documented ways:

1. stock diffusers: ``StableDiffusion(XL)Pipeline`` + ``LCMScheduler.from_pretrained(out, subfolder="scheduler")``
   + ``load_lora_weights(out)``;
2. the self-contained folder: ``DiffusionPipeline.from_pretrained(out / "pipeline", trust_remote_code=True)`` in a
   process whose working directory is not the repository.

Subprocesses run with one OpenMP thread: on the 2-core test machine, shared with other jobs, two OpenMP threads
make the same 6-step run take about a minute instead of about 10 s (spinning threads wait for a busy core).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "lcm_lora.py"
PROMPT = "a striped picture number 3"
FLAGS = ["--checkpointing_steps", "2", "--train_batch_size", "2", "--lora_rank", "4", "--seed", "0",
         "--validation_steps", "0", "--report_to", "none"]
LORA_RANK, LORA_ALPHA = 4, 64.0  # --lora_rank above; lora_alpha is LCMConfig's default
PIPELINE_CLASSES = {"sd": "FewStepStableDiffusionPipeline", "sdxl": "FewStepStableDiffusionXLPipeline",
                    "sd3": "FewStepStableDiffusion3Pipeline", "flux": "FewStepFluxPipeline"}
STOCK_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                 "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# The LCM student's scheduler: diffusers' LCMScheduler on a DDPM teacher, the shipped flow scheduler on SD3 and FLUX.
FLOW = ("sd3", "flux")
SCHEDULERS = {family: "FlowFewStepScheduler" if family in FLOW else "LCMScheduler" for family in STOCK_CLASSES}
SCHEDULER_ENTRIES = {family: ["scheduler_flow" if family in FLOW else "diffusers", SCHEDULERS[family]]
                     for family in STOCK_CLASSES}
NETWORKS = {family: "transformer" if family in FLOW else "unet" for family in STOCK_CLASSES}
# The tiny teachers' size (a FLUX transformer config records none); the tiny FLUX transformer's LoRA moves its images
# less, so it trains at a higher rate to move them measurably in 8 steps.
EXTRA = {"flux": ["--resolution", "32", "--learning_rate", "1e-3"]}


def train(teacher: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """One command line of train_scripts/lcm_lora.py in a fresh process."""
    argv = [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(data),
            "--output_dir", str(out), *FLAGS, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)


def python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A Python snippet in a fresh process started in ``cwd`` (remote code cached under ``cwd``, not in ~)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env=subprocess_env(HF_MODULES_CACHE=str(cwd / "hf_modules")), cwd=cwd)


def tail(result: subprocess.CompletedProcess, lines: int = 30) -> str:
    return "\n".join(result.stderr.replace("\r", "\n").splitlines()[-lines:])


def progress(result: subprocess.CompletedProcess) -> set[str]:
    """The "n/total" positions the training progress bar showed."""
    found = set()
    for segment in result.stderr.replace("\r", "\n").splitlines():
        if segment.startswith("Steps:") and (match := re.search(r"\| (\d+/\d+) \[", segment)):
            found.add(match.group(1))
    return found


def checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.iterdir() if p.name.startswith("checkpoint-")),
                  key=lambda name: (name.endswith(".partial"), int(name.split("-")[1].split(".")[0])))


def global_steps(out: Path) -> dict[str, int]:
    return {name: json.loads((out / name / "trainer_state.json").read_text())["global_step"]
            for name in checkpoints(out)}


def exported_as_checkpoint_keys(out: Path, network: str) -> dict[str, torch.Tensor]:
    """pytorch_lora_weights.safetensors renamed to the parameter names checkpoints store (``...lora_A.default...``)."""
    state = load_file(out / "pytorch_lora_weights.safetensors")
    renamed = {}
    for key, value in state.items():
        assert key.startswith(network + "."), key
        module, kind, leaf = key[len(network) + 1:].rsplit(".", 2)
        renamed[f"{module}.{kind}.default.{leaf}"] = value
    return renamed


@dataclass
class LCMRun:
    family: str
    teacher: Path
    out: Path
    first: subprocess.CompletedProcess  # --max_train_steps 6
    first_listing: list[str]
    first_partials: list[str]
    first_steps: dict[str, int]
    first_checkpoint_files: dict[str, list[str]]
    checkpoint_6: dict[str, torch.Tensor]
    resumed: subprocess.CompletedProcess  # 8 steps, --resume_from_checkpoint latest --checkpoints_total_limit 2


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3", "flux"])
def lcm_run(request, tmp_path_factory, image_folder) -> LCMRun:
    """6 steps with a checkpoint every 2, then resumed from the latest checkpoint to 8 keeping at most 2 checkpoints."""
    family = request.param
    teacher = request.getfixturevalue(f"{family}_teacher")
    out = tmp_path_factory.mktemp(f"lcm-{family}") / "out"
    first = train(teacher, image_folder, out, "--max_train_steps", "6", *EXTRA.get(family, []))
    listing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    partials = [str(p.relative_to(out)) for p in out.rglob("*.partial")] if out.is_dir() else []
    steps = global_steps(out) if out.is_dir() else {}
    files = {name: sorted(p.name for p in (out / name).iterdir()) for name in steps}
    ckpt6_file = out / "checkpoint-6" / "unet_trainable.safetensors"
    ckpt6 = load_file(ckpt6_file) if ckpt6_file.is_file() else {}
    resumed = train(teacher, image_folder, out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest",
                    "--checkpoints_total_limit", "2", *EXTRA.get(family, []))
    return LCMRun(family, teacher, out, first, listing, partials, steps, files, ckpt6, resumed)


# ------------------------------------------------------------------------------------------ training and resuming


def test_training_writes_complete_checkpoints_and_export(lcm_run):
    assert lcm_run.first.returncode == 0, tail(lcm_run.first)
    assert lcm_run.first_partials == []
    assert lcm_run.first_steps == {"checkpoint-2": 2, "checkpoint-4": 4, "checkpoint-6": 6}
    for name, files in lcm_run.first_checkpoint_files.items():
        # Only the trainable weights are checkpointed, not a copy of the teacher.
        assert [f for f in files if f.endswith((".safetensors", ".bin"))] == [
            "optimizer.bin", "scheduler.bin", "unet_trainable.safetensors"], (name, files)
        assert "trainer_state.json" in files and "random_states_0.pkl" in files
    assert {"pytorch_lora_weights.safetensors", "scheduler", "distill_config.json", "README.md",
            "pipeline"} <= set(lcm_run.first_listing)
    assert lcm_run.checkpoint_6 and all("lora_" in key for key in lcm_run.checkpoint_6)
    assert {"1/6", "6/6"} <= progress(lcm_run.first)


def test_resume_from_latest_continues_training(lcm_run):
    run = lcm_run
    assert run.resumed.returncode == 0, tail(run.resumed)
    stderr = run.resumed.stderr
    assert f"Loading states from {run.out / 'checkpoint-6'}" in stderr
    assert progress(run.resumed) == {"6/8", "7/8", "8/8"}  # starts at the checkpoint's step: 1-6 are not redone
    assert global_steps(run.out)["checkpoint-8"] == 8
    assert not list(run.out.rglob("*.partial"))

    checkpoint_8 = load_file(run.out / "checkpoint-8" / "unet_trainable.safetensors")
    exported = exported_as_checkpoint_keys(run.out, NETWORKS[run.family])
    assert set(exported) == set(checkpoint_8) == set(run.checkpoint_6)
    # The export is the final state ...
    for key, value in checkpoint_8.items():
        assert torch.equal(exported[key], value), key
    # ... and training went on after the resume: the LoRA moved away from checkpoint-6.
    changed = [k for k in checkpoint_8 if not torch.allclose(checkpoint_8[k], run.checkpoint_6[k], atol=1e-7, rtol=0)]
    assert len(changed) > len(checkpoint_8) // 2
    assert (run.out / "checkpoint-6" / "unet_trainable.safetensors").is_file()
    assert torch.equal(load_file(run.out / "checkpoint-6" / "unet_trainable.safetensors")[changed[0]],
                       run.checkpoint_6[changed[0]])  # resuming did not rewrite the checkpoint it came from


def test_checkpoints_total_limit_keeps_the_newest(lcm_run):
    assert lcm_run.resumed.returncode == 0, tail(lcm_run.resumed)
    assert checkpoints(lcm_run.out) == ["checkpoint-6", "checkpoint-8"]


def test_exact_resume_mid_epoch_with_random_augmentation(sd_teacher, image_folder, tmp_path_factory):
    """8 uninterrupted steps == 6 steps + resume from checkpoint-6 to 8 (same seed and flags), tensor for tensor.

    8 images at batch 2 make 4 steps per epoch, so checkpoint-6 is in the middle of the second epoch; random crops
    and flips are on. Both depend only on (seed, epoch, index), and the data loader has its own generator, so the
    RNG state restored from the checkpoint is exactly the one the uninterrupted run had at step 7.
    """
    root = tmp_path_factory.mktemp("exact-resume")
    flags = ["--max_train_steps", "8", "--random_flip", "--no_export_pipeline"]
    full = train(sd_teacher, image_folder, root / "full", *flags)
    assert full.returncode == 0, tail(full)
    resumed = train(sd_teacher, image_folder, root / "resumed", *flags,
                    "--resume_from_checkpoint", str(root / "full" / "checkpoint-6"))
    assert resumed.returncode == 0, tail(resumed)
    assert f"Loading states from {root / 'full' / 'checkpoint-6'}" in resumed.stderr
    assert progress(resumed) == {"6/8", "7/8", "8/8"}
    assert checkpoints(root / "resumed") == ["checkpoint-8"]

    a = load_file(root / "full" / "pytorch_lora_weights.safetensors")
    b = load_file(root / "resumed" / "pytorch_lora_weights.safetensors")
    assert set(a) == set(b) and len(a) > 0
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), (key, (a[key] - b[key]).abs().max().item())
    # The run learned something (otherwise equality would be trivial): the LoRA B matrices start at zero.
    assert any(b[k].abs().max() > 0 for k in b if "lora_B" in k)


# ------------------------------------------------------------------------------------------ exported files


def test_model_card_and_sampling_config(lcm_run):
    assert lcm_run.resumed.returncode == 0, tail(lcm_run.resumed)
    card = (lcm_run.out / "README.md").read_text()
    assert SCHEDULERS[lcm_run.family] in card
    assert "samples in 4 steps" in card and "num_inference_steps=4" in card
    assert STOCK_CLASSES[lcm_run.family] in card
    assert "| max_train_steps | 8 |" in card and "| lora_rank | 4 |" in card
    config = json.loads((lcm_run.out / "distill_config.json").read_text())
    assert config["sampling"] == {"scheduler": SCHEDULERS[lcm_run.family], "num_inference_steps": 4,
                                  "guidance_scale": 1.0}
    assert (Path(config["train_data_dir"]) / "metadata.jsonl").is_file()  # the data settings are recorded too
    scheduler = json.loads((lcm_run.out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == SCHEDULERS[lcm_run.family] and scheduler["original_inference_steps"] == 50


def test_lora_file_holds_only_the_networks_lora_weights(lcm_run):
    assert lcm_run.resumed.returncode == 0, tail(lcm_run.resumed)
    state = load_file(lcm_run.out / "pytorch_lora_weights.safetensors")
    assert state and all("lora" in key for key in state)
    assert all(key.startswith(NETWORKS[lcm_run.family] + ".") for key in state)
    a_keys = {k.replace("lora_A", "X") for k in state if ".lora_A." in k}
    b_keys = {k.replace("lora_B", "X") for k in state if ".lora_B." in k}
    assert a_keys == b_keys and len(a_keys) * 2 == len(state)
    for key in state:
        if ".lora_A." in key:
            assert state[key].shape[0] == LORA_RANK
    # Attention projections are adapted (the converter bug that drops them is not back).
    assert any(".to_q.lora_A." in k for k in state) and any(".to_out.0.lora_A." in k for k in state)


# ------------------------------------------------------------------------------------------ loading the student

STOCK_LOADING = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import (FluxPipeline, LCMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    teacher, out, family, prompt, dest = sys.argv[1:6]
    cls = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline,
           "flux": FluxPipeline}[family]
    flow = family in ("sd3", "flux")
    network = "transformer" if flow else "unet"
    if flow:  # the scheduler's file ships in scheduler/, as the model card shows
        sys.path.insert(0, out + "/scheduler")
        from scheduler_flow import FlowFewStepScheduler as LCMScheduler
    pipe = cls.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")

    def sample():
        generator = torch.Generator().manual_seed(0)
        if flow:  # the stock SD3 and FLUX pipelines pass no generator to scheduler.step: re-noising draws from this
            pipe.scheduler.noise_generator = generator
        return pipe(prompt, num_inference_steps=4, guidance_scale=1.0, height=32, width=32, generator=generator,
                    output_type="np").images

    without_lora = sample()
    pipe.load_lora_weights(out)
    with_lora = sample()
    np.save(dest + "/without_lora.npy", without_lora)
    np.save(dest + "/with_lora.npy", with_lora)

    adapted = [m for m in getattr(pipe, network).modules() if isinstance(m, BaseTunerLayer)]
    adapters = sorted({a for m in adapted for a in m.active_adapters})
    loaded = get_peft_model_state_dict(getattr(pipe, network), adapter_name=adapters[0])
    stored = {k[len(network) + 1:]: v for k, v in load_file(out + "/pytorch_lora_weights.safetensors").items()}
    mismatched = [k for k in stored if k not in loaded or not torch.equal(loaded[k].float(), stored[k].float())]
    print(json.dumps({
        "scheduler": type(pipe.scheduler).__name__,
        "adapted_modules": len(adapted),
        "adapters": adapters,
        "scalings": sorted({float(m.scaling[a]) for m in adapted for a in m.active_adapters}),
        "lora_A_keys": sum(".lora_A." in k for k in stored),
        "loaded_keys": len(loaded),
        "mismatched": mismatched[:5],
        "text_encoder_adapted": any(isinstance(m, BaseTunerLayer) for m in pipe.text_encoder.modules()),
    }))
""")

FOLDER_LOADING = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    folder, prompt, dest = sys.argv[1:4]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for steps in (1, 2, 4, None):
        generator = torch.Generator().manual_seed(0)
        kwargs = {} if steps is None else {"num_inference_steps": steps}
        images[f"steps_{steps}"] = pipe(prompt, height=32, width=32, generator=generator, output_type="np",
                                        **kwargs).images
    np.savez(dest + "/folder.npz", **images)
    module = sys.modules[type(pipe).__module__]
    print(json.dumps({
        "class": type(pipe).__name__,
        "module": type(pipe).__module__,
        "module_source": open(module.__file__).read(),
        "scheduler": type(pipe.scheduler).__name__,
        "default_num_inference_steps": pipe.config.default_num_inference_steps,
        "default_guidance_scale": pipe.config.default_guidance_scale,
        "distill_imported": sorted(m for m in sys.modules if m == "distill" or m.startswith("distill.")),
        "sys_path": sys.path,
    }))
""")


@dataclass
class Loaded:
    stock: subprocess.CompletedProcess
    folder: subprocess.CompletedProcess
    cwd: Path

    @staticmethod
    def report(result: subprocess.CompletedProcess) -> dict:
        assert result.returncode == 0, tail(result)
        return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def loaded(lcm_run, tmp_path_factory) -> Loaded:
    """The final (8-step) student loaded both ways, each in its own fresh process outside the repository."""
    assert lcm_run.resumed.returncode == 0, tail(lcm_run.resumed)
    cwd = tmp_path_factory.mktemp(f"load-{lcm_run.family}")
    stock = python(STOCK_LOADING, cwd, str(lcm_run.teacher), str(lcm_run.out), lcm_run.family, PROMPT, str(cwd))
    folder = python(FOLDER_LOADING, cwd, str(lcm_run.out / "pipeline"), PROMPT, str(cwd))
    return Loaded(stock, folder, cwd)


def test_stock_pipeline_loads_the_whole_lora(lcm_run, loaded):
    report = Loaded.report(loaded.stock)
    assert report["scheduler"] == SCHEDULERS[lcm_run.family]
    # Every LoRA pair in the file reached a module, with the stored values and the trained alpha / rank.
    assert report["adapted_modules"] == report["lora_A_keys"] > 0
    assert report["loaded_keys"] == 2 * report["lora_A_keys"]
    assert report["mismatched"] == []
    assert report["scalings"] == [LORA_ALPHA / LORA_RANK]
    assert report["text_encoder_adapted"] is False

    with_lora = np.load(loaded.cwd / "with_lora.npy")
    without_lora = np.load(loaded.cwd / "without_lora.npy")
    assert with_lora.shape == (1, 32, 32, 3)
    assert np.isfinite(with_lora).all() and 0 <= with_lora.min() and with_lora.max() <= 1
    assert np.abs(with_lora - without_lora).max() > 1e-2


def test_self_contained_pipeline_folder(lcm_run, loaded):
    report = Loaded.report(loaded.folder)
    assert report["class"] == PIPELINE_CLASSES[lcm_run.family]
    assert report["scheduler"] == SCHEDULERS[lcm_run.family]
    assert report["default_num_inference_steps"] == 4 and report["default_guidance_scale"] == 1.0
    # The code came from the folder, not from this repository.
    assert report["distill_imported"] == []
    assert not report["module"].startswith("distill")
    assert report["module_source"] == (lcm_run.out / "pipeline" / "pipeline_few_step.py").read_text()
    assert str(REPO) not in report["sys_path"] and "" in report["sys_path"]
    index = json.loads((lcm_run.out / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_few_step", PIPELINE_CLASSES[lcm_run.family]]
    assert index["scheduler"] == SCHEDULER_ENTRIES[lcm_run.family]

    images = np.load(loaded.cwd / "folder.npz")
    for key in images.files:
        assert images[key].shape == (1, 32, 32, 3) and np.isfinite(images[key]).all(), key
    # No num_inference_steps given: the stored default (4) is used.
    np.testing.assert_array_equal(images["steps_None"], images["steps_4"])
    assert np.abs(images["steps_1"] - images["steps_4"]).max() > 1e-3
    assert np.abs(images["steps_2"] - images["steps_4"]).max() > 1e-3
    # The fused folder samples what the stock pipeline + LoRA samples.
    stock = np.load(loaded.cwd / "with_lora.npy")
    np.testing.assert_allclose(images["steps_4"], stock, rtol=0, atol=1e-3)
