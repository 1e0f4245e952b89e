"""Every figure function writes a readable PNG; wrong inputs are rejected by name."""

import matplotlib.image
import pytest
import torch

from fastnvp.analysis.viz import (
    data_bounds,
    density_grid,
    plot_density,
    plot_depth_sheet,
    plot_figure1,
    plot_latent,
    plot_latent_sheet,
    plot_losses,
    plot_samples,
)
from fastnvp.training.data import two_moons
from fastnvp.training.train import DataFlow, build_flow

pytestmark = pytest.mark.usefixtures("one_thread")


def flow_for(x: torch.Tensor, layers: int = 2) -> DataFlow:
    torch.manual_seed(layers)
    flow = build_flow("reference", x.shape[1], layers, 8)
    return DataFlow(flow, x.mean(0), x.std(0)).eval()


@pytest.fixture(scope="module")
def moons():
    x, labels = two_moons(400, seed=0)
    return torch.from_numpy(x), torch.from_numpy(labels)


def assert_png(path, min_width=200):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[1] >= min_width and image.shape[0] >= 150
    # Not a blank canvas.
    assert image[..., :3].std() > 0.05


HISTORY = {
    "train_loss": [2.0 - 0.01 * i for i in range(120)],
    "test_steps": [40, 80, 120],
    "test_nll": [1.8, 1.5, 1.2],
}


def test_density(tmp_path, moons):
    x, _ = moons
    assert_png(plot_density(flow_for(x), x, tmp_path / "d.png", resolution=40))


def test_density_grid_integrates_to_about_one(moons):
    x, _ = moons
    model = flow_for(x)
    # The model is a normalised density in data units; a wide box holds nearly all its mass.
    bounds = (-4.0, 5.0, -4.0, 4.5)
    p = density_grid(model, bounds, resolution=300)
    cell = (9.0 / 299) * (8.5 / 299)
    assert p.shape == (300, 300)
    assert p.sum() * cell == pytest.approx(1.0, abs=0.03)


def test_losses_one_and_many_runs(tmp_path):
    assert_png(plot_losses({"L=4": HISTORY}, tmp_path / "one.png"))
    other = {**HISTORY, "test_nll": [1.7, 1.3, 1.0]}
    assert_png(plot_losses({"L=1": HISTORY, "L=50": other}, tmp_path / "two.png"))


def test_latent_with_and_without_labels(tmp_path, moons):
    x, labels = moons
    model = flow_for(x)
    assert_png(plot_latent(model, x, labels, tmp_path / "l.png"))
    assert_png(plot_latent(model, x, None, tmp_path / "n.png"))


def test_figure1(tmp_path, moons):
    x, _ = moons
    assert_png(plot_figure1(flow_for(x), x, tmp_path / "f1.png", num_samples=300), 500)


def test_depth_and_latent_sheets(tmp_path, moons):
    x, labels = moons
    models = {f"L={n}": flow_for(x, n) for n in (1, 2, 4)}
    nll = {"L=1": 1.5, "L=2": 1.2, "L=4": 0.9}
    path = plot_depth_sheet(models, x, tmp_path / "sheet.png", nll=nll, resolution=30)
    assert_png(path, 600)
    assert_png(plot_latent_sheet(models, x, labels, tmp_path / "lat.png"), 600)


def test_samples_any_dimension(tmp_path):
    x = torch.randn(300, 4) * torch.tensor([1.0, 2.0, 0.5, 1.0])
    assert_png(plot_samples(flow_for(x), x, tmp_path / "s.png", dims=(1, 3), num_samples=200))


def test_errors_name_the_argument(tmp_path, moons):
    x, labels = moons
    model = flow_for(x)
    with pytest.raises(ValueError, match=r"\.png"):
        plot_density(model, x, tmp_path / "d.jpg")
    with pytest.raises(TypeError, match="path"):
        plot_density(model, x, 5)
    x3 = torch.randn(50, 3)
    with pytest.raises(ValueError, match="2-D flow"):
        plot_figure1(flow_for(x3), x3[:, :2], tmp_path / "f.png")
    with pytest.raises(ValueError, match="x_test must have shape"):
        plot_density(model, x3, tmp_path / "d.png")
    with pytest.raises(ValueError, match="labels"):
        plot_latent(model, x, labels[:10], tmp_path / "l.png")
    with pytest.raises(ValueError, match="histories"):
        plot_losses({}, tmp_path / "l.png")
    with pytest.raises(ValueError, match="dims"):
        plot_samples(model, x, tmp_path / "s.png", dims=(0, 2))
    with pytest.raises(ValueError, match="resolution"):
        density_grid(model, data_bounds(x), resolution=1)
