"""Backend choice: which implementation a custom op runs for a given tensor.

``FASTNVP_BACKEND`` (read at every call, so tests and users can switch it at run time):

- ``auto`` (default): Triton kernels for CUDA tensors, PyTorch code for CPU tensors.
- ``triton``: always the Triton kernels. CPU tensors need ``TRITON_INTERPRET=1`` (set before
  Triton is first imported), which runs the real kernels through Triton's interpreter.
- ``torch``: always the PyTorch code.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    """The value of ``FASTNVP_BACKEND``, validated."""
    value = os.environ.get("FASTNVP_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTNVP_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_available() -> bool:
    """True when Triton can be imported (it is imported only under ``fastnvp.kernels``)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """Decide whether an op on ``tensor`` runs the Triton kernels.

    Raises:
        RuntimeError: ``FASTNVP_BACKEND=triton`` but Triton is missing, or the tensor is on the CPU
            without ``TRITON_INTERPRET=1``.
    """
    choice = requested_backend()
    if choice == "torch":
        return False
    if choice == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("FASTNVP_BACKEND=triton but Triton cannot be imported")
    if not tensor.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "FASTNVP_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 (set before importing "
            "Triton) to run the kernels through Triton's interpreter"
        )
    return True
