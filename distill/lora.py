"""LoRA students on the teacher's UNet, through peft (LoRA: Hu et al. 2021; LCM-LoRA: Luo et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .conditioning import TeacherInfo, pipeline_class
from .errors import DistillError

# The layers diffusers' LCM-LoRA scripts adapt: attention, feed-forward, resnet convs, samplers, time embedding.
DEFAULT_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]
ADAPTER_NAME = "default"


def add_lora(unet: torch.nn.Module, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
             target_modules: list[str] | None = None) -> list[torch.nn.Parameter]:
    """Freeze the UNet, attach a LoRA adapter, return the trainable LoRA parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules or DEFAULT_TARGET_MODULES,
    )
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    return [p for p in unet.parameters() if p.requires_grad]


@dataclass
class LoRASettings:
    """The student's LoRA, with the flags of diffusers' LCM-LoRA scripts; every method's config inherits them."""

    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    def __post_init__(self):
        if self.lora_rank < 1:
            raise DistillError(f"--lora_rank must be at least 1, got {self.lora_rank}.")
        if not 0 <= self.lora_dropout < 1:
            raise DistillError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    def attach_lora(self, unet: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Freeze ``unet`` and add this LoRA to it; returns the trainable parameters."""
        return add_lora(unet, self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_target_modules)

    def student_parameters(self, unet: torch.nn.Module, full_finetune: bool = False) -> list[torch.nn.Parameter]:
        """The student's trainable weights: this LoRA on ``unet``, or every weight of ``unet`` when fully fine-tuning."""
        if full_finetune:
            return list(unet.requires_grad_(True).parameters())
        return self.attach_lora(unet)


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
    """Write ``pytorch_lora_weights.safetensors`` loadable by the stock SD/SDXL pipeline's ``load_lora_weights``."""
    folder = Path(folder)
    pipeline_class(info).save_lora_weights(
        folder,
        unet_lora_layers=lora_state_dict(unet),
        unet_lora_adapter_metadata=lora_metadata(unet),
        safe_serialization=True,
    )
    return folder / "pytorch_lora_weights.safetensors"


KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"


def kohya_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in kohya-ss keys (``lora_unet_<module path with _>.lora_down/.lora_up/.alpha``).

    These are the names kohya's sd-scripts write for SD 1.x/2.x (a diffusers-layout UNet; for SDXL it writes the
    original ``input_blocks_...`` names instead), which ComfyUI and AUTOMATIC1111 map onto their own UNet modules for
    SD and SDXL alike, and which diffusers' ``load_lora_weights`` converts back. diffusers'
    ``convert_state_dict_to_kohya`` does the renaming but stores ``alpha = rank`` (scale 1), so each module's
    ``.alpha`` is set here to the adapter's real ``lora_alpha``: a kohya loader scales ``up @ down`` by
    ``alpha / rank``, the same scale peft applied in training.
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft.tuners.lora import LoraLayer

    bare = getattr(unet, "module", unet)
    state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora_state_dict(bare).items()})
    for name, module in bare.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_alpha:
            alpha_key = f"lora_unet_{name.replace('.', '_')}.alpha"
            if alpha_key not in state:
                raise KeyError(f"kohya conversion lost the LoRA of {name}")
            state[alpha_key] = torch.tensor(float(module.lora_alpha[ADAPTER_NAME]))
    return state


def save_lora_kohya(folder: str | Path, unet: torch.nn.Module) -> Path:
    """Write ``pytorch_lora_weights_kohya.safetensors``: the same LoRA in the key format ComfyUI/A1111 load."""
    from safetensors.torch import save_file

    path = Path(folder) / KOHYA_WEIGHT_NAME
    save_file({k: v.contiguous() for k, v in kohya_state_dict(unet).items()}, str(path), metadata={"format": "pt"})
    return path
