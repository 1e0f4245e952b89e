"""Figures of a trained flow: density, losses, latent space, the paper's Figure 1, depth sheets.

Built on matplotlib's object API (``matplotlib.figure.Figure`` rendered by Agg), never pyplot,
so making figures needs no display and does not change the backend of a user's session. Every
function writes one PNG to ``path`` and returns the path. ``model`` is any flow with ``f``, ``g``
and ``log_prob`` in data units (e.g. :class:`fastnvp.training.train.DataFlow`); the 2-D plots need
D = 2.

Conditional flows (``log_prob(x, context=c)``, ``sample(n, context=c)``) get
:func:`context_panels` (which context values to show: one per label, or quantiles of a
continuous context), :func:`plot_conditional_samples` (samples per context value over that
context's data) and :func:`plot_conditional_density` (p(x | c) per context value, D = 2);
:func:`plot_latent` takes the context of each point.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from fastnvp.core.validation import ensure_batch

DPI = 110
POINT_COLOR = "#d62728"


def _check_path(path) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_2d(model, x: torch.Tensor, name: str = "x") -> None:
    ensure_batch(x, name, 2)
    dim = getattr(model, "dim", None)
    if dim != 2:
        raise ValueError(f"model must be a 2-D flow for this figure, got dim={dim}")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def save_png(fig: Figure, path) -> Path:
    """Write ``fig`` to ``path`` (a .png; parent folders created) as every figure here is."""
    return _save(fig, _check_path(path))


def data_bounds(x: torch.Tensor, pad: float = 0.15) -> tuple[float, float, float, float]:
    """A box around the 0.5–99.5 % quantiles of ``x`` (N, 2), padded by ``pad`` of its size."""
    ensure_batch(x, "x", 2)
    q = torch.quantile(x.double(), torch.tensor([0.005, 0.995], dtype=torch.float64), dim=0)
    lo, hi = q[0].numpy(), q[1].numpy()
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def _given(context, rows: int) -> dict:
    """Keyword arguments passing one (C,) ``context`` for ``rows`` points (none when None)."""
    return {} if context is None else {"context": context.reshape(1, -1).expand(rows, -1)}


@torch.no_grad()
def density_grid(model, bounds, resolution: int = 200, *, context=None) -> np.ndarray:
    """p(x) on a ``resolution``² grid over ``bounds`` = (x0, x1, y0, y1).  -> (res, res).

    Row i is the i-th y value, column j the j-th x value (``imshow(origin="lower")`` order).
    ``context`` (C,): p(x | c) of a conditional flow at that one context value.
    """
    if not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an int >= 2, got {resolution!r}")
    x0, x1, y0, y1 = bounds
    gx, gy = torch.meshgrid(
        torch.linspace(x0, x1, resolution), torch.linspace(y0, y1, resolution), indexing="xy"
    )
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    chunks = [pts[s : s + 16384] for s in range(0, len(pts), 16384)]
    log_p = torch.cat([model.log_prob(c, **_given(context, c.shape[0])) for c in chunks])
    return log_p.exp().reshape(resolution, resolution).numpy()


def _density_axes(
    ax, model, x: torch.Tensor, bounds, resolution: int, points: int, context=None
) -> None:
    p = density_grid(model, bounds, resolution, context=context)
    ax.imshow(p, extent=bounds, origin="lower", cmap="viridis", aspect="auto")
    if points:
        sub = x[:points].numpy()
        ax.scatter(sub[:, 0], sub[:, 1], s=1.5, c=POINT_COLOR, alpha=0.35, linewidths=0)
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])


def plot_density(
    model,
    x_test: torch.Tensor,
    path,
    *,
    title: str | None = None,
    resolution: int = 200,
    points: int = 1000,
) -> Path:
    """Heatmap of the model density p(x) with (up to ``points``) test points on top."""
    _check_2d(model, x_test, "x_test")
    path = _check_path(path)
    fig = Figure(figsize=(5, 4.2))
    ax = fig.add_subplot()
    bounds = data_bounds(x_test)
    _density_axes(ax, model, x_test, bounds, resolution, points)
    ax.set_title(title or "model density p(x) with test points")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    return _save(fig, path)


def _smooth(values, window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or v.size < window:
        return v
    # Trailing moving average, so the curve at step k only uses losses up to k.
    c = np.cumsum(np.insert(v, 0, 0.0))
    head = c[1:window] / np.arange(1, window)
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def plot_losses(histories: dict, path, *, title: str | None = None, window: int = 50) -> Path:
    """Training loss (moving average over ``window`` steps) and test NLL of one or more runs.

    ``histories`` maps a label (e.g. ``"L=50"``) to a run history dict with ``train_loss``
    (per step), ``test_steps`` and ``test_nll``, all in nats per sample.
    """
    if not isinstance(histories, dict) or not histories:
        raise ValueError("histories must be a non-empty dict {label: history}")
    path = _check_path(path)
    fig = Figure(figsize=(11, 4.2))
    ax_train, ax_test = fig.subplots(1, 2, sharey=True)
    colors = _colors(len(histories))
    for color, (label, hist) in zip(colors, histories.items()):
        train_loss = hist["train_loss"]
        steps = np.arange(1, len(train_loss) + 1)
        ax_train.plot(steps, _smooth(train_loss, window), color=color, lw=1.2, label=label)
        ax_test.plot(hist["test_steps"], hist["test_nll"], color=color, lw=1.2, label=label)
    finals = [h["test_nll"][-1] for h in histories.values() if h["test_nll"]]
    lows = [min(_smooth(h["train_loss"], window)) for h in histories.values() if h["train_loss"]]
    if finals and lows:
        # Early losses of a deep flow can be far above the rest; frame where the curves end.
        top = max(max(finals), max(h["test_nll"][0] for h in histories.values() if h["test_nll"]))
        bottom = min(min(finals), min(lows))
        ax_train.set_ylim(bottom - 0.1 * (top - bottom) - 0.05, top + 0.1 * (top - bottom) + 0.05)
    ax_train.set_title(f"training loss (moving average, {window} steps)")
    ax_test.set_title("test NLL")
    for ax in (ax_train, ax_test):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_train.set_ylabel("nats per sample (data units)")
    ax_test.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if n <= 10 else colormaps["viridis"]
    return [cmap(i if n <= 10 else i / max(1, n - 1)) for i in range(n)]


def _gaussian_contours(ax, radii=(1.0, 2.0, 3.0)) -> None:
    # The level sets of N(0, I) in 2-D are circles; radius r holds 1 - exp(-r²/2) of the mass.
    t = np.linspace(0, 2 * math.pi, 200)
    for r in radii:
        ax.plot(r * np.cos(t), r * np.sin(t), color="k", lw=0.8, ls="--", alpha=0.6)


def _latent_axes(ax, model, x: torch.Tensor, labels, limit: float = 4.0, context=None) -> None:
    with torch.no_grad():
        z = (model.f(x) if context is None else model.f(x, context))[0].numpy()
    colors = None if labels is None else np.asarray(labels)
    ax.scatter(
        z[:, 0],
        z[:, 1],
        s=2,
        c=colors,
        cmap="coolwarm" if colors is not None else None,
        alpha=0.6,
        linewidths=0,
    )
    _gaussian_contours(ax)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")


def plot_latent(
    model, x: torch.Tensor, labels, path, *, title: str | None = None, context=None
) -> Path:
    """Scatter of ``z = f(x)`` coloured by ``labels`` (e.g. which moon), with N(0, I) contours
    at radii 1, 2, 3 (dashed). ``context`` (N, C): ``z = f(x | c)`` of a conditional flow."""
    _check_2d(model, x)
    if labels is not None and len(labels) != x.shape[0]:
        raise ValueError(f"labels must have {x.shape[0]} entries like x, got {len(labels)}")
    path = _check_path(path)
    fig = Figure(figsize=(4.6, 4.6))
    ax = fig.add_subplot()
    _latent_axes(ax, model, x, labels, context=context)
    default = "latent z = f(x" + ("" if context is None else " | c") + ")"
    ax.set_title(title or default + "; N(0, I) contours at r = 1, 2, 3")
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    return _save(fig, path)


def _grid_lines(bounds, count: int = 11, points: int = 300) -> list[torch.Tensor]:
    """Horizontal and vertical lines covering ``bounds``; each line is a (points, 2) tensor."""
    x0, x1, y0, y1 = bounds
    lines = []
    along_x = torch.linspace(x0, x1, points)
    along_y = torch.linspace(y0, y1, points)
    for y in torch.linspace(y0, y1, count):
        lines.append(torch.stack([along_x, torch.full_like(along_x, float(y))], dim=1))
    for x in torch.linspace(x0, x1, count):
        lines.append(torch.stack([torch.full_like(along_y, float(x)), along_y], dim=1))
    return lines


def _draw_lines(ax, lines, transform=None) -> None:
    with torch.no_grad():
        pts = torch.cat(lines)
        # One call for all lines: per-call overhead dominates for short lines.
        mapped = (pts if transform is None else transform(pts)).numpy()
    start = 0
    for line in lines:
        seg = mapped[start : start + line.shape[0]]
        start += line.shape[0]
        ax.plot(seg[:, 0], seg[:, 1], color="0.55", lw=0.5, alpha=0.8)


@torch.no_grad()
def plot_figure1(model, x: torch.Tensor, path, *, num_samples: int = 2000, seed: int = 0) -> Path:
    """The four panels of the Real NVP paper's Figure 1.

    Top left, data x with grid lines; top right, z = f(x) with the grid mapped by f (inference);
    bottom left, g(z) of prior samples with the latent grid mapped by g (generation); bottom
    right, prior samples z ~ N(0, I) with latent grid lines.
    """
    _check_2d(model, x)
    path = _check_path(path)
    x = x[:num_samples]
    generator = torch.Generator().manual_seed(seed)
    z_prior = torch.randn(num_samples, 2, generator=generator)
    x_gen = model.g(z_prior)
    z_data = model.f(x)[0]
    bounds_x = data_bounds(x)
    bounds_z = (-3.0, 3.0, -3.0, 3.0)
    grid_x, grid_z = _grid_lines(bounds_x), _grid_lines(bounds_z)
    fig = Figure(figsize=(9, 8.4))
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0, 0], x, grid_x, None, "data $x \\sim \\hat p_X$", "#1f77b4"),
        (
            axes[0, 1],
            z_data,
            grid_x,
            lambda pts: model.f(pts)[0],
            "inference $z = f(x)$",
            "#1f77b4",
        ),
        (axes[1, 0], x_gen, grid_z, model.g, "generation $x = f^{-1}(z)$", "#ff7f0e"),
        (axes[1, 1], z_prior, grid_z, None, "latent $z \\sim p_Z = N(0, I)$", "#ff7f0e"),
    ]
    for ax, pts, grid, transform, title, color in panels:
        _draw_lines(ax, grid, transform)
        p = pts.numpy()
        ax.scatter(p[:, 0], p[:, 1], s=2, c=color, alpha=0.6, linewidths=0, zorder=3)
        ax.set_title(title)
    for ax in axes[0, 1], axes[1, 1]:
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
    for ax in axes[0, 0], axes[1, 0]:
        ax.set_xlim(bounds_x[0], bounds_x[1])
        ax.set_ylim(bounds_x[2], bounds_x[3])
    return _save(fig, path)


def plot_depth_sheet(
    models: dict,
    x_test: torch.Tensor,
    path,
    *,
    nll: dict | None = None,
    resolution: int = 160,
    points: int = 500,
) -> Path:
    """Density heatmaps of several models side by side (e.g. one per depth L).

    ``models`` maps a panel label (``"L=1"``) to a 2-D flow; ``nll`` optionally maps the same
    labels to a test NLL shown in the panel title.
    """
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict {label: model}")
    path = _check_path(path)
    bounds = data_bounds(x_test)
    n = len(models)
    fig = Figure(figsize=(3.2 * n, 3.3))
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, (label, model) in zip(axes, models.items()):
        _check_2d(model, x_test, "x_test")
        _density_axes(ax, model, x_test, bounds, resolution, points)
        title = label if nll is None or label not in nll else f"{label}: NLL {nll[label]:.3f}"
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def plot_latent_sheet(models: dict, x: torch.Tensor, labels, path) -> Path:
    """``z = f(x)`` of several models side by side, coloured by ``labels``."""
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict {label: model}")
    path = _check_path(path)
    n = len(models)
    fig = Figure(figsize=(3.2 * n, 3.4))
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, (label, model) in zip(axes, models.items()):
        _check_2d(model, x)
        _latent_axes(ax, model, x, labels)
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


@torch.no_grad()
def plot_samples(
    model, x_test: torch.Tensor, path, *, dims=(0, 1), num_samples: int = 2000, seed: int = 0
) -> Path:
    """Test points next to model samples, projected on two coordinates ``dims`` (any D)."""
    ensure_batch(x_test, "x_test")
    d = x_test.shape[1]
    if len(dims) != 2 or not all(isinstance(i, int) and 0 <= i < d for i in dims):
        raise ValueError(f"dims must be two feature indices in [0, {d}), got {dims!r}")
    path = _check_path(path)
    generator = torch.Generator().manual_seed(seed)
    samples = model.sample(num_samples, generator=generator).numpy()
    data = x_test[:num_samples].numpy()
    fig = Figure(figsize=(9, 4.4))
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, pts, title in ((axes[0], data, "test data"), (axes[1], samples, "model samples")):
        ax.scatter(pts[:, dims[0]], pts[:, dims[1]], s=2, alpha=0.5, linewidths=0)
        ax.set_title(title)
        ax.set_xlabel(f"$x_{{{dims[0] + 1}}}$")
        ax.set_ylabel(f"$x_{{{dims[1] + 1}}}$")
    lo = np.quantile(data, 0.005, axis=0)
    hi = np.quantile(data, 0.995, axis=0)
    pad = 0.15 * (hi - lo)
    axes[0].set_xlim(lo[dims[0]] - pad[dims[0]], hi[dims[0]] + pad[dims[0]])
    axes[0].set_ylim(lo[dims[1]] - pad[dims[1]], hi[dims[1]] + pad[dims[1]])
    return _save(fig, path)


# ----------------------------------------------------------------------------- conditional flows
def context_panels(
    c_train: torch.Tensor,
    c_test: torch.Tensor,
    x_test: torch.Tensor,
    *,
    labels: int | None = None,
    names=None,
    quantiles=(0.1, 0.5, 0.9),
    near: float = 0.1,
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Context values to draw a conditional flow at, each with the test points it explains.

    Args:
        c_train: (N_train, C) training contexts in data units; c_test (N_test, C) the test
            points' contexts, x_test (N_test, D) the test points.
        labels: for a one-hot label context, the number of labels K = C: one panel per label,
            its test points those with that label.
        names: optional names of the C context columns, for the titles.
        quantiles: for a continuous context, the quantiles of the training context shown; with
            C > 1 of its projection on the first principal component of the standardized
            training contexts, taking the training row at that quantile (a context that
            occurs, not a mix of per-column quantiles).
        near: for a continuous context, the fraction of test points nearest to each chosen
            context (standardized distance) shown as its data.

    Returns:
        ``[(title, context (C,), points (k, D))]``, one entry per panel.
    """
    ensure_batch(c_train, "c_train")
    ensure_batch(c_test, "c_test", c_train.shape[1])
    ensure_batch(x_test, "x_test")
    if x_test.shape[0] != c_test.shape[0]:
        raise ValueError(f"x_test must have {c_test.shape[0]} rows like c_test")
    width = c_train.shape[1]
    if labels is not None:
        if labels != width:
            raise ValueError(f"labels ({labels}) must equal the one-hot width C = {width}")
        which = c_test.argmax(dim=1)
        eye = torch.eye(width, dtype=c_train.dtype)
        return [(f"label {k}", eye[k], x_test[which == k]) for k in range(width)]
    if not 0 < near <= 1:
        raise ValueError(f"near must be in (0, 1], got {near}")
    c64 = c_train.double()
    mean, std = c64.mean(dim=0), c64.std(dim=0).clamp_min(1e-12)
    u = (c64 - mean) / std
    if width == 1:
        score = u[:, 0]
    else:
        # First principal direction of the standardized training contexts.
        score = u @ torch.linalg.svd(u - u.mean(dim=0), full_matrices=False)[2][0]
    order = torch.argsort(score)
    names = list(names) if names else [f"c{j + 1}" for j in range(width)]
    keep = max(1, round(near * c_test.shape[0]))
    u_test = (c_test.double() - mean) / std
    panels = []
    for q in quantiles:
        row = order[min(int(q * len(order)), len(order) - 1)]
        context = c_train[row]
        nearest = torch.argsort((u_test - u[row]).square().sum(dim=1))[:keep]
        values = ", ".join(f"{n}={float(v):.3g}" for n, v in zip(names, context))
        panels.append((f"q={q:.0%}: {values}", context, x_test[nearest]))
    return panels


def _panel_bounds(panels, dims) -> tuple[float, float, float, float]:
    pts = torch.cat([p for _, _, p in panels if p.shape[0]])[:, list(dims)]
    return data_bounds(pts)


@torch.no_grad()
def plot_conditional_samples(
    model,
    panels,
    path,
    *,
    dims=(0, 1),
    num_samples: int = 1000,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """One panel per context value: model samples x ~ p(x | c) over that context's data.

    ``panels`` as from :func:`context_panels`; coordinates ``dims`` of x are shown (any D).
    """
    if not isinstance(panels, list) or not panels:
        raise ValueError("panels must be a non-empty list of (title, context, points)")
    d = panels[0][2].shape[1]
    if len(dims) != 2 or not all(isinstance(i, int) and 0 <= i < d for i in dims):
        raise ValueError(f"dims must be two feature indices in [0, {d}), got {dims!r}")
    path = _check_path(path)
    bounds = _panel_bounds(panels, dims)
    n = len(panels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols, 3.4 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    generator = torch.Generator().manual_seed(seed)
    for i, (ax, (label, context, pts)) in enumerate(zip(axes, panels)):
        x = model.sample(num_samples, generator=generator, context=context).numpy()
        data = pts[:num_samples].numpy()
        ax.scatter(x[:, dims[0]], x[:, dims[1]], s=2, c=POINT_COLOR, alpha=0.35, linewidths=0)
        ax.scatter(data[:, dims[0]], data[:, dims[1]], s=3, c="k", alpha=0.6, linewidths=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
        ax.set_xlabel(f"$x_{{{dims[0] + 1}}}$")
        if i % cols == 0:
            ax.set_ylabel(f"$x_{{{dims[1] + 1}}}$")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title or "samples x ~ p(x | c) (red) and the data of that context (black)")
    return _save(fig, path)


def plot_conditional_density(
    model, panels, path, *, resolution: int = 160, points: int = 500, title: str | None = None
) -> Path:
    """One heatmap of p(x | c) per context value, with (up to ``points``) of its data on top.

    D = 2; ``panels`` as from :func:`context_panels`.
    """
    if not isinstance(panels, list) or not panels:
        raise ValueError("panels must be a non-empty list of (title, context, points)")
    for _, _, pts in panels:
        if pts.shape[0]:
            _check_2d(model, pts, "points")
    path = _check_path(path)
    bounds = _panel_bounds(panels, (0, 1))
    n = len(panels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 3.3 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax, (label, context, pts) in zip(axes, panels):
        _density_axes(ax, model, pts, bounds, resolution, points, context=context)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title or "model density p(x | c) with that context's test points")
    return _save(fig, path)
