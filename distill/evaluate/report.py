"""The pictures of an evaluation: a grid of the same prompts and seeds across samplers, and quality against NFE."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .image_files import read_rgb

GRID_CELL = 256  # pixels: each image is scaled to fit a GRID_CELL x GRID_CELL cell of the grid
GRID_FONT_SIZE = 20
PANEL_INCHES = (6.0, 5.0)  # one panel of the quality-vs-NFE plot per metric
PLOT_DPI = 110


@dataclass(frozen=True)
class Metric:
    """A score of the results table and plot: its key in a row, its column header, its axis label, its decimals."""

    key: str
    column: str
    axis: str
    decimals: int = 2


FID = Metric("fid", "FID", "FID (lower is better)")
CLIP_SCORE = Metric("clip_score", "CLIP score", "CLIP score (higher is better)")
HPS = Metric("hps", "HPS v2", "HPS v2 (higher is better)", decimals=4)


def _label_width(labels: Sequence[str], font) -> int:
    """Pixels of the label column: the widest label and a margin."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return max(draw.multiline_textbbox((0, 0), label, font=font)[2] for label in labels) + GRID_FONT_SIZE


def grid_image(rows: dict[str, Sequence[str | os.PathLike]], cell: int = GRID_CELL) -> Image.Image:
    """One row per label: a label column, then the row's image files, each scaled to fit a ``cell`` square."""
    font = ImageFont.load_default(size=GRID_FONT_SIZE)
    left = _label_width(list(rows), font)
    columns = max(len(files) for files in rows.values())
    grid = Image.new("RGB", (left + columns * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, files) in enumerate(rows.items()):
        draw.multiline_text((GRID_FONT_SIZE // 2, r * cell + cell // 2), label, fill="black", font=font, anchor="lm")
        for c, file in enumerate(files):
            grid.paste(fit_cell(read_rgb(Path(file)), cell), (left + c * cell, r * cell))
    return grid


def fit_cell(image: np.ndarray, cell: int = GRID_CELL) -> Image.Image:
    """A uint8 H x W x 3 image scaled (aspect kept; enlarged pixels stay sharp) and padded with black to a cell."""
    smaller = max(image.shape[:2]) < cell
    method = Image.Resampling.NEAREST if smaller else Image.Resampling.LANCZOS
    return ImageOps.pad(Image.fromarray(image), (cell, cell), method=method, color="black")


def save_grid(rows: dict[str, Sequence[str | os.PathLike]], path: str | os.PathLike, cell: int = GRID_CELL) -> Path:
    """``grid_image`` written to ``path`` as a PNG."""
    grid_image(rows, cell).save(path)
    return Path(path)


def plot_quality_vs_nfe(results: dict[str, dict], families: dict[str, str], metrics: Sequence[Metric],
                        path: str | os.PathLike, nfe_key: str = "nfe",
                        references: dict[str, tuple[float, str]] | None = None) -> Path:
    """One panel per metric of ``results`` (sampler: scores and NFE) against NFE, log axis, a line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    width, height = PANEL_INCHES
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), height), squeeze=False)
    ordered = list(dict.fromkeys(families[name] for name in results))
    colors = (plt.cm.tab10 if len(ordered) <= 10 else plt.cm.tab20)(range(len(ordered)))  # a colour per family
    for ax, metric in zip(axes[0], metrics):
        for family, color in zip(ordered, colors):
            names = [n for n in results if families[n] == family and results[n].get(metric.key) is not None]
            if not names:
                continue
            teacher = family.startswith("teacher")  # dashed; at one step count also a level line
            values = [results[n][metric.key] for n in names]
            ax.plot([results[n][nfe_key] for n in names], values, marker="o", color=color, label=family,
                    linestyle="--" if teacher else "-")
            if teacher and len(names) == 1:
                ax.axhline(values[0], color=color, linestyle=":", linewidth=1)
        if references and metric.key in references:  # {metric key: (value, label)}, e.g. real data
            value, label = references[metric.key]
            ax.axhline(value, color="grey", linestyle=":", linewidth=1.5, label=label)
        ax.set_xscale("log")
        ax.set_xticks(sorted({results[n][nfe_key] for n in results if results[n].get(nfe_key)}))  # NFEs sampled
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("UNet evaluations per image (NFE, CFG counts 2 per step)")
        ax.set_ylabel(metric.axis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return Path(path)
