"""LoRA students on the teacher's UNet, through peft (LoRA: Hu et al. 2021; LCM-LoRA: Luo et al. 2023)."""

from __future__ import annotations

from pathlib import Path

import torch

from .conditioning import TeacherInfo, pipeline_class

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
