"""Tests for distill/data.py on small real data built in tmp_path (offline, no mocks)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import (
    ImageDataConfig,
    build_image_caption_dataset,
    build_prompt_dataset,
    collate_image_caption,
    expand_braces,
)
from distill.errors import DistillError

REPO_ROOT = Path(__file__).resolve().parents[1]

# (width, height) and colour of the six fixture images; every image has a white band on its left quarter.
SIZES = [(300, 200), (50, 130), (64, 64), (32, 80), (100, 100), (40, 41)]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (128, 64, 32)]
WHITE = (255, 255, 255)


def banded_image(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    """A solid image with a white band over its left quarter (so flips and crops are visible)."""
    array = np.empty((height, width, 3), dtype=np.uint8)
    array[:] = colour
    array[:, : width // 4] = WHITE
    return Image.fromarray(array)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random RGB noise: every pixel differs, so any shift or flip changes the tensor."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def normalised(colour: tuple[int, int, int]) -> torch.Tensor:
    """The [-1, 1] value a colour maps to, shaped [3]."""
    return torch.tensor(colour, dtype=torch.float32) / 127.5 - 1.0


def write_folder(folder: Path, images: list[Image.Image], captions: list, names: list[str] | None = None) -> Path:
    """Save images as PNG plus a metadata.jsonl with one caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{index:04d}.png" for index in range(len(images))]
    for name, image in zip(names, images):
        image.save(folder / name)
    lines = [json.dumps({"file_name": name, "text": caption}) for name, caption in zip(names, captions)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def fixture_images() -> list[Image.Image]:
    """The six banded images of different sizes and colours."""
    return [banded_image(width, height, colour) for (width, height), colour in zip(SIZES, COLOURS)]


def png_bytes(image: Image.Image) -> bytes:
    """An image encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one in-memory file to an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, images: list[Image.Image], captions: list[str], start: int = 0) -> Path:
    """A webdataset tar: even samples carry key.txt, odd ones key.json {"caption": ...}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for offset, (image, caption) in enumerate(zip(images, captions)):
            key = f"sample{start + offset:05d}"
            add_bytes(tar, f"{key}.png", png_bytes(image))
            if (start + offset) % 2 == 0:
                add_bytes(tar, f"{key}.txt", caption.encode())
            else:
                add_bytes(tar, f"{key}.json", json.dumps({"caption": caption, "width": image.width}).encode())
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Six images with captions "caption 0".."caption 5" in a local folder."""
    return write_folder(tmp_path / "images", fixture_images(), [f"caption {i}" for i in range(len(SIZES))])


def build(**kwargs):
    """build_image_caption_dataset with a small default resolution."""
    kwargs.setdefault("resolution", 32)
    return build_image_caption_dataset(ImageDataConfig(**kwargs))


def assert_same_items(left, right) -> None:
    """Two datasets yield identical items (deterministic settings)."""
    assert len(left) == len(right)
    for index in range(len(left)):
        a, b = left[index], right[index]
        assert a["caption"] == b["caption"]
        assert a["original_size"] == b["original_size"]
        assert a["crop_top_left"] == b["crop_top_left"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])


# --------------------------------------------------------------------------- items and geometry


def test_items_have_shape_range_caption_and_original_size(folder):
    dataset = build(train_data_dir=str(folder), center_crop=True)
    assert len(dataset) == 6
    for index, (width, height) in enumerate(SIZES):
        item = dataset[index]
        assert item["pixel_values"].shape == (3, 32, 32)
        assert item["pixel_values"].dtype == torch.float32
        assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
        assert item["caption"] == f"caption {index}"
        assert item["original_size"] == (height, width)
        assert all(type(value) is int for value in item["original_size"] + item["crop_top_left"])


def test_center_crop_geometry_of_non_square_images(folder):
    dataset = build(train_data_dir=str(folder), center_crop=True)
    landscape = dataset[0]  # 300x200 -> resized 48x32 -> crop starts 8 px from the left
    assert landscape["original_size"] == (200, 300)
    assert landscape["crop_top_left"] == (0, 8)
    portrait = dataset[1]  # 50x130 -> resized 32x83 -> top = round(25.5) = 26
    assert portrait["original_size"] == (130, 50)
    assert portrait["crop_top_left"] == (26, 0)
    # The white band covers resized columns 0..11, so crop column 0 is white and the last one is red.
    pixels = landscape["pixel_values"]
    assert torch.allclose(pixels[:, :, 0], normalised(WHITE)[:, None].expand(3, 32))
    assert torch.allclose(pixels[:, :, -1], normalised(COLOURS[0])[:, None].expand(3, 32))


def test_resize_and_crop_match_torchvision_pipeline_of_diffusers(tmp_path):
    transforms = pytest.importorskip("torchvision.transforms")
    image = noise_image(50, 130, seed=3)
    write_folder(tmp_path / "noise", [image], ["noise"])
    modes = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}
    for name, mode in modes.items():
        steps = [transforms.Resize(32, interpolation=mode), transforms.CenterCrop(32)]
        steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
        reference = transforms.Compose(steps)(image)
        item = build(train_data_dir=str(tmp_path / "noise"), center_crop=True, interpolation_type=name)[0]
        assert torch.allclose(item["pixel_values"], reference, atol=1e-6)


def test_random_crop_is_a_window_of_the_unresized_image(tmp_path):
    image = noise_image(32, 80, seed=1)  # short side already 32: no resize, so a crop is an exact window
    write_folder(tmp_path / "tall", [image], ["tall"])
    dataset = build(train_data_dir=str(tmp_path / "tall"), seed=7)
    full = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    tops = set()
    for epoch in range(12):  # augmentation draws depend on (seed, epoch, index) only
        dataset.set_epoch(epoch)
        item = dataset[0]
        assert torch.equal(dataset[0]["pixel_values"], item["pixel_values"])  # same epoch and index: same draw
        top, left = item["crop_top_left"]
        assert left == 0 and 0 <= top <= 48
        assert torch.equal(item["pixel_values"], full[:, top : top + 32, :])
        tops.add(top)
    assert len(tops) > 1


def test_seed_makes_augmentation_reproducible(folder):
    def draws():
        dataset = build(train_data_dir=str(folder), random_flip=True, seed=3)
        return [(dataset[i]["crop_top_left"], dataset[i]["pixel_values"]) for i in range(6) for _ in range(2)]

    first, second = draws(), draws()
    assert [offset for offset, _ in first] == [offset for offset, _ in second]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, second))


def test_random_flip_mirrors_the_unflipped_image(folder):
    plain = build(train_data_dir=str(folder), center_crop=True)[2]  # the 64x64 image, white band on the left
    flipping = build(train_data_dir=str(folder), center_crop=True, random_flip=True, seed=0)
    flipped_count = 0
    for epoch in range(20):
        flipping.set_epoch(epoch)
        item = flipping[2]
        assert item["crop_top_left"] == (0, 0)
        if torch.equal(item["pixel_values"], plain["pixel_values"].flip(-1)):
            flipped_count += 1
        else:
            assert torch.equal(item["pixel_values"], plain["pixel_values"])
    assert 0 < flipped_count < 20
    assert torch.allclose(plain["pixel_values"][:, 0, 0], normalised(WHITE))
    assert torch.allclose(plain["pixel_values"].flip(-1)[:, 0, -1], normalised(WHITE))


def test_list_captions_pick_one_of_the_options(tmp_path):
    options = ["a red square", "a crimson box", "scarlet"]
    write_folder(tmp_path / "lists", [banded_image(40, 40, (255, 0, 0))], [options])
    dataset = build(train_data_dir=str(tmp_path / "lists"), seed=0)
    picked = []
    for epoch in range(30):
        dataset.set_epoch(epoch)
        picked.append(dataset[0]["caption"])
    assert set(picked) <= set(options)
    assert len(set(picked)) >= 2


def test_collate_stacks_tensors_and_lists_captions(folder):
    dataset = build(train_data_dir=str(folder), center_crop=True)
    batch = collate_image_caption([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["caption"] == ["caption 0", "caption 1", "caption 2", "caption 3"]
    assert batch["original_size"].dtype == torch.long and batch["original_size"].shape == (4, 2)
    assert batch["original_size"].tolist() == [[200, 300], [130, 50], [64, 64], [80, 32]]
    assert batch["crop_top_left"].dtype == torch.long
    assert batch["crop_top_left"].tolist() == [[0, 8], [26, 0], [0, 0], [24, 0]]


def test_dataloader_workers_batch_items(folder):
    dataset = build(train_data_dir=str(folder), random_flip=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_image_caption)
    for _epoch in range(2):
        batches = list(loader)
        assert [batch["caption"] for batch in batches] == [[f"caption {i}" for i in range(3)],
                                                           [f"caption {i}" for i in range(3, 6)]]
        assert all(batch["pixel_values"].shape == (3, 3, 32, 32) for batch in batches)
        assert batches[0]["original_size"].tolist() == [[200, 300], [130, 50], [64, 64]]


def test_max_train_samples_selects_a_seeded_subset(folder):
    first = build(train_data_dir=str(folder), center_crop=True, max_train_samples=3, seed=5)
    second = build(train_data_dir=str(folder), center_crop=True, max_train_samples=3, seed=5)
    captions = [first[i]["caption"] for i in range(len(first))]
    assert len(first) == 3 and len(set(captions)) == 3
    assert set(captions) <= {f"caption {i}" for i in range(6)}
    assert captions == [second[i]["caption"] for i in range(3)]


# --------------------------------------------------------------------------- other sources


def test_save_to_disk_dataset_loads_by_path(tmp_path, folder):
    table = datasets.Dataset.from_dict({"image": fixture_images(), "text": [f"caption {i}" for i in range(6)]})
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved_dict"))
    reference = build(train_data_dir=str(folder), center_crop=True)
    assert_same_items(build(dataset_name=str(tmp_path / "saved"), center_crop=True), reference)
    assert_same_items(build(dataset_name=str(tmp_path / "saved_dict"), center_crop=True), reference)


def test_hf_dataset_list_captions_and_custom_columns(tmp_path):
    options = ["one", "two", "three"]
    table = datasets.Dataset.from_dict({"img": [banded_image(48, 40, (0, 0, 255))], "prompts": [options]})
    table.save_to_disk(str(tmp_path / "saved"))
    dataset = build(dataset_name=str(tmp_path / "saved"), image_column="img", caption_column="prompts", seed=1)
    picked = set()
    for epoch in range(30):
        dataset.set_epoch(epoch)
        picked.add(dataset[0]["caption"])
    assert picked <= set(options) and len(picked) >= 2
    assert dataset[0]["original_size"] == (40, 48)


def test_webdataset_tar_pattern_and_folder_give_the_same_items(tmp_path, folder):
    images, captions = fixture_images(), [f"caption {i}" for i in range(6)]
    single = write_shard(tmp_path / "one" / "all.tar", images, captions)
    write_shard(tmp_path / "shards" / "00000.tar", images[:3], captions[:3], start=0)
    write_shard(tmp_path / "shards" / "00001.tar", images[3:], captions[3:], start=3)
    reference = build(train_data_dir=str(folder), center_crop=True)
    assert_same_items(build(train_data_dir=str(single), center_crop=True), reference)
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    assert_same_items(build(train_data_dir=pattern, center_crop=True), reference)
    assert_same_items(build(train_data_dir=str(tmp_path / "shards"), center_crop=True), reference)


def test_expand_braces_ranges_and_alternatives():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_prompts_from_txt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat on a mat\n\n   \n  a dog in fog  \nthe end\n")
    assert build_prompt_dataset(str(path)) == ["a cat on a mat", "a dog in fog", "the end"]


def test_prompts_from_folder_and_saved_dataset_columns(tmp_path, folder):
    assert build_prompt_dataset(str(folder)) == [f"caption {i}" for i in range(6)]
    table = datasets.Dataset.from_dict({"image": fixture_images()[:2], "prompt": [["first", "other"], ["second"]]})
    table.save_to_disk(str(tmp_path / "saved"))
    assert build_prompt_dataset(str(tmp_path / "saved"), caption_column="prompt") == ["first", "second"]


# --------------------------------------------------------------------------- errors


def raises(match: str, **kwargs) -> str:
    """Build with kwargs, expect a DistillError whose message contains `match`; return the message."""
    with pytest.raises(DistillError) as info:
        build(**kwargs)
    message = str(info.value)
    assert match in message, message
    return message


def test_error_neither_source_given():
    raises("Exactly one of --dataset_name and --train_data_dir", resolution=32)


def test_error_both_sources_given(folder):
    message = raises("Exactly one of", train_data_dir=str(folder), dataset_name="some/dataset")
    assert "both --dataset_name and --train_data_dir" in message


def test_error_train_data_dir_does_not_exist(tmp_path):
    message = raises("does not exist", train_data_dir=str(tmp_path / "missing"))
    assert "missing" in message


def test_error_dataset_path_does_not_exist(tmp_path):
    raises("does not exist", dataset_name=str(tmp_path / "no_such_dataset"))


def test_error_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    raises("contains no images", train_data_dir=str(tmp_path / "empty"))


def test_error_folder_with_empty_metadata(tmp_path):
    write_folder(tmp_path / "f", [banded_image(40, 40, (1, 2, 3))], ["x"])
    (tmp_path / "f" / "metadata.jsonl").write_text("\n")
    raises("empty (0 rows)", train_data_dir=str(tmp_path / "f"))


def test_error_empty_hf_dataset(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    empty = datasets.Dataset.from_dict({"image": [], "text": []}, features=features)
    empty.save_to_disk(str(tmp_path / "saved"))  # written with no data files at all
    empty.save_to_disk(str(tmp_path / "one_shard"), num_shards=1)  # one data file holding 0 rows
    raises("empty (0 rows)", dataset_name=str(tmp_path / "saved"))
    raises("empty (0 rows)", dataset_name=str(tmp_path / "one_shard"))


def test_error_max_train_samples_not_positive(folder):
    raises("--max_train_samples must be a positive", train_data_dir=str(folder), max_train_samples=0)


def test_error_metadata_missing(tmp_path):
    (tmp_path / "f").mkdir()
    banded_image(40, 40, (1, 2, 3)).save(tmp_path / "f" / "a.png")
    raises("has no metadata.jsonl", train_data_dir=str(tmp_path / "f"))


def test_error_metadata_names_missing_file(folder):
    with open(folder / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "ghost.png", "text": "boo"}) + "\n")
    message = raises("do not exist", train_data_dir=str(folder))
    assert "ghost.png" in message


def test_error_metadata_line_not_json(folder):
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[1] = '{"file_name": "0001.png", "text": oops}'
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    raises("line 2 is not valid JSON", train_data_dir=str(folder))


def test_error_caption_column_missing_in_folder(tmp_path):
    (tmp_path / "f").mkdir()
    banded_image(40, 40, (1, 2, 3)).save(tmp_path / "f" / "a.png")
    (tmp_path / "f" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "hi"}) + "\n")
    message = raises("--caption_column", train_data_dir=str(tmp_path / "f"))
    assert "'text' not found" in message and "image, caption" in message


def test_error_caption_column_missing_in_hf_dataset(tmp_path):
    datasets.Dataset.from_dict({"image": fixture_images()[:1], "prompt": ["p"]}).save_to_disk(str(tmp_path / "s"))
    message = raises("--caption_column", dataset_name=str(tmp_path / "s"))
    assert "image, prompt" in message


def test_error_image_column_missing_in_hf_dataset(tmp_path):
    datasets.Dataset.from_dict({"picture": fixture_images()[:1], "text": ["p"]}).save_to_disk(str(tmp_path / "s"))
    message = raises("--image_column", dataset_name=str(tmp_path / "s"))
    assert "'image' not found" in message and "picture, text" in message


def test_error_image_column_on_local_folder(folder):
    message = raises("--image_column", train_data_dir=str(folder), image_column="photo")
    assert "'photo' does not exist" in message


def test_error_corrupt_image_in_folder_is_named(folder):
    (folder / "broken.png").write_bytes(os.urandom(512))
    with open(folder / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "broken.png", "text": "noise"}) + "\n")
    message = raises("cannot be read", train_data_dir=str(folder))
    assert "broken.png" in message and "0000.png" not in message


def test_error_corrupt_image_in_hf_dataset_first_row(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [{"bytes": b"not an image at all", "path": None}], "text": ["bad"]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "s"))
    raises("Cannot read the image of", dataset_name=str(tmp_path / "s"))


def test_error_unknown_interpolation(folder):
    message = raises("Unknown interpolation type 'cubic'", train_data_dir=str(folder), interpolation_type="cubic")
    assert "lanczos" in message


def test_error_caption_with_wrong_type(tmp_path):
    write_folder(tmp_path / "f", [banded_image(40, 40, (1, 2, 3))], [42])
    raises("captions must be a string or a non-empty list of strings", train_data_dir=str(tmp_path / "f"))


def test_error_shard_sample_without_caption(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        add_bytes(tar, "lonely.png", png_bytes(banded_image(40, 40, (1, 2, 3))))
    message = raises("has an image but no caption", train_data_dir=str(tmp_path / "bad.tar"))
    assert "lonely" in message


def test_error_corrupt_image_in_shard_is_named(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        add_bytes(tar, "broken.png", os.urandom(256))
        add_bytes(tar, "broken.txt", b"noise")
    message = raises("cannot be read", train_data_dir=str(tmp_path / "bad.tar"))
    assert "broken.png" in message


def test_error_shard_pattern_with_missing_files(tmp_path):
    write_shard(tmp_path / "s" / "000.tar", fixture_images()[:1], ["x"])
    message = raises("do not exist", train_data_dir=str(tmp_path / "s" / "{000..002}.tar"))
    assert "001.tar" in message and "002.tar" in message


def test_error_prompt_file_missing(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        build_prompt_dataset(str(tmp_path / "nope.txt"))


def test_error_hub_name_unreachable_offline(tmp_path):
    script = (
        "from distill.data import ImageDataConfig, build_image_caption_dataset\n"
        "from distill.errors import DistillError\n"
        "try:\n"
        "    build_image_caption_dataset(ImageDataConfig(dataset_name='nobody-here/no-such-dataset'))\n"
        "except DistillError as error:\n"
        "    print('DISTILL_ERROR', error)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "DISTILL_ERROR" in result.stdout, result.stderr
    assert "Hub may be unreachable" in result.stdout
    assert "--train_data_dir" in result.stdout
