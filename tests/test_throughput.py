"""What makes training steps faster must not change what they compute: regional torch.compile, channels-last
weights, the fused AdamW, and the data loader's defaults. (The one batched real/fake score pass is checked in test_score_distillation.py.)"""

from __future__ import annotations

import pytest
import torch

from distill.data import ImageDataConfig
from distill.methods import LCMConfig
from distill.optimizers import adamw
from distill.trainer import Trainer, TrainConfig, loader_workers


def lcm_run(teacher, images, out, **overrides) -> Trainer:
    config = TrainConfig(pretrained_teacher_model=str(teacher), output_dir=str(out), seed=0, train_batch_size=2,
                         max_train_steps=2, checkpointing_steps=2, validation_steps=0, learning_rate=1e-2,
                         lr_warmup_steps=0, export_pipeline=False, export_format="diffusers", **overrides)
    return Trainer("lcm", LCMConfig(lora_rank=4), ImageDataConfig(train_data_dir=str(images)), config)


def logged_losses(out) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent)).Reload()
    return [e.value for e in events.Scalars("loss/unet")]


@pytest.fixture(scope="module")
def eager(sd_teacher, image_folder, tmp_path_factory) -> tuple[Trainer, list[float]]:
    """A two-step LCM run with the defaults (channels-last frozen weights, no compilation) and its logged losses."""
    out = tmp_path_factory.mktemp("eager")
    trainer = lcm_run(sd_teacher, image_folder, out)
    trainer.run()
    losses = logged_losses(out)
    assert len(losses) == 2 and losses[0] != losses[1]
    return trainer, losses


def assert_same_losses(actual: list[float], expected: list[float]) -> None:
    """The first step's loss up to float noise (rtol 1e-4); later steps read weights after an Adam step, which turns
    float noise in near-zero gradients into whole learning-rate steps (here 1e-2), so they get rtol 1e-3 (a run on a
    busy machine measured 1.7e-4 on the second step of two runs that differ only in memory layout)."""
    assert len(actual) == len(expected)
    torch.testing.assert_close(actual[:1], expected[:1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(actual[1:], expected[1:], rtol=1e-3, atol=1e-6)


def conv_weights(network: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in network.named_parameters() if p.dim() == 4}


def test_frozen_conv_weights_are_channels_last_and_train_the_same_student(eager, sd_teacher, image_folder, tmp_path):
    """By default the frozen 4-D weights of the UNet and the VAE are stored channels-last while the trainable LoRA
    convolutions stay contiguous (the fused AdamW needs parameter and moments in one layout); the losses equal those
    of a --no_channels_last run up to float noise, and that run keeps every weight contiguous."""
    trainer, losses = eager
    unet, vae = trainer.teacher.network, trainer.teacher.vae
    frozen = {n: p for n, p in conv_weights(unet).items() if not p.requires_grad}
    trainable = {n: p for n, p in conv_weights(unet).items() if p.requires_grad}
    assert frozen and trainable  # the LoRA student has trainable convolutions (lora_A of each conv layer)
    channels_last = torch.channels_last
    assert all(p.is_contiguous(memory_format=channels_last) for p in frozen.values())
    assert any(not p.is_contiguous() for p in frozen.values())  # 3x3 kernels: the layout really changed
    assert all(p.is_contiguous() for p in trainable.values())
    assert all(p.is_contiguous(memory_format=channels_last) for p in conv_weights(vae).values())
    contiguous = lcm_run(sd_teacher, image_folder, tmp_path / "nchw", channels_last=False)
    contiguous.run()
    assert all(p.is_contiguous() for p in conv_weights(contiguous.teacher.network).values())
    assert_same_losses(logged_losses(tmp_path / "nchw"), losses)


def test_torch_compile_trains_the_same_student_as_eager(eager, sd_teacher, image_folder, tmp_path):
    """--torch_compile compiles the UNet's transformer blocks (diffusers' regional compilation) and the run logs the
    losses of the eager run up to float noise: the first step's, and the second's, which reads the updated weights.
    (Weights are not compared: Adam turns float noise in a near-zero gradient into a full learning-rate step.)"""
    eager, losses = eager
    compiled = lcm_run(sd_teacher, image_folder, tmp_path / "compiled", torch_compile=True)
    compiled.run()
    blocks = [m for m in compiled.teacher.network.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in eager.teacher.network.modules())
    assert_same_losses(logged_losses(tmp_path / "compiled"), losses)


def test_the_fused_adamw_steps_like_torchs_reference_loop():
    """On the CPU (and CUDA) the optimizer is torch's fused AdamW; three steps land where the for-loop AdamW lands."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    starts = [p.detach().clone() for p in params]
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    fused, reference = adamw(params, **hyper), torch.optim.AdamW(twins, foreach=False, **hyper)
    assert fused.defaults["fused"] is True
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for group, optimizer in ((params, fused), (twins, reference)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            optimizer.step()
    for p, twin, start in zip(params, twins, starts):
        assert (p.detach() - start).abs().max() > 1e-3  # the weights moved
        torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


def test_weights_on_a_device_without_a_fused_kernel_get_the_loop():
    """torch has no fused kernel for weights on the meta device or for complex weights (and would only say so at the
    first step): the optimizer is then the default AdamW, decided when it is made."""
    for param in (torch.empty(4, device="meta"), torch.zeros(4, dtype=torch.complex64)):
        optimizer = adamw([torch.nn.Parameter(param)], lr=0.1)
        assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]
    complex_weight = optimizer.param_groups[0]["params"][0]
    complex_weight.grad = torch.ones_like(complex_weight)
    optimizer.step()  # the loop runs where fused=True would raise
    assert (complex_weight.detach().real < 0).all()


@pytest.mark.parametrize("device, requested, expected", [
    ("cpu", None, 0), ("cuda", None, None), ("cuda", 0, 0), ("cpu", 3, 3)])
def test_data_loader_workers_default_to_four_on_a_gpu_and_none_on_the_cpu(device, requested, expected):
    import os

    expected = min(4, os.cpu_count() or 1) if expected is None else expected
    assert loader_workers(requested, torch.device(device)) == expected


def test_cached_batches_never_touch_the_vae_or_the_text_encoders(sd_teacher):
    """With --cache_latents a step reads stored latents and embeddings: the encoder works with no VAE and no text
    encoders at all (only the empty prompt's condition, computed once before, is reused)."""
    from distill.batching import BatchEncoder
    from distill.conditioning import TextConditioner
    from distill.teacher import inspect_teacher, native_resolution

    info = inspect_teacher(str(sd_teacher))
    encoder = BatchEncoder(None, TextConditioner(info, native_resolution(info)))
    cond = encoder.conditioner.encode(["a handwritten digit two", "a red square"])
    encoder.uncond(1)
    encoder.conditioner = None  # from here on, any text encoding would fail
    latents = torch.randn(2, 4, 16, 16)
    batch = encoder({"latents": latents, "prompt_embeds": cond.prompt_embeds}, torch.device("cpu"))
    assert torch.equal(batch.latents, latents) and torch.equal(batch.cond.prompt_embeds, cond.prompt_embeds)
    assert batch.uncond.prompt_embeds.shape == cond.prompt_embeds.shape


def test_cached_flux_batches_keep_the_guidance_input(flux_teacher, tmp_path):
    """FLUX.1-dev's guidance input is part of the condition: a cached dataset stores it beside the embeddings, so
    cached batches reach the teacher with it, and prompt dropout can mix them with the empty prompt's condition."""
    from diffusers import AutoencoderKL

    from distill.batching import BatchEncoder, CachedLatents
    from distill.conditioning import TextConditioner
    from distill.teacher import inspect_teacher

    info = inspect_teacher(str(flux_teacher))
    conditioner = TextConditioner(info, 32)
    encoder = BatchEncoder(AutoencoderKL.from_pretrained(flux_teacher, subfolder="vae"), conditioner,
                           proportion_empty_prompts=0.5)
    images = [{"pixel_values": torch.rand(3, 32, 32) * 2 - 1, "caption": caption}
              for caption in ("a two", "a nine", "")]
    cache = CachedLatents.build(images, None, encoder, tmp_path / "latents.safetensors", show_progress=False)
    reloaded = CachedLatents.build(images, None, encoder, tmp_path / "latents.safetensors", show_progress=False)
    batch = encoder(torch.utils.data.default_collate([reloaded[i] for i in range(3)]), torch.device("cpu"))
    direct = conditioner.encode(["a two", "a nine", ""])
    assert set(cache.tensors) >= {"latents", "prompt_embeds", "pooled_prompt_embeds", "extra.guidance"}
    assert torch.equal(batch.cond.extra["guidance"], direct.extra["guidance"])
    assert torch.equal(batch.uncond.extra["guidance"], direct.extra["guidance"])

