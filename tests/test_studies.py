"""The real-data studies: the early-stopping trainer, the digits study, the ActNorm-at-depth
study and the layer-cost benchmark, each at a tiny size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fastnvp.analysis.density_training import Candidate, Data, TrainSettings, train_candidate

pytestmark = pytest.mark.usefixtures("one_thread")


class _Shift(nn.Module):
    """A Gaussian with a learned mean: log N(x; mu, I)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(dim))

    def log_prob(self, x):
        return -0.5 * ((x - self.mu).square().sum(1) + x.shape[1] * math.log(2 * math.pi))


def _candidate(module, log_prob=None) -> Candidate:
    return Candidate("shift", module, log_prob or module.log_prob, None, 2, 2)


def test_trainer_keeps_the_best_parameters_and_stops_early():
    torch.manual_seed(0)
    data = Data(torch.randn(500, 2) + 3, torch.randn(100, 2) + 3, torch.randn(100, 2) + 3)
    module = _Shift(2)
    settings = TrainSettings(steps=400, batch=64, lr=0.05, eval_every=10, patience=3)
    result = train_candidate(_candidate(module), data, settings)
    assert result.best_val_nll < 3.0 < result.history["val_nll"][0]  # learned the mean
    best = result.history["step"].index(result.best_step)
    assert result.best_val_nll == min(result.history["val_nll"]) == result.history["val_nll"][best]
    assert result.steps_run < 400  # patience ran out once the mean was found
    assert torch.allclose(module.mu, torch.full((2,), 3.0), atol=0.3)
    assert not result.diverged and math.isfinite(result.test_nll)


def test_trainer_reports_divergence():
    module = _Shift(2)
    data = Data(torch.randn(50, 2), torch.randn(10, 2), torch.randn(10, 2))
    nan = lambda x: module.log_prob(x) * float("nan")  # noqa: E731
    result = train_candidate(_candidate(module, nan), data, TrainSettings(steps=5, eval_every=1))
    assert result.diverged and result.steps_run == 1


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="patience"):
        TrainSettings(patience=0).validate()
    with pytest.raises(ValueError, match="lr"):
        TrainSettings(lr=0.0).validate()


def test_digits_study_quick(tmp_path):
    from fastnvp.analysis.digits_study import DigitsStudyConfig, run_digits_study

    config = DigitsStudyConfig.quick()
    summary = run_digits_study(tmp_path, config, progress=False, log=lambda _: None)
    names = [row["name"] for row in summary["rows"]]
    assert names[0].startswith("Gaussian") and "zuko" in names
    fastnvp_rows = [r for r in summary["rows"] if r["group"] == "fastnvp"]
    grid = len(config.norms) * len(config.permutations)
    assert len(fastnvp_rows) == grid + len(config.widths) + len(config.weight_decays)
    best = min(fastnvp_rows, key=lambda r: r["best_val_nll"])  # chosen on validation only
    assert summary["best"] == best["name"]
    peer = next(r for r in summary["rows"] if r["group"] == "peer")
    assert abs(peer["effective"] - best["effective"]) <= 0.1 * best["effective"]  # same budget
    for row in summary["rows"]:
        assert math.isfinite(row["test_nll"]) and row["test_bits_per_dim"] > 0
    cond = summary["conditional"]
    assert math.isfinite(cond["test_nll"]) and math.isfinite(cond["marginal_test_nll"])
    for name in ("results.json", "results.md", "samples.png", "conditional.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["best"] == summary["best"] and doc["data"]["train"] == 1350
    assert "(best, chosen on validation)" in (tmp_path / "results.md").read_text()


def test_norm_depth_study_quick(tmp_path):
    from fastnvp.analysis.norm_depth import NormDepthConfig, run_norm_depth_study, steps_to_target

    summary = run_norm_depth_study(
        tmp_path, NormDepthConfig.quick(), progress=False, log=lambda _: None
    )
    for data in ("moons", "digits"):
        runs = summary[data]["runs"]
        assert set(runs) == {"plain", "actnorm"}
        assert runs["actnorm"]["name"].endswith("actnorm")
    assert set(summary["deep"]) == {"plain", "actnorm"}
    assert summary["deep"]["actnorm"]["finite"]
    for name in ("norm_depth.json", "norm_depth.md", "norm_depth.png"):
        assert (tmp_path / name).stat().st_size > 0
    history = {"step": [10, 20, 30], "val_nll": [5.0, 3.0, 1.0]}
    assert steps_to_target(history, 3.0) == 20 and steps_to_target(history, 0.5) is None


def test_experiment_command_runs_the_quick_digits_study(tmp_path, capsys):
    from fastnvp import cli

    assert cli.main(["experiment", "digits", "--quick", "--report-dir", str(tmp_path),
                     "--no-progress"]) == 0  # fmt: skip
    assert "test NLL (nats/image)" in capsys.readouterr().out
    assert (tmp_path / "results.md").is_file()


def test_layer_cost_measures_every_kind():
    from fastnvp.bench import layer_cost

    result = layer_cost.measure_shape((4, 8, 32, 2), rounds=2, min_seconds=0.001)
    assert set(result) == set(layer_cost.WORKLOADS)
    for entry in result.values():
        assert set(entry["kinds"]) == set(layer_cost.KINDS) and entry["couplings_ms"] > 0
        for value in entry["kinds"].values():
            assert value["q1"] <= value["relative_cost"] <= value["q3"]
    doc = {
        "command": "python -m fastnvp.bench.layer_cost",
        "commit": "abc",
        "machine": {"cpu_model": "cpu", "torch_threads": 1},
        "rounds": 2,
        "load_average_start": None,
        "load_average_end": None,
        "target": 0.1,
        "shapes": [
            {"shape": {"dim": 4, "hidden": 8, "batch": 32, "layers": 2}, "workloads": result}
        ],
    }
    text = layer_cost.markdown(doc)
    assert "| 4 | 8 | 32 | 2 | train |" in text and "cells within target" in text


def test_layer_cost_cli_refuses_bad_options_before_measuring(tmp_path, capsys):
    from fastnvp.bench import layer_cost

    page = tmp_path / "page.md"
    page.write_text("no generated section here\n")
    for argv, message in (
        (["--rounds", "0"], "expected an int >= 1"),
        (["--threads", "x"], "expected an int"),
        (["--docs", str(page)], "needs one <!-- layer-cost:start -->"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            layer_cost.main([*argv, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


def test_layer_cost_records_the_command_as_given(tmp_path, monkeypatch):
    from fastnvp.bench import layer_cost

    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before measuring")

    monkeypatch.setattr(layer_cost, "run", fake_run)
    with pytest.raises(RuntimeError, match="stop before measuring"):
        layer_cost.main(["--rounds", "3", "--out", str(tmp_path)])
    assert seen["rounds"] == 3
    assert seen["command"] == f"python -m fastnvp.bench.layer_cost --rounds 3 --out {tmp_path}"


def test_a_study_reuses_a_run_that_holds_a_relative_data_path(tmp_path, monkeypatch):
    from fastnvp.analysis.experiment import _same_settings
    from fastnvp.training.train import TrainConfig

    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "d.npy", np.zeros((8, 2)))
    given = TrainConfig(data="d.npy", layers=1, hidden=4, steps=2)
    resolved = TrainConfig(data=str(tmp_path / "d.npy"), layers=1, hidden=4, steps=2)
    assert _same_settings(given.to_dict(), resolved)
    assert not _same_settings(given.to_dict(), TrainConfig(data=str(tmp_path / "e.npy")))
