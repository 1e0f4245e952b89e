"""Input validation with messages that name the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ensure_tensor(
    value, name: str, *, allow_int: bool = False, allow_bool: bool = False
) -> torch.Tensor:
    """Raise ``TypeError`` unless ``value`` is a floating tensor (or int/bool where allowed)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype in FLOAT_DTYPES:
        return value
    if value.dtype == torch.bool and allow_bool:
        return value
    if allow_int and not value.dtype.is_floating_point and not value.dtype.is_complex:
        return value
    raise TypeError(
        f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
        f"got {value.dtype}"
    )


def ensure_batch(x, name: str, dim: int | None = None) -> torch.Tensor:
    """Check ``x`` is a floating (N, D) tensor with N >= 1 (and D == ``dim`` when given)."""
    ensure_tensor(x, name)
    if x.ndim != 2:
        expected = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)} ({x.ndim}-D)")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (N, {dim}): got {x.shape[1]} features")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(x.shape)}")
    return x


def check_input_dtype(x: torch.Tensor, name: str, dtype: torch.dtype, owner: str = "the model's"):
    """``x`` must have the parameters' ``dtype``; inside an autocast region on its device also
    the autocast dtype (the region computes in it). Any other dtype raises ``TypeError``: a
    float64 x under bf16 autocast met a float32 weight in a matmul."""
    if x.dtype == dtype:
        return
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device):
        return
    raise TypeError(f"{name} has dtype {x.dtype} but {owner} parameters are {dtype}")


def ensure_same(ref: torch.Tensor, ref_name: str, other: torch.Tensor, other_name: str) -> None:
    """Check ``other`` matches ``ref`` in shape, dtype and device."""
    if other.shape != ref.shape:
        raise ValueError(
            f"{other_name} must have the shape of {ref_name} {tuple(ref.shape)}, "
            f"got {tuple(other.shape)}"
        )
    if other.dtype != ref.dtype:
        raise TypeError(
            f"{other_name} must have dtype {ref.dtype} like {ref_name}, got {other.dtype}"
        )
    if other.device != ref.device:
        raise ValueError(
            f"{other_name} must be on {ref.device} like {ref_name}, got {other.device}"
        )


def ensure_num_samples(n, name: str = "num_samples") -> int:
    """Check a sample count is a positive int."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def check_generator(generator, device: torch.device):
    """``generator`` must be None or a ``torch.Generator`` on ``device``'s type."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {device}")
    return generator
