"""fastnvp: Real NVP normalizing flows for PyTorch with fused Triton coupling kernels.

Public API::

    fastnvp.RealNVP        reference implementation in plain PyTorch
    fastnvp.FastRealNVP    drop-in replacement whose hot paths are fused kernels
    fastnvp.ops            the custom ops (``torch.ops.fastnvp.*``)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["RealNVP", "FastRealNVP", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import fastnvp` stays cheap and never imports Triton.
    if name == "RealNVP":
        from fastnvp.reference import RealNVP

        return RealNVP
    if name == "FastRealNVP":
        from fastnvp.model import FastRealNVP

        return FastRealNVP
    raise AttributeError(f"module 'fastnvp' has no attribute {name!r}")
