"""The 8×8 digits study: split, dequantization + logit transform, NLL bookkeeping, baseline."""

import math
import sys

import numpy as np
import pytest
import torch

from fastnvp.training.digits import (
    LEVELS,
    PIXELS,
    SIDE,
    DigitsSplit,
    LogitTransform,
    bits_per_dim,
    evaluate_nll,
    fit_gaussian,
    image_grid,
    load_digits_split,
    nats_per_image,
)

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def _row_keys(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.numpy().astype(np.uint8)}


def test_constants():
    assert (LEVELS, PIXELS, SIDE) == (17, 64, 8)
    assert (DigitsSplit.LEVELS, DigitsSplit.PIXELS, DigitsSplit.SIDE) == (17, 64, 8)


def test_split_sizes_dtypes_values(split):
    sizes = {"train": 1350, "val": 150, "test": 297}
    for name, n in sizes.items():
        x, labels = getattr(split, name), getattr(split, f"{name}_labels")
        assert x.shape == (n, 64) and x.dtype == torch.float32
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) <= 9
        assert torch.equal(x, torch.round(x))
        assert float(x.min()) >= 0 and float(x.max()) <= 16
    # All ten classes reach training, and every pixel level occurs.
    assert set(split.train_labels.tolist()) == set(range(10))
    assert set(split.train.unique().tolist()) == set(range(17))


def test_split_disjoint_and_covers_data(split):
    from sklearn.datasets import load_digits

    digits = load_digits()
    # The 1797 images are distinct, so an image's pixels identify its index in the data set.
    everything = {
        row.tobytes(): int(c) for row, c in zip(digits.data.astype(np.uint8), digits.target)
    }
    assert len(everything) == 1797
    keys = {name: _row_keys(getattr(split, name)) for name in ("train", "val", "test")}
    assert len(keys["train"]) == 1350 and len(keys["val"]) == 150 and len(keys["test"]) == 297
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    assert keys["train"] | keys["val"] | keys["test"] == set(everything)
    # Labels travel with their images.
    for name in ("train", "val", "test"):
        x, labels = getattr(split, name), getattr(split, f"{name}_labels")
        for row, label in zip(x.numpy().astype(np.uint8), labels.tolist()):
            assert everything[row.tobytes()] == label


def test_split_deterministic_per_seed(split):
    again = load_digits_split(seed=0)
    other = load_digits_split(seed=1)
    assert torch.equal(again.train, split.train) and torch.equal(again.test, split.test)
    assert torch.equal(again.val_labels, split.val_labels)
    assert not torch.equal(other.test, split.test)
    small = load_digits_split(n_val=10, n_test=20, seed=5)
    assert (small.train.shape[0], small.val.shape[0], small.test.shape[0]) == (1767, 10, 20)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"n_val": 1000, "n_test": 797}, ValueError, "n_val"),
        ({"n_val": 0}, ValueError, "n_val"),
        ({"n_test": 2.5}, TypeError, "n_test"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": True}, TypeError, "seed"),
    ],
)
def test_split_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        load_digits_split(**kwargs)


def test_split_missing_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits_split()


def test_logit_roundtrip_float64():
    t = LogitTransform(alpha=0.05)
    u = torch.rand(50, 7, dtype=torch.float64)
    u[0, 0], u[0, 1] = 0.0, 1.0
    y, log_det = t.forward(u)
    assert y.dtype == torch.float64 and log_det.shape == (50,)
    torch.testing.assert_close(t.inverse(y), u, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha, levels", [(0.05, 17), (0.0, 17), (0.2, 4)])
def test_log_det_matches_autograd_jacobian(alpha, levels):
    t = LogitTransform(alpha=alpha, levels=levels)
    x = torch.randint(0, levels, (4, 5)).double()
    v = x + torch.rand(4, 5, dtype=torch.float64).clamp(0.01, 0.99)
    _, log_det = t.forward(v / levels)
    for i in range(v.shape[0]):
        # The map v -> y of one image; its Jacobian is diagonal, autograd computes all of it.
        jac = torch.autograd.functional.jacobian(
            lambda row: t.forward(row[None] / levels)[0][0], v[i]
        )
        assert jac.shape == (5, 5)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign.item() == 1.0
        torch.testing.assert_close(log_det[i], logabsdet, rtol=1e-12, atol=1e-10)


def test_dequantize_range_and_to_pixels_roundtrip(split):
    t = LogitTransform()
    x = split.train[:200]
    u = t.dequantize(x, generator=torch.Generator().manual_seed(3))
    assert u.dtype == torch.float32 and u.shape == x.shape
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.all((u * LEVELS >= x) & (u * LEVELS < x + 1 + 1e-5))
    y, _ = t.forward(u)
    assert torch.equal(t.to_pixels(y), x)
    x64 = x.double()
    y64, _ = t.forward(t.dequantize(x64, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(t.to_pixels(y64), x64)
    # Samples beyond the squeezed range are clamped to the end levels.
    far = torch.tensor([[-50.0, 50.0]])
    assert torch.equal(t.to_pixels(far), torch.tensor([[0.0, 16.0]]))


def test_dequantize_generator_determinism(split):
    t = LogitTransform()
    x = split.val
    a = t.dequantize(x, generator=torch.Generator().manual_seed(7))
    b = t.dequantize(x, generator=torch.Generator().manual_seed(7))
    c = t.dequantize(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _uniform_log_prob(alpha: float):
    """log p_Y of y when v is uniform on [0, L)^D: p is uniform on [α, 1-α], p(1-p)/(1-2α)."""

    def log_prob(y):
        terms = torch.nn.functional.logsigmoid(y) + torch.nn.functional.logsigmoid(-y)
        return (terms - math.log(1 - 2 * alpha)).sum(dim=1)

    return log_prob


def test_uniform_model_scores_log_levels(split):
    # Uniform on [0, L)^D gives every dequantized image density L^-D: exactly D ln L nats.
    t = LogitTransform(alpha=0.05)
    nats = evaluate_nll(_uniform_log_prob(0.05), split.test, t, samples=2, batch=100)
    assert nats == pytest.approx(64 * math.log(17), rel=1e-5)
    assert bits_per_dim(nats) == pytest.approx(math.log2(17), rel=1e-5)


def test_nats_and_bits_per_dim():
    log_prob = torch.tensor([-1.0, 2.0, 0.5])
    log_det = torch.tensor([3.0, -4.0, 0.0])
    assert torch.equal(nats_per_image(log_prob, log_det), torch.tensor([-2.0, 2.0, -0.5]))
    assert bits_per_dim(100.0, 64) == pytest.approx(100.0 / (64 * math.log(2)))
    assert bits_per_dim(100.0) == bits_per_dim(100.0, 64)
    nats = torch.tensor([64 * math.log(2), 128 * math.log(2)])
    torch.testing.assert_close(bits_per_dim(nats, 64), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="log_det"):
        nats_per_image(log_prob, log_det[:2])
    with pytest.raises(ValueError, match="log_prob_y"):
        nats_per_image(log_prob[None], log_det)
    with pytest.raises(ValueError, match="dim"):
        bits_per_dim(1.0, 0)


def test_gaussian_baseline(split, one_thread):
    t = LogitTransform(alpha=0.05)
    y, _ = t.forward(t.dequantize(split.train, generator=torch.Generator().manual_seed(0)))
    gauss = fit_gaussian(y)
    assert gauss.loc.dtype == torch.float32 and gauss.loc.shape == (64,)
    torch.testing.assert_close(gauss.loc, y.mean(0), rtol=0, atol=1e-4)

    def nll(log_prob_fn, batch=1024):
        gen = torch.Generator().manual_seed(1)
        return evaluate_nll(log_prob_fn, split.test, t, samples=4, generator=gen, batch=batch)

    gauss_nats = nll(gauss.log_prob)
    normal = torch.distributions.Normal(0.0, 1.0)
    normal_nats = nll(lambda y: normal.log_prob(y).sum(1))
    assert math.isfinite(gauss_nats) and gauss_nats < normal_nats
    # The reference point: about 108.5 nats per image for a 1500-image train set.
    assert 104 < gauss_nats < 113
    # Every draw dequantizes the whole set, so batching does not change the result.
    assert nll(gauss.log_prob, batch=50) == pytest.approx(gauss_nats, rel=1e-6)
    # Different dequantization draws differ, but only by Monte Carlo error.
    other = evaluate_nll(gauss.log_prob, split.test, t, generator=torch.Generator().manual_seed(2))
    assert other != gauss_nats and abs(other - gauss_nats) < 1.0


def test_fit_gaussian_ridge_and_errors():
    y = torch.randn(200, 3, dtype=torch.float64)
    y[:, 2] = 1.0  # a constant column: singular covariance, rescued by the ridge
    gauss = fit_gaussian(y, dtype=torch.float64)
    assert torch.isfinite(gauss.log_prob(y)).all()
    with pytest.raises(ValueError, match="y"):
        fit_gaussian(torch.randn(3, 3))
    with pytest.raises(ValueError, match="y"):
        fit_gaussian(torch.randn(10))
    with pytest.raises(TypeError, match="y"):
        fit_gaussian(torch.ones(10, 2, dtype=torch.int64))


def test_evaluate_nll_bad_arguments(split):
    t = LogitTransform()
    x = split.test[:10]
    with pytest.raises(ValueError, match="log_prob_fn"):
        evaluate_nll(lambda y: y, x, t)
    with pytest.raises(ValueError, match="log_prob_fn"):
        evaluate_nll(lambda y: torch.full((y.shape[0],), float("nan")), x, t)
    with pytest.raises(ValueError, match="samples"):
        evaluate_nll(_uniform_log_prob(0.05), x, t, samples=0)
    with pytest.raises(TypeError, match="transform"):
        evaluate_nll(_uniform_log_prob(0.05), x, None)


@pytest.mark.parametrize(
    "alpha, error", [(0.5, ValueError), (-0.1, ValueError), ("0.1", TypeError)]
)
def test_transform_bad_alpha(alpha, error):
    with pytest.raises(error, match="alpha"):
        LogitTransform(alpha=alpha)


@pytest.mark.parametrize("levels, error", [(1, ValueError), (17.0, TypeError)])
def test_transform_bad_levels(levels, error):
    with pytest.raises(error, match="levels"):
        LogitTransform(levels=levels)


@pytest.mark.parametrize(
    "x, error",
    [
        (torch.full((2, 64), 17.0), ValueError),
        (torch.full((2, 64), -1.0), ValueError),
        (torch.full((2, 64), 2.5), ValueError),
        (torch.full((2, 64), float("nan")), ValueError),
        (torch.zeros(64), ValueError),
        (torch.zeros(2, 8, 8), ValueError),
        (torch.zeros(2, 64, dtype=torch.int64), TypeError),
        (np.zeros((2, 64)), TypeError),
    ],
)
def test_dequantize_bad_x(x, error):
    with pytest.raises(error, match="x"):
        LogitTransform().dequantize(x)


def test_forward_bad_u():
    with pytest.raises(ValueError, match="u"):
        LogitTransform().forward(torch.full((2, 3), 1.5))
    with pytest.raises(ValueError, match="u"):
        LogitTransform(alpha=0.0).forward(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="u"):
        LogitTransform().forward(torch.zeros(3))


def test_image_grid(split):
    x = split.test[:6]
    grid = image_grid(x, 2, 3)
    assert grid.shape == (2 * 8 + 1, 3 * 8 + 2) and grid.dtype == np.float64
    images = x.numpy().reshape(6, 8, 8)
    np.testing.assert_array_equal(grid[:8, :8], images[0])
    np.testing.assert_array_equal(grid[:8, 9:17], images[1])
    np.testing.assert_array_equal(grid[9:, 18:], images[5])
    assert np.isnan(grid[8]).all() and np.isnan(grid[:, 8]).all() and np.isnan(grid[:, 17]).all()
    assert np.isfinite(grid).sum() == 6 * 64
    assert image_grid(x.numpy()[:1], 1, 1).shape == (8, 8)
    with pytest.raises(ValueError, match="x"):
        image_grid(x, 2, 2)
    with pytest.raises(ValueError, match="rows"):
        image_grid(x, 0, 3)


def test_public_data_module(split):
    """``fastnvp.data`` is the public home of the data sets (issue: digits through
    ``fastnvp.data``): the same objects, reachable from ``import fastnvp``, and its example
    gives finite nats per image with the shapes it states."""
    import fastnvp
    import fastnvp.training.data as toys
    import fastnvp.training.digits as digits

    data = fastnvp.data
    for name in data.__all__:
        assert getattr(data, name) is getattr(digits, name, None) or getattr(data, name) is getattr(
            toys, name
        )
    transform = data.LogitTransform()
    u = transform.dequantize(split.test, generator=torch.Generator().manual_seed(0))
    y, log_det = transform.forward(u)
    assert y.shape == (297, 64) and log_det.shape == (297,)
    flow = fastnvp.FastRealNVP.standard(64, 2, 8)
    with torch.no_grad():
        nats = data.nats_per_image(flow.log_prob(y), log_det)
    assert nats.shape == (297,) and torch.isfinite(nats).all()
    x, labels = data.make_dataset("moons", 10)
    assert x.shape == (10, 2) and labels.shape == (10,)
