"""The kohya-key LoRA file (written by default): every module maps in every client, and stock diffusers loads it.

Full-size SD 1.5 and SDXL UNets, built on the meta device from their real configs (no download), carry this repo's
LoRA on its default targets; each exported module name must land on its own module under each client's rules:
diffusers' ``load_lora_weights`` conversion, ComfyUI/Forge's key map and AUTOMATIC1111's lookup. The original
(SGM/LDM) layout those clients use is taken from diffusers' single-file converter, run in reverse.

Each tiny teacher is also distilled once by train_scripts/lcm_lora.py with default export flags; the tests read the
two LoRA files it wrote and load them with the stock ``StableDiffusion(XL)Pipeline.load_lora_weights``. The learning
rate is high so that two steps move the LoRA far from zero, and lora_alpha (64) differs from the rank (4), so a wrong
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
from distill.families import SD, SDXL, UNET_LORA_TARGETS
from distill.lora import add_lora, kohya_layout, kohya_module_names, sgm_module_path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "lcm_lora.py"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
PEFT_FILE = "pytorch_lora_weights.safetensors"
LORA_RANK, LORA_ALPHA = 4, 64.0
PROMPT = "a striped picture number 3"
KOHYA_KEY = re.compile(r"^(lora_unet_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")

# runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the values that
# differ from UNet2DConditionModel's defaults).
SD15_UNET = dict(
    attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=2, sample_size=64,
)
SDXL_UNET = dict(
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
)
# family, config, adapted modules with the default targets, input/output blocks of the original layout
FULL_SIZE = {"sd15": (SD.name, SD15_UNET, 278, 12), "sdxl": (SDXL.name, SDXL_UNET, 788, 9)}


@dataclass
class FullUNet:
    family: str
    unet: torch.nn.Module  # meta tensors, with this repo's LoRA on the default targets
    modules: int
    blocks: int
    weights: list[str]  # the UNet's own parameter names, before the LoRA
    original: dict[str, str]  # diffusers module path -> original-layout module path, for every weight of the UNet


@pytest.fixture(scope="module", params=list(FULL_SIZE))
def full_unet(request) -> FullUNet:
    from diffusers import UNet2DConditionModel

    family, config, modules, blocks = FULL_SIZE[request.param]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        weights = list(unet.state_dict())
        add_lora(unet, UNET_LORA_TARGETS)
    paths = {key.rsplit(".", 1)[0] for key in weights}
    return FullUNet(family, unet, modules, blocks, weights, {p: sgm_module_path(p, unet.config) for p in paths})


def test_original_layout_is_what_diffusers_single_file_converter_reads(full_unet):
    """Every UNet weight, renamed to the original layout and read back by diffusers' own single-file converter
    (``convert_ldm_unet_checkpoint``), returns to its own name: the layout is the one SD/SDXL checkpoints use."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    original = full_unet.original
    checkpoint = {}
    for key in full_unet.weights:
        path, leaf = key.rsplit(".", 1)
        checkpoint[f"{LDM_UNET_KEY}{original[path]}.{leaf}"] = key
    assert len(checkpoint) == len(full_unet.weights)
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(full_unet.unet.config))
    assert converted == {key: key for key in full_unet.weights}

    def count(block: str) -> int:
        return len({p.split(".")[1] for p in original.values() if p.startswith(f"{block}.")})
    assert (count("input_blocks"), count("middle_block"), count("output_blocks")) == (full_unet.blocks, 3,
                                                                                         full_unet.blocks)
    flat = {p.replace(".", "_") for p in original.values()}
    assert len(flat) == len(original)  # underscores instead of dots name no two modules alike
    # The converter also reads an upsampler at output_blocks.N.1.conv; the original layout has it there only where
    # the block has no attention (which sits at .1), so a slot holds an upsampler conv or nothing else.
    slots: dict[str, set[str]] = {}
    for path in original.values():
        parts = path.split(".")
        slots.setdefault(".".join(parts[:3]), set()).add(parts[3] if len(parts) > 3 else "")
    assert all(children == {"conv"} for children in slots.values() if "conv" in children)


def test_default_targets_adapt_every_layer_kohya_names_cover(full_unet):
    names = kohya_module_names(full_unet.unet, full_unet.family)
    assert len(names) == full_unet.modules  # 278 SD 1.5 / 788 SDXL modules
    assert len(set(names.values())) == len(names)
    layout = "down_blocks" if full_unet.family == SD.name else "input_blocks"
    assert any(f"_{layout}_" in name for name in names.values())
    if full_unet.family == SDXL.name:  # kohya's sd-scripts SDXL names, which A1111 looks up as they are
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names.values()
        assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in names.values()
        assert names["up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_2_2_conv"
    else:  # kohya's sd-scripts SD 1.x names
        assert names["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")


def test_diffusers_load_lora_weights_maps_every_module_to_its_own(full_unet):
    """The conversion ``load_lora_weights`` applies to a kohya file (``lora_state_dict``, with the UNet config only
    for SDXL as the stock pipelines pass it, then ``convert_unet_state_dict_to_peft``) lands on the module each key
    came from: all 278 / 788 of them."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    names = kohya_module_names(full_unet.unet, full_unet.family)
    paths = list(names)
    file = {}
    for index, (path, name) in enumerate(names.items()):  # each module's tensors carry its index
        file[f"{name}.lora_down.weight"] = torch.full((1, 1), float(index))
        file[f"{name}.lora_up.weight"] = torch.full((1, 1), float(index))
        file[f"{name}.alpha"] = torch.tensor(LORA_ALPHA)
    if full_unet.family == SDXL.name:
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(file, unet_config=full_unet.unet.config)
    else:
        state, alphas = StableDiffusionPipeline.lora_state_dict(file)
    assert all(key.startswith("unet.") for key in state) and len(alphas) == len(names)
    peft = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items()})
    landed = {}
    for key, value in peft.items():
        path, part = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key).groups()
        assert path == paths[int(value.item())], key
        landed.setdefault(path, set()).add(part)
    assert landed == {path: {"lora_A", "lora_B"} for path in paths}


def a1111_compvis_name(name: str) -> str:
    """AUTOMATIC1111's rewrite of a diffusers-style kohya UNet name (extensions-builtin/Lora/networks.py,
    ``convert_diffusers_name_to_compvis``): block numbers assume 3 layers per level and an attention-free first up
    block, as in SD 1.x/2.x; any other name comes back unchanged."""
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}

    def suffix(kind: str, rest: str) -> str:
        return resnet.get(rest, rest) if kind == "resnets" else rest

    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        inner = 1 if m[2] == "attentions" else 0
        return f"diffusion_model_input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_{inner}_{suffix(m[2], m[4])}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"diffusion_model_middle_block_{index}_{suffix(m[1], m[3])}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        inner = 1 if m[2] == "attentions" else 0
        return f"diffusion_model_output_blocks_{3 * int(m[1]) + int(m[3])}_{inner}_{suffix(m[2], m[4])}"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name):
        return f"diffusion_model_output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"
    if m := re.fullmatch(r"lora_unet_conv_in(.*)", name):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.fullmatch(r"lora_unet_conv_out(.*)", name):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.fullmatch(r"lora_unet_time_embedding_linear_(\d+)(.*)", name):
        return f"diffusion_model_time_embed_{2 * int(m[1]) - 2}{m[2]}"
    return name


def a1111_target(name: str, modules: set[str]) -> str | None:
    """The UNet module A1111 patches for kohya module ``name``: its rewrite if that names a module, else the name
    with ``lora_unet`` read as ``diffusion_model`` (how it reads SDXL files); None: dropped."""
    key = a1111_compvis_name(name)
    if key in modules:
        return key
    key = name.replace("lora_unet", "diffusion_model")
    return key if key in modules else None


def test_comfyui_forge_and_a1111_map_every_module_to_its_own(full_unet):
    """Each exported name reaches the module it came from, in the original layout: through ComfyUI's and Forge's
    key map (``lora_unet_`` + an original name, or + a diffusers name that comfy.utils.unet_to_diffusers knows) and
    through AUTOMATIC1111's lookup."""
    original = full_unet.original
    comfy_map = {f"lora_unet_{o.replace('.', '_')}": o for o in original.values()}
    comfy_map.update({f"lora_unet_{p.replace('.', '_')}": o for p, o in original.items()})
    a1111_modules = {f"diffusion_model_{o.replace('.', '_')}" for o in original.values()}

    names = kohya_module_names(full_unet.unet, full_unet.family)
    assert all(comfy_map.get(name) == original[path] for path, name in names.items())
    a1111 = {path: a1111_target(name, a1111_modules) for path, name in names.items()}
    assert {p: t for p, t in a1111.items() if t != f"diffusion_model_{original[p].replace('.', '_')}"} == {}
    assert len(a1111) == full_unet.modules


def test_a1111_would_drop_sdxl_upsampler_under_diffusers_names(full_unet):
    """Why SDXL files use original names: A1111's rewrite of diffusers names puts SDXL's first upsampler (whose up
    block has attention) at output_blocks.2.1.conv, which does not exist; 787 of the 788 modules would reach their
    module. The same rewrite is right for every SD 1.5 module."""
    original = full_unet.original
    a1111_modules = {f"diffusion_model_{o.replace('.', '_')}" for o in original.values()}
    diffusers_names = kohya_module_names(full_unet.unet, SD.name)  # what an SD-style export of this UNet would hold
    right = [p for p, name in diffusers_names.items()
             if a1111_target(name, a1111_modules) == f"diffusion_model_{original[p].replace('.', '_')}"]
    missed = sorted(set(diffusers_names) - set(right))
    if full_unet.family == SDXL.name:
        assert (len(right), missed) == (787, ["up_blocks.0.upsamplers.0.conv"])
    else:
        assert (len(right), missed) == (278, [])


@dataclass
class KohyaRun:
    family: str
    teacher: Path
    out: Path
    result: subprocess.CompletedProcess


def train(teacher: Path, images: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(SCRIPT), "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(images),
            "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "2", "--lora_rank",
            str(LORA_RANK), "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--seed", "0", "--validation_steps",
            "0", "--report_to", "none", "--no_export_pipeline", *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)


# SD runs with the default export flags; SDXL with --export_format kohya, the old way to ask for the kohya file.
EXPORT_FLAGS = {"sd": [], "sdxl": ["--export_format", "kohya"]}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def kohya_run(request, tmp_path_factory, image_folder) -> KohyaRun:
    """A distillation run that wrote both LoRA files."""
    teacher = request.getfixturevalue(f"{request.param}_teacher")
    out = tmp_path_factory.mktemp(f"kohya-{request.param}") / "out"
    result = train(teacher, image_folder, out, *EXPORT_FLAGS[request.param])
    assert result.returncode == 0, result.stderr[-3000:]
    return KohyaRun(request.param, teacher, out, result)


def test_export_format_diffusers_writes_only_the_peft_file(sd_teacher, image_folder, tmp_path):
    result = train(sd_teacher, image_folder, tmp_path / "out", "--export_format", "diffusers", "--max_train_steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / PEFT_FILE).is_file() and not (tmp_path / "out" / KOHYA_FILE).exists()
    assert "kohya" not in (tmp_path / "out" / "README.md").read_text()


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
    """lora_unet_<module name, dots as underscores> with lora_down/lora_up/alpha, one per peft module with the same
    matrices: diffusers module names for SD, the original layout's for SDXL (as kohya's sd-scripts writes them)."""
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
    unet = UNet2DConditionModel.from_pretrained(kohya_run.teacher, subfolder="unet")
    layout = kohya_layout(kohya_run.family)
    peft_modules = {k[len("unet."):].rsplit(".lora_A.", 1)[0] for k in peft if ".lora_A." in k}
    module_of = {f"lora_unet_{layout(m, unet.config).replace('.', '_')}": m for m in peft_modules}
    assert len(module_of) == len(peft_modules) and set(groups) == set(module_of)
    for name, parts in groups.items():
        module = module_of[name]
        assert torch.equal(parts["lora_down.weight"], peft[f"unet.{module}.lora_A.weight"]), name
        assert torch.equal(parts["lora_up.weight"], peft[f"unet.{module}.lora_B.weight"]), name
        assert parts["lora_down.weight"].shape[0] == LORA_RANK
        assert parts["alpha"].ndim == 0 and parts["alpha"].item() == LORA_ALPHA
    # Attention, feed-forward and resnet layers are all there.
    assert any(n.endswith("_attn1_to_q") for n in groups) and any(n.endswith("_attn2_to_out_0") for n in groups)
    assert any(n.endswith("_ff_net_0_proj") for n in groups)
    if kohya_run.family == "sd":  # underscores read back as the module path name exactly one module
        assert any(n.endswith("_resnets_0_conv1") for n in groups)
        flat = {}
        for path, _ in unet.named_modules():
            flat.setdefault(f"lora_unet_{path.replace('.', '_')}", []).append(path)
        assert all(flat.get(name) == [module_of[name]] for name in groups)
    else:
        assert any(n.endswith("_0_in_layers_2") for n in groups) and any(n.endswith("_2_conv") for n in groups)
        assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                   for n in groups)
    with safe_open(kohya_run.out / KOHYA_FILE, "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_model_card_names_the_file_for_each_tool(kohya_run):
    card = (kohya_run.out / "README.md").read_text()
    assert f"`{KOHYA_FILE}` holds the same LoRA" in card and "ComfyUI, Forge and AUTOMATIC1111" in card
    assert "load_lora_weights" in card


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

    from distill.teacher import inspect_teacher
    from distill.lora import save_lora

    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    generator = torch.Generator().manual_seed(1)
    for param in add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=2, alpha=2.0):
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
