"""``fastnvp train``: fit a Real NVP to a toy or user data set, with checkpoints and resume.

Data-parallel across processes: ``torchrun --nproc_per_node=N -m fastnvp train ...`` (or
``--no-python fastnvp`` in place of ``-m fastnvp`` to start the ``fastnvp`` script: without
``--no-python`` torchrun hands ``fastnvp`` to Python as a file path); ``--batch`` is the global
batch, split evenly across the N ranks; rank 0 alone prints and writes the run directory.

Conditional flows p(x | c): ``--context label`` conditions a toy data set on its label (one-hot),
``--data FILE --context-columns 2,3`` takes those columns of the file as c and the rest as x.
"""

from __future__ import annotations

import argparse

from fastnvp.cli.commands._training_options import (
    add_context_options,
    add_data_options,
    add_optim_options,
    check_out_dir,
    config_from_args,
    positive_int,
    set_threads,
)

HELP = "train a Real NVP on a toy data set or your own .npy/.csv (checkpoints, exact resume)"
#: The optimizer options' defaults; --steps alone defaults to None in the namespace, so that
#: --resume without it keeps the run's own length (:func:`_resolve_steps`).
DEFAULTS = {"hidden": 256, "steps": 5000, "batch": 256, "lr": 1e-3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastnvp train``."""
    parser.add_argument("--out", required=True, help="run directory, e.g. runs/moons50")
    parser.add_argument(
        "--layers", type=positive_int, default=50, help="coupling layers L (default 50)"
    )
    add_data_options(parser)
    add_context_options(parser)
    add_optim_options(parser, defaults=DEFAULTS)
    parser.set_defaults(steps=None)  # resolved in run(): DEFAULTS, or the resumed run's own
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (its stored settings apply, its "
        "step count too unless --steps extends it); not with --overwrite",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (without it, an existing run is an error); "
        "not with --resume",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where to train (default cpu); under torchrun: gloo on cpu, nccl on cuda "
        "(one GPU per local rank)",
    )


def _resolve_steps(args: argparse.Namespace) -> None:
    """--steps not given: the default for a new run; with --resume the run's own length (the
    default would silently extend a finished run to 5000 steps)."""
    if args.steps is not None:
        return
    args.steps = DEFAULTS["steps"]
    if args.resume:
        from fastnvp.training.checkpoint import CheckpointError
        from fastnvp.training.train import load_checkpoint

        try:
            args.steps = int(load_checkpoint(args.out)["config"]["steps"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            pass  # train() reports the missing or unreadable checkpoint


def run(args: argparse.Namespace) -> int:
    _resolve_steps(args)
    config = config_from_args(args, args.layers)
    check_out_dir(args.out)
    set_threads(args)
    import torch

    from fastnvp.training import distributed
    from fastnvp.training.train import train

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use --device cpu"
        )
    try:
        world = distributed.init(args.device)
    except RuntimeError as exc:
        if args.device != "cuda":
            raise
        raise ValueError(f"--device cuda: {exc}") from exc
    try:
        result = train(
            config,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            world=world,
        )
    finally:
        distributed.shutdown(world)
    if not world.is_main:
        return 0
    metrics = result.metrics
    print(f"run: {args.out}  step {result.step}/{result.config.steps}")
    if metrics is not None:
        g = metrics["gaussianity"]
        ks = ", ".join(f"{v:.3f}" for v in g["ks"][:8])
        given = " given the context" if "context" in metrics else ""
        print(f"test NLL{given} {metrics['test_nll']:.4f} nats/sample (data units)")
        print(f"latent: |mean| {g['mean_norm']:.3f}  |cov - I|_F {g['cov_err']:.3f}  KS [{ks}]")
    return 0
