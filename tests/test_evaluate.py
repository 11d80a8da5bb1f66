"""Evaluation helpers: NFE counting on a real pipeline, Frechet distance, FID and CLIP score code paths offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from distill.evaluate import clip_model, clip_score, fid, frechet_distance, generate
from distill.testing import write_random_inception_weights


@pytest.fixture(scope="module")
def sd_pipe(sd_teacher):
    pipe = StableDiffusionPipeline.from_pretrained(sd_teacher)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def test_generate_counts_unet_evaluations(sd_pipe):
    prompts = ["a cat", "a dog", "a cow"]
    plain = generate(sd_pipe, prompts, num_inference_steps=3, guidance_scale=1.0, batch_size=2)
    guided = generate(sd_pipe, prompts, num_inference_steps=3, guidance_scale=4.0, batch_size=2)
    assert plain.images.shape == (3, 32, 32, 3) and plain.images.dtype == np.uint8
    assert plain.nfe_per_image == 3  # one evaluation per step without CFG
    assert guided.nfe_per_image == 6  # conditional + unconditional rows per step
    assert plain.seconds_per_image > 0
    again = generate(sd_pipe, prompts, num_inference_steps=3, guidance_scale=1.0, batch_size=2)
    assert np.array_equal(again.images, plain.images)  # seeded


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = a + np.array([2.0, 0.0, 0.0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)  # only the mean term moves
    scaled = a * 2.0  # covariances I and 4I: Tr(I + 4I - 2 * 2I) = 3
    assert frechet_distance(a, scaled) == pytest.approx(3.0, rel=0.05)


def test_fid_code_path_offline(tmp_path):
    weights = write_random_inception_weights(tmp_path / "inception.pth")  # the FID network, random weights
    rng = np.random.default_rng(0)
    real = (rng.random((6, 32, 32, 3)) * 255).astype(np.uint8)
    fake = np.clip(real.astype(int) + 80, 0, 255).astype(np.uint8)
    same, different = fid(real, real, weights), fid(real, fake, weights)
    assert np.isfinite(different) and different > 0
    assert same <= 1e-6 * different  # identical sets: zero up to round-off


def test_clip_score_code_path_offline(tmp_path):
    import open_clip

    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    rng = np.random.default_rng(0)
    images = (rng.random((4, 32, 32, 3)) * 255).astype(np.uint8)
    prompts = ["a cat", "a dog", "a red square", "a handwritten digit seven"]
    torch.manual_seed(0)  # the tiny CLIP's random init: unseeded, an unlucky draw scores every pair 0 (clamped)
    model, tokenizer = clip_model("tiny-clip-test")
    score = clip_score(images, prompts, model, tokenizer, batch_size=3)
    assert 0.0 < score <= 100.0
    assert clip_score(images, prompts, model, tokenizer) == pytest.approx(score)  # batching does not matter
    assert clip_score(images, prompts[::-1], model, tokenizer) != pytest.approx(score)  # pairs matter
