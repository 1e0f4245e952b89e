"""Figures of the digits study: image grids and validation curves (matplotlib object API).

Images are (n, 64) pixel tensors with values 0..16 (``fastnvp.training.digits``), drawn in
grey with white gaps between them (``image_grid`` leaves NaN there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fastnvp.analysis.viz import save_png
from fastnvp.training.digits import LEVELS, image_grid


def _show(ax, grid: np.ndarray, title: str) -> None:
    from matplotlib import colormaps

    cmap = colormaps["gray_r"].with_extremes(bad="white")
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=LEVELS - 1)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_real_vs_samples(real, samples, path, *, title: str = "") -> Path:
    """64 real images (left) next to 64 samples (right), each an 8 x 8 grid.

    Args:
        real, samples: (64, 64) pixel tensors, values 0..16.
    """
    for name, images in (("real", real), ("samples", samples)):
        if tuple(images.shape) != (64, 64):
            raise ValueError(f"{name} must have shape (64, 64), got {tuple(images.shape)}")
    fig = Figure(figsize=(10, 5.3))
    left, right = fig.subplots(1, 2)
    _show(left, image_grid(real, 8, 8), "64 test images")
    _show(right, image_grid(samples, 8, 8), "64 samples of the model")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


def plot_class_samples(samples, path, *, title: str = "") -> Path:
    """One row per digit class: samples (per_class, 10, 64) from a class-conditional model,
    ``samples[k, c]`` the k-th draw given class c."""
    if samples.ndim != 3 or samples.shape[1] != 10 or samples.shape[2] != 64:
        raise ValueError(f"samples must have shape (n, 10, 64), got {tuple(samples.shape)}")
    per_class = samples.shape[0]
    rows = samples.permute(1, 0, 2).reshape(10 * per_class, 64)
    fig = Figure(figsize=(per_class * 0.75 + 1, 8.2))
    ax = fig.subplots()
    _show(ax, image_grid(rows, 10, per_class), title or "samples given the digit (one row each)")
    ax.set_yticks([4 + 9 * c for c in range(10)])
    ax.set_yticklabels([str(c) for c in range(10)])
    return save_png(fig, path)


def plot_nll_curves(results: list[dict], path, *, baseline: float | None = None) -> Path:
    """Validation NLL (nats per image) against optimizer steps, one line per run.

    ``results``: dicts with ``name`` and ``history`` (``step``, ``val_nll``, ``train_nll``);
    ``baseline``: a horizontal reference line (the Gaussian's test NLL).
    """
    fig = Figure(figsize=(12, 7.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 1.2))
    val_ax, train_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    values, lines = [], []
    for result in results:
        h = result["history"]
        if not h.get("step"):
            continue
        style = "--" if result.get("group") == "peer" else "-"
        (line,) = val_ax.plot(h["step"], h["val_nll"], style, label=result["name"], linewidth=1.2)
        train_ax.plot(h["step"], h["train_nll"], style, color=line.get_color(), linewidth=1.2)
        values += [v for v in h["val_nll"] if np.isfinite(v)]
        lines.append(line)
    for ax, name in ((val_ax, "validation"), (train_ax, "training (running mean)")):
        if baseline is not None:
            ax.axhline(baseline, color="black", linewidth=1, linestyle=":")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{name} NLL")
        ax.set_ylabel("nats per image (discrete data)")
        ax.grid(alpha=0.3)
    if values:
        low = min(values + ([baseline] if baseline is not None else []))
        val_ax.set_ylim(low - 5, low + 40)
        train_ax.set_ylim(low - 40, low + 40)
    handles = lines + ([val_ax.lines[-1]] if baseline is not None else [])
    labels = [h.get_label() for h in lines] + (["Gaussian (test NLL)"] if baseline else [])
    legend_ax = fig.add_subplot(grid[1, :])
    legend_ax.axis("off")
    legend_ax.legend(handles, labels, loc="center", ncol=3, fontsize=8, frameon=False)
    return save_png(fig, path)
