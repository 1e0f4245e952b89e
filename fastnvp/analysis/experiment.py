"""The depth study of the seed report: one flow per depth L, test NLL and latent Gaussianity vs L.

``run_depth_study`` trains (or reuses / resumes) ``out/L{L}`` for every depth, then writes to
``report_dir``:

- ``depth_density.png``: the density of every depth side by side (the seed's Figure 2);
- ``depth_latent.png``: ``z = f(x_test)`` of every depth, coloured by component (Figure 4);
- ``depth_losses.png``: training and test curves of all depths in one plot (Figure 3);
- ``figure1.png``, ``density.png``, ``latent.png``: the deepest model alone;
- ``depth_table.md`` and ``depth_table.json``: test NLL and Gaussianity per depth.

A finished run whose stored config equals the requested one is reused; an unfinished one is
resumed, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

from fastnvp.training.train import CHECKPOINT, TrainConfig, load_checkpoint, load_run, train

DEFAULT_DEPTHS = (1, 2, 4, 8, 16, 50)

# Differential entropy of two moons with noise 0.05, in nats (data units), from
# ``fastnvp.training.data.moons_entropy(0.05, num_samples=200_000, seed=12345)``: Monte Carlo of
# -E[log p(x)] with the exact mixture density by quadrature (1024 angles per moon).
MOONS_ENTROPY = {0.05: (0.28650, 0.00163)}


def check_depths(depths) -> tuple[int, ...]:
    """Validate a non-empty sequence of distinct positive ints; returns it sorted."""
    if isinstance(depths, (str, bytes)) or not hasattr(depths, "__iter__"):
        raise TypeError(f"depths must be a sequence of ints, got {type(depths).__name__}")
    depths = tuple(depths)
    if not depths:
        raise ValueError("depths must not be empty")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"depths must be ints >= 1, got {d!r}")
    if len(set(depths)) != len(depths):
        raise ValueError(f"depths must be distinct, got {depths}")
    return tuple(sorted(depths))


def reference_entropy(config: TrainConfig) -> dict | None:
    """The data's differential entropy (nats) when it is known: two moons only."""
    if config.data is not None or config.dataset != "moons":
        return None
    noise = 0.05 if config.noise is None else float(config.noise)
    if noise in MOONS_ENTROPY:
        value, se = MOONS_ENTROPY[noise]
        samples = 200_000
    else:
        from fastnvp.training.data import moons_entropy

        samples = 50_000
        value, se = moons_entropy(noise, num_samples=samples)
    return {
        "value": value,
        "standard_error": se,
        "method": (
            f"Monte Carlo over {samples} samples of -log p(x), p the exact two-moons mixture "
            f"density (noise {noise}) by quadrature over the angle"
        ),
    }


def _same_settings(stored: dict, config: TrainConfig) -> bool:
    """Whether a run's stored config is ``config``. A relative ``data`` path (a run holds the
    path its caller gave; the CLI gives it resolved) counts as resolved from the current
    directory, where a study reusing its runs is started."""
    stored = dict(stored)
    if stored.get("data") is not None:
        stored["data"] = str(Path(stored["data"]).expanduser().resolve())
    return stored == config.to_dict()


def _train_or_reuse(config: TrainConfig, run_dir: Path, progress: bool, log) -> None:
    if (run_dir / CHECKPOINT).is_file():
        payload = load_checkpoint(run_dir)
        if _same_settings(payload["config"], config):
            if payload["step"] >= config.steps:
                log(f"L={config.layers}: reusing finished run {run_dir}")
                return
            log(f"L={config.layers}: resuming {run_dir} at step {payload['step']}")
            train(config, run_dir, resume=True, progress=progress)
            return
        log(f"L={config.layers}: {run_dir} holds a run with other settings; training anew")
    # The study owns its run directories: a run with other settings is replaced.
    train(config, run_dir, overwrite=True, progress=progress)


def _format_row(row: dict, entropy: dict | None) -> str:
    g = row["gaussianity"]
    ks = g["ks"]
    ks_text = " / ".join(f"{v:.3f}" for v in ks) if len(ks) <= 4 else f"max {max(ks):.3f}"
    gap = "" if entropy is None else f" {row['test_nll'] - entropy['value']:+.3f} |"
    return (
        f"| {row['layers']} | {row['parameters']:,} | {row['test_nll']:.3f} |{gap} {ks_text} | "
        f"{g['mean_norm']:.3f} | {g['cov_err']:.3f} | {row['train_seconds']:.0f} |"
    )


def markdown_table(rows: list[dict], entropy: dict | None) -> str:
    """The depth table in GitHub markdown (one row per depth)."""
    gap_head = "" if entropy is None else " NLL − H |"
    gap_rule = "" if entropy is None else "---:|"
    lines = [
        f"| L | parameters | test NLL (nats) |{gap_head} KS per dim | ‖mean‖ | ‖cov − I‖_F "
        "| train s |",
        f"|---:|---:|---:|{gap_rule}---|---:|---:|---:|",
    ]
    lines += [_format_row(row, entropy) for row in rows]
    return "\n".join(lines) + "\n"


def run_depth_study(
    out,
    base: TrainConfig,
    depths=DEFAULT_DEPTHS,
    *,
    report_dir=None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train every depth and write the figures and tables; returns the JSON summary.

    Args:
        out: directory of the runs (``out/L{L}`` each).
        base: settings shared by all depths (its ``layers`` is replaced by each depth).
        depths: the depths L to train.
        report_dir: where figures and tables go (default ``out``).
        progress: tqdm bars while training.
        log: where progress messages go.
    """
    if not isinstance(base, TrainConfig):
        raise TypeError(f"base must be a TrainConfig, got {type(base).__name__}")
    base.validate()
    depths = check_depths(depths)
    out = Path(out)
    report = Path(report_dir) if report_dir is not None else out
    report.mkdir(parents=True, exist_ok=True)
    for layers in depths:
        config = dataclasses.replace(base, layers=layers)
        _train_or_reuse(config, out / f"L{layers}", progress, log)

    from fastnvp.analysis.viz import (
        plot_density,
        plot_depth_sheet,
        plot_figure1,
        plot_latent,
        plot_latent_sheet,
        plot_losses,
        plot_samples,
    )
    from fastnvp.training.train import prepare_data, run_metrics

    split = prepare_data(base)
    models, histories, rows = {}, {}, []
    for layers in depths:
        model, config, payload = load_run(out / f"L{layers}")
        label = f"L={layers}"
        models[label] = model
        histories[label] = payload["history"]
        rows.append(run_metrics(model, config, split, payload["history"], payload["elapsed"]))
        if not math.isfinite(rows[-1]["test_nll"]):
            raise FloatingPointError(f"test NLL of L={layers} is {rows[-1]['test_nll']}")
    entropy = reference_entropy(base)
    deepest = models[f"L={depths[-1]}"]
    figures = {"depth_losses": plot_losses(histories, report / "depth_losses.png")}
    if split.dim == 2:
        nll = {f"L={r['layers']}": r["test_nll"] for r in rows}
        figures["depth_density"] = plot_depth_sheet(
            models, split.x_test, report / "depth_density.png", nll=nll
        )
        figures["depth_latent"] = plot_latent_sheet(
            models,
            split.x_test[:2000],
            split.y_test[:2000] if split.y_test is not None else None,
            report / "depth_latent.png",
        )
        figures["figure1"] = plot_figure1(deepest, split.x_test, report / "figure1.png")
        figures["density"] = plot_density(
            deepest, split.x_test, report / "density.png", title=f"p(x), L={depths[-1]}"
        )
        figures["latent"] = plot_latent(
            deepest,
            split.x_test[:3000],
            split.y_test[:3000] if split.y_test is not None else None,
            report / "latent.png",
            title=f"z = f(x_test), L={depths[-1]}; N(0, I) contours r = 1, 2, 3",
        )
    else:
        figures["samples"] = plot_samples(deepest, split.x_test, report / "samples.png")
    summary = {
        "base_config": {k: v for k, v in base.to_dict().items() if k != "layers"},
        "depths": list(depths),
        "entropy": entropy,
        "rows": rows,
        "figures": {k: Path(v).name for k, v in figures.items()},
    }
    (report / "depth_table.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown_table(rows, entropy)
    (report / "depth_table.md").write_text(table)
    summary["table"] = table
    summary["report_dir"] = str(report)
    return summary
