"""Reports generated from a results document: markdown tables, plots, the README section.

Nothing here measures; every number comes from the JSON written by ``fastnvp bench``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from fastnvp.bench.harness import CONDITIONAL_KEYS, GRID_WORKLOADS, WORKLOADS, validate
from fastnvp.bench.providers import PEERS


def load(path: str) -> dict:
    """Read and validate a results JSON file."""
    with open(path) as fh:
        return validate(json.load(fh))


def _fastnvp_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["provider"].startswith("fastnvp")]


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    frac = row.get("fraction_of_ceiling")
    pct = f", {100 * frac:.0f}%" if frac is not None else ""
    text = f"{row['ratio_vs_reference']:.2f}× ({row['gflops']:.0f} GF/s{pct})"
    if "compile_s" in row:
        text += f" +{row['compile_s']:.0f} s compile"
    return text


def config_title(entry: dict, doc: dict) -> str:
    c = entry["config"]
    threads = entry.get("settings", {}).get("threads")
    where = f"{c['device']} {c['dtype']}" + (f", {threads} threads" if threads else "")
    ctx = f" C={c['context']}" if c.get("context") is not None else ""
    return f"L={c['layers']} D={c['dim']}{ctx} H={c['hidden']} B={c['batch']} ({where})"


def config_table(entry: dict, doc: dict) -> str:
    """One markdown table: providers x workloads, ratio vs reference, GFLOP/s, % of ceiling."""
    rows = entry["results"]
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by = {(r["provider"], r["workload"]): r for r in rows}
    lines = [
        "| provider | params (total / effective) | " + " | ".join(workloads) + " |",
        "|---|---|" + "---|" * len(workloads),
    ]
    for p in providers:
        check = entry["checks"].get(p, {})
        params = f"{check.get('params_total', '?')} / {check.get('params_effective', '?')}"
        if check and not check.get("ok", True):
            params += " (log_prob MISMATCH)"
        cells = [_cell(by.get((p, w))) for w in workloads]
        lines.append(f"| {p} | {params} | " + " | ".join(cells) + " |")
    for name in entry.get("skipped", {}):
        lines.append(f"| {name} | – | " + " | ".join("–" for _ in workloads) + " |")
    out = "\n".join(lines)
    notes = []
    ceiling = entry.get("ceiling_gflops")
    if ceiling:
        notes.append(
            f"GEMM ceiling (addmm (rows×{entry['config']['hidden']})@"
            f"({entry['config']['hidden']}×{entry['config']['hidden']}), best row tile and "
            "threading): "
            f"{ceiling:.0f} GFLOP/s"
        )
    vs_peer = []
    for r in _fastnvp_rows(rows):
        if "ratio_vs_fastest_peer" in r:
            vs_peer.append(f"{r['provider']} {r['workload']} {r['ratio_vs_fastest_peer']:.2f}×")
    if vs_peer:
        notes.append("vs the fastest peer in each round: " + ", ".join(vs_peer))
    for name, reason in entry.get("skipped", {}).items():
        notes.append(f"{name}: {reason}")
    if notes:
        out += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return out


def _measured_by(doc: dict) -> list[str]:
    """The command, date, commit, machine, versions and load of a run (two lines)."""
    m, v = doc["machine"], doc["versions"]
    peers = ", ".join(f"{p} {v.get(p)}" for p in PEERS if v.get(p)) or "none installed"
    return [
        f"Measured by `{doc['command']}` on {doc['created_utc']} "
        f"(commit {str(doc.get('commit'))[:10]}{', dirty tree' if doc.get('dirty') else ''}).",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} CPUs"
        + (f", {m['gpu_model']}" if m.get("gpu_model") else "")
        + f"; torch {v['torch']}, peers: {peers}; "
        f"load average {doc.get('load_average_start')} → {doc.get('load_average_end')}.",
    ]


def markdown(doc: dict, headline_only: bool = False) -> str:
    """The report: how it was measured, then one table per configuration (the grid preset: one
    table with a row per shape, :func:`grid_markdown`; the conditional presets:
    :func:`conditional_markdown`)."""
    if is_grid(doc):
        return grid_markdown(doc, headline_only)
    if is_conditional(doc):
        return conditional_markdown(doc, headline_only)
    head = [
        *_measured_by(doc),
        "",
        "Cells: median over rounds of the paired speed ratio vs the eager reference (> 1 is "
        "faster), the analytic FLOP rate and its fraction of the GEMM ceiling measured in the "
        "same run. Providers ran alternately in one process on the same inputs. FLOPs are "
        "those of the GEMM form: on layers that keep one feature (every layer at D = 2) "
        "`fastnvp` evaluates the exact piecewise-linear knot form "
        "(`fastnvp.engine.cpu.knots`), O(H) work "
        "per row instead of O(H²), so its rate is reference-equivalent and can exceed the "
        "ceiling; `fastnvp[knot_tables=False]` is the GEMM form.",
    ]
    entries = doc["configs"][:1] if headline_only else doc["configs"]
    parts = ["\n".join(head)]
    for entry in entries:
        parts.append(f"**{config_title(entry, doc)}**\n\n{config_table(entry, doc)}")
    if doc.get("not_run") and not headline_only:
        parts.append(
            "Not run: "
            + "; ".join(
                f"L={c['layers']} D={c['dim']} H={c['hidden']} B={c['batch']} ({c['reason']})"
                for c in doc["not_run"]
            )
        )
    return "\n\n".join(parts) + "\n"


def update_readme(readme_path: str, section: str) -> bool:
    """Replace the text between the bench markers in ``readme_path`` with ``section``.

    Returns False (file untouched) when the markers are absent.

    Raises:
        ValueError: the markers are present but out of order or repeated.
    """
    return update_section(readme_path, section, "bench")


def check_section(path, name: str) -> None:
    """Raise ``ValueError`` unless the file ``path`` has one ``<!-- {name}:start -->`` /
    ``<!-- {name}:end -->`` pair in that order (what :func:`update_section` rewrites): a
    ``--readme`` that cannot take the section is named before a run, not ignored after it."""
    begin, finish = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    try:
        with open(path) as fh:
            text = fh.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
        raise ValueError(f"{path!r} is not a readable file ({type(error).__name__})") from error
    if text.count(begin) != 1 or text.count(finish) != 1 or text.index(finish) < text.index(begin):
        raise ValueError(f"{path!r} needs one {begin} ... {finish} pair for the generated section")


def update_section(path, section: str, name: str) -> bool:
    """Replace the text between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` in the
    file ``path`` with ``section`` (generated results in a hand-written page).

    Returns False (file untouched) when the file or the markers are absent.

    Raises:
        ValueError: the markers are present but out of order or repeated.
    """
    begin, finish = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        return False
    if begin not in text and finish not in text:
        return False
    if text.count(begin) != 1 or text.count(finish) != 1:
        raise ValueError(f"{path}: expected exactly one {begin} and {finish}")
    start = text.index(begin) + len(begin)
    end = text.index(finish)
    if end < start:
        raise ValueError(f"{path}: {finish} comes before {begin}")
    new = text[:start] + "\n" + section.strip() + "\n" + text[end:]
    if new != text:
        with open(path, "w") as fh:
            fh.write(new)
    return True


def _depth_series(doc: dict) -> tuple[list[dict], str] | None:
    """Configs that differ only in depth (the largest such group)."""
    groups: dict[tuple, list[dict]] = {}
    for entry in doc["configs"]:
        c = entry["config"]
        key = (c["dim"], c.get("context"), c["hidden"], c["batch"], c["device"], c["dtype"])
        groups.setdefault(key, []).append(entry)
    best = max(groups.values(), key=lambda g: len({e["config"]["layers"] for e in g}))
    if len({e["config"]["layers"] for e in best}) < 2:
        return None
    c = best[0]["config"]
    return sorted(best, key=lambda e: e["config"]["layers"]), (
        f"D={c['dim']} H={c['hidden']} B={c['batch']} ({c['device']} {c['dtype']})"
    )


def plots(doc: dict, out_prefix: str) -> list[str]:
    """Throughput vs depth per provider, and ratio vs reference; returns the written paths.

    The grid and conditional presets get their heatmaps instead (:func:`grid_plots`,
    :func:`conditional_plots`)."""
    if is_grid(doc):
        return grid_plots(doc, out_prefix)
    if is_conditional(doc):
        return conditional_plots(doc, out_prefix)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    series = _depth_series(doc)
    if series is not None:
        entries, label = series
        workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in entries[0]["results"])]
        fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
        for ax, w in zip(axes[0], workloads):
            providers = dict.fromkeys(
                r["provider"] for e in entries for r in e["results"] if r["workload"] == w
            )
            for p in providers:
                pts = [
                    (e["config"]["layers"], r["samples_per_s"])
                    for e in entries
                    for r in e["results"]
                    if r["workload"] == w and r["provider"] == p
                ]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=p)
            ax.set_xscale("log")
            ax.set_yscale("log")
            depths = sorted({e["config"]["layers"] for e in entries})
            ax.set_xticks(depths)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("coupling layers L")
            ax.set_ylabel("samples / s")
            ax.set_title(w)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Throughput vs depth, {label}")
        fig.tight_layout()
        path = f"{out_prefix}_throughput_vs_depth.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    entry = doc["configs"][0]
    rows = entry["results"]
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "reference"]
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(workloads) * max(1, len(providers)) / 3, 4))
    width = 0.8 / max(1, len(providers))
    for k, p in enumerate(providers):
        vals = []
        for w in workloads:
            match = [r for r in rows if r["provider"] == p and r["workload"] == w]
            vals.append(match[0]["ratio_vs_reference"] if match else 0.0)
        ax.bar([i + k * width for i in range(len(workloads))], vals, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(workloads))])
    ax.set_xticklabels(workloads)
    ax.set_ylabel("speed vs eager reference (×)")
    ax.set_title(config_title(entry, doc))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = f"{out_prefix}_ratio_vs_reference.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def write_all(doc: dict, out_dir: str, name: str, readme: str | None = None) -> list[str]:
    """Write ``<name>.json``, ``<name>.md`` and the plots under ``out_dir``; optionally the
    README section. Returns the paths written."""
    validate(doc)
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, name)
    with open(prefix + ".json", "w") as fh:
        json.dump(doc, fh, indent=1)
    with open(prefix + ".md", "w") as fh:
        fh.write(markdown(doc))
    paths = [prefix + ".json", prefix + ".md", *plots(doc, prefix)]
    if readme is not None:
        rel = os.path.relpath(prefix + ".md", os.path.dirname(os.path.abspath(readme)) or ".")
        section = markdown(doc, headline_only=True) + f"\nAll configurations: [{rel}]({rel}).\n"
        for path in paths[2:]:
            img = os.path.relpath(path, os.path.dirname(os.path.abspath(readme)) or ".")
            section += f"\n![{os.path.basename(path)}]({img})\n"
        if update_readme(readme, section):
            paths.append(readme)
    return paths


def summary_lines(doc: dict) -> Sequence[str]:
    """One line per fastnvp result of the headline configuration (for the terminal); the grid
    preset: one line per workload and ratio over all shapes (:func:`grid_summary`; the
    conditional presets likewise, :func:`conditional_summary`)."""
    if is_grid(doc):
        return grid_summary(doc)
    if is_conditional(doc):
        return conditional_summary(doc)
    entry = doc["configs"][0]
    out = []
    for r in _fastnvp_rows(entry["results"]):
        line = (
            f"{r['provider']} {r['workload']}: {r['ratio_vs_reference']:.2f}× reference, "
            f"{r['gflops']:.1f} GFLOP/s"
        )
        if r.get("fraction_of_ceiling") is not None:
            line += f" ({100 * r['fraction_of_ceiling']:.0f}% of {entry['ceiling_gflops']:.0f})"
        if "ratio_vs_fastest_peer" in r:
            line += f", {r['ratio_vs_fastest_peer']:.2f}× fastest peer"
        out.append(line)
    return out


# ----------------------------------------------------------------------------- the grid preset
def is_grid(doc: dict) -> bool:
    """True for a results document of the grid preset (it carries a ``grid`` block)."""
    return isinstance(doc.get("grid"), dict)


def _shape(entry: dict) -> tuple[int, int, int, int]:
    c = entry["config"]
    return c["dim"], c["hidden"], c["batch"], c["layers"]


def _shape_label(shape: tuple) -> str:
    return "D={} H={} B={} L={}".format(*shape)


def grid_workloads(doc: dict) -> list[str]:
    """The workloads in the document: :data:`GRID_WORKLOADS` order, then any others."""
    present = {r["workload"] for e in doc["configs"] for r in e["results"]}
    extra = [w for w in WORKLOADS if w not in GRID_WORKLOADS]
    return [w for w in (*GRID_WORKLOADS, *extra) if w in present]


def grid_ratios(doc: dict) -> dict[tuple[int, int, int, int], dict]:
    """The fastnvp provider's paired ratios per shape that ran.

    The fastnvp provider of a shape is the first ``fastnvp*`` provider of its results (the
    plain ``fastnvp`` in the grid preset).

    Returns:
        ``{(D, H, B, L): {"provider": str | None, "reference": {workload: ratio},
        "peer": {workload: ratio vs the fastest peer of each round}, "ok": bool}}``; ``ok`` is
        False when the provider's log_prob missed the reference's tolerance or the providers'
        effective parameter counts differ.
    """
    return _fastnvp_ratios(doc, _shape)


def _fastnvp_ratios(doc: dict, key) -> dict[tuple, dict]:
    """:func:`grid_ratios` with the shape of an entry given by ``key(entry)``."""
    out = {}
    for entry in doc["configs"]:
        names = [r["provider"] for r in entry["results"] if r["provider"].startswith("fastnvp")]
        provider = names[0] if names else None
        rows = [r for r in entry["results"] if r["provider"] == provider]
        check = entry["checks"].get(provider, {})
        out[key(entry)] = {
            "provider": provider,
            "reference": {r["workload"]: r["ratio_vs_reference"] for r in rows},
            "peer": {
                r["workload"]: r["ratio_vs_fastest_peer"]
                for r in rows
                if "ratio_vs_fastest_peer" in r
            },
            "peer_without_optimizer": {
                r["workload"]: r["ratio_vs_fastest_peer_without_optimizer"]
                for r in rows
                if "ratio_vs_fastest_peer_without_optimizer" in r
            },
            "ok": bool(check.get("ok", True)) and bool(entry.get("params_match", True)),
        }
    return out


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def grid_table(doc: dict) -> str:
    """Markdown table, one row per shape that ran (sorted by D, H, B, L): the fastnvp /
    reference speed ratio per workload, then fastnvp vs the fastest peer per workload."""
    ratios = grid_ratios(doc)
    workloads = grid_workloads(doc)
    with_peer = any(r["peer"] for r in ratios.values())
    head = ["D", "H", "B", "L", *(f"{w} vs reference" for w in workloads)]
    if with_peer:
        head += [f"{w} vs best peer" for w in workloads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for shape in sorted(ratios):
        r = ratios[shape]
        cells = [str(v) for v in shape] + [_ratio(r["reference"].get(w)) for w in workloads]
        if with_peer:
            cells += [_ratio(r["peer"].get(w)) for w in workloads]
        if not r["ok"]:
            cells[3] += " ⚠"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def grid_summary(doc: dict) -> list[str]:
    """Per workload and ratio: geometric mean, lowest and highest over the shapes that ran."""
    return _summary(doc, grid_ratios(doc), _shape_label)


def _summary(doc: dict, ratios: dict, shape_label) -> list[str]:
    out = []
    kinds = (
        ("reference", "", "the reference"),
        ("peer", "", "the fastest peer"),
        ("peer_without_optimizer", " without the Adam update", "the fastest peer"),
    )
    for kind, step, label in kinds:
        for w in grid_workloads(doc):
            pts = {s: r[kind][w] for s, r in ratios.items() if w in r.get(kind, {})}
            if not pts:
                continue
            lo, hi = min(pts, key=pts.get), max(pts, key=pts.get)
            out.append(
                f"{w}{step}: fastnvp {_geomean(list(pts.values())):.2f}× {label} (geometric "
                f"mean over {len(pts)} shapes; lowest {pts[lo]:.2f}× at {shape_label(lo)}, highest "
                f"{pts[hi]:.2f}× at {shape_label(hi)})"
            )
    return out


def grid_sampling(doc: dict) -> str:
    """One paragraph: which shapes of the grid ran, by which rule, and what they cover."""
    g = doc["grid"]
    axes = "; ".join(
        f"{sym} ∈ {{{', '.join(str(v) for v in g['axes'][name])}}}"
        for sym, name in (("D", "dim"), ("H", "hidden"), ("B", "batch"), ("L", "layers"))
    )
    run = len(doc["configs"])
    if g.get("sample") is None:
        planned = "the whole grid planned"
    else:
        planned = f"a sample of the first {g['sample']} shapes of the order"
    not_run = len(doc.get("not_run", []))
    if not_run:
        planned += f", {not_run} not started within the time limit"
    values = "yes" if g.get("every_value_run") else "NO"
    pairs = "yes" if g.get("every_pair_run") else "no"
    return (
        f"Shapes: {run} of the {g['size']}-shape grid {axes} ({planned}; seed {g['seed']}). "
        f"Order: {g['rule']} On this order the first {g['every_value_after']} shapes contain "
        f"every axis value and the first {g['every_pair_after']} every pair of values. Among "
        f"the shapes that ran: every axis value {values}; every pair of values of two axes "
        f"{pairs}."
    )


def grid_markdown(doc: dict, headline_only: bool = False) -> str:
    """The grid report: how it was measured and sampled, the table, a summary and notes.

    ``headline_only`` (the README section) leaves out the list of shapes not run."""
    ratios = grid_ratios(doc)
    providers = {r["provider"] for r in ratios.values()} - {None}
    peers = sorted({r["provider"] for e in doc["configs"] for r in e["results"]} & set(PEERS))
    head = [
        *_measured_by(doc),
        "",
        f"Cells: median over rounds of the paired speed ratio of {', '.join(sorted(providers))} "
        "to the eager reference (reference time / fastnvp time in the same round; > 1 is "
        "faster) and, per round, to the fastest of the peers that ran "
        f"({', '.join(peers) or 'none'}). Providers ran alternately in one process on the same "
        "inputs; quartiles and raw times are in the JSON. On the CPU, layers that keep one "
        "feature (every layer at D = 2) are evaluated by fastnvp in the exact piecewise-linear "
        "knot form (`fastnvp.engine.cpu.knots`) where it applies, O(H) work per row instead "
        "of O(H²).",
        "",
        grid_sampling(doc),
    ]
    parts = ["\n".join(head), grid_table(doc)]
    notes = list(grid_summary(doc))
    bad = [_shape_label(s) for s, r in sorted(ratios.items()) if not r["ok"]]
    if bad:
        notes.append(
            "⚠: log_prob outside the reference's tolerance or effective parameter counts differ "
            "(see `checks` in the JSON): " + ", ".join(bad)
        )
    skipped: dict[str, set] = {}
    for entry in doc["configs"]:
        for name, reason in entry.get("skipped", {}).items():
            skipped.setdefault(name, set()).add(reason)
    for name, reasons in skipped.items():
        notes.append(f"{name}: {'; '.join(sorted(reasons))}")
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    split = None if headline_only else train_split_table(doc, _shape, ["D", "H", "B", "L"])
    if split:
        parts.append(f"{TRAIN_SPLIT_NOTE}:\n\n{split}")
    if doc.get("not_run") and not headline_only:
        parts.append(
            "Not run: "
            + ", ".join(
                _shape_label((c["dim"], c["hidden"], c["batch"], c["layers"]))
                for c in doc["not_run"]
            )
            + f" ({doc['not_run'][0]['reason']})."
        )
    return "\n\n".join(parts) + "\n"


def _heatmap_title(doc: dict, head: str, shapes: str) -> str:
    """A ratio heatmap's title: what it shows, the device, dtype and threads, the shape count."""
    c = doc["configs"][0]["config"]
    threads = doc["configs"][0].get("settings", {}).get("threads")
    return (
        f"{head} ({c['device']} {c['dtype']}"
        + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")
        + f"; {shapes} shapes; grey: not measured)"
    )


def grid_plots(doc: dict, out_prefix: str) -> list[str]:
    """``<prefix>_heatmap_vs_reference.png`` and, when peers ran, ``_heatmap_vs_peer.png``:
    one panel per workload, rows (D, H), columns (B, L), colour log2 of fastnvp's ratio."""
    from fastnvp.bench.heatmap import ratio_heatmap

    axes = doc["grid"]["axes"]
    rows = [(d, h) for d in axes["dim"] for h in axes["hidden"]]
    cols = [(b, n) for b in axes["batch"] for n in axes["layers"]]
    ratios = grid_ratios(doc)
    workloads = grid_workloads(doc)
    written = []
    for kind, suffix, name in (
        ("reference", "vs_reference", "fastnvp / reference"),
        ("peer", "vs_peer", "fastnvp / fastest peer"),
    ):
        panels = {
            w: {((s[0], s[1]), (s[2], s[3])): r[kind][w] for s, r in ratios.items() if w in r[kind]}
            for w in workloads
        }
        if not any(panels.values()):
            continue
        title = _heatmap_title(
            doc, f"{name} speed ratio over the grid", f"{len(ratios)} of {doc['grid']['size']}"
        )
        written.append(
            ratio_heatmap(
                panels,
                rows,
                cols,
                f"{out_prefix}_heatmap_{suffix}.png",
                title,
                row_label=lambda r: f"D={r[0]} H={r[1]}",
                col_label=lambda c: f"B={c[0]}\nL={c[1]}",
                ratio_name=name,
            )
        )
    return written


# ----------------------------------------------------------------------------- conditional
def is_conditional(doc: dict) -> bool:
    """True for a results document of a conditional preset (it carries a ``conditional``
    block)."""
    return isinstance(doc.get("conditional"), dict)


def _cond_shape(entry: dict) -> tuple[int, int, int, int, int]:
    """(D, C, B, L, H) of a conditional entry (:data:`CONDITIONAL_KEYS` order)."""
    c = entry["config"]
    return tuple(c[k] for k in CONDITIONAL_KEYS)


def _cond_label(shape: tuple) -> str:
    return "D={} C={} B={} L={} H={}".format(*shape)


def conditional_ratios(doc: dict) -> dict[tuple[int, int, int, int, int], dict]:
    """:func:`grid_ratios` of a conditional document, keyed by (D, C, B, L, H)."""
    return _fastnvp_ratios(doc, _cond_shape)


def _fastest_peer(entry: dict, workload: str) -> str | None:
    rows = [r for r in entry["results"] if r["workload"] == workload and r["provider"] in PEERS]
    return min(rows, key=lambda r: r["median_s"])["provider"] if rows else None


def _providers(doc: dict) -> list[str]:
    """Providers that ran, in the order of their first appearance."""
    return list(dict.fromkeys(r["provider"] for e in doc["configs"] for r in e["results"]))


def conditional_table(doc: dict) -> str:
    """Markdown table, one row per shape that ran (in run order): parameters, fastnvp's paired
    ratio to the reference and to the fastest peer per workload, and which peer was fastest."""
    workloads = grid_workloads(doc)
    ratios = conditional_ratios(doc)
    with_peer = any(r["peer"] for r in ratios.values())
    head = ["D", "C", "B", "L", "H", "params (total / effective)"]
    head += [f"{w} vs reference" for w in workloads]
    if with_peer:
        head += [f"{w} vs best peer" for w in workloads]
        head.append("fastest peer (" + ", ".join(workloads) + ")")
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for entry in doc["configs"]:
        shape = _cond_shape(entry)
        r = ratios[shape]
        check = entry["checks"].get(r["provider"], {})
        params = f"{check.get('params_total', '?')} / {check.get('params_effective', '?')}"
        if not r["ok"]:
            params += " ⚠"
        cells = [str(v) for v in shape] + [params]
        cells += [_ratio(r["reference"].get(w)) for w in workloads]
        if with_peer:
            cells += [_ratio(r["peer"].get(w)) for w in workloads]
            cells.append(", ".join(_fastest_peer(entry, w) or "–" for w in workloads))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conditional_times(doc: dict, workload: str) -> str:
    """Markdown table of one workload: median milliseconds per call, a column per provider."""
    providers = _providers(doc)
    lines = [
        "| D | C | B | L | H | " + " | ".join(providers) + " |",
        "|" + "---:|" * (5 + len(providers)),
    ]
    for entry in doc["configs"]:
        by = {r["provider"]: r for r in entry["results"] if r["workload"] == workload}
        cells = [str(v) for v in _cond_shape(entry)]
        cells += [f"{1e3 * by[p]['median_s']:.3g}" if p in by else "–" for p in providers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_split_table(doc: dict, shape, shape_head: list[str]) -> str | None:
    """Markdown table of the training steps whose Adam update was clocked apart (CPU runs):
    per shape (``shape(entry)``, columns ``shape_head``), the fastnvp provider's median step
    and update (ms), the same for the fastest peer (by median step), and fastnvp's paired
    ratios to the fastest peer with and without the update. None when no step was clocked."""
    ratios = _fastnvp_ratios(doc, shape)
    head = [*shape_head, "fastnvp step (update) ms", "fastest peer", "its step (update) ms"]
    head += ["vs best peer", "vs best peer without the update"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for entry in doc["configs"]:
        key = shape(entry)
        r = ratios[key]
        by = {row["provider"]: row for row in entry["results"] if row["workload"] == "train"}
        mine = by.get(r["provider"])
        peer = _fastest_peer(entry, "train")
        if mine is None or "optimizer_s" not in mine:
            continue
        cells = [str(v) for v in key]
        cells.append(f"{1e3 * mine['median_s']:.3g} ({1e3 * mine['optimizer_s']:.3g})")
        theirs = by.get(peer) if peer else None
        if theirs is not None and "optimizer_s" in theirs:
            cells += [peer, f"{1e3 * theirs['median_s']:.3g} ({1e3 * theirs['optimizer_s']:.3g})"]
        else:
            cells += ["–", "–"]
        cells.append(_ratio(r["peer"].get("train")))
        cells.append(_ratio(r["peer_without_optimizer"].get("train")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else None


TRAIN_SPLIT_NOTE = (
    "Training steps split (CPU): the median step and, in brackets, the Adam update inside it, "
    "for fastnvp and the fastest peer, and fastnvp's paired ratios to the fastest peer with "
    "and without each provider's update. Every provider runs torch's default Adam over its "
    "own parameter tensors; on the CPU that is a loop over the tensors (12 per coupling layer, "
    "for every provider here), so its cost follows their number and size, not the flow's "
    "engine"
)


def conditional_params(doc: dict) -> str:
    """Markdown table: trainable parameters (total / effective) of every provider per shape."""
    providers = _providers(doc)
    lines = [
        "| D | C | B | L | H | " + " | ".join(providers) + " |",
        "|" + "---:|" * (5 + len(providers)),
    ]
    for entry in doc["configs"]:
        cells = [str(v) for v in _cond_shape(entry)]
        for p in providers:
            c = entry["checks"].get(p)
            cells.append(f"{c['params_total']} / {c['params_effective']}" if c else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conditional_summary(doc: dict) -> list[str]:
    """Per workload and ratio: geometric mean, lowest and highest over the shapes that ran."""
    return _summary(doc, conditional_ratios(doc), _cond_label)


def conditional_markdown(doc: dict, headline_only: bool = False) -> str:
    """The conditional report: how it was measured, the ratio table, a summary, notes (how each
    provider samples, skipped providers) and, unless ``headline_only``, the median times per
    workload and the parameter counts of every provider."""
    ratios = conditional_ratios(doc)
    providers = sorted({r["provider"] for r in ratios.values()} - {None})
    peers = [p for p in _providers(doc) if p in PEERS]
    axes = doc["conditional"]["axes"]
    grid = "; ".join(
        f"{sym} ∈ {{{', '.join(str(v) for v in axes[name])}}}"
        for sym, name in zip(("D", "C", "B", "L", "H"), CONDITIONAL_KEYS)
    )
    deep = doc["conditional"].get("deep") or []
    head = [
        *_measured_by(doc),
        "",
        "Conditional flows p(x | c), context c (B, C) without embedding. Shapes: the product "
        f"{grid}"
        + (f", then {', '.join(_cond_label(tuple(d)) for d in deep)}" if deep else "")
        + f"; {len(doc['configs'])} of {doc['conditional'].get('planned', '?')} planned ran. "
        f"Cells: median over rounds of the paired speed ratio of {', '.join(providers)} to the "
        "eager conditional reference (reference time / fastnvp time in the same round; > 1 is "
        "faster) and, per round, to the fastest of the peers that ran "
        f"({', '.join(peers) or 'none'}). Every peer is a conditional Real NVP with the same "
        "L coupling layers holding the reference's weights on the split halves (first Linear "
        "on the kept and context columns), so its log_prob(x | c) matches the reference "
        "before it is timed and its parameter count equals the reference's effective count. "
        "Workloads: train (forward log_prob(x, c), backward, Adam step), log_prob(x, c) "
        "without grad, sample: one sample per context row (B rows). Providers ran alternately "
        "in one process on the same inputs; quartiles and raw times are in the JSON.",
    ]
    parts = ["\n".join(head), conditional_table(doc)]
    notes = list(conditional_summary(doc))
    bad = [_cond_label(sh) for sh, r in ratios.items() if not r["ok"]]
    if bad:
        notes.append(
            "⚠: log_prob outside the reference's tolerance or effective parameter counts differ "
            "(see `checks` in the JSON): " + ", ".join(bad)
        )
    forms: dict[str, str] = {}
    skipped: dict[str, set] = {}
    for entry in doc["configs"]:
        for name, check in entry["checks"].items():
            if check.get("sample_call"):
                forms.setdefault(name, check["sample_call"])
        for name, reason in entry.get("skipped", {}).items():
            skipped.setdefault(name, set()).add(reason)
    if forms:
        notes.append("sample calls: " + "; ".join(f"{n}: `{f}`" for n, f in forms.items()))
    for name, reasons in skipped.items():
        notes.append(f"{name}: {'; '.join(sorted(reasons))}")
    parts.append("\n".join(f"- {n}" for n in notes))
    if not headline_only:
        for w in grid_workloads(doc):
            parts.append(f"Median ms per call, {w}:\n\n{conditional_times(doc, w)}")
        split = train_split_table(doc, _cond_shape, ["D", "C", "B", "L", "H"])
        if split:
            parts.append(f"{TRAIN_SPLIT_NOTE}:\n\n{split}")
        parts.append(
            "Trainable parameters (total / effective; the reference's full-width nets also "
            "hold weights that only see zeros or are multiplied by zero):\n\n"
            + conditional_params(doc)
        )
        if doc.get("not_run"):
            parts.append(
                "Not run: "
                + ", ".join(
                    _cond_label(tuple(c.get(k) for k in CONDITIONAL_KEYS)) for c in doc["not_run"]
                )
                + f" ({doc['not_run'][0]['reason']})."
            )
    return "\n\n".join(parts) + "\n"


def conditional_plots(doc: dict, out_prefix: str) -> list[str]:
    """``<prefix>_heatmap_vs_reference.png`` and, when peers ran, ``_heatmap_vs_peer.png``:
    one panel per workload, rows (D, C), columns (B, L, H), colour log2 of fastnvp's ratio."""
    from fastnvp.bench.heatmap import ratio_heatmap

    ratios = conditional_ratios(doc)
    rows = sorted({(s[0], s[1]) for s in ratios})
    cols = sorted({(s[2], s[3], s[4]) for s in ratios})
    written = []
    for kind, suffix, name in (
        ("reference", "vs_reference", "fastnvp / reference"),
        ("peer", "vs_peer", "fastnvp / fastest peer"),
    ):
        panels = {
            w: {(s[:2], s[2:]): r[kind][w] for s, r in ratios.items() if w in r[kind]}
            for w in grid_workloads(doc)
        }
        if not any(panels.values()):
            continue
        title = _heatmap_title(doc, f"conditional flows: {name} speed ratio", f"{len(ratios)}")
        written.append(
            ratio_heatmap(
                panels,
                rows,
                cols,
                f"{out_prefix}_heatmap_{suffix}.png",
                title,
                row_label=lambda r: f"D={r[0]} C={r[1]}",
                col_label=lambda c: f"B={c[0]}\nL={c[1]} H={c[2]}",
                ratio_name=name,
            )
        )
    return written
