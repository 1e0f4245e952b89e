"""The flow modules: ``FastRealNVP``, the drop-in for ``fastnvp.core.reference.RealNVP``
(docs/design.md §2.1)."""
