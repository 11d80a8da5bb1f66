"""Every PIL image mode reaches training as faithful 8-bit RGB (distill.image_modes.to_rgb), read from real files through
build_training_set as the trainer reads them; plus the once-per-run data warnings (transparency, duplicate
file_name rows, captions cut at the tokenizer's limit)."""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image, ImageCms

from distill.conditioning import TextConditioner
from distill.teacher import inspect_teacher
from distill.data import ImageDataConfig, build_training_set
from distill.errors import DistillError
from distill.image_modes import to_rgb

SIZE = 16
WHITE = [255, 255, 255]
TRANSPARENCY_NOTE = "composited on a white background"
RAMP16 = np.tile(np.linspace(0, 65535, 64), (64, 1)).round().astype(np.uint16)  # 64x64, black to white per row


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """The image saved in a file format."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def opened_mode(data: bytes) -> str:
    """The mode PIL gives the encoded image when it opens it."""
    with Image.open(io.BytesIO(data)) as image:
        return image.mode


def image_folder(folder: Path, files: dict[str, bytes], names: list[str] | None = None) -> Path:
    """Write encoded images and a metadata.jsonl listing `names` (default: every file once)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    lines = [json.dumps({"file_name": name, "text": f"picture {name}"}) for name in (names or list(files))]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def saved_dataset(folder: Path, files: list[bytes]) -> Path:
    """A save_to_disk dataset whose image column holds the encoded bytes as they are (any format PIL reads)."""
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [{"bytes": data, "path": None} for data in files], "text": [f"row {i}" for i in range(len(files))]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


def shard(path: Path, files: list[bytes]) -> Path:
    """A webdataset tar of PNG samples with .txt captions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for index, data in enumerate(files):
            for name, payload in ((f"s{index:03d}.png", data), (f"s{index:03d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def training_set(resolution: int, **config):
    """The image dataset the trainer builds (resolution = image size: no resampling, the crop is the whole image)."""
    return build_training_set("images", ImageDataConfig(resolution=resolution, center_crop=True, **config))[0]


def as_pixels(dataset) -> list[np.ndarray]:
    """Every item of a dataset as H x W x 3 values in 0..255."""
    return [((dataset[i]["pixel_values"] + 1) * 127.5).round().permute(1, 2, 0).numpy() for i in range(len(dataset))]


def pixels(resolution: int, **config) -> list[np.ndarray]:
    """Every training item of a data source as H x W x 3 values in 0..255."""
    return as_pixels(training_set(resolution, **config))


def one_pixel_array(tmp_path: Path, data: bytes, name: str = "image.png") -> np.ndarray:
    """The training pixels of a folder holding one encoded image."""
    with Image.open(io.BytesIO(data)) as image:
        resolution = min(image.size)
    return pixels(resolution, train_data_dir=str(image_folder(tmp_path / "folder", {name: data})))[0]


def tiff_12bit(values: np.ndarray) -> bytes:
    """An uncompressed 12-bit grayscale TIFF (PIL writes none) of an even-width array: packed big-endian samples."""
    height, width = values.shape
    bits = "".join(f"{int(value):012b}" for value in values.ravel())
    data = int(bits, 2).to_bytes(len(bits) // 8, "big")
    # width, height, BitsPerSample, no compression, black is zero, StripOffsets, one sample, one strip, its size
    tags = [(256, width), (257, height), (258, 12), (259, 1), (262, 1), (273, 0), (277, 1), (278, height),
            (279, len(data))]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, value in tags:
        value = data_offset if tag == 273 else value
        ifd += struct.pack("<HHII", tag, 4, 1, value)  # type 4: one LONG
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data


def assert_ramp(array: np.ndarray, expected_row: np.ndarray) -> None:
    """A grey ramp: three equal channels, every row the expected black-to-white values, mean mid-grey."""
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    assert (array[..., 0] == expected_row).all()
    assert (np.diff(array[0, :, 0]) >= 0).all() and array[0, 0, 0] == 0 and array[0, -1, 0] == 255
    assert abs(array.mean() / 255 - 0.5) < 0.01
    assert (array >= 250).mean() < 0.1  # before the fix ~98% of a 16-bit ramp came out white


# --------------------------------------------------------------------------- deep grayscale


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_16bit_grayscale_file_becomes_a_mid_grey_ramp(tmp_path, mode, fmt):
    image = Image.fromarray(RAMP16)
    data = encode(image if mode == "I;16" else Image.frombytes(mode, image.size, RAMP16.astype(">u2").tobytes()), fmt)
    assert opened_mode(data) == mode
    assert_ramp(one_pixel_array(tmp_path, data, f"ramp.{fmt.lower()}"), np.round(RAMP16[0] / 257))


def test_16bit_little_endian_and_native_modes_from_a_saved_dataset(tmp_path):
    little = encode(Image.frombytes("I;16L", (64, 64), RAMP16.astype("<u2").tobytes()), "IM")
    assert opened_mode(little) == "I;16L"
    arrays = pixels(64, dataset_name=str(saved_dataset(tmp_path / "saved", [little])))
    assert_ramp(arrays[0], np.round(RAMP16[0] / 257))
    native = Image.frombytes("I;16N", (64, 64), RAMP16.astype("=u2").tobytes())
    assert_ramp(np.asarray(to_rgb(native, "in memory")), np.round(RAMP16[0] / 257))


def test_12bit_tiff_is_scaled_by_its_bits_per_sample_not_by_16_bits(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 16).round().astype(int), (16, 1))
    data = tiff_12bit(ramp)
    assert opened_mode(data) == "I;16"
    assert_ramp(one_pixel_array(tmp_path, data, "ramp.tif"), np.round(ramp[0] * 255 / 4095))


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_tiff_in_0_1_or_0_255_becomes_the_same_ramp(tmp_path, scale):
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))
    data = encode(Image.fromarray(ramp * np.float32(scale)), "TIFF")
    assert opened_mode(data) == "F"
    assert_ramp(one_pixel_array(tmp_path, data, "ramp.tif"), np.round(ramp[0] * 255))


def test_float_tiff_outside_both_ranges_is_refused_before_training(tmp_path):
    signed = Image.fromarray(np.tile(np.linspace(-1, 1, 16, dtype=np.float32), (16, 1)))
    folder = image_folder(tmp_path / "folder", {"signed.tif": encode(signed, "TIFF")})
    with pytest.raises(DistillError) as caught:
        build_training_set("images", ImageDataConfig(train_data_dir=str(folder), resolution=16))
    assert str(caught.value) == (
        f"1 image file(s) in {folder} cannot be converted to 8-bit RGB faithfully: {folder / 'signed.tif'} (PIL mode "
        "'F' (float samples from -1 to 1, outside 0..1 and 0..255)). Save them as 8-bit RGB or 16-bit grayscale PNG "
        "yourself, choosing how their values map to 0..255, or delete them and remove their lines from "
        "metadata.jsonl.")
    with pytest.raises(DistillError, match=r"^Cannot convert the image row 7 to 8-bit RGB faithfully: it has PIL mode "
                                           r"'F' \(float samples that are NaN or infinite\)\. Save it as 8-bit RGB"):
        to_rgb(Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)), "row 7")


def test_32bit_integer_tiff_is_refused_before_training(tmp_path):
    data = encode(Image.fromarray(RAMP16.astype(np.int32)), "TIFF")
    assert opened_mode(data) == "I"
    folder = image_folder(tmp_path / "folder", {"ok.png": encode(Image.new("RGB", (8, 8)), "PNG"), "deep.tif": data})
    with pytest.raises(DistillError) as caught:
        build_training_set("images", ImageDataConfig(train_data_dir=str(folder), resolution=8))
    message = str(caught.value)
    assert message.startswith(f"1 image file(s) in {folder} cannot be converted to 8-bit RGB faithfully")
    assert str(folder / "deep.tif") in message and "PIL mode 'I' (signed integer samples" in message
    assert "Save them as 8-bit RGB or 16-bit grayscale PNG" in message and "ok.png" not in message


def test_integer_image_of_unknown_depth_is_refused_in_the_first_row_check(tmp_path):
    data = encode(Image.fromarray(RAMP16.astype(np.int32)), "IM")
    location = saved_dataset(tmp_path / "saved", [data])
    with pytest.raises(DistillError, match=r"row 0 to 8-bit RGB faithfully: it has PIL mode 'I' \(integer samples of "
                                           r"unknown bit depth\)"):
        build_training_set("images", ImageDataConfig(dataset_name=str(location), resolution=64))


def test_unsupported_mode_in_a_shard_is_refused_before_training(tmp_path):
    path = shard(tmp_path / "data.tar", [encode(Image.fromarray(RAMP16.astype(np.int32)), "TIFF")])
    with pytest.raises(DistillError, match=r"data.tar:s000.png to 8-bit RGB faithfully: it has PIL mode 'I'"):
        build_training_set("images", ImageDataConfig(train_data_dir=str(path), resolution=64))


# --------------------------------------------------------------------------- palettes and transparency


def palette_image(colours: list[tuple[int, int, int]]) -> Image.Image:
    """A SIZE x SIZE palette image with one vertical band per palette entry."""
    indices = np.repeat(np.arange(len(colours), dtype=np.uint8), SIZE // len(colours))[None].repeat(SIZE, axis=0)
    image = Image.fromarray(indices, "P")
    image.putpalette([channel for colour in colours for channel in colour])
    return image


PALETTE = [(255, 0, 0), (0, 128, 0), (0, 0, 255), (10, 20, 30)]
BANDS = np.repeat(np.arange(4), SIZE // 4)  # palette index of each column


def test_palette_png_keeps_its_colours(tmp_path):
    data = encode(palette_image(PALETTE), "PNG")
    assert opened_mode(data) == "P"
    array = one_pixel_array(tmp_path, data)
    assert (array == np.array(PALETTE)[BANDS][None]).all()


def test_palette_png_and_gif_with_a_transparent_entry_turn_it_white(tmp_path):
    for fmt in ("PNG", "GIF"):
        data = encode(palette_image(PALETTE), fmt, transparency=2)
        assert opened_mode(data) == "P"
        array = one_pixel_array(tmp_path / fmt, data, f"image.{fmt.lower()}")
        expected = np.array([WHITE if index == 2 else PALETTE[index] for index in BANDS])
        assert (array == expected[None]).all(), fmt


def test_palette_with_alpha_tiff_turns_transparent_pixels_white(tmp_path):
    image = palette_image(PALETTE).convert("PA")
    alpha = np.where(BANDS == 0, 0, 255).astype(np.uint8)[None].repeat(SIZE, axis=0)
    image.putalpha(Image.fromarray(alpha))
    data = encode(image, "TIFF")
    assert opened_mode(data) == "PA"
    array = one_pixel_array(tmp_path, data, "image.tif")
    expected = np.array([WHITE if index == 0 else PALETTE[index] for index in BANDS])
    assert (array == expected[None]).all()


def test_half_transparent_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 40, 0)
    rgba[:, : SIZE // 2, 3] = 0  # left half fully transparent
    rgba[:, SIZE // 2 :, 3] = 255
    rgba[:, -1, 3] = 128  # last column half transparent
    data = encode(Image.fromarray(rgba), "PNG")
    assert opened_mode(data) == "RGBA"
    array = one_pixel_array(tmp_path, data)
    assert (array[:, : SIZE // 2] == WHITE).all()
    assert (array[:, SIZE // 2 : -1] == [200, 40, 0]).all()
    blended = np.round(np.array([200, 40, 0]) * 128 / 255 + 255 * 127 / 255)
    assert np.abs(array[:, -1] - blended).max() <= 1


def test_grey_with_alpha_and_colour_key_pngs_are_composited_on_white(tmp_path):
    la = np.zeros((SIZE, SIZE, 2), dtype=np.uint8)
    la[..., 0], la[..., 1] = 60, 255
    la[:, :4, 1] = 0
    keyed = np.full((SIZE, SIZE, 3), (5, 6, 7), dtype=np.uint8)
    keyed[:, 4:] = (90, 80, 70)
    cases = [
        ("LA", encode(Image.fromarray(la, "LA"), "PNG"), [60, 60, 60]),
        ("RGB", encode(Image.fromarray(keyed), "PNG", transparency=(5, 6, 7)), [90, 80, 70]),
        ("L", encode(Image.fromarray(keyed[..., 0]), "PNG", transparency=5), [90, 90, 90]),
        ("I;16", encode(Image.fromarray(np.tile(np.where(np.arange(SIZE) < 4, 0, 65535).astype(np.uint16), (SIZE, 1))),
                        "PNG", transparency=0), WHITE),
    ]
    for mode, data, opaque in cases:
        assert opened_mode(data) == mode
        array = one_pixel_array(tmp_path / mode.replace(";", ""), data)
        assert (array[:, :4] == WHITE).all(), mode
        assert (array[:, 4:] == opaque).all(), mode


def test_transparency_warning_is_logged_once_for_many_images(tmp_path, caplog):
    half = np.full((SIZE, SIZE, 4), 255, dtype=np.uint8)
    half[:, :4, 3] = 0
    files = {
        "a.png": encode(Image.fromarray(half), "PNG"),
        "b.png": encode(palette_image(PALETTE), "PNG", transparency=0),
        "c.png": encode(Image.fromarray(half[..., 2:]), "PNG"),
        "d.png": encode(Image.new("RGB", (SIZE, SIZE), (1, 2, 3)), "PNG"),
    }
    caplog.set_level(logging.WARNING, logger="distill.data")
    dataset = training_set(SIZE, train_data_dir=str(image_folder(tmp_path / "folder", files)))
    for epoch in range(2):
        dataset.set_epoch(epoch)
        arrays = as_pixels(dataset)
    assert (arrays[0][:, :4] == WHITE).all() and (arrays[3] == [1, 2, 3]).all()
    notes = [record.getMessage() for record in caplog.records if TRANSPARENCY_NOTE in record.getMessage()]
    assert notes == [(f"3 of 4 images in {tmp_path / 'folder'} (a.png, b.png (and 1 more)) have transparency (an alpha "
                        "channel or a transparent colour): transparent pixels are composited on a white background.")]


def test_transparency_warning_is_logged_once_for_a_shard_read_lazily(tmp_path, caplog):
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    opaque = encode(Image.new("RGB", (SIZE, SIZE)), "PNG")
    path = shard(tmp_path / "data.tar", [opaque] + [encode(Image.fromarray(rgba), "PNG")] * 3)
    caplog.set_level(logging.WARNING, logger="distill.data")
    dataset = training_set(SIZE, train_data_dir=str(path))
    for _epoch in range(2):
        arrays = as_pixels(dataset)
        assert (arrays[0] == 0).all() and all((array == WHITE).all() for array in arrays[1:])
    notes = [record.getMessage() for record in caplog.records if TRANSPARENCY_NOTE in record.getMessage()]
    assert notes == [f"Images of {path} (first: {path}:s001.png) have transparency (an alpha channel or a "
                     "transparent colour): transparent pixels are composited on a white background."]


def test_no_transparency_warning_for_opaque_images(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="distill.data")
    pixels(SIZE, train_data_dir=str(image_folder(tmp_path / "f", {"a.png": encode(Image.new("RGB", (8, 8)), "PNG")})))
    assert not [record for record in caplog.records if TRANSPARENCY_NOTE in record.getMessage()]


# --------------------------------------------------------------------------- other colour spaces


def test_one_bit_and_grey_pngs(tmp_path):
    bits = np.zeros((SIZE, SIZE), dtype=bool)
    bits[:, 8:] = True
    grey = np.tile(np.arange(SIZE, dtype=np.uint8) * 16, (SIZE, 1))
    for mode, data, expected in [("1", encode(Image.fromarray(bits), "PNG"), bits * 255),
                                 ("L", encode(Image.fromarray(grey), "PNG"), grey)]:
        assert opened_mode(data) == mode
        array = one_pixel_array(tmp_path / mode, data)
        assert (array == expected[..., None]).all(), mode


COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [128, 128, 128], [0, 0, 0],
                    [200, 150, 60], [30, 90, 160]], dtype=np.uint8)
SWATCHES = np.repeat(COLOURS, 2, axis=0)[None].repeat(SIZE, axis=0)  # 16 x 16, one 2-pixel column per colour


def test_cmyk_tiff_and_jpeg(tmp_path):
    cmyk = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    cmyk[:, :4] = (255, 0, 0, 0)  # cyan ink only
    cmyk[:, 4:8] = (0, 255, 255, 0)  # magenta + yellow: red
    cmyk[:, 8:12] = (0, 0, 0, 255)  # black ink
    cmyk[:, 12:] = (0, 0, 0, 0)  # no ink: paper white
    expected = np.array([[0, 255, 255]] * 4 + [[255, 0, 0]] * 4 + [[0, 0, 0]] * 4 + [WHITE] * 4)
    for fmt, tolerance in (("TIFF", 0), ("JPEG", 12)):
        data = encode(Image.fromarray(cmyk, "CMYK"), fmt, **({"quality": 100} if fmt == "JPEG" else {}))
        assert opened_mode(data) == "CMYK"
        array = one_pixel_array(tmp_path / fmt, data, f"image.{fmt.lower()}")
        assert np.abs(array[:, 1:-1] - expected[None, 1:-1]).max() <= tolerance, fmt


def test_ycbcr_and_lab_tiffs_come_back_as_their_rgb_colours(tmp_path):
    rgb = Image.fromarray(SWATCHES)
    lab = ImageCms.profileToProfile(rgb, ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"),
                                    outputMode="LAB")
    for mode, image, tolerance in (("YCbCr", rgb.convert("YCbCr"), 2), ("LAB", lab, 25)):
        data = encode(image, "TIFF")
        assert opened_mode(data) == mode
        array = one_pixel_array(tmp_path / mode, data, "image.tif")
        assert np.abs(array - SWATCHES).max() <= tolerance, mode
    assert np.abs(np.asarray(to_rgb(lab, "in memory")).astype(int) - SWATCHES).mean() < 5


def test_modes_no_file_opens_as_are_converted_in_memory():
    """PIL opens no file as HSV, RGBX, RGBa or La; sources handing such images over still get the right colours."""
    rgb = Image.fromarray(SWATCHES)
    rgba = np.dstack([SWATCHES, np.full((SIZE, SIZE), 255, np.uint8)])
    assert np.abs(np.asarray(to_rgb(rgb.convert("HSV"), "in memory")).astype(int) - SWATCHES).max() <= 1
    assert (np.asarray(to_rgb(rgb.convert("RGBX"), "in memory")) == SWATCHES).all()
    assert (np.asarray(to_rgb(Image.fromarray(rgba, "RGBA").convert("RGBa"), "in memory")) == SWATCHES).all()
    grey = Image.fromarray(np.dstack([SWATCHES[..., 0], np.full((SIZE, SIZE), 255, np.uint8)]), "LA")
    assert (np.asarray(to_rgb(grey.convert("La"), "in memory")) == SWATCHES[..., :1]).all()


def test_rgb_jpeg_and_png_are_unchanged(tmp_path):
    data = encode(Image.fromarray(SWATCHES), "PNG")
    assert (one_pixel_array(tmp_path / "png", data) == SWATCHES).all()
    jpeg = encode(Image.fromarray(SWATCHES), "JPEG", quality=90)
    assert opened_mode(jpeg) == "RGB"
    with Image.open(io.BytesIO(jpeg)) as decoded:
        assert (one_pixel_array(tmp_path / "jpg", jpeg, "image.jpg") == np.asarray(decoded)).all()


# --------------------------------------------------------------------------- once-per-run warnings


def test_duplicate_file_names_in_metadata_are_reported_once(tmp_path, caplog):
    files = {name: encode(Image.new("RGB", (8, 8), (9, 9, 9)), "PNG") for name in ("a.png", "b.png", "c.png")}
    names = ["a.png", "b.png", "./a.png", "c.png", "b.png", "b.png"]
    folder = image_folder(tmp_path / "folder", files, names)
    caplog.set_level(logging.WARNING, logger="distill.data")
    dataset, _collate = build_training_set("images", ImageDataConfig(train_data_dir=str(folder), resolution=8))
    assert len(dataset) == 6  # still one sample per line
    notes = [record.getMessage() for record in caplog.records if "more than one line" in record.getMessage()]
    assert notes == [f"{folder / 'metadata.jsonl'} lists 2 file_name(s) on more than one line (3 extra rows: a.png x2, "
                     "b.png x3); each line is a separate sample, so those images are seen more often. Remove the "
                     "duplicate lines unless that is intended."]


def test_captions_longer_than_the_tokenizer_limit_are_reported_once(sd_teacher, caplog):
    conditioner = TextConditioner(inspect_teacher(str(sd_teacher)), 32)
    long_caption = "a photo of " + " and ".join(f"a red cat number {i}" for i in range(30))
    assert len(conditioner.tokenizers[0](long_caption, verbose=False).input_ids) > 77
    caplog.set_level(logging.WARNING, logger="distill.conditioning")
    conditioner.encode(["a short caption", "another short one"])
    assert not caplog.records  # also: the length check itself does not trigger transformers' own warning
    for _batch in range(3):
        conditioner.encode([long_caption, "a short caption", long_caption + " again"])
    notes = [record.getMessage() for record in caplog.records]
    assert notes == [f"2 of 3 captions in this batch are longer than the text encoder's limit of 77 tokens "
                     f"(model_max_length) and were truncated, e.g. {long_caption[:60] + '...'!r}. Shorten them to "
                     "keep their ends; this warning is shown once."]
