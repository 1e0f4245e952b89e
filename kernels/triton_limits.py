"""What the installed Triton allows: dot minimums and per-version tile overrides, decided here.

The kernels are compiled by whatever Triton ships with the user's torch (torch 2.7 -> 3.3,
2.8 -> 3.4, 2.9 -> 3.5, 2.10 / 2.11 -> 3.6, newest 3.9; ``benchmarks/compat.py`` checks each).
Two things differ between those versions and are decided in this module only:

- **the smallest K of a ``tl.dot``.** Triton 3.9 accepts fp32 dots with K = 8, Triton <= 3.6
  asserts K >= 16. :func:`dot_k_min` asks the installed Triton's own NVIDIA backend
  (``min_dot_size``), so the tile tables never hard-code a version;
- **register pressure.** The same tile can compile to a different register count: e.g. the
  tf32 whole-stack kernel at H = 256 takes 219 registers on Triton 3.9 and spills 72 B at 255
  on 3.6. :data:`TILE_OVERRIDES` lists, per Triton version range, the tiles that replace the
  default ones (``fused_layer.layer_config`` / ``fused_layer_backward.backward_config``), each
  found by ``benchmarks/tune_configs.py`` (the first 0-spill tile in order of decreasing work per
  program) and checked by the compile report of every supported version.

- **what cannot be compiled without spills** at any tile: :data:`UNSHIPPED` lists those kernels
  per version; their layers run the PyTorch path for that step instead.

Limit: a Triton outside the checked range gets the default tiles with K raised to its dot
minimum; they compile, but whether they spill there is unmeasured.
"""

from __future__ import annotations

import functools

import triton

TRITON_VERSION = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])

# (first version, last version) inclusive -> {(kernel, precision, tier): tile}. kernel: "layer"
# (forward / inverse), "stack" (whole stack), "backward"; tier: fused_layer.tile_tier. A tile
# may carry "min_hidden": the last tile of a key's list whose min_hidden <= H applies. Found by
# benchmarks/tune_configs.py on 3.3.1, 3.4.0, 3.5.1 and 3.6.0; the 3.9 defaults need none.
_T = dict  # one tile: BLOCK_M rows, HC output columns, KC K chunk, num_warps
TILE_OVERRIDES: dict[tuple[tuple[int, int], tuple[int, int]], dict[tuple[str, str, str], list]] = {
    ((3, 3), (3, 3)): {
        # 2-4 first-Linear columns (D = 2 with a context column): 0-spill tiles on 3.3.1.
        ("layer", "tf32", "outer"): [_T(BLOCK_M=64, HC=64, KC=64, num_warps=8)],
        ("layer", "bf16", "outer"): [_T(BLOCK_M=64, HC=128, KC=32, num_warps=8)],
        ("stack", "tf32", "outer"): [_T(BLOCK_M=128, HC=32, KC=32, num_warps=8)],
        ("stack", "bf16", "outer"): [_T(BLOCK_M=64, HC=128, KC=32, num_warps=8)],
        ("backward", "bf16", "outer"): [_T(BLOCK_M=16, HC=16, KC=128, num_warps=4)],
        ("layer", "tf32", "narrow"): [_T(BLOCK_M=128, HC=64, KC=32, num_warps=8, min_hidden=128)],
        ("layer", "tf32", "wide"): [_T(BLOCK_M=16, HC=64, KC=16, num_warps=8)],
        ("layer", "bf16", "wide"): [_T(BLOCK_M=64, HC=32, KC=16, num_warps=8)],
        ("stack", "ieee", "dot_k1"): [_T(BLOCK_M=32, HC=32, KC=32, num_warps=4)],
        ("stack", "tf32", "narrow"): [_T(BLOCK_M=128, HC=64, KC=32, num_warps=8, min_hidden=128)],
        ("stack", "tf32", "wide"): [_T(BLOCK_M=32, HC=64, KC=32, num_warps=8)],
        ("stack", "bf16", "wide"): [_T(BLOCK_M=64, HC=32, KC=32, num_warps=8)],
        ("backward", "ieee", "wide"): [_T(BLOCK_M=16, HC=16, KC=16, num_warps=8)],
        ("backward", "tf32", "narrow"): [
            _T(BLOCK_M=64, HC=32, KC=32, num_warps=8),
            _T(BLOCK_M=64, HC=16, KC=32, num_warps=8, min_hidden=128),
        ],
        ("backward", "tf32", "dot_k1"): [_T(BLOCK_M=64, HC=16, KC=32, num_warps=8)],
        ("backward", "bf16", "narrow"): [
            _T(BLOCK_M=32, HC=64, KC=64, num_warps=8),
            _T(BLOCK_M=64, HC=16, KC=64, num_warps=8, min_hidden=128),
        ],
    },
    ((3, 4), (3, 4)): {
        # 2-4 first-Linear columns (D = 2 with a context column): the default tiles spilled
        # 64-1568 B on 3.4.0 (compile report, D=2,E=1).
        ("layer", "tf32", "outer"): [_T(BLOCK_M=128, HC=32, KC=32, num_warps=8)],
        ("layer", "bf16", "outer"): [_T(BLOCK_M=64, HC=128, KC=32, num_warps=8)],
        ("stack", "ieee", "outer"): [_T(BLOCK_M=64, HC=32, KC=32, num_warps=4)],
        ("stack", "tf32", "outer"): [_T(BLOCK_M=32, HC=64, KC=64, num_warps=8)],
        ("stack", "bf16", "outer"): [_T(BLOCK_M=64, HC=32, KC=128, num_warps=4)],
        ("layer", "ieee", "narrow"): [
            _T(BLOCK_M=64, HC=32, KC=32, num_warps=4),
            _T(BLOCK_M=64, HC=16, KC=32, num_warps=4, min_hidden=128),
        ],
        ("layer", "tf32", "narrow"): [_T(BLOCK_M=128, HC=64, KC=32, num_warps=8, min_hidden=128)],
        ("layer", "tf32", "wide"): [_T(BLOCK_M=64, HC=32, KC=16, num_warps=8)],
        ("layer", "bf16", "wide"): [_T(BLOCK_M=32, HC=64, KC=32, num_warps=8)],
        ("stack", "ieee", "dot_k1"): [_T(BLOCK_M=32, HC=32, KC=32, num_warps=4)],
        ("stack", "tf32", "narrow"): [_T(BLOCK_M=128, HC=64, KC=32, num_warps=8, min_hidden=128)],
        ("stack", "tf32", "wide"): [_T(BLOCK_M=32, HC=64, KC=32, num_warps=8)],
        ("stack", "bf16", "narrow"): [_T(BLOCK_M=128, HC=32, KC=64, num_warps=8, min_hidden=128)],
        ("stack", "bf16", "wide"): [_T(BLOCK_M=32, HC=64, KC=32, num_warps=8)],
        ("backward", "tf32", "narrow"): [
            _T(BLOCK_M=32, HC=64, KC=32, num_warps=8),
            _T(BLOCK_M=64, HC=16, KC=32, num_warps=8, min_hidden=128),
        ],
        ("backward", "tf32", "dot_k1"): [_T(BLOCK_M=64, HC=16, KC=32, num_warps=8)],
        ("backward", "bf16", "narrow"): [
            _T(BLOCK_M=64, HC=32, KC=64, num_warps=8),
            _T(BLOCK_M=64, HC=16, KC=64, num_warps=8, min_hidden=128),
        ],
        ("backward", "bf16", "dot_k1"): [_T(BLOCK_M=64, HC=16, KC=32, num_warps=8)],
    },
    ((3, 5), (3, 5)): {
        # 2-4 first-Linear columns (D = 2 with a context column): 44-88 B spilled on 3.5.1.
        ("layer", "ieee", "outer"): [_T(BLOCK_M=64, HC=32, KC=32, num_warps=4)],
        ("layer", "bf16", "outer"): [_T(BLOCK_M=64, HC=128, KC=64, num_warps=8)],
        ("stack", "ieee", "outer"): [_T(BLOCK_M=64, HC=32, KC=32, num_warps=4)],
        ("stack", "bf16", "outer"): [_T(BLOCK_M=64, HC=128, KC=64, num_warps=8)],
        ("layer", "tf32", "narrow"): [_T(BLOCK_M=128, HC=64, KC=32, num_warps=8, min_hidden=128)],
        ("layer", "tf32", "wide"): [_T(BLOCK_M=32, HC=64, KC=32, num_warps=8)],
        ("layer", "bf16", "wide"): [_T(BLOCK_M=32, HC=64, KC=32, num_warps=8)],
        ("stack", "tf32", "narrow"): [_T(BLOCK_M=128, HC=64, KC=32, num_warps=8, min_hidden=128)],
        ("stack", "tf32", "wide"): [_T(BLOCK_M=64, HC=32, KC=32, num_warps=8)],
        ("backward", "tf32", "dot_k1"): [_T(BLOCK_M=64, HC=16, KC=32, num_warps=8)],
        ("backward", "bf16", "narrow"): [_T(BLOCK_M=64, HC=32, KC=64, num_warps=8, min_hidden=128)],
        # HC 16: with 8 context columns (K1 + E = 9-16) HC = 32 spilled 24 B on 3.5.1.
        ("backward", "bf16", "dot_k1"): [_T(BLOCK_M=64, HC=16, KC=64, num_warps=8)],
    },
    ((3, 6), (3, 8)): {
        # 2-4 first-Linear columns (D = 2 with a context column): the default tiles spilled
        # 12-76 B on 3.6.0 (compile report, D=2,E=1).
        ("layer", "ieee", "outer"): [_T(BLOCK_M=64, HC=32, KC=32, num_warps=4)],
        ("layer", "tf32", "outer"): [_T(BLOCK_M=128, HC=64, KC=32, num_warps=8)],
        ("layer", "bf16", "outer"): [_T(BLOCK_M=64, HC=128, KC=64, num_warps=8)],
        ("stack", "bf16", "outer"): [_T(BLOCK_M=64, HC=128, KC=64, num_warps=8)],
        ("layer", "tf32", "wide"): [_T(BLOCK_M=32, HC=64, KC=32, num_warps=8)],
        ("layer", "bf16", "wide"): [_T(BLOCK_M=32, HC=64, KC=32, num_warps=8)],
        ("stack", "tf32", "narrow"): [_T(BLOCK_M=128, HC=64, KC=32, num_warps=8, min_hidden=128)],
        ("stack", "tf32", "wide"): [_T(BLOCK_M=64, HC=32, KC=32, num_warps=8)],
        ("backward", "ieee", "dot_k1"): [_T(BLOCK_M=16, HC=32, KC=32, num_warps=8)],
        ("backward", "ieee", "wide"): [_T(BLOCK_M=16, HC=16, KC=16, num_warps=8)],
        ("backward", "tf32", "narrow"): [_T(BLOCK_M=64, HC=16, KC=32, num_warps=8, min_hidden=128)],
        ("backward", "tf32", "dot_k1"): [_T(BLOCK_M=64, HC=16, KC=32, num_warps=8)],
        ("backward", "bf16", "narrow"): [_T(BLOCK_M=64, HC=32, KC=64, num_warps=8, min_hidden=128)],
        ("backward", "bf16", "dot_k1"): [_T(BLOCK_M=64, HC=16, KC=64, num_warps=8)],
    },
}

# (first, last) -> the (kernel, precision, tier) whose fused kernel this Triton cannot compile
# without spills at any tile tried: the backward of wide halves (D > 32; on 3.4-3.5 in every
# precision, elsewhere in tf32 / bf16; 3.3 also bf16 halves of 5-16 features) keeps
# (rows, 64) x1 / gu / gx1 tiles live beside the tensor-core chunks, and with K chunks of 16
# (the dot minimum before 3.9; 3.9 fits it with K = 8) every tile from 64x16 down to 16x16
# spilled 24-1248 B. There the layer's backward runs as PyTorch GEMMs
# (fastnvp.ops.fused_layer.torch_layer_backward: bf16 operands rounded as the kernel rounds them,
# tf32 as fp32); the forward stays fused.
UNSHIPPED: dict[tuple[tuple[int, int], tuple[int, int]], set[tuple[str, str, str]]] = {
    ((3, 3), (3, 3)): {
        ("backward", "tf32", "wide"),
        ("backward", "bf16", "wide"),
        ("backward", "bf16", "dot_k1"),
    },
    ((3, 4), (3, 4)): {
        ("backward", "ieee", "wide"),
        ("backward", "tf32", "wide"),
        ("backward", "bf16", "wide"),
    },
    ((3, 5), (3, 5)): {
        ("backward", "ieee", "wide"),
        ("backward", "tf32", "wide"),
        ("backward", "bf16", "wide"),
    },
    ((3, 6), (3, 8)): {("backward", "tf32", "wide"), ("backward", "bf16", "wide")},
}

# (first, last) -> {BLOCK_K: num_warps} for the elementwise coupling kernels (default 4 warps).
# On Triton 3.4-3.6 ptxas spills 4 B (at 56 registers) in the 256 x 4 tile (K = 3 or 4) of the
# fp32 inverse / fp16 forward at 4 warps; at 8 warps the same tile takes ~40 and no spill.
ELEMENTWISE_WARPS: dict[tuple[tuple[int, int], tuple[int, int]], dict[int, int]] = {
    ((3, 3), (3, 8)): {4: 8},
}


def _in_force(table: dict):
    for (first, last), entries in table.items():
        if first <= TRITON_VERSION <= last:
            yield entries


def kernel_ships(kernel: str, precision: str, tier: str) -> bool:
    """False where this Triton's fused kernel is replaced by the PyTorch path (UNSHIPPED)."""
    return not any((kernel, precision, tier) in entries for entries in _in_force(UNSHIPPED))


def elementwise_warps(block_k: int) -> int:
    """Warps of an elementwise coupling launch on this Triton (4 unless ELEMENTWISE_WARPS)."""
    for entries in _in_force(ELEMENTWISE_WARPS):
        if block_k in entries:
            return entries[block_k]
    return 4


@functools.cache
def dot_k_min(bits: int = 32) -> int:
    """Smallest K of a ``tl.dot`` on sm_90 for ``bits``-wide operands, as this Triton says."""
    try:
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import min_dot_size
    except ImportError:  # a Triton without the query: the strictest minimum seen
        return 16
    dtype = {32: tl.float32, 16: tl.bfloat16}[bits]
    return int(min_dot_size(GPUTarget("cuda", 90, 32))(dtype, dtype)[2])


#: A tier without an entry of its own in a version's table takes its fallback's entry.
TIER_FALLBACK = {"outer": "narrow"}


def tile_override(kernel: str, precision: str, tier: str, hidden: int) -> dict | None:
    """The tile that replaces the default for this Triton, or None to keep the default."""
    for table in _in_force(TILE_OVERRIDES):
        key = (kernel, precision, tier)
        if key not in table and tier in TIER_FALLBACK:
            key = (kernel, precision, TIER_FALLBACK[tier])
        tiles = table.get(key, ())
        fitting = [t for t in tiles if hidden >= t.get("min_hidden", 0)]
        if fitting:
            return {k: v for k, v in fitting[-1].items() if k != "min_hidden"}
    return None
