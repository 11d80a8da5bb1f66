"""Every template in model_cards/ rendered through distill.export.write_model_card: each value lands in the card.

The placeholders are the contract between export.py and the templates: every template uses the core ones (the usage
snippet needs scheduler, steps and guidance), uses no name that write_model_card does not fill, and each name it uses
shows up in the rendered card with the value passed in.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from jinja2 import Environment, meta

from distill.teacher import inspect_teacher
from distill.export import card_template, copy_sample_grid, method_description, write_model_card
from distill.methods import METHODS, LCM, Method, SamplingSpec

TEMPLATES = sorted(p.name for p in resources.files("distill.model_cards").iterdir() if p.name.endswith(".md"))
CORE = {"card_data", "method", "teacher", "pipeline_class", "scheduler", "steps", "guidance", "hyperparameters",
        "metrics"}
OPTIONAL = {"scheduler_import", "repo_id", "samples", "pipeline_subfolder", "kohya_file", "description"}
TEACHER_ID = "org/teacher-for-the-card"
REPO_ID = "someone/student-for-the-card"
DEFAULTS = SamplingSpec("LCMScheduler", num_inference_steps=3, guidance_scale=1.5)
DESCRIPTION = "A student that learns the teacher's x0 in one call."
HYPER = {"lora_rank": 7, "learning_rate": 0.0005}
METRICS = {"fd_1_step": 12.5, "accuracy_4_steps": 0.98}
# What each placeholder must put in the card.
EXPECTED = {
    "method": [],  # checked through the metadata tags (templates may upper-case it in the title)
    "teacher": [TEACHER_ID],
    "pipeline_class": [],  # checked per family below
    "scheduler": ["LCMScheduler"],
    "steps": ["num_inference_steps=3"],
    "guidance": ["guidance_scale=1.5"],
    "hyperparameters": ["| learning_rate | 0.0005 |\n| lora_rank | 7 |"],
    "metrics": ["| accuracy_4_steps | 0.98 |\n| fd_1_step | 12.5 |"],
    "scheduler_import": ["from diffusers import LCMScheduler"],
    "repo_id": [REPO_ID],
    "samples": ["](samples.png)"],
    "pipeline_subfolder": ['subfolder="pipeline"'],
    "kohya_file": ["pytorch_lora_weights_kohya.safetensors"],
    "description": [DESCRIPTION],
}


def placeholders(name: str) -> set[str]:
    source = resources.files("distill.model_cards").joinpath(name).read_text()
    return meta.find_undeclared_variables(Environment().parse(source))


def render(folder: Path, template: str, teacher: Path, **optional) -> str:
    method = template.removesuffix(".md")
    path = write_model_card(folder, method, inspect_teacher(str(teacher)), TEACHER_ID, DEFAULTS, HYPER, METRICS,
                            **optional)
    assert path == folder / "README.md"
    return path.read_text()


def test_every_method_has_a_template():
    assert {"lcm.md", "generic.md"} <= set(TEMPLATES)
    assert {f"{name}.md" for name in METHODS} <= set(TEMPLATES)  # a new method may start on generic.md


def test_a_method_without_a_template_gets_the_generic_one():
    generic = resources.files("distill.model_cards").joinpath("generic.md").read_text()
    assert card_template("a-method-without-a-card") == generic
    assert card_template("lcm") == resources.files("distill.model_cards").joinpath("lcm.md").read_text() != generic


def test_generic_card_describes_the_method_by_its_class_docstring(sd_teacher, tmp_path):
    class Undocumented(Method):  # a docstring is not inherited from Method
        pass

    assert method_description(LCM) == LCM.__doc__ and method_description(Undocumented) is None
    path = write_model_card(tmp_path, "toy", inspect_teacher(str(sd_teacher)), TEACHER_ID, DEFAULTS, HYPER,
                            description=method_description(LCM))
    text = path.read_text()
    assert "# TOY student of org/teacher-for-the-card" in text and "with the `toy` method" in text
    assert f"About the method: {LCM.__doc__}" in text
    assert "num_inference_steps=3, guidance_scale=1.5" in text and "from diffusers import LCMScheduler" in text
    assert "toy" in ModelCard.load(path).data.tags


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_uses_only_known_placeholders(template):
    used = placeholders(template)
    assert CORE <= used, f"{template} lacks {sorted(CORE - used)}"
    assert used <= CORE | OPTIONAL, f"{template} uses unknown {sorted(used - CORE - OPTIONAL)}"


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_values_land_in_the_card(template, family, request, tmp_path):
    teacher = request.getfixturevalue(f"{family}_teacher")
    text = render(tmp_path, template, teacher, repo_id=REPO_ID, samples="samples.png",
                  pipeline_subfolder="pipeline", kohya_file="pytorch_lora_weights_kohya.safetensors",
                  description=DESCRIPTION)
    assert "{{" not in text and "{%" not in text
    for name in placeholders(template) - {"card_data"}:
        for snippet in EXPECTED[name]:
            assert snippet in text, (template, name, snippet)
    expected_class = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    other_class = "StableDiffusionPipeline" if family == "sdxl" else "StableDiffusionXLPipeline"
    assert f"{expected_class}.from_pretrained" in text and f"{other_class}.from_pretrained" not in text

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == TEACHER_ID and card.data.library_name == "diffusers"
    assert template.removesuffix(".md") in card.data.tags


@pytest.mark.parametrize("template", ["lcm.md", "generic.md"])
def test_optional_sections_disappear_when_not_given(template, sd_teacher, tmp_path):
    text = render(tmp_path, template, sd_teacher)
    assert "samples.png" not in text and "![" not in text and "About the method" not in text
    assert "trust_remote_code" not in text and "kohya" not in text
    assert 'load_lora_weights("<this repo>")' in text
    assert "\n\n\n" not in text  # the template's conditional blocks leave no gaps


def test_metrics_placeholder_when_nothing_was_measured(sd_teacher, tmp_path):
    path = write_model_card(tmp_path, "lcm", inspect_teacher(str(sd_teacher)), TEACHER_ID, DEFAULTS, HYPER)
    assert "| not measured | |" in path.read_text()


def test_sample_grid_is_the_newest_validation_grid(tmp_path):
    assert copy_sample_grid(tmp_path) is None and not (tmp_path / "samples.png").exists()
    (tmp_path / "validation").mkdir()
    for step in (2, 10, 9):  # numeric order, not text order ("step-9" > "step-10" as text)
        (tmp_path / "validation" / f"step-{step}.png").write_bytes(f"grid {step}".encode())
    assert copy_sample_grid(tmp_path) == tmp_path / "samples.png"
    assert (tmp_path / "samples.png").read_bytes() == b"grid 10"
