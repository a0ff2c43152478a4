"""Checkpoints that survive a killed process, a full disk and a hostile file.

A checkpoint is a directory ``<root>/step_<step:08d>/`` holding

    model.safetensors   the network's state_dict (safetensors: no code in it)
    ema.safetensors     the EMA weights (optional)
    config.json         what the caller says the checkpoint is: architecture, schedule, training...
    state.pt            optimizer state, step, RNG states, data-stream position: torch.save'd plain
                        data, read back only with ``torch.load(weights_only=True)``
    manifest.json       size and SHA-256 of every file above; written last

and ``<root>/latest`` names the newest complete one. A save writes into a hidden temporary
directory, fsyncs every file, renames the directory into place and only then replaces ``latest``
(each rename atomic), so a process killed at any moment leaves the previous checkpoint loadable;
a save that fails (a full disk) removes what it wrote and leaves the earlier checkpoints and
``latest`` as they were. Loading verifies every file against the manifest, so a truncated or
bit-flipped file is an error naming the file, never silent garbage. An exported model
(``model.safetensors`` + ``config.json``, no manifest) is verified against the size and SHA-256
its config.json records under ``"weights"``.

One writer per root at a time (in a distributed run, rank 0 saves).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from . import files as disk
from ._util import as_path, check_count
from .files import CheckpointError, config_differences, write_atomic  # noqa: F401 (re-exported)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "check_compatible",
    "checkpoint_files",
    "config_differences",
    "latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_atomic",
]

FORMAT, VERSION = "scoresde.checkpoint", 1
MODEL, EMA, CONFIG, STATE = "model.safetensors", "ema.safetensors", "config.json", "state.pt"
MANIFEST, LATEST = "manifest.json", "latest"
LOG = "log.jsonl"  # a training run's log, beside its step directories
_REQUIRED = (MODEL, CONFIG, STATE)
_STEP_DIR = re.compile(r"step_(\d+)")
_LEFTOVER = re.compile(r"\.step_(\d+)\.(tmp|old)-[0-9a-f]+")  # a crashed save's directories
_TRASH = re.compile(r"\.(step_\d+\.(tmp|old|del)|latest\.tmp)-[0-9a-f]+")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointWriteError(OSError):
    """A save that failed (keeps the OSError's errno, e.g. ENOSPC); earlier checkpoints are intact."""


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns. `path` is the checkpoint directory (or the weights file
    for a weights-only load); `step` is None for weights saved without one."""

    path: Path
    step: int | None
    model_state: dict[str, torch.Tensor] = field(repr=False)
    ema_state: dict[str, torch.Tensor] | None = field(repr=False)
    config: dict
    state: dict = field(repr=False)

    @property
    def config_path(self) -> Path:
        """The config.json this checkpoint's `config` was read from (for messages)."""
        return self.path / CONFIG if self.path.is_dir() else self.path.with_name(CONFIG)


# ---- argument checks -----------------------------------------------------------------------------
def _check_device(map_location) -> torch.device:
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location={map_location!r}: expected a device name or torch.device")
    try:
        return torch.device(map_location)
    except RuntimeError as e:
        raise ValueError(f"map_location={map_location!r}: not a device ({e})") from None


def _tensors_for_saving(name: str, tensors) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with storage of their own, as safetensors requires."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{name}: expected a dict of str -> torch.Tensor, got {type(tensors).__name__}")
    out = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}[{key!r}]: expected str keys and torch.Tensor values, "
                            f"got {type(key).__name__} -> {type(value).__name__}")
        # sync: a device-to-host copy, once per save
        out[key] = value.detach().to("cpu").contiguous()
    by_storage: dict[int, list[str]] = {}
    for key, value in out.items():
        if value.numel():
            by_storage.setdefault(value.untyped_storage().data_ptr(), []).append(key)
    for keys in by_storage.values():
        if len(keys) > 1:  # tied weights or views of one buffer: give each its own copy
            for key in keys:
                out[key] = out[key].clone()
    return out


def _config_bytes(config) -> bytes:
    if not isinstance(config, Mapping):
        raise TypeError(f"config: expected a dict (saved as JSON), got {type(config).__name__}")
    _check_json("config", config)
    return json.dumps(config, indent=2, sort_keys=True, allow_nan=False).encode()


def _check_json(where: str, value):
    """JSON-representable data with str keys, so that config.json reads back as it was given."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; JSON keys must be str")
            _check_json(f"{where}[{key!r}]", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(f"{where}[{i}]", item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}={value!r}: JSON has no inf or nan; store it as a string")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise TypeError(f"{where}: a {type(value).__name__} is not JSON data "
                        "(allowed: dict, list, tuple, str, int, float, bool, None)")


_PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Size, torch.dtype, torch.device)


def _check_plain(where: str, value):
    """Only what `torch.load(weights_only=True)` reads back: a state that saves must also load."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            _check_plain(f"{where} key {key!r}", key)
            _check_plain(f"{where}[{key!r}]", item)
    elif type(value) in (list, tuple, set):
        for i, item in enumerate(value):
            _check_plain(f"{where}[{i}]", item)
    else:
        raise TypeError(
            f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be read back by "
            "torch.load(weights_only=True); allowed: tensors, dict, list, tuple, set, str, bytes, "
            "int, float, bool, None, torch.Size/dtype/device (convert numpy data with "
            "torch.as_tensor or .tolist())")


# ---- writing -------------------------------------------------------------------------------------
def _write_latest(root: Path, name: str):
    """Point `latest` at `name`: the save's commit point."""
    disk.write_atomic(root / LATEST, (name + "\n").encode())


def _serialize(step: int, model, ema, config_bytes: bytes, state) -> list:
    """(file name, function making its bytes) in writing order: one file in memory at a time."""
    meta = {"format": "pt", "step": str(step)}

    def state_bytes():
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    files = [(MODEL, lambda: safetensors.torch.save(model, metadata=meta))]
    if ema is not None:
        files.append((EMA, lambda: safetensors.torch.save(ema, metadata=meta)))
    return files + [(CONFIG, lambda: config_bytes), (STATE, state_bytes)]


def _commit(root: Path, tmp: Path, final: Path):
    """Rename `tmp` to `final` (moving an older `final` aside), then update `latest`.
    On failure, undo: `tmp` is back in place for the caller to remove, `final` as it was."""
    aside = None
    if final.exists():  # a re-save of the same step
        aside = disk.hidden_path(root, final.name, "old")
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if aside is not None:
            with contextlib.suppress(OSError):
                os.rename(aside, final)
        raise
    try:
        disk.fsync_dir(root)
        _write_latest(root, final.name)
    except BaseException:
        with contextlib.suppress(OSError):  # undo; if even that fails, `latest` still names the old one
            os.rename(final, tmp)
            if aside is not None:
                os.rename(aside, final)
        raise
    if aside is not None:
        _remove_dir(aside)


def _remove_dir(path: Path):
    """Rename out of sight first, so that a half-deleted directory is never taken for a checkpoint."""
    trash = disk.hidden_path(path.parent, path.name.lstrip(".").split(".")[0], "del")
    try:
        os.rename(path, trash)
        shutil.rmtree(trash)
    except OSError as e:
        warnings.warn(f"could not remove {path}: {e}")


def _tidy(root: Path, final: Path, keep: int | None):
    """After a successful save: remove crashed saves' leftovers and all but the `keep` newest
    step directories (never the one just written)."""
    for entry in root.iterdir():
        if _TRASH.fullmatch(entry.name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    if keep is None:
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir())
    for _, path in steps[:-keep]:
        if path != final:
            _remove_dir(path)


def save_checkpoint(root, step: int, *, model_state: Mapping[str, torch.Tensor], config: Mapping,
                    state: Mapping, ema_state: Mapping[str, torch.Tensor] | None = None,
                    keep: int | None = 3) -> Path:
    """Write checkpoint `step` under `root` atomically; returns its directory.

    `model_state`/`ema_state`: str -> tensor (any device; saved from CPU copies). `config`: JSON
    data describing the checkpoint (compared on load with `check_compatible`). `state`: plain
    data and tensors (optimizer state_dict, step, `rng_state()`, ...). `keep`: how many step
    directories to keep (None: all). A failure raises `CheckpointWriteError` (an OSError with the
    original errno) and leaves the earlier checkpoints and `latest` untouched.
    """
    root = as_path("root", root)
    step = check_count("step", step, minimum=0, maximum=None)
    if keep is not None:
        check_count("keep", keep, minimum=1, maximum=None)
    model = _tensors_for_saving("model_state", model_state)
    ema = None if ema_state is None else _tensors_for_saving("ema_state", ema_state)
    config_bytes = _config_bytes(config)
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    _check_plain("state", state)

    final, tmp = root / f"step_{step:08d}", None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = disk.hidden_path(root, final.name, "tmp")
        os.mkdir(tmp)
        files = {name: disk.write_file(tmp / name, make())
                 for name, make in _serialize(step, model, ema, config_bytes, state)}
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
        disk.write_file(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        disk.fsync_dir(tmp)
        _commit(root, tmp, final)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointWriteError(
                e.errno, f"saving checkpoint step {step} to {final} failed: {e.strerror or e}; "
                f"nothing was written, earlier checkpoints and {root / LATEST} are unchanged") from e
        raise
    try:
        _tidy(root, final, keep)
    except OSError as e:  # the checkpoint is saved; only the clean-up failed
        warnings.warn(f"{root}: checkpoint {final.name} saved, but removing older ones failed ({e})",
                      stacklevel=2)
    return final


# ---- reading -------------------------------------------------------------------------------------
def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: incomplete checkpoint: {MANIFEST} is missing "
                              "(the save did not finish, or this is not a checkpoint directory)")
    manifest = disk.read_json(path, disk.read_bytes(path))
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('version')!r}; this scoresde "
                              f"reads version {VERSION} or older: upgrade scoresde")
    if isinstance(manifest.get("step"), bool) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{path}: malformed step {manifest.get('step')!r}")
    for name, entry in manifest["files"].items():
        if (not _FILE_NAME.fullmatch(name) or not isinstance(entry, dict)
                or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{path}: malformed entry {name!r}: {entry!r}")
    return manifest


def _parse_tensors(path: Path, data: bytes, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if device.type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def _safetensors_step(data: bytes) -> int | None:
    """The step recorded in a safetensors header's metadata (after the 8-byte header length)."""
    try:
        length = int.from_bytes(data[:8], "little")
        step = json.loads(data[8:8 + length]).get("__metadata__", {}).get("step")
        return int(step) if step is not None else None
    except (ValueError, AttributeError):
        return None


def _parse_state(path: Path, data: bytes) -> dict:
    """torch.load with weights_only=True: a pickle that names any code is refused, nothing runs."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise CheckpointError(
            f"{path}: loading refused: the file holds objects other than tensors and plain data "
            f"and may be crafted to run code; nothing in it was executed. {detail}".rstrip()) from None
    except Exception as e:  # noqa: BLE001 - a corrupt zip or pickle surfaces as many types
        raise CheckpointError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    return state


def _load_dir(directory: Path, device: torch.device) -> Checkpoint:
    manifest = _read_manifest(directory)
    files = manifest["files"]
    missing = [n for n in _REQUIRED if n not in files] + [n for n in files if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: missing file(s) {', '.join(missing)}")
    data = {name: disk.read_verified(directory / name, entry) for name, entry in files.items()}
    return Checkpoint(
        path=directory, step=manifest.get("step"),
        model_state=_parse_tensors(directory / MODEL, data[MODEL], device),
        ema_state=_parse_tensors(directory / EMA, data[EMA], device) if EMA in data else None,
        config=disk.read_json(directory / CONFIG, data[CONFIG]),
        state=_parse_state(directory / STATE, data[STATE]))


def _run_traces(directory: Path) -> list[str]:
    """What in `directory` only a checkpoint or a run folder holds (an exported model has none of it)."""
    names = [name for name in (STATE, EMA, LOG, LATEST) if (directory / name).exists()]
    steps = sorted(p.name for p in directory.iterdir()
                   if _STEP_DIR.fullmatch(p.name) or _LEFTOVER.fullmatch(p.name))
    return names + steps[:3] + ([f"... ({len(steps)} step folders)"] if len(steps) > 3 else [])


def _weights_digest(config_path: Path, config: dict, weights: Path) -> dict:
    """The size and SHA-256 that an exported model's config.json records for its weights."""
    entry = config.get("weights")
    if entry is None:
        raise CheckpointError(
            f"{config_path}: no \"weights\" digest, so {weights.name} cannot be verified and is not "
            f"loaded. Re-export the model from its checkpoint (scoresde export CHECKPOINT OUT), or add "
            f"\"weights\": {{\"file\": \"{weights.name}\", \"size\": <bytes>, \"sha256\": \"<hex digest>\"}} "
            f"to {CONFIG}, computed from a copy you trust (e.g. with sha256sum)")
    size, digest = (entry.get(key) if isinstance(entry, dict) else None for key in ("size", "sha256"))
    if (isinstance(size, bool) or not isinstance(size, int) or size < 0
            or not isinstance(digest, str) or not _SHA256.fullmatch(digest)):
        raise CheckpointError(f"{config_path}: weights={entry!r}: expected {{\"file\": \"{weights.name}\", "
                              "\"size\": bytes (an int >= 0), \"sha256\": 64 lowercase hex digits}")
    if entry.get("file", weights.name) != weights.name:  # another file's digest: "corrupted" would mislead
        raise CheckpointError(f"{config_path}: weights.file={entry['file']!r}: the digest is that file's, "
                              f"not {weights.name}'s; load {entry['file']!r} or re-export the model")
    return entry


def _read_member(path: Path, config_path: Path) -> tuple[bytes, dict]:
    """A weights file named inside a checkpoint directory, and its config: verified by the manifest."""
    entries = _read_manifest(path.parent)["files"]
    unlisted = [p.name for p in (path, config_path) if p.name not in entries]
    if unlisted:
        raise CheckpointError(f"{path.parent}: {', '.join(unlisted)} not in its {MANIFEST}: not part "
                              "of the checkpoint, so it cannot be verified")
    data, config = (disk.read_verified(p, entries[p.name]) for p in (path, config_path))
    return data, disk.read_json(config_path, config)


def _read_exported(path: Path, config_path: Path) -> tuple[bytes, dict]:
    """An exported model's weights and config: verified by the digest the config records."""
    # A checkpoint without its manifest has no digest to check against either: refuse it, naming
    # the manifest, rather than take it for an exported model without one.
    traces = _run_traces(path.parent)
    if traces:
        raise CheckpointError(
            f"{path.parent}: {MANIFEST} is missing, but the folder holds a checkpoint's or a run's "
            f"files ({', '.join(traces)}): its files cannot be verified, so it is not loaded (the save "
            "did not finish or the manifest was deleted; load another checkpoint of the run, or "
            "re-export the model with scoresde export)")
    config = disk.read_json(config_path, disk.read_bytes(config_path))
    return disk.read_verified(path, _weights_digest(config_path, config, path), source=str(config_path)), config


def _load_weights_file(path: Path, device: torch.device) -> Checkpoint:
    """A weights file with config.json beside it, verified: inside a checkpoint directory against
    its manifest, in an exported model against the digest its config.json records."""
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors weights file or a checkpoint "
                              "directory (pickle files such as .pt/.pth are not loaded as weights)")
    config_path = path.with_name(CONFIG)
    if not config_path.is_file():
        raise CheckpointError(f"{path}: the weights need their {CONFIG}, and {config_path} does not exist")
    read = _read_member if (path.parent / MANIFEST).is_file() else _read_exported
    data, config = read(path, config_path)
    return Checkpoint(path=path, step=_safetensors_step(data), model_state=_parse_tensors(path, data, device),
                      ema_state=None, config=config, state={})


def _read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_DIR.fullmatch(name) else None


def _candidates(root: Path) -> list[Path]:
    """Checkpoint directories with a manifest, newest step first. At equal steps: the final name,
    then a crashed re-save's leftovers: its complete new version, then the original it moved aside."""
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name) or _LEFTOVER.fullmatch(entry.name)
        if match and (entry / MANIFEST).is_file():
            kind = entry.name.split(".")[2][:3] if entry.name.startswith(".") else ""
            found.append((-int(match.group(1)), ("", "tmp", "old").index(kind), entry.name, entry))
    return [entry for *_, entry in sorted(found)]


def _is_root(path: Path) -> bool:
    return (path / LATEST).exists() or any(
        _STEP_DIR.fullmatch(p.name) or _LEFTOVER.fullmatch(p.name) for p in path.iterdir())


def _load_root(root: Path, device: torch.device) -> Checkpoint:
    """Follow `latest`; if it is missing or broken, the newest checkpoint that verifies."""
    errors, name = [], _read_latest(root)
    if name is not None and (root / name).is_dir():
        try:
            return _load_dir(root / name, device)
        except CheckpointError as e:
            errors.append(str(e))
    elif name is not None:
        errors.append(f"{root / LATEST} names {name}, which does not exist")
    elif (root / LATEST).exists():
        errors.append(f"{root / LATEST}: unreadable or not a step_XXXXXXXX name")
    for candidate in _candidates(root):
        if candidate.name == name:
            continue
        try:
            found = _load_dir(candidate, device)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            warnings.warn(f"loaded {candidate} instead of a newer checkpoint:\n  " + "\n  ".join(errors),
                          stacklevel=3)
        return found
    raise CheckpointError(f"{root}: no loadable checkpoint" + "".join(f"\n  {e}" for e in errors))


def _is_weights_dir(path: Path) -> bool:
    """A shipped model's directory: weights and config, no manifest and no training state."""
    return (all((path / n).is_file() for n in (MODEL, CONFIG))
            and not any((path / n).exists() for n in (MANIFEST, STATE)))


def load_checkpoint(path, *, map_location="cpu") -> Checkpoint:
    """Load and verify a checkpoint.

    `path` is one of: a checkpoint directory; a root of step directories (follows `latest`,
    falling back with a warning to the newest checkpoint that verifies); a `.safetensors` weights
    file with `config.json` beside it, or a directory holding just those two (an exported or
    shipped model: `state` is {}, `ema_state` None, `step` the one recorded in the weights or None).
    Every file read is verified: a checkpoint's against its manifest (also when one weights file
    of it is named), an exported model's weights against the `"weights": {"size", "sha256"}` its
    config.json records. A folder that holds a checkpoint's or a run's files (state.pt,
    ema.safetensors, log.jsonl, latest, step directories) but no manifest is refused, and so is an
    exported model whose config.json records no digest.
    Model and EMA tensors go to `map_location`; `state` stays on the CPU (optimizers move their
    state to the parameters' device in `load_state_dict`, and RNG states must be CPU tensors).
    Raises `CheckpointError` naming the file and what is wrong.
    """
    path = as_path("path", path)
    device = _check_device(map_location)
    if path.is_file():
        return _load_weights_file(path, device)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if _is_weights_dir(path):
        return _load_weights_file(path / MODEL, device)
    if any((path / name).exists() for name in (MANIFEST, MODEL, STATE)):
        return _load_dir(path, device)
    if _is_root(path):
        return _load_root(path, device)
    raise CheckpointError(f"{path}: no checkpoint here: expected a checkpoint directory (with {MANIFEST}), "
                          "a directory of step_XXXXXXXX checkpoints, or a .safetensors file")


def checkpoint_files(root) -> list[Path]:
    """What saves under `root` left there: `latest`, the step directories and crashed saves'
    hidden leftovers (what a run that starts afresh in the folder removes); [] without any."""
    root = as_path("root", root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.name == LATEST or _STEP_DIR.fullmatch(p.name) or _TRASH.fullmatch(p.name))


def latest_checkpoint(root, *, verify: bool = False) -> Path | None:
    """The checkpoint directory `load_checkpoint(root)` would load, or None if there is none.

    Without `verify`, "complete" means the manifest (written last) is there; the files are not
    hashed. With `verify=True` each candidate is fully loaded and checked (slow)."""
    root = as_path("root", root)
    if not root.is_dir():
        return None
    name = _read_latest(root)
    ordered = ([root / name] if name else []) + _candidates(root)
    for candidate in ordered:
        if not (candidate / MANIFEST).is_file():
            continue
        if not verify:
            return candidate
        try:
            _load_dir(candidate, torch.device("cpu"))
            return candidate
        except CheckpointError:
            continue
    return None


# ---- compatibility -------------------------------------------------------------------------------
def _lookup(config, dotted: str):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return disk.MISSING
        value = value[part]
    return value


def check_compatible(checkpoint: Checkpoint, expected: Mapping,
                     keys: Iterable[str] | None = ("architecture", "schedule")) -> None:
    """Raise `CheckpointError` unless `checkpoint.config` equals `expected` at every key.

    `keys`: dotted paths ("schedule.beta_max"); None compares every top-level key of `expected`.
    Nested dicts are compared leaf by leaf and every mismatch is listed as
    ``key: saved X, expected Y``. A key absent from both sides is skipped.
    """
    if not isinstance(checkpoint, Checkpoint):
        raise TypeError(f"checkpoint: expected a Checkpoint, got {type(checkpoint).__name__}")
    if not isinstance(expected, Mapping):
        raise TypeError(f"expected: expected a dict, got {type(expected).__name__}")
    keys = list(expected) if keys is None else [keys] if isinstance(keys, str) else list(keys)
    for key in keys:
        if not isinstance(key, str) or not key:
            raise TypeError(f"keys: {key!r} is not a (dotted) key name")
    expected = disk.as_json(expected)
    mismatches = []
    for key in keys:
        saved, wanted = _lookup(checkpoint.config, key), _lookup(expected, key)
        if saved is not disk.MISSING or wanted is not disk.MISSING:
            mismatches += disk.differences(key, saved, wanted)
    if mismatches:
        raise CheckpointError(f"{checkpoint.config_path}: the checkpoint does not match:\n  "
                              + "\n  ".join(mismatches))


# ---- random states -------------------------------------------------------------------------------
def rng_state() -> dict:
    """The torch (CPU and every CUDA device), Python `random` and numpy global RNG states, as
    data that `torch.load(weights_only=True)` reads back."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping):
    """Restore what `rng_state` captured. CUDA states are restored for the devices present
    (none on a CPU-only machine)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected the dict from rng_state(), got {type(state).__name__}")
    unknown = set(state) - {"torch", "cuda", "python", "numpy"}
    if unknown or not state:
        raise ValueError(f"state: unexpected keys {sorted(map(str, unknown))}; expected the dict "
                         "from rng_state() with keys 'torch', 'python', 'numpy' and maybe 'cuda'")
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for index, value in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(value.cpu(), index)
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached_gaussian"]))
