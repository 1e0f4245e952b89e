"""NPE with fastnvp's Real NVP against sbi's default density estimator, on a linear Gaussian.

Task: theta ~ N(0, I_D), x = theta + N(0, sigma^2 I_D), whose posterior is exactly
N(x_o / (1 + sigma^2), sigma^2 / (1 + sigma^2) I_D). Per seed both estimators train on the
same simulations (sbi's ``NPE(...).train()``, early stopping on sbi's validation split), and
posterior samples at the same observation x_o (itself simulated from the prior) are compared
with exact posterior samples by C2ST (``sbi.utils.metrics.c2st``, a random forest; 0.5 is
indistinguishable). Recorded per seed: C2ST, training wall time, epochs, time per epoch and the
time to draw posterior samples through ``posterior.sample``.

Writes ``docs/sbi/npe_linear_gaussian.json`` (machine, versions, settings, one row per seed
and estimator), ``docs/sbi/npe_linear_gaussian.md`` (the tables) and the table block of
``docs/sbi.md``. Usage::

    python benchmarks/sbi_npe.py                 # 5 seeds, 2000 simulations, D = 2
    python benchmarks/sbi_npe.py --fastnvp 8,64  # one fastnvp configuration
    python benchmarks/sbi_npe.py --seeds 2 --num-simulations 1000   # a quick look
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import torch
from sbi.inference import NPE
from sbi.utils.metrics import c2st
from torch.distributions import MultivariateNormal

from fastnvp.bench.harness import environment, load_average
from fastnvp.integrations.sbi import realnvp_nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "sbi"
DOC = ROOT / "docs" / "sbi.md"
BEGIN, END = "<!-- sbi-npe:begin -->", "<!-- sbi-npe:end -->"
NAME = "npe_linear_gaussian"

# sbi's default for NPE(prior) in the installed version: the `density_estimator` default.
SBI_DEFAULT = inspect.signature(NPE).parameters["density_estimator"].default


def estimators(configs: list[tuple[int, int]]) -> dict:
    """Label -> the ``density_estimator`` argument of NPE: fastnvp per (L, H), sbi's default."""
    out = {
        f"fastnvp realnvp_nn (L={layers}, H={hidden})": realnvp_nn(num_layers=layers, hidden=hidden)
        for layers, hidden in configs
    }
    out[f"sbi default ('{SBI_DEFAULT}')"] = SBI_DEFAULT
    return out


def layers_hidden(text: str) -> tuple[int, int]:
    """``"L,H"`` -> (L, H)."""
    try:
        layers, hidden = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected L,H (two ints), got {text!r}") from None
    return layers, hidden


def simulate(num: int, dim: int, sigma: float, seed: int):
    """Prior, theta (num, dim), x (num, dim), x_o (dim,), exact posterior at x_o."""
    g = torch.Generator().manual_seed(seed)
    prior = MultivariateNormal(torch.zeros(dim), torch.eye(dim))
    theta = torch.randn(num, dim, generator=g)
    x = theta + sigma * torch.randn(num, dim, generator=g)
    x_o = torch.randn(dim, generator=g) * (1.0 + sigma**2) ** 0.5
    var = sigma**2 / (1.0 + sigma**2)
    exact = MultivariateNormal(x_o / (1.0 + sigma**2), var * torch.eye(dim))
    return prior, theta, x, x_o, exact


def run_one(label, estimator, data, args, seed: int) -> dict:
    """Train NPE with one estimator on one seed's simulations; time it and score it."""
    prior, theta, x, x_o, exact = data
    torch.manual_seed(seed)  # sbi's train/validation split and batches
    inference = NPE(prior, density_estimator=estimator, show_progress_bars=False)
    inference.append_simulations(theta, x)
    start = time.perf_counter()
    inference.train(max_num_epochs=args.max_epochs, training_batch_size=args.batch_size)
    train_s = time.perf_counter() - start
    posterior = inference.build_posterior()
    start = time.perf_counter()
    samples = posterior.sample((args.num_samples,), x=x_o, show_progress_bars=False)
    sample_s = time.perf_counter() - start
    reference = exact.sample((args.num_samples,))
    summary = inference._summary
    epochs = int(summary["epochs_trained"][-1])
    return {
        "estimator": label,
        "seed": seed,
        "c2st": float(c2st(samples, reference, seed=seed)),
        "train_s": train_s,
        "epochs": epochs,
        "s_per_epoch": train_s / max(epochs, 1),
        "sample_s": sample_s,
        "best_validation_loss": float(summary["best_validation_loss"][-1]),
        "parameters": sum(p.numel() for p in inference._neural_net.parameters()),
        "load_average": load_average(),
    }


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for label in dict.fromkeys(r["estimator"] for r in rows):
        mine = [r for r in rows if r["estimator"] == label]
        out.append(
            {
                "estimator": label,
                "seeds": len(mine),
                "parameters": mine[0]["parameters"],
                **{
                    key: spread([r[key] for r in mine])
                    for key in ("c2st", "train_s", "epochs", "s_per_epoch", "sample_s")
                },
            }
        )
    return out


def _cell(s: dict, fmt: str) -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}, {s['max']:{fmt}}]"


def markdown_summary(doc: dict) -> str:
    st = doc["settings"]
    lines = [
        f"Linear Gaussian, D = {st['dim']}, sigma = {st['sigma']}, {st['num_simulations']} "
        f"simulations, {st['seeds']} seeds, {st['num_samples']} posterior samples for C2ST; "
        f"{doc['machine']['cpu_model']}, {st['threads']} torch threads; sbi "
        f"{doc['versions'].get('sbi')}, torch {doc['versions']['torch']}. Median [min, max] "
        "over seeds.",
        "",
        "| estimator | parameters | C2ST | train (s) | epochs | s / epoch | sample (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in doc["summary"]:
        lines.append(
            f"| {s['estimator']} | {s['parameters']} | {_cell(s['c2st'], '.3f')} | "
            f"{_cell(s['train_s'], '.1f')} | {_cell(s['epochs'], '.0f')} | "
            f"{_cell(s['s_per_epoch'], '.3f')} | {_cell(s['sample_s'], '.2f')} |"
        )
    lines += ["", f"Reproduce: `{doc['command']}`"]
    return "\n".join(lines) + "\n"


def markdown(doc: dict) -> str:
    lines = ["# NPE on a linear Gaussian: fastnvp against sbi's default", "", markdown_summary(doc)]
    lines += [
        "## Per seed",
        "",
        "| seed | estimator | C2ST | train (s) | epochs | sample (s) | best val. loss |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['seed']} | {r['estimator']} | {r['c2st']:.3f} | {r['train_s']:.1f} | "
            f"{r['epochs']} | {r['sample_s']:.2f} | {r['best_validation_loss']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def update_doc(table: str) -> None:
    """Replace the block between the markers of docs/sbi.md with ``table``."""
    if not DOC.exists():
        return
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num-simulations", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument(
        "--fastnvp",
        type=layers_hidden,
        action="append",
        metavar="L,H",
        help="a realnvp_nn(num_layers=L, hidden=H) to run (repeatable; default 8,64 and 6,48)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    configs = args.fastnvp or [(8, 64), (6, 48)]

    torch.set_num_threads(args.threads)
    rows = []
    for seed in range(args.seeds):
        data = simulate(args.num_simulations, args.dim, args.sigma, seed)
        # Both estimators per seed, one after the other, so a change of load hits both.
        for label, estimator in estimators(configs).items():
            row = run_one(label, estimator, data, args, seed)
            rows.append(row)
            print(
                f"seed {seed} {label}: C2ST {row['c2st']:.3f}, train {row['train_s']:.1f} s "
                f"({row['epochs']} epochs), sample {row['sample_s']:.2f} s",
                flush=True,
            )

    from importlib import metadata

    env = environment("cpu", args.threads)
    env["versions"]["sbi"] = metadata.version("sbi")
    command = (
        "python benchmarks/sbi_npe.py"
        + "".join(
            f" --{key.replace('_', '-')} {value}"
            for key, value in vars(args).items()
            if key not in ("out", "fastnvp") and value != parser.get_default(key)
        )
        + "".join(f" --fastnvp {layers},{hidden}" for layers, hidden in args.fastnvp or [])
    )
    doc = {
        **env,
        "command": command,
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "fastnvp")},
            "fastnvp_configs": configs,
            "sbi_default_estimator": SBI_DEFAULT,
        },
        "rows": rows,
        "summary": summarise(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(markdown(doc))
    if args.out == OUT:
        update_doc(markdown_summary(doc))
    print(markdown_summary(doc))
    return doc


if __name__ == "__main__":
    main()
