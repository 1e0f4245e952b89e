"""Find 0-spill sm_90 tiles for the shipped configs that fail on the installed Triton.

For every shipped compile entry (``compile_report.registered_configs``) that fails to compile or
spills on this Triton, try smaller tiles in order of decreasing work per program (rows x output
columns x K chunk; the entry's own warp count first) until one compiles with 0 spills and shared
memory within 227 KB. Prints one JSON line per failing entry with the first tile that passes; the
chosen tiles go into ``fastnvp.kernels.triton_limits.TILE_OVERRIDES``, the one place per-version
tiles are decided. Needs no GPU; must run without ``TRITON_INTERPRET``.

    python benchmarks/tune_configs.py [--filter SUBSTRING] [--max-tries 10]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compile_report  # noqa: E402


def candidates(entry: dict, dot_k_min: int) -> list[dict]:
    """Tile variants of a fused-layer entry, largest first (the entry's warps before others)."""
    c = entry["constexprs"]
    hidden = c["H"]
    bm0, hc0, kc0, w0 = c["BLOCK_M"], c["HC"], c["KC"], entry["num_warps"]
    kc_min = max(kc0, dot_k_min)
    out = []
    for bm, hc, kc, warps in itertools.product(
        {bm0, bm0 // 2, bm0 // 4, bm0 // 8},
        {hc0, hc0 // 2, hc0 // 4},
        {kc_min, kc_min * 2},
        {w0, 4, 8},
    ):
        if bm < 16 or hc < max(16, dot_k_min) or kc > hidden or hc > hidden:
            continue
        out.append({"BLOCK_M": bm, "HC": hc, "KC": kc, "num_warps": warps})
    out.sort(key=lambda t: (-t["BLOCK_M"] * t["HC"] * t["KC"], t["num_warps"] != w0))
    return out


def with_tile(entry: dict, tile: dict) -> dict:
    new = copy.copy(entry)
    new["constexprs"] = {**entry["constexprs"], **{k: tile[k] for k in ("BLOCK_M", "HC", "KC")}}
    new["num_warps"] = tile["num_warps"]
    return new


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="")
    parser.add_argument("--max-tries", type=int, default=10)
    args = parser.parse_args(argv)
    import triton

    from fastnvp.kernels.triton_limits import dot_k_min

    ptxas = compile_report.ptxas_path()
    kmin = dot_k_min()
    print(f"# Triton {triton.__version__}, fp32 dot K minimum {kmin}", flush=True)
    status = 0
    for entry in compile_report.registered_configs():
        if args.filter not in entry["name"]:
            continue
        row = compile_report.compile_or_error(entry, ptxas)
        if compile_report.ok(row):
            continue
        if "BLOCK_M" not in entry["constexprs"]:
            print(json.dumps({"name": entry["name"], "fails": row.get("error") or row}))
            status = 1
            continue
        found = None
        for tile in candidates(entry, kmin)[: args.max_tries]:
            trial = compile_report.compile_or_error(with_tile(entry, tile), ptxas)
            if compile_report.ok(trial):
                found = {**tile, "registers": trial["registers"]}
                break
        print(json.dumps({"name": entry["name"], "tile": found}), flush=True)
        status |= found is None
    return status


if __name__ == "__main__":
    sys.exit(main())
