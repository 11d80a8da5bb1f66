"""Image-caption data for distillation: local folders, webdataset shards and Hugging Face datasets.

Every source is checked completely when the dataset is built, so a bad path, column, caption or
image file stops the run with one :class:`DistillError` before any model is loaded. Items follow
the preprocessing of diffusers' ``train_lcm_distill_lora_sdxl.py``: convert to RGB (:func:`to_rgb`, the
one place every PIL mode becomes 8-bit RGB: 16-bit and float samples are rescaled, transparency is
composited on white, modes without a faithful conversion are refused), resize the
short side to the target resolution, optionally flip horizontally, crop (center or random) and
scale to [-1, 1], keeping SDXL's micro-conditioning (size before resizing, crop offset after).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import DistillError
from .image_modes import float_problem, has_transparency, mode_problem, to_rgb, unconvertible
from .pairs import collate_pairs, load_pair_dataset

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
FOLDER_IMAGE_COLUMN = "image"
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_JSON_CAPTION_KEYS = ("caption", "text")
TABLE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
    # torchvision maps NEAREST_EXACT to PIL's NEAREST too: PIL's nearest already samples pixel centres.
    "nearest_exact": Image.Resampling.NEAREST,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
MAX_LISTED = 5
# PIL modes to_rgb converts; "F" (float) and the integer modes "I;16*" / "I" are rescaled to 8 bits first.

@dataclass
class ImageDataConfig:
    """Where the training data come from (image-caption pairs, prompts or noise-latent pairs) and how images are prepared."""

    dataset_name: str | None = field(default=None, metadata={
        "help": "A Hugging Face datasets name, or a folder written by Dataset.save_to_disk."})
    dataset_config_name: str | None = field(default=None, metadata={
        "help": "The configuration (subset) of --dataset_name, if it has several."})
    train_data_dir: str | None = field(default=None, metadata={
        "help": "A local folder of images with metadata.jsonl, or webdataset .tar shards."})
    prompts_file: str | None = field(default=None, metadata={  # prompt-only methods
        "help": "Prompt-only methods: a .txt file with one prompt per line."})
    pairs_dir: str | None = field(default=None, metadata={  # pair-trained methods
        "help": "Folder of teacher (noise, latent) pairs written by train_scripts/generate_pairs.py."})
    image_column: str = field(default="image", metadata={
        "help": "Column of --dataset_name holding the images."})
    caption_column: str = field(default="text", metadata={
        "help": "Column (or metadata.jsonl key) holding the captions."})
    resolution: int = field(default=1024, metadata={
        "help": "Training resolution, a multiple of 8."})
    center_crop: bool = field(default=False, metadata={
        "help": "Crop the centre of each resized image instead of a random square."})
    random_flip: bool = field(default=False, metadata={
        "help": "Flip images horizontally at random."})
    interpolation_type: str = field(default="bilinear", metadata={
        "help": "Resampling filter for resizing: " + ", ".join(INTERPOLATIONS) + "."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Train on a random (seeded) subset of this many samples."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Cache folder for Hub datasets (default: the Hugging Face cache)."})
    seed: int | None = field(default=None, metadata={
        "help": "Seed of the --max_train_samples subset and of random crops and flips."})


# --------------------------------------------------------------------------- small helpers


def _describe(exc: BaseException) -> str:
    """`Type: message` of an exception, for error messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _listing(items: list, limit: int = MAX_LISTED) -> str:
    """The first few items joined by commas, with a count of the rest."""
    shown = ", ".join(str(item) for item in items[:limit])
    rest = len(items) - limit
    return f"{shown} (and {rest} more)" if rest > 0 else shown


def _subset(total: int, max_samples: int | None, seed: int | None) -> range | list[int]:
    """All row indices, or `max_samples` of them drawn at random (seeded) like diffusers' shuffle+select."""
    if max_samples is None or max_samples >= total:
        return range(total)
    return random.Random(seed).sample(range(total), max_samples)


# --------------------------------------------------------------------------- config checks


def _check_source_choice(config: ImageDataConfig) -> None:
    """Exactly one of dataset_name / train_data_dir must be set."""
    flags = (("--dataset_name", config.dataset_name), ("--train_data_dir", config.train_data_dir))
    given = [flag for flag, value in flags if value]
    if len(given) != 1:
        problem = "no training data was given" if not given else "both --dataset_name and --train_data_dir were given"
        raise DistillError(
            f"Exactly one of --dataset_name and --train_data_dir is needed, but {problem}. Pass --dataset_name for a "
            "Hugging Face dataset (Hub name or save_to_disk folder) or --train_data_dir for a local folder of images "
            "with metadata.jsonl or webdataset .tar shards."
        )


def _check_numbers(config: ImageDataConfig) -> None:
    """Resolution must be a positive int and max_train_samples positive when given."""
    if isinstance(config.resolution, bool) or not isinstance(config.resolution, int) or config.resolution <= 0:
        raise DistillError(
            f"--resolution must be a positive integer, got {config.resolution!r}. Use e.g. --resolution 1024."
        )
    if config.max_train_samples is not None and config.max_train_samples <= 0:
        raise DistillError(
            f"--max_train_samples must be a positive number of samples, got {config.max_train_samples}. "
            "Pass a value >= 1, or leave it unset to use the whole dataset."
        )


def _resampling(interpolation_type: str) -> Image.Resampling:
    """PIL resampling filter for a diffusers-style --interpolation_type name."""
    key = str(interpolation_type).lower()
    if key not in INTERPOLATIONS:
        raise DistillError(
            f"Unknown interpolation type {interpolation_type!r}. Pass --interpolation_type with one of: "
            f"{', '.join(INTERPOLATIONS)}."
        )
    return INTERPOLATIONS[key]


def _check_config(config: ImageDataConfig) -> None:
    """All checks that need no disk access."""
    _check_source_choice(config)
    _check_numbers(config)
    _resampling(config.interpolation_type)


# --------------------------------------------------------------------------- images and captions


def _inspect_image(file: Path | io.BytesIO) -> tuple[str | None, str | None, bool]:
    """(why PIL cannot read it, why it has no faithful RGB conversion, whether it has transparency) of an image file."""
    try:
        with Image.open(file) as image:
            problem, transparent = mode_problem(image), has_transparency(image)
            if image.mode == "F":  # rare; whether float samples map to 0..255 depends on their values
                problem = float_problem(np.asarray(image, dtype=np.float64))
            else:
                image.verify()
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return _describe(exc), None, False
    return None, problem, transparent


def _warn_transparency(source, images: str) -> None:
    """Log, once per source, that its images with transparency are composited on white."""
    if source.transparency_warned:
        return
    source.transparency_warned = True
    logger.warning(
        "%s transparency (an alpha channel or a transparent colour): transparent pixels are composited on a white "
        "background.", images,
    )


def _to_pil(value: Any, column: str) -> Image.Image:
    """A PIL image from a datasets cell: PIL image, {"bytes", "path"} dict, raw bytes or a file path."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str) and os.path.isfile(value):
        return Image.open(value)
    raise DistillError(
        f"Column {column!r} holds {type(value).__name__} values, not images. Pass --image_column naming the "
        "column that contains the images."
    )


def _is_caption_list(cell: Any) -> bool:
    """True for a non-empty list/tuple/array whose entries are all strings."""
    if not isinstance(cell, (list, tuple, np.ndarray)) or len(cell) == 0:
        return False
    return all(isinstance(option, str) for option in cell)


def _check_caption(cell: Any, origin: str) -> None:
    """Captions must be a string or a non-empty list of strings."""
    if isinstance(cell, str) or _is_caption_list(cell):
        return
    raise DistillError(
        f"The caption of {origin} is {cell!r} ({type(cell).__name__}); captions must be a string or a non-empty "
        "list of strings. Fix that entry, or pass --caption_column naming the column that holds the captions."
    )


def _pick_caption(cell: Any, rng, origin: str) -> str:
    """The caption, or a random one of several (as diffusers does for list captions)."""
    _check_caption(cell, origin)
    return cell if isinstance(cell, str) else str(rng.choice(list(cell)))


def _first_caption(cell: Any, origin: str) -> str:
    """The caption, or the first of several (deterministic, for prompt lists)."""
    _check_caption(cell, origin)
    return cell if isinstance(cell, str) else str(cell[0])


# --------------------------------------------------------------------------- geometry


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to `resolution` (torchvision's Resize(int) rounding)."""
    if width <= height:
        return int(resolution * height / width), resolution
    return resolution, int(resolution * width / height)


def center_crop_offset(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(top, left) of a centered resolution x resolution crop."""
    return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))


def _random_crop_offset(height: int, width: int, resolution: int, rng) -> tuple[int, int]:
    """(top, left) of a uniformly random resolution x resolution crop."""
    return rng.randint(0, height - resolution), rng.randint(0, width - resolution)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] scaled to [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div(127.5).sub(1.0)


@dataclass(frozen=True)
class ImageTransform:
    """Resize short side, optional flip, crop, normalise; returns SDXL micro-conditioning too."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    resample: Image.Resampling = Image.Resampling.BILINEAR

    def resize(self, image: Image.Image) -> Image.Image:
        """Scale so the short side equals the resolution (no-op when it already does)."""
        height, width = resized_size(image.height, image.width, self.resolution)
        if (height, width) == (image.height, image.width):
            return image
        return image.resize((width, height), resample=self.resample)

    def crop_offset(self, height: int, width: int, rng) -> tuple[int, int]:
        """(top, left) of the crop in the resized (and possibly flipped) image."""
        if self.center_crop:
            return center_crop_offset(height, width, self.resolution)
        return _random_crop_offset(height, width, self.resolution, rng)

    def __call__(self, image: Image.Image, rng) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """(pixel_values, original_size (h, w), crop_top_left (top, left)) for an RGB image."""
        original_size = (image.height, image.width)
        image = self.resize(image)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top, left = self.crop_offset(image.height, image.width, rng)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        return _to_tensor(image), original_size, (top, left)


# --------------------------------------------------------------------------- local folder source


def _has_image_files(folder: Path) -> bool:
    """True if any image file lies in the folder or its subfolders."""
    for _root, _dirs, files in os.walk(folder):
        if any(name.lower().endswith(FOLDER_IMAGE_SUFFIXES) for name in files):
            return True
    return False


def _parse_metadata_line(line: str, number: int, path: Path) -> dict:
    """One metadata.jsonl line as a dict, or a DistillError naming the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DistillError(
            f"{path} line {number} is not valid JSON ({exc.msg}): {line[:80]!r}. Each line must be one JSON object "
            'such as {"file_name": "0001.png", "text": "a photo of a cat"}; fix or remove that line.'
        ) from None
    if not isinstance(record, dict):
        raise DistillError(
            f"{path} line {number} is JSON but not an object: {line[:80]!r}. Each line must look like "
            '{"file_name": "0001.png", "text": "a photo of a cat"}.'
        )
    return record


def read_metadata(folder: Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of folder/metadata.jsonl."""
    path = folder / METADATA_FILE
    if not path.is_file():
        raise DistillError(
            f"{folder} has no {METADATA_FILE}. Add one with a line per image, e.g. "
            '{"file_name": "0001.png", "text": "a photo of a cat"}, so every image gets a caption.'
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DistillError(
            f"Cannot read {path} ({_describe(exc)}). Save it as UTF-8 text, one JSON object per line."
        ) from None
    return [(number, _parse_metadata_line(line, number, path)) for number, line in enumerate(lines, 1) if line.strip()]


def _check_metadata_columns(records: list[tuple[int, dict]], path: Path, caption_column: str) -> None:
    """Every record has file_name and the caption column, and the caption has a valid type."""
    for number, record in records:
        if "file_name" not in record:
            raise DistillError(
                f'{path} line {number} has no "file_name" key (keys: {", ".join(record) or "none"}). '
                'Add the image path relative to the folder, e.g. "file_name": "0001.png".'
            )
        if caption_column not in record:
            columns = [FOLDER_IMAGE_COLUMN] + [key for key in record if key != "file_name"]
            raise DistillError(
                f"Caption column {caption_column!r} not found in {path} line {number}; the columns are: "
                f"{', '.join(columns)}. Pass --caption_column with the key that holds the captions."
            )
        _check_caption(record[caption_column], f"{path} line {number}")


def _check_folder_image_column(image_column: str, records: list[tuple[int, dict]]) -> None:
    """Local folders expose their images (from file_name) as the column "image"."""
    if image_column == FOLDER_IMAGE_COLUMN:
        return
    columns = [FOLDER_IMAGE_COLUMN] + [key for key in (records[0][1] if records else {}) if key != "file_name"]
    raise DistillError(
        f"Image column {image_column!r} does not exist in this local folder; the columns are: {', '.join(columns)}. "
        f"Local folders always provide the images (named by \"file_name\") as column {FOLDER_IMAGE_COLUMN!r}: "
        f"pass --image_column {FOLDER_IMAGE_COLUMN} or leave it at its default."
    )


def _resolve_files(folder: Path, records: list[tuple[int, dict]]) -> list[Path]:
    """Absolute image paths of the records; every one must exist."""
    paths = [folder / str(record["file_name"]) for _number, record in records]
    missing = [str(record["file_name"]) for path, (_n, record) in zip(paths, records) if not path.is_file()]
    if missing:
        raise DistillError(
            f"{folder / METADATA_FILE} names {len(missing)} file(s) that do not exist in {folder}: "
            f"{_listing(missing)}. Fix the file_name entries (paths are relative to the folder) or add the images."
        )
    return paths


def _warn_duplicate_files(records: list[tuple[int, dict]], path: Path) -> None:
    """Log once if metadata.jsonl lists the same file_name on several lines (each line is one more sample)."""
    counts: dict[str, int] = {}
    for _number, record in records:
        name = os.path.normpath(str(record["file_name"]))
        counts[name] = counts.get(name, 0) + 1
    repeated = {name: count for name, count in counts.items() if count > 1}
    if repeated:
        examples = [f"{name} x{count}" for name, count in repeated.items()]
        logger.warning(
            "%s lists %d file_name(s) on more than one line (%d extra rows: %s); each line is a separate sample, so "
            "those images are seen more often. Remove the duplicate lines unless that is intended.",
            path, len(repeated), sum(repeated.values()) - len(repeated), _listing(examples, 2),
        )


class FolderSource:
    """Images listed in a folder's metadata.jsonl, with their captions."""

    transparency_warned = False

    def __init__(self, folder: Path, paths: list[Path], captions: list[Any]):
        self.name = str(folder)
        self.paths = paths
        self.captions = captions

    @classmethod
    def open(cls, folder: Path, image_column: str, caption_column: str) -> "FolderSource":
        """Read and check metadata.jsonl of a folder that holds images."""
        if not _has_image_files(folder):
            raise DistillError(
                f"{folder} contains no images ({', '.join(FOLDER_IMAGE_SUFFIXES)}) and no .tar shards. Point "
                "--train_data_dir at a folder with images and a metadata.jsonl, or at webdataset shards."
            )
        records = read_metadata(folder)
        _check_folder_image_column(image_column, records)
        _check_metadata_columns(records, folder / METADATA_FILE, caption_column)
        paths = _resolve_files(folder, records)
        _warn_duplicate_files(records, folder / METADATA_FILE)
        return cls(folder, paths, [record[caption_column] for _number, record in records])

    def __len__(self) -> int:
        return len(self.paths)

    def origin(self, index: int) -> str:
        """The file a row comes from."""
        return str(self.paths[index])

    def load(self, index: int) -> tuple[Image.Image, Any]:
        """(lazy PIL image, caption cell) of a row."""
        return Image.open(self.paths[index]), self.captions[index]

    def verify(self, indices) -> None:
        """Open and verify every selected image file (header + PIL verify) and check its mode converts to RGB."""
        if len(indices) > 1000:
            logger.info("Verifying %d images in %s", len(indices), self.name)
        broken, unconvertible, transparent = [], [], []
        for index in indices:
            reason, problem, has_transparency = _inspect_image(self.paths[index])
            if reason is not None:
                broken.append(f"{self.paths[index]} ({reason})")
            elif problem is not None:
                unconvertible.append(f"{self.paths[index]} ({problem})")
            elif has_transparency:
                transparent.append(self.paths[index].name)
        if broken:
            raise DistillError(
                f"{len(broken)} image file(s) in {self.name} cannot be read: {_listing(broken)}. Replace or delete "
                "them and remove their lines from metadata.jsonl."
            )
        if unconvertible:
            raise DistillError(
                f"{len(unconvertible)} image file(s) in {self.name} cannot be converted to 8-bit RGB faithfully: "
                f"{_listing(unconvertible)}. Save them as 8-bit RGB or 16-bit grayscale PNG yourself, choosing how "
                "their values map to 0..255, or delete them and remove their lines from metadata.jsonl."
            )
        if transparent:
            examples = _listing(transparent, 2)
            _warn_transparency(self, f"{len(transparent)} of {len(indices)} images in {self.name} ({examples}) have")


# --------------------------------------------------------------------------- webdataset shard source

_BRACE = re.compile(r"\{([^{}]*)\}")


def _brace_options(body: str) -> list[str]:
    """Alternatives of one brace group: "a,b" or a zero-padded numeric range "000..009"."""
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if not numeric:
        return body.split(",")
    low, high = int(numeric.group(1)), int(numeric.group(2))
    if high < low:
        raise DistillError(
            f"Shard range {{{body}}} is empty (end < start). Write it as {{{numeric.group(2)}..{numeric.group(1)}}}."
        )
    width = len(numeric.group(1))
    return [str(number).zfill(width) for number in range(low, high + 1)]


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style brace patterns: "s/{000..002}.tar" -> s/000.tar, s/001.tar, s/002.tar."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [path for option in _brace_options(match.group(1)) for path in expand_braces(head + option + tail)]


def _shards_from_pattern(pattern: str) -> list[Path]:
    """Shard paths of a brace pattern; all of them must exist."""
    paths = [Path(path).expanduser() for path in expand_braces(pattern)]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DistillError(
            f"The shard pattern {pattern!r} expands to {len(paths)} file(s) but {len(missing)} do not exist: "
            f"{_listing(missing)}. Fix the pattern or the shard range."
        )
    return paths


def _split_member_name(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member: "dir/000.seg.png" -> ("dir/000", "seg.png")."""
    directory, _slash, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


@dataclass(frozen=True)
class ShardImage:
    """Where one encoded image lies inside a tar shard."""

    shard: str
    offset: int
    size: int
    name: str

    def read(self) -> bytes:
        """The encoded image bytes."""
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


def _caption_extensions(caption_column: str) -> tuple[str, ...]:
    """Text-file extensions holding a caption: the caption column name, then txt."""
    return tuple(dict.fromkeys((caption_column.lower(), "txt")))


def _json_caption(data: bytes, origin: str, caption_column: str) -> Any:
    """The caption inside a sample's .json file, or None."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DistillError(f"{origin} is not valid UTF-8 JSON ({_describe(exc)}). Fix or remove that file.") from None
    if not isinstance(record, dict):
        return None
    for key in dict.fromkeys((caption_column, *SHARD_JSON_CAPTION_KEYS)):
        if key in record:
            return record[key]
    return None


def _shard_caption(files: dict[str, Any], origin: str, caption_column: str) -> Any:
    """The caption of a shard sample from its text file or its .json file, or None."""
    for extension in _caption_extensions(caption_column):
        if isinstance(files.get(extension), bytes):
            return files[extension].decode("utf-8", errors="replace").strip()
    if isinstance(files.get("json"), bytes):
        return _json_caption(files["json"], f"{origin}.json", caption_column)
    return None


def _shard_sample(shard: Path, key: str, files: dict[str, Any], caption_column: str) -> tuple[ShardImage, Any] | None:
    """(image location, caption) of one sample; None for samples with neither image nor caption."""
    origin = f"{shard}:{key}"
    image = next((files[ext] for ext in SHARD_IMAGE_EXTENSIONS if isinstance(files.get(ext), ShardImage)), None)
    caption = _shard_caption(files, origin, caption_column)
    if image is None and caption is None:
        return None
    if image is None:
        raise DistillError(
            f"Sample {origin} has a caption but no image ({', '.join(SHARD_IMAGE_EXTENSIONS)}). Add the image file "
            "to the shard or remove the sample."
        )
    if caption is None:
        raise DistillError(
            f"Sample {origin} has an image but no caption: add {key}.txt, or {key}.json with a "
            f"{' / '.join(dict.fromkeys((caption_column, *SHARD_JSON_CAPTION_KEYS)))} key "
            "(--caption_column names the text extension or JSON key to use)."
        )
    _check_caption(caption, origin)
    return image, caption


def _group_shard_members(tar: tarfile.TarFile, shard: Path, caption_column: str) -> dict[str, dict[str, Any]]:
    """key -> {extension: ShardImage or caption bytes} for the files of one open tar shard."""
    wanted_text = set(_caption_extensions(caption_column)) | {"json"}
    groups: dict[str, dict[str, Any]] = {}
    for member in tar:
        split = _split_member_name(member.name) if member.isfile() else None
        if split is None or os.path.basename(member.name).startswith("."):
            continue
        key, extension = split
        if extension in SHARD_IMAGE_EXTENSIONS:
            groups.setdefault(key, {})[extension] = ShardImage(str(shard), member.offset_data, member.size, member.name)
        elif extension in wanted_text:
            groups.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return groups


def _index_shard(shard: Path, caption_column: str) -> list[tuple[ShardImage, Any]]:
    """All (image location, caption) samples of one uncompressed tar shard."""
    try:
        with tarfile.open(shard, "r:") as tar:
            groups = _group_shard_members(tar, shard, caption_column)
    except (tarfile.TarError, OSError) as exc:
        raise DistillError(
            f"Cannot read the tar shard {shard} ({_describe(exc)}). Shards must be uncompressed .tar files; "
            "re-create or remove it."
        ) from None
    samples = [_shard_sample(shard, key, files, caption_column) for key, files in groups.items()]
    return [sample for sample in samples if sample is not None]


def _verify_first_image(shard: Path, samples: list[tuple[ShardImage, Any]]) -> None:
    """Decode-check the first image of a shard (cheap guard against wrong formats and modes)."""
    if not samples:
        return
    image = samples[0][0]
    reason, problem, _transparent = _inspect_image(io.BytesIO(image.read()))
    if reason is not None:
        raise DistillError(
            f"The image {shard}:{image.name} cannot be read ({reason}). Re-create that shard or remove it."
        )
    if problem is not None:
        raise unconvertible(f"{shard}:{image.name}", problem)


class ShardSource:
    """Image-caption samples of webdataset tar shards, indexed up front for random access."""

    transparency_warned = False

    def __init__(self, name: str, samples: list[tuple[ShardImage, Any]]):
        self.name = name
        self.images = [image for image, _caption in samples]
        self.captions = [caption for _image, caption in samples]

    @classmethod
    def open(cls, name: str, shards: list[Path], caption_column: str) -> "ShardSource":
        """Index every shard; each sample needs an image and a caption."""
        samples = []
        for shard in shards:
            shard_samples = _index_shard(shard, caption_column)
            _verify_first_image(shard, shard_samples)
            samples.extend(shard_samples)
        return cls(name, samples)

    def __len__(self) -> int:
        return len(self.images)

    def origin(self, index: int) -> str:
        """Shard and member a row comes from."""
        return f"{self.images[index].shard}:{self.images[index].name}"

    def load(self, index: int) -> tuple[Image.Image, Any]:
        """(lazy PIL image, caption cell) of a row."""
        return Image.open(io.BytesIO(self.images[index].read())), self.captions[index]

    def verify(self, indices) -> None:
        """Nothing more: the first image of each shard was checked while indexing."""


# --------------------------------------------------------------------------- Hugging Face datasets source


def _looks_like_path(name: str) -> bool:
    """True if a dataset name can only be a filesystem path (Hub names are "name" or "owner/name")."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    return Path(name).suffix.lower() in TABLE_BUILDERS


def _is_saved_to_disk(path: Path) -> bool:
    """True for folders written by Dataset.save_to_disk / DatasetDict.save_to_disk."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _train_split(loaded: Any, name: str):
    """The "train" split of a DatasetDict, or the Dataset itself."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if "train" not in loaded:
            raise DistillError(
                f"The dataset {name} has no 'train' split (splits: {', '.join(loaded) or 'none'}). Save or publish "
                "the training data as the 'train' split."
            )
        return loaded["train"]
    raise DistillError(
        f"{name} loaded as {type(loaded).__name__}, not a map-style dataset. Load it without streaming, or save it "
        "with Dataset.save_to_disk and pass that folder to --dataset_name."
    )


def _saved_without_data(path: Path) -> bool:
    """True if a save_to_disk folder (or its train split) lists no data files: datasets wrote 0 rows."""
    for state_file in (path / "state.json", path / "train" / "state.json"):
        if state_file.is_file():
            try:
                return json.loads(state_file.read_text()).get("_data_files") == []
            except (OSError, ValueError, AttributeError):
                return False
    return False


def _load_saved(path: Path):
    """A dataset folder written by save_to_disk."""
    import datasets

    if _saved_without_data(path):
        raise DistillError(
            f"The dataset {path} is empty (0 rows): it was saved without any data files. Add image-caption "
            "samples before calling save_to_disk, or point to another dataset."
        )
    try:
        return datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DistillError(
            f"Cannot load the saved dataset at {path} ({_describe(exc)}). Re-create it with Dataset.save_to_disk."
        ) from None


def _load_local(path: Path, config_name: str | None, cache_dir: str | None):
    """A local file (csv/json/parquet/arrow) or folder that datasets.load_dataset can read."""
    import datasets

    builder = TABLE_BUILDERS.get(path.suffix.lower()) if path.is_file() else None
    try:
        if builder is not None:
            return datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir)
        return datasets.load_dataset(str(path), config_name, cache_dir=cache_dir)
    except Exception as exc:
        raise DistillError(
            f"datasets cannot read the local path {path} ({_describe(exc)}). Pass a folder saved with "
            "Dataset.save_to_disk to --dataset_name, or a folder of images with metadata.jsonl to --train_data_dir."
        ) from None


def _load_hub(name: str, config_name: str | None, cache_dir: str | None):
    """A dataset from the Hugging Face Hub (or its local cache)."""
    import datasets

    try:
        return datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as exc:
        raise DistillError(
            f"Cannot load the dataset {name!r} from the Hugging Face Hub ({_describe(exc)}). It is not a local path; "
            "the name may be wrong, or the Hub may be unreachable (no network, or HF_HUB_OFFLINE=1 without a cached "
            "copy). For local data pass --train_data_dir with a folder of images and metadata.jsonl (or .tar shards), "
            "or --dataset_name with a folder saved by Dataset.save_to_disk."
        ) from None


def load_hf_dataset(name: str, config_name: str | None = None, cache_dir: str | None = None):
    """The train split of a Hub dataset, a save_to_disk folder, or a local path load_dataset can read."""
    path = Path(name).expanduser()
    if path.exists():
        loaded = _load_saved(path) if _is_saved_to_disk(path) else _load_local(path, config_name, cache_dir)
    elif _looks_like_path(name):
        raise DistillError(
            f"The dataset path {name!r} does not exist. Check --dataset_name, or pass a Hub name like owner/dataset."
        )
    else:
        loaded = _load_hub(name, config_name, cache_dir)
    return _train_split(loaded, name)


def _require_column(dataset, column: str, flag: str, role: str, name: str) -> None:
    """A DistillError listing the existing columns when `column` is missing."""
    if column not in dataset.column_names:
        raise DistillError(
            f"{role.capitalize()} column {column!r} not found in {name}; the columns are: "
            f"{', '.join(dataset.column_names)}. Pass {flag} with the column that holds the {role}s."
        )


class HFSource:
    """Rows of a datasets.Dataset with an image column and a caption column."""

    transparency_warned = False

    def __init__(self, name: str, dataset, image_column: str, caption_column: str):
        self.name = name
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column

    @classmethod
    def open(cls, config: ImageDataConfig) -> "HFSource":
        """Load the dataset and check both columns exist."""
        dataset = load_hf_dataset(config.dataset_name, config.dataset_config_name, config.cache_dir)
        _require_column(dataset, config.image_column, "--image_column", "image", config.dataset_name)
        _require_column(dataset, config.caption_column, "--caption_column", "caption", config.dataset_name)
        return cls(config.dataset_name, dataset, config.image_column, config.caption_column)

    def __len__(self) -> int:
        return len(self.dataset)

    def origin(self, index: int) -> str:
        """Dataset and row a sample comes from."""
        return f"{self.name} row {index}"

    def load(self, index: int) -> tuple[Image.Image, Any]:
        """(PIL image, caption cell) of a row."""
        row = self.dataset[int(index)]
        return _to_pil(row[self.image_column], self.image_column), row[self.caption_column]

    def verify(self, indices) -> None:
        """Decode the first selected row only (cheap) and check its caption."""
        first = indices[0]
        _image, caption = _decode_row(self, first)
        _check_caption(caption, self.origin(first))


# --------------------------------------------------------------------------- the dataset


def _decode_row(source, index: int) -> tuple[Image.Image, Any]:
    """(RGB image, caption cell) of a source row; unreadable images become a DistillError naming the row."""
    try:
        image, caption = source.load(index)
        if has_transparency(image):
            _warn_transparency(source, f"Images of {source.name} (first: {source.origin(index)}) have")
        return to_rgb(image, source.origin(index)), caption
    except DistillError:
        raise
    except Exception as exc:
        raise DistillError(
            f"Cannot read the image of {source.origin(index)} ({_describe(exc)}). Replace or remove that sample."
        ) from None


def _open_local_source(location: str, config: ImageDataConfig):
    """A folder of images + metadata.jsonl, a .tar shard, a brace pattern of shards or a folder of shards."""
    path = Path(location).expanduser()
    if not path.exists():
        if "{" in location:
            return ShardSource.open(location, _shards_from_pattern(location), config.caption_column)
        raise DistillError(
            f"--train_data_dir {location!r} does not exist. Pass an existing folder of images with metadata.jsonl, "
            "a .tar shard, a folder of .tar shards or a pattern like shards/{00000..00009}.tar."
        )
    if path.is_file():
        if path.suffix.lower() != ".tar":
            raise DistillError(
                f"--train_data_dir {location!r} is a file but not a .tar shard. Pass a folder of images with "
                "metadata.jsonl, or webdataset .tar shards."
            )
        return ShardSource.open(location, [path], config.caption_column)
    shards = sorted(path.glob("*.tar"))
    if shards and not (path / METADATA_FILE).exists():
        return ShardSource.open(location, shards, config.caption_column)
    return FolderSource.open(path, config.image_column, config.caption_column)


def _open_source(config: ImageDataConfig):
    """The source named by the config (local data or a Hugging Face dataset)."""
    if config.train_data_dir:
        return _open_local_source(config.train_data_dir, config)
    return HFSource.open(config)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Map-style dataset of {"pixel_values", "caption", "original_size", "crop_top_left"} items."""

    def __init__(self, source, indices, transform: ImageTransform, seed: int | None = None):
        self.source = source
        self.indices = indices
        self.transform = transform
        self.seed = 0 if seed is None else seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch (the trainer calls it at every epoch start)."""
        self.epoch = epoch

    def _rng(self, index: int) -> random.Random:
        """Augmentation randomness as a function of (seed, epoch, index) only.

        Crops, flips and caption choices then do not depend on which process or worker loads the item, nor
        on how many items were loaded before it, so a run resumed from a checkpoint sees exactly the samples
        an uninterrupted run would have seen.
        """
        return random.Random(f"{self.seed}-{self.epoch}-{index}")

    def __getitem__(self, index: int) -> dict:
        row = self.indices[index]
        image, caption_cell = _decode_row(self.source, row)
        rng = self._rng(index)
        pixel_values, original_size, crop_top_left = self.transform(image, rng)
        return {
            "pixel_values": pixel_values,
            "caption": _pick_caption(caption_cell, rng, self.source.origin(row)),
            "original_size": original_size,
            "crop_top_left": crop_top_left,
        }


def build_image_caption_dataset(config: ImageDataConfig) -> torch.utils.data.Dataset:
    """Check the whole data configuration and return a map-style image-caption dataset."""
    _check_config(config)
    transform = ImageTransform(
        config.resolution, config.center_crop, config.random_flip, _resampling(config.interpolation_type)
    )
    source = _open_source(config)
    if len(source) == 0:
        raise DistillError(
            f"The dataset {source.name} is empty (0 rows). Add image-caption samples or point to another dataset."
        )
    indices = _subset(len(source), config.max_train_samples, config.seed)
    source.verify(indices)
    return ImageCaptionDataset(source, indices, transform, config.seed)


def collate_image_caption(examples: list[dict]) -> dict:
    """Batch items: pixel_values [B,3,R,R] float, caption list[str], original_size/crop_top_left LongTensor [B,2]."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]).contiguous().float(),
        "caption": [example["caption"] for example in examples],
        "original_size": torch.tensor([example["original_size"] for example in examples], dtype=torch.long),
        "crop_top_left": torch.tensor([example["crop_top_left"] for example in examples], dtype=torch.long),
    }


# --------------------------------------------------------------------------- prompts


def _prompts_from_text_file(path: Path) -> list[str]:
    """Non-blank lines of a text file, stripped."""
    if not path.is_file():
        raise DistillError(
            f"The prompt file {path} does not exist. Pass an existing .txt file with one prompt per line."
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DistillError(f"Cannot read the prompt file {path} ({_describe(exc)}). Save it as UTF-8 text.") from None
    return [line.strip() for line in lines if line.strip()]


def _caption_cells(source: str, caption_column: str) -> list[tuple[Any, str]]:
    """(caption cell, origin) pairs of a local folder, tar shards or Hugging Face dataset."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / METADATA_FILE).exists():
        records = read_metadata(path)
        _check_metadata_columns(records, path / METADATA_FILE, caption_column)
        return [(record[caption_column], f"{path / METADATA_FILE} line {number}") for number, record in records]
    if path.suffix.lower() == ".tar" or "{" in source or (path.is_dir() and any(path.glob("*.tar"))):
        shards = _shard_paths(source)
        samples = ShardSource.open(source, shards, caption_column)
        return [(caption, samples.origin(index)) for index, caption in enumerate(samples.captions)]
    dataset = load_hf_dataset(source)
    _require_column(dataset, caption_column, "--caption_column", "caption", source)
    cells = list(dataset.select_columns([caption_column])[caption_column])
    return [(cell, f"{source} row {index}") for index, cell in enumerate(cells)]


def _shard_paths(source: str) -> list[Path]:
    """Shard files named by a .tar path, a brace pattern or a folder of shards."""
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if path.is_file():
        return [path]
    return _shards_from_pattern(source)


def build_prompt_dataset(source: str, caption_column: str = "text") -> list[str]:
    """Prompts from a .txt file (one per line, blanks skipped) or a dataset column (HF name/path or local folder)."""
    if Path(source).suffix.lower() == ".txt":
        prompts = _prompts_from_text_file(Path(source).expanduser())
    else:
        prompts = [_first_caption(cell, origin) for cell, origin in _caption_cells(source, caption_column)]
    if not prompts:
        raise DistillError(f"{source} contains no prompts. Add at least one non-empty prompt.")
    return prompts


class PromptDataset(torch.utils.data.Dataset):
    """Captions only, for methods that never see an image (score distillation)."""

    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"caption": self.prompts[index]}


def collate_prompts(examples: list[dict]) -> dict:
    """Batch items: caption list[str]."""
    return {"caption": [example["caption"] for example in examples]}


def build_prompt_training_set(config: ImageDataConfig) -> PromptDataset:
    """Prompts from --prompts_file, else the caption column of --dataset_name / --train_data_dir."""
    source = config.prompts_file or config.dataset_name or config.train_data_dir
    if not source:
        raise DistillError("This method trains on prompts only: pass --prompts_file (a .txt file, one prompt per "
                           "line) or --dataset_name/--train_data_dir with a --caption_column.")
    prompts = build_prompt_dataset(source, config.caption_column)
    if config.max_train_samples is not None:
        prompts = [prompts[i] for i in _subset(len(prompts), config.max_train_samples, config.seed)]
    return PromptDataset(prompts)


def build_training_set(kind: str, config: ImageDataConfig, teacher=None):
    """(dataset, collate_fn) for a method's data kind: "images", "prompts" or "pairs".

    ``teacher`` (the run's TeacherInfo): pairs must come from it at ``config.resolution``'s latent shape.
    """
    if kind == "images":
        return build_image_caption_dataset(config), collate_image_caption
    if kind == "prompts":
        return build_prompt_training_set(config), collate_prompts
    if kind == "pairs":
        if not config.pairs_dir:
            raise DistillError("This method trains on teacher noise-latent pairs: pass --pairs_dir, the folder "
                               "written by train_scripts/generate_pairs.py.")
        resolution = config.resolution if teacher is not None else None
        return load_pair_dataset(config.pairs_dir, teacher, resolution), collate_pairs
    raise ValueError(f"Unknown data kind {kind!r}")
