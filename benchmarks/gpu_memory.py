"""Derived GPU memory per method, SD1.5, SDXL, SD3.5 and FLUX.1-dev: .venv/bin/python benchmarks/gpu_memory.py --out
docs/gpu_memory.md"""

from __future__ import annotations

import argparse
import re
from functools import partial
from pathlib import Path

import diffusers
import torch
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from distill.discriminator import BottleneckClassifier, DiscriminatorHeads, encoder_modules, network_features
from distill.families import SD, SD3, SDXL, TRANSFORMER_LORA_TARGETS, UNET_LORA_TARGETS
from distill.lora import add_lora
from distill.packing import unpack_latents

GIB, RANK, CHECKPOINT = 2**30, 64, torch.utils.checkpoint.checkpoint
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128)
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
CLIP_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                 projection_dim=1280, hidden_act="gelu")
# The flow-matching transformers at 1024 px, from transformer/config.json of stabilityai/stable-diffusion-3.5-large,
# stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev.
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = {**SD35_LARGE, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
               "dual_attention_layers": tuple(range(13)), "pos_embed_max_size": 384}
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# Their VAE (16 latent channels, no quant convs) and T5-XXL's encoder (SD3.5's text_encoder_3, FLUX's text_encoder_2).
VAE_16 = {**VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
              feed_forward_proj="gated-gelu")
# FLUX.1-dev at 1024 px as FluxPipeline calls it: the 16x128x128 latents packed into 64x64 tokens of 2x2x16 values,
# 512 T5 tokens, guidance 3.5.
FLUX_LATENT_SIDE, FLUX_T5_TOKENS = 128, 512
# Ops CUDA autocast runs in bf16 / in fp32 (aten/src/ATen/autocast_mode.cpp), as far as these networks call them.
LOWER = {"linear", "conv2d", "matmul", "mm", "bmm", "baddbmm", "addmm", "einsum", "scaled_dot_product_attention"}
FP32 = {"group_norm", "layer_norm", "rms_norm", "exp", "log", "pow", "__pow__", "rsqrt", "softplus", "softmax",
        "mse_loss"}
# Per method: its trainable groups, the graphs it keeps until its first backward (the trainer computes every loss
# first) as (curve, rows per sample), and the most rows of its no-gradient calls (CFG: 2; real + fake score: 3).
METHODS = {
    "lcm, pcm, rectified (phased)": (("lora",), (("unet", 1),), 2),
    "rectified (pairs, consistency)": (("lora",), (("unet", 1),), 1),
    "pcm --adv_weight > 0": (("lora", "heads"), (("unet", 1), ("teacher encoder", 1), ("heads", 2), ("heads", 1)), 2),
    "swiftbrush": (("lora", "lora"), (("unet", 1), ("unet", 1)), 3),
    "ufogen": (("lora", "encoder lora", "heads"),
               (("unet", 1), ("frozen encoder", 1), ("trained encoder", 2), ("heads", 2), ("heads", 1)), 1),
    "dmd2": (("lora", "lora", "classifier"), (("unet", 1), ("plain frozen encoder", 1),
                                              ("unet", 3), ("classifier", 2), ("classifier", 1)), 3),
}
# On a transformer teacher the same, the discriminators reading the first half of the joint blocks; dmd2 also without
# its GAN classifier (the default on sd3 and flux), its fake score on the score-matching rows alone.
TRANSFORMER_METHODS = {**METHODS, "dmd2 (no GAN term)": (("lora", "lora"), (("unet", 1), ("unet", 1)), 3)}
OVERHEAD = ("Not included above (an assumption, not derived): the CUDA context, about 1 GiB per process, and the "
            "caching allocator's fragmentation, some 10 %: plan for total x 1.1 + 1 GiB.")
FLUX_NOTE = ("FLUX.1-dev's rows count the teacher's two CFG rows as for the other teachers, where the trainer makes "
             "one call at the guidance input instead: the no-gradient figure is an upper bound. " + OVERHEAD)
LABELS = {"lora": "LoRA, rank 64 (one adapter)", "encoder lora": "ufogen: discriminator LoRA (encoder modules)",
          "heads": "pcm, ufogen: discriminator heads", "classifier": "dmd2: bottleneck classifier"}


class GpuKernels(TorchFunctionMode):
    """As a CUDA bf16 step runs: SDPA as the flash kernel, and (``emulate_autocast``) CUDA autocast's casts."""

    def __init__(self, emulate_autocast: bool):
        super().__init__()
        self.autocast, self.cache = emulate_autocast, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name, kwargs = getattr(func, "__name__", ""), kwargs or {}
        if self.autocast and (name in LOWER or name in FP32):
            dtype = torch.bfloat16 if name in LOWER else torch.float32
            args, kwargs = tree_map(lambda a: self.cast(a, dtype), (args, kwargs))
        if name == "scaled_dot_product_attention":
            return flash_attention(*args, **kwargs)
        return func(*args, **kwargs)

    def cast(self, a, dtype: torch.dtype):
        """``a`` in ``dtype`` where autocast casts it (floating, not double); trainable leaves to bf16 once, cached."""
        if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dtype in (dtype, torch.float64):
            return a
        if not (a.is_leaf and a.requires_grad and dtype == torch.bfloat16):
            return a.to(dtype)
        if id(a) not in self.cache:
            self.cache[id(a)] = a.to(dtype)
        return self.cache[id(a)]


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as CUDA's flash kernel runs it: q, k, v, out and an fp32 logsumexp kept, no attention matrix."""
    assert attn_mask is None and not is_causal and not dropout_p and not enable_gqa
    cuda = query.is_cuda  # CUDA's kernel also keeps a 24-byte random state
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention" + ("" if cuda else "_for_cpu"))
    return flash(query, key, value, scale=scale)[0]


class SavedBytes:
    """Bytes autograd keeps for backward, each storage once, weights excluded; ``units``: what each block keeps."""

    def __init__(self, *modules: torch.nn.Module):
        self.exclude = {t.untyped_storage()._cdata for m in modules for t in [*m.parameters(), *m.buffers()]}
        self.storages, self.units, self.unit, self.kept = {}, [0], None, []

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.exclude:
            for found in (self.storages, self.unit if self.unit is not None else {}):
                found[storage._cdata] = storage.nbytes()
        self.kept.append(tensor)  # alive until counted, so that no storage address is reused
        return tensor

    def run_unit(self, module, *args):
        """A gradient-checkpointing function that does not checkpoint but records what the block keeps."""
        self.unit = {}
        out = module(*args)
        self.units.append(sum(self.unit.values()))
        self.unit = None
        return out


def non_reentrant_checkpoint(function, *args, use_reentrant=None, **kwargs):
    """torch's checkpoint, refusing the reentrant variant (what it keeps would escape the hooks)."""
    assert use_reentrant is False, "diffusers must call the non-reentrant checkpoint"
    return CHECKPOINT(function, *args, use_reentrant=False, **kwargs)


def build_network(config: dict, network: str, targets: tuple[str, ...], device: str = "meta", factory=None,
                  rank: int = RANK) -> torch.nn.Module:
    """The diffusers ``network`` in bf16 with the toolkit's student LoRA on ``targets`` (fp32, as
    cast_training_params leaves it)."""
    with torch.device(device):
        net = factory() if factory else getattr(diffusers, network)(**config)
        net.to(torch.bfloat16)
        for p in add_lora(net, targets, rank=rank):
            p.data = p.data.float()
    return net


def build_unet(config: dict, device: str = "meta", factory=None, rank: int = RANK) -> torch.nn.Module:
    """The UNet in bf16 with the toolkit's student LoRA (fp32, as cast_training_params leaves it)."""
    return build_network(config, "UNet2DConditionModel", UNET_LORA_TARGETS, device, factory, rank)


def is_transformer(net) -> bool:
    """Whether ``net`` is a flow-matching transformer (SD3, FLUX) rather than a UNet."""
    return "joint_attention_dim" in net.config


def inputs(unet, rows: int, device: str) -> tuple:
    """(latents, timesteps, the other keyword arguments) for ``rows`` samples, in bf16 as the Denoiser passes them."""
    g, c = torch.Generator().manual_seed(0), unet.config
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, torch.bfloat16)  # noqa: E731
    if is_transformer(unet):
        return transformer_inputs(c, rows, device, make)
    kwargs = {"encoder_hidden_states": make(rows, 77, c.cross_attention_dim)}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": make(rows, pooled), "time_ids": make(rows, 6)}
    return make(rows, c.in_channels, c.sample_size, c.sample_size), torch.full((rows,), 999, device=device), kwargs


def transformer_inputs(c, rows: int, device: str, make) -> tuple:
    """SD3: latents and 77 CLIP + 256 T5 tokens; FLUX: packed 2x2 latent patches, 512 T5 tokens, ids and guidance
    (timesteps and guidance in fp32, as the pipelines pass them)."""
    full = lambda value: torch.full((rows,), value, device=device)  # noqa: E731
    if "axes_dims_rope" not in c:  # SD3
        kwargs = {"encoder_hidden_states": make(rows, 77 + SD3.conditioner.max_sequence_length, c.joint_attention_dim),
                  "pooled_projections": make(rows, c.pooled_projection_dim)}
        return make(rows, c.in_channels, c.sample_size, c.sample_size), full(999.0), kwargs
    tokens = (FLUX_LATENT_SIDE // 2) ** 2
    ids = lambda n: torch.zeros(n, 3, device=device, dtype=torch.bfloat16)  # noqa: E731
    kwargs = {"encoder_hidden_states": make(rows, FLUX_T5_TOKENS, c.joint_attention_dim),
              "pooled_projections": make(rows, c.pooled_projection_dim), "img_ids": ids(tokens),
              "txt_ids": ids(FLUX_T5_TOKENS), "guidance": full(3.5)}
    return make(rows, tokens, c.in_channels), full(0.999), kwargs


def forward(net, x: torch.Tensor, t: torch.Tensor, kwargs: dict):
    """One call of the network: a UNet's (sample, timestep, ...), a transformer's by keyword (hidden_states, ...)."""
    return net(hidden_states=x, timestep=t, **kwargs) if is_transformer(net) else net(x, t, **kwargs)


def measure(unet, rows: int, part: str = "network", ckpt: str = "record", adapter: bool = True, train: bool = True,
            input_grad: bool = False, autocast: bool = True, head=None, full: bool = False) -> tuple[int, int]:
    """(bytes kept for backward, largest block's) of one forward of the network (UNet or transformer) or a UNet's
    encoder half (into ``head``); ``full``: every network weight trains (a full student), else the LoRA alone."""
    device = next(unet.parameters()).device.type
    x, t, kwargs = inputs(unet, rows, device)
    x.requires_grad_(input_grad)
    unet.enable_adapters() if adapter else unet.disable_adapters()
    for name, p in unet.named_parameters():
        p.requires_grad_(train and (full or "lora_" in name))
    saved = SavedBytes(unet, *([head] if head else []))
    unet.disable_gradient_checkpointing()
    if ckpt != "off":  # "on": as the trainer enables it; "record": off, recording what each block keeps
        unet.enable_gradient_checkpointing(None if ckpt == "on" else saved.run_unit)
    torch.utils.checkpoint.checkpoint = non_reentrant_checkpoint
    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
    try:
        with hooks, GpuKernels(autocast and device != "cuda"):  # fake CUDA tensors: torch's own autocast
            if part == "network":
                forward(unet, x, t, kwargs)
            else:  # as the discriminators run it: the encoder half, no checkpointing
                if x.dim() == 3:  # FLUX's packed tokens: the discriminators read (B, C, H, W) latents
                    x = unpack_latents(x, FLUX_LATENT_SIDE, FLUX_LATENT_SIDE)
                features = network_features(unet, x, t, **kwargs)
                if head is not None:
                    head(features if isinstance(head, DiscriminatorHeads) else features[-1])
    finally:
        torch.utils.checkpoint.checkpoint = CHECKPOINT
    return sum(saved.storages.values()), max(saved.units)


def curve(f):
    """``f`` measured at 1 and 2 rows, extended linearly (kept bytes are a + b x rows)."""
    one, two = f(1), f(2)
    return lambda rows: tuple(a + (rows - 1) * (b - a) for a, b in zip(one, two))


def count(module: torch.nn.Module, only=lambda name: True, buffers: bool = False) -> int:
    """The exact number of parameters (of those whose name passes ``only``); ``buffers``: with the persistent
    buffers, which the weight file holds and the GPU too (SD3's positional-embedding table)."""
    named = module.state_dict(keep_vars=True).items() if buffers else module.named_parameters()
    return sum(p.numel() for n, p in named if only(n))


def text_encoder(cls: str, config: dict) -> torch.nn.Module:
    """The transformers text encoder ``cls`` ("CLIPTextModel", "T5EncoderModel", ...) built from ``config``."""
    import transformers

    model = getattr(transformers, cls)
    return model(model.config_class(**config))


def teacher(net: torch.nn.Module, label: str, vae: dict, encoders: list[tuple[str, dict]], vae_fp32: bool,
            **more: int) -> tuple[dict, dict]:
    """(exact parameter counts, frozen weight bytes as loaded) of the network ``label`` with its LoRA, ``more``
    (counted after the LoRA), the VAE and the text encoders, on the meta device; all in bf16 but an fp32 VAE."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        frozen = {"VAE": count(AutoencoderKL(**vae)), "text encoders": sum(count(text_encoder(*e)) for e in encoders)}
    n = {label: count(net, lambda k: "lora_" not in k, buffers=is_transformer(net)),
         "lora": count(net, lambda k: "lora_" in k), **more, **frozen}
    return n, {label: 2 * n[label], "VAE": (4 if vae_fp32 else 2) * n["VAE"], "text encoders": 2 * n["text encoders"]}


def lora_curves(net: torch.nn.Module) -> dict:
    """The activation curves of the network whose LoRA trains (the graph "unet"), checkpointing on and off."""
    return {"unet on": curve(lambda r: measure(net, r, ckpt="on")), "unet off": curve(lambda r: measure(net, r))}


def discriminator_parts(net: torch.nn.Module, latent_side: int) -> tuple[dict, dict]:
    """(parameter counts, activation curves) of the discriminators on ``net``'s encoder half: heads, DMD2's
    classifier, ufogen's encoder adapter (the student LoRA's size on the modules the features read)."""
    with torch.device("meta"):
        heads = DiscriminatorHeads.from_unet_config(net.config)
        classifier = BottleneckClassifier.for_network(net, latent_side)
    read = set(encoder_modules(net, [name for name, _ in net.named_modules()]))
    counts = {"encoder lora": count(net, lambda k: "lora_" in k and k.split(".lora_")[0] in read),
              "heads": count(heads), "classifier": count(classifier)}
    frozen = dict(part="encoder", train=False, input_grad=True)
    curves = {"teacher encoder": curve(lambda r: measure(net, r, **frozen, adapter=False, autocast=False)),
              "frozen encoder": curve(lambda r: measure(net, r, **frozen)),
              "plain frozen encoder": curve(lambda r: measure(net, r, **frozen, autocast=False)),
              "trained encoder": curve(lambda r: measure(net, r, part="encoder")),
              "heads": curve(lambda r: measure(net, r, part="encoder", train=False, head=heads)),
              "classifier": curve(lambda r: measure(net, r, part="encoder", train=False, head=classifier))}
    return counts, curves


def family(unet_config: dict, encoders: list[dict], vae_fp32: bool) -> dict:
    """Parameter counts, frozen weight bytes and activation curves of one UNet teacher family, on the meta device."""
    unet = build_unet(unet_config)
    clips = [("CLIPTextModelWithProjection" if i else "CLIPTextModel", cfg) for i, cfg in enumerate(encoders)]
    parts, discriminator_curves = discriminator_parts(unet, unet.config.sample_size)
    n, weights = teacher(unet, "UNet", VAE, clips, vae_fp32, **parts)
    curves = {**lora_curves(unet), "unet full on": curve(lambda r: measure(unet, r, ckpt="on", full=True)),
              "unet full off": curve(lambda r: measure(unet, r, full=True)), **discriminator_curves}
    return {"counts": n, "weights": weights, "curves": curves}


def transformer_family(network: str, config: dict, encoders: list[tuple[str, dict]], vae_fp32: bool,
                       latent_side: int) -> dict:
    """Parameter counts, frozen weight bytes and activation curves of a flow-matching transformer teacher, on the
    meta device (the LoRA on TRANSFORMER_LORA_TARGETS, as for the sd3 family)."""
    net = build_network(config, network, TRANSFORMER_LORA_TARGETS)
    parts, discriminator_curves = discriminator_parts(net, latent_side)
    n, weights = teacher(net, "transformer", VAE_16, encoders, vae_fp32, **parts)
    return {"counts": n, "weights": weights, "curves": {**lora_curves(net), **discriminator_curves}}


def activations(fam: dict, graphs, nograd_rows: int, batch: int, ckpt: bool) -> int:
    """Bytes the graphs keep at ``batch``, plus one block's transient (recomputed, or live in a no-gradient call).

    A graph named "unet" is the denoiser network (a UNet or a transformer) whose LoRA trains, "unet full" one whose
    every weight trains (a full student)."""
    c, total, transient = fam["curves"], 0, fam["curves"]["unet off"](nograd_rows * batch)[1]
    for name, k in graphs:
        if name.startswith("unet"):
            total += c[f"{name} {'on' if ckpt else 'off'}"](k * batch)[0]
            if ckpt:
                transient = max(transient, c[f"{name} off"](k * batch)[1])
        else:
            total += c[name](k * batch)[0]
    return total + transient


def fake_cuda(unet: torch.nn.Module):
    """(``unet`` with fake CUDA weights, without data, so that torch's CUDA autocast runs on it; the fake mode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        for m in unet.modules():
            for store in (m._parameters, m._buffers):
                for k, v in store.items():
                    if v is not None:
                        new = torch.empty_like(v, device="cuda")
                        store[k] = torch.nn.Parameter(new, v.requires_grad) if store is m._parameters else new
    return unet, mode


UNET_CASES = {"UNet, checkpointing on": dict(ckpt="on"), "UNet, checkpointing off": dict(ckpt="off"),
              "largest block, checkpointing off": {}, "encoder half, trained LoRA": dict(part="encoder"),
              "encoder half, teacher, no autocast": dict(part="encoder", train=False, input_grad=True, adapter=False,
                                                         autocast=False)}
TRANSFORMER_CASES = {"transformer, checkpointing on": dict(ckpt="on"),
                     "transformer, checkpointing off": dict(ckpt="off"), "largest block, checkpointing off": {}}


def tiny_check(build, cases: dict) -> list[str]:
    """The accounting on a tiny network ``build(device)`` makes: real CPU tensors, meta, and fake CUDA tensors under
    torch's autocast."""
    cpu, meta = build("cpu"), build("meta")
    cuda, mode = fake_cuda(build("meta"))
    lines = ["| kept for backward, batch 2 (bytes) | real CPU tensors | meta | fake CUDA, torch's autocast |",
             "|---|---|---|---|"]
    for name, kwargs in cases.items():
        with mode:  # torch's own CUDA autocast, switched on without a GPU
            torch.set_autocast_dtype("cuda", torch.bfloat16)
            torch.set_autocast_enabled("cuda", kwargs.get("autocast", True))
            on_cuda = measure(cuda, 2, **kwargs)
            torch.set_autocast_enabled("cuda", False), torch.clear_autocast_cache()
        real, fake = measure(cpu, 2, **kwargs), measure(meta, 2, **kwargs)
        real, fake, on_cuda = (x[1 if name.startswith("largest") else 0] for x in (real, fake, on_cuda))
        assert real == fake or "no autocast" in name, f"meta and CPU disagree on {name}: {fake} != {real}"
        lines.append(f"| {name} | {real:,} | {fake:,} | {on_cuda:,} |")
    return lines


def tiny_checks() -> list[str]:
    """Markdown: ``tiny_check`` on the tiny SD teacher's UNet and the tiny SD3 teacher's transformer, LoRA rank 8."""
    from distill.testing import tiny_sd3_transformer, tiny_unet

    unet = partial(build_network, {}, "UNet2DConditionModel", UNET_LORA_TARGETS, rank=8,
                   factory=partial(tiny_unet, sdxl=False, cross_attention_dim=32, seed=0))
    sd3 = partial(build_network, {}, SD3.network_class, TRANSFORMER_LORA_TARGETS, factory=tiny_sd3_transformer, rank=8)
    return (["The meta path against real tensors (tiny SD teacher, LoRA rank 8):", ""] + tiny_check(unet, UNET_CASES)
            + ["", "The same on the tiny SD3 teacher's transformer (LoRA rank 8):", ""]
            + tiny_check(sd3, TRANSFORMER_CASES))


def method_gib(f: dict, groups, graphs, nograd: int, ckpt: bool) -> list[str]:
    """GiB of: frozen weights, trainable + grads + AdamW, activations, total (batch 1), activations per extra sample."""
    weights, trainable = sum(f["weights"].values()), 16 * sum(f["counts"][g] for g in groups)
    one, two = (activations(f, graphs, nograd, b, ckpt) for b in (1, 2))
    values = (weights, trainable, one, weights + trainable + one, two - one)
    return [f"{x / GIB:.{2 if i == 4 else 1}f}" for i, x in enumerate(values)]


def tables(families: dict, methods: dict, note: str) -> list[str]:
    """Markdown: exact parameter counts, per-method GiB with gradient checkpointing on, ``note``, then off."""
    out = ["| parameters (bytes as loaded) | " + " | ".join(families) + " |", "|" + "---|" * (1 + len(families))]
    for key in next(iter(families.values()))["counts"]:
        out.append(f"| {LABELS.get(key, key)} | " + " | ".join(f"{f['counts'][key]:,}" + (
            f" ({f['weights'][key] / GIB:.2f} GiB)" if key in f["weights"] else "") for f in families.values()) + " |")
    for name, f in families.items():
        out += ["", f"{name}, batch 1 per GPU, gradient checkpointing on (GiB):", "",
                "| method | frozen weights | trainable + grads + AdamW | activations | total | + per extra sample |",
                "|---|---|---|---|---|---|"]
        out += [f"| {m} | " + " | ".join(method_gib(f, *spec, True)) + " |" for m, spec in methods.items()]
    out += ["", note, "", "Gradient checkpointing off, batch 1 per GPU (GiB; weights and trainable as above):", "",
            "| method | " + " | ".join(f"{n}: activations | total | + per extra sample" for n in families) + " |",
            "|---|" + "---|" * 3 * len(families)]
    for m, spec in methods.items():
        cells = [cell for f in families.values() for cell in method_gib(f, *spec, False)[2:]]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="markdown file whose generated section is replaced (created if missing)")
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()  # its note on casting a UNet with .to(), 5 times over
    unets = {"SD1.5 512 px": family(SD15_UNET, [CLIP_L], SD.vae_fp32),
             "SDXL 1024 px": family(SDXL_UNET, [CLIP_L, CLIP_BIGG], SDXL.vae_fp32)}
    sd3_encoders = list(zip(SD3.conditioner.encoder_classes, (CLIP_L, CLIP_BIGG, T5_XXL), strict=True))
    transformers = {
        "SD3.5-medium 1024 px": transformer_family(SD3.network_class, SD35_MEDIUM, sd3_encoders, SD3.vae_fp32,
                                                   SD35_MEDIUM["sample_size"]),
        "SD3.5-large 1024 px": transformer_family(SD3.network_class, SD35_LARGE, sd3_encoders, SD3.vae_fp32,
                                                  SD35_LARGE["sample_size"]),
        "FLUX.1-dev 1024 px": transformer_family("FluxTransformer2DModel", FLUX_DEV,
                                                 [("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL)], False,
                                                 FLUX_LATENT_SIDE)}
    title = ("Flow-matching transformer teachers (the sd3 and flux families; the discriminators read the first half "
             "of the joint blocks, and dmd2's GAN classifier is off by default there):")
    text = "\n".join(tables(unets, METHODS, OVERHEAD) + ["", title, ""]
                     + tables(transformers, TRANSFORMER_METHODS, FLUX_NOTE) + [""] + tiny_checks())
    print(text)
    if args.out:
        write_section(Path(args.out), text, "benchmarks/gpu_memory.py")


def write_section(path: Path, text: str, script: str) -> None:
    """Replace the section of ``path`` generated by ``script`` with ``text`` (appended where there is none yet)."""
    begin, end = f"<!-- generated by {script} -->", "<!-- end generated -->"
    old = path.read_text() if path.exists() else ""
    if begin not in old:
        old += f"\n{begin}\n{end}\n"
    section = f"{begin}\n{text}\n{end}"
    path.write_text(re.sub(f"{re.escape(begin)}.*?{end}", lambda _: section, old, count=1, flags=re.S))


if __name__ == "__main__":
    main()
