"""Tests of the scikit-learn digits default: split, image folder, Frechet distance, classifier API, teacher cache."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.demo import digits
from distill.errors import DistillError

TINY_RECIPE = dict(
    vae_steps=2, denoiser_steps=2, vae_batch_size=4, denoiser_batch_size=4, warmup_steps=1, progress=False, num_threads=1,
    guidance_candidates=(),
)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A digits teacher trained for two steps per model (fast, not useful for quality)."""
    return digits.build_digits_teacher(tmp_path_factory.mktemp("digits") / "teacher", **TINY_RECIPE)


def _mtimes(folder):
    return {path: path.stat().st_mtime_ns for path in sorted(folder.rglob("*")) if path.is_file()}


def test_captions_name_the_digit_word():
    assert digits.caption_for(7) == "a handwritten digit seven"
    assert [digits.caption_for(label).split()[-1] for label in range(10)] == list(digits.DIGIT_WORDS)


def test_split_is_deterministic_disjoint_stratified_and_upsampled():
    train_images, train_labels = digits.digits_split("train")
    test_images, test_labels = digits.digits_split("test")
    again_images, again_labels = digits.digits_split("train")
    np.testing.assert_array_equal(train_images, again_images)
    np.testing.assert_array_equal(train_labels, again_labels)

    indices = digits._split_indices()
    assert set(indices["train"]).isdisjoint(indices["test"])
    assert len(indices["train"]) + len(indices["test"]) == 1797
    assert (len(train_labels), len(test_labels)) == (1437, 360)
    assert np.bincount(test_labels, minlength=10).min() >= 35  # stratified: every class ~20% in test

    assert train_images.shape == (1437, 32, 32, 3) and train_images.dtype == np.uint8
    assert train_images.max() == 255 and train_images.min() == 0
    np.testing.assert_array_equal(train_images[..., 0], train_images[..., 2])  # grey RGB


def test_unknown_split_is_a_user_error():
    with pytest.raises(DistillError, match="validation"):
        digits.digits_split("validation")


def test_image_folder_metadata_matches_files_and_captions(tmp_path):
    folder = digits.write_digits_image_folder(tmp_path / "test_images", split="test")
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    images, labels = digits.digits_split("test")

    assert len(records) == len(labels) == 360
    assert [set(record) for record in records[:1]] == [{"file_name", "text"}]
    assert [record["text"] for record in records] == [digits.caption_for(label) for label in labels]
    assert sorted(path.name for path in folder.glob("*.png")) == sorted(r["file_name"] for r in records)
    for index in (0, 123, 359):
        np.testing.assert_array_equal(np.asarray(Image.open(folder / records[index]["file_name"])), images[index])

    before = _mtimes(folder)
    assert digits.write_digits_image_folder(folder, split="test") == folder
    assert _mtimes(folder) == before


def test_classifier_accepts_uint8_hwc_and_float_chw_alike():
    classifier = digits.DigitsClassifier()
    images, _ = digits.digits_split("test")
    images = images[:8]
    as_float_chw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0

    features = classifier.features(images)
    assert features.shape == (8, 64)
    np.testing.assert_allclose(features, classifier.features(as_float_chw), atol=1e-5)
    predictions = classifier.predict(images)
    assert predictions.shape == (8,) and set(predictions) <= set(range(10))
    np.testing.assert_array_equal(predictions, classifier.predict([Image.fromarray(image) for image in images]))


def test_teacher_folder_is_standard_sd_with_unit_scaled_latents(tiny_teacher):
    assert (tiny_teacher / "model_index.json").is_file()
    assert not tiny_teacher.with_name(tiny_teacher.name + ".tmp").exists()
    scheduler = json.loads((tiny_teacher / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["num_train_timesteps"]) == ("scaled_linear", 1000)
    assert scheduler["prediction_type"] == "epsilon"
    assert scheduler["clip_sample"] is False  # DDIMScheduler.from_config must not clip unit-variance latents
    vae_config = json.loads((tiny_teacher / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] > 0 and vae_config["scaling_factor"] != 0.18215
    marker = json.loads((tiny_teacher / digits.TEACHER_MARKER).read_text())
    assert marker["recipe"]["denoiser_steps"] == 2 and marker["recipe"]["seed"] == 0


def test_second_build_with_same_recipe_is_a_cache_hit(tiny_teacher):
    before = _mtimes(tiny_teacher)
    assert digits.build_digits_teacher(tiny_teacher, **TINY_RECIPE) == tiny_teacher
    assert _mtimes(tiny_teacher) == before


def test_build_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a teacher")
    with pytest.raises(DistillError, match="not a digits teacher"):
        digits.build_digits_teacher(tmp_path, **TINY_RECIPE)
    assert (tmp_path / "notes.txt").read_text() == "not a teacher"


def test_saved_teacher_loads_in_diffusers_and_generates_finite_32px_images(tiny_teacher):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [digits.caption_for(3), digits.caption_for(8)],
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 32, 32, 3)
    assert np.isfinite(images).all() and 0.0 <= images.min() and images.max() <= 1.0


def test_saved_text_encoder_reproduces_the_training_caption_embeddings(tiny_teacher):
    """The captions the UNet trained on are padded and encoded exactly as the SD pipeline encodes prompts."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher)
    trained_on = digits._caption_embeddings(pipe.text_encoder)
    with torch.no_grad():
        seven, _ = pipe.encode_prompt(digits.caption_for(7), "cpu", 1, False)
        empty, _ = pipe.encode_prompt("", "cpu", 1, False)
    torch.testing.assert_close(seven[0], trained_on[7])
    torch.testing.assert_close(empty[0], trained_on[10])
    assert not torch.allclose(trained_on[7], trained_on[1])


def _between_caption_fraction(text_encoder) -> float:
    """Share of the hidden states' energy (from the digit word on) in the differences between the ten captions."""
    states = digits._caption_embeddings(text_encoder)[:10, 4:]
    return float((states - states.mean(0)).square().sum() / states.square().sum())


def test_text_encoder_training_separates_the_captions():
    from distill.testing import tiny_text_encoder
    from tqdm.auto import tqdm

    text_encoder = tiny_text_encoder(32, 32, with_projection=False, seed=1)
    before = _between_caption_fraction(text_encoder)
    with tqdm(disable=True) as bar:
        digits._train_text_encoder(text_encoder, digits.TeacherRecipe(text_encoder_steps=100), bar)
    after = _between_caption_fraction(text_encoder)
    assert before < 0.02 and after > 0.5  # a random encoder barely tells "seven" from "one"
    assert not any(p.requires_grad for p in text_encoder.parameters())


def test_guidance_is_chosen_on_the_train_split_and_recorded(tmp_path):
    recipe = {**TINY_RECIPE, "guidance_candidates": (1.0, 4.0), "guidance_selection_images": 10}
    folder = digits.build_digits_teacher(tmp_path / "teacher", **recipe)
    marker = json.loads((folder / digits.TEACHER_MARKER).read_text())
    distances = marker["guidance_selection"]["fd_to_train_split"]
    assert set(distances) == {"1.0", "4.0"} and len(set(distances.values())) == 2
    best = min(distances, key=distances.get)
    assert digits.teacher_guidance(folder) == marker["guidance_scale"] == float(best)
    assert (folder / digits.CLASSIFIER_FILE).is_file()  # the classifier that chose it is kept beside the teacher

    from distill.demo.run import digit_prompts, load_teacher_pipeline
    from distill.evaluate import frechet_distance, generate

    classifier = digits.train_digits_classifier(cache_path=folder / digits.CLASSIFIER_FILE)
    prompts, _ = digit_prompts(1, interleaved=True)
    features = classifier.features(generate(load_teacher_pipeline(folder), prompts, 25, 4.0, seed=1000).images)
    on_train = frechet_distance(features, classifier.features(digits.digits_split("train")[0]))
    on_test = frechet_distance(features, classifier.features(digits.digits_split("test")[0]))
    assert distances["4.0"] == pytest.approx(on_train, rel=1e-4)  # float noise: other thread counts here
    assert distances["4.0"] != pytest.approx(on_test, rel=1e-4)


def test_a_teacher_without_a_recorded_guidance_uses_the_default(tiny_teacher):
    assert digits.teacher_guidance(tiny_teacher) == digits.DEFAULT_GUIDANCE


def test_changed_recipe_rebuilds_and_replaces_the_teacher(tmp_path):
    folder = digits.build_digits_teacher(tmp_path / "teacher", **TINY_RECIPE)
    first = json.loads((folder / digits.TEACHER_MARKER).read_text())
    digits.build_digits_teacher(folder, **{**TINY_RECIPE, "denoiser_steps": 3})
    second = json.loads((folder / digits.TEACHER_MARKER).read_text())
    assert (first["recipe"]["denoiser_steps"], second["recipe"]["denoiser_steps"]) == (2, 3)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["teacher"]  # no .tmp / .old leftovers


@pytest.fixture(scope="module")
def tiny_sd3_digits_teacher(tmp_path_factory):
    """The digits teacher in Stable Diffusion 3 format, trained for two steps per model."""
    return digits.build_digits_teacher(tmp_path_factory.mktemp("digits") / "sd3", family="sd3",
                                       **{**TINY_RECIPE, "transformer_layers": 1})


def test_sd3_teacher_is_a_stock_flow_matching_folder_with_unit_scaled_latents(tiny_sd3_digits_teacher):
    from diffusers import StableDiffusion3Pipeline

    from distill.teacher import inspect_teacher

    assert inspect_teacher(str(tiny_sd3_digits_teacher)).family == "sd3"
    assert digits.teacher_family(tiny_sd3_digits_teacher) == "sd3"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_digits_teacher)
    assert pipe.scheduler.config.shift == digits.TeacherRecipe().flow_shift
    latents = digits._encode_latents(pipe.vae, digits._to_unit_pixels(digits.digits_split("train")[0]) * 2 - 1)
    scaled = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert abs(float(scaled.mean())) < 1e-4 and float(scaled.std()) == pytest.approx(1.0, abs=1e-4)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([digits.caption_for(3)], num_inference_steps=2, guidance_scale=2.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_sd3_teacher_trained_on_the_pipelines_own_caption_encoding(tiny_sd3_digits_teacher):
    from diffusers import StableDiffusion3Pipeline

    from distill.demo.flow_digits import caption_embeddings

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_digits_teacher)
    context, pooled = caption_embeddings(pipe, [digits.caption_for(label) for label in range(10)] + [""])
    with torch.no_grad():
        seven, empty, seven_pooled, empty_pooled = pipe.encode_prompt(digits.caption_for(7), None, None,
                                                                      negative_prompt="")
    torch.testing.assert_close(seven[0], context[7])
    torch.testing.assert_close(empty[0], context[10])  # the pipeline's CFG branch is the dropped caption
    torch.testing.assert_close(empty_pooled[0], pooled[10])
    torch.testing.assert_close(seven_pooled[0], pooled[7])


class _TrueVelocity(torch.nn.Module):
    """A denoiser that knows the clean latents: v = (x_t - x0) / sigma with sigma = timestep / 1000 (SD3's scale)."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        sigma = (timestep / 1000).view(-1, 1, 1, 1)
        return type("Output", (), {"sample": (hidden_states - self.x0) / sigma})


def test_flow_matching_loss_is_zero_for_the_true_velocity_and_not_for_a_wrong_one():
    from distill.demo.flow_digits import flow_matching_loss

    x0 = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    no_text = torch.zeros(64, 1, 8), torch.zeros(64, 8)
    exact = flow_matching_loss(_TrueVelocity(x0), x0, *no_text, 3.0, torch.Generator().manual_seed(1))
    wrong = flow_matching_loss(_TrueVelocity(x0 + 0.1), x0, *no_text, 3.0, torch.Generator().manual_seed(1))
    assert float(exact) < 1e-8 and float(wrong) > 1e-3


def test_unknown_teacher_family_is_a_user_error(tmp_path):
    with pytest.raises(DistillError, match="Unknown digits teacher family 'flux'"):
        digits.build_digits_teacher(tmp_path / "teacher", family="flux", **TINY_RECIPE)
