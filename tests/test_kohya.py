"""--export_format kohya: the LoRA in kohya-ss keys, loaded by stock diffusers and combined with a second LoRA.

Each teacher is distilled once by train_scripts/lcm_lora.py with ``--export_format kohya``; the tests read the two
LoRA files it wrote and load them with the stock ``StableDiffusion(XL)Pipeline.load_lora_weights``. The learning rate
is high so that two steps move the LoRA far from zero, and lora_alpha (64) differs from the rank (4), so a wrong
``.alpha`` (diffusers' converter stores alpha = rank) would change the images by a factor of 16 in the LoRA delta.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "lcm_lora.py"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
PEFT_FILE = "pytorch_lora_weights.safetensors"
LORA_RANK, LORA_ALPHA = 4, 64.0
PROMPT = "a striped picture number 3"
KOHYA_KEY = re.compile(r"^(lora_unet_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass
class KohyaRun:
    family: str
    teacher: Path
    out: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def kohya_run(request, tmp_path_factory, image_folder) -> KohyaRun:
    teacher = request.getfixturevalue(f"{request.param}_teacher")
    out = tmp_path_factory.mktemp(f"kohya-{request.param}") / "out"
    argv = [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(teacher), "--train_data_dir",
            str(image_folder), "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "2",
            "--lora_rank", str(LORA_RANK), "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--seed", "0",
            "--validation_steps", "0", "--report_to", "none", "--no_export_pipeline", "--export_format", "kohya"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return KohyaRun(request.param, teacher, out, result)


def stock_pipeline(run: KohyaRun):
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if run.family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(run.teacher)
    pipe.scheduler = LCMScheduler.from_pretrained(run.out, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, height=32, width=32, generator=generator,
                output_type="np").images


def test_kohya_keys_name_every_adapted_module(kohya_run):
    """lora_unet_<diffusers module path, dots as underscores> with lora_down/lora_up/alpha: kohya's naming for a
    diffusers-layout UNet, which ComfyUI and AUTOMATIC1111 map onto their UNet modules."""
    from diffusers import UNet2DConditionModel

    kohya = load_file(kohya_run.out / KOHYA_FILE)
    peft = load_file(kohya_run.out / PEFT_FILE)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in kohya.items():
        match = KOHYA_KEY.match(key)
        assert match, key
        groups.setdefault(match.group(1), {})[match.group(2)] = value
    assert all(set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in groups.values())

    # One kohya module per peft module, holding the same matrices.
    peft_modules = {k[len("unet."):].rsplit(".lora_A.", 1)[0] for k in peft if ".lora_A." in k}
    module_of = {f"lora_unet_{m.replace('.', '_')}": m for m in peft_modules}
    assert len(module_of) == len(peft_modules) and set(groups) == set(module_of)
    for name, parts in groups.items():
        module = module_of[name]
        assert torch.equal(parts["lora_down.weight"], peft[f"unet.{module}.lora_A.weight"]), name
        assert torch.equal(parts["lora_up.weight"], peft[f"unet.{module}.lora_B.weight"]), name
        assert parts["lora_down.weight"].shape[0] == LORA_RANK
        assert parts["alpha"].ndim == 0 and parts["alpha"].item() == LORA_ALPHA
    # Attention, feed-forward and resnet layers are all there, and every name resolves to exactly one module of
    # the teacher's UNet when underscores are read back as the module path (what ComfyUI's key map does).
    assert any(n.endswith("_attn1_to_q") for n in groups) and any(n.endswith("_attn2_to_out_0") for n in groups)
    assert any(n.endswith("_ff_net_0_proj") for n in groups) and any(n.endswith("_resnets_0_conv1") for n in groups)
    unet = UNet2DConditionModel.from_pretrained(kohya_run.teacher, subfolder="unet")
    flat = {}
    for path, _ in unet.named_modules():
        flat.setdefault(f"lora_unet_{path.replace('.', '_')}", []).append(path)
    assert all(flat.get(name) == [module_of[name]] for name in groups)
    with safe_open(kohya_run.out / KOHYA_FILE, "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_stock_pipeline_samples_the_same_from_kohya_and_peft_files(kohya_run):
    pipe = stock_pipeline(kohya_run)
    teacher_only = sample(pipe)
    pipe.load_lora_weights(kohya_run.out)  # pytorch_lora_weights.safetensors (peft keys)
    from_peft = sample(pipe)
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(sample(pipe), teacher_only)
    pipe.load_lora_weights(kohya_run.out, weight_name=KOHYA_FILE)
    from_kohya = sample(pipe)

    assert np.abs(from_peft - teacher_only).max() > 5e-2  # the LoRA matters, so equality below is informative
    np.testing.assert_allclose(from_kohya, from_peft, rtol=0, atol=1e-5)


def make_style_lora(teacher: Path, folder: Path) -> Path:
    """A second LoRA on the attention layers only (a stand-in for a style LoRA), with non-zero random weights."""
    from diffusers import UNet2DConditionModel

    from distill.conditioning import inspect_teacher
    from distill.lora import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    generator = torch.Generator().manual_seed(1)
    for param in add_lora(unet, rank=2, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]):
        param.data = 0.3 * torch.randn(param.shape, generator=generator)
    return save_lora(folder, unet, inspect_teacher(str(teacher))).parent


@pytest.mark.parametrize("kohya_run", ["sd"], indirect=True)  # adapter mixing does not depend on the family
def test_distilled_kohya_lora_combines_with_a_style_lora(kohya_run, tmp_path):
    style = make_style_lora(kohya_run.teacher, tmp_path / "style")
    pipe = stock_pipeline(kohya_run)
    pipe.load_lora_weights(kohya_run.out, weight_name=KOHYA_FILE, adapter_name="distilled")
    distilled_only = sample(pipe)
    pipe.load_lora_weights(style, adapter_name="style")
    assert set(pipe.get_list_adapters()["unet"]) == {"distilled", "style"}

    outputs = {}
    for weight in (0.0, 0.5, 1.0):
        pipe.set_adapters(["distilled", "style"], adapter_weights=[1.0, weight])
        outputs[weight] = sample(pipe)
    np.testing.assert_allclose(outputs[0.0], distilled_only, rtol=0, atol=1e-6)
    assert np.abs(outputs[0.5] - outputs[0.0]).max() > 1e-2
    assert np.abs(outputs[1.0] - outputs[0.5]).max() > 1e-2
    # The style adapter at weight 1 with the distilled one switched off is yet another image: both contribute.
    pipe.set_adapters(["distilled", "style"], adapter_weights=[0.0, 1.0])
    assert np.abs(sample(pipe) - outputs[1.0]).max() > 1e-2
