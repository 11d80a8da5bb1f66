"""The tiny SD3 teacher: saved offline in the diffusers layout, it loads back, generates, and its T5 tokenizer
round-trips."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from distill.testing import TINY_RESOLUTION, T5_WORDS, t5_tokenizer

MAX_SEQUENCE_LENGTH = 32


@pytest.fixture(scope="module")
def pipe(sd3_teacher):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(sd3_teacher)


@pytest.fixture(scope="module")
def tokenizer_3(sd3_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sd3_teacher, subfolder="tokenizer_3")


def test_folder_has_the_standard_sd3_layout(sd3_teacher):
    expected = {"model_index.json", "scheduler", "transformer", "vae", "text_encoder", "text_encoder_2",
                "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"}
    assert {p.name for p in sd3_teacher.iterdir()} == expected  # no _tokenizer_src left behind
    assert (sd3_teacher / "tokenizer_3" / "tokenizer.json").is_file()


def test_pipeline_loads_back_and_generates_finite_images(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0 and pipe.scheduler.config.num_train_timesteps == 1000
    images = pipe("a photo of three", num_inference_steps=2, guidance_scale=2.0, height=TINY_RESOLUTION,
                  width=TINY_RESOLUTION, max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0


def test_t5_tokenizer_round_trips(tokenizer_3, pipe):
    ids = tokenizer_3("a photo of three", padding="max_length", max_length=MAX_SEQUENCE_LENGTH).input_ids
    assert len(ids) == MAX_SEQUENCE_LENGTH
    assert (tokenizer_3.pad_token_id, tokenizer_3.eos_token_id, tokenizer_3.unk_token_id) == (0, 1, 2)
    assert ids[:5] == [tokenizer_3.convert_tokens_to_ids("▁" + w) for w in ("a", "photo", "of", "three")] + [1]
    assert min(ids[:4]) > 2 and ids[5:] == [0] * (MAX_SEQUENCE_LENGTH - 5)
    assert tokenizer_3.decode(ids, skip_special_tokens=True) == "a photo of three"
    assert ids == t5_tokenizer()("a photo of three", padding="max_length", max_length=MAX_SEQUENCE_LENGTH).input_ids
    assert len(tokenizer_3) == pipe.text_encoder_3.config.vocab_size == 4 + len(set(T5_WORDS)) + 62


def test_t5_tokenizer_maps_unknown_text_to_unk_without_crashing(tokenizer_3):
    ids = tokenizer_3("a Xylophone, über 7!").input_ids
    assert ids[-1] == 1 and 2 in ids  # ",", "ü" and "!" are not in the vocabulary
    assert tokenizer_3.convert_tokens_to_ids("▁Xylophone") == 2
    assert tokenizer_3.decode(tokenizer_3("handwritten digit seven").input_ids, skip_special_tokens=True) == \
        "handwritten digit seven"


def test_transformer_conditioning_widths_match_the_text_encoders(pipe):
    config = pipe.transformer.config
    assert config.joint_attention_dim == pipe.text_encoder_3.config.d_model == 32
    assert config.pooled_projection_dim == (pipe.text_encoder.config.projection_dim
                                            + pipe.text_encoder_2.config.projection_dim) == 64
    assert config.in_channels == config.out_channels == pipe.vae.config.latent_channels == 4
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (2, 4, 8)
    assert config.caption_projection_dim == config.num_attention_heads * config.attention_head_dim
    # the two CLIP hidden states side by side fill T5's width, so the pipeline pads nothing away (it crops wider ones)
    assert pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size == config.joint_attention_dim
    prompt_embeds, _, pooled, _ = pipe.encode_prompt("a photo of three", None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert prompt_embeds.shape == (1, pipe.tokenizer_max_length + MAX_SEQUENCE_LENGTH, 32)
    assert pooled.shape == (1, 64)


def test_vae_is_sd3_style_with_16_pixel_latents_at_32_px(pipe):
    vae = pipe.vae
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.0609, 1.5035)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert pipe.vae_scale_factor == 2
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == TINY_RESOLUTION
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, TINY_RESOLUTION, TINY_RESOLUTION)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)
