"""The train/sample/figures/experiment/demo commands: help, imports, a tiny end-to-end run."""

import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from fastnvp.cli import COMMANDS, main

pytestmark = pytest.mark.usefixtures("one_thread")


OURS = ("train", "sample", "figures", "experiment", "demo")
TINY = ["--hidden", "8", "--steps", "6", "--batch", "32", "--n-train", "200", "--n-test", "60"]


@pytest.mark.parametrize("name", OURS)
def test_help(name, capsys):
    assert name in COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: fastnvp {name}" in out


def test_command_modules_import_only_argparse():
    code = (
        "import sys\n"
        + "".join(f"import {COMMANDS[name]}\n" for name in OURS)
        + "heavy = [m for m in ('torch', 'numpy', 'matplotlib', 'tqdm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_sample_figures_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--layers", "2", "--no-progress", "--eval-every", "3"]
    assert main(args + TINY) == 0
    assert "test NLL" in capsys.readouterr().out
    assert main(["train", "--out", str(run), "--resume", "--steps", "9", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 9

    assert main(["sample", str(run), "-n", "25", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (25, 2)
    assert main(["sample", str(run), "-n", "5", "--out", str(tmp_path / "s.csv")]) == 0
    assert np.loadtxt(tmp_path / "s.csv", delimiter=",").shape == (5, 2)
    assert main(["sample", str(run), "--out", str(tmp_path / "s.txt")]) == 2
    assert ".npy or .csv" in capsys.readouterr().err

    assert main(["figures", str(run)]) == 0
    for name in ("losses", "density", "latent", "figure1"):
        assert matplotlib.image.imread(run / "figures" / f"{name}.png").ndim == 3


def test_train_on_a_user_csv(tmp_path):
    x = np.random.default_rng(0).normal(size=(120, 3))
    np.savetxt(tmp_path / "d.csv", x, delimiter=",")
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "d.csv"), "--out", str(run), "--layers", "2"]
    # --n-train/--n-test are toy-data options, refused with --data.
    assert main(args + TINY[:-4] + ["--no-progress"]) == 0
    assert main(["figures", str(run)]) == 0
    assert (run / "figures" / "samples.png").is_file()


def test_experiment_depth_tiny(tmp_path, capsys):
    out = tmp_path / "depth"
    args = ["experiment", "depth", "--out", str(out), "--depths", "2,1", "--no-progress"]
    assert main(args + TINY) == 0
    printed = capsys.readouterr().out
    assert "depth_table.md" in printed and "depth_density.png" in printed
    summary = json.loads((out / "depth_table.json").read_text())
    assert [row["layers"] for row in summary["rows"]] == [1, 2]
    assert summary["entropy"]["value"] == pytest.approx(0.2865, abs=1e-3)
    for row in summary["rows"]:
        assert np.isfinite(row["test_nll"]) and len(row["gaussianity"]["ks"]) == 2
    table = (out / "depth_table.md").read_text()
    assert table.count("\n") == 4  # header, rule, two depths
    for name in summary["figures"].values():
        assert matplotlib.image.imread(out / name).ndim == 3
    # A second call reuses the finished runs instead of training again.
    assert main(args + TINY) == 0
    assert "reusing finished run" in capsys.readouterr().out


def test_experiment_rejects_bad_depths(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "depth", "--depths", "0,2"])
    assert "ints >= 1" in capsys.readouterr().err


def _experiment_args(argv):
    from fastnvp.cli.main import build_parser

    return build_parser().parse_args(["experiment", *argv])


def test_study_options_change_the_committed_configuration():
    from fastnvp.analysis.digits_study import DigitsStudyConfig
    from fastnvp.analysis.norm_depth import NormDepthConfig
    from fastnvp.cli.commands.experiment import study_config

    argv = ["--hidden", "24", "--steps", "7", "--batch", "16", "--lr", "0.01", "--seed", "3"]
    digits = study_config("digits", DigitsStudyConfig, _experiment_args(["digits", *argv]))
    assert digits.hidden == 24 and digits.layers == DigitsStudyConfig().layers
    s = digits.settings
    assert (s.steps, s.batch, s.lr, s.seed) == (7, 16, 0.01, 3)
    assert s.patience == DigitsStudyConfig().settings.patience  # the rest is the committed run
    deep = study_config("norm-depth", NormDepthConfig, _experiment_args(["norm-depth", *argv]))
    assert deep.hidden == 24 and deep.deep_steps == NormDepthConfig().deep_steps
    for s in (deep.moons, deep.digits):
        assert (s.steps, s.batch, s.lr, s.seed) == (7, 16, 0.01, 3)
    # Nothing given: the committed configuration (or its quick form) unchanged.
    assert study_config("digits", DigitsStudyConfig, _experiment_args(["digits"])) == (
        DigitsStudyConfig()
    )
    quick = study_config("digits", DigitsStudyConfig, _experiment_args(["digits", "--quick"]))
    assert quick == DigitsStudyConfig.quick()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["digits", "--norm", "actnorm", "--dataset", "moons"], "--dataset, --norm"),
        (["norm-depth", "--depths", "1,2"], "--depths"),
        (["digits", "--out", "runs/x"], "--out"),
        (["depth", "--quick"], "--quick"),
        (["digits", "--quick", "--clip", "0", "--noise", "0"], "--noise, --clip"),  # 0 is given
    ],
)
def test_experiment_refuses_options_a_study_would_ignore(argv, named, capsys):
    assert main(["experiment", *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "error" in err


def test_a_changed_study_never_writes_over_the_committed_results():
    from fastnvp.cli.commands.experiment import _default_report_dir, given_options

    def folder(argv):
        return _default_report_dir(argv[0], given_options(_experiment_args(argv)))

    assert folder(["digits"]) == folder(["digits", "--threads", "2"]) == "docs/digits"
    assert folder(["digits", "--steps", "3"]) == "runs/digits-custom"
    assert folder(["norm-depth", "--seed", "0"]) == "runs/norm-depth-custom"  # 0 is given
    assert folder(["digits", "--quick", "--hidden", "8"]) == "runs/digits-quick"
