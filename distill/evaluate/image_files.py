"""Image folders for evaluation: listing, reading as uint8 RGB, and writing PNGs whole (never half-written)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DistillError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | os.PathLike, flag: str = "--reference_dir") -> list[Path]:
    """The image files under ``folder`` (sub-folders included), sorted; a DistillError if there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DistillError(f"{flag} {folder} is not a folder. Pass a folder of images (.png, .jpg, .webp).")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DistillError(f"{flag} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}). Point it at a folder "
                           "of reference images.")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 H x W x 3 (grey, palette and alpha images converted to RGB)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise DistillError(f"Cannot read the image {path} ({error}). Remove or replace the file.") from None


def read_all(paths: Iterable[Path]) -> Iterator[np.ndarray]:
    """``read_rgb`` of each path, lazily (a large reference set is never held in memory at once)."""
    return (read_rgb(path) for path in paths)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write uint8 H x W x 3 to ``path`` through a temporary name, so an interruption leaves no partial PNG."""
    partial = path.with_name(f".{path.name}.partial")
    Image.fromarray(image).save(partial, format="PNG")
    os.replace(partial, path)


class LazyImages:
    """Image files as a read-on-demand sequence: ``images[a:b]`` is a uint8 N x H x W x 3 array (one size per slice),
    iteration yields one H x W x 3 array at a time."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[np.ndarray]:
        return read_all(self.paths)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("LazyImages supports slices only")
        return np.stack([read_rgb(path) for path in self.paths[index]])
