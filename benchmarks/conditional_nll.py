"""Test NLL of a conditional FastRealNVP against the exact conditional density it learns.

The data is a conditional Gaussian with a known density (issue #13's accuracy target): the
context ``c ~ N(0, I_C)`` and, given c, the D features are independent,

    x | c ~ N(A c + b, diag(sigma(c)^2)),   log sigma_d(c) = alpha * tanh(w_d . c) + beta_d,

with A (D, C), b (D,), W (D, C) and beta (D,) drawn once from a fixed seed (stored in the JSON).
The flow is trained by the project's trainer (``fastnvp.training.train.train`` on a ``.npy``
table with ``context_columns``, as ``fastnvp train --data FILE --context-columns ...`` does),
then three numbers are measured on the same held-out points:

- the model's test NLL ``-mean log q(x | c)`` (nats per sample, data units),
- the exact NLL ``-mean log p(x | c)`` under the true density (its expectation is the
  conditional entropy H(X | C)),
- their gap, an estimate of the mean KL divergence ``E_c KL(p(. | c) || q(. | c))``; its
  standard error is that of the paired per-point differences.

Writes ``conditional_nll.json`` (settings, density parameters, machine, numbers) and
``conditional_nll.md`` under ``docs/conditional/`` (both generated; do not edit). Usage::

    python benchmarks/conditional_nll.py                  # the recorded run (D = 4, C = 2)
    python benchmarks/conditional_nll.py --dim 2 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.8  # amplitude of log sigma(c) around beta


def density(dim: int, context: int, seed: int = 1234) -> dict:
    """The parameters of the conditional Gaussian: A (D, C), b (D,), W (D, C), beta (D,)."""
    rng = np.random.default_rng(seed)
    return {
        "A": rng.normal(size=(dim, context)) * 0.8,
        "b": rng.normal(size=dim) * 0.5,
        "W": rng.normal(size=(dim, context)),
        "beta": rng.uniform(-0.3, 0.3, size=dim),
        "alpha": ALPHA,
    }


def mean_and_log_sigma(params: dict, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``A c + b`` and ``log sigma(c)`` for contexts (N, C).  -> two (N, D) float64 arrays."""
    c = np.asarray(c, dtype=np.float64)
    mu = c @ params["A"].T + params["b"]
    log_sigma = params["alpha"] * np.tanh(c @ params["W"].T) + params["beta"]
    return mu, log_sigma


def sample(params: dict, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws: (x (n, D), c (n, C)), float64."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n, params["A"].shape[1]))
    mu, log_sigma = mean_and_log_sigma(params, c)
    return mu + np.exp(log_sigma) * rng.standard_normal(mu.shape), c


def log_density(params: dict, x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Exact ``log p(x | c)`` of the conditional Gaussian.  (N, D), (N, C) -> (N,) float64."""
    mu, log_sigma = mean_and_log_sigma(params, c)
    u = (np.asarray(x, dtype=np.float64) - mu) * np.exp(-log_sigma)
    return (-0.5 * u**2 - log_sigma - 0.5 * math.log(2 * math.pi)).sum(axis=1)


def measure(settings: dict, progress: bool = False, log=print) -> dict:
    """Train on the conditional Gaussian of ``settings`` and compare test NLLs.

    ``settings``: dim, context, n_train, n_test, layers, hidden, steps, batch, lr, schedule,
    seed. Returns the numbers (model, exact, gap, its standard error, train seconds).
    """
    from fastnvp.training.train import TrainConfig, train

    s = settings
    params = density(s["dim"], s["context"])
    n = s["n_train"] + s["n_test"]
    x, c = sample(params, n, s["seed"])
    table = np.concatenate([x, c], axis=1).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conditional_gaussian.npy"
        np.save(path, table)
        config = TrainConfig(
            data=str(path),
            test_fraction=s["n_test"] / n,
            context_columns=list(range(s["dim"], s["dim"] + s["context"])),
            layers=s["layers"],
            hidden=s["hidden"],
            steps=s["steps"],
            batch=s["batch"],
            lr=s["lr"],
            schedule=s["schedule"],
            seed=s["seed"],
            eval_every=max(1, s["steps"] // 10),
            checkpoint_every=s["steps"],
        )
        result = train(config, Path(tmp) / "run", progress=progress)
    split = result.split
    with torch.no_grad():
        log_q = torch.cat(
            [
                result.model.log_prob(split.x_test[i : i + 8192], split.c_test[i : i + 8192])
                for i in range(0, split.x_test.shape[0], 8192)
            ]
        ).double()
    # The exact density at the float32 points the model saw.
    log_p = log_density(params, split.x_test.double().numpy(), split.c_test.double().numpy())
    diff = log_p - log_q.numpy()
    out = {
        "test_points": int(split.x_test.shape[0]),
        "model_nll": float(-log_q.mean()),
        "exact_nll": float(-log_p.mean()),
        "gap": float(diff.mean()),
        "gap_standard_error": float(diff.std(ddof=1) / math.sqrt(diff.size)),
        "exact_nll_standard_error": float(log_p.std(ddof=1) / math.sqrt(log_p.size)),
        "train_seconds": result.elapsed,
        "test_nll_history": dict(zip(result.history["test_steps"], result.history["test_nll"])),
        "parameters": sum(p.numel() for p in result.model.parameters()),
    }
    log(
        f"model NLL {out['model_nll']:.4f}  exact {out['exact_nll']:.4f}  gap {out['gap']:.4f} "
        f"± {out['gap_standard_error']:.4f} nats ({out['train_seconds']:.0f} s)"
    )
    return out


def markdown(doc: dict) -> str:
    s, r = doc["settings"], doc["result"]
    command = "python benchmarks/conditional_nll.py" + (
        " " + " ".join(doc["argv"]) if doc["argv"] else ""
    )
    lines = [
        "# Conditional Real NVP: test NLL against the exact conditional density",
        "",
        f"Generated by `{command}` (commit {doc['commit']}, torch {doc['torch']}, "
        f"{doc['threads']} CPU threads, {doc['platform']}); do not edit.",
        "",
        f"Data: c ~ N(0, I_{s['context']}), x | c ~ N(A c + b, diag(sigma(c)^2)) with "
        f"log sigma_d(c) = {ALPHA} tanh(w_d . c) + beta_d, D = {s['dim']}, C = {s['context']}; "
        f"A, b, W, beta drawn from seed {doc['density_seed']} (values in the JSON). "
        f"{s['n_train']} training and {r['test_points']} test points.",
        "",
        f"Model: FastRealNVP.standard(D={s['dim']}, L={s['layers']}, H={s['hidden']}, "
        f"context={s['context']}) trained by `fastnvp.training.train` "
        f"(x and the context standardized), {s['steps']} Adam steps, batch {s['batch']}, "
        f"lr {s['lr']} with {s['schedule']} decay; {r['parameters']} parameters, "
        f"{r['train_seconds']:.0f} s of training.",
        "",
        "| test NLL (model) | exact NLL (true density) | gap | gap s.e. | target |",
        "|---:|---:|---:|---:|---:|",
        f"| {r['model_nll']:.4f} | {r['exact_nll']:.4f} | {r['gap']:.4f} | "
        f"{r['gap_standard_error']:.4f} | <= {doc['target']} |",
        "",
        "Nats per sample in data units, on the same test points; the gap estimates "
        "E_c KL(p(.|c) || q(.|c)), its standard error is that of the paired differences.",
        "",
        "| step | test NLL |",
        "|---:|---:|",
    ]
    for step, nll in r["test_nll_history"].items():
        lines.append(f"| {step} | {nll:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=4, help="D, features of x (default 4)")
    p.add_argument("--context", type=int, default=2, help="C, features of c (default 2)")
    p.add_argument("--n-train", type=int, default=200_000)
    p.add_argument("--n-test", type=int, default=50_000)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", type=float, default=0.02, help="gap to meet, nats")
    p.add_argument("--out", default=str(ROOT / "docs" / "conditional"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("dim", "context", "n_train", "n_test", "layers", "hidden", "steps", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.dim < 2:
        p.error("--dim must be >= 2 (a Real NVP needs D >= 2)")
    torch.set_num_threads(args.threads)
    settings = {
        k: getattr(args, k)
        for k in (
            "dim",
            "context",
            "n_train",
            "n_test",
            "layers",
            "hidden",
            "steps",
            "batch",
            "lr",
            "schedule",
            "seed",
        )
    }
    started = time.perf_counter()
    result = measure(settings, progress=not args.no_progress)
    from fastnvp.bench.harness import environment

    env = environment("cpu", torch.get_num_threads())
    params = density(args.dim, args.context)
    doc = {
        "benchmark": "conditional_nll",
        "argv": argv,
        "commit": env["commit"],
        "dirty": env["dirty"],
        "machine": env["machine"],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": settings,
        "density_seed": 1234,
        "density": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in params.items()},
        "target": args.target,
        "meets_target": result["gap"] <= args.target,
        "result": result,
        "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conditional_nll.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "conditional_nll.md").write_text(markdown(doc))
    print(f"wrote {out / 'conditional_nll.json'} and {out / 'conditional_nll.md'}")
    return 0 if doc["meets_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
