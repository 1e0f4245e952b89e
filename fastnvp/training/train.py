"""Training of a Real NVP flow on a toy or user data set, with checkpoints and exact resume.

A run directory holds:

- ``checkpoint.pt``: model state_dict, config, optimizer, scheduler, RNG states, step and loss
  history. Written atomically (temporary file, then ``os.replace``), so an interrupted write
  never leaves a truncated checkpoint; read with ``torch.load(..., weights_only=True)`` and
  verified (digest, weights against config) by :mod:`fastnvp.training.checkpoint`.
- ``config.json``: the config, human-readable.
- ``metrics.json``: test NLL and latent Gaussianity when training finishes.

Units: the flow is trained on standardized data ``u = (x - mean) / std``; the mean and std
are buffers of :class:`DataFlow`, so ``log_prob``/``sample`` of a loaded run work in data
units, and every reported NLL (train and test) is in nats per sample in data units.

Conditional runs learn ``p(x | c)`` (docs/design.md §1.7): ``context="label"`` conditions a toy
data set on its component label, one-hot (C = :data:`~fastnvp.training.data.NUM_LABELS` of the
data set, 2 for two moons); ``context_columns`` takes columns of a user's table as c and the
other columns as x. Continuous context columns are standardized like x (their mean and std
are the buffers ``context_mean``/``context_std`` of :class:`DataFlow`), 0/1 columns pass
through, so ``log_prob(x, context=c)`` and ``sample(n, context=c)`` take c in data units. The
checkpoint's ``"context"`` entry records the kind, width C and columns (:func:`context_from_values`
turns a label or column values into the (C,) context). Unconditional runs hold no context
entries at all: their config, state_dict and checkpoint are as before.

Resume is bit-for-bit on CPU: the batch order comes from a dedicated ``torch.Generator`` whose
state is saved, and the optimizer, the learning-rate schedule (a closed-form function of the
step) and the global torch RNG state are restored exactly.

Data-parallel: pass ``world=fastnvp.training.distributed.init()`` (``fastnvp train`` does this under
torchrun). Each rank then trains a DDP replica on its shard of the same global batch, and only
rank 0 evaluates, shows progress and writes files (see :mod:`fastnvp.training.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastnvp.core.validation import ensure_batch, ensure_num_samples
from fastnvp.training import checkpoint as ckpt
from fastnvp.training import distributed, optim
from fastnvp.training.data import (
    DATASETS,
    NUM_LABELS,
    Standardizer,
    csv_header,
    load_array,
    make_dataset,
    min_rows_for_split,
    one_hot,
    parse_columns,
    resolve_columns,
    split_columns,
    split_sizes,
    train_test_split,
)

# The flow implementation used unless a config names one: "fast" is FastRealNVP, whose plan
# (docs/design.md §3) runs the whole stack on the fastest executor for the call; "reference" the
# plain-PyTorch RealNVP. Both compute the same function and take the same state_dict, so a run
# trained with one loads into the other.
DEFAULT_IMPL = "fast"
IMPLS = ("fast", "reference")
SCHEDULES = ("cosine", "constant")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "fastnvp-run/1"
CONTEXTS = ("label",)
# Config fields of conditional runs; left out of an unconditional run's config dict.
# Fields a config omits when None, so a run without them keeps exactly the config (and the
# checkpoint equality of a resumed study) it always had.
_OPTIONAL_FIELDS = ("context", "context_columns", "norm", "permutation")


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the checkpoint)."""

    dataset: str = "moons"  # toy data set name; ignored when ``data`` is set
    data: str | None = None  # path of a user's N×D .npy/.csv
    noise: float | None = None  # toy data noise; None = the generator's default
    n_train: int = 20_000  # toy data: training points
    n_test: int = 5_000  # toy data: test points
    test_fraction: float = 0.2  # user data: fraction held out for testing
    layers: int = 50
    hidden: int = 256
    norm: str | None = None  # interleaved layers (docs/design.md §1.8): None, actnorm, batchnorm
    permutation: str | None = None  # None, reverse, random, lu
    impl: str = DEFAULT_IMPL
    steps: int = 5_000
    batch: int = 256
    lr: float = 1e-3
    schedule: str = "cosine"
    clip: float = 10.0  # max gradient norm; 0 disables clipping
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 100  # steps between test-NLL evaluations
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    context: str | None = None  # "label": condition a toy data set on its label (one-hot)
    context_columns: list | None = None  # user data: context columns (0-based ints or names)

    def __post_init__(self):
        if isinstance(self.context_columns, (str, tuple)):
            self.context_columns = parse_columns(self.context_columns)

    @property
    def context_features(self) -> int | None:
        """Width C of the context (None for an unconditional run)."""
        if self.context == "label":
            return NUM_LABELS[self.dataset]
        if self.context_columns is not None:
            return len(self.context_columns)
        return None

    def validate(self) -> TrainConfig:
        """Raise ValueError/TypeError naming the first bad field; returns self."""
        ints = {
            "n_train": 2,
            "n_test": 2,
            "layers": 1,
            "hidden": 1,
            "steps": 1,
            "batch": 1,
            "eval_every": 1,
            "checkpoint_every": 1,
            "seed": 0,
        }
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        for name in ("lr", "clip", "weight_decay", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.data is None and self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if self.data is not None and not isinstance(self.data, str):
            raise TypeError(f"data must be a path string, got {type(self.data).__name__}")
        if self.noise is not None and (not isinstance(self.noise, (int, float)) or self.noise < 0):
            raise ValueError(f"noise must be None or a float >= 0, got {self.noise!r}")
        from fastnvp.core.interleave import NORMS, PERMUTATIONS, check_option

        check_option(self.norm, "norm", NORMS)
        check_option(self.permutation, "permutation", PERMUTATIONS)
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        self._validate_context()
        return self

    def _validate_context(self) -> None:
        if self.context is not None and self.context not in CONTEXTS:
            raise ValueError(f"context must be None or one of {CONTEXTS}, got {self.context!r}")
        if self.context is not None and self.context_columns is not None:
            raise ValueError(
                "give either context='label' (--context label) or context_columns "
                "(--context-columns), not both"
            )
        if self.context == "label":
            if self.data is not None:
                raise ValueError(
                    "context='label' (--context label) conditions on a toy data set's labels, "
                    f"but data {self.data!r} has none; take context columns from the file with "
                    "context_columns (--context-columns)"
                )
            if self.dataset not in NUM_LABELS:
                raise ValueError(
                    f"context='label' needs a data set with labels, {self.dataset!r} has none"
                )
        if self.context_columns is None:
            return
        if self.data is None:
            raise ValueError(
                "context_columns (--context-columns) picks columns of a data file (--data); "
                "a toy data set is conditioned with context='label' (--context label)"
            )
        columns = parse_columns(self.context_columns)
        if not columns:
            raise ValueError("context_columns must name at least one column")
        for item in columns:
            if isinstance(item, bool) or not isinstance(item, (int, str)) or item == "":
                raise TypeError(
                    f"context_columns items must be 0-based int indices or header names, "
                    f"got {item!r}"
                )
            if isinstance(item, int) and item < 0:
                raise ValueError(f"context_columns indices must be >= 0, got {item}")
        if len(set(columns)) != len(columns):
            raise ValueError(f"context_columns names a column twice: {columns}")

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        for name in _OPTIONAL_FIELDS:
            if values[name] is None:
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict (e.g. a checkpoint's); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}")
        return cls(**values).validate()


@dataclass
class DataSplit:
    """Train and test points in data units, with labels for toy data (None for user data).

    Conditional runs add the context rows ``c_train``/``c_test`` (data units), the
    standardization of the context and ``context_info`` (the checkpoint's ``"context"`` entry).
    """

    x_train: torch.Tensor  # (N_train, D) float32
    x_test: torch.Tensor  # (N_test, D) float32
    y_train: torch.Tensor | None  # (N_train,) int64
    y_test: torch.Tensor | None  # (N_test,) int64
    standardizer: Standardizer  # fitted on x_train
    c_train: torch.Tensor | None = None  # (N_train, C) float32
    c_test: torch.Tensor | None = None  # (N_test, C) float32
    context_standardizer: Standardizer | None = None  # fitted on c_train (continuous columns)
    context_info: dict | None = None

    @property
    def dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def context_features(self) -> int | None:
        return None if self.c_train is None else self.c_train.shape[1]


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def prepare_data(config: TrainConfig) -> DataSplit:
    """Generate or load the data of ``config`` and split it, deterministically from its seed.

    The train/test split of x does not depend on whether the run is conditional.
    """
    config.validate()
    c_tr = c_te = info = None
    if config.data is not None:
        x = load_array(config.data)
        c = None
        if config.context_columns is not None:
            source = repr(str(config.data))
            columns = resolve_columns(
                config.context_columns, x.shape[1], csv_header(config.data), source
            )
            x, c = split_columns(x, columns)
            if x.shape[1] < 2:
                raise ValueError(
                    f"context_columns {columns} leave {x.shape[1]} column of {source} as x; a "
                    "Real NVP needs x with D >= 2 columns"
                )
            header = csv_header(config.data)
            info = {
                "kind": "columns",
                "features": len(columns),
                "columns": columns,
                "names": None if header is None else [header[j] for j in columns],
                "labels": None,
            }
        _check_split(x.shape[0], float(config.test_fraction), config.data)
        x_tr, x_te, c_tr, c_te = train_test_split(x, c, float(config.test_fraction), config.seed)
        y_tr = y_te = None
    else:
        n = config.n_train + config.n_test
        x, y = make_dataset(config.dataset, n, seed=config.seed, noise=config.noise)
        # The generators shuffle, so the first n_train points are a random subset.
        x_tr, x_te = x[: config.n_train], x[config.n_train :]
        y_tr, y_te = torch.from_numpy(y[: config.n_train]), torch.from_numpy(y[config.n_train :])
        if config.context == "label":
            k = NUM_LABELS[config.dataset]
            c_tr, c_te = one_hot(y[: config.n_train], k), one_hot(y[config.n_train :], k)
            info = {"kind": "label", "features": k, "columns": None, "names": None, "labels": k}
    split = DataSplit(
        _tensor(x_tr),
        _tensor(x_te),
        y_tr,
        y_te,
        Standardizer.fit(x_tr),
    )
    if info is not None:
        if info["kind"] == "label":
            k = info["features"]
            cst = Standardizer(np.zeros(k), np.ones(k))
        else:
            cst = Standardizer.fit_context(c_tr)
        info["standardized"] = [bool(m != 0 or s != 1) for m, s in zip(cst.mean, cst.std)]
        split.c_train, split.c_test = _tensor(c_tr), _tensor(c_te)
        split.context_standardizer, split.context_info = cst, info
    return split


# Rows each side of a split needs: the standardization's std (training set) and the latent
# covariance of the test set (fastnvp.analysis.stats.latent_gaussianity).
MIN_SPLIT_ROWS = 2


def _check_split(rows: int, test_fraction: float, source) -> None:
    """Raise ValueError when a user data set of ``rows`` rows, split at ``test_fraction``,
    leaves fewer than :data:`MIN_SPLIT_ROWS` rows for training or testing (before training)."""
    n_train, n_test = split_sizes(rows, test_fraction)
    if min(n_train, n_test) >= MIN_SPLIT_ROWS:
        return
    need = min_rows_for_split(test_fraction, MIN_SPLIT_ROWS)
    raise ValueError(
        f"data (--data) {str(source)!r} has {rows} rows, which test_fraction (--test-fraction) "
        f"{test_fraction:g} splits into {n_train} training and {n_test} test rows; each side "
        f"needs at least {MIN_SPLIT_ROWS}, so --data needs at least {need} rows at this "
        "--test-fraction"
    )


def build_flow(
    impl: str,
    dim: int,
    layers: int,
    hidden: int,
    context: int | None = None,
    norm: str | None = None,
    permutation: str | None = None,
) -> nn.Module:
    """A standard Real NVP (``.standard(dim, layers, hidden)``) of the chosen implementation.

    ``context``: None, or the width C of the context of a conditional flow; ``norm``,
    ``permutation``: the interleaved layers (docs/design.md §1.8), None for none.
    """
    options = {} if context is None else {"context": context}
    if norm is not None:
        options["norm"] = norm
    if permutation is not None:
        options["permutation"] = permutation
    if impl == "reference":
        from fastnvp.core.reference import RealNVP

        return RealNVP.standard(dim, layers, hidden, **options)
    if impl == "fast":
        try:
            from fastnvp.flows.fast_realnvp import FastRealNVP
        except ImportError as exc:
            raise RuntimeError(
                "impl='fast' needs fastnvp.flows.fast_realnvp.FastRealNVP, which this "
                "installation lacks; "
                "use impl='reference'"
            ) from exc
        return FastRealNVP.standard(dim, layers, hidden, **options)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


class DataFlow(nn.Module):
    """A flow on standardized data, seen in data units.

    ``f(x) = flow.f((x - mean) / std)`` with ``log_det`` including the standardization's
    ``-sum(log std)``, so ``log_prob(x) = log N(f(x); 0, I) + log_det`` is the density of ``x``
    in data units. ``mean``/``std`` are buffers: they travel in the state_dict.

    A conditional flow (``flow.context_features`` C) also gets ``context_mean``/``context_std``
    (C,): every method then takes ``context`` in data units and hands the flow
    ``(context - context_mean) / context_std``. The context is not a variable of the density,
    so its standardization adds nothing to ``log_det``. Unconditional, both buffers are None
    (absent from the state_dict) and ``context`` must be None.
    """

    def __init__(
        self,
        flow: nn.Module,
        mean: torch.Tensor,
        std: torch.Tensor,
        context_mean: torch.Tensor | None = None,
        context_std: torch.Tensor | None = None,
    ):
        super().__init__()
        self.flow = flow
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())
        if (context_mean is None) != (context_std is None):
            raise ValueError("context_mean and context_std must be given together")
        if context_mean is not None:
            context_mean = torch.as_tensor(context_mean, dtype=torch.float32).clone()
            context_std = torch.as_tensor(context_std, dtype=torch.float32).clone()
            if context_mean.ndim != 1 or context_std.shape != context_mean.shape:
                raise ValueError("context_mean and context_std must both have shape (C,)")
            width = getattr(flow, "context_features", None)
            if width != context_mean.shape[0]:
                raise ValueError(
                    f"context_mean has {context_mean.shape[0]} features but the flow's context "
                    f"width is {width}"
                )
        self.register_buffer("context_mean", context_mean)
        self.register_buffer("context_std", context_std)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def context_features(self) -> int | None:
        """Width C of the context, None for an unconditional flow."""
        return None if self.context_mean is None else self.context_mean.shape[0]

    def log_scale(self) -> torch.Tensor:
        """``sum(log std)``, the log-volume change from model to data units (scalar)."""
        return torch.log(self.std).sum()

    def standardize_context(self, context, rows: int | None = None):
        """Context in data units -> model units (None stays None when unconditional).

        ``context``: (rows, C) when ``rows`` is given (a batch next to x), else (C,) or (M, C).
        Raises ValueError/TypeError naming ``context``.
        """
        width = self.context_features
        if width is None:
            if context is not None:
                raise ValueError("context must be None: this model is unconditional")
            return None
        if context is None:
            raise ValueError(f"context is required: this model is conditional on C={width}")
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if rows is not None:
            ensure_batch(context, "context", width)
            if context.shape[0] != rows:
                raise ValueError(
                    f"context must have one row per point: {rows} rows expected, "
                    f"got {context.shape[0]}"
                )
        elif context.ndim not in (1, 2) or context.shape[-1] != width:
            raise ValueError(
                f"context must have shape ({width},) or (M, {width}), got {tuple(context.shape)}"
            )
        return (context - self.context_mean) / self.context_std

    def _kw(self, context, rows: int | None = None) -> dict:
        c = self.standardize_context(context, rows)
        return {} if c is None else {"context": c}

    def f(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """Data -> latent.  x: (N, D), context (N, C) -> (z (N, D), log_det (N,))."""
        ensure_batch(x, "x", self.dim)
        z, log_det = self.flow.f((x - self.mean) / self.std, **self._kw(context, x.shape[0]))
        return z, log_det - self.log_scale()

    def g(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Latent -> data.  z: (N, D), context (N, C) -> (N, D)."""
        ensure_batch(z, "z", self.dim)
        return self.flow.g(z, **self._kw(context, z.shape[0])) * self.std + self.mean

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """log-density (of x given context) in data units.  (N, D), (N, C) -> (N,)."""
        ensure_batch(x, "x", self.dim)
        kw = self._kw(context, x.shape[0])
        return self.flow.log_prob((x - self.mean) / self.std, **kw) - self.log_scale()

    def sample(
        self,
        num_samples: int,
        generator: torch.Generator | None = None,
        *,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Samples in data units.  -> (num_samples, D).

        Conditional: ``context`` (C,) -> (num_samples, D), (M, C) -> (num_samples, M, D).
        """
        ensure_num_samples(num_samples)
        kw = self._kw(context)
        return self.flow.sample(num_samples, generator=generator, **kw) * self.std + self.mean

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        return self.f(x, context)


def build_model(config: TrainConfig, split: DataSplit) -> DataFlow:
    """The flow of ``config`` (initialised from its seed) with ``split``'s standardization."""
    torch.manual_seed(config.seed)
    width = split.context_features
    flow = build_flow(
        config.impl, split.dim, config.layers, config.hidden, width, config.norm,
        config.permutation,
    )  # fmt: skip
    st = split.standardizer
    if width is None:
        return DataFlow(flow, torch.from_numpy(st.mean), torch.from_numpy(st.std))
    cst = split.context_standardizer
    return DataFlow(
        flow,
        torch.from_numpy(st.mean),
        torch.from_numpy(st.std),
        torch.from_numpy(cst.mean),
        torch.from_numpy(cst.std),
    )


def _batches(x: torch.Tensor, context, batch: int):
    for start in range(0, x.shape[0], batch):
        c = None if context is None else context[start : start + batch]
        yield x[start : start + batch], c


@torch.no_grad()
def evaluate_nll(
    model: DataFlow, x: torch.Tensor, batch: int = 8192, context: torch.Tensor | None = None
) -> float:
    """Mean negative log-likelihood of ``x`` (N, D) in nats per sample, data units.

    Conditional models take ``context`` (N, C) in data units: the NLL of x given c.
    """
    ensure_batch(x, "x", model.dim)
    total = 0.0
    for xb, cb in _batches(x, context, batch):
        total += float(-model.log_prob(xb, cb).double().sum())
    return total / x.shape[0]


@torch.no_grad()
def latent(
    model: DataFlow, x: torch.Tensor, batch: int = 8192, context: torch.Tensor | None = None
) -> torch.Tensor:
    """``z = f(x)`` (or ``f(x | c)`` with ``context`` (N, C)) for (N, D) ``x`` in batches."""
    ensure_batch(x, "x", model.dim)
    return torch.cat([model.f(xb, cb)[0] for xb, cb in _batches(x, context, batch)])


def context_from_values(info: dict, values) -> torch.Tensor:
    """The (C,) context of a conditional run from a label or the context columns' values.

    Args:
        info: the run's ``"context"`` entry (checkpoint payload or ``DataSplit.context_info``).
        values: for ``kind == "label"`` one int label in [0, labels); for ``"columns"`` a
            sequence of C numbers in data units, or a comma-separated string of either.
    """
    if not isinstance(info, dict) or info.get("kind") not in ("label", "columns"):
        raise ValueError("context: the run has no valid context entry (is it conditional?)")
    if isinstance(values, str):
        items = [v.strip() for v in values.split(",")]
    elif isinstance(values, (int, float)) and not isinstance(values, bool):
        items = [values]
    else:
        items = list(values)
    if info["kind"] == "label":
        k = int(info["labels"])
        try:
            (item,) = items
            label = int(item)
            if isinstance(item, bool) or float(item) != label:
                raise ValueError
        except (ValueError, TypeError):
            raise ValueError(
                f"context of this run is a label: one int in [0, {k}), got {values!r}"
            ) from None
        if not 0 <= label < k:
            raise ValueError(f"context label must be in [0, {k}), got {label}")
        return torch.from_numpy(one_hot(np.array([label]), k)[0])
    width = int(info["features"])
    try:
        numbers = [float(v) for v in items]
    except (ValueError, TypeError):
        raise ValueError(f"context must be {width} numbers, got {values!r}") from None
    if len(numbers) != width or not all(math.isfinite(v) for v in numbers):
        names = info.get("names") or [f"column {j}" for j in info["columns"]]
        raise ValueError(
            f"context must be {width} finite numbers ({', '.join(map(str, names))}), got {values!r}"
        )
    return torch.tensor(numbers, dtype=torch.float32)


def _cosine_factor(total: int):
    # Closed form in the step, so a resumed run recomputes exactly the same learning rate.
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _make_scheduler(optimizer, config: TrainConfig):
    if config.schedule == "cosine":
        factor = _cosine_factor(config.steps)
    else:
        factor = lambda step: 1.0  # noqa: E731 - a constant schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_checkpoint(path, payload: dict) -> None:
    """Write atomically with a digest (temporary file, then rename): see
    ``fastnvp.training.checkpoint``."""
    ckpt.save(path, payload)


def load_checkpoint(path) -> dict:
    """Load a run's checkpoint (a run directory or the ``.pt`` file) with ``weights_only=True``."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ckpt.CheckpointError(f"no checkpoint at {str(path)!r}")
    return ckpt.load(path, expected_format=CHECKPOINT_FORMAT, kind="fastnvp run")


def _built_from(config: TrainConfig) -> str:
    text = f"impl={config.impl}, layers={config.layers}, hidden={config.hidden}"
    if config.context_features is not None:
        text += f", context={config.context_features}"
    return text


def _checkpoint_context(payload: dict, config: TrainConfig, source: str) -> int | None:
    """The context width C a checkpoint records, checked against its config (None: none)."""
    width = config.context_features
    info = payload.get("context")
    if width is None and info is None:
        return None
    if not isinstance(info, dict) or info.get("features") != width:
        found = info.get("features") if isinstance(info, dict) else info
        raise ckpt.CheckpointError(
            f"{source}: the config describes a context of width {width} but the checkpoint's "
            f"context entry records {found!r}"
        )
    return width


def _model_from_checkpoint(payload: dict, config: TrainConfig, source: str) -> DataFlow:
    """The model ``config`` describes, loaded with the payload's weights once they fit it."""
    state = payload.get("model")
    mean = state.get("mean") if isinstance(state, dict) else None
    if not isinstance(mean, torch.Tensor) or mean.ndim != 1 or mean.shape[0] < 2:
        raise ckpt.CheckpointError(f"{source}: the checkpoint has no model state with a (D,) mean")
    width = _checkpoint_context(payload, config, source)
    flow = build_flow(
        config.impl, mean.shape[0], config.layers, config.hidden, width, config.norm,
        config.permutation,
    )  # fmt: skip
    if width is None:
        model = DataFlow(flow, mean, torch.ones_like(mean))
    else:
        model = DataFlow(flow, mean, torch.ones_like(mean), torch.zeros(width), torch.ones(width))
    ckpt.check_state_dict(model, state, source=source, built_from=_built_from(config))
    model.load_state_dict(state)
    return model


def _checkpoint_config(payload: dict, source) -> TrainConfig:
    try:
        return TrainConfig.from_dict(payload.get("config"))
    except (TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{str(source)!r}: the stored config is invalid: {exc}") from exc


def load_run(path) -> tuple[DataFlow, TrainConfig, dict]:
    """Rebuild the trained model of a run.  -> (model in eval mode, config, checkpoint dict).

    A conditional run gives a conditional model (``model.context_features`` C); the payload's
    ``"context"`` entry describes its context (see :func:`context_from_values`).
    """
    payload = load_checkpoint(path)
    config = _checkpoint_config(payload, path)
    model = _model_from_checkpoint(payload, config, repr(str(path)))
    return model.eval(), config, payload


@dataclass
class TrainResult:
    """What :func:`train` returns; ``history`` is the same dict as in the checkpoint."""

    model: DataFlow
    config: TrainConfig
    split: DataSplit
    step: int
    history: dict
    elapsed: float  # seconds of training, summed over resumed segments
    metrics: dict | None  # the metrics.json content; None when stopped before the last step


def train(
    config: TrainConfig,
    out_dir,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    desc: str | None = None,
    world: distributed.World | None = None,
) -> TrainResult:
    """Train (or with ``resume`` continue) the run in ``out_dir`` up to ``config.steps`` steps.

    Args:
        config: the run's settings. With ``resume``, the checkpoint's config is used instead,
            except that ``config.steps`` may extend the run (the cosine schedule then stretches
            to the new length, so the result differs from a fresh run of that length).
        out_dir: run directory; created if missing.
        overwrite: start afresh even if ``out_dir`` holds a checkpoint. Without it (and without
            ``resume``) an existing run is never replaced: ``FileExistsError``. ``resume`` and
            ``overwrite`` together are a ``ValueError``.
        progress: show a tqdm bar with the running loss.
        stop_after: stop (and checkpoint) once this global step is reached; for interrupting a
            run deliberately, e.g. to test resume.
        desc: label of the progress
        bar.
        world: from ``fastnvp.training.distributed.init()`` for data-parallel training
        (``config.batch``
            is the global batch, split evenly across ranks); None trains in this process alone.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    world = distributed.World() if world is None else world
    if not isinstance(world, distributed.World):
        raise TypeError(
            f"world must be a fastnvp.training.distributed.World, got {type(world).__name__}"
        )
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be None or an int >= 1, got {stop_after!r}")
    if config.norm == "batchnorm" and world.size > 1:
        raise ValueError(
            "norm='batchnorm' normalizes each process's shard with its own batch statistics, so "
            "data-parallel replicas would diverge: with torchrun use norm='actnorm' or None"
        )
    if resume and overwrite:
        raise ValueError(
            "resume (--resume) continues the run in out_dir and overwrite (--overwrite) "
            "replaces it: give one, not both"
        )
    out = Path(out_dir)
    payload = None
    if not resume and not overwrite and (out / CHECKPOINT).exists():
        raise FileExistsError(
            f"{str(out)!r} already holds a run ({CHECKPOINT}); pass resume=True (--resume) to "
            "continue it or overwrite=True (--overwrite) to replace it"
        )
    if resume:
        payload = load_checkpoint(out)
        steps = config.steps
        config = _checkpoint_config(payload, out)
        _checkpoint_context(payload, config, repr(str(out)))
        if steps < payload["step"]:
            raise ValueError(f"steps ({steps}) is below the checkpoint's step {payload['step']}")
        config.steps = max(config.steps, steps)
    # The data first: a data set that cannot be trained on leaves no run directory behind.
    split = prepare_data(config)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(config, split).to(world.device)
    optimizer = optim.adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _make_scheduler(optimizer, config)
    batches = torch.Generator().manual_seed(config.seed + 1)
    history = {"train_loss": [], "test_steps": [], "test_nll": []}
    step, elapsed = 0, 0.0
    if payload is not None:
        state = payload.get("model")
        ckpt.check_state_dict(model, state, source=repr(str(out)), built_from=_built_from(config))
        model.load_state_dict(state)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["rng"]["torch"])
        batches.set_state(payload["rng"]["batches"])
        history = payload["history"]
        step, elapsed = int(payload["step"]), float(payload["elapsed"])
    if world.is_main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    def checkpoint() -> None:
        if not world.is_main:
            return
        contents = {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "batches": batches.get_state()},
            "step": step,
            "elapsed": elapsed,
            "history": history,
        }
        if split.context_info is not None:
            contents["context"] = split.context_info
        save_checkpoint(out / CHECKPOINT, contents)

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    x_train, x_test = split.x_train.to(world.device), split.x_test.to(world.device)
    c_test = None if split.c_test is None else split.c_test.to(world.device)
    # The model-unit context of every training row, once (its standardization is fixed).
    cu_train = model.standardize_context(
        None if split.c_train is None else split.c_train.to(world.device), x_train.shape[0]
    )
    _initialize_actnorm(model, x_train, cu_train, config.batch)
    flow = distributed.wrap(model.flow, world)  # DDP replica when distributed
    sampler = distributed.ShardedBatches(x_train.shape[0], config.batch, batches, world)
    log_scale = float(model.log_scale())
    model.train()
    bar = _progress_bar(
        config.steps, step, desc or f"L={config.layers}", progress and world.is_main
    )
    started = time.perf_counter()
    try:
        while step < end:
            idx = sampler.next()
            idx = idx.to(world.device)
            u = (x_train[idx] - model.mean) / model.std
            loss = distributed.nll(flow, u, None if cu_train is None else cu_train[idx])
            # The global batch's loss: every rank sees the same value and stops together.
            global_loss = distributed.mean_across(loss.detach(), world)
            if not torch.isfinite(global_loss):
                raise FloatingPointError(
                    f"training loss is {float(global_loss)} at step {step + 1} of "
                    f"L={config.layers}; lower lr or clip"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            # Reported in data units, like the test NLL.
            history["train_loss"].append(global_loss.item() + log_scale)
            if world.is_main and (step % config.eval_every == 0 or step == config.steps):
                model.eval()
                history["test_steps"].append(step)
                history["test_nll"].append(evaluate_nll(model, x_test, context=c_test))
                model.train()
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == end:
                    postfix = {"loss": f"{history['train_loss'][-1]:.3f}"}
                    if history["test_nll"]:
                        postfix["test"] = f"{history['test_nll'][-1]:.3f}"
                    bar.set_postfix(postfix, refresh=False)
            if step % config.checkpoint_every == 0 and step < end:
                elapsed += time.perf_counter() - started
                started = time.perf_counter()
                checkpoint()
    finally:
        if bar is not None:
            bar.close()
    elapsed += time.perf_counter() - started
    checkpoint()
    model = model.eval().to("cpu")
    metrics = None
    if step == config.steps and world.is_main:
        metrics = run_metrics(model, config, split, history, elapsed)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return TrainResult(model, config, split, step, history, elapsed, metrics)


@torch.no_grad()
def _initialize_actnorm(model: DataFlow, x_train, cu_train, rows: int) -> None:
    """ActNorm's data-dependent initialization from the first ``rows`` training rows, before
    any replica is made: every process sees the same rows, so every replica starts equal (the
    first sampled minibatch differs between processes). A loaded run is already initialized."""
    norms = getattr(model.flow, "norms", None)
    if getattr(model.flow, "norm", None) != "actnorm" or all(n.is_initialized for n in norms):
        return
    count = min(max(rows, 2), x_train.shape[0])
    u = (x_train[:count] - model.mean) / model.std
    context = None if cu_train is None else cu_train[:count]
    model.flow.f(u, context)


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def run_metrics(
    model: DataFlow, config: TrainConfig, split: DataSplit, history: dict, elapsed: float
) -> dict:
    """Final numbers of a run: test NLL (nats/sample, data units) and latent Gaussianity."""
    from fastnvp.analysis.stats import latent_gaussianity

    z = latent(model, split.x_test, context=split.c_test)
    if not torch.isfinite(z).all():
        raise FloatingPointError(f"f(x_test) has non-finite values for L={config.layers}")
    tail = history["train_loss"][-min(100, len(history["train_loss"])) :]
    metrics = {
        "layers": config.layers,
        "hidden": config.hidden,
        "steps": config.steps,
        "test_nll": evaluate_nll(model, split.x_test, context=split.c_test),
        "train_loss_last100": float(np.mean(tail)),
        "gaussianity": latent_gaussianity(z),
        "train_seconds": elapsed,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if split.context_info is not None:
        # test_nll is then the conditional NLL, -mean log p(x | c).
        metrics["context"] = split.context_info
    return metrics
