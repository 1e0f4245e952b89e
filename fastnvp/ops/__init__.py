"""Custom ops ``torch.ops.fastnvp.*`` and the backend choice (docs/design.md §2.1, §2.2).

``fastnvp.ops`` is the elementwise coupling op (``coupling``, ``affine_coupling``,
``affine_coupling_inverse``, ``affine_coupling_backward``); ``fastnvp.ops.fused_layer`` holds the
fused-layer and whole-stack ops, ``fastnvp.ops.backend`` the Triton-or-PyTorch choice.
"""

from fastnvp.ops.elementwise import (
    affine_coupling,
    affine_coupling_backward,
    affine_coupling_inverse,
    coupling,
)

__all__ = ["affine_coupling", "affine_coupling_backward", "affine_coupling_inverse", "coupling"]
