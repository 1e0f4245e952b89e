"""Training loop, data-unit densities, checkpoints, atomic saves and bit-for-bit resume."""

import json

import numpy as np
import pytest
import torch

from fastnvp.training.train import (
    CHECKPOINT,
    DataFlow,
    TrainConfig,
    build_flow,
    build_model,
    evaluate_nll,
    load_checkpoint,
    load_run,
    prepare_data,
    save_checkpoint,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(layers=2, hidden=8, steps=12, batch=32, n_train=200, n_test=50, eval_every=4)


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


def test_short_training_lowers_the_test_nll(tmp_path):
    config = TrainConfig(
        layers=2,
        hidden=16,
        steps=60,
        batch=128,
        lr=1e-2,
        n_train=1000,
        n_test=500,
        eval_every=20,
    )
    split = prepare_data(config)
    before = evaluate_nll(build_model(config, split), split.x_test)
    result = train(config, tmp_path, progress=False)
    nll = result.history["test_nll"]
    assert len(nll) == 3 and result.history["test_steps"] == [20, 40, 60]
    assert nll[-1] < before - 0.3
    assert result.metrics["test_nll"] == pytest.approx(nll[-1])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["layers"] == 2 and len(metrics["gaussianity"]["ks"]) == 2
    assert json.loads((tmp_path / "config.json").read_text()) == config.to_dict()


def test_log_prob_is_in_data_units():
    split = prepare_data(tiny())
    flow = build_flow("reference", 2, 3, 8)
    model = DataFlow(flow, torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25]))
    x = split.x_test[:5].double()
    model = model.double()
    # Brute force: log N(f(x)) + log|det df/dx| with the Jacobian of the whole map in data units.
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: model.f(v[None])[0][0], row)
        z = model.f(row[None])[0][0]
        expected = -0.5 * (z @ z) - np.log(2 * np.pi) + torch.linalg.slogdet(jac)[1]
        assert model.log_prob(row[None])[0].item() == pytest.approx(expected.item(), abs=1e-10)
    assert torch.allclose(model.g(model.f(x)[0]), x, atol=1e-10)
    assert model.sample(7).shape == (7, 2)


def test_checkpoint_round_trip(tmp_path):
    result = train(tiny(), tmp_path, progress=False)
    payload = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert payload["step"] == 12 and payload["config"] == tiny().to_dict()
    model, config, _ = load_run(tmp_path)
    assert config == tiny()
    x = result.split.x_test
    torch.testing.assert_close(model.log_prob(x), result.model.log_prob(x), rtol=0, atol=0)
    assert evaluate_nll(model, x) == pytest.approx(result.metrics["test_nll"])
    assert not list(tmp_path.glob("*.tmp"))


def test_default_run_uses_the_fast_engine_and_loads_from_the_top_level(tmp_path):
    import fastnvp

    result = train(tiny(), tmp_path, progress=False)
    assert tiny().impl == "fast"
    model, config, payload = fastnvp.load_run(tmp_path)
    assert config == tiny() and payload["step"] == 12
    assert isinstance(model.flow, fastnvp.FastRealNVP)
    x = result.split.x_test
    torch.testing.assert_close(model.log_prob(x), result.model.log_prob(x), rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_resume_is_bit_for_bit(tmp_path, schedule):
    config = tiny(steps=15, checkpoint_every=5, schedule=schedule)
    straight = train(config, tmp_path / "a", progress=False)
    stopped = train(config, tmp_path / "b", progress=False, stop_after=7)
    assert stopped.step == 7 and stopped.metrics is None
    assert load_checkpoint(tmp_path / "b")["step"] == 7
    resumed = train(config, tmp_path / "b", progress=False, resume=True)
    assert resumed.step == 15
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.history == resumed.history
    pa = load_checkpoint(tmp_path / "a")
    pb = load_checkpoint(tmp_path / "b")
    assert torch.equal(pa["rng"]["batches"], pb["rng"]["batches"])
    assert pa["scheduler"] == pb["scheduler"]


def test_resume_can_extend_a_run(tmp_path):
    train(tiny(steps=6), tmp_path, progress=False)
    result = train(tiny(steps=10), tmp_path, progress=False, resume=True)
    assert result.step == 10 and len(result.history["train_loss"]) == 10
    with pytest.raises(ValueError, match="below the checkpoint's step"):
        train(tiny(steps=3), tmp_path, progress=False, resume=True)


def test_atomic_save_keeps_the_old_checkpoint_on_failure(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"a": torch.ones(2)})
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_checkpoint(path, {"a": lambda: 0})
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_user_data_of_any_dimension(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 2.0]])
    np.save(tmp_path / "d.npy", x.astype(np.float32))
    config = tiny(data=str(tmp_path / "d.npy"), test_fraction=0.2, layers=3)
    result = train(config, tmp_path / "run", progress=False)
    assert result.split.x_train.shape == (240, 3) and result.split.y_test is None
    model, _, _ = load_run(tmp_path / "run")
    assert model.sample(5).shape == (5, 3)
    assert len(result.metrics["gaussianity"]["ks"]) == 3
    assert np.isfinite(result.metrics["test_nll"])


def test_fast_implementation_trains_and_matches_reference_state_dict(tmp_path):
    ref = train(tiny(impl="reference"), tmp_path / "r", progress=False)
    fast = train(tiny(impl="fast"), tmp_path / "f", progress=False)
    assert ref.model.state_dict().keys() == fast.model.state_dict().keys()
    # Same seed, same initial weights, same function: the runs agree to rounding.
    assert fast.metrics["test_nll"] == pytest.approx(ref.metrics["test_nll"], abs=1e-4)


@pytest.mark.parametrize(
    "overrides, exc, word",
    [
        ({"layers": 0}, ValueError, "layers"),
        ({"hidden": 2.0}, TypeError, "hidden"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"dataset": "nope"}, ValueError, "dataset"),
        ({"impl": "cuda"}, ValueError, "impl"),
        ({"schedule": "step"}, ValueError, "schedule"),
        ({"clip": float("nan")}, ValueError, "clip"),
        ({"test_fraction": 1.0}, ValueError, "test_fraction"),
    ],
)
def test_config_validation_names_the_field(overrides, exc, word):
    with pytest.raises(exc, match=word):
        tiny(**overrides).validate()


def test_train_and_load_errors(tmp_path):
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train({"layers": 2}, tmp_path)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(tiny(), tmp_path / "empty", resume=True, progress=False)
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a fastnvp"):
        load_run(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({**tiny().to_dict(), "extra": 1})


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_a_run_with_interleaved_layers_trains_resumes_and_loads(tmp_path, impl):
    """--norm / --permutation reach the model; a resumed run equals an uninterrupted one."""
    config = tiny(norm="actnorm", permutation="lu", impl=impl, checkpoint_every=4)
    full = train(config, tmp_path / "full", progress=False)
    assert full.model.flow.norm == "actnorm" and full.model.flow.permutation == "lu"
    train(config, tmp_path / "resumed", progress=False, stop_after=4)
    resumed = train(config, tmp_path / "resumed", resume=True, progress=False)
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)
    model, loaded, _ = load_run(tmp_path / "full")
    assert loaded.norm == "actnorm" and all(layer.is_initialized for layer in model.flow.norms)
    assert "norm" not in tiny().to_dict()  # a run without them keeps its old config keys
    with pytest.raises(ValueError, match="norm must be one of"):
        tiny(norm="groupnorm").validate()


def test_batchnorm_is_refused_for_data_parallel_training(tmp_path):
    from fastnvp.training import distributed

    world = distributed.World(rank=0, size=2)
    with pytest.raises(ValueError, match="norm='batchnorm'.*torchrun"):
        train(tiny(norm="batchnorm"), tmp_path, progress=False, world=world)


def test_actnorm_initializes_from_the_first_training_rows(tmp_path):
    """Every data-parallel process sees the same rows, so replicas start equal."""
    config = tiny(norm="actnorm", steps=1)
    split = prepare_data(config)
    model = build_model(config, split)
    u = (split.x_train[: config.batch] - model.mean) / model.std
    expected = model.flow.norms[0]
    expected.initialize(u)
    result = train(config, tmp_path, progress=False)
    # the first step moved the parameters by at most lr; the initialization is that of u
    got = result.model.flow.norms[0].log_scale
    assert (got - expected.log_scale).abs().max() < 5 * config.lr


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="resume .* overwrite .* not both"):
        train(tiny(), tmp_path / "run", progress=False, resume=True, overwrite=True)
    assert not (tmp_path / "run").exists()


def test_a_data_set_too_small_to_split_writes_nothing(tmp_path):
    from fastnvp.training.data import min_rows_for_split, split_sizes

    path = tmp_path / "d.npy"
    np.save(path, np.random.default_rng(0).normal(size=(3, 2)))
    with pytest.raises(ValueError, match=r"has 3 rows.*2 training and 1 test.*at least 8 rows"):
        train(tiny(data=str(path)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    for fraction in (0.2, 0.5, 0.01, 0.99, 0.3):
        need = min_rows_for_split(fraction)
        assert min(split_sizes(need, fraction)) >= 2 > min(split_sizes(need - 1, fraction))


@pytest.mark.parametrize("minimum", [1, 2, 3, 5])
def test_min_rows_for_split_is_the_fewest(minimum):
    from fastnvp.training.data import min_rows_for_split, split_sizes

    for fraction in (0.01, 0.2, 0.37, 0.5, 0.9, 0.99):
        need = min_rows_for_split(fraction, minimum)
        fewest = next(n for n in range(2, 10_000) if min(split_sizes(n, fraction)) >= minimum)
        assert need == fewest, (fraction, minimum)
    with pytest.raises(ValueError, match="minimum"):
        min_rows_for_split(0.2, 0)
