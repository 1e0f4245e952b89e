"""GPU executors: the fused Triton layer and the whole-stack launch (docs/design.md §3.2, §4)."""
