"""``fastnvp profile`` end to end at tiny size, and the pieces it is built from."""

import functools
import json

import pytest
import torch

from fastnvp.analysis.profiling import (
    ProfileConfig,
    analyse,
    build_model,
    instrument,
    make_batch,
    profile_step,
    profiler_peak_bytes,
)
from fastnvp.cli import main


def test_profile_command_writes_every_artefact(tmp_path, one_thread, capsys):
    out = tmp_path / "prof"
    argv = ["profile", "--layers", "2,3", "--batch", "32", "--hidden", "8", "--device", "cpu"]
    argv += ["--impl", "fast,reference", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "summary.md" in capsys.readouterr().out

    doc = json.loads((out / "results.json").read_text())
    combos = {(r["impl"], r["mode"], r["layers"]) for r in doc["runs"]}
    assert combos == {
        (impl, mode, L)
        for impl, mode in [("fast", "standard"), ("fast", "invertible"), ("reference", "standard")]
        for L in (2, 3)
    }
    assert doc["skipped"] == [
        {
            "impl": "reference",
            "mode": "invertible",
            "why": "invertible training needs FastRealNVP's per-layer inverse",
        }
    ]
    assert "profile_memory" in doc["memory_measure"]
    for run in doc["runs"]:
        a = run["analysis"]
        p = a["phases_us"]
        assert p["forward"] > 0 and p["backward"] > 0 and p["conditioner"] > 0
        assert p["conditioner"] + p["coupling"] == pytest.approx(p["forward"])
        assert len(a["layer_forward_us"]) == len(a["layer_backward_us"]) == run["layers"]
        assert all(v > 0 for v in a["layer_forward_us"] + a["layer_backward_us"])
        assert a["ops"] > 0 and a["ops_all"] >= a["ops"] and a["kernel_launches"] is None
        assert 1 <= len(a["hotspots"]) <= 10 and a["hotspots"][0]["self_us"] > 0
        assert run["peak_bytes"] > 0 and run["param_bytes"] == run["grad_bytes"] > 0
        assert run["step_s"] > 0
        if run["mode"] == "invertible":
            # The GEMM stack (docs/design.md §3.2) reconstructs each layer ("inverse") and then
            # runs its gradient; it recomputes nothing under autograd.
            assert {"inverse", "recompute", "gradient"} <= set(p) and p["recompute"] == 0
            assert p["inverse"] + p["gradient"] == pytest.approx(p["backward"])
            assert run["reconstruction"]["max_layer_error"] < 1e-5
            assert run["reconstruction"]["within_default_tolerance"]
        else:
            assert run["reconstruction"] is None
    by = {(r["impl"], r["mode"], r["layers"]): r for r in doc["runs"]}
    for impl, mode in [("fast", "standard"), ("fast", "invertible"), ("reference", "standard")]:
        assert by[impl, mode, 3]["analysis"]["ops"] > by[impl, mode, 2]["analysis"]["ops"]

    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"step.forward", "step.backward", "layer0.forward", "layer1.conditioner"} <= names
    assert (out / "trace-fast-invertible.json").stat().st_size > 0
    assert (out / "trace-reference-standard.json").stat().st_size > 0

    summary = (out / "summary.md").read_text()
    assert "## Top 5 hotspots" in summary and "profile_memory" in summary
    for impl, mode in [("fast", "standard"), ("fast", "invertible"), ("reference", "standard")]:
        top = by[impl, mode, 3]["analysis"]["hotspots"][0]["name"]
        assert f"**{impl} / {mode}, L = 3**" in summary and f"1. `{top}`" in summary
    for png in ("time_vs_depth.png", "memory_vs_depth.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_instrumentation_is_removed_after_the_step(one_thread):
    model = build_model("fast", 2, 2, 8, "standard", "cpu")
    x = make_batch(16, 2, "cpu")
    with instrument(model):
        assert "layer_forward" in vars(model) and "_conditioner" in vars(model)
    assert not {"layer_forward", "layer_inverse", "_conditioner"} & set(vars(model))
    ref = build_model("reference", 2, 2, 8, "standard", "cpu")
    with instrument(ref):
        assert ref.s[0]._forward_pre_hooks
    assert not ref.s[0]._forward_pre_hooks and not ref.s[0]._forward_hooks
    # Profiled step: backward of layer 1 is attributed through the autograd sequence numbers.
    a = analyse(profile_step(model, x, "cpu"), 2, "cpu")
    assert a["layer_backward_us"][1] > 0


def test_cpu_peak_follows_allocations(one_thread):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        del a
        b = torch.empty(3 << 20, dtype=torch.uint8)
        c = torch.empty(1 << 20, dtype=torch.uint8)
        del b, c
    assert profiler_peak_bytes(prof, "cpu") == 4 << 20


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"layers": ()}, ValueError, "layers must name"),
        ({"layers": (4, 4)}, ValueError, "must not repeat"),
        ({"layers": (0,)}, ValueError, "layers must be >= 1"),
        ({"batch": 2.5}, TypeError, "batch must be an int"),
        ({"dim": 1}, ValueError, "dim must be >= 2"),
        ({"modes": ("checkpoint",)}, ValueError, "modes must be among"),
        ({"impls": ("nflows",)}, ValueError, "impls must be among"),
        ({"device": "tpu"}, ValueError, "device must be"),
        ({"warmup": -1}, ValueError, "warmup must be"),
        ({"trace_layers": 7}, ValueError, "trace_layers=7"),
        ({"fused": "kernel"}, ValueError, "fused must be one of"),
    ],
)
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ProfileConfig(**kwargs)


def test_fused_level_reaches_the_model():
    assert build_model("fast", 2, 2, 8, "standard", "cpu", fused="layer").fused == "layer"
    assert build_model("fast", 2, 2, 8, "standard", "cpu").fused == "auto"


def test_reference_has_no_invertible_mode():
    with pytest.raises(ValueError, match="impl='reference' supports only mode='standard'"):
        build_model("reference", 2, 2, 8, "invertible", "cpu")


@pytest.mark.parametrize(
    "argv", [["--layers", "a,b"], ["--layers", "0"], ["--mode", "cheap"], ["--impl", "zuko"]]
)
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["profile", *argv])
    assert info.value.code == 2
    assert "expected" in capsys.readouterr().err


# ------------------------------------------------------------- peak memory from outside
# Each probe is a fresh Python process (a few seconds: it imports torch), so these tests run
# as few as cover the paths.
@functools.cache
def _expected_cpu_method() -> str:
    """``clear_refs`` where this kernel lets a process reset its VmHWM (Linux >= 4.0)."""
    from fastnvp.analysis.memory_probe import clear_refs_resets_peak

    return "clear_refs" if clear_refs_resets_peak() else "hwm_before"


def test_memory_probe_sweep_in_fresh_processes(tmp_path):
    from fastnvp.analysis.memory_probe import main

    out = tmp_path / "probe"
    argv = ["--dim", "4", "--hidden", "16", "--batch", "512", "--layers", "2,4", "--threads", "1"]
    assert main([*argv, "--memory", "standard", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {r["layers"]: r for r in doc["rows"]}
    assert sorted(rows) == [2, 4] and doc["skipped"] == []
    for row in rows.values():
        assert row["memory"] == "standard" and row["impl"] == "fast" and row["threads"] == 1
        assert row["method"] == _expected_cpu_method()
        assert row["peak_growth_bytes"] > 0 and row["baseline_bytes"] > 0
        assert row["peak_bytes"] == row["baseline_bytes"] + row["peak_growth_bytes"]
        assert row["grad_bytes"] == row["param_bytes"] > 0
        assert row["input_bytes"] == 512 * 4 * 4
    # Standard training stores every layer's activations: the deeper stack peaks higher.
    assert rows[4]["peak_growth_bytes"] > rows[2]["peak_growth_bytes"]
    assert doc["command"].startswith("python -m fastnvp.analysis.memory_probe --dim 4")
    assert "| fast | standard | 4 |" in (out / "table.md").read_text()
    assert (out / "peak_growth_vs_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--layers", "2", "--dim", "1"]) == 2  # bad argument: usage error, no child


def test_memory_probe_fallback_without_reset():
    from fastnvp.analysis.memory_probe import probe

    row = probe(4, 16, 64, 2, "invertible", reset="none", warmup=0)
    assert row["method"] == "hwm_before" and row["peak_growth_bytes"] > 0
    assert row["memory"] == "invertible" and row["baseline_bytes"] > 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"dim": 1}, "dim"),
        ({"hidden": 0}, "hidden"),
        ({"batch": 2.5}, "batch"),
        ({"layers": 0}, "layers"),
        ({"memory": "checkpoint"}, "memory"),
        ({"impl": "nflows"}, "impl"),
        ({"impl": "reference", "memory": "invertible"}, "memory"),
        ({"device": "tpu"}, "device"),
        ({"threads": 0}, "threads"),
        ({"fused": "kernel"}, "fused"),
        ({"warmup": 0}, "warmup"),
        ({"reset": "always"}, "reset"),
    ],
)
def test_memory_probe_rejects_bad_arguments(kwargs, name):
    from fastnvp.analysis.memory_probe import probe

    args = {"dim": 4, "hidden": 16, "batch": 64, "layers": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        probe(**args)


def test_profile_command_memory_probe(tmp_path, one_thread):
    out = tmp_path / "prof"
    argv = ["profile", "--layers", "2,4", "--batch", "64", "--dim", "4", "--hidden", "16"]
    argv += ["--mode", "invertible", "--device", "cpu", "--repeats", "1", "--warmup", "0"]
    assert main([*argv, "--threads", "1", "--memory-probe", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["memory_probe"]["rows"]) == len(doc["runs"]) == 2
    assert doc["memory_probe"]["method"].startswith(f"{_expected_cpu_method()}: peak RSS")
    for run in doc["runs"]:
        assert run["probe_growth_bytes"] > 0 and run["probe_baseline_bytes"] > 0
    summary = (out / "summary.md").read_text()
    assert "## Peak memory from outside" in summary and "| fast | invertible | 4 |" in summary
    assert (out / "peak_growth_vs_depth.png").stat().st_size > 10_000
    assert ProfileConfig().memory_probe is False  # opt-in: the default profile starts no child
