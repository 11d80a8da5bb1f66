"""Tiny SD-, SDXL- and SD3-shaped teachers built from config, for tests, demos and offline benchmarks.

Everything here works without the Hub: the CLIP tokenizer is rebuilt from the BPE vocabulary
that open_clip ships inside its wheel, the T5 tokenizer is a small Unigram vocabulary of English words,
and the models are initialised from a seed.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

CLIP_VOCAB_SIZE = 49408
TINY_RESOLUTION = 32
T5_WORDS = (
    "zero one two three four five six seven eight nine ten a an the of in on with and photo picture image drawing "
    "handwritten digit number letter white black red green blue small large striped dark light background"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-unicode table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_clip_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write vocab.json and merges.txt of the real CLIP BPE tokenizer, rebuilt from open_clip's vocabulary."""
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merge_lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in merge_lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [token + "</w>" for token in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def clip_tokenizer(folder: str | os.PathLike, max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A real CLIPTokenizer (same merges and ids as openai/clip-vit-large-patch14) built offline."""
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer_files(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:] if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=pad_token)


def tiny_text_encoder(hidden_size: int, projection_dim: int, with_projection: bool, seed: int):
    """A 2-layer CLIP text encoder with the real vocabulary size."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=projection_dim,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_vae(
    seed: int = 0,
    block_out_channels: tuple[int, ...] = (32, 64),
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    use_quant_conv: bool = True,
):
    """A small AutoencoderKL (downsampling factor 2 ** (len(block_out_channels) - 1)), SD- or SD3-style."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=list(block_out_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(block_out_channels),
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=use_quant_conv,
        use_post_quant_conv=use_quant_conv,
    )


def tiny_unet(
    sdxl: bool,
    cross_attention_dim: int,
    seed: int = 0,
    sample_size: int = 16,
    block_out_channels: tuple[int, ...] = (32, 64),
):
    """UNet2DConditionModel shaped like diffusers' own SD / SDXL unit-test UNets."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
    )
    if sdxl:
        kwargs.update(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + pooled text embeds (32)
        )
    else:
        kwargs.update(attention_head_dim=8)
    return UNet2DConditionModel(**kwargs)


def ddpm_scheduler(prediction_type: str = "epsilon"):
    """The scheduler config SD 1.x/SDXL ship with (scaled-linear betas, 1000 steps, ``clip_sample: false``).

    Real SD folders ship PNDM (SD 1.x) or Euler (SDXL) with the same betas. ``clip_sample`` is recorded as real SD
    configs record it: DDIM/DDPM schedulers built with ``from_config`` would otherwise clip predicted latents to
    [-1, 1], which ruins unit-variance latents.
    """
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 prediction_type=prediction_type, steps_offset=1)
    if prediction_type == "epsilon":
        scheduler = PNDMScheduler(skip_prk_steps=True, **betas)
    else:
        scheduler = EulerDiscreteScheduler(timestep_spacing="leading", **betas)
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def save_tiny_pipeline(pipe, folder: Path) -> Path:
    """Save ``pipe`` to ``folder`` and remove the tokenizer files the builders wrote there first."""
    pipe.save_pretrained(folder)
    for leftover in (folder / "_tokenizer_src").iterdir():
        leftover.unlink()
    (folder / "_tokenizer_src").rmdir()
    return folder


def build_tiny_teacher(
    folder: str | os.PathLike,
    sdxl: bool = False,
    seed: int = 0,
    prediction_type: str = "epsilon",
    unet=None,
    vae=None,
    text_encoder=None,
):
    """Save a tiny SD (sdxl=False) or SDXL teacher in the standard diffusers folder layout."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = Path(folder)
    tokenizer = clip_tokenizer(folder / "_tokenizer_src")
    if sdxl:
        tokenizer_2 = clip_tokenizer(folder / "_tokenizer_src", pad_token="!")
        pipe = StableDiffusionXLPipeline(
            vae=vae or tiny_vae(seed),
            text_encoder=text_encoder or tiny_text_encoder(32, 32, with_projection=False, seed=seed + 1),
            text_encoder_2=tiny_text_encoder(32, 32, with_projection=True, seed=seed + 2),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet or tiny_unet(sdxl=True, cross_attention_dim=64, seed=seed),
            scheduler=ddpm_scheduler(prediction_type),
            force_zeros_for_empty_prompt=True,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae or tiny_vae(seed),
            text_encoder=text_encoder or tiny_text_encoder(32, 32, with_projection=False, seed=seed + 1),
            tokenizer=tokenizer,
            unet=unet or tiny_unet(sdxl=False, cross_attention_dim=32, seed=seed),
            scheduler=ddpm_scheduler(prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return save_tiny_pipeline(pipe, folder)


def t5_tokenizer(max_length: int = 256):
    """A T5TokenizerFast (Unigram, ids <pad>=0 </s>=1 <unk>=2, </s> appended) over T5_WORDS, letters and digits."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + word, -5.0) for word in dict.fromkeys(T5_WORDS)]
    pieces += [(char, -10.0) for char in string.ascii_letters + string.digits]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def tiny_t5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    """A 2-layer T5EncoderModel (2 heads of 16, feed-forward 64) like the tiny T5 in diffusers' SD3 tests."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_sd3_transformer(seed: int = 0, sample_size: int = TINY_RESOLUTION // 2, in_channels: int = 4,
                         num_layers: int = 2, attention_head_dim: int = 8, num_attention_heads: int = 4):
    """SD3Transformer2DModel shaped like diffusers' own SD3 unit-test transformer (by default inner dim 32, 2 blocks)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        caption_projection_dim=attention_head_dim * num_attention_heads,
        joint_attention_dim=32,  # T5's d_model, which the two CLIP hidden states side by side (16 + 16) fill
        pooled_projection_dim=64,  # the two CLIP text projections, 32 + 32
        pos_embed_max_size=2 * sample_size,  # patch grids up to 4x the native side (128 px)
    )


def build_tiny_sd3_teacher(folder: str | os.PathLike, seed: int = 0, transformer=None, vae=None,
                           flow_shift: float = 3.0) -> Path:
    """Save a tiny Stable Diffusion 3 teacher (two CLIPs, T5, MMDiT, flow matching) in the diffusers folder layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    folder = Path(folder)
    vae = vae or tiny_vae(seed, latent_channels=4, scaling_factor=1.5035, shift_factor=0.0609, use_quant_conv=False)
    downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
    tokenizer_3 = t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer or tiny_sd3_transformer(seed, TINY_RESOLUTION // downsampling,
                                                        vae.config.latent_channels),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift),
        vae=vae,
        # CLIP states 16 + 16 wide fit T5's 32 (the pipeline crops wider ones); projections 32 + 32 = pooled 64
        text_encoder=tiny_text_encoder(16, 32, with_projection=True, seed=seed + 1),
        tokenizer=clip_tokenizer(folder / "_tokenizer_src"),
        text_encoder_2=tiny_text_encoder(16, 32, with_projection=True, seed=seed + 2),
        tokenizer_2=clip_tokenizer(folder / "_tokenizer_src", pad_token="!"),
        text_encoder_3=tiny_t5_encoder(len(tokenizer_3), d_model=32, seed=seed + 3),
        tokenizer_3=tokenizer_3,
    )
    return save_tiny_pipeline(pipe, folder)


def tiny_flux_transformer(seed: int = 0, latent_channels: int = 4, guidance_embeds: bool = True):
    """A 1 double- + 1 single-stream FluxTransformer2DModel reading 2x2-packed latents (in_channels = 4 x latent)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))


def build_tiny_flux_teacher(folder: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Save a tiny FLUX.1-shaped teacher (CLIP-L pooled + T5, packed latents, resolution-dependent flow shift;
    ``guidance_embeds``: FLUX.1-dev's guidance input, off for FLUX.1-schnell) in the diffusers folder layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    folder = Path(folder)
    vae = tiny_vae(seed, latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False)
    tokenizer_2 = t5_tokenizer(max_length=512)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                  base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                  max_image_seq_len=4096),
        vae=vae,
        text_encoder=tiny_text_encoder(32, 32, with_projection=False, seed=seed + 1),  # pooled 32 = pooled_projection
        tokenizer=clip_tokenizer(folder / "_tokenizer_src"),
        text_encoder_2=tiny_t5_encoder(len(tokenizer_2), d_model=32, seed=seed + 2),
        tokenizer_2=tokenizer_2,
        transformer=tiny_flux_transformer(seed, vae.config.latent_channels, guidance_embeds),
    )
    return save_tiny_pipeline(pipe, folder)


def method_on_teacher(method_cls, config, folder, resolution: int | None = None, prediction_type: str | None = None):
    """(method, loaded teacher): ``method_cls`` on the teacher folder, built as the trainer builds it (load_teacher);
    ``prediction_type`` re-reads the teacher's schedule as eps/v/x0 prediction for tests of each conversion."""
    from .methods.base import Teacher
    from .schedule import NoiseSchedule
    from .teacher import inspect_teacher, load_teacher, native_resolution

    info = inspect_teacher(str(folder))
    loaded = load_teacher(info, resolution or native_resolution(info))
    if prediction_type:
        loaded.schedule = NoiseSchedule.from_scheduler_config({**loaded.scheduler_config,
                                                               "prediction_type": prediction_type})
    return method_cls(Teacher.of(loaded), config), loaded


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """A weights file for torch-fidelity's FID Inception with random weights (same keys and shapes as the real
    weights-inception-2015-12-05 file), for offline tests of the FID code path. FID from it means nothing.

    torch-fidelity's constructor always loads a weights file (or downloads one): this builds the network with that
    load skipped, initialises the convolutions He-normal (He et al. 2015, eq. 10) so the 2048-d features stay
    O(1) through 90 layers instead of vanishing, and saves the state dict.
    """
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        empty = Path(scratch) / "empty.pth"
        torch.save({}, empty)
        torch.manual_seed(seed)
        network = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return path
