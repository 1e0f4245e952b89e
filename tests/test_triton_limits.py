"""Per-Triton tile decisions (fastnvp.kernels.triton_limits): dot minimums and overrides.

The compile report of each supported Triton (benchmarks/compat.py, CI's compat legs) proves the
tiles compile with 0 spills; these tests check the decisions themselves on whichever Triton is
installed, and the override lookup for versions that are not.
"""

from __future__ import annotations

import pytest

from fastnvp.kernels import fused_layer, fused_layer_backward, triton_limits


def _dot_configs():
    return fused_layer.SM90_CONFIGS + fused_layer_backward.SM90_CONFIGS


def test_dot_minimum_comes_from_the_installed_triton():
    k = triton_limits.dot_k_min()
    assert k in (4, 8, 16)
    # Triton <= 3.6 asserts K >= 16 for every dot; 3.9 lets fp32 dots have K = 8.
    if triton_limits.TRITON_VERSION <= (3, 6):
        assert k == 16
    assert triton_limits.dot_k_min(16) >= k


@pytest.mark.parametrize("entry", _dot_configs(), ids=lambda e: e["name"])
def test_every_shipped_dot_meets_this_tritons_minimum(entry):
    assert entry["dots"], "fused-layer entries list their dots"
    for m, k, n, precision in entry["dots"]:
        k_min = triton_limits.dot_k_min(16 if precision == "bf16" else 32)
        assert m >= 1 and n >= 1 and k >= k_min, (m, k, n, precision)


def test_overrides_apply_only_inside_their_version_range(monkeypatch):
    tile = {"BLOCK_M": 32, "HC": 64, "KC": 32, "num_warps": 8, "min_hidden": 128}
    monkeypatch.setattr(
        triton_limits, "TILE_OVERRIDES", {((3, 3), (3, 6)): {("stack", "tf32", "narrow"): [tile]}}
    )
    monkeypatch.setattr(triton_limits, "TRITON_VERSION", (3, 6))
    got = triton_limits.tile_override("stack", "tf32", "narrow", 256)
    assert got == {"BLOCK_M": 32, "HC": 64, "KC": 32, "num_warps": 8}
    assert triton_limits.tile_override("stack", "tf32", "narrow", 64) is None  # min_hidden
    assert triton_limits.tile_override("layer", "tf32", "narrow", 256) is None
    monkeypatch.setattr(triton_limits, "TRITON_VERSION", (3, 9))
    assert triton_limits.tile_override("stack", "tf32", "narrow", 256) is None


def test_layer_config_takes_the_override_and_clamps_to_the_width(monkeypatch):
    tile = {"BLOCK_M": 32, "HC": 128, "KC": 8, "num_warps": 4}
    version = triton_limits.TRITON_VERSION
    monkeypatch.setattr(
        triton_limits, "TILE_OVERRIDES", {(version, version): {("stack", "bf16", "narrow"): [tile]}}
    )
    cfg = fused_layer.layer_config(64, "bf16", False, 1, 16, kernel="stack")
    assert cfg["BLOCK_M"] == 32 and cfg["num_warps"] == 4
    assert cfg["HC"] == 64, "HC never exceeds the hidden width"
    assert cfg["KC"] == max(8, triton_limits.dot_k_min(16)), "K chunks meet the dot minimum"
    # The forward kernel has no override: the default tile.
    default = fused_layer.layer_config(64, "bf16", False, 1, 16, kernel="layer")
    assert default["BLOCK_M"] == 128


def test_tiers():
    assert fused_layer.tile_tier(1, 16) == "narrow"
    assert fused_layer.tile_tier(2, 16) == "outer"
    assert fused_layer.tile_tier(4, 16) == "outer"
    assert fused_layer.tile_tier(16, 16) == "dot_k1"
    assert fused_layer.tile_tier(64, 64) == "wide"


def test_unshipped_backward_is_not_compiled_and_not_launched(monkeypatch):
    version = triton_limits.TRITON_VERSION
    monkeypatch.setattr(
        triton_limits, "UNSHIPPED", {(version, version): {("backward", "bf16", "wide")}}
    )
    assert not fused_layer_backward.ships("bf16", 64, 64)
    assert fused_layer_backward.ships("bf16", 1, 1), "narrow halves still run the kernel"
    assert fused_layer_backward.ships("ieee", 64, 64), "other precisions still run the kernel"
    names = [e["name"] for e in fused_layer_backward._sm90_configs()]
    assert "coupling_layer_backward_kernel[bf16,D=128,H=256]" not in names
    assert "coupling_layer_backward_kernel[ieee,D=128,H=256]" in names


def test_elementwise_warps_follow_the_table(monkeypatch):
    version = triton_limits.TRITON_VERSION
    monkeypatch.setattr(triton_limits, "ELEMENTWISE_WARPS", {(version, version): {4: 8}})
    assert triton_limits.elementwise_warps(4) == 8
    assert triton_limits.elementwise_warps(1) == 4


def test_outer_tier_falls_back_to_narrow(monkeypatch):
    narrow = {"BLOCK_M": 32, "HC": 32, "KC": 32, "num_warps": 4}
    outer = {"BLOCK_M": 16, "HC": 32, "KC": 32, "num_warps": 4}
    version = triton_limits.TRITON_VERSION
    table = {("layer", "ieee", "narrow"): [narrow], ("stack", "ieee", "narrow"): [narrow],
             ("stack", "ieee", "outer"): [outer]}  # fmt: skip
    monkeypatch.setattr(triton_limits, "TILE_OVERRIDES", {(version, version): table})
    assert triton_limits.tile_override("layer", "ieee", "outer", 256) == narrow
    assert triton_limits.tile_override("stack", "ieee", "outer", 256) == outer
    assert triton_limits.tile_override("backward", "ieee", "outer", 256) is None
