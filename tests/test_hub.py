"""--push_to_hub: the exact files that would be uploaded and the model card, with only the network call faked.

train_scripts/lcm_lora.py runs in a fresh process whose huggingface_hub.HfApi.create_repo and HfApi.upload_folder
(the two calls that would talk to the Hub) record their arguments instead. Everything else is real: the training
run, the export, the card, and the file selection, which the test recomputes from the recorded allow/ignore patterns
with huggingface_hub's own filter (the function upload_folder applies) over the files really on disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "lcm_lora.py"
REPO_ID = "someone/tiny-lcm-lora"
TOKEN = "hf_not_a_real_token"
STUDENT_FILES = {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
                 "scheduler/scheduler_config.json", "README.md", "samples.png", "distill_config.json"}

# Runs the real script; the two HfApi methods that would make HTTP requests record their (validated) arguments.
RECORDING_RUN = textwrap.dedent("""
    import inspect, json, runpy, sys
    from huggingface_hub import HfApi, RepoUrl

    record_file, script, *argv = sys.argv[1:]
    calls = []

    def recorder(name, result):
        real = getattr(HfApi, name)
        def fake(self, *args, **kwargs):
            bound = inspect.signature(real).bind(self, *args, **kwargs)  # the real call would accept these
            calls.append({"method": name, "token": self.token,
                          "arguments": {k: v for k, v in bound.arguments.items() if k != "self"}})
            return result(bound.arguments)
        setattr(HfApi, name, fake)

    recorder("create_repo", lambda a: RepoUrl("https://huggingface.co/" + a["repo_id"]))
    recorder("upload_folder", lambda a: None)
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(record_file, "w") as f:
            json.dump(calls, f, default=str)
""")


@dataclass
class PushRun:
    teacher: Path
    out: Path
    result: subprocess.CompletedProcess
    calls: list[dict]


def on_disk(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def selected(folder: Path, upload: dict) -> set[str]:
    """The files upload_folder would send: its own filter, with its default ignore patterns added as it does."""
    ignore = list(upload["ignore_patterns"] or []) + DEFAULT_IGNORE_PATTERNS
    return set(filter_repo_objects(on_disk(folder), allow_patterns=upload["allow_patterns"], ignore_patterns=ignore))


@pytest.fixture(scope="module")
def push_run(sd_teacher, image_folder, tmp_path_factory) -> PushRun:
    """Two steps with everything that must stay local switched on: checkpoints, tensorboard logs, a latent cache,
    validation grids, the pipeline folder, and a file of the user's in the output folder."""
    root = tmp_path_factory.mktemp("push")
    out = root / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my own notes, not for the Hub")
    record = root / "calls.json"
    argv = ["--pretrained_teacher_model", str(sd_teacher), "--train_data_dir", str(image_folder), "--output_dir",
            str(out), "--max_train_steps", "2", "--train_batch_size", "2", "--lora_rank", "4", "--seed", "0",
            "--checkpointing_steps", "1", "--validation_steps", "1", "--validation_prompts", "a cat,a dog",
            "--report_to", "tensorboard", "--cache_latents", "--export_format", "kohya", "--push_to_hub",
            "--hub_model_id", REPO_ID, "--hub_token", TOKEN, "--hub_private_repo"]
    result = subprocess.run([sys.executable, "-c", RECORDING_RUN, str(record), str(SCRIPT), *argv],
                            capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)
    calls = json.loads(record.read_text()) if record.is_file() else []
    return PushRun(sd_teacher, out, result, calls)


def test_push_uploads_exactly_the_student_files(push_run):
    assert push_run.result.returncode == 0, push_run.result.stderr[-3000:]
    assert [c["method"] for c in push_run.calls] == ["create_repo", "upload_folder"]
    create, upload = (c["arguments"] for c in push_run.calls)
    assert all(c["token"] == TOKEN for c in push_run.calls)
    assert create == {"repo_id": REPO_ID, "private": True, "exist_ok": True, "repo_type": "model"}
    assert upload["repo_id"] == REPO_ID and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == push_run.out

    files = on_disk(push_run.out)
    # The run really left behind everything that must not be uploaded ...
    for local in ("checkpoint-1/", "checkpoint-2/", "logs/", "cache/", "validation/step-2.png", "pipeline/",
                  "notes.txt"):
        assert any(f.startswith(local) for f in files), (local, files)
    # ... and the upload is exactly the student: weights in both key formats, scheduler, card, samples, settings.
    assert selected(push_run.out, upload) == STUDENT_FILES


def test_uploaded_card_and_settings(push_run):
    assert push_run.result.returncode == 0, push_run.result.stderr[-3000:]
    card = ModelCard.load(push_run.out / "README.md")
    assert card.data.base_model == str(push_run.teacher)
    assert card.data.library_name == "diffusers" and "lcm" in card.data.tags
    text = card.text
    assert f'LCMScheduler.from_pretrained("{REPO_ID}", subfolder="scheduler")' in text
    assert f'pipe.load_lora_weights("{REPO_ID}")' in text
    assert "from diffusers import LCMScheduler" in text
    assert "StableDiffusionPipeline.from_pretrained" in text
    assert "num_inference_steps=4, guidance_scale=1.0" in text
    assert "](samples.png)" in text
    assert "`pytorch_lora_weights_kohya.safetensors` holds the same LoRA" in text
    assert "| max_train_steps | 2 |" in text and "| lora_rank | 4 |" in text
    # The pipeline folder is not uploaded (no --hub_include_pipeline), so the card does not offer it.
    assert "trust_remote_code" not in text and 'subfolder="pipeline"' not in text
    # The sample grid is the last validation grid.
    assert (push_run.out / "samples.png").read_bytes() == (push_run.out / "validation" / "step-2.png").read_bytes()
    # The token reaches the Hub client but no uploaded file.
    for name in STUDENT_FILES:
        assert TOKEN.encode() not in (push_run.out / name).read_bytes(), name
    settings = json.loads((push_run.out / "distill_config.json").read_text())
    assert settings["hub_model_id"] == REPO_ID and "hub_token" not in settings


def test_include_pipeline_adds_the_pipeline_folder(push_run, monkeypatch):
    """push_to_hub(..., include_pipeline=True), the --hub_include_pipeline path, on the folder the run wrote."""
    from huggingface_hub import RepoUrl

    from distill.export import push_to_hub

    assert push_run.result.returncode == 0, push_run.result.stderr[-3000:]
    # What an export interrupted while writing the pipeline folder leaves behind (it is renamed only when complete).
    (push_run.out / "pipeline.partial" / "unet").mkdir(parents=True, exist_ok=True)
    (push_run.out / "pipeline.partial" / "unet" / "config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(kw))
    assert push_to_hub(push_run.out, REPO_ID, include_pipeline=True) == REPO_ID
    pipeline_files = {f"pipeline/{f}" for f in on_disk(push_run.out / "pipeline")}
    assert {"pipeline/model_index.json", "pipeline/pipeline_few_step.py",
            "pipeline/scheduler/scheduler_config.json"} <= pipeline_files
    assert any(f.startswith("pipeline/unet/") for f in pipeline_files)
    assert selected(push_run.out, calls[0]) == STUDENT_FILES | pipeline_files
    assert "pipeline.partial/unet/config.json" in on_disk(push_run.out)


def test_card_offers_the_pipeline_when_it_is_uploaded(push_run, tmp_path):
    """With --hub_include_pipeline the card's second snippet loads the uploaded pipeline/ folder."""
    from distill.teacher import inspect_teacher
    from distill.export import write_model_card
    from distill.methods import SamplingSpec

    recorded = json.loads((push_run.out / "distill_config.json").read_text())["sampling"]
    write_model_card(tmp_path, "lcm", inspect_teacher(str(push_run.teacher)), "org/teacher",
                     SamplingSpec(**recorded), {}, repo_id=REPO_ID, pipeline_subfolder="pipeline")
    text = (tmp_path / "README.md").read_text()
    assert (f'DiffusionPipeline.from_pretrained("{REPO_ID}", subfolder="pipeline", trust_remote_code=True)'
            in text)
    assert "4 steps, guidance 1.0 by default" in text
