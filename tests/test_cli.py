"""The CLI turns a user's mistake into one clear line and exit status 2."""

from fastnvp.cli import main


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
