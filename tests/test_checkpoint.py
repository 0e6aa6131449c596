"""Checkpoints: atomic, checksummed, loaded without executing code, previous one kept."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from mow import checkpoint
from mow.checkpoint import CheckpointError


def test_round_trip_keeps_tensors_arrays_and_plain_values(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "arr": np.arange(4, dtype=np.uint8), "s": "x", "b": b"ale",
           "n": None, "big": 2**90, "nested": [1, (2.5, {"k": np.zeros(2)})]}
    path = tmp_path / "a.ckpt"
    sha = checkpoint.save(path, obj)
    back = checkpoint.load(path)
    assert torch.equal(back["w"], obj["w"]) and back["arr"].dtype == np.uint8 and back["b"] == b"ale"
    assert back["big"] == 2**90 and isinstance(back["nested"][1][1]["k"], np.ndarray)
    assert checkpoint.file_sha256(path) == sha


def test_truncated_or_flipped_files_are_reported_by_path(tmp_path):
    path = tmp_path / "a.ckpt"
    checkpoint.save(path, {"w": torch.ones(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path}.*checksum"):
        checkpoint.load(path)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a mow checkpoint"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "none.ckpt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mow_pwned",))


def test_a_payload_with_code_is_refused_even_with_a_valid_checksum(tmp_path):
    import hashlib

    payload = pickle.dumps({"x": _Evil()})
    path = tmp_path / "evil.ckpt"
    path.write_bytes(checkpoint.MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError, match="safe loader"):
        checkpoint.load(path)


def test_previous_checkpoint_is_kept_and_used_when_the_newest_is_damaged(tmp_path):
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, {"step": 1})
    checkpoint.save(path, {"step": 2})
    assert checkpoint.load(checkpoint.previous_path(path))["step"] == 1
    path.write_bytes(path.read_bytes()[:-5])
    warnings = []
    state, used = checkpoint.load_latest(path, warn=warnings.append)
    assert state["step"] == 1 and used == checkpoint.previous_path(path) and "checksum" in warnings[0]
    checkpoint.previous_path(path).write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        checkpoint.load_latest(path, warn=lambda m: None)
    assert checkpoint.load_latest(tmp_path / "absent.ckpt") is None


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    checkpoint.atomic_write_bytes(path, b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        checkpoint.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]


def test_a_save_removes_dead_writers_temporaries_but_not_a_live_writers(tmp_path):
    """Two DDP ranks may write the same file at once: one must not delete the other's temporary."""
    import subprocess

    from mow.checkpoint import atomic_write_text

    live = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        target = tmp_path / "config.yaml"
        mine, theirs = tmp_path / f".config.yaml.{dead.pid}.tmp", tmp_path / f".config.yaml.{live.pid}.tmp"
        mine.write_text("half"), theirs.write_text("half")
        atomic_write_text(target, "a: 1\n")
        assert target.read_text() == "a: 1\n"
        assert not mine.exists() and theirs.exists()
    finally:
        live.kill()
        live.wait()
