"""Checkpoint files that are written atomically, read safely and verified.

- :func:`save` writes to a temporary file in the target's directory, flushes it to disk and
  renames it over the target (``os.replace`` is atomic on POSIX and Windows), so a crash or a
  full disk never leaves a truncated checkpoint and never touches the previous one.
- :func:`load` reads only with ``torch.load(..., weights_only=True)``: tensors, numbers,
  strings and containers, never arbitrary objects (a pickle that names any other global is
  refused, not executed).
- Every saved payload carries a SHA-256 ``digest`` of its contents, so flipped bytes inside the
  tensor data (which the zip container does not detect) are reported instead of silently
  loading wrong weights. The digest detects corruption, not a deliberate forger, who could
  recompute it; ``weights_only`` is what makes a forged file harmless to load.
- :func:`check_state_dict` compares a state_dict against the module a config builds and names
  every missing, unexpected or mis-shaped entry.

Every failure is a :class:`CheckpointError` (a ``ValueError``) that names the file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import tempfile
from pathlib import Path

import torch
from torch import nn

DIGEST_KEY = "digest"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupted, or does not fit the model."""


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    return Path(path)


def _feed(h, value) -> None:
    """Hash ``value`` canonically: type tags, dict keys sorted, tensors by dtype/shape/bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(b"T" + str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(b"D" + struct.pack("<q", len(value)))
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update((b"L" if isinstance(value, list) else b"U") + struct.pack("<q", len(value)))
        for item in value:
            _feed(h, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        h.update(b"S" + type(value).__name__.encode() + b":" + repr(value).encode() + b";")
    elif isinstance(value, torch.dtype | torch.device | torch.Size):
        h.update(b"O" + repr(value).encode() + b";")
    else:
        raise TypeError(f"checkpoint payload holds an unsupported {type(value).__name__}")


def digest(payload: dict) -> str:
    """SHA-256 (hex) of ``payload`` without its own ``digest`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return h.hexdigest()


def save(path, payload: dict) -> None:
    """Write ``payload`` (a dict of tensors, numbers, strings, containers) to ``path`` atomically.

    The payload gets a ``digest`` entry. On any failure the temporary file is removed and an
    existing file at ``path`` is left as it was.
    """
    path = _check_path(path)
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    payload = {**payload, DIGEST_KEY: digest(payload)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # Persist the rename itself (the directory entry); not possible on every platform.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load(path, *, expected_format: str | None = None, kind: str = "fastnvp") -> dict:
    """Read a checkpoint written by :func:`save`, verifying it.

    Args:
        path: the checkpoint file.
        expected_format: when given, the payload's ``"format"`` entry must equal it.
        kind: what the file should be, for messages (e.g. ``"fastnvp run"``).

    Returns:
        The payload dict (tensors on the CPU), without the ``digest`` entry.

    Raises:
        CheckpointError: no such file; truncated or not a PyTorch file; holds objects other
            than tensors/plain data; wrong format; contents that do not match the digest.
    """
    path = _check_path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {str(path)!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it is not a plain tensor checkpoint (it is "
            f"corrupted, or holds objects that weights_only loading does not run): {reason}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - re-raised as CheckpointError, the cause chained
        # Besides RuntimeError, EOFError, OSError, BadZipFile and ValueError, the weights_only
        # unpickler raises KeyError or IndexError on bytes that are not a pickle (a text file).
        raise CheckpointError(
            f"cannot read {str(path)!r}: the file is truncated or not a PyTorch checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'empty file'})"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{str(path)!r} holds a {type(payload).__name__}, not a checkpoint dict"
        )
    if expected_format is not None and payload.get("format") != expected_format:
        raise CheckpointError(
            f"{str(path)!r} is not a {kind} checkpoint (expected format {expected_format!r}, "
            f"found {payload.get('format')!r})"
        )
    stored = payload.pop(DIGEST_KEY, None)
    if stored is not None:
        try:
            actual = digest(payload)
        except TypeError as exc:
            raise CheckpointError(f"{str(path)!r}: {exc}") from exc
        if stored != actual:
            raise CheckpointError(
                f"{str(path)!r} is corrupted: its contents do not match the SHA-256 digest "
                "stored when it was written"
            )
    return payload


def check_state_dict(module: nn.Module, state, *, source: str, built_from: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` fits ``module`` key for key and shape.

    Args:
        module: the model a checkpoint's config builds.
        state: the checkpoint's state_dict.
        source: names the checkpoint in the message (e.g. its path).
        built_from: describes the config the module was built from (e.g. ``"layers=50"``).
    """
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{source}: the model state is not a state_dict")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = []
    for k, v in expected.items():
        if k not in state:
            continue
        got = state[k]
        if not isinstance(got, torch.Tensor):
            mismatched.append(f"{k}: a {type(got).__name__} in the file, a tensor expected")
        elif tuple(got.shape) != tuple(v.shape):
            mismatched.append(f"{k}: {tuple(got.shape)} in the file, {tuple(v.shape)} expected")
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mismatched),
    ):
        if items:
            shown = ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
            parts.append(f"{label}: {shown}")
    raise CheckpointError(
        f"{source}: the weights do not match the model its config describes ({built_from}); "
        + "; ".join(parts)
    )
