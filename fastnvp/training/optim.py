"""The optimizer of fastnvp's trainers: Adam or AdamW, with torch's fused update where it exists.

torch's default Adam on the CPU walks the parameter tensors one by one, about ten small ops
each. A Real NVP of L coupling layers has 12 L tensors (two 3-Linear nets per layer), so at the
small shapes flows train at the loop dominates the step: at D = 2, L = 8, H = 64, B = 256 it is
3.8 ms of a 9.9 ms training step on two CPU cores, against 0.7 ms for the fused update
(``fused=True``: one kernel over every tensor of a device and dtype). The update is the same
(formulas, hyper-parameters, ``state_dict`` layout); only float rounding differs (about 1e-7
relative per step in float32).

Fused kernels exist for floating-point parameters on the CPU and on CUDA (torch >= 2.4; the
floor of ``pyproject.toml`` is 2.7). Elsewhere, and for any other parameter, the default
implementation runs. Decided here, once, for every trainer (``fastnvp.training.train``,
``fastnvp.analysis.density_training``); the benchmark harness keeps torch's default Adam for every
provider, so its train-step ratios compare the flows, not the optimizers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Device types with a fused Adam / AdamW kernel in every supported torch.
FUSED_DEVICE_TYPES = ("cpu", "cuda")


def fused_available(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused Adam can update every tensor of ``params`` (non-empty)."""
    return bool(params) and all(
        p.device.type in FUSED_DEVICE_TYPES and p.dtype.is_floating_point for p in params
    )


def adam(
    params: Iterable[torch.Tensor],
    lr: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> torch.optim.Optimizer:
    """Adam over ``params`` (AdamW's decoupled weight decay when ``decoupled``), fused where
    :func:`fused_available` says so (module docstring).

    Args:
        params: the tensors to train (each ``requires_grad``).
        lr: learning rate, > 0.
        weight_decay: >= 0; an L2 term added to the gradient (Adam) or a decay of the weights
            (AdamW).
        decoupled: use AdamW.
    """
    params = list(params)
    if not params:
        raise ValueError("params must hold at least one tensor to optimize, got none")
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    extra = {"fused": True} if fused_available(params) else {}
    return kind(params, lr=lr, weight_decay=weight_decay, **extra)
