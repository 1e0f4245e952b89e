"""Maximum-likelihood training with early stopping on validation NLL, for any density model.

The real-data studies (``fastnvp.analysis.digits_study``, ``fastnvp.analysis.norm_depth``)
train fastnvp flows, peer libraries' flows and baselines the same way, so their numbers compare:

- Adam (AdamW when ``weight_decay > 0``; fused where torch has the kernel,
  :mod:`fastnvp.training.optim`) at a fixed learning rate, minibatches drawn with
  replacement from the training rows by a seeded generator;
- data in "model space": with a :class:`~fastnvp.training.digits.LogitTransform` every
  minibatch is dequantized afresh, and NLLs are reported in the units of the discrete data
  (nats per image, the transform's log-det included); without one, rows are used as they are;
- every ``eval_every`` steps the validation NLL (one fixed dequantization draw, so successive
  evaluations differ only by the model) is recorded; the parameters with the best value are
  kept, and training stops after ``patience`` evaluations without improvement;
- the test NLL is that of the kept parameters (four dequantization draws).

A non-finite training loss stops the run and is reported (``diverged``), never hidden.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from fastnvp.training import optim


@dataclass
class Candidate:
    """One model under study.

    Attributes:
        name: how it is reported.
        module: holds every trainable parameter (``train()`` / ``eval()`` are called on it).
        log_prob: (N, D) [, context (N, C)] -> (N,), the density of the model-space data.
        sample: n [, context (M, C)] -> (n, D) or (n, M, D).
        params: trainable parameters held.
        effective: parameters that influence the function (a coupling net's full-width first
            and last Linear hold weights that only see zeros); ``params`` when all do.
        description: one line on how it was built.
        conditional: log_prob and sample take a context.
    """

    name: str
    module: nn.Module
    log_prob: Callable[..., Tensor]
    sample: Callable[..., Tensor]
    params: int
    effective: int
    description: str = ""
    conditional: bool = False


@dataclass(frozen=True)
class TrainSettings:
    """How a :class:`Candidate` is trained (module docstring)."""

    steps: int = 3000
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_every: int = 100
    patience: int = 8
    seed: int = 0
    test_samples: int = 4

    def validate(self) -> None:
        for name in ("steps", "batch", "eval_every", "patience", "test_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Data:
    """Rows of each split (N, D) float32 and, for conditional models, their contexts."""

    train: Tensor
    val: Tensor
    test: Tensor
    train_context: Tensor | None = None
    val_context: Tensor | None = None
    test_context: Tensor | None = None


@dataclass
class TrainResult:
    """What :func:`train_candidate` measured; ``history`` has one entry per evaluation."""

    name: str
    params: int
    effective: int
    description: str
    best_step: int
    best_val_nll: float
    test_nll: float
    steps_run: int
    seconds: float
    diverged: bool
    history: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _nll(candidate: Candidate, x: Tensor, c: Tensor | None, transform, generator) -> Tensor:
    """Per-row NLL (N,) of data rows x: dequantized and transformed when ``transform``."""
    log_det = None
    if transform is not None:
        y, log_det = transform.forward(transform.dequantize(x, generator=generator))
    else:
        y = x
    log_p = candidate.log_prob(y, c) if candidate.conditional else candidate.log_prob(y)
    return -log_p if log_det is None else -(log_p + log_det)


def evaluate(candidate, x, c, transform, samples: int, seed: int, batch: int = 1024) -> float:
    """Mean NLL of the rows x over ``samples`` dequantization draws (one without a transform),
    with the module in eval mode and no gradient."""
    generator = torch.Generator().manual_seed(seed)
    draws = samples if transform is not None else 1
    was_training = candidate.module.training
    candidate.module.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            for start in range(0, x.shape[0], batch):
                rows = x[start : start + batch]
                ctx = None if c is None else c[start : start + batch]
                total += float(_nll(candidate, rows, ctx, transform, generator).double().sum())
    candidate.module.train(was_training)
    return total / (draws * x.shape[0])


def train_candidate(
    candidate: Candidate,
    data: Data,
    settings: TrainSettings,
    transform=None,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``candidate`` on ``data`` (module docstring); returns its :class:`TrainResult`.

    The candidate's module ends holding the parameters with the best validation NLL.
    """
    settings.validate()
    module = candidate.module
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = optim.adam(
        params, settings.lr, settings.weight_decay, decoupled=settings.weight_decay > 0
    )
    generator = torch.Generator().manual_seed(settings.seed)
    history = {"step": [], "train_nll": [], "val_nll": [], "seconds": []}
    best = (math.inf, 0, None)  # (validation NLL, step, parameters) of the best evaluation
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, desc=candidate.name, unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    running, count, stale, diverged, step = 0.0, 0, 0, False, 0
    module.train()
    for step in range(1, settings.steps + 1):
        idx = torch.randint(0, data.train.shape[0], (settings.batch,), generator=generator)
        ctx = None if data.train_context is None else data.train_context[idx]
        loss = _nll(candidate, data.train[idx], ctx, transform, generator).mean()
        if not torch.isfinite(loss):
            diverged = True
            if log:
                log(f"{candidate.name}: non-finite training loss at step {step}; stopped")
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += float(loss.detach())
        count += 1
        if bar is not None:
            bar.update(1)
        if step % settings.eval_every == 0 or step == settings.steps:
            val = evaluate(candidate, data.val, data.val_context, transform, 1, settings.seed + 1)
            history["step"].append(step)
            history["train_nll"].append(running / count)
            history["val_nll"].append(val)
            history["seconds"].append(time.perf_counter() - start)
            running, count = 0.0, 0
            if bar is not None:
                bar.set_postfix(val_nll=f"{val:.2f}")
            if not math.isfinite(val):
                diverged = True
                if log:
                    log(f"{candidate.name}: validation NLL {val} at step {step}; stopped")
                break
            if val < best[0]:
                best, stale = (val, step, copy.deepcopy(module.state_dict())), 0
            else:
                stale += 1
                if stale >= settings.patience:
                    break
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if best[2] is not None:  # else no evaluation was finite: the module stays as it ended
        module.load_state_dict(best[2])
    test = evaluate(
        candidate, data.test, data.test_context, transform, settings.test_samples, settings.seed + 2
    )
    return TrainResult(
        name=candidate.name,
        params=candidate.params,
        effective=candidate.effective,
        description=candidate.description,
        best_step=best[1],
        best_val_nll=best[0],
        test_nll=test,
        steps_run=step,
        seconds=seconds,
        diverged=diverged,
        history=history,
    )
