"""The math and the reference: ``RealNVP``, the standard conditioner, masks, prior, argument
and non-finite checks (docs/design.md §1, §2.1)."""
