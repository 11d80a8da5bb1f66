"""Images and captions to latent batches: prompt dropout and the latent/embedding cache."""

from __future__ import annotations

import torch

from distill.batching import BatchEncoder, CachedLatents
from distill.teacher import inspect_teacher
from distill.data import ImageDataConfig, build_image_caption_dataset, collate_image_caption
from distill.teacher import load_teacher


def encoder_for(teacher, p: float = 0.0) -> BatchEncoder:
    loaded = load_teacher(inspect_teacher(str(teacher)), 32)
    return BatchEncoder(loaded.vae, loaded.conditioner, proportion_empty_prompts=p)


def image_batch(image_folder, n: int = 4) -> dict:
    dataset = build_image_caption_dataset(ImageDataConfig(train_data_dir=str(image_folder), resolution=32))
    return collate_image_caption([dataset[i] for i in range(n)])


def test_proportion_empty_prompts_is_applied(sdxl_teacher, image_folder):
    batch = image_batch(image_folder)
    kept = encoder_for(sdxl_teacher, 0.0)(batch, "cpu")
    dropped = encoder_for(sdxl_teacher, 1.0)(batch, "cpu")
    torch.testing.assert_close(dropped.cond.prompt_embeds, dropped.uncond.prompt_embeds)
    torch.testing.assert_close(dropped.cond.pooled_prompt_embeds, dropped.uncond.pooled_prompt_embeds)
    assert not torch.allclose(kept.cond.prompt_embeds, kept.uncond.prompt_embeds)
    # SDXL micro-conditioning stays the image's own, whatever happens to the prompt
    torch.testing.assert_close(dropped.cond.time_ids, kept.cond.time_ids)
    assert dropped.cond.time_ids[:, :2].tolist() == [[40, 48]] * 4  # original (h, w) of the 40x48 images

    torch.manual_seed(0)
    half = encoder_for(sdxl_teacher, 0.5)(image_batch(image_folder, 8), "cpu")
    same = [torch.equal(c, u) for c, u in zip(half.cond.prompt_embeds, half.uncond.prompt_embeds)]
    assert 0 < sum(same) < 8


def test_cache_matches_on_the_fly_encoding(sd_teacher, image_folder, tmp_path):
    encoder = encoder_for(sd_teacher)
    dataset = build_image_caption_dataset(ImageDataConfig(train_data_dir=str(image_folder), resolution=32))
    cache = CachedLatents.build(dataset, collate_image_caption, encoder, tmp_path / "c.safetensors", batch_size=3,
                                show_progress=False)
    assert len(cache) == len(dataset) and (tmp_path / "c.safetensors").is_file()
    item = collate_image_caption([dataset[5]])
    cached = torch.utils.data.default_collate([cache[5]])
    direct = encoder(item, "cpu")
    from_cache = encoder(cached, "cpu")
    torch.testing.assert_close(from_cache.cond.prompt_embeds, direct.cond.prompt_embeds)
    assert from_cache.latents.shape == direct.latents.shape == (1, 4, 16, 16)
    # cached latents are scaled samples of the VAE posterior of the same image: standardised, they look N(0, 1)
    with torch.no_grad():
        posterior = encoder.vae.encode(item["pixel_values"]).latent_dist
    z = (from_cache.latents / encoder.vae.config.scaling_factor - posterior.mean) / posterior.std
    assert z.abs().max() < 6 and 0.8 < z.std() < 1.2 and z.mean().abs() < 0.2
    reloaded = CachedLatents.build(dataset, collate_image_caption, encoder, tmp_path / "c.safetensors")
    torch.testing.assert_close(reloaded[5]["latents"], cache[5]["latents"])
