"""Teacher families, registered in one place: everything that differs between SD 1.x/2.x, SDXL and the next ones.

A family says how its diffusers folder is recognised, which denoiser network and noise schedule it loads, which
text conditioner turns prompts into a :class:`~distill.conditioning.Cond`, which stock and few-step pipelines
sample from it, and how its LoRA is named. Methods never look at the family: they see a denoiser on a schedule and
opaque conditions, so a new family (SD3, FLUX.1: a transformer, flow-matching sigmas) is one ``register`` call here,
with its own conditioner class and schedule builder where the existing ones do not fit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .conditioning import (FluxTextConditioner, SD3TextConditioner, SDTextConditioner, SDXLTextConditioner,
                           TextConditioner)
from .errors import DistillError
from .packing import accept_unpacked_latents
from .schedule import FlowMatchingSchedule, NoiseSchedule
from .teacher_files import component_config

if TYPE_CHECKING:
    from .teacher import TeacherInfo

# The layers diffusers' LCM-LoRA scripts adapt in a UNet: attention, feed-forward, resnet convs, samplers, time
# embedding.
UNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
# The layers of a flow-matching transformer (SD3 joint blocks) diffusers' SD3 LoRA script adapts, the attention
# projections of both streams, plus both streams' feed-forward projections.
TRANSFORMER_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


@dataclass(frozen=True, eq=False, repr=False)
class TeacherFamily:
    """One kind of teacher: how its folder is recognised, loaded, conditioned, sampled from and exported."""

    name: str  # recorded in files: distill_config.json "teacher_family", checkpoint identities, pairs.json
    label: str  # for messages: "SD 1.x/2.x"
    text_encoders: tuple[str, ...]  # model_index.json components, in the conditioner's order
    tokenizers: tuple[str, ...]
    conditioner: type[TextConditioner]  # prompts -> Cond
    network_signature: tuple[tuple[str, object], ...]  # network config entries that only this family's network has
    stock_pipeline: str  # the diffusers pipeline class that loads the folder
    few_step_pipeline: str  # the class in pipelines/pipeline_few_step.py that exported folders name
    kohya_layout: str  # module naming of the kohya LoRA file: a key of distill.lora.KOHYA_LAYOUTS
    kohya_prefix: str = "lora_unet_"  # what the kohya file's module names start with
    network_class: str = "UNet2DConditionModel"  # the diffusers class of the denoiser network
    network_subfolder: str = "unet"
    network_label: str = "UNet"  # what messages call the network
    # (scheduler config, latent shape (C, H, W)) -> the noise schedule
    noise_schedule: Callable[[dict, tuple], NoiseSchedule] = NoiseSchedule.from_scheduler_config
    lora_target_modules: tuple[str, ...] = UNET_LORA_TARGETS
    # The network's blocks that sharded training (FSDP2) gathers one at a time, by class name.
    shard_unit_classes: tuple[str, ...] = ("ResnetBlock2D", "BasicTransformerBlock")
    vae_fp32: bool = False  # its own VAE overflows in fp16, so it stays in fp32
    safety_checker: bool = False  # the stock pipeline has a safety checker, switched off for distillation
    force_zeros_default: bool | None = None  # model_index.json's force_zeros_for_empty_prompt when unset; None: n/a
    flow_matching: bool = False  # a flow-matching teacher: students sample with pipelines/scheduler_flow.py
    prepare_network: Callable[[torch.nn.Module], torch.nn.Module] | None = None  # applied to the loaded network
    default_sample_size: int = 128  # a network config without sample_size: FluxPipeline's default (x VAE factor)
    resolution_multiple: int = 8  # image sides must be multiples of it (the VAE's 8, times FLUX.1's 2x2 patches)

    def __repr__(self) -> str:
        return f"TeacherFamily({self.name!r})"

    @property
    def components(self) -> tuple[str, ...]:
        """The model_index.json components a folder of this family has."""
        return (self.network_subfolder, "vae", "scheduler", *self.text_encoders, *self.tokenizers)

    def force_zeros(self, index: dict) -> bool:
        """Whether the empty prompt's condition is zeros for this teacher (SDXL's force_zeros_for_empty_prompt)."""
        return self.force_zeros_default is not None and bool(index.get("force_zeros_for_empty_prompt",
                                                                       self.force_zeros_default))

    def matches_network(self, config: dict) -> bool:
        """True when a network config has this family's signature entries."""
        return all(config.get(key) == value for key, value in self.network_signature)

    def load_network(self, path: str, revision: str | None = None) -> torch.nn.Module:
        """The denoiser network of the teacher folder ``path`` (the student starts as it)."""
        import diffusers

        network = getattr(diffusers, self.network_class).from_pretrained(path, subfolder=self.network_subfolder,
                                                                         revision=revision)
        return self.prepare_network(network) if self.prepare_network else network

    def network_config(self, path: str) -> dict:
        """The denoiser network's config.json in the teacher folder ``path``."""
        return component_config(Path(path), self.network_subfolder, path)

    def native_resolution(self, path: str) -> int:
        """The image size the teacher was trained at: network sample size times the VAE's downsampling factor."""
        vae = component_config(Path(path), "vae", path)
        sample_size = self.network_config(path).get("sample_size", self.default_sample_size)
        return int(sample_size) * 2 ** (len(vae["block_out_channels"]) - 1)

    def pipeline_class(self):
        """The stock diffusers pipeline class of this family."""
        import diffusers

        return getattr(diffusers, self.stock_pipeline)

    def pipeline_kwargs(self, info: TeacherInfo) -> dict:
        """Arguments every pipeline of this family gets beyond its models: no safety checker, and the teacher's
        empty-prompt handling."""
        kwargs: dict = {}
        if self.safety_checker:
            kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if self.force_zeros_default is not None:
            kwargs["force_zeros_for_empty_prompt"] = info.force_zeros_for_empty_prompt
        return kwargs

    def text_components(self, conditioner: TextConditioner) -> dict:
        """The conditioner's tokenizers and text encoders under their pipeline component names."""
        return {**dict(zip(self.tokenizers, conditioner.tokenizers)),
                **dict(zip(self.text_encoders, conditioner.text_encoders))}


FAMILIES: dict[str, TeacherFamily] = {}


def register(family: TeacherFamily) -> TeacherFamily:
    """Add a family to the registry that teacher detection, loading and export consult."""
    FAMILIES[family.name] = family
    return family


SD = register(TeacherFamily(
    name="sd", label="SD 1.x/2.x", text_encoders=("text_encoder",), tokenizers=("tokenizer",),
    conditioner=SDTextConditioner, network_signature=(("addition_embed_type", None),),
    stock_pipeline="StableDiffusionPipeline", few_step_pipeline="FewStepStableDiffusionPipeline",
    kohya_layout="diffusers", safety_checker=True,
))
SDXL = register(TeacherFamily(
    name="sdxl", label="SDXL", text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    conditioner=SDXLTextConditioner, network_signature=(("addition_embed_type", "text_time"),),
    stock_pipeline="StableDiffusionXLPipeline", few_step_pipeline="FewStepStableDiffusionXLPipeline",
    kohya_layout="sgm", vae_fp32=True, force_zeros_default=True,
))
SD3 = register(TeacherFamily(
    name="sd3", label="SD3/SD3.5", text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
    conditioner=SD3TextConditioner, network_signature=(("_class_name", "SD3Transformer2DModel"),),
    stock_pipeline="StableDiffusion3Pipeline", few_step_pipeline="FewStepStableDiffusion3Pipeline",
    kohya_layout="diffusers", kohya_prefix="lora_transformer_",  # ComfyUI's SD3 key map reads these names
    network_class="SD3Transformer2DModel", network_subfolder="transformer", network_label="transformer",
    noise_schedule=FlowMatchingSchedule.from_scheduler_config, lora_target_modules=TRANSFORMER_LORA_TARGETS,
    shard_unit_classes=("JointTransformerBlock",), flow_matching=True,
))
FLUX = register(TeacherFamily(
    name="flux", label="FLUX.1", text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    conditioner=FluxTextConditioner, network_signature=(("_class_name", "FluxTransformer2DModel"),),
    stock_pipeline="FluxPipeline", few_step_pipeline="FewStepFluxPipeline",
    kohya_layout="diffusers", kohya_prefix="lora_transformer_",  # ComfyUI's FLUX key map reads these names
    network_class="FluxTransformer2DModel", network_subfolder="transformer", network_label="transformer",
    # FluxPipeline calls the transformer with sigma itself, and shifts sigmas by the image's token count
    noise_schedule=functools.partial(FlowMatchingSchedule.from_scheduler_config, time_scale=1.0),
    lora_target_modules=TRANSFORMER_LORA_TARGETS, prepare_network=accept_unpacked_latents,
    shard_unit_classes=("FluxTransformerBlock", "FluxSingleTransformerBlock"), flow_matching=True,
    resolution_multiple=16,
))


def get_family(name: str) -> TeacherFamily:
    """The registered family called ``name`` ("sd", "sdxl", "sd3", "flux")."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise DistillError(f"Unknown teacher family {name!r}; known: {', '.join(FAMILIES)}.") from None


def family_label(name: str) -> str:
    """A family's label for messages, or ``name`` itself when no family has that name."""
    return FAMILIES[name].label if name in FAMILIES else name


def detect_family(folder: Path, index: dict, path: str) -> TeacherFamily:
    """The family of a teacher folder: the most specific one whose components model_index.json lists, checked
    against the folder's network and text encoder configs. ``path`` is the folder or Hub id as the user gave it."""
    components = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}  # [null, null]: absent
    fitting = [f for f in FAMILIES.values() if set(f.components) <= components]
    if not fitting:
        closest = min(FAMILIES.values(), key=lambda f: len(set(f.components) - components))
        labels = [f.label for f in FAMILIES.values()]
        labels = ", ".join(labels[:-1]) + " or " + labels[-1]
        raise DistillError(
            f"{path} ({index.get('_class_name')}) is not a Stable Diffusion pipeline of a known family ({labels}): "
            f"it has no {', '.join(sorted(set(closest.components) - components))}. Only {labels} text-to-image "
            "teachers can be distilled."
        )
    family = max(fitting, key=lambda f: len(f.components))
    _check_components_agree(family, folder, path)
    return family


def _check_components_agree(family: TeacherFamily, folder: Path, path: str) -> None:
    """Refuse a folder whose network does not belong to its text encoders (e.g. an SDXL unet/ inside an SD folder).

    SDXL's UNet takes ``added_cond_kwargs`` (addition_embed_type "text_time": pooled embeds of text_encoder_2 and
    six time ids) and cross-attends to both encoders' states concatenated; SD's takes neither (Podell et al. 2023).
    """
    network = family.network_config(str(folder))
    encoders = {name: component_config(folder, name, path) for name in family.text_encoders}
    problems = [] if family.matches_network(network) else [_network_mismatch(family, network)]
    problems += family.conditioner.config_problems(network, encoders)
    if problems:
        raise DistillError(f"{path} mixes components of different models: {'; '.join(problems)}. Replace the "
                           f"mismatched folder (usually {family.network_subfolder}/) with the one from the same model, "
                           "or re-download the complete teacher.")


def _network_mismatch(family: TeacherFamily, network: dict) -> str:
    """Why the network config is not ``family``'s: whose network it is, and what model_index.json lists instead."""
    evidence = ", ".join(f"{key} {network.get(key)!r}" + ("" if value is None else f", not {value!r}")
                         for key, value in family.network_signature)
    config = f"{family.network_subfolder}/config.json"
    owner = next((f for f in FAMILIES.values() if f.matches_network(network)), None)
    if owner is None:
        return f"{config} ({evidence}) is not the network of an {family.label} pipeline"
    listed = ([f"has no {e}" for e in owner.text_encoders if e not in family.text_encoders]
              + [f"has {e}" for e in family.text_encoders if e not in owner.text_encoders])
    return (f"{config} is an {owner.label} {owner.network_label} ({evidence}) but model_index.json "
            f"{' and '.join(listed) or 'lists other components'}, as in {family.label}")
