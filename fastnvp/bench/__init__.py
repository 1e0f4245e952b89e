"""Side-by-side benchmarks of fastnvp, the eager reference, ``torch.compile`` and peer libraries.

- :mod:`fastnvp.bench.providers`: one flow per implementation, all built from one reference
  model (same masks, same two MLPs per layer, same Tanh on the log-scale) with copied weights.
- :mod:`fastnvp.bench.harness`: workloads, timing (alternating with the reference in one
  process), the fp32 GEMM ceiling of the machine, and the results document.
- :mod:`fastnvp.bench.report`: markdown table, plots and the README section.
- :mod:`fastnvp.bench.paired`: paired A/B rounds of one engine setting against another, for
  the ``benchmarks/*_ab.py`` scripts.

``fastnvp bench`` (``fastnvp/cli/commands/bench.py``) drives all three; ``benchmarks/`` holds the
pytest-benchmark suite and the recorded results.
"""
