"""benchmarks/gpu_check.sh / gpu_check.py: the rehearsal of the GPU check, and its safety nets.

The GPU check runs once, on a borrowed GPU with minutes of device time, so it must work the first
time and leave results even when it is killed. ``--smoke`` runs the whole script on the CPU
through Triton's interpreter (end-to-end test, 1-1.5 minutes on 2 cores: marked slow); the other
tests check, in seconds, that the JSON is rewritten after every row and that subprocesses past
their time are killed and recorded instead of hanging the script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gc(load_benchmark):
    """benchmarks/gpu_check.py as a module."""
    return load_benchmark("gpu_check")


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path, gc):
    """``gpu_check.sh --smoke`` with this Python: every section runs and passes on the CPU."""
    # The script sets TRITON_INTERPRET / FASTNVP_BACKEND itself; conftest's must not leak in.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTNVP_BACKEND", "BUDGET_S")}  # fmt: skip
    env.update(PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke", "--budget-s", "300"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=420)  # fmt: skip
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    kernels = importlib.util.find_spec("fastnvp.kernels")
    if kernels.origin.startswith(str(ROOT)):  # this checkout imports: the venv is left alone
        assert not (tmp_path / "pip.log").exists(), "pip ran although fastnvp already imports"
    data = _read(tmp_path / "gpu_check.json")
    assert data["meta"]["TRITON_INTERPRET"] == "1" and data["meta"]["FASTNVP_BACKEND"] == "triton"
    assert set(data["sections"].values()) == {"done"}, data["sections"]
    assert not data["errors"], data["errors"]

    [api] = data["api"]
    assert api["ok"] and "return_mode=" in api["check"], api

    correctness = data["correctness"]
    # D=2 layers (12), the stack (3), the conditional check and its train-step timing (2), the
    # interleaved layers on the fused path (3), D=3 layers (12).
    assert len(correctness) == 12 + 3 + 2 + 3 + 12, [r["check"] for r in correctness]
    verdicts = [r for r in correctness if "ok" in r]
    assert len(verdicts) == len(correctness) - 1
    assert all(r["ok"] is True for r in verdicts), [r for r in verdicts if r["ok"] is not True]
    assert sum(r["check"].startswith("interleaved ") for r in verdicts) == 3
    [timing] = [r for r in correctness if "ok" not in r]
    assert timing["check"].endswith("train step ms") and timing["speedup"] > 0, timing

    timed = {r["variant"] for r in data["timing"] if "ms" in r}
    expected = {name for name, _ in gc.in_process_variants()} | {gc.REFERENCE_COMPILE}
    assert timed == expected, expected - timed
    assert not [r for r in data["timing"] if "error" in r or r.get("skipped")]
    assert any("ceiling_tflops" in r for r in data["timing"])

    compiled = data["compile"]
    assert [r["name"] for r in compiled] == list(gc.COMPILE_REPORT_CONFIGS)
    assert all(r["ok"] and r["registers"] > 0 for r in compiled), compiled


def test_partial_json_is_written_before_a_later_section_fails(tmp_path, monkeypatch, gc):
    """What a section finished is on disk before the next one starts (a kill keeps it)."""
    seen = {}

    def fake_layer(dim, hidden, rows, device, precisions, emit):
        emit({"check": f"layer D={dim}", "ok": True})

    def fake_stack(dim, hidden, layers, rows, device, precisions, emit):
        emit({"check": "stack", "ok": True})

    def fake_conditional(dim, hidden, layers, context, rows, device, emit):
        emit({"check": "conditional", "ok": True})

    def failing_timing(args, device, budget, emit):
        seen["before"] = _read(tmp_path / "gpu_check.json")
        emit({"variant": "reference eager", "task": "log_prob", "B": 33, "ms": 1.0})
        seen["after_row"] = _read(tmp_path / "gpu_check.json")
        raise RuntimeError("timing broke")

    monkeypatch.setattr(gc, "check_layer", fake_layer)
    monkeypatch.setattr(gc, "check_stack", fake_stack)
    monkeypatch.setattr(gc, "check_conditional", fake_conditional)
    monkeypatch.setattr(
        gc, "check_interleaved", lambda *a: a[-1]({"check": "interleaved", "ok": True})
    )
    monkeypatch.setattr(gc, "timing", failing_timing)
    monkeypatch.setattr(gc, "reference_compile", lambda args, budget, emit: None)
    monkeypatch.setattr(gc, "start_compile_report", lambda *args: ())
    status = gc.main(["--smoke", "--out", str(tmp_path), "--budget-s", "600"])

    assert status == 1
    before = seen["before"]
    assert [r["check"] for r in before["correctness"]] == [
        "layer D=2",
        "stack",
        "conditional",
        "interleaved",
    ]
    assert before["sections"]["correctness"] == "done" and before["api"][0]["ok"]
    assert [r.get("ms") for r in seen["after_row"]["timing"]] == [1.0]
    final = _read(tmp_path / "gpu_check.json")
    assert final["sections"]["timing"] == "error"
    assert "timing broke" in final["errors"][0]["error"]
    # A failed section does not stop the later ones.
    assert final["sections"]["more_correctness"] == "done"
    assert [r["check"] for r in final["correctness"]][-1] == "layer D=3"


def test_timing_rewrites_the_json_after_every_row(tmp_path, monkeypatch, gc):
    """Each bench call finds every earlier row (the matmul ceiling included) already on disk."""
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    args = gc.parse_args(["--smoke", "--out", str(tmp_path)])
    report = gc.Report(tmp_path / "gpu_check.json", {})
    report.save()
    on_disk = []

    def fake_bench(fn, device):
        on_disk.append(len(_read(report.path)["timing"]))
        fn()
        return 1.0

    monkeypatch.setattr(gc, "bench", fake_bench)
    import torch

    gc.timing(args, torch.device("cpu"), gc.Budget(600), lambda row: report.add("timing", row))
    rows = _read(report.path)["timing"]
    assert "ceiling_tflops" in rows[0] and all("ms" in r for r in rows[1:]), rows
    # Three ceiling matmuls before its row, then one bench call per variant row.
    assert on_disk == [0, 0, 0, *range(1, len(rows))]


def test_reference_compile_keeps_finished_rows_and_records_a_timeout(tmp_path, monkeypatch, gc):
    """A killed torch.compile subprocess: its rows are merged, the rest are skipped rows."""
    args = gc.parse_args(["--smoke", "--out", str(tmp_path)])
    calls = []

    def fake_child(cmd, timeout, env, log):
        calls.append((cmd, timeout))
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        row = {"variant": gc.REFERENCE_COMPILE, "task": "log_prob", "B": 33, "ms": 2.0}
        (out / "gpu_check.json").write_text(json.dumps({"timing": [row]}))
        return None, 41.0

    monkeypatch.setattr(gc, "run_child", fake_child)
    rows = []
    gc.reference_compile(args, gc.Budget(100), rows.append)
    [(cmd, timeout)] = calls
    assert cmd[cmd.index("--only") + 1] == "compile" and "--smoke" in cmd
    assert 90 < timeout <= 100
    assert rows[0]["ms"] == 2.0
    assert [(r["task"], r["skipped"], r["reason"]) for r in rows[1:]] == [
        ("sample", True, "timeout after 41 s"),
        ("train", True, "timeout after 41 s"),
    ]

    rows.clear()
    gc.reference_compile(args, gc.Budget(gc.REFERENCE_COMPILE_MIN_S - 5), rows.append)
    assert len(calls) == 1, "too little budget left: the subprocess must not start"
    assert len(rows) == 3 and all(r["skipped"] and "budget left" in r["reason"] for r in rows)


def test_run_child_kills_the_whole_process_group(tmp_path, gc):
    """A child past its timeout is killed with its own children (torch.compile's workers)."""
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
            "print(p.pid, flush=True); time.sleep(60)")  # fmt: skip
    log = tmp_path / "child.log"
    start = time.monotonic()
    rc, seconds = gc.run_child([sys.executable, "-c", code], 2.0, dict(os.environ), log)
    assert rc is None and seconds < 10 and time.monotonic() - start < 10
    grandchild = int(log.read_text().split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(grandchild), "the grandchild outlived the kill"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_compile_report_records_an_unknown_config_and_goes_on(tmp_path, gc):
    """A config the report does not know is a failed row, not an exception (one subprocess)."""
    import threading

    rows = []
    gc.compile_report(["no_such_kernel[x]"], gc.Budget(120), tmp_path, rows.append,
                      threading.Event())  # fmt: skip
    [row] = rows
    assert row["ok"] is False and "no config" in row["error"], row
    assert row["rc"] == 0  # the report itself ran (without TRITON_INTERPRET) and found nothing


def test_do_bench_check_binds_the_kwargs_bench_passes(gc, monkeypatch):
    """The API check fails on a keyword do_bench does not take (it would fail on the GPU)."""
    assert gc.check_do_bench()["ok"]
    monkeypatch.setitem(gc.DO_BENCH_KWARGS, "no_such_argument", 1)
    row = gc.check_do_bench()
    assert row["ok"] is False and "no_such_argument" in row["error"]
