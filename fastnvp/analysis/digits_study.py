"""The digits study: fastnvp on real 64-D data, against a Gaussian and the peers' Real NVPs.

``fastnvp experiment digits`` (docs/digits.md). scikit-learn's 8 x 8 digits
(``fastnvp.training.digits``: 1 350 / 150 / 297 train / validation / test images, uniform
dequantization, logit with α = 0.05, NLL in nats per image of the discrete data and bits per
dimension). Every model is trained by ``fastnvp.analysis.density_training.train_candidate``
(Adam, batch 128, lr 1e-3, the validation NLL every 25 steps, early stopping after 16
evaluations without improvement) and reported at the step of
its best validation NLL:

1. a full-covariance Gaussian fitted by maximum likelihood (the baseline);
2. fastnvp ``FastRealNVP.standard(64, L, H, norm=..., permutation=...)`` for every norm x
   permutation option (docs/design.md §1.8) at the base width;
3. the best of 2 (by validation NLL) at other widths and with AdamW weight decay;
4. each peer library's own Real NVP (``fastnvp.bench.peer_realnvp``) with the hidden width
   that gives the parameter budget (effective parameters) of the best fastnvp model, the same
   steps, optimizer and early stopping;
5. the best configuration as a class-conditional flow p(x | digit) (context: one-hot label),
   sampled one row per digit; its marginal p(x) = Σ_c p(c) p(x | c) is a density too.

The best model is chosen on validation NLL only; test NLLs are reported, never used to choose.
Writes ``results.json``, ``results.md``, ``samples.png``, ``conditional.png`` and
``curves.png`` to the report directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastnvp.analysis.density_training import (
    Candidate,
    Data,
    TrainSettings,
    evaluate,
    train_candidate,
)
from fastnvp.core.interleave import NORMS, PERMUTATIONS

DIM = 64
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class DigitsStudyConfig:
    """What the study trains (module docstring); the defaults are the committed run."""

    layers: int = 8
    hidden: int = 256
    norms: tuple = NORMS
    permutations: tuple = PERMUTATIONS
    widths: tuple = (64, 128)
    weight_decays: tuple = (1e-2, 1e-1)
    peers: tuple = ("nflows", "zuko", "normflows", "FrEIA")
    conditional: bool = True
    # Models of this size overfit 1 350 images within a few hundred steps: evaluate often.
    settings: TrainSettings = TrainSettings(steps=3000, eval_every=25, patience=16)
    alpha: float = 0.05
    split_seed: int = 0

    @classmethod
    def quick(cls) -> DigitsStudyConfig:
        """A tiny version for tests and a smoke run (seconds)."""
        return cls(
            layers=2,
            hidden=16,
            norms=(None, "actnorm"),
            permutations=(None, "lu"),
            widths=(8,),
            weight_decays=(1e-3,),
            peers=("zuko",),
            settings=TrainSettings(steps=30, eval_every=10, patience=2, batch=64),
        )


def label(norm, permutation, hidden: int) -> str:
    return f"fastnvp[norm={norm or '-'}, perm={permutation or '-'}, H={hidden}]"


def fastnvp_candidate(
    layers: int, hidden: int, norm, permutation, *, context: int | None = None, seed: int = 0
) -> Candidate:
    """A ``FastRealNVP.standard(64, layers, hidden, ...)`` as a study candidate."""
    from fastnvp.bench.providers import effective_params
    from fastnvp.flows.fast_realnvp import FastRealNVP

    torch.manual_seed(seed)
    model = FastRealNVP.standard(
        DIM, layers, hidden, norm=norm, permutation=permutation, context=context
    )
    count = sum(p.numel() for p in model.parameters())
    name = label(norm, permutation, hidden) + ("" if context is None else " | digit")
    return Candidate(
        name=name,
        module=model,
        log_prob=model.log_prob,
        sample=model.sample,
        params=count,
        effective=effective_params(model),
        description=(
            f"FastRealNVP.standard({DIM}, {layers}, {hidden}, norm={norm!r}, "
            f"permutation={permutation!r}"
            + ("" if context is None else f", context={context}")
            + ")"
        ),
        conditional=context is not None,
    )


def peer_candidate(name: str, layers: int, budget: int, seed: int = 0) -> Candidate:
    """Peer ``name``'s own Real NVP at the width closest to ``budget`` parameters."""
    from fastnvp.bench.peer_realnvp import build_peer_realnvp, hidden_for_budget

    hidden = hidden_for_budget(name, DIM, layers, budget)
    peer = build_peer_realnvp(name, DIM, layers, hidden, seed=seed)
    return Candidate(
        name=name,
        module=peer.module,
        log_prob=peer.log_prob,
        sample=peer.sample,
        params=peer.params,
        effective=peer.params,
        description=peer.construction,
    )


def _row(result, group: str, **extra) -> dict:
    from fastnvp.training.digits import bits_per_dim

    row = result.to_dict()
    row.update(group=group, test_bits_per_dim=bits_per_dim(result.test_nll, DIM), **extra)
    return row


def _gaussian(data: Data, transform, settings: TrainSettings) -> dict:
    """The full-covariance Gaussian baseline, fitted on one dequantized draw of the training
    set, evaluated like every model."""
    from fastnvp.training.digits import bits_per_dim, fit_gaussian

    generator = torch.Generator().manual_seed(settings.seed)
    y, _ = transform.forward(transform.dequantize(data.train, generator=generator))
    gauss = fit_gaussian(y)
    holder = torch.nn.Module()
    candidate = Candidate("Gaussian (full covariance)", holder, gauss.log_prob, None, 0, 0)
    val = evaluate(candidate, data.val, None, transform, 1, settings.seed + 1)
    test = evaluate(candidate, data.test, None, transform, settings.test_samples, settings.seed + 2)
    params = DIM + DIM * (DIM + 1) // 2
    return {
        "name": candidate.name,
        "group": "baseline",
        "params": params,
        "effective": params,
        "description": "maximum-likelihood mean and covariance of the transformed training set",
        "best_val_nll": val,
        "test_nll": test,
        "test_bits_per_dim": bits_per_dim(test, DIM),
        "best_step": 0,
        "steps_run": 0,
        "seconds": 0.0,
        "diverged": False,
        "history": {},
    }


def _marginal_nll(candidate: Candidate, data: Data, transform, settings, priors) -> float:
    """Test NLL of p(x) = Σ_c p(c) p(x | c) of a class-conditional candidate (nats/image)."""
    generator = torch.Generator().manual_seed(settings.seed + 2)
    candidate.module.eval()
    total, x = 0.0, data.test
    eye = torch.eye(NUM_CLASSES)
    with torch.no_grad():
        for _ in range(settings.test_samples):
            y, log_det = transform.forward(transform.dequantize(x, generator=generator))
            per_class = torch.stack(
                [candidate.log_prob(y, eye[c].expand(x.shape[0], -1)) for c in range(NUM_CLASSES)],
                dim=1,
            )
            log_p = torch.logsumexp(per_class + priors.log(), dim=1)
            total += float(-(log_p + log_det).double().sum())
    return total / (settings.test_samples * x.shape[0])


def markdown(summary: dict) -> str:
    """The results table (generated; docs/digits.md links it)."""
    lines = [
        "| model | H | weight decay | parameters (effective) | best step | validation NLL | "
        "test NLL (nats/image) | test bits/dim | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = summary["best"]
    for row in summary["rows"]:
        name = row["name"] + (" **(best, chosen on validation)**" if row["name"] == best else "")
        hidden = row.get("hidden", "")
        wd = row.get("weight_decay", "")
        lines.append(
            f"| {name} | {hidden} | {wd if wd != '' else ''} | {row['effective']:,} | "
            f"{row['best_step']} | {row['best_val_nll']:.2f} | {row['test_nll']:.2f} | "
            f"{row['test_bits_per_dim']:.3f} | {row['seconds']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    cond = summary.get("conditional")
    if cond:
        text += (
            f"\nClass-conditional {cond['name']}: test NLL of p(x | digit) "
            f"{cond['test_nll']:.2f} nats/image; its marginal p(x) = Σ_c p(c) p(x | c) "
            f"{cond['marginal_test_nll']:.2f} nats/image "
            f"({cond['marginal_test_bits_per_dim']:.3f} bits/dim).\n"
        )
    return text


def run_digits_study(
    report_dir,
    config: DigitsStudyConfig = DigitsStudyConfig(),
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the study (module docstring) and write its files to ``report_dir``; returns the
    summary written to ``results.json``."""
    from fastnvp.analysis import viz_digits
    from fastnvp.training.digits import LogitTransform, bits_per_dim, load_digits_split

    report = Path(report_dir)
    report.mkdir(parents=True, exist_ok=True)
    settings = config.settings
    settings.validate()
    started = time.time()
    split = load_digits_split(seed=config.split_seed)
    transform = LogitTransform(alpha=config.alpha)
    data = Data(split.train, split.val, split.test)
    rows = [_gaussian(data, transform, settings)]
    log(f"Gaussian: test NLL {rows[0]['test_nll']:.2f} nats/image")
    fastnvp_rows: list[tuple[dict, Candidate, tuple]] = []

    def run(candidate, group, key, run_settings=settings, **extra):
        result = train_candidate(
            candidate, data, run_settings, transform, progress=progress, log=log
        )
        row = _row(result, group, **extra)
        rows.append(row)
        log(
            f"{candidate.name}{'' if not extra else ' ' + str(extra)}: best val "
            f"{result.best_val_nll:.2f} at step {result.best_step}, test {result.test_nll:.2f}"
        )
        if group == "fastnvp":
            fastnvp_rows.append((row, candidate, key))
        return row

    for norm in config.norms:
        for perm in config.permutations:
            cand = fastnvp_candidate(config.layers, config.hidden, norm, perm, seed=settings.seed)
            run(cand, "fastnvp", (norm, perm, config.hidden, 0.0), hidden=config.hidden)
    grid_best = min(fastnvp_rows, key=lambda r: r[0]["best_val_nll"])
    norm, perm = grid_best[2][0], grid_best[2][1]
    for hidden in config.widths:
        cand = fastnvp_candidate(config.layers, hidden, norm, perm, seed=settings.seed)
        run(cand, "fastnvp", (norm, perm, hidden, 0.0), hidden=hidden)
    for wd in config.weight_decays:
        cand = fastnvp_candidate(config.layers, config.hidden, norm, perm, seed=settings.seed)
        cand.name += f" wd={wd:g}"
        decayed = dataclasses.replace(settings, weight_decay=wd)
        run(cand, "fastnvp", (norm, perm, config.hidden, wd), decayed, hidden=config.hidden,
            weight_decay=wd)  # fmt: skip
    best_row, best_candidate, best_key = min(fastnvp_rows, key=lambda r: r[0]["best_val_nll"])
    budget = best_row["effective"]
    for name in config.peers:
        run(peer_candidate(name, config.layers, budget, seed=settings.seed), "peer", None)

    # Figures of the best model, then the class-conditional one.
    torch.manual_seed(settings.seed)
    best_candidate.module.eval()
    with torch.no_grad():
        samples = transform.to_pixels(best_candidate.sample(64))
    figures = {
        "samples": viz_digits.plot_real_vs_samples(
            split.test[:64], samples, report / "samples.png", title=best_row["name"]
        ).name
    }
    conditional = None
    if config.conditional:
        b_norm, b_perm, b_hidden, b_wd = best_key
        cand = fastnvp_candidate(
            config.layers, b_hidden, b_norm, b_perm, context=NUM_CLASSES, seed=settings.seed
        )
        eye = torch.eye(NUM_CLASSES)
        cond_data = Data(
            split.train, split.val, split.test,
            eye[split.train_labels], eye[split.val_labels], eye[split.test_labels],
        )  # fmt: skip
        result = train_candidate(
            cand, cond_data, dataclasses.replace(settings, weight_decay=b_wd), transform,
            progress=progress, log=log,
        )  # fmt: skip
        priors = torch.bincount(split.train_labels, minlength=NUM_CLASSES).float()
        priors = priors / priors.sum()
        marginal = _marginal_nll(cand, cond_data, transform, settings, priors)
        conditional = _row(result, "conditional", hidden=b_hidden, weight_decay=b_wd)
        conditional.update(
            marginal_test_nll=marginal, marginal_test_bits_per_dim=bits_per_dim(marginal, DIM)
        )
        torch.manual_seed(settings.seed)
        cand.module.eval()
        with torch.no_grad():
            drawn = cand.sample(10, eye)  # (10, 10, 64): draw k given digit c
        pixels = transform.to_pixels(drawn.reshape(-1, DIM)).reshape(10, NUM_CLASSES, DIM)
        figures["conditional"] = viz_digits.plot_class_samples(
            pixels, report / "conditional.png", title=f"{cand.name}: one row per digit"
        ).name
        log(f"{cand.name}: test NLL {result.test_nll:.2f}, marginal {marginal:.2f}")
    figures["curves"] = viz_digits.plot_nll_curves(
        [r for r in rows if r["history"]], report / "curves.png", baseline=rows[0]["test_nll"]
    ).name
    summary = {
        "command": "fastnvp experiment digits",
        "config": _jsonable(dataclasses.asdict(config)),
        "data": {
            "train": int(split.train.shape[0]),
            "val": int(split.val.shape[0]),
            "test": int(split.test.shape[0]),
            "alpha": config.alpha,
            "units": "nats per image of the discrete 17-level data (dequantization bound)",
        },
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "best": best_row["name"],
        "peer_budget_effective_params": budget,
        "rows": rows,
        "conditional": conditional,
        "figures": figures,
        "seconds": time.time() - started,
    }
    (report / "results.json").write_text(json.dumps(_jsonable(summary), indent=1) + "\n")
    table = markdown(summary)
    (report / "results.md").write_text(table)
    summary["table"] = table
    return summary


def _jsonable(value):
    """Tuples to lists and non-finite floats to strings, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def key_rows(summary: dict) -> list[dict]:
    """The rows the study's questions are about: the Gaussian, the plain fastnvp model at the
    base width, the chosen model, the best test NLL of fastnvp if another, and the peers."""
    rows = summary["rows"]
    fastnvp_rows = [r for r in rows if r["group"] == "fastnvp"]
    base = summary["config"]["hidden"]
    plain = next((r for r in fastnvp_rows if r["name"] == label(None, None, base)), None)
    chosen = next(r for r in rows if r["name"] == summary["best"])
    best_test = min(fastnvp_rows, key=lambda r: r["test_nll"])
    out = [rows[0]] + ([plain] if plain else []) + [chosen]
    if best_test is not chosen:
        out.append(best_test)
    return out + sorted((r for r in rows if r["group"] == "peer"), key=lambda r: r["test_nll"])


def _grid_markdown(summary: dict) -> str:
    """Test NLL of the norm x permutation grid at the base width (rows: norm)."""
    config = summary["config"]
    by_name = {r["name"]: r for r in summary["rows"]}
    perms = config["permutations"]
    lines = [
        f"Test NLL (nats/image) of every norm × permutation option at H = {config['hidden']}:",
        "",
        "| norm \\ permutation | " + " | ".join(str(p or "none") for p in perms) + " |",
        "|---|" + "---:|" * len(perms),
    ]
    for norm in config["norms"]:
        cells = []
        for perm in perms:
            row = by_name.get(label(norm, perm, config["hidden"]))
            cells.append("-" if row is None else f"{row['test_nll']:.2f}")
        lines.append(f"| {norm or 'none'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    """Generated tables of :func:`key_rows`, the option grid and the verdicts (docs/digits.md)."""
    chosen = summary["best"]
    lines = [
        "| model | effective parameters | test NLL (nats/image) | bits/dim |",
        "|---|---:|---:|---:|",
    ]
    for row in key_rows(summary):
        name = row["name"]
        if name == chosen:
            name = f"**{name} (chosen on validation)**"
        elif row["group"] == "peer":
            name = f"{name} (its own Real NVP, same budget)"
        lines.append(
            f"| {name} | {row['effective']:,} | {row['test_nll']:.2f} | "
            f"{row['test_bits_per_dim']:.3f} |"
        )
    cond = summary.get("conditional")
    if cond:
        name = cond["name"].replace("|", "given the")
        lines.append(
            f"| {name}: marginal Σ_c p(c) p(x \\| c) | {cond['effective']:,} | "
            f"{cond['marginal_test_nll']:.2f} | {cond['marginal_test_bits_per_dim']:.3f} |"
        )
        lines.append(
            f"| {name}: p(x \\| c) | {cond['effective']:,} | {cond['test_nll']:.2f} | "
            f"{cond['test_bits_per_dim']:.3f} |"
        )
    rows = summary["rows"]
    best = next(r for r in rows if r["name"] == chosen)
    peers = [r for r in rows if r["group"] == "peer"]
    text = "\n".join(lines) + "\n\n"
    text += (
        f"The chosen model's test NLL is {rows[0]['test_nll'] - best['test_nll']:.2f} "
        "nats/image below the Gaussian's"
    )
    if peers:
        top = min(peers, key=lambda r: r["test_nll"])
        margin = top["test_nll"] - best["test_nll"]
        verdict = "below" if margin >= 0 else "ABOVE"
        text += (
            f" and {abs(margin):.2f} nats/image {verdict} the best peer's Real NVP at its "
            f"budget ({top['name']})"
        )
    return text + ".\n\n" + _grid_markdown(summary) + "\n"


def readme_text(summary: dict) -> str:
    """One generated paragraph for the README."""
    rows = summary["rows"]
    best = next(r for r in rows if r["name"] == summary["best"])
    peers = [r["test_nll"] for r in rows if r["group"] == "peer"]
    text = (
        f"The model chosen on validation ({best['name']}) scores **{best['test_nll']:.1f} "
        f"nats/image ({best['test_bits_per_dim']:.2f} bits/dim)** against "
        f"{rows[0]['test_nll']:.1f} for the full-covariance Gaussian"
    )
    if peers:
        text += f" and {min(peers):.1f}–{max(peers):.1f} for the peers' Real NVPs at its budget"
    cond = summary.get("conditional")
    if cond:
        text += (
            f"; the class-conditional version's marginal density scores "
            f"{cond['marginal_test_nll']:.1f}"
        )
    return text + "."


def write_docs(summary: dict, page="docs/digits.md", readme="README.md") -> list[str]:
    """Write the generated sections (markers ``digits``) of the page and the README."""
    from fastnvp.bench.report import update_section

    written = []
    if update_section(page, summary_markdown(summary), "digits"):
        written.append(str(page))
    if update_section(readme, readme_text(summary), "digits"):
        written.append(str(readme))
    return written
