"""Toy 2-D data sets, a loader for a user's own N×D arrays, train/test splits and standardization.

Every generator takes an explicit ``seed`` (a fresh ``numpy.random.Generator`` per call), so the
same arguments always give the same points, and returns ``(x, labels)``: ``x`` a float32 (n, 2)
array, ``labels`` an int64 (n,) array naming the component each point was drawn from (which
moon, which circle, which gaussian, ...), used to colour latent-space plots.

Conditional flows (docs/design.md §1.7, a context c (N, C) next to x) take their context from a
toy data set's labels (:func:`one_hot`, :data:`NUM_LABELS`) or from columns of a user's table
(:func:`parse_columns`, :func:`resolve_columns`, :func:`split_columns`);
:meth:`Standardizer.fit_context` standardizes the continuous context columns and leaves 0/1
indicator columns (one-hot labels) as they are.

Two moons is drawn from a known continuous mixture (uniform angle on each half circle plus
isotropic Gaussian noise), so its density and differential entropy can be computed exactly up
to quadrature and Monte Carlo error (:func:`moons_log_density`, :func:`moons_entropy`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _check_n(n, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return int(n)


def _check_noise(noise, name: str = "noise") -> float:
    if isinstance(noise, bool) or not isinstance(noise, (int, float, np.floating)):
        raise TypeError(f"{name} must be a float, got {type(noise).__name__}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {noise}")
    return float(noise)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def _finish(x: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """Shuffle points and labels together (generators build them component by component)."""
    order = rng.permutation(x.shape[0])
    return x[order].astype(np.float32), labels[order].astype(np.int64)


def _moon_centers(t: np.ndarray, moon: int) -> np.ndarray:
    """Points on the noiseless moon curves at angles ``t`` in [0, π].  (k,) -> (k, 2).

    Moon 0 is the upper half of the unit circle; moon 1 the lower half of the unit circle
    centred at (1, 0.5) (the layout of scikit-learn's ``make_moons``).
    """
    if moon == 0:
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    return np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)


def two_moons(n: int, noise: float = 0.05, seed: int = 0):
    """Two interleaved half circles.  -> (x (n, 2) float32, labels (n,) int64 in {0, 1}).

    Each moon gets half of the points (the first moon one more when ``n`` is odd); the angle is
    uniform on [0, π] and ``noise`` is the standard deviation of isotropic Gaussian noise.
    """
    n = _check_n(n)
    noise = _check_noise(noise)
    rng = np.random.default_rng(_check_seed(seed))
    n0 = n - n // 2
    parts, labels = [], []
    for moon, count in ((0, n0), (1, n // 2)):
        t = rng.uniform(0.0, math.pi, size=count)
        parts.append(_moon_centers(t, moon))
        labels.append(np.full(count, moon))
    x = np.concatenate(parts) + noise * rng.standard_normal((n, 2))
    return _finish(x, np.concatenate(labels), rng)


def circles(n: int, noise: float = 0.05, seed: int = 0, factor: float = 0.5):
    """Two concentric circles of radii 1 and ``factor``.  Labels: 0 outer, 1 inner."""
    n = _check_n(n)
    noise = _check_noise(noise)
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    rng = np.random.default_rng(_check_seed(seed))
    n0 = n - n // 2
    t = rng.uniform(0.0, 2 * math.pi, size=n)
    radius = np.where(np.arange(n) < n0, 1.0, factor)
    x = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    x = x + noise * rng.standard_normal((n, 2))
    return _finish(x, (np.arange(n) >= n0).astype(np.int64), rng)


def eight_gaussians(n: int, noise: float = 0.1, seed: int = 0, radius: float = 2.0):
    """Eight isotropic Gaussians (std ``noise``) evenly spaced on a circle.  Labels: 0..7."""
    n = _check_n(n)
    noise = _check_noise(noise)
    rng = np.random.default_rng(_check_seed(seed))
    labels = rng.integers(0, 8, size=n)
    angle = labels * (2 * math.pi / 8)
    x = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    x = x + noise * rng.standard_normal((n, 2))
    return _finish(x, labels, rng)


def checkerboard(n: int, noise: float = 0.0, seed: int = 0):
    """Uniform density on the 8 dark squares of a 4×4 board over [-2, 2]².  Labels: square 0..7.

    ``noise`` (default 0) adds Gaussian blur to the sharp square edges.
    """
    n = _check_n(n)
    noise = _check_noise(noise)
    rng = np.random.default_rng(_check_seed(seed))
    col = rng.integers(0, 4, size=n)
    row_pair = rng.integers(0, 2, size=n)
    # Dark squares: in column c the rows with (row + c) even.
    row = 2 * row_pair + (col % 2)
    x = np.stack([col + rng.uniform(size=n), row + rng.uniform(size=n)], axis=1) - 2.0
    x = x + noise * rng.standard_normal((n, 2))
    return _finish(x, col * 2 + row_pair, rng)


def pinwheel(n: int, noise: float = 0.1, seed: int = 0, arms: int = 5, rate: float = 0.25):
    """Pinwheel of ``arms`` curved Gaussian arms (tangential std ``noise``).  Labels: arm index."""
    n = _check_n(n)
    noise = _check_noise(noise)
    rng = np.random.default_rng(_check_seed(seed))
    radial_std = 0.3
    labels = rng.integers(0, arms, size=n)
    base = 2 * math.pi * labels / arms
    feats = rng.standard_normal((n, 2)) * np.array([radial_std, noise])
    feats[:, 0] += 1.0
    # Each point is rotated by its arm's base angle plus a twist that grows with the radius.
    angle = base + rate * np.exp(feats[:, 0])
    cos, sin = np.cos(angle), np.sin(angle)
    x = np.stack([cos * feats[:, 0] - sin * feats[:, 1], sin * feats[:, 0] + cos * feats[:, 1]], 1)
    return _finish(2.0 * x, labels, rng)


def two_spirals(n: int, noise: float = 0.1, seed: int = 0):
    """Two interleaved Archimedean spirals.  Labels: 0, 1."""
    n = _check_n(n)
    noise = _check_noise(noise)
    rng = np.random.default_rng(_check_seed(seed))
    n0 = n - n // 2
    turn = np.sqrt(rng.uniform(size=n)) * 3 * math.pi
    sign = np.where(np.arange(n) < n0, 1.0, -1.0)
    x = sign[:, None] * np.stack([-np.cos(turn) * turn, np.sin(turn) * turn], axis=1) / 3.0
    x = x + noise * rng.standard_normal((n, 2))
    return _finish(x, (np.arange(n) >= n0).astype(np.int64), rng)


# Name -> generator(n, noise=..., seed=...). Each generator's own default ``noise`` applies
# when the caller passes none.
DATASETS: dict[str, Callable] = {
    "moons": two_moons,
    "circles": circles,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "pinwheel": pinwheel,
    "2spirals": two_spirals,
}


# Number of distinct labels each toy generator returns with its default arguments (labels are
# 0 .. n-1): the width C of the one-hot context of a run conditioned on the label.
NUM_LABELS: dict[str, int] = {
    "moons": 2,
    "circles": 2,
    "8gaussians": 8,
    "checkerboard": 8,
    "pinwheel": 5,
    "2spirals": 2,
}


def one_hot(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Labels (n,) int in [0, num_labels) -> float32 (n, num_labels) one-hot rows."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D int array, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(
            f"labels must lie in [0, {num_labels}), got {labels.min()}..{labels.max()}"
        )
    return np.eye(num_labels, dtype=np.float32)[labels]


def make_dataset(name: str, n: int, seed: int = 0, noise: float | None = None):
    """Draw ``n`` points of the toy data set ``name``.  -> (x (n, 2) float32, labels (n,) int64)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    generator = DATASETS[name]
    if noise is None:
        return generator(n, seed=seed)
    return generator(n, noise=noise, seed=seed)


def load_array(path) -> np.ndarray:
    """Load a user's N×D data set from ``.npy`` or ``.csv`` as float32.  -> (N, D).

    A CSV may start with one header line; every other cell must be a number. Rows with a NaN or
    infinity are rejected (a flow's likelihood is undefined there).
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as exc:
            # numpy reads a file without the .npy header as a pickle and refuses it with advice
            # to unpickle; a data file is never unpickled here, so say what the file is instead.
            with open(path, "rb") as fh:
                has_header = fh.read(6) == b"\x93NUMPY"
            if not has_header:
                reason = "it has no .npy header"
            elif "pickle" in str(exc).lower():
                reason = "it holds an object array (pickled), which is not loaded"
            else:
                reason = str(exc)
            raise ValueError(
                f"path {str(path)!r} is not a NumPy .npy array (np.save): {reason}"
            ) from exc
    elif suffix == ".csv":
        # One header line is allowed, recognized as a first line that is not all numbers
        # (csv_header): a numeric first line is data, so a malformed one is reported, not
        # skipped.
        skip = 0 if csv_header(path) is None else 1
        try:
            x = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=skip)
        except ValueError as exc:
            raise ValueError(
                f"path {str(path)!r}: {_csv_problem(path, skip, exc)} (a CSV needs a number in "
                "every cell and the same number of columns in every row; one header line "
                "allowed)"
            ) from exc
    else:
        raise ValueError(f"path must end in .npy or .csv, got {str(path)!r}")
    if x.dtype.kind not in "fiu":
        raise TypeError(f"path {str(path)!r} holds dtype {x.dtype}; expected numbers")
    if x.ndim != 2:
        raise ValueError(f"path {str(path)!r} must hold an (N, D) array, got shape {x.shape}")
    if x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(
            f"path {str(path)!r} must hold N >= 2 rows and D >= 2 columns, got {x.shape}"
        )
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.all(np.isfinite(x), axis=1)))
        raise ValueError(f"path {str(path)!r} has {bad} rows with NaN or infinity")
    return x.astype(np.float32)


def _csv_problem(path: Path, skip: int, error: ValueError) -> str:
    """Where a CSV that ``np.loadtxt`` refused goes wrong, by file line (1-based): the first
    row whose column count differs from the first data row's, or the first cell that is not
    a number. Comments (``#``) and blank lines are skipped, as ``loadtxt`` does."""
    columns = first = None
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.split("#", 1)[0].strip()
            if number <= skip or not text:
                continue
            cells = text.split(",")
            if columns is None:
                columns, first = len(cells), number
            elif len(cells) != columns:
                plural = "" if len(cells) == 1 else "s"
                return f"line {number} has {len(cells)} column{plural}, line {first} has {columns}"
            for column, cell in enumerate(cells, start=1):
                try:
                    float(cell)
                except ValueError:
                    return f"line {number}, column {column}: {cell.strip()!r} is not a number"
    return str(error).split("; use `usecols`", 1)[0]  # numpy's own words, without its advice


def csv_header(path) -> list[str] | None:
    """The column names of a CSV's header line, or None when its first line is all numbers.

    Mirrors :func:`load_array`, which skips the first line exactly when it is not numeric.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return None
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
    cells = [c.strip() for c in first.rstrip("\r\n").split(",")]
    try:
        for cell in cells:
            float(cell)
    except ValueError:
        return [c.strip("\"'").strip() for c in cells]
    return None


def parse_columns(spec) -> list:
    """A column selection as given -> a list of 0-based ints and header names (str).

    ``spec`` is a comma-separated string (``"2,3"``, ``"age,height"``) or a sequence of ints and
    strings; items that read as integers become indices. Returns None for None.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        items = [v.strip() for v in spec.split(",")]
        if any(not v for v in items):
            raise ValueError(f"context columns must be comma-separated, got {spec!r}")
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise TypeError(
            f"context columns must be a comma-separated str or a list, got {type(spec).__name__}"
        )
    out = []
    for item in items:
        if isinstance(item, str):
            try:
                item = int(item)
            except ValueError:
                item = item.strip()
        elif isinstance(item, np.integer):
            item = int(item)
        out.append(item)
    return out


def resolve_columns(spec, num_columns: int, names: list[str] | None, source: str) -> list[int]:
    """Column indices of a selection (see :func:`parse_columns`) in a table of ``num_columns``.

    Header names are looked up in ``names`` (a CSV header, None without one). Raises ValueError
    naming ``source`` for an index out of range, an unknown name, a name without a header or a
    column chosen twice.
    """
    columns = []
    for item in parse_columns(spec):
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(f"context column {item!r} must be an int index or a header name")
        if isinstance(item, int):
            if not 0 <= item < num_columns:
                raise ValueError(
                    f"context column {item} is out of range: {source} has {num_columns} columns "
                    f"(0-based indices 0..{num_columns - 1})"
                )
            columns.append(item)
        elif names is None:
            raise ValueError(
                f"context column {item!r} is a name, but {source} has no header line; "
                "give 0-based column indices"
            )
        elif item not in names:
            raise ValueError(
                f"context column {item!r} is not in the header of {source} (columns: "
                f"{', '.join(names)})"
            )
        else:
            columns.append(names.index(item))
    if not columns:
        raise ValueError("context columns must name at least one column")
    if len(set(columns)) != len(columns):
        raise ValueError(f"context columns name a column twice: {columns}")
    return columns


def split_columns(table: np.ndarray, columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``table`` (N, D + C) -> (x (N, D): the other columns in order, c (N, C): ``columns``)."""
    rest = [j for j in range(table.shape[1]) if j not in set(columns)]
    return table[:, rest], table[:, columns]


def split_sizes(rows: int, test_fraction: float) -> tuple[int, int]:
    """(train rows, test rows) that :func:`train_test_split` gives ``rows`` rows: the test set
    gets ``round(test_fraction * rows)``, at least one, and the training set at least one."""
    n_test = min(max(1, round(test_fraction * rows)), rows - 1)
    return rows - n_test, n_test


def min_rows_for_split(test_fraction: float, minimum: int = 2) -> int:
    """The fewest rows whose split at ``test_fraction`` (in (0, 1)) leaves at least ``minimum``
    rows on each side (:func:`split_sizes`)."""
    if not isinstance(minimum, int) or minimum < 1:
        raise ValueError(f"minimum must be an int >= 1, got {minimum!r}")
    rows = 2  # counts up: about minimum / min(f, 1 - f) steps, once per training run
    while min(split_sizes(rows, test_fraction)) < minimum:
        rows += 1
    return rows


def train_test_split(x: np.ndarray, labels: np.ndarray | None, test_fraction: float, seed: int):
    """Seeded random split.  -> (x_train, x_test, labels_train, labels_test); labels may be None.

    The test set gets ``round(test_fraction * N)`` rows, at least one, and the training set at
    least one.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError(f"x must be an (N, D) numpy array, got {type(x).__name__}")
    if not isinstance(test_fraction, float) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if x.shape[0] < 2:
        raise ValueError(f"x needs at least 2 rows to split, got {x.shape[0]}")
    if labels is not None and labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have {x.shape[0]} entries like x, got {labels.shape[0]}")
    _, n_test = split_sizes(x.shape[0], test_fraction)
    order = np.random.default_rng(_check_seed(seed)).permutation(x.shape[0])
    test, train = order[:n_test], order[n_test:]
    if labels is None:
        return x[train], x[test], None, None
    return x[train], x[test], labels[train], labels[test]


@dataclass(frozen=True)
class Standardizer:
    """Per-feature affine map ``u = (x - mean) / std`` from data units to model units.

    A flow trained on ``u`` gives densities in data units through the change of variables
    ``log p_data(x) = log p_model((x - mean) / std) - sum(log std)``.
    """

    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        """Mean and standard deviation of each column of ``x`` (N, D)."""
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[0] < 2:
            raise ValueError("x must be an (N, D) numpy array with N >= 2")
        x = x.astype(np.float64)
        std = x.std(axis=0)
        constant = np.flatnonzero(~(std > 0))
        if constant.size:
            raise ValueError(
                f"x has constant feature(s) {constant.tolist()}: a density over them is degenerate"
            )
        return cls(x.mean(axis=0), std)

    @classmethod
    def fit_context(cls, c: np.ndarray) -> Standardizer:
        """Standardization of context columns ``c`` (N, C), continuous ones only.

        Columns whose values all lie in {0, 1} (indicators, one-hot labels) and constant columns
        keep mean 0 and std 1, i.e. pass through unchanged; the others get their mean and std.
        """
        if not isinstance(c, np.ndarray) or c.ndim != 2 or c.shape[0] < 1:
            raise ValueError("context must be an (N, C) numpy array with N >= 1")
        c = c.astype(np.float64)
        mean, std = c.mean(axis=0), c.std(axis=0)
        keep = indicator_columns(c) | ~(std > 0)
        return cls(np.where(keep, 0.0, mean), np.where(keep, 1.0, std))

    @property
    def log_scale(self) -> float:
        """``sum(log std)``: subtract from a model-unit log-density to get data units."""
        return float(np.log(self.std).sum())

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Data units -> model units.  (N, D) -> (N, D), dtype of ``x``."""
        return ((x - self.mean) / self.std).astype(x.dtype)

    def inverse(self, u: np.ndarray) -> np.ndarray:
        """Model units -> data units.  (N, D) -> (N, D), dtype of ``u``."""
        return (u * self.std + self.mean).astype(u.dtype)


def indicator_columns(c: np.ndarray) -> np.ndarray:
    """Which columns of ``c`` (N, C) hold only the values 0 and 1.  -> (C,) bool."""
    return np.all((c == 0) | (c == 1), axis=0)


def moons_log_density(x: np.ndarray, noise: float = 0.05, num_angles: int = 1024) -> np.ndarray:
    """Exact log-density of :func:`two_moons` at ``x`` (N, 2), by quadrature over the angle.

    ``p(x) = sum_k 1/2 * (1/π) ∫_0^π N(x; c_k(t), noise² I) dt``. The midpoint rule with
    ``num_angles`` nodes has node spacing π/num_angles, far below ``noise`` for the defaults, so
    the quadrature error is negligible next to Monte Carlo error. Returns (N,) float64.
    """
    noise = _check_noise(noise)
    if noise == 0:
        raise ValueError("noise must be > 0: without noise the moons have no density")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (N, 2), got {x.shape}")
    t = (np.arange(num_angles) + 0.5) * (math.pi / num_angles)
    centers = np.concatenate([_moon_centers(t, 0), _moon_centers(t, 1)])  # (2K, 2)
    out = np.empty(x.shape[0])
    # Mixture weight of each node: 1/2 per moon times 1/num_angles per node (uniform angle).
    log_w = -math.log(2 * num_angles)
    log_norm = -math.log(2 * math.pi * noise**2)
    for start in range(0, x.shape[0], 1024):
        chunk = x[start : start + 1024]
        d2 = ((chunk[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
        a = -0.5 * d2 / noise**2
        peak = a.max(axis=1, keepdims=True)
        out[start : start + 1024] = (
            peak[:, 0] + np.log(np.exp(a - peak).sum(axis=1)) + log_w + log_norm
        )
    return out


def moons_entropy(noise: float = 0.05, num_samples: int = 200_000, seed: int = 12345):
    """Differential entropy of :func:`two_moons` in nats: Monte Carlo of ``-E[log p(x)]``.

    Returns ``(entropy, standard_error)``. This is the lowest test NLL (nats per sample, in data
    units) any model can reach in expectation.
    """
    x, _ = two_moons(_check_n(num_samples, "num_samples"), noise=noise, seed=seed)
    log_p = moons_log_density(x, noise)
    return float(-log_p.mean()), float(log_p.std(ddof=1) / math.sqrt(num_samples))
