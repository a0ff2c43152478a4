"""Files that survive a killed process, a full disk and a damaged or hostile copy: atomic writes,
size-and-SHA-256 verification on reading, and JSON records compared field by field. Shared by
checkpoints, exported models and chunked sampling (one owner, outside `train/`).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path

__all__ = ["CheckpointError", "config_differences", "read_verified", "write_atomic"]

_CHUNK = 1 << 26  # bytes per os.write call


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or does not match: the message names the file and why."""


def write_file(path: Path, data: bytes) -> dict:
    """Write `data` to a new file and fsync it; returns its manifest entry."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:_CHUNK]):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fsync_dir(path: Path):
    """Make renames inside `path` durable (POSIX; Windows cannot open a directory)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hidden_path(root: Path, name: str, kind: str) -> Path:
    return root / f".{name}.{kind}-{secrets.token_hex(4)}"


def write_atomic(path: Path, data: bytes) -> dict:
    """Replace `path` with `data` so that a reader (or a process killed at any moment) sees the old
    file or the whole new one, never a part: a hidden temporary file beside it, fsync'd, then
    os.replace and an fsync of the directory. Returns the file's manifest entry."""
    tmp = hidden_path(path.parent, path.name, "tmp")
    try:
        entry = write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fsync_dir(path.parent)
    except OSError as e:  # after the commit point: the file stands
        warnings.warn(f"{path.parent}: could not fsync the directory after replacing {path.name} ({e})")
    return entry


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_json(path: Path, data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_verified(path: Path, entry: dict, source: str = "the manifest") -> bytes:
    """The file's bytes, after checking its size and SHA-256 against `entry` (from `source`: the
    manifest, or an exported model's config.json)."""
    data = read_bytes(path)
    if len(data) != entry["size"]:
        what = "truncated" if len(data) < entry["size"] else "longer than written"
        raise CheckpointError(f"{path}: {len(data)} bytes, but {entry['size']} were written: "
                              f"the file is {what}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 {digest[:16]}... does not match {source}'s "
                              f"{entry['sha256'][:16]}...: the file is corrupted")
    return data


MISSING = object()


def as_json(value):
    """Tuples as lists, as they come back from config.json."""
    if isinstance(value, Mapping):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    return value


def _same(a, b) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _show(value) -> str:
    return "(missing)" if value is MISSING else repr(value)


def differences(key: str, saved, expected) -> list[str]:
    if isinstance(saved, Mapping) and isinstance(expected, Mapping):
        out = []
        for sub in sorted(set(saved) | set(expected), key=str):
            out += differences(f"{key}.{sub}", saved.get(sub, MISSING), expected.get(sub, MISSING))
        return out
    if saved is not MISSING and expected is not MISSING and _same(saved, expected):
        return []
    return [f"{key}: saved {_show(saved)}, expected {_show(expected)}"]


def config_differences(saved: Mapping, expected: Mapping) -> list[str]:
    """Every leaf at which two JSON-like dicts differ, as ``key: saved X, expected Y`` (tuples and
    lists alike, 20 and 20.0 alike, True and 1 not)."""
    saved, expected = as_json(saved), as_json(expected)
    return [line for key in sorted(set(saved) | set(expected), key=str)
            for line in differences(key, saved.get(key, MISSING), expected.get(key, MISSING))]
