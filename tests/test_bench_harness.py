"""The benchmark harness at tiny sizes: providers agree, the JSON schema, the reports."""

import copy
import json
import re
import time

import pytest
import torch

from fastnvp.bench import harness, report
from fastnvp.bench import providers as prov
from fastnvp.cli import COMMANDS, main
from fastnvp.core.reference import RealNVP

# torch.compile is left out here: its cold compile alone exceeds this file's time budget; the
# harness checks it against the reference on every run.
EAGER = [p for p in prov.ALL_PROVIDERS if p != "torch.compile"]


def _provider_or_skip(spec, ref):
    try:
        return prov.build(spec, ref)
    except prov.ProviderUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("dim", [2, 5])
@pytest.mark.parametrize("spec", EAGER)
def test_provider_matches_reference(spec, dim):
    ref = RealNVP.standard(dim, 3, hidden=12)
    flow = _provider_or_skip(spec, ref)
    x, z = torch.randn(40, dim), torch.randn(40, dim)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), ref.log_prob(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flow.inverse(z), ref.g(z), rtol=1e-5, atol=1e-5)
        assert flow.sample(7).shape == (7, dim)
    assert flow.params_effective == prov.effective_params(ref)
    assert flow.params_total in (
        prov.effective_params(ref),
        sum(p.numel() for p in ref.parameters()),
    )
    # One training step moves the weights and keeps them finite.
    before = [p.detach().clone() for p in flow.trainable()]
    opt = torch.optim.Adam(flow.trainable(), lr=1e-2)
    flow.loss(x).backward()
    opt.step()
    after = flow.trainable()
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("spec", EAGER)
def test_provider_gradients_match_reference(spec):
    ref = RealNVP.standard(2, 2, hidden=8).double()
    flow = _provider_or_skip(spec, ref)
    x = torch.randn(16, 2, dtype=torch.float64)
    # The loss gradient of the first layer's shared middle weight matches the reference.
    ref_loss = -ref.log_prob(x).mean()
    ref_loss.backward()
    flow.loss(x).backward()
    expected = ref.s[0][2].weight.grad
    matches = [
        p.grad
        for p in flow.trainable()
        if p.shape == expected.shape
        and p.grad is not None
        and torch.allclose(p, ref.s[0][2].weight)
    ]
    assert matches, "no parameter of the provider equals the reference's S[0] middle weight"
    torch.testing.assert_close(matches[0], expected, rtol=1e-8, atol=1e-10)


def test_effective_params_counts_split_halves():
    ref = RealNVP.standard(2, 1, hidden=8)
    per_net = (8 * 1 + 8) + (8 * 8 + 8) + (1 * 8 + 1)
    assert prov.effective_params(ref) == 2 * per_net
    assert sum(p.numel() for p in ref.parameters()) == 2 * ((8 * 2 + 8) + 72 + (2 * 8 + 2))


def test_workload_flops_are_analytic():
    ref = RealNVP.standard(3, 2, hidden=4)  # kept/transformed: (1, 2) then (2, 1)
    per_row = 2 * 2 * (1 * 4 + 16 + 4 * 2) + 2 * 2 * (2 * 4 + 16 + 4 * 1)
    assert harness.forward_flops_per_row(ref) == per_row
    assert harness.workload_flops(ref, "log_prob", 10) == 10 * per_row
    assert harness.workload_flops(ref, "train", 10) == 30 * per_row
    with pytest.raises(ValueError, match="workload"):
        harness.workload_flops(ref, "nope", 1)


def test_parse_provider_and_errors():
    assert prov.parse_provider("fastnvp") == ("fastnvp", {})
    assert prov.parse_provider("fastnvp[fused=layer,precision=tf32,anchor_every=4,check=true]") == (
        "fastnvp",
        {"fused": "layer", "precision": "tf32", "anchor_every": 4, "check": True},
    )
    # An option FastRealNVP does not have is named at parse time (a benchmark used to skip
    # the provider and time the reference against itself, exit status 0).
    with pytest.raises(ValueError, match=r"FastRealNVP has no option\(s\) \['tile'\]"):
        prov.parse_provider("fastnvp[fused=layer,tile=64]")
    with pytest.raises(ValueError, match="unknown provider"):
        prov.parse_provider("pyro")
    with pytest.raises(ValueError, match="takes no options"):
        prov.parse_provider("zuko[a=1]")
    with pytest.raises(ValueError, match="k=v"):
        prov.parse_provider("fastnvp[fused]")
    with pytest.raises(TypeError, match="provider"):
        prov.parse_provider(3)
    with pytest.raises(ValueError, match="no option"):
        prov.build("fastnvp[no_such_option=1]", RealNVP.standard(2, 1, hidden=4))
    with pytest.raises(TypeError, match="ref"):
        prov.build("fastnvp", torch.nn.Linear(2, 2))


def test_config_and_settings_validation_names_the_argument():
    with pytest.raises(ValueError, match="layers"):
        harness.BenchConfig(0, 2, 8, 8)
    with pytest.raises(ValueError, match="dim"):
        harness.BenchConfig(1, 1, 8, 8)
    with pytest.raises(ValueError, match="device"):
        harness.BenchConfig(1, 2, 8, 8, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        harness.BenchConfig(1, 2, 8, 8, dtype="int8")
    with pytest.raises(ValueError, match="workload"):
        harness.Settings(workloads=("fit",))
    with pytest.raises(ValueError, match="repeats"):
        harness.Settings(repeats=0)
    with pytest.raises(ValueError, match="min_warmup_s"):
        harness.Settings(min_warmup_s=-1.0)
    with pytest.raises(ValueError, match="preset"):
        harness.preset("huge")
    assert [c.layers for c, _ in harness.preset("quick").entries] == [1, 8]
    assert harness.preset("main").entries[0][0] == harness.BenchConfig(50, 2, 256, 4096)


@pytest.fixture(scope="module")
def tiny_doc():
    settings = harness.Settings(
        providers=("fastnvp", "reference"), repeats=2, min_sample_s=0.0, min_warmup_s=0.0, threads=1
    )
    plan = harness.Plan(
        "tiny",
        [
            (harness.BenchConfig(1, 2, 8, 32), settings),
            (harness.BenchConfig(2, 2, 8, 32), settings),
        ],
    )
    return harness.run(plan, "fastnvp bench (test)", log=lambda _msg: None)


def test_results_document_schema(tiny_doc):
    doc = json.loads(json.dumps(tiny_doc))  # survives a JSON round trip
    harness.validate(doc)
    assert doc["schema"] == harness.SCHEMA
    assert doc["machine"]["cpu_model"] and doc["versions"]["torch"] == torch.__version__
    assert doc["load_average_start"] is None or len(doc["load_average_start"]) == 3
    assert {c["rows"] for c in doc["ceilings"]} == set(harness.GEMM_ROWS)
    assert all(c["best_gflops"] >= c["gflops"] > 0 for c in doc["ceilings"])
    for entry in doc["configs"]:
        assert entry["params_match"]
        assert all(c["ok"] for c in entry["checks"].values())
        rows = entry["results"]
        # FastRealNVP's fused levels join the plain provider.
        names = ("fastnvp", "reference", *prov.fastnvp_variants("cpu"))
        assert {(r["provider"], r["workload"]) for r in rows} == {
            (p, w) for p in names for w in harness.WORKLOADS
        }
        for r in rows:
            assert len(r["times_s"]) == 2
            assert r["q1_s"] <= r["median_s"] <= r["q3_s"]
            assert r["fraction_of_ceiling"] > 0
            if r["provider"] == "reference":
                assert r["ratio_vs_reference"] == 1.0


def test_gemm_ceiling_threading_modes():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = harness.gemm_ceiling(8, rows=(16,), repeats=1, min_sample_s=0.0)
    finally:
        torch.set_num_threads(before)
    assert [r["mode"] for r in rows] == ["intra-op", "per-thread"]
    assert all(r["gflops"] > 0 and r["rows"] == 16 for r in rows)


def test_max_minutes_lists_what_was_not_run():
    settings = harness.Settings(providers=("reference",), workloads=("log_prob",), repeats=1)
    plan = harness.Plan(
        "t",
        [(harness.BenchConfig(1, 2, 4, 8), settings), (harness.BenchConfig(2, 2, 4, 8), settings)],
    )
    seen = []
    doc = harness.run(plan, "test", log=lambda _m: None, max_minutes=1e-9, checkpoint=seen.append)
    assert len(doc["configs"]) == 1 and len(seen) == 1
    assert doc["not_run"][0]["layers"] == 2 and "time limit" in doc["not_run"][0]["reason"]
    assert "Not run: L=2" in report.markdown(doc)
    with pytest.raises(ValueError, match="max_minutes"):
        harness.run(plan, "test", max_minutes=0)


def test_validate_rejects_broken_documents(tiny_doc):
    for mutate, message in [
        (lambda d: d.pop("configs"), "configs"),
        (lambda d: d.update(schema="other/0"), "schema"),
        (lambda d: d["configs"][0]["results"][0].update(gflops=float("nan")), "gflops"),
        (lambda d: d["configs"][0]["results"][0].update(workload="fit"), "workload"),
        (lambda d: d["configs"][0]["config"].update(layers=0), "layers"),
    ]:
        doc = copy.deepcopy(tiny_doc)
        mutate(doc)
        with pytest.raises(ValueError, match=message):
            harness.validate(doc)


def test_markdown_table(tiny_doc):
    text = report.markdown(tiny_doc)
    assert "| provider | params (total / effective) | log_prob | sample | train | inverse |" in text
    assert text.count("| fastnvp |") == 2 and text.count("| reference |") == 2
    assert "**L=1 D=2 H=8 B=32" in text and "**L=2 D=2 H=8 B=32" in text
    assert "GEMM ceiling" in text
    headline = report.markdown(tiny_doc, headline_only=True)
    assert "**L=2" not in headline
    ref_row = next(line for line in text.splitlines() if line.startswith("| reference |"))
    assert "1.00×" in ref_row


def test_write_all_and_readme_section(tiny_doc, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# T\n\nbefore\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n")
    paths = report.write_all(tiny_doc, str(tmp_path / "res"), "tiny", readme=str(readme))
    names = {p.rsplit("/", 1)[-1] for p in paths}
    assert {"tiny.json", "tiny.md", "tiny_throughput_vs_depth.png"} <= names
    assert "tiny_ratio_vs_reference.png" in names and "README.md" in names
    text = readme.read_text()
    assert "old" not in text and text.startswith("# T\n\nbefore\n") and text.endswith("after\n")
    assert "| fastnvp |" in text and "res/tiny.md" in text
    assert report.load(str(tmp_path / "res" / "tiny.json"))["preset"] == "tiny"
    # Regenerating gives the same section.
    report.write_all(tiny_doc, str(tmp_path / "res"), "tiny", readme=str(readme))
    assert readme.read_text() == text


def test_update_readme_markers(tmp_path):
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert report.update_readme(str(plain), "x") is False
    assert plain.read_text() == "no markers\n"
    bad = tmp_path / "bad.md"
    bad.write_text("<!-- bench:end -->\n<!-- bench:start -->\n")
    with pytest.raises(ValueError, match="before"):
        report.update_readme(str(bad), "x")
    twice = tmp_path / "twice.md"
    twice.write_text("<!-- bench:start --><!-- bench:end --><!-- bench:start -->")
    with pytest.raises(ValueError, match="exactly one"):
        report.update_readme(str(twice), "x")


def test_cli_registered_and_regenerates_from_json(tiny_doc, tmp_path, capsys):
    assert COMMANDS["bench"] == "fastnvp.cli.commands.bench"
    src = tmp_path / "run.json"
    src.write_text(json.dumps(tiny_doc))
    assert main(["bench", "--from-json", str(src), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "fastnvp log_prob:" in out and (tmp_path / "o" / "run.md").exists()
    with pytest.raises(SystemExit):
        main(["bench", "--providers", "pyro"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "conditional", "--layers", "2"], "runs its own shapes; --layers make a"),
        (["--quick", "--dim", "2"], "--quick runs its own shapes"),
        (["--quick", "--preset", "grid"], "does not combine with --preset grid"),
        (["--device", "cuda", "--layers", "1"], "torch.cuda.is_available"),
        (["--readme", "no-such-readme.md", "--layers", "1"], "not a readable file"),
        (["--providers", "reference,fastnvp[foo=1]", "--layers", "1"], r"no option\(s\) \['foo'\]"),
    ],
)
def test_cli_refuses_options_it_would_ignore_or_fail_late(argv, message, capsys, tmp_path):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_cli_from_json_refuses_measurement_options(tiny_doc, tmp_path, capsys):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(tiny_doc))
    assert main(["bench", "--from-json", str(src), "--threads", "7", "--dim", "5"]) == 2
    assert "--dim, --threads would change a measurement" in capsys.readouterr().err
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    assert main(["bench", "--from-json", str(src), "--readme", str(readme)]) == 2
    assert "needs one <!-- bench:start --> ... <!-- bench:end --> pair" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the grid preset
TINY_AXES = {"dim": (2, 3), "hidden": (8,), "batch": (16,), "layers": (1,)}


def test_grid_preset_axes_and_size():
    plan = harness.preset("grid")
    shapes = {(c.dim, c.hidden, c.batch, c.layers) for c, _ in plan.entries}
    assert len(plan.entries) == len(shapes) == 96 == plan.grid["size"] == plan.grid["planned"]
    assert {c.dim for c, _ in plan.entries} == {2, 5, 16, 64}
    assert {c.hidden for c, _ in plan.entries} == {32, 64, 256}
    assert {c.batch for c, _ in plan.entries} == {16, 256, 1024, 4096}
    assert {c.layers for c, _ in plan.entries} == {8, 50}
    for _, settings in plan.entries:
        assert tuple(settings.providers) == ("fastnvp", "reference", "zuko", "FrEIA")
        assert tuple(settings.workloads) == ("train", "log_prob", "sample")
        assert not settings.fastnvp_variants
    assert plan.grid["sample"] is None and plan.grid["seed"] == 0 and plan.grid["rule"]
    assert plan.grid["shapes"] == [[c.dim, c.hidden, c.batch, c.layers] for c, _ in plan.entries]
    assert plan.grid["every_value_after"] == 4  # the longest axes (D, B) have 4 values


def test_grid_sample_is_deterministic_and_covers_every_value():
    order = harness.grid_order(harness.GRID_AXES, seed=0)
    assert order == harness.grid_order(harness.GRID_AXES, seed=0)
    assert sorted(order) == harness.grid_shapes() and len(set(order)) == 96
    assert order != harness.grid_order(harness.GRID_AXES, seed=1)  # the seed breaks ties
    for seed in (0, 1, 7):
        first = harness.grid_order(harness.GRID_AXES, seed)
        assert harness.grid_coverage(harness.GRID_AXES, first[:4])["every_value"]
        assert not harness.grid_coverage(harness.GRID_AXES, first[:3])["every_value"]
    plan = harness.preset("grid", grid_sample=6, grid_seed=3)
    assert len(plan.entries) == plan.grid["planned"] == 6 and plan.grid["sample"] == 6
    again = harness.preset("grid", grid_sample=6, grid_seed=3)
    assert [c for c, _ in plan.entries] == [c for c, _ in again.entries]
    shapes = [(c.dim, c.hidden, c.batch, c.layers) for c, _ in plan.entries]
    assert shapes == harness.grid_order(harness.GRID_AXES, 3)[:6]
    n_pairs = plan.grid["every_pair_after"]
    assert harness.grid_coverage(harness.GRID_AXES, order[:n_pairs])["every_pair"]
    for bad in (3, 97, 0):
        with pytest.raises(ValueError, match="grid_sample"):
            harness.preset("grid", grid_sample=bad)
    with pytest.raises(ValueError, match="grid_sample"):
        harness.preset("full", grid_sample=8)
    with pytest.raises(ValueError, match="axes"):
        harness.grid_plan({"dim": (2,)})
    with pytest.raises(ValueError, match="seed"):
        harness.grid_order(seed="0")


def _synthetic_grid_doc(tiny_doc):
    """A grid document built from tiny_doc's measured entry, with known ratios per shape."""
    doc = copy.deepcopy(tiny_doc)
    doc["preset"] = "grid"
    plan = harness.grid_plan(
        {"dim": (2, 6), "hidden": (8, 16), "batch": (32,), "layers": (1, 2)}, sample=3, seed=0
    )
    template = doc["configs"][0]
    doc["configs"] = []
    for k, (cfg, _) in enumerate(plan.entries):
        entry = copy.deepcopy(template)
        entry["config"].update(dim=cfg.dim, hidden=cfg.hidden, batch=cfg.batch, layers=cfg.layers)
        entry["results"] = [r for r in entry["results"] if r["workload"] in harness.GRID_WORKLOADS]
        for r in entry["results"]:
            if r["provider"] == "fastnvp":
                r["ratio_vs_reference"] = 2.0 ** (k - 1)  # 0.5x, 1x, 2x
                r["ratio_vs_fastest_peer"] = 1.5
        doc["configs"].append(entry)
    doc["grid"] = {**plan.grid, "shapes_run": 3, "every_value_run": True, "every_pair_run": False}
    doc["not_run"] = []
    return harness.validate(doc)


def test_grid_report_table_and_heatmap(tiny_doc, tmp_path):
    doc = _synthetic_grid_doc(tiny_doc)
    text = report.markdown(doc)
    assert (
        "| D | H | B | L | train vs reference | log_prob vs reference | sample vs reference "
        "| train vs best peer | log_prob vs best peer | sample vs best peer |" in text
    )
    table = text.split("Training steps split")[0]  # the ratio table, not the split after it
    rows = [line for line in table.splitlines() if line.startswith("| ") and "×" in line]
    assert len(rows) == 3
    assert sorted(r.split(" | ")[4] for r in rows) == ["0.50×", "1.00×", "2.00×"]
    assert all(r.rstrip(" |").endswith("1.50×") for r in rows)
    assert "Shapes: 3 of the 8-shape grid" in text and "first 3 shapes" in text
    assert "seed 0" in text and "greedy, cover first" in text
    assert any("geometric mean over 3 shapes" in line for line in report.summary_lines(doc))
    paths = report.write_all(doc, str(tmp_path), "grid")
    names = {p.rsplit("/", 1)[-1] for p in paths}
    assert names == {
        "grid.json",
        "grid.md",
        "grid_heatmap_vs_reference.png",
        "grid_heatmap_vs_peer.png",
    }
    png = (tmp_path / "grid_heatmap_vs_reference.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert report.load(str(tmp_path / "grid.json"))["grid"]["sample"] == 3
    with pytest.raises(ValueError, match="> 0"):
        from fastnvp.bench.heatmap import ratio_heatmap

        ratio_heatmap({"t": {(1, 1): 0.0}}, [1], [1], str(tmp_path / "x.png"), "t")


def test_grid_end_to_end_on_tiny_shapes(tmp_path, capsys):
    settings = harness.Settings(
        providers=harness.GRID_PROVIDERS,
        workloads=harness.GRID_WORKLOADS,
        repeats=1,
        min_sample_s=0.0,
        min_warmup_s=0.0,
        threads=1,
        fastnvp_variants=False,
    )
    plan = harness.grid_plan(TINY_AXES, settings=settings)
    assert sorted(c.dim for c, _ in plan.entries) == [2, 3]
    doc = harness.run(plan, "fastnvp bench --preset grid (test)", log=lambda _m: None)
    doc = json.loads(json.dumps(doc))
    harness.validate(doc)
    assert doc["grid"]["shapes_run"] == 2 and doc["grid"]["every_value_run"]
    ratios = report.grid_ratios(doc)
    assert set(ratios) == {(2, 8, 16, 1), (3, 8, 16, 1)}
    for r in ratios.values():
        assert r["provider"] == "fastnvp" and r["ok"]
        assert set(r["reference"]) == set(harness.GRID_WORKLOADS)
        peers_ran = {p for e in doc["configs"] for p in e["checks"]} & {"zuko", "FrEIA"}
        assert set(r["peer"]) == (set(harness.GRID_WORKLOADS) if peers_ran else set())
        assert set(r["peer_without_optimizer"]) == ({"train"} if peers_ran else set())
    text = report.markdown(doc)
    assert "Training steps split (CPU)" in text
    assert "Training steps split" not in report.markdown(doc, headline_only=True)
    src = tmp_path / "grid.json"
    src.write_text(json.dumps(doc))
    assert main(["bench", "--from-json", str(src), "--out", str(tmp_path / "o")]) == 0
    assert "train: fastnvp" in capsys.readouterr().out
    assert (tmp_path / "o" / "grid_heatmap_vs_reference.png").exists()
    assert main(["bench", "--preset", "full", "--grid-sample", "8"]) == 2
    assert main(["bench", "--preset", "grid", "--grid-sample", "2"]) == 2
    assert "grid_sample must be an int in [4, 96]" in capsys.readouterr().err


def test_ratio_without_the_update_is_paired_per_round():
    # Round 0: fastnvp steps 4 ms with a 1 ms update, the peers 6 (1) and 5 (2): the fastest
    # peer without its update is min(5, 3) = 3 ms against fastnvp's 3 ms. Round 1: 2 vs 4.
    times = {"fastnvp": [4.0, 3.0], "a": [6.0, 6.0], "b": [5.0, 7.0]}
    updates = {"fastnvp": [1.0, 1.0], "a": [1.0, 2.0], "b": [2.0, 3.0]}
    got = harness._without_update(times, updates, ["a", "b"], "fastnvp")
    assert got == [1.0, 2.0]


def test_cpu_train_call_clocks_its_update_apart():
    torch.manual_seed(0)
    ref = RealNVP.standard(2, 2, hidden=8)
    flow = prov.build("fastnvp", ref)
    x = torch.randn(16, 2)
    train = harness._make_call(flow, "train", x, x, lr=1e-3)
    infer = harness._make_call(flow, "log_prob", x, x, lr=1e-3)
    assert train.clocks_optimizer and not infer.clocks_optimizer
    t0 = time.perf_counter()
    train()
    train()
    spent = time.perf_counter() - t0
    update = train.take_optimizer_s()
    assert 0 < update < spent and train.take_optimizer_s() == 0.0
    infer()
    assert infer.take_optimizer_s() == 0.0
