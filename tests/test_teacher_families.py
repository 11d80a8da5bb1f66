"""Teacher families: one registry detects, loads and exports every family; Cond carries extra network inputs.

Families are checked on the real tiny SD and SDXL teachers (detection, stock and few-step pipeline classes, the shapes
``load_teacher`` returns). ``Cond.extra`` is checked on a real UNet2DConditionModel with diffusers' LCM w-embedding
input (``time_cond_proj_dim`` / ``timestep_cond``), through the Denoiser every method uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.conditioning import Cond, TextConditioner
from distill.teacher import inspect_teacher
from distill.denoiser import Denoiser
from distill.families import FAMILIES, FLUX, SD, SD3, SDXL, family_label, get_family
from distill.teacher import load_teacher

REPO = Path(__file__).resolve().parents[1]
W_DIM = 8  # width of the guidance-scale embedding the test UNet takes as timestep_cond


@pytest.fixture(scope="module")
def loaded(sd_teacher, sdxl_teacher):
    """Each tiny teacher loaded once, by family name."""
    return {name: load_teacher(inspect_teacher(str(folder)), 32)
            for name, folder in (("sd", sd_teacher), ("sdxl", sdxl_teacher))}


# ----------------------------------------------------------------------------------------------- the registry


def test_registry_detects_each_tiny_teacher(sd_teacher, sdxl_teacher, sd3_teacher, flux_teacher):
    folders = (sd_teacher, sdxl_teacher, sd3_teacher, flux_teacher)
    sd, sdxl, sd3, flux = (inspect_teacher(str(folder)) for folder in folders)
    assert (sd.family_spec, sdxl.family_spec, sd3.family_spec, flux.family_spec) == (SD, SDXL, SD3, FLUX)
    # the names distill_config.json, checkpoints, pairs.json record
    assert (sd.family, sdxl.family, sd3.family, flux.family) == ("sd", "sdxl", "sd3", "flux")
    assert FAMILIES == {"sd": SD, "sdxl": SDXL, "sd3": SD3, "flux": FLUX} and get_family("sdxl") is SDXL
    assert (family_label("sd"), family_label("sdxl"), family_label("sd3"), family_label("flux"),
            family_label("hunyuan")) == ("SD 1.x/2.x", "SDXL", "SD3/SD3.5", "FLUX.1", "hunyuan")
    assert (sd.force_zeros_for_empty_prompt, sdxl.force_zeros_for_empty_prompt) == (False, True)
    assert sd3.force_zeros_for_empty_prompt is False and SD3.flow_matching and not SDXL.flow_matching


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_each_family_pipeline_class_loads_its_teacher_folder(name, request):
    import distill.pipelines.pipeline_few_step as few_step

    folder = request.getfixturevalue(f"{name}_teacher")
    info = inspect_teacher(str(folder))
    family = info.family_spec
    pipe = family.pipeline_class().from_pretrained(folder, **family.pipeline_kwargs(info))
    assert type(pipe).__name__ == family.stock_pipeline
    assert set(family.text_encoders) | set(family.tokenizers) <= set(pipe.components)
    assert family.matches_network(dict(getattr(pipe, family.network_subfolder).config))
    assert issubclass(getattr(few_step, family.few_step_pipeline), family.pipeline_class())


def test_load_teacher_shapes_agree_with_the_network(teacher, loaded):
    info = inspect_teacher(str(teacher))
    teacher_parts = loaded[info.family]
    network = teacher_parts.network.config
    assert teacher_parts.latent_shape == (network.in_channels, 16, 16)  # 32 px through the tiny VAE's factor 2
    assert isinstance(teacher_parts.conditioner, info.family_spec.conditioner)
    cond = teacher_parts.conditioner.encode(["a cat", "a dog"])
    assert cond.prompt_embeds.shape[-1] == network.cross_attention_dim
    if cond.pooled_prompt_embeds is not None:  # SDXL: pooled projection + 6 time ids feed the added embedding
        added = cond.pooled_prompt_embeds.shape[-1] + cond.time_ids.shape[-1] * network.addition_time_embed_dim
        assert added == network.projection_class_embeddings_input_dim
    x = torch.randn(2, *teacher_parts.latent_shape)
    with torch.no_grad():
        output = Denoiser(teacher_parts.network, teacher_parts.schedule).raw(x, torch.tensor([999, 10]), cond)
    assert output.shape == x.shape and torch.isfinite(output).all()


def test_text_conditioner_is_the_family_conditioner(sdxl_teacher, loaded):
    """TextConditioner(info, ...) builds the class the family names, so code that builds one directly still gets
    SDXL's pooled embeds and time ids."""
    conditioner = TextConditioner(inspect_teacher(str(sdxl_teacher)), 32)
    assert type(conditioner) is SDXL.conditioner is type(loaded["sdxl"].conditioner)
    assert conditioner.encode(["a cat"]).time_ids.shape == (1, 6)


def test_vae_stays_fp32_only_where_the_family_needs_it(teacher):
    info = inspect_teacher(str(teacher))
    half = load_teacher(info, 32, torch.float16)
    assert half.network.dtype == torch.float16
    assert half.vae.dtype == (torch.float32 if info.family_spec.vae_fp32 else torch.float16)
    assert (info.family, info.family_spec.vae_fp32) in {("sd", False), ("sdxl", True)}


def test_no_family_branch_outside_the_family_module():
    """Every SD/SDXL difference goes through distill/families.py: no other file asks whether a teacher is SDXL."""
    needle = "is_" + "sdxl"
    found = [str(path.relative_to(REPO)) for folder in ("distill", "benchmarks", "tests", "pipelines", "train_scripts")
             for path in sorted((REPO / folder).rglob("*.py"))
             if path != REPO / "distill" / "families.py" and needle in path.read_text()]
    assert found == []


# ----------------------------------------------------------------------------------------------- Cond.extra


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def w_conditioned(request, loaded):
    """(denoiser of a UNet that also takes a w-embedding as timestep_cond, the teacher's conditioner)."""
    from diffusers import UNet2DConditionModel

    teacher_parts = loaded[request.param]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**teacher_parts.network.config, "time_cond_proj_dim": W_DIM}).eval()
    return Denoiser(unet, teacher_parts.schedule), teacher_parts.conditioner


def with_w(cond: Cond, seed: int) -> Cond:
    """``cond`` with a random w-embedding per sample as its extra network input."""
    w = torch.randn(len(cond), W_DIM, generator=torch.Generator().manual_seed(seed))
    return Cond(*cond.tensors(), extra={"timestep_cond": w})


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 16, 16, generator=generator), torch.randint(0, 1000, (n,), generator=generator)


@torch.no_grad()
def test_extra_inputs_reach_the_network(w_conditioned):
    denoiser, conditioner = w_conditioned
    plain = conditioner.encode(["a cat", "a dog"])
    cond = with_w(plain, 1)
    assert cond.unet_kwargs()["timestep_cond"] is cond.extra["timestep_cond"]
    assert "timestep_cond" not in plain.unet_kwargs() and plain.extra == {}
    x, t = inputs(2)
    x0_plain, _ = denoiser(x, t, plain)
    x0_w, _ = denoiser(x, t, cond)
    x0_other_w, _ = denoiser(x, t, with_w(plain, 2))
    assert not torch.allclose(x0_w, x0_plain) and not torch.allclose(x0_w, x0_other_w)


@torch.no_grad()
def test_cat_keeps_extra_rows_with_their_prompts(w_conditioned):
    """Oracle: the denoiser on cat([a, b]) equals its outputs on a and on b separately (the CFG batch layout)."""
    denoiser, conditioner = w_conditioned
    a = with_w(conditioner.encode(["a cat", "a dog"]), 1)
    b = with_w(conditioner.unconditional(2), 2)
    x, t = inputs(4)
    joint, _ = denoiser(x, t, Cond.cat([a, b]))
    separate = torch.cat([denoiser(x[:2], t[:2], a)[0], denoiser(x[2:], t[2:], b)[0]])
    torch.testing.assert_close(joint, separate, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_where_and_indexing_keep_extra_rows_with_their_prompts(w_conditioned):
    denoiser, conditioner = w_conditioned
    a = with_w(conditioner.encode(["a cat", "a dog", "a red square"]), 1)
    b = with_w(conditioner.encode(["a house", "a tree", "a blue circle"]), 2)
    x, t = inputs(3)
    mixed, _ = denoiser(x, t, a.where(torch.tensor([True, False, True]), b))
    expected = torch.cat([denoiser(x[i:i + 1], t[i:i + 1], c[i:i + 1])[0] for i, c in enumerate([a, b, a])])
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-5)
    order = torch.tensor([2, 0])
    reordered, _ = denoiser(x[order], t[order], a[order])
    torch.testing.assert_close(reordered, denoiser(x, t, a)[0][order], rtol=1e-4, atol=1e-5)


def test_extra_follows_to_map_and_unconditional_expansion():
    cond = Cond(torch.zeros(2, 3, 4), extra={"timestep_cond": torch.ones(2, W_DIM), "labels": torch.tensor([1, 2])})
    half = cond.to(dtype=torch.float16)
    assert half.prompt_embeds.dtype == half.extra["timestep_cond"].dtype == torch.float16
    assert half.extra["labels"].dtype == torch.long  # integer inputs are moved, never cast
    repeated = cond[:1].map(lambda v: v.expand(3, *v.shape[1:]))
    assert repeated.extra["labels"].tolist() == [1, 1, 1] and repeated.extra["timestep_cond"].shape == (3, W_DIM)


def test_conditions_with_different_extras_are_not_combined():
    with_extra = Cond(torch.zeros(1, 3, 4), extra={"timestep_cond": torch.zeros(1, W_DIM)})
    without = Cond(torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="different extra inputs"):
        Cond.cat([with_extra, without])
    with pytest.raises(ValueError, match="different extra inputs"):
        with_extra.where(torch.tensor([True]), without)


def test_the_lora_adapts_the_family_default_modules_unless_flags_name_others(sd_teacher):
    """--lora_target_modules unset: the teacher family's list; set: exactly the modules named."""
    from distill.families import SD
    from distill.methods import LCM, LCMConfig
    from distill.testing import method_on_teacher

    default, _ = method_on_teacher(LCM, LCMConfig(lora_rank=4), sd_teacher)
    assert set(default.teacher.unet.peft_config["default"].target_modules) == set(SD.lora_target_modules)
    assert default.teacher.lora_targets == SD.lora_target_modules
    chosen, _ = method_on_teacher(LCM, LCMConfig(lora_rank=4, lora_target_modules=["to_q", "to_v"]), sd_teacher)
    assert set(chosen.teacher.unet.peft_config["default"].target_modules) == {"to_q", "to_v"}
    adapted = {name.rsplit(".", 1)[-1] for name, module in chosen.teacher.unet.named_modules()
               if hasattr(module, "lora_A") and "default" in module.lora_A}
    assert adapted == {"to_q", "to_v"}
