"""LoRA students on the teacher's UNet, through peft (LoRA: Hu et al. 2021; LCM-LoRA: Luo et al. 2023)."""

from __future__ import annotations

import contextlib
import logging
import math
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DistillError
from .families import FAMILIES, family_label, get_family
from .teacher import TeacherInfo
from .teacher_files import component_config

ADAPTER_NAME = "default"
logger = logging.getLogger(__name__)


def add_lora(unet: torch.nn.Module, target_modules: list[str] | tuple[str, ...], rank: int = 64,
             alpha: float | None = None, dropout: float = 0.0, rank_flag: str = "--lora_rank") -> list[torch.nn.Parameter]:
    """Freeze the UNet, attach a LoRA adapter, return the trainable LoRA parameters (warns if ``rank`` is wasted)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    warning = rank_warning(unet, rank, rank_flag)
    if warning:
        logger.warning(warning)
    return [p for p in unet.parameters() if p.requires_grad]


def rank_warning(unet: torch.nn.Module, rank: int, rank_flag: str = "--lora_rank") -> str | None:
    """A one-line warning if ``rank`` exceeds what some adapted layer can use, else None.

    The update B A of a layer with weight (out, in, *kernel) has rank at most min(out, in x kernel size) (Hu et al.
    2021, sec. 4): rank beyond that adds parameters and changes the alpha / rank scale, but no capacity.
    """
    from peft.tuners.lora import LoraLayer

    limits = {}
    for name, module in getattr(unet, "module", unet).named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            shape = module.get_base_layer().weight.shape
            limits[name] = min(shape[0], math.prod(shape[1:]))
    small = sorted((limit, name) for name, limit in limits.items() if limit < rank)
    if not small:
        return None
    limit, name = small[0]
    return (f"{rank_flag} {rank} is larger than {len(small)} of the {len(limits)} adapted layers can use (a layer's "
            f"update has rank at most min(out, in) of its weight; smallest: {name} with {limit}): the extra rank adds "
            f"parameters but no capacity there. Lower {rank_flag} to {limit} or less to fit every layer, or narrow "
            "--lora_target_modules.")


@dataclass
class LoRASettings:
    """The student's LoRA, with the flags of diffusers' LCM-LoRA scripts; every method's config inherits them."""

    lora_rank: int = field(default=64, metadata={
        "help": "Rank r of the student's LoRA (at most min(out, in) of an adapted layer is used)."})
    lora_alpha: float = field(default=64.0, metadata={
        "help": "LoRA alpha: the update B A is scaled by alpha / rank."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the LoRA branch's input, in [0, 1)."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Comma-separated names of the network modules to adapt; default: the teacher family's list (for SD "
                "and SDXL diffusers' LCM-LoRA list: attention projections, feed-forward, resnet and sampler convs)."})

    def __post_init__(self):
        if self.lora_rank < 1:
            raise DistillError(f"--lora_rank must be at least 1, got {self.lora_rank}.")
        if not 0 <= self.lora_dropout < 1:
            raise DistillError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    def targets(self, family_default: tuple[str, ...]) -> list[str]:
        """--lora_target_modules, or the teacher family's default list."""
        return list(self.lora_target_modules or family_default)

    def attach_lora(self, unet: torch.nn.Module, family_default: tuple[str, ...]) -> list[torch.nn.Parameter]:
        """Freeze ``unet`` and add this LoRA to it (on the family's modules by default); returns its parameters."""
        return add_lora(unet, self.targets(family_default), self.lora_rank, self.lora_alpha, self.lora_dropout)

    def student_parameters(self, unet: torch.nn.Module, family_default: tuple[str, ...],
                           full_finetune: bool = False) -> list[torch.nn.Parameter]:
        """The student's trainable weights: this LoRA on ``unet``, or every weight of ``unet`` when fully fine-tuning."""
        if full_finetune:
            return list(unet.requires_grad_(True).parameters())
        return self.attach_lora(unet, family_default)


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's keys (``lora_A``/``lora_B``), which ``load_lora_weights`` reads in full.

    diffusers' ``convert_state_dict_to_diffusers`` would rename them to ``lora.down``/``lora.up``, and the loader then
    silently drops every attention projection (to_q/to_k/to_v/to_out): the bug the diffusers LCM scripts ship with.
    """
    from peft.utils import get_peft_model_state_dict

    unet = getattr(unet, "module", unet)
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def lora_metadata(unet: torch.nn.Module) -> dict:
    """The adapter's LoraConfig as a dict, stored beside the weights so loaders use the right alpha."""
    unet = getattr(unet, "module", unet)
    return unet.peft_config[ADAPTER_NAME].to_dict()


def save_lora(folder: str | Path, unet: torch.nn.Module, info: TeacherInfo) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` loadable by the family's stock pipeline's ``load_lora_weights``."""
    folder = Path(folder)
    network = info.family_spec.network_subfolder  # save_lora_weights names its arguments after the component
    info.family_spec.pipeline_class().save_lora_weights(
        folder, safe_serialization=True,
        **{f"{network}_lora_layers": lora_state_dict(unet), f"{network}_lora_adapter_metadata": lora_metadata(unet)},
    )
    return folder / "pytorch_lora_weights.safetensors"


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
STUDENT_CONFIG = "distill_config.json"  # written beside the weights by export_lora_folder; records "teacher_family"


def check_lora_base(folder: str | Path, base: TeacherInfo, weight_name: str = LORA_WEIGHT_NAME) -> None:
    """Refuse, before anything loads, a student folder exported by this toolkit whose teacher is not ``base``'s kind.

    Two checks, both from small files: the family recorded in distill_config.json (SD 1.x/2.x vs SDXL), and, for
    folders without it, the width of the text embeddings the LoRA's cross-attention keys read (``attn2.to_k``
    lora_A input features) against the base UNet's cross_attention_dim (768 SD 1.x, 1024 SD 2.x, 2048 SDXL).
    """
    folder = Path(folder)
    base_name = base.name or base.path
    recorded = {}
    if (folder / STUDENT_CONFIG).is_file():
        try:
            recorded = json.loads((folder / STUDENT_CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            recorded = {}
    family, teacher = recorded.get("teacher_family"), recorded.get("pretrained_teacher_model") or "its teacher"
    if family in FAMILIES and family != base.family:
        raise DistillError(f"The LoRA in {folder} was distilled from an {family_label(family)} teacher ({teacher}), "
                           f"but the base {base_name} is {base.family_spec.label}: a LoRA loads only onto the "
                           f"family it was trained on. Load it onto an {family_label(family)} base (e.g. {teacher}), "
                           "or distil a LoRA from this base.")
    width = _lora_text_width(folder / weight_name)
    cross = component_config(Path(base.path), base.family_spec.network_subfolder, base_name).get("cross_attention_dim")
    if width is not None and isinstance(cross, int) and width != cross:
        raise DistillError(f"The LoRA in {folder} was trained for a UNet that reads {width}-wide text embeddings, "
                           f"but the base {base_name} ({base.family_spec.label}) reads {cross}-wide ones "
                           "(cross_attention_dim): they are different models. Load it onto the base it was "
                           f"distilled from ({teacher}).")


def _lora_text_width(path: Path) -> int | None:
    """Input width of the LoRA's cross-attention key projections (peft or kohya keys), from the header only."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if "attn2" in key and "to_k" in key and ("lora_A" in key or "lora_down" in key or "lora.down" in key):
                    return int(f.get_slice(key).get_shape()[1])
    except Exception as error:  # a damaged LoRA file: diffusers would fail on it with a long traceback
        raise DistillError(f"The LoRA weights {path} cannot be read ({type(error).__name__}): the file is damaged "
                           "or incomplete. Export or download it again.") from None
    return None


KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"

# Original (SGM/LDM) names: a resnet's layers, and the layers outside the blocks. Attention blocks keep their names.
_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def diffusers_module_path(path: str, config) -> str:
    """A diffusers UNet module's own path: the names kohya's sd-scripts write for SD 1.x/2.x LoRAs."""
    return path


def _no_sgm_name(path: str) -> DistillError:
    return DistillError(f"{path} has no name in the original SD/SDXL UNet layout, so it has no kohya key: drop it "
                        "from --lora_target_modules, or pass --export_format diffusers.")


def sgm_module_path(path: str, config) -> str:
    """The original SGM/LDM UNet's name of diffusers UNet module ``path`` (SD/SDXL single-file checkpoint layout).

    ``input_blocks`` are conv_in, then per down block its (resnet, attention) pairs and its downsampler (``.0.op``);
    ``middle_block`` is resnet, attention, resnet; ``output_blocks`` are per up block its pairs, one more than the down
    block's, the upsampler in the last one after the resnet and the attention, if any (``.1.conv`` or ``.2.conv``).
    """
    for prefix, name in _SGM_TOP.items():
        if path == prefix or path.startswith(prefix + "."):
            return name + path[len(prefix):]
    parts = path.split(".")
    per_block = config.layers_per_block
    down = [per_block] * len(config.down_block_types) if isinstance(per_block, int) else list(per_block)
    up = [n + 1 for n in reversed(down)]

    def resnet(rest: list[str]) -> str:
        if not rest or rest[0] not in _SGM_RESNET:
            raise _no_sgm_name(path)
        return ".".join([_SGM_RESNET[rest[0]], *rest[1:]])

    if len(parts) >= 4 and parts[0] in ("down_blocks", "up_blocks") and parts[1].isdigit() and parts[3].isdigit():
        block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if parts[0] == "down_blocks":
            first = 1 + sum(n + 1 for n in down[:block])
            if kind == "downsamplers" and rest[:1] == ["conv"]:
                return ".".join([f"input_blocks.{first + down[block]}.0.op", *rest[1:]])
            if kind == "resnets":
                return f"input_blocks.{first + j}.0.{resnet(rest)}"
            if kind == "attentions":
                return ".".join([f"input_blocks.{first + j}.1", *rest])
        else:
            first = sum(up[:block])
            if kind == "upsamplers" and rest[:1] == ["conv"]:
                index = 2 if "Attn" in config.up_block_types[block] else 1
                return ".".join([f"output_blocks.{first + up[block] - 1}.{index}.conv", *rest[1:]])
            if kind == "resnets":
                return f"output_blocks.{first + j}.0.{resnet(rest)}"
            if kind == "attentions":
                return ".".join([f"output_blocks.{first + j}.1", *rest])
    if len(parts) >= 3 and parts[0] == "mid_block" and parts[2].isdigit():
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{resnet(parts[3:])}"
        if parts[1] == "attentions":
            return ".".join(["middle_block.1", *parts[3:]])
    raise _no_sgm_name(path)


# The module names of each family's kohya file: those kohya's sd-scripts write, which every client maps.
# SD 1.x/2.x: diffusers names. AUTOMATIC1111 rewrites them to its own (extensions-builtin/Lora/networks.py,
# convert_diffusers_name_to_compvis, fixed block sizes that fit SD 1.x/2.x), ComfyUI and Forge look them up through
# comfy.utils.unet_to_diffusers, and diffusers' SD pipeline reads them as they are (it never remaps original names
# for SD: StableDiffusionLoraLoaderMixin passes no unet_config, so ``input_blocks`` would land in the wrong blocks).
# SDXL: original names. A1111's rewrite puts SDXL's first upsampler (up_blocks.0 has attention) at
# output_blocks.2.1.conv, which does not exist, and drops it; original names it looks up directly, as ComfyUI and
# Forge do, and diffusers' SDXL pipeline maps them back (_maybe_map_sgm_blocks_to_diffusers with the UNet config).
KOHYA_LAYOUTS = {"diffusers": diffusers_module_path, "sgm": sgm_module_path}  # TeacherFamily.kohya_layout -> names


def kohya_layout(family: str):
    """The module naming function of family ``family``'s kohya files (a value of KOHYA_LAYOUTS)."""
    return KOHYA_LAYOUTS[get_family(family).kohya_layout]


def kohya_module_names(unet: torch.nn.Module, family: str) -> dict[str, str]:
    """``{peft module path: kohya module name}`` for every module the adapter adapts (works on a meta-device UNet)."""
    from peft.tuners.lora import LoraLayer

    bare = getattr(unet, "module", unet)
    layout = kohya_layout(family)
    prefix = get_family(family).kohya_prefix
    names = {path: prefix + layout(path, bare.config).replace(".", "_")
             for path, module in bare.named_modules()
             if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_alpha}
    if len(set(names.values())) != len(names):
        raise KeyError("two adapted modules got the same kohya name")
    return names


def kohya_state_dict(unet: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The adapter in kohya-ss keys (``lora_unet_<module name with _>.lora_down.weight/.lora_up.weight/.alpha``).

    Module names follow ``kohya_layout(family)``. Each ``.alpha`` is the adapter's real ``lora_alpha`` (diffusers'
    ``convert_state_dict_to_kohya`` would store ``alpha = rank``): a kohya loader scales ``up @ down`` by
    ``alpha / rank``, the same scale peft applied in training.
    """
    bare = getattr(unet, "module", unet)
    peft = lora_state_dict(bare)
    state = {}
    for path, name in kohya_module_names(bare, family).items():
        state[f"{name}.lora_down.weight"] = peft.pop(f"{path}.lora_A.weight")
        state[f"{name}.lora_up.weight"] = peft.pop(f"{path}.lora_B.weight")
        state[f"{name}.alpha"] = torch.tensor(float(bare.get_submodule(path).lora_alpha[ADAPTER_NAME]))
    if peft:
        raise KeyError(f"kohya conversion left out {sorted(peft)[:3]}")
    return state


def save_lora_kohya(folder: str | Path, unet: torch.nn.Module, info: TeacherInfo) -> Path:
    """Write ``pytorch_lora_weights_kohya.safetensors``: the same LoRA in the keys ComfyUI, Forge and A1111 load."""
    from safetensors.torch import save_file

    path = Path(folder) / KOHYA_WEIGHT_NAME
    state = kohya_state_dict(unet, info.family)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


# ----------------------------------------------------------------------- several adapters on one UNet (score distillation)


def tuner_layers(unet: torch.nn.Module) -> list:
    """The peft adapter layers of ``unet``, found once per set of adapters (a large UNet has thousands of modules)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    bare = getattr(unet, "module", unet)
    key = tuple(getattr(bare, "peft_config", None) or ())
    cached = bare.__dict__.get("_distill_tuner_layers")
    if cached is None or cached[0] != key:
        cached = key, [m for m in bare.modules() if isinstance(m, BaseTunerLayer)]
        bare.__dict__["_distill_tuner_layers"] = cached
    return cached[1]


def switch_adapter(unet: torch.nn.Module, adapter: str | list[str] | None) -> list[str] | None:
    """Turn on only LoRA adapter(s) ``adapter`` of ``unet`` (None: every adapter off, the teacher); returns the choice
    that was on before (None if all were off), to switch back with.

    This sets the two attributes peft's ``set_adapter`` and ``enable_adapters`` set on each adapter layer (the active
    adapters, and whether adapters are off), but not what those also do: set requires_grad, on for the active adapter
    and off for the others, which would freeze a trainable adapter that waits for its backward pass. It is also ~50x
    faster on an SDXL UNet (a switch runs several times per training step); tests/test_score_distillation.py checks
    that the state equals the one peft's own switches give.
    """
    bare = getattr(unet, "module", unet)
    layers = tuner_layers(bare)
    names = [adapter] if isinstance(adapter, str) else None if adapter is None else list(adapter)
    if names is not None and (not layers or set(names) - set(bare.peft_config)):
        raise ValueError(f"The UNet has no LoRA adapter {adapter!r}.")
    if not layers:
        return None
    previous = None if layers[0].disable_adapters else list(layers[0].active_adapters)
    for layer in layers:
        if names is not None:
            layer._active_adapter = names
        layer._disable_adapters = names is None
    return previous


NO_ADAPTER = "__base__"  # peft's name for the rows of a mixed-adapter batch that run with every adapter off


@contextlib.contextmanager
def adapters_by_row(unet: torch.nn.Module, adapters: list[str | None]):
    """Inside the block, row i of a batch through ``unet`` runs with only LoRA adapter ``adapters[i]`` on (None: every
    adapter off, the teacher): peft's mixed-adapter batches, so that passes through different adapters of one UNet
    share one forward call. For passes without gradients (peft gathers each adapter's rows out of the batch).

    A forward pre-hook on each adapter layer, installed on first use, hands peft the row names while a block is open.
    """
    bare = getattr(unet, "module", unet)
    names = [NO_ADAPTER if adapter is None else adapter for adapter in adapters]
    used = sorted({name for name in names if name != NO_ADAPTER})
    layers = tuner_layers(bare)
    previous = switch_adapter(bare, used or None)
    for layer in layers:
        if "_distill_row_adapters" not in layer.__dict__:
            layer.register_forward_pre_hook(_inject_row_adapters, with_kwargs=True)
        layer.__dict__["_distill_row_adapters"] = names
    try:
        yield bare
    finally:
        for layer in layers:
            layer.__dict__["_distill_row_adapters"] = None
        switch_adapter(bare, previous)


def _inject_row_adapters(layer: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of an adapter layer: pass peft the per-row adapter names while ``adapters_by_row`` is open."""
    names = layer.__dict__.get("_distill_row_adapters")
    if names is None:
        return None
    return args, {**kwargs, "adapter_names": names}
