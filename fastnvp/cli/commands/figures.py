"""``fastnvp figures``: density, latent space, Figure 1 panels and loss curves of a run.

A conditional run gets the loss curves, samples per context value over that context's data
(``samples_by_context.png``: one panel per label, or the 10/50/90 % quantiles of a continuous
context) and, for D = 2, ``density_by_context.png`` and the latent space ``z = f(x | c)``.
"""

from __future__ import annotations

import argparse

HELP = "draw the figures of a trained run (density, latent, Figure 1, losses; per context)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastnvp figures``."""
    parser.add_argument("run", metavar="RUN", help="run directory (or its checkpoint.pt)")
    parser.add_argument("--out", default=None, help="figure directory (default RUN/figures)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastnvp.analysis.viz import (
        context_panels,
        plot_conditional_density,
        plot_conditional_samples,
        plot_density,
        plot_figure1,
        plot_latent,
        plot_losses,
        plot_samples,
    )
    from fastnvp.cli.commands._training_options import check_out_dir
    from fastnvp.training.train import load_run, prepare_data

    # RUN may name the checkpoint file itself: the figures then go next to it.
    run_dir = Path(args.run).parent if Path(args.run).is_file() else Path(args.run)
    out = Path(args.out) if args.out else run_dir / "figures"
    check_out_dir(str(out), "--out" if args.out else "RUN's figures directory")
    model, config, payload = load_run(args.run)
    split = prepare_data(config)
    label = f"L={config.layers}"
    written = [plot_losses({label: payload["history"]}, out / "losses.png")]
    labels = split.y_test[:3000] if split.y_test is not None else None
    if model.context_features is not None:
        info = payload["context"]
        panels = context_panels(
            split.c_train,
            split.c_test,
            split.x_test,
            labels=info["labels"] if info["kind"] == "label" else None,
            names=info.get("names"),
        )
        written.append(plot_conditional_samples(model, panels, out / "samples_by_context.png"))
        if split.dim == 2:
            written += [
                plot_conditional_density(model, panels, out / "density_by_context.png"),
                plot_latent(
                    model,
                    split.x_test[:3000],
                    labels,
                    out / "latent.png",
                    context=split.c_test[:3000],
                ),
            ]
    elif split.dim == 2:
        written += [
            plot_density(model, split.x_test, out / "density.png", title=f"p(x), {label}"),
            plot_latent(model, split.x_test[:3000], labels, out / "latent.png"),
            plot_figure1(model, split.x_test, out / "figure1.png"),
        ]
    else:
        written.append(plot_samples(model, split.x_test, out / "samples.png"))
    for path in written:
        print(path)
    return 0
