"""The CLI turns a user's mistake into one clear line and exit status 2."""

import json

import pytest

from fastnvp.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_missing_data_file_is_one_line_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "nope.npy"
    status = main(["train", "--data", str(missing), "--steps", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert status == 2
    assert "fastnvp train: error:" in err and "nope.npy" in err
    assert "Traceback" not in err


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_train_never_replaces_an_existing_run_silently(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--layers", "1", "--hidden", "4", "--steps", "2", "--out", str(out)]
    tiny = ["--n-train", "64", "--n-test", "32", "--batch", "16", "--no-progress"]
    assert main(common + tiny) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert main(common + tiny) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main(common + tiny + ["--overwrite"]) == 0


# The audit of `fastnvp ...`: every bad input below is one line naming the option, exit 2.
TINY = ["--layers", "1", "--hidden", "4", "--steps", "2", "--batch", "16", "--no-progress"]
TOY = ["--n-train", "64", "--n-test", "32"]


def _table(tmp_path, rows: int = 40):
    import numpy as np

    path = tmp_path / "d.csv"
    np.savetxt(path, np.random.default_rng(0).normal(size=(rows, 2)), delimiter=",")
    return path


def _one_line_error(capsys, command: str, *words: str) -> str:
    err = capsys.readouterr().err
    assert f"fastnvp {command}: error:" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--dataset", "moons"], "--dataset"),  # given at its default value: still given
        (["--noise", "0"], "--noise"),
        (["--n-train", "20000", "--n-test", "64"], "--n-train, --n-test"),
    ],
)
def test_toy_data_options_are_refused_with_a_data_file(tmp_path, capsys, options, named):
    out = tmp_path / "run"
    argv = ["train", "--data", str(_table(tmp_path)), "--out", str(out), *TINY, *options]
    assert main(argv) == 2
    _one_line_error(capsys, "train", named, "toy data sets", "--data")
    assert not out.exists()


def test_test_fraction_is_refused_for_a_toy_data_set(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, *TOY, "--test-fraction", "0.2"]) == 2
    _one_line_error(capsys, "train", "--test-fraction", "--data FILE only")
    assert not out.exists()


def test_help_still_shows_the_data_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("default moons", "default 20000", "default 5000", "(default 0.2)"):
        assert default in text


def test_data_defaults_are_the_train_configs():
    from fastnvp.cli.commands._training_options import DATA_DEFAULTS
    from fastnvp.training.train import TrainConfig

    assert {name: getattr(TrainConfig(), name) for name in DATA_DEFAULTS} == DATA_DEFAULTS


def test_a_relative_data_path_is_stored_absolute(tmp_path, monkeypatch):
    _table(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "d.csv", "--out", "run", *TINY]) == 0
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert stored == str((tmp_path / "d.csv").resolve())
    # Figures of the run from another directory find the data.
    monkeypatch.chdir(tmp_path.parent)
    assert main(["figures", str(tmp_path / "run")]) == 0


def test_train_device_cuda_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--device", "cuda", *TINY, *TOY]) == 2
    _one_line_error(capsys, "train", "--device cuda", "CUDA is not available")
    assert not out.exists()


def test_train_out_through_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    for out, words in [
        (tmp_path / "f" / "sub", ("--out", "cannot be created", "is a file")),
        (tmp_path / "f", ("--out", "is a file")),
    ]:
        assert main(["train", "--out", str(out), *TINY, *TOY]) == 2
        _one_line_error(capsys, "train", *words)
    assert (tmp_path / "f").read_text() == ""


def test_an_os_error_is_one_line_as_a_last_resort(tmp_path, capsys, monkeypatch):
    import fastnvp.training.train as training

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run"))

    monkeypatch.setattr(training, "train", fail)
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, *TOY]) == 2
    _one_line_error(capsys, "train", "Permission denied")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(run), *TINY, *TOY]) == 0
    return run


def test_figures_accepts_the_checkpoint_file(tiny_run, tmp_path, capsys):
    assert main(["figures", str(tiny_run / "checkpoint.pt"), "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "density.png").is_file()
    assert main(["figures", str(tiny_run / "checkpoint.pt")]) == 0
    assert (tiny_run / "figures" / "losses.png").is_file()
    (tmp_path / "file").write_text("")
    assert main(["figures", str(tiny_run), "--out", str(tmp_path / "file")]) == 2
    _one_line_error(capsys, "figures", "--out", "is a file")


def test_sample_out_errors_are_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "dir.npy").mkdir()
    (tmp_path / "f").write_text("")
    for out, words in [
        (tmp_path / "dir.npy", ("--out", "is a directory", ".npy or .csv")),
        (tmp_path / "s.txt", ("--out", ".npy or .csv", "s.txt")),
        (tmp_path / "f" / "s.npy", ("--out", "is a file")),
    ]:
        assert main(["sample", str(tiny_run), "-n", "3", "--out", str(out)]) == 2
        _one_line_error(capsys, "sample", *words)
    assert main(["sample", str(tiny_run), "-n", "3", "--out", str(tmp_path / "s.CSV")]) == 0


def test_resume_and_overwrite_exclude_each_other(tiny_run, capsys):
    before = (tiny_run / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tiny_run), *TINY, *TOY, "--resume", "--overwrite"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" in err and "not allowed" in err
    assert (tiny_run / "checkpoint.pt").read_bytes() == before


def test_resume_without_steps_keeps_the_runs_length(tmp_path, capsys):
    """--resume without --steps finishes at the run's own step count (the default 5000 used to
    extend a finished 2-step run to 5000 steps); --steps larger than stored extends it."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, *TOY]) == 0
    no_steps = [a for i, a in enumerate(TINY) if "--steps" not in TINY[max(i - 1, 0) : i + 1]]
    assert main(["train", "--out", str(run), *no_steps, "--resume"]) == 0
    assert "step 2/2" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    assert main(["train", "--out", str(run), *no_steps, "--resume", "--steps", "3"]) == 0
    assert "step 3/3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("rows", "fraction", "need"), [(3, None, "8 rows"), (3, "0.5", "4 rows"), (20, "0.05", "30")]
)
def test_too_few_data_rows_are_refused_before_anything_is_written(
    tmp_path, capsys, rows, fraction, need
):
    out = tmp_path / "run"
    argv = ["train", "--data", str(_table(tmp_path, rows)), "--out", str(out), *TINY]
    if fraction is not None:
        argv += ["--test-fraction", fraction]
    assert main(argv) == 2
    _one_line_error(capsys, "train", "--data", "--test-fraction", need, f"has {rows} rows")
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--fused", "op"], "--fused op"),
        (["--mode", "invertible"], "--mode invertible"),
        (["--mode", "standard,invertible", "--fused", "none"], "--fused none and --mode"),
    ],
)
def test_profile_refuses_fastnvp_options_with_the_reference_alone(tmp_path, capsys, options, named):
    out = tmp_path / "prof"
    argv = ["profile", "--impl", "reference", "--layers", "1", "--device", "cpu"]
    assert main([*argv, *options, "--out", str(out)]) == 2
    _one_line_error(capsys, "profile", named, "--impl fast")
    assert not out.exists()
