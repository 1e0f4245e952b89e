"""Triton kernels and their thin launchers (installed as ``fastnvp.kernels``).

Nothing here knows about autograd or ``nn.Module``; ``fastnvp.ops`` and friends are the only
callers. Importing a submodule imports Triton, so ``fastnvp`` imports these lazily.
"""
