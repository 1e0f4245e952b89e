"""fastnvp: Real NVP normalizing flows for PyTorch with fused Triton coupling kernels.

Public API::

    fastnvp.RealNVP        reference implementation in plain PyTorch
    fastnvp.FastRealNVP    drop-in replacement whose hot paths are fused kernels
    fastnvp.SequentialFlow invertible layers composed in the order given
    fastnvp.ActNorm, fastnvp.BatchNorm, fastnvp.Permutation, fastnvp.LULinear
                           layers to interleave with couplings (``standard(norm=...,
                           permutation=...)`` or by hand)
    fastnvp.data           data sets: the 2-D toys and the 8 x 8 digits with dequantization,
                           the logit transform and nats / bits-per-dim units
    fastnvp.load_run       a trained run (``fastnvp train``) in one line: model, config, payload
    fastnvp.ops            the custom ops (``torch.ops.fastnvp.*``)
    fastnvp.checks         opt-in non-finite checks: ``with fastnvp.checks.enabled(): ...``
    fastnvp.checkpoint     atomic, verified checkpoint files (weights_only loading)
    fastnvp.distributed    data-parallel training under torchrun
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "RealNVP",
    "FastRealNVP",
    "SequentialFlow",
    "ActNorm",
    "BatchNorm",
    "Permutation",
    "LULinear",
    "load_run",
    "__version__",
]

# Classes reachable as attributes of the package, imported on first use.
_LAZY_CLASSES = {
    "SequentialFlow": "fastnvp.flows.sequential",
    "ActNorm": "fastnvp.core.normalization",
    "BatchNorm": "fastnvp.core.normalization",
    "Permutation": "fastnvp.core.mixing",
    "LULinear": "fastnvp.core.mixing",
}

# Submodules reachable as attributes of the package without an explicit import.
_LAZY_SUBMODULES = {
    "checks": "fastnvp.core.checks",
    "data": "fastnvp.data",
    "checkpoint": "fastnvp.training.checkpoint",
    "distributed": "fastnvp.training.distributed",
    "ops": "fastnvp.ops",
}


def __getattr__(name: str):
    # Lazy, so `import fastnvp` stays cheap and never imports Triton.
    if name == "RealNVP":
        from fastnvp.core.reference import RealNVP

        return RealNVP
    if name == "FastRealNVP":
        from fastnvp.flows.fast_realnvp import FastRealNVP

        return FastRealNVP
    if name == "load_run":
        from fastnvp.training.train import load_run

        return load_run
    if name in _LAZY_CLASSES:
        import importlib

        return getattr(importlib.import_module(_LAZY_CLASSES[name]), name)
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(_LAZY_SUBMODULES[name])
    raise AttributeError(f"module 'fastnvp' has no attribute {name!r}")
