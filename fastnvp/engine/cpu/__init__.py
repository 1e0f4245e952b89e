"""CPU executors and their pieces: the GEMM stack, the conditioner pair on split halves, the
exact knot forms and the worker threads (docs/design.md §3.2)."""
