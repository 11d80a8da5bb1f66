"""Every image mode PIL opens, as faithful 8-bit RGB: 16-bit samples scaled by their real depth, transparency on
white, float images by their range; modes with no faithful mapping are refused with the file and the fix."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import DistillError

ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
DIRECT_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV") + ALPHA_MODES
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT, TIFF_SIGNED_INTEGER = 258, 339, 2


def _integer_depth(image: Image.Image) -> tuple[int | None, bool]:
    """(bits per sample as stored in the file, signed) of an integer-mode image; bits None when unknown."""
    if image.format == "TIFF" and hasattr(image, "tag_v2"):
        bits, sample_format = image.tag_v2.get(TIFF_BITS_PER_SAMPLE, 16), image.tag_v2.get(TIFF_SAMPLE_FORMAT, 1)
        bits = bits[0] if isinstance(bits, tuple) else bits
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
        return int(bits), int(sample_format) == TIFF_SIGNED_INTEGER
    if image.mode in SIXTEEN_BIT_MODES or image.format == "PNG":  # PNG integer samples are 16-bit unsigned
        return 16, False
    return None, False


def _integer_problem(image: Image.Image) -> str | None:
    """Why an integer-mode image's samples have no faithful mapping to 0..255, or None."""
    bits, signed = _integer_depth(image)
    if signed:
        return "signed integer samples, which have no standard mapping to 0..255"
    if bits is None or bits < 1:
        return "integer samples of unknown bit depth"
    if bits > 16:
        return f"{bits}-bit integer samples, whose real range is unknown"
    return None


def mode_problem(image: Image.Image) -> str | None:
    """Why an image's mode has no faithful 8-bit RGB conversion (from its header only), or None."""
    if image.mode in DIRECT_MODES or image.mode == "F":
        return None
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        reason = _integer_problem(image)
    else:
        reason = "a pixel format with no conversion to RGB"
    return None if reason is None else f"PIL mode {image.mode!r} ({reason})"


def has_transparency(image: Image.Image) -> bool:
    """True if the image has an alpha channel or a transparent colour (palette entry or colour key)."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def unconvertible(origin: str, problem: str) -> DistillError:
    """The error for an image whose mode or values have no faithful 8-bit RGB conversion."""
    return DistillError(
        f"Cannot convert the image {origin} to 8-bit RGB faithfully: it has {problem}. Save it as 8-bit RGB or "
        "16-bit grayscale PNG yourself, choosing how its values map to 0..255, or remove that sample."
    )


def float_problem(values: np.ndarray) -> str | None:
    """Why float ("F") samples have no faithful 0..255 mapping: only 0..1 (scaled x255) and 0..255 (kept) have one."""
    if not np.isfinite(values).all():
        return "PIL mode 'F' (float samples that are NaN or infinite)"
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        return f"PIL mode 'F' (float samples from {low:g} to {high:g}, outside 0..1 and 0..255)"
    return None


def _deep_to_8bit(image: Image.Image, origin: str) -> Image.Image:
    """An integer ("I;16*", "I") or float ("F") image as 8-bit "L" (or "LA" when it has a transparent colour key)."""
    samples = np.asarray(image)
    values = samples.astype(np.float64)
    if image.mode == "F":
        problem = float_problem(values)
        if problem is not None:
            raise unconvertible(origin, problem)
        values *= 255.0 if values.max() <= 1 else 1.0  # 0..1 floats; 0..255 floats stay as they are
    else:
        values *= 255.0 / (2 ** _integer_depth(image)[0] - 1)
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    key = image.info.get("transparency")
    if image.mode != "F" and isinstance(key, int):
        alpha = np.where(samples == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")
    return Image.fromarray(gray, "L")


def _on_white(image: Image.Image) -> Image.Image:
    """An RGBA image alpha-composited on an opaque white background, as RGB."""
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image.convert("RGB"), mask=image.getchannel("A"))
    return background


def to_rgb(image: Image.Image, origin: str) -> Image.Image:
    """Any PIL image as 8-bit RGB: deep samples scaled by their bit depth, transparency composited on white."""
    problem = mode_problem(image)
    if problem is not None:
        raise unconvertible(origin, problem)
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _deep_to_8bit(image, origin)
    if image.mode == "La":  # premultiplied alpha: PIL converts it onwards only through LA
        image = image.convert("LA")
    if has_transparency(image):
        return _on_white(image.convert("RGBA"))
    return image.convert("RGB")
