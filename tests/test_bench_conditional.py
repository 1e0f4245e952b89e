"""Conditional benchmark providers and the conditional presets at tiny sizes.

Every conditional provider must compute the conditional reference's log p(x | c) (the
definition of correct, docs/design.md §1.3-1.4, §1.7), let gradients reach the context, condition
each row on its own context row, and hold the reference's effective parameter count.
"""

import argparse
import json
import math

import pytest
import torch

from fastnvp.bench import harness, report
from fastnvp.bench import providers as prov
from fastnvp.cli import main
from fastnvp.cli.commands import bench as bench_cli
from fastnvp.core.masks import split_indices
from fastnvp.core.reference import RealNVP
from fastnvp.flows.fast_realnvp import FastRealNVP

COND = prov.CONDITIONAL_PROVIDERS
SHAPES = [(2, 1), (5, 3)]  # (D, C)


def _ref(dim, ctx, layers=3, hidden=12, dtype=torch.float32, seed=0, **options):
    torch.manual_seed(seed)
    return RealNVP.standard(dim, layers, hidden=hidden, context=ctx, **options).to(dtype)


def _build_or_skip(spec, ref):
    try:
        return prov.build(spec, ref)
    except prov.ProviderUnavailable as exc:
        pytest.skip(str(exc))


def _inputs(n, dim, ctx, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, w, generator=gen).to(dtype) for w in (dim, dim, ctx))


@pytest.mark.parametrize(("dim", "ctx"), SHAPES)
@pytest.mark.parametrize("spec", COND)
def test_conditional_provider_matches_reference(spec, dim, ctx):
    ref = _ref(dim, ctx)
    flow = _build_or_skip(spec, ref)
    assert flow.context == ctx and flow.sample_form
    x, z, c = _inputs(40, dim, ctx)
    with torch.no_grad():
        lp = flow.log_prob(x, c)
        assert lp.shape == (40,) and torch.isfinite(lp).all()
        torch.testing.assert_close(lp, ref.log_prob(x, context=c), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flow.inverse(z, c), ref.g(z, context=c), rtol=1e-5, atol=1e-5)
        # Each row is conditioned on its own context row: permuting the pairs permutes the
        # densities, and another context gives another density.
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(flow.log_prob(x[perm], c[perm]), lp[perm])
        assert (flow.log_prob(x, c + 1.0) - lp).abs().max() > 1e-3
        # sample: one draw per context row, a point of finite density under that row.
        xs = flow.sample(c)
        assert xs.shape == (40, dim) and torch.isfinite(ref.log_prob(xs, context=c)).all()
    # One training step moves the weights and keeps them finite.
    before = [p.detach().clone() for p in flow.trainable()]
    opt = torch.optim.Adam(flow.trainable(), lr=1e-2)
    flow.loss(x, c).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in flow.trainable())
    assert any(not torch.equal(a, b) for a, b in zip(before, flow.trainable()))


@pytest.mark.parametrize("spec", COND)
def test_conditional_gradients_reach_the_context(spec):
    dim, ctx = 5, 3
    ref = _ref(dim, ctx, layers=2, hidden=8, dtype=torch.float64)
    flow = _build_or_skip(spec, ref)
    x, _, c = _inputs(16, dim, ctx, torch.float64)
    c_ref, c_flow = c.clone().requires_grad_(), c.clone().requires_grad_()
    (-ref.log_prob(x, context=c_ref).mean()).backward()
    flow.loss(x, c_flow).backward()
    assert torch.isfinite(c_flow.grad).all() and c_flow.grad.abs().max() > 0
    torch.testing.assert_close(c_flow.grad, c_ref.grad, rtol=1e-8, atol=1e-12)
    # The loss gradient of layer 0's first Linear of S (kept and context columns) matches.
    w, g = ref.s[0][0].weight, ref.s[0][0].weight.grad
    kept, _ = split_indices(ref.mask[0])
    inputs = torch.cat((kept, dim + torch.arange(ctx)))
    found = []
    for p in flow.trainable():
        if p.shape == w.shape and torch.equal(p, w):
            found.append((p.grad, g))
        elif p.shape == (w.shape[0], inputs.numel()) and torch.equal(p, w[:, inputs]):
            found.append((p.grad, g[:, inputs]))
    assert len(found) == 1, "no parameter of the provider is the reference's S[0] first Linear"
    got, expected = found[0]
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)
    assert expected[:, -ctx:].abs().max() > 0  # the context columns get a gradient


@pytest.mark.parametrize("spec", COND)
def test_conditional_density_integrates_to_one(spec):
    # D = 2: a Riemann sum of p(x | c) over a fine grid, for two contexts.
    ref = _ref(2, 2, hidden=16, seed=3)
    flow = _build_or_skip(spec, ref)
    h = 0.05
    axis = torch.arange(-8.0, 8.0 + h / 2, h, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    flow.module.double()
    for c0 in ([0.0, 0.0], [1.5, -2.0]):
        c = torch.tensor(c0, dtype=torch.float64).expand(grid.shape[0], 2)
        with torch.no_grad():
            mass = flow.log_prob(grid, c).exp().sum().item() * h * h
        assert mass == pytest.approx(1.0, abs=5e-3)


def test_effective_params_with_context_and_preset_shape_match():
    dim, ctx, layers, hidden = 5, 3, 3, 12
    ref = _ref(dim, ctx, layers, hidden)
    expected = 0
    for i in range(layers):
        k1 = int(ref.mask[i].sum())
        k2 = dim - k1
        per_net = hidden * (k1 + ctx) + hidden + hidden * hidden + hidden + k2 * (hidden + 1)
        expected += 2 * per_net
    assert prov.effective_params(ref) == expected
    full = sum(p.numel() for p in ref.parameters())
    assert full == 2 * layers * (
        (dim + ctx) * hidden + hidden + hidden**2 + hidden + dim * hidden + dim
    )
    # A preset shape: every conditional provider holds exactly the reference's effective count.
    big = _ref(16, 8, layers=8, hidden=256)
    counts = {}
    for spec in COND:
        try:
            flow = prov.build(spec, big)
        except prov.ProviderUnavailable:
            continue
        counts[spec] = (flow.params_total, flow.params_effective)
    eff = prov.effective_params(big)
    assert {e for _, e in counts.values()} == {eff}
    for spec, (total, _) in counts.items():
        fastnvp_side = spec in ("fastnvp", "reference")
        assert total == (sum(p.numel() for p in big.parameters()) if fastnvp_side else eff)
    assert isinstance(prov.build("fastnvp", big).module, FastRealNVP)


def test_fastnvp_provider_is_the_standard_conditional_model():
    ref = _ref(4, 2, layers=4, hidden=16)
    flow = prov.build("fastnvp", ref)
    std = FastRealNVP.standard(4, 4, hidden=16, context=2)
    std.load_state_dict(ref.state_dict())
    assert flow.module.context_features == 2
    x, _, c = _inputs(30, 4, 2)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x, c), std.log_prob(x, context=c))
        torch.testing.assert_close(flow.log_prob(x, c), ref.log_prob(x, context=c))


def test_unsupported_conditional_providers_are_skipped():
    ref = _ref(3, 2)
    with pytest.raises(prov.ProviderUnavailable, match="conditional|installed"):
        prov.build("normflows", ref)
    emb = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh())
    with_emb = _ref(3, 2, embedding=emb)
    for peer in prov.CONDITIONAL_PEERS:
        with pytest.raises(prov.ProviderUnavailable, match="embedding|installed"):
            prov.build(peer, with_emb)
    flow = prov.build("fastnvp", with_emb)  # fastnvp takes the embedding along
    x, _, c = _inputs(10, 3, 2)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x, c), with_emb.log_prob(x, context=c))
    assert flow.params_effective == prov.effective_params(with_emb)


def test_config_context_label_and_flops():
    cfg = harness.BenchConfig(8, 2, 64, 256, context=3)
    assert cfg.label() == "L=8 D=2 C=3 H=64 B=256"
    assert harness.BenchConfig(8, 2, 64, 256).label() == "L=8 D=2 H=64 B=256"
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="context"):
            harness.BenchConfig(8, 2, 64, 256, context=bad)
    ref = _ref(3, 2, layers=2, hidden=4)  # kept/transformed: (1, 2) then (2, 1), E = 2
    per_row = 2 * 2 * ((1 + 2) * 4 + 16 + 4 * 2) + 2 * 2 * ((2 + 2) * 4 + 16 + 4 * 1)
    assert harness.forward_flops_per_row(ref) == per_row


def test_conditional_presets():
    plan = harness.preset("conditional")
    shapes = [(c.dim, c.context, c.batch, c.layers, c.hidden) for c, _ in plan.entries]
    assert len(shapes) == len(set(shapes)) == 25 == plan.conditional["planned"]
    assert {s for s in shapes[:24]} == {
        (d, c, b, 8, h) for d in (2, 8, 16) for c in (1, 8) for b in (256, 4096) for h in (64, 256)
    }
    assert shapes[24] == (2, 8, 1024, 50, 256)
    assert [s[4] for s in shapes[:24]] == sorted(s[4] for s in shapes[:24])  # cheap widths first
    for width in (64, 256):  # and within a width, cheap batches first
        batches = [s[2] for s in shapes[:24] if s[4] == width]
        assert batches == sorted(batches)
    for _, settings in plan.entries:
        assert tuple(settings.providers) == COND
        assert tuple(settings.workloads) == ("train", "log_prob", "sample")
        assert not settings.fastnvp_variants and settings.compile_max_layers == 0
    quick = harness.preset("conditional-quick")
    assert len(quick.entries) == 4 and all(c.batch == 256 for c, _ in quick.entries)
    assert quick.entries[0][1].repeats == 2
    with pytest.raises(ValueError, match="axes"):
        harness.conditional_plan({"dim": (2,)})
    with pytest.raises(ValueError, match="deep"):
        harness.conditional_plan(deep=((2, 1),))


def _args(argv):
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_conditional_plans():
    assert bench_cli._plan(_args(["--preset", "conditional", "--quick"])).name == (
        "conditional-quick"
    )
    plan = bench_cli._plan(_args(["--preset", "conditional", "--repeats", "1"]))
    assert plan.name == "conditional" and plan.entries[0][1].repeats == 1
    custom = bench_cli._plan(_args(["--dim", "3", "--context", "1,4", "--layers", "2"]))
    assert [c.context for c, _ in custom.entries] == [1, 4]


TINY_AXES = {"dim": (2, 3), "context": (1, 2), "batch": (16,), "layers": (2,), "hidden": (8,)}


@pytest.fixture(scope="module")
def cond_doc():
    settings = harness.Settings(
        providers=COND,
        workloads=harness.GRID_WORKLOADS,
        repeats=1,
        min_sample_s=0.0,
        min_warmup_s=0.0,
        threads=1,
        compile_max_layers=0,
        fastnvp_variants=False,
    )
    plan = harness.conditional_plan(TINY_AXES, ((2, 2, 16, 3, 8),), settings=settings)
    doc = harness.run(plan, "fastnvp bench --preset conditional (test)", log=lambda _m: None)
    return harness.validate(json.loads(json.dumps(doc)))


def test_conditional_end_to_end(cond_doc, tmp_path, capsys):
    doc = cond_doc
    assert doc["conditional"]["planned"] == len(doc["configs"]) == 5
    ran = {p for e in doc["configs"] for p in e["checks"]}
    for entry in doc["configs"]:
        assert entry["config"]["context"] in (1, 2)
        assert entry["params_match"] and all(c["ok"] for c in entry["checks"].values())
        assert all(c["sample_call"] for c in entry["checks"].values())
        pairs = {(r["provider"], r["workload"]) for r in entry["results"]}
        assert pairs == {(p, w) for p in ran for w in harness.GRID_WORKLOADS}
        peers_ran = bool(ran & set(prov.CONDITIONAL_PEERS))
        for r in entry["results"]:
            assert ("ratio_vs_fastest_peer" in r) == peers_ran
            # A CPU training step clocks its Adam update apart: one time per round, each a
            # positive part of that round's step.
            assert ("optimizer_s" in r) == (r["workload"] == "train")
            if r["workload"] == "train":
                assert len(r["optimizer_times_s"]) == len(r["times_s"])
                assert all(
                    0 < u < t for u, t in zip(r["optimizer_times_s"], r["times_s"], strict=True)
                )
                assert ("ratio_vs_fastest_peer_without_optimizer" in r) == peers_ran
    ratios = report.conditional_ratios(doc)
    assert (2, 2, 16, 3, 8) in ratios and all(r["ok"] for r in ratios.values())
    text = report.markdown(doc)
    assert "| D | C | B | L | H | params (total / effective) | train vs reference |" in text
    assert "Median ms per call, sample" in text and "Trainable parameters" in text
    assert "one sample per context row" in text and "sample calls:" in text
    assert "Training steps split (CPU)" in text and "without the update |" in text
    summary = report.summary_lines(doc)
    assert any("geometric mean over 5 shapes" in line for line in summary)
    if any(r["peer_without_optimizer"] for r in ratios.values()):
        assert any(line.startswith("train without the Adam update:") for line in summary)
    headline = report.markdown(doc, headline_only=True)
    assert "Median ms per call" not in headline and "geometric mean" in headline
    paths = report.write_all(doc, str(tmp_path), "conditional")
    names = {p.rsplit("/", 1)[-1] for p in paths}
    assert {"conditional.json", "conditional.md", "conditional_heatmap_vs_reference.png"} <= names
    src = tmp_path / "conditional.json"
    assert main(["bench", "--from-json", str(src), "--out", str(tmp_path / "o")]) == 0
    assert "train: fastnvp" in capsys.readouterr().out
    assert (tmp_path / "o" / "conditional.md").exists()
    assert math.isfinite(doc["duration_s"])
