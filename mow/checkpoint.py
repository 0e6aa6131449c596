"""Atomic, checksummed checkpoints that are loaded without executing code.

File layout: the 8-byte magic `MOWCKPT1`, the 32-byte sha256 of the payload, then the
payload written by `torch.save`. Writing goes to a temporary file in the same folder,
is fsync'ed and then renamed over the target, so a killed writer never leaves a file
that looks complete. Loading verifies the checksum and uses `torch.load(weights_only=True)`,
so a tampered or truncated file is reported by path and never unpickled. The previous
good checkpoint is kept as `<name>.prev` and used when the newest one is damaged.

`save` writes and syncs the new file *before* it touches the old one, so a full disk or an
unwritable folder ends with a `CheckpointWriteError` naming the path and the previous
checkpoint exactly as it was. `MOW_TEST_KILL_DURING_SAVE` is a test hook (see
`_test_kill_point`): the fault-injection tests use it to SIGKILL a writer mid-write.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"MOWCKPT1"
_HEADER = len(MAGIC) + 32


class CheckpointError(RuntimeError):
    """A missing, damaged or incompatible checkpoint; the message names the path."""


class CheckpointWriteError(CheckpointError):
    """Writing failed (disk full, read-only or missing folder); the old checkpoint is untouched."""


_saves: dict[str, int] = {}  # per file name, for the test hook below


def _test_kill_point(path: Path, phase: str) -> None:
    """TEST HOOK, inert unless MOW_TEST_KILL_DURING_SAVE=<file name>:<n>:<phase> is set:
    SIGKILL this process at `phase` of the n-th save of a file with that name, where phase
    is `write` (half the new bytes are in the temporary file) or `rotate` (the old file has
    become `.prev`, the new one is not renamed yet). A signal cannot be caught, so the
    process dies exactly as under a preemption or the OOM killer."""
    hook = os.environ.get("MOW_TEST_KILL_DURING_SAVE")
    if hook:
        name, n, when = hook.split(":")
        if name == path.name and when == phase and _saves.get(path.name) == int(n):
            os.kill(os.getpid(), signal.SIGKILL)


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


def _writer_alive(tmp: Path) -> bool:
    """Whether the process named in a temporary's name (`.<file>.<pid>.tmp`) still runs here."""
    try:
        pid = int(tmp.name.rsplit(".", 2)[-2])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _write_temp(path: Path, data: bytes) -> Path:
    """`data` in a synced temporary file next to `path` (same file system: rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # temporaries a killed writer left behind would pile up (GBs at paper scale); those of a
    # live writer (another DDP rank writing the same file) are not stale
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if not _writer_alive(stale):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            half = len(data) // 2
            fh.write(data[:half])
            if os.environ.get("MOW_TEST_KILL_DURING_SAVE"):
                fh.flush()
                _test_kill_point(path, "write")
            fh.write(data[half:])
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _sync_dir(folder: Path) -> None:
    """Make renames in `folder` durable."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    try:
        tmp = _write_temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:  # name the file the user knows, not the temporary
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    _sync_dir(path.parent)


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
    _saves[path.name] = _saves.get(path.name, 0) + 1
    try:
        tmp = _write_temp(path, data)  # the new bytes are complete and synced before the old file moves
    except OSError as exc:
        kept = f"; {path} is unchanged" if path.exists() else ""
        raise CheckpointWriteError(f"{path}: cannot write checkpoint ({exc.strerror or exc}){kept}") from None
    try:
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
            _test_kill_point(path, "rotate")  # killed here, load_latest finds `.prev`
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"{path}: cannot replace checkpoint ({exc.strerror or exc})") from None
    _sync_dir(path.parent)
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
