"""Few-step text-to-image pipelines for distilled Stable Diffusion / SDXL / SD3 / FLUX.1 students.

This file travels inside exported pipeline folders and is loaded by
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``. It imports only torch,
diffusers and transformers. The pipelines are the stock ones; they only remember the sampling
defaults the student was distilled for (steps, guidance) and use them when the caller does not
say otherwise.
"""

from __future__ import annotations

from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline


class _FewStepDefaults:
    """Mixin: default ``num_inference_steps`` / ``guidance_scale`` stored in ``model_index.json``."""

    def _register_defaults(self, default_num_inference_steps: int, default_guidance_scale: float):
        self.register_to_config(
            default_num_inference_steps=int(default_num_inference_steps),
            default_guidance_scale=float(default_guidance_scale),
        )

    def _with_defaults(self, kwargs: dict) -> dict:
        kwargs.setdefault("num_inference_steps", self.config.default_num_inference_steps)
        kwargs.setdefault("guidance_scale", self.config.default_guidance_scale)
        return kwargs


class FewStepStableDiffusionPipeline(_FewStepDefaults, StableDiffusionPipeline):
    """StableDiffusionPipeline that samples with the distilled student's step count and guidance by default."""

    _optional_components = StableDiffusionPipeline._optional_components

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False, default_num_inference_steps: int = 4,
                 default_guidance_scale: float = 1.0):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self._register_defaults(default_num_inference_steps, default_guidance_scale)

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **self._with_defaults(kwargs))


class FewStepStableDiffusionXLPipeline(_FewStepDefaults, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline that samples with the distilled student's step count and guidance by default."""

    _optional_components = StableDiffusionXLPipeline._optional_components

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker=None, default_num_inference_steps: int = 4, default_guidance_scale: float = 1.0):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                         image_encoder=image_encoder, feature_extractor=feature_extractor,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self._register_defaults(default_num_inference_steps, default_guidance_scale)

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **self._with_defaults(kwargs))


class _ReNoisingGenerator:
    """Mixin: a re-noising scheduler draws from the caller's ``generator`` too (diffusers' SD3 and FLUX pipelines do
    not hand it to ``scheduler.step``), so a seed fixes the whole sample."""

    def _call_with_generator(self, call, args, kwargs):
        if hasattr(self.scheduler, "noise_generator"):
            self.scheduler.noise_generator = kwargs.get("generator")
        try:
            return call(*args, **self._with_defaults(kwargs))
        finally:
            if hasattr(self.scheduler, "noise_generator"):
                self.scheduler.noise_generator = None


class FewStepStableDiffusion3Pipeline(_FewStepDefaults, _ReNoisingGenerator, StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline that samples with the distilled student's step count and guidance by default."""

    _optional_components = StableDiffusion3Pipeline._optional_components

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, image_encoder=None, feature_extractor=None,
                 default_num_inference_steps: int = 4, default_guidance_scale: float = 1.0):
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, image_encoder=image_encoder, feature_extractor=feature_extractor)
        self._register_defaults(default_num_inference_steps, default_guidance_scale)

    def __call__(self, *args, **kwargs):
        return self._call_with_generator(super().__call__, args, kwargs)


class FewStepFluxPipeline(_FewStepDefaults, _ReNoisingGenerator, FluxPipeline):
    """FluxPipeline that samples with the distilled student's step count and guidance by default."""

    _optional_components = FluxPipeline._optional_components

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None, default_num_inference_steps: int = 4,
                 default_guidance_scale: float = 1.0):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        self._register_defaults(default_num_inference_steps, default_guidance_scale)

    def __call__(self, *args, **kwargs):
        return self._call_with_generator(super().__call__, args, kwargs)
