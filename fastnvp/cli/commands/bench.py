"""``fastnvp bench``: fastnvp vs the eager reference, torch.compile and peer libraries."""

from __future__ import annotations

import argparse

from fastnvp.cli.commands._training_options import int_list as _int_list
from fastnvp.cli.commands._training_options import (
    nonnegative_int,
    positive_float,
    positive_int,
)

HELP = "benchmark fastnvp vs the reference, torch.compile and peers; write JSON, table, plots"

#: Measurement settings whose options default to None (so --from-json can tell them given),
#: with the values a run uses when they are not given.
_MEASUREMENT_DEFAULTS = {"device": "cpu", "dtype": "float32", "threads": 2}


_PROVIDERS = ("fastnvp", "reference", "torch.compile", "nflows", "normflows", "zuko", "FrEIA")
_WORKLOADS = ("log_prob", "sample", "train", "inverse")


def _str_list(allowed: tuple[str, ...] | None):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if allowed is not None:
            bad = [v for v in values if v.split("[", 1)[0] not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastnvp bench``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the quick preset (L=1,8, B=1024; about 3 min); with --preset conditional the "
        "conditional-quick preset",
    )
    parser.add_argument(
        "--preset",
        choices=("quick", "main", "full", "grid", "conditional", "conditional-quick"),
        default=None,
        help="main: L=50 D=2 H=256 B=4096; full: main + sweeps of L, D, H, B; grid: "
        "D=2,5,16,64 x H=32,64,256 x B=16,256,1024,4096 x L=8,50 (96 shapes; train, log_prob, "
        "sample; fastnvp, reference, zuko, FrEIA), written as a table and ratio heatmaps; "
        "conditional: conditional flows p(x | c), D=2,8,16 x C=1,8 x B=256,4096 x H=64,256 at "
        "L=8 plus L=50 D=2 C=8 B=1024 H=256 (25 shapes; train, log_prob, sample with one "
        "sample per context row; fastnvp, reference, zuko, nflows, FrEIA; about 6-8 min on 2 "
        "idle cores); "
        "conditional-quick: D=2,8 x C=1,8 at B=256 L=8 H=64 (under a minute) (default main)",
    )
    parser.add_argument(
        "--grid-sample",
        type=positive_int,
        default=None,
        metavar="N",
        help="grid preset: run only the first N shapes (N >= 4) of its cover-first order. The "
        "order is greedy: each next shape adds the most axis values not yet in it, then the "
        "most new value pairs of two axes, then triples; ties by --grid-seed. The first 4 "
        "shapes contain every value of every axis. Default: the whole grid in that order, and "
        "with --max-minutes shapes start in that order until the budget is spent, so a budget "
        "that fits runs the full grid and a smaller one a cover-first prefix. The result JSON "
        "records the rule, seed, sample and coverage under 'grid'",
    )
    parser.add_argument(
        "--grid-seed",
        type=nonnegative_int,
        default=None,
        help="grid preset: tie-break seed of the shape order (default 0)",
    )
    parser.add_argument("--layers", type=_int_list, help="custom sweep: depths L, e.g. 8,50")
    parser.add_argument("--dim", type=_int_list, help="custom sweep: data dimensions D")
    parser.add_argument("--hidden", type=_int_list, help="custom sweep: hidden widths H")
    parser.add_argument("--batch", type=_int_list, help="custom sweep: batch sizes B")
    parser.add_argument(
        "--context",
        type=_int_list,
        help="custom sweep: context widths C (conditional flows p(x | c); default unconditional)",
    )
    parser.add_argument(
        "--providers",
        type=_str_list(_PROVIDERS),
        default=None,
        help="comma-separated; fastnvp[k=v,...] passes FastRealNVP options (default: all)",
    )
    parser.add_argument(
        "--workloads", type=_str_list(_WORKLOADS), default=None, help="comma-separated subset"
    )
    # device, dtype and threads default to None so --from-json can tell them given.
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help=f"(default {_MEASUREMENT_DEFAULTS['device']})",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64", "bfloat16"),
        default=None,
        help=f"(default {_MEASUREMENT_DEFAULTS['dtype']})",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help=f"torch.set_num_threads (default {_MEASUREMENT_DEFAULTS['threads']})",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="timed rounds per workload"
    )
    parser.add_argument(
        "--compile-max-layers",
        type=nonnegative_int,
        default=None,
        help="skip torch.compile above this depth (its cold compile grows with L)",
    )
    parser.add_argument(
        "--max-minutes",
        type=positive_float,
        default=None,
        help="start no further configuration after this many minutes (the rest is listed)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<machine>)"
    )
    parser.add_argument("--name", default=None, help="file stem (default: the preset name)")
    parser.add_argument(
        "--readme",
        default=None,
        help="also rewrite this README's section between <!-- bench:start/end --> markers",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="do not measure: regenerate table, plots (and --readme) from a results file",
    )


def _resolve_defaults(args) -> None:
    """Fill the measurement settings not given with :data:`_MEASUREMENT_DEFAULTS`."""
    for name, value in _MEASUREMENT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _plan(args):
    import dataclasses
    import itertools

    from fastnvp.bench import harness

    _resolve_defaults(args)
    sweep = (args.layers, args.dim, args.hidden, args.batch, args.context)
    custom = any(v is not None for v in sweep)
    if custom and (args.preset is not None or args.quick):
        given = [
            flag
            for flag, value in zip(("--layers", "--dim", "--hidden", "--batch", "--context"), sweep)
            if value is not None
        ]
        preset = "--quick" if args.quick else f"--preset {args.preset}"
        raise ValueError(
            f"{preset} runs its own shapes; {', '.join(given)} make a custom sweep: give one or "
            "the other"
        )
    if custom and (args.grid_sample is not None or args.grid_seed is not None):
        raise ValueError("--grid-sample/--grid-seed need --preset grid, not a custom sweep")
    if args.quick and args.preset not in (None, "quick", "conditional", "conditional-quick"):
        raise ValueError(
            f"--quick is the quick preset (or, with --preset conditional, conditional-quick); "
            f"it does not combine with --preset {args.preset}"
        )
    if args.quick and args.preset in ("conditional", "conditional-quick"):
        name = "conditional-quick"
    else:
        name = "quick" if args.quick else (args.preset or ("custom" if custom else "main"))
    if custom:
        settings = harness.Settings(threads=args.threads)
        plan = harness.Plan(name)
        for layers, dim, hidden, batch, context in itertools.product(
            args.layers or (8,),
            args.dim or (2,),
            args.hidden or (256,),
            args.batch or (4096,),
            args.context or (None,),
        ):
            cfg = harness.BenchConfig(
                layers, dim, hidden, batch, args.device, args.dtype, context=context
            )
            plan.entries.append((cfg, settings))
    else:
        grid = {}
        if args.grid_sample is not None:
            grid["grid_sample"] = args.grid_sample
        if args.grid_seed is not None:
            grid["grid_seed"] = args.grid_seed
        if grid and name != "grid":
            raise ValueError(f"--grid-sample/--grid-seed need --preset grid, not {name!r}")
        plan = harness.preset(name, args.device, args.dtype, args.threads, **grid)
    overrides = {}
    if args.providers is not None:
        overrides["providers"] = args.providers
    if args.workloads is not None:
        overrides["workloads"] = args.workloads
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.compile_max_layers is not None:
        overrides["compile_max_layers"] = args.compile_max_layers
    if overrides:
        plan.entries = [
            (cfg, dataclasses.replace(settings, **overrides)) for cfg, settings in plan.entries
        ]
    return plan


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or regenerate reports) and print where the files are."""
    import json
    import os

    from fastnvp.bench import harness, report

    if args.from_json is not None:
        measuring = {
            "--preset": args.preset, "--quick": args.quick or None,
            "--grid-sample": args.grid_sample, "--grid-seed": args.grid_seed,
            "--layers": args.layers, "--dim": args.dim, "--hidden": args.hidden,
            "--batch": args.batch, "--context": args.context, "--providers": args.providers,
            "--workloads": args.workloads, "--device": args.device, "--dtype": args.dtype,
            "--threads": args.threads, "--repeats": args.repeats,
            "--compile-max-layers": args.compile_max_layers, "--max-minutes": args.max_minutes,
        }  # fmt: skip
        given = [flag for flag, value in measuring.items() if value is not None]
        if given:
            raise ValueError(
                f"--from-json regenerates the reports of a finished run; {', '.join(given)} "
                "would change a measurement it does not make"
            )
    _resolve_defaults(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.readme is not None:
        report.check_section(args.readme, "bench")  # before a run, not after it
    if args.from_json is not None:
        if not os.path.isfile(args.from_json):
            raise ValueError(f"--from-json {args.from_json!r} is not a file")
        doc = report.load(args.from_json)
        out = args.out or os.path.dirname(os.path.abspath(args.from_json))
        name = args.name or os.path.splitext(os.path.basename(args.from_json))[0]
    else:
        plan = _plan(args)
        out = args.out or os.path.join(
            "benchmarks", "results", harness.machine_name(args.device, args.threads)
        )
        name = args.name or plan.name
        os.makedirs(out, exist_ok=True)

        def checkpoint(partial: dict) -> None:
            with open(os.path.join(out, name + ".partial.json"), "w") as fh:
                json.dump(partial, fh, indent=1)

        doc = harness.run(
            plan, harness.command_line(), max_minutes=args.max_minutes, checkpoint=checkpoint
        )
        partial = os.path.join(out, name + ".partial.json")
        if os.path.exists(partial):
            os.remove(partial)
    paths = report.write_all(doc, out, name, readme=args.readme)
    for line in report.summary_lines(doc):
        print(line)
    for path in paths:
        print(f"wrote {path}")
    return 0
