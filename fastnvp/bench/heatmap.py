"""Ratio heatmaps of the grid preset: one panel per workload, colour = log2 of a speed ratio.

Generic over the data: :func:`ratio_heatmap` gets plain ratios per cell, so it knows nothing of
the results document (``fastnvp.bench.report`` extracts them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence


def _fmt(ratio: float) -> str:
    # Two significant figures read at a glance in a small cell; 10x and more need no decimals.
    return f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.2f}×"


def _fmt_tick(log2_ratio: int) -> str:
    # Colour-bar ticks sit on powers of two: 1/4×, 1/2×, 1×, 2×, 4×.
    if log2_ratio >= 0:
        return f"{2**log2_ratio}×"
    return f"1/{2 ** (-log2_ratio)}×"


def _breaks(keys: Sequence) -> list[float]:
    """Positions between consecutive tuple keys whose first element differs (group lines)."""
    return [
        i - 0.5
        for i in range(1, len(keys))
        if isinstance(keys[i], tuple)
        and isinstance(keys[i - 1], tuple)
        and keys[i][0] != keys[i - 1][0]
    ]


def ratio_heatmap(
    ratios: Mapping[str, Mapping[tuple, float]],
    rows: Sequence[tuple],
    cols: Sequence[tuple],
    path: str,
    title: str,
    row_label: Callable[[tuple], str] | None = None,
    col_label: Callable[[tuple], str] | None = None,
    ratio_name: str = "fastnvp / reference",
) -> str:
    """Write a PNG with one heatmap panel per key of ``ratios``.

    Args:
        ratios: panel name (a workload) -> {(row key, col key): ratio > 0}; a missing cell
            (a shape not run, or no peer) is drawn grey with "–".
        rows: row keys, top to bottom (e.g. (D, H) pairs), len R.
        cols: column keys, left to right (e.g. (B, L) pairs), len C.
        path: the PNG to write.
        title: figure title.
        row_label, col_label: tick text of a key (default ``str``).
        ratio_name: what the ratio is, for the colour bars.

    Each panel is an (R, C) image of log2(ratio) on a diverging colormap centred at 1× (white)
    with symmetric limits per panel (so a panel of ratios near 1× is not washed out by another
    of 30×); blue is > 1× (faster), red < 1×. Every cell is annotated with its ratio. Tuple
    keys are grouped by their first element (e.g. D of (D, H)) with white lines.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not ratios:
        raise ValueError("ratios must hold at least one panel")
    if not rows or not cols:
        raise ValueError("rows and cols must be non-empty")
    row_label = row_label or str
    col_label = col_label or str
    panels = list(ratios)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(1.8 + len(panels) * (1.6 + 0.75 * len(cols)), 1.4 + 0.36 * len(rows)),
        squeeze=False,
    )
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#dddddd")
    for ax, panel in zip(axes[0], panels):
        cells = ratios[panel]
        grid = np.full((len(rows), len(cols)), np.nan)
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                value = cells.get((r, c))
                if value is not None:
                    if not (value > 0 and math.isfinite(value)):
                        raise ValueError(f"ratios[{panel!r}][{(r, c)!r}] must be > 0, got {value}")
                    grid[i, j] = math.log2(value)
        finite = np.abs(grid[np.isfinite(grid)])
        # Symmetric about 0 (1×), at least ±1 (½×..2×) so noise around 1× stays pale.
        lim = max(1.0, math.ceil(float(finite.max()))) if finite.size else 1.0
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = grid[i, j]
                if math.isnan(v):
                    ax.text(j, i, "–", ha="center", va="center", fontsize=7, color="#666666")
                    continue
                dark = abs(v) > 0.6 * lim  # white text on the saturated ends
                ax.text(
                    j,
                    i,
                    _fmt(2.0**v),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([col_label(c) for c in cols], fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([row_label(r) for r in rows], fontsize=7)
        for y in _breaks(rows):
            ax.axhline(y, color="white", linewidth=2)
        for x in _breaks(cols):
            ax.axvline(x, color="white", linewidth=2)
        ax.set_title(panel)
        ticks = list(range(-int(lim), int(lim) + 1))
        bar = fig.colorbar(image, ax=ax, ticks=ticks, fraction=0.05, pad=0.02)
        bar.ax.set_yticklabels([_fmt_tick(t) for t in ticks], fontsize=7)
        bar.set_label(f"{ratio_name} (log scale)", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
