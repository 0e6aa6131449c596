"""Atomic, checksummed checkpoints that are loaded without executing code.

File layout: the 8-byte magic `MOWCKPT1`, the 32-byte sha256 of the payload, then the
payload written by `torch.save`. Writing goes to a temporary file in the same folder,
is fsync'ed and then renamed over the target, so a killed writer never leaves a file
that looks complete. Loading verifies the checksum and uses `torch.load(weights_only=True)`,
so a tampered or truncated file is reported by path and never unpickled. The previous
good checkpoint is kept as `<name>.prev` and used when the newest one is damaged.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"MOWCKPT1"
_HEADER = len(MAGIC) + 32


class CheckpointError(RuntimeError):
    """A missing, damaged or incompatible checkpoint; the message names the path."""


def _to_safe(obj: Any) -> Any:
    """numpy arrays become tagged tensors: only tensors and plain containers go into the file."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, dict):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_safe(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: _from_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_safe(v) for v in obj)
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def encode(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(_to_safe(obj), buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode(data: bytes, path: Path | str = "<bytes>") -> Any:
    if len(data) < _HEADER or not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a mow checkpoint (bad header; truncated or foreign file)")
    digest, payload = data[len(MAGIC):_HEADER], data[_HEADER:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (file is truncated or corrupted)")
    try:
        return _from_safe(torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))
    except Exception as exc:  # a valid checksum over an unsafe payload: refuse, do not unpickle
        raise CheckpointError(f"{path}: payload rejected by the safe loader ({type(exc).__name__})") from None


def save(path: Path | str, obj: Any, *, keep_previous: bool = True) -> str:
    """Atomically write `obj`; the replaced file becomes `<path>.prev`. Returns the payload sha256."""
    path = Path(path)
    data = encode(obj)
    if keep_previous and path.exists():
        os.replace(path, previous_path(path))
    atomic_write_bytes(path, data)
    return data[len(MAGIC):_HEADER].hex()


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def load(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return decode(path.read_bytes(), path)


def load_latest(path: Path | str, warn=print) -> tuple[Any, Path] | None:
    """The newest intact checkpoint at `path` or its `.prev`; None when neither exists.

    A damaged newest file is reported through `warn` and skipped; if every candidate is
    damaged the error is raised rather than silently starting over.
    """
    path = Path(path)
    candidates = [p for p in (path, previous_path(path)) if p.is_file()]
    errors = []
    for candidate in candidates:
        try:
            return load(candidate), candidate
        except CheckpointError as exc:
            errors.append(str(exc))
            warn(f"warning: {exc}; trying the previous checkpoint")
    if errors:
        raise CheckpointError("; ".join(errors))
    return None


def file_sha256(path: Path | str) -> str:
    """Payload checksum stored in a checkpoint's header (cheap: no hashing of the file)."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER)
    if len(head) < _HEADER or not head.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a mow checkpoint")
    return head[len(MAGIC):].hex()
