"""Does ActNorm help deep stacks? 50-layer flows with and without it, on moons and digits.

``fastnvp experiment norm-depth`` (docs/digits.md, "ActNorm at depth"). For each data set the
same ``FastRealNVP.standard(D, 50, H)`` is trained twice from the same initial couplings, once
plain and once with ``norm="actnorm"`` (docs/design.md §1.8), with the same optimizer, batches
and steps (``fastnvp.analysis.density_training``). Convergence is compared by

- the validation NLL at every evaluation (the curves, ``norm_depth.png``);
- steps to target: the first evaluated step at which each run's validation NLL is within
  ``margin`` nats of the better of the two best values (a run that never gets there has None).

"No slower to converge" means ActNorm's steps to target are <= the plain stack's. At 200
layers the same pair is trained on moons for a few hundred steps at a tenth of the learning
rate (at 1e-3 neither 200-layer stack trained stably in a trial run): every loss must stay
finite, and the first interval's training NLL shows what 200 randomly initialized couplings
do with and without a normalization. Moons is
standardized two moons (noise 0.05), NLL in nats per point of the standardized data; digits
use the study's transform (nats per image).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastnvp.analysis.density_training import Candidate, Data, TrainSettings, train_candidate
from fastnvp.core.interleave import copy_couplings


@dataclasses.dataclass(frozen=True)
class NormDepthConfig:
    """Sizes of the study; the defaults are the committed run."""

    layers: int = 50
    hidden: int = 64
    deep_layers: int = 200
    deep_steps: int = 500
    deep_lr: float = 1e-4
    margin: float = 0.05
    digits_margin: float = 2.0
    moons: TrainSettings = TrainSettings(steps=1500, batch=256, eval_every=50, patience=100)
    digits: TrainSettings = TrainSettings(steps=1500, batch=128, eval_every=50, patience=100)

    @classmethod
    def quick(cls) -> NormDepthConfig:
        small = TrainSettings(steps=20, batch=64, eval_every=5, patience=100)
        return cls(layers=4, hidden=8, deep_layers=12, deep_steps=10, moons=small, digits=small)


def _moons() -> Data:
    from fastnvp.training.data import two_moons

    x, _ = two_moons(12_000, noise=0.05, seed=0)
    x = torch.from_numpy(x)
    mean, std = x[:10_000].mean(0), x[:10_000].std(0)
    x = (x - mean) / std
    return Data(x[:10_000], x[10_000:11_000], x[11_000:])


def _candidate(dim: int, layers: int, hidden: int, norm, permutation=None) -> Candidate:
    from fastnvp.flows.fast_realnvp import FastRealNVP

    torch.manual_seed(0)  # the same couplings with and without the norm layers
    couplings = FastRealNVP.standard(dim, layers, hidden)
    model = FastRealNVP.standard(dim, layers, hidden, norm=norm, permutation=permutation)
    copy_couplings(couplings, model)  # not the masks: a permutation brings half masks
    name = (
        f"L={layers}"
        + (f" + {norm}" if norm else "")
        + (f" + {permutation}" if permutation else "")
    )
    count = sum(p.numel() for p in model.parameters())
    return Candidate(name, model, model.log_prob, model.sample, count, count, name)


def steps_to_target(history: dict, target: float) -> int | None:
    """First evaluated step with validation NLL <= target (None if never)."""
    for step, value in zip(history["step"], history["val_nll"]):
        if value <= target:
            return step
    return None


def _compare(data, dim, config, settings, transform, margin, progress, log) -> dict:
    runs = {}
    for norm in (None, "actnorm"):
        cand = _candidate(dim, config.layers, config.hidden, norm)
        result = train_candidate(cand, data, settings, transform, progress=progress, log=log)
        runs[norm or "plain"] = result.to_dict()
        log(f"{cand.name}: best val {result.best_val_nll:.3f} at step {result.best_step}")
    target = min(r["best_val_nll"] for r in runs.values()) + margin
    for run in runs.values():
        run["steps_to_target"] = steps_to_target(run["history"], target)
    plain, norm = runs["plain"]["steps_to_target"], runs["actnorm"]["steps_to_target"]
    return {
        "target": target,
        "margin": margin,
        "runs": runs,
        "actnorm_no_slower": norm is not None and (plain is None or norm <= plain),
    }


def run_norm_depth_study(
    report_dir,
    config: NormDepthConfig = NormDepthConfig(),
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the study (module docstring); writes ``norm_depth.json``, ``norm_depth.md`` and
    ``norm_depth.png`` to ``report_dir`` and returns the summary."""
    from fastnvp.training.digits import LogitTransform, load_digits_split

    report = Path(report_dir)
    report.mkdir(parents=True, exist_ok=True)
    started = time.time()
    moons = _compare(_moons(), 2, config, config.moons, None, config.margin, progress, log)
    split = load_digits_split()
    digits = _compare(
        Data(split.train, split.val, split.test), 64, config, config.digits,
        LogitTransform(), config.digits_margin, progress, log,
    )  # fmt: skip
    deep_settings = dataclasses.replace(
        config.moons,
        steps=config.deep_steps,
        eval_every=max(1, config.deep_steps // 20),
        lr=config.deep_lr,
    )
    deep = {}
    for norm in (None, "actnorm"):
        cand = _candidate(2, config.deep_layers, config.hidden, norm)
        result = train_candidate(cand, _moons(), deep_settings, None, progress=progress, log=log)
        h = result.history
        finite = not result.diverged and all(
            math.isfinite(v) for v in (*h["val_nll"], *h["train_nll"])
        )
        deep[norm or "plain"] = {"result": result.to_dict(), "finite": finite}
        log(f"{cand.name}: {result.steps_run} steps, finite: {finite}, first train NLL "
            f"{h['train_nll'][0]:.3g}, best val {result.best_val_nll:.3f}")  # fmt: skip
    summary = {
        "command": "fastnvp experiment norm-depth",
        "config": dataclasses.asdict(config),
        "threads": torch.get_num_threads(),
        "moons": moons,
        "digits": digits,
        "deep": deep,
        "seconds": time.time() - started,
    }
    _plot(summary, report / "norm_depth.png")
    (report / "norm_depth.json").write_text(json.dumps(summary, indent=1) + "\n")
    (report / "norm_depth.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    """The generated table of the study."""
    lines = [
        "| data | model | best validation NLL | at step | steps to target | target | test NLL |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for data in ("moons", "digits"):
        part = summary[data]
        for run in part["runs"].values():
            reached = run["steps_to_target"]
            lines.append(
                f"| {data} | {run['name']} | {run['best_val_nll']:.3f} | {run['best_step']} | "
                f"{'never' if reached is None else reached} | {part['target']:.3f} | "
                f"{run['test_nll']:.3f} |"
            )
    text = "\n".join(lines) + "\n"
    text += (
        "\n| 200 layers on moons | training NLL, first evaluation interval | "
        "best validation NLL | every loss finite |\n|---|---:|---:|---|\n"
    )
    for run in summary["deep"].values():
        r = run["result"]
        text += (
            f"| {r['name']} | {r['history']['train_nll'][0]:.3g} | {r['best_val_nll']:.3f} | "
            f"{run['finite']} |\n"
        )
    for data in ("moons", "digits"):
        verdict = "no slower" if summary[data]["actnorm_no_slower"] else "slower"
        text += f"\n{data}: ActNorm converged {verdict} than the plain stack.\n"
    return text


def _plot(summary: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, data, unit in zip(axes, ("moons", "digits"), ("nats/point", "nats/image")):
        part = summary[data]
        for run in part["runs"].values():
            h = run["history"]
            ax.plot(h["step"], h["val_nll"], label=run["name"])
        ax.axhline(part["target"], color="black", linestyle=":", linewidth=1, label="target")
        values = [v for r in part["runs"].values() for v in r["history"]["val_nll"]]
        low = min(values)
        ax.set_ylim(low - 0.1 * abs(low) - 0.1, low + max(1.0, 0.5 * abs(low)))
        ax.set_title(f"{data}: validation NLL, {part['runs']['plain']['name']}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    from fastnvp.analysis.viz import save_png

    return save_png(fig, path)


def write_docs(summary: dict, page="docs/digits.md") -> bool:
    """Write the generated section (markers ``norm-depth``) of the digits page."""
    from fastnvp.bench.report import update_section

    return update_section(page, markdown(summary), "norm-depth")
