"""Toy data generators, the file loader, splits, standardization and the moons density."""

import math

import numpy as np
import pytest

from fastnvp.analysis.experiment import MOONS_ENTROPY
from fastnvp.training.data import (
    DATASETS,
    Standardizer,
    load_array,
    make_dataset,
    moons_entropy,
    moons_log_density,
    train_test_split,
    two_moons,
)

NUM_LABELS = {
    "moons": 2,
    "circles": 2,
    "8gaussians": 8,
    "checkerboard": 8,
    "pinwheel": 5,
    "2spirals": 2,
}


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_generator_shapes_dtypes_labels(name, n):
    x, labels = make_dataset(name, n, seed=3)
    assert x.shape == (n, 2) and x.dtype == np.float32
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert np.all(np.isfinite(x))
    assert labels.min() >= 0 and labels.max() < NUM_LABELS[name]
    if n == 1000:
        # Every component is drawn.
        assert len(np.unique(labels)) == NUM_LABELS[name]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_generators_are_deterministic_in_the_seed(name):
    a = make_dataset(name, 200, seed=11)
    b = make_dataset(name, 200, seed=11)
    c = make_dataset(name, 200, seed=12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_moons_labels_name_the_moon():
    x, labels = two_moons(4000, noise=0.05, seed=0)
    outer, inner = x[labels == 0], x[labels == 1]
    # Moon 0 lies on the unit circle around the origin (upper half), moon 1 on the unit
    # circle around (1, 0.5) (lower half).
    r0 = np.linalg.norm(outer, axis=1)
    r1 = np.linalg.norm(inner - np.array([1.0, 0.5]), axis=1)
    assert abs(r0.mean() - 1) < 0.01 and abs(r1.mean() - 1) < 0.01
    assert r0.std() < 0.07 and r1.std() < 0.07
    assert outer[:, 1].mean() > 0.5 and inner[:, 1].mean() < 0.0
    assert len(outer) == len(inner) == 2000


def test_moons_noise_default_and_zero():
    x, labels = two_moons(500, noise=0.0, seed=1)
    centers = np.where(labels[:, None] == 0, 0.0, np.array([1.0, 0.5]))
    np.testing.assert_allclose(np.linalg.norm(x - centers, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(two_moons(50, seed=2)[0], two_moons(50, noise=0.05, seed=2)[0])


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"n": 0}, ValueError, "n"),
        ({"n": 2.5}, TypeError, "n"),
        ({"n": 5, "noise": -1.0}, ValueError, "noise"),
        ({"n": 5, "noise": "big"}, TypeError, "noise"),
        ({"n": 5, "seed": -1}, ValueError, "seed"),
    ],
)
def test_generator_argument_errors_name_the_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        two_moons(**kwargs)


def test_make_dataset_rejects_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        make_dataset("swissroll", 10)


def test_load_array_npy_and_csv(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 3))
    np.save(tmp_path / "a.npy", x)
    np.savetxt(tmp_path / "b.csv", x, delimiter=",")
    np.savetxt(tmp_path / "c.csv", x, delimiter=",", header="u,v,w", comments="")
    for name in ("a.npy", "b.csv", "c.csv"):
        got = load_array(tmp_path / name)
        assert got.dtype == np.float32 and got.shape == (20, 3)
        np.testing.assert_allclose(got, x, rtol=1e-6)


def test_load_array_errors(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        load_array(tmp_path / "missing.npy")
    (tmp_path / "x.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"\.npy or \.csv"):
        load_array(tmp_path / "x.txt")
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        load_array(tmp_path / "flat.npy")
    bad = np.ones((4, 2))
    bad[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="1 rows with NaN"):
        load_array(tmp_path / "nan.npy")
    (tmp_path / "words.csv").write_text("a,b\n1,x\n2,3\n")
    with pytest.raises(ValueError, match="line 2, column 2: 'x' is not a number"):
        load_array(tmp_path / "words.csv")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n4,5\n")
    with pytest.raises(ValueError, match="line 2 has 1 column, line 1 has 2"):
        load_array(tmp_path / "ragged.csv")
    # A numeric first row is data, never taken for a header: its extra column is an error.
    (tmp_path / "ragged_first.csv").write_text("1,2,3\n4,5\n6,7\n8,9\n")
    with pytest.raises(ValueError, match="line 2 has 2 columns, line 1 has 3"):
        load_array(tmp_path / "ragged_first.csv")
    (tmp_path / "text.npy").write_text("not an array")  # numpy would advise unpickling it
    with pytest.raises(ValueError, match=r"not a NumPy \.npy array.*no \.npy header"):
        load_array(tmp_path / "text.npy")
    np.save(tmp_path / "objects.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object array"):
        load_array(tmp_path / "objects.npy")
    with pytest.raises(TypeError, match="path"):
        load_array(3)


def test_train_test_split_is_seeded_disjoint_and_complete():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    labels = np.arange(20)
    a = train_test_split(x, labels, 0.25, seed=4)
    b = train_test_split(x, labels, 0.25, seed=4)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    x_tr, x_te, y_tr, y_te = a
    assert len(x_te) == 5 and len(x_tr) == 15
    assert sorted(np.concatenate([y_tr, y_te]).tolist()) == list(range(20))
    np.testing.assert_array_equal(x_tr[:, 0], 2 * y_tr)
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(x, labels, 1.5, seed=0)


def test_standardizer_round_trip_and_log_scale():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 3)) * np.array([0.5, 2.0, 10.0]) + 3.0).astype(np.float32)
    st = Standardizer.fit(x)
    u = st.transform(x)
    np.testing.assert_allclose(u.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(u.std(0), 1, atol=1e-5)
    np.testing.assert_allclose(st.inverse(u), x, rtol=1e-5, atol=1e-5)
    assert st.log_scale == pytest.approx(np.log(x.astype(np.float64).std(0)).sum())
    x[:, 1] = 7.0
    with pytest.raises(ValueError, match=r"constant feature\(s\) \[1\]"):
        Standardizer.fit(x)


def test_moons_density_integrates_to_one():
    # Riemann sum over a box holding all but a negligible tail of the mass.
    # Sums of a Gaussian on a grid of step h = 0.4 σ are exact to ~exp(-2π²σ²/h²) ≈ 1e-54.
    h = 0.02
    gx, gy = np.meshgrid(np.arange(-1.4, 2.4, h), np.arange(-0.9, 1.4, h))
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    total = np.exp(moons_log_density(pts, 0.05, num_angles=512)).sum() * h * h
    assert total == pytest.approx(1.0, abs=2e-3)


def test_moons_density_matches_a_histogram_of_samples():
    x, _ = two_moons(200_000, noise=0.05, seed=5)
    # Probability of a small box around a point on moon 0: counted vs integrated density.
    center, half = np.array([0.0, 1.0]), 0.05
    inside = np.all(np.abs(x - center) < half, axis=1).mean()
    h = 0.0025
    g = np.arange(-half + h / 2, half, h)
    gx, gy = np.meshgrid(center[0] + g, center[1] + g)
    mass = np.exp(moons_log_density(np.stack([gx.ravel(), gy.ravel()], 1))).sum() * h * h
    assert inside == pytest.approx(mass, rel=0.05)


def test_moons_entropy_agrees_with_the_stored_value():
    value, se = moons_entropy(0.05, num_samples=8000, seed=3)
    stored, stored_se = MOONS_ENTROPY[0.05]
    assert abs(value - stored) < 4 * math.hypot(se, stored_se)
    # Uniform density on two half circles of total length 2π with Gaussian cross-section:
    # H ≈ log(2π) + ½ log(2πe σ²) = 0.261; the arcs' ends add a little.
    assert 0.26 < stored < 0.30
