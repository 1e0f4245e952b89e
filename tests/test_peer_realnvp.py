"""Each peer library's own Real NVP (fastnvp.bench.peer_realnvp) at tiny sizes.

The flows are trained by the real-data study, so these check what training and the NLL
comparison rely on: (N,) finite log-densities with gradients, samples of the right shape, a
normalised density, exact parameter counts, budget matching, and seeding.
"""

from __future__ import annotations

import ast
import inspect
import math

import numpy as np
import pytest
import torch

from fastnvp.bench import peer_realnvp as pr
from fastnvp.bench.peer_realnvp import (
    PEER_REALNVPS,
    build_peer_realnvp,
    hidden_for_budget,
    peer_param_count,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # The models are tiny and the cores are shared: intra-op threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name, *args, **kwargs):
    pytest.importorskip(name)
    return build_peer_realnvp(name, *args, **kwargs)


def _count(module):
    return sum({id(p): p.numel() for p in module.parameters() if p.requires_grad}.values())


@pytest.mark.parametrize("dim", [6, 64])
@pytest.mark.parametrize("name", PEER_REALNVPS)
def test_log_prob_sample_grad_params(name, dim):
    flow = _build(name, dim, 2, 16)
    x = torch.randn(11, dim)
    lp = flow.log_prob(x)
    assert lp.shape == (11,)
    assert lp.dtype == torch.float32
    assert torch.isfinite(lp).all()
    assert flow.sample(5).shape == (5, dim)

    loss = -flow.log_prob(x).mean()
    loss.backward()
    grads = [p.grad for p in flow.module.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)

    assert flow.params == _count(flow.module) > 0
    assert flow.name == name
    assert flow.construction and "\n" not in flow.construction


@pytest.mark.parametrize("name", PEER_REALNVPS)
def test_samples_have_finite_density(name):
    flow = _build(name, 6, 2, 16)
    x = flow.sample(200)
    assert x.shape == (200, 6)
    assert torch.isfinite(x).all()
    with torch.no_grad():
        assert torch.isfinite(flow.log_prob(x)).all()


@pytest.mark.parametrize("perturb", [0.0, 0.05])
@pytest.mark.parametrize("name", PEER_REALNVPS)
def test_density_integrates_to_one(name, perturb):
    # Right after construction zuko and FrEIA are far from the identity, but normflows (zeroed
    # last layers) is exactly the base Gaussian, so the check is repeated with every parameter
    # nudged; a 300 x 300 trapezoid grid on [-8, 8]^2 holds all but a negligible part of the mass.
    flow = _build(name, 2, 2, 16, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow.module.parameters():
            if p.requires_grad:
                p.add_(perturb * torch.randn(p.shape, generator=gen))
    grid = torch.linspace(-8.0, 8.0, 300)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    with torch.no_grad():
        log_p = flow.log_prob(points)
    gaussian = -0.5 * (points**2).sum(1) - math.log(2 * math.pi)
    if perturb or name != "normflows":
        assert (log_p - gaussian).abs().max() > 0.1  # not the base density itself
    density = log_p.exp().reshape(300, 300).double()
    mass = torch.trapezoid(torch.trapezoid(density, grid.double(), dim=1), grid.double())
    assert abs(mass.item() - 1.0) < 0.05


@pytest.mark.parametrize("name", PEER_REALNVPS)
@pytest.mark.parametrize(("dim", "layers", "hidden"), [(2, 1, 3), (5, 3, 7), (7, 2, 16)])
def test_closed_form_count_matches_built_model(name, dim, layers, hidden):
    flow = _build(name, dim, layers, hidden)
    assert flow.params == peer_param_count(name, dim, layers, hidden)


@pytest.mark.parametrize("name", PEER_REALNVPS)
def test_hidden_for_budget(name):
    budget = 1_000_000
    hidden = hidden_for_budget(name, 64, 8, budget)
    # Closest of all widths: its neighbours are no closer.
    gap = abs(peer_param_count(name, 64, 8, hidden) - budget)
    for other in (hidden - 1, hidden + 1):
        assert gap <= abs(peer_param_count(name, 64, 8, other) - budget)
    assert gap <= 0.02 * budget
    flow = _build(name, 64, 8, hidden)
    assert abs(flow.params - budget) <= 0.02 * budget

    widths = [hidden_for_budget(name, 64, 8, b) for b in (1, 10_000, 100_000, 300_000, budget)]
    assert widths == sorted(widths)
    assert widths[0] == 1  # even width 1 exceeds a budget of 1


@pytest.mark.parametrize("name", PEER_REALNVPS)
def test_same_seed_same_flow_and_caller_rng_untouched(name):
    pytest.importorskip(name)
    torch.manual_seed(123)
    # The legacy global numpy RNG is the one FrEIA's PermuteRandom reseeds.
    np.random.seed(123)  # noqa: NPY002
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()  # noqa: NPY002
    a = build_peer_realnvp(name, 6, 2, 16, seed=7)
    b = build_peer_realnvp(name, 6, 2, 16, seed=7)
    c = build_peer_realnvp(name, 6, 2, 16, seed=8)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # noqa: NPY002

    x = torch.randn(9, 6)
    with torch.no_grad():
        torch.testing.assert_close(a.log_prob(x), b.log_prob(x), rtol=0, atol=0)
    pa = torch.cat([p.detach().reshape(-1) for p in a.module.parameters() if p.requires_grad])
    pc = torch.cat([p.detach().reshape(-1) for p in c.module.parameters() if p.requires_grad])
    assert not torch.equal(pa, pc)


@pytest.mark.parametrize(
    ("kwargs", "exc", "arg"),
    [
        ({"name": "pyro"}, ValueError, "name"),
        ({"dim": 1}, ValueError, "dim"),
        ({"dim": 4.0}, TypeError, "dim"),
        ({"num_layers": 0}, ValueError, "num_layers"),
        ({"hidden": 0}, ValueError, "hidden"),
        ({"hidden": True}, TypeError, "hidden"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, exc, arg):
    call = {"name": "zuko", "dim": 4, "num_layers": 2, "hidden": 8, **kwargs}
    with pytest.raises(exc, match=arg):
        build_peer_realnvp(**call)


@pytest.mark.parametrize("name", PEER_REALNVPS)
def test_float32_even_with_a_float64_default(name):
    pytest.importorskip(name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        flow = build_peer_realnvp(name, 5, 2, 8)
        x = torch.randn(4, 5, dtype=torch.float32)
        assert flow.log_prob(x).dtype == torch.float32
        assert flow.sample(3).dtype == torch.float32
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(previous)
    assert all(p.dtype == torch.float32 for p in flow.module.parameters() if p.is_floating_point())


def test_unknown_name_lists_peers():
    with pytest.raises(ValueError, match="nflows.*zuko.*normflows.*FrEIA"):
        build_peer_realnvp("pyro", 4, 2, 8)
    with pytest.raises(ValueError, match="name"):
        hidden_for_budget("pyro", 4, 2, 1000)
    with pytest.raises(ValueError, match="name"):
        pr.peer_available("pyro")


@pytest.mark.parametrize(
    ("budget", "exc"), [(0, ValueError), (1.5e6, TypeError), (True, TypeError)]
)
def test_hidden_for_budget_bad_budget(budget, exc):
    with pytest.raises(exc, match="budget"):
        hidden_for_budget("nflows", 64, 8, budget)


def test_missing_library_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(pr, "peer_available", lambda name: False)
    with pytest.raises(ImportError, match=r"pip install fastnvp\[bench\]"):
        build_peer_realnvp("normflows", 4, 2, 8)


def test_module_imports_without_peer_libraries():
    # Peer libraries are optional ([bench]): only the builders may import them.
    tree = ast.parse(inspect.getsource(pr))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    peers = {p.lower() for p in PEER_REALNVPS} | set(PEER_REALNVPS)
    assert top.isdisjoint(peers), top & peers
    assert "numpy" in top  # the parse found the top-level imports


@pytest.mark.parametrize("name", PEER_REALNVPS)
def test_a_few_adam_steps_lower_the_nll(name):
    # What the study does, in miniature: the NLL of a shifted, scaled Gaussian goes down.
    flow = _build(name, 4, 2, 16)
    gen = torch.Generator().manual_seed(0)
    data = 1.5 + 0.5 * torch.randn(256, 4, generator=gen)
    opt = torch.optim.Adam(flow.module.parameters(), lr=1e-2)
    with torch.no_grad():
        before = -flow.log_prob(data).mean().item()
    for _ in range(30):
        opt.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = -flow.log_prob(data).mean().item()
    assert math.isfinite(after) and after < before - 0.5
