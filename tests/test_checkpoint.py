"""Checkpoints: exact round trips, atomic saves, verified loads, refused pickles, pruning."""
from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch

from scoresde import files
from scoresde.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriteError,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

CONFIG = {"architecture": {"name": "UNet", "channels": [32, 64], "attention": True},
          "schedule": {"name": "linear", "beta_min": 0.1, "beta_max": 20.0}}


def _save(root, step, value=None, **kwargs):
    """A small checkpoint whose every tensor holds `value` (default: the step)."""
    value = float(step if value is None else value)
    kwargs.setdefault("config", {**CONFIG, "step": step})
    kwargs.setdefault("state", {"step": step, "m": torch.full((7,), value)})
    return save_checkpoint(root, step, model_state={"w": torch.full((3, 4), value), "b": torch.zeros(4)},
                           ema_state={"w": torch.full((3, 4), -value)}, **kwargs)


def _value(checkpoint: Checkpoint) -> float:
    return checkpoint.model_state["w"][0, 0].item()


def _visible(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _rewrite(path, data: bytes):
    """Replace a checkpoint file and its manifest entry, as someone with write access could."""
    path.write_bytes(data)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


# ---- round trip ----------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 6)
        self.body = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 5, bias=False)
        self.head.weight = self.embed.weight  # tied: safetensors refuses shared storage as is
        self.register_buffer("steps", torch.tensor(3, dtype=torch.int64))
        self.register_buffer("bf16", torch.arange(4, dtype=torch.bfloat16))

    def forward(self, idx):
        return self.head(torch.tanh(self.body(self.embed(idx))))


def _train(net, optimizer, n):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        idx = torch.randint(0, 5, (8,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(idx), idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_round_trip_restores_weights_optimizer_config_and_random_states(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    _train(net, optimizer, 3)
    model_state = net.state_dict()
    model_state["transposed"] = torch.randn(3, 5).t()  # not contiguous
    plain = {"set": {1, 2}, "bytes": b"\x00\xff", "size": torch.Size([2, 3]), "dtype": torch.bfloat16,
             "device": torch.device("cpu"), "complex": 1 + 2j, "ordered": OrderedDict(a=1), 7: (None, 1.5)}
    config = {**CONFIG, "train": {"lr": 1e-2, "steps": [1, 2, 3]}}

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    rng = rng_state()
    expected_draws = (torch.rand(4), random.random(), np.random.rand(3), random.gauss(0, 1))
    path = save_checkpoint(tmp_path, 3, model_state=model_state, config=config,
                           ema_state={k: v + 1 for k, v in model_state.items()},
                           state={"step": 3, "optimizer": optimizer.state_dict(), "rng": rng, "plain": plain})
    torch.rand(10), random.random(), np.random.rand(10)  # move every generator on

    loaded = load_checkpoint(tmp_path)
    assert loaded.path == path == tmp_path / "step_00000003" and loaded.step == 3
    assert loaded.config == config
    assert loaded.model_state.keys() == model_state.keys()
    for key, value in model_state.items():
        assert loaded.model_state[key].dtype == value.dtype
        assert torch.equal(loaded.model_state[key], value), key
        assert torch.equal(loaded.ema_state[key], value + 1), key
    assert loaded.state["plain"] == plain and loaded.state["step"] == 3

    set_rng_state(loaded.state["rng"])
    draws = (torch.rand(4), random.random(), np.random.rand(3), random.gauss(0, 1))
    assert torch.equal(draws[0], expected_draws[0]) and draws[1] == expected_draws[1]
    assert np.array_equal(draws[2], expected_draws[2]) and draws[3] == expected_draws[3]

    # A resumed optimizer takes exactly the steps the original takes.
    resumed = _Net()
    resumed.load_state_dict({k: v for k, v in loaded.model_state.items() if k != "transposed"})
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(loaded.state["optimizer"])
    _train(net, optimizer, 2)
    _train(resumed, resumed_optimizer, 2)
    for (name, a), b in zip(net.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_latest_names_the_newest_save_and_weights_load_alone(tmp_path):
    _save(tmp_path, 1)
    path = _save(tmp_path, 2)
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    assert latest_checkpoint(tmp_path) == path and latest_checkpoint(tmp_path / "nothing") is None
    assert load_checkpoint(path).step == 2
    alone = load_checkpoint(path / "model.safetensors")  # weights and the config beside them
    assert alone.step == 2 and _value(alone) == 2.0 and alone.config["step"] == 2 and alone.state == {}

    shipped = tmp_path / "assets"  # a shipped model: weights + config with their digest, no manifest, no state
    shipped.mkdir()
    weights = (path / "model.safetensors").read_bytes()
    (shipped / "model.safetensors").write_bytes(weights)
    digest = {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    (shipped / "config.json").write_text(json.dumps({**CONFIG, "step": 2, "weights": digest}))
    assert _value(load_checkpoint(shipped)) == 2.0
    (shipped / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(shipped / "model.safetensors")


# ---- atomic saves --------------------------------------------------------------------------------
def _assert_untouched(root, step=1):
    """Only the earlier checkpoint and `latest` are there, no temporary leftovers, and it loads."""
    assert _visible(root) == ["latest", f"step_{step:08d}"]
    assert (root / "latest").read_text().strip() == f"step_{step:08d}"
    loaded = load_checkpoint(root)
    assert loaded.step == step and _value(loaded) == float(step)


def test_crash_after_the_first_file_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real, calls = files.write_file, []

    def crash_on_second(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(path, data)

    monkeypatch.setattr(files, "write_file", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _save(tmp_path, 2)
    assert calls[0] == "model.safetensors"
    _assert_untouched(tmp_path)


@pytest.mark.parametrize("failing", ["rename", "replace"])
def test_failing_rename_or_latest_update_rolls_back(tmp_path, monkeypatch, failing):
    _save(tmp_path, 1)
    real = getattr(os, failing)

    def broken(src, dst, *args, **kwargs):
        if ".tmp-" in os.fspath(src):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(CheckpointWriteError) as info:
        _save(tmp_path, 2)
    assert info.value.errno == errno.EIO and "step 2" in str(info.value)
    _assert_untouched(tmp_path)
    with pytest.raises(CheckpointWriteError):  # a re-save of the same step: the old one stays
        _save(tmp_path, 1, value=99.0)
    _assert_untouched(tmp_path)


def _bytes_written_by_a_save(tmp_path, monkeypatch) -> int:
    total, real = [0], os.write

    def counting(fd, data):
        total[0] += len(data)
        return real(fd, data)

    with monkeypatch.context() as m:
        m.setattr(os, "write", counting)
        _save(tmp_path / "dry", 2)
    return total[0]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.97, 1.0])
def test_disk_full_during_a_save_is_an_error_and_keeps_the_previous(tmp_path, monkeypatch, fraction):
    root = tmp_path / "run"
    _save(root, 1)
    total = _bytes_written_by_a_save(tmp_path, monkeypatch)
    budget, real = [int(fraction * total) - (fraction == 1.0)], os.write  # 1.0: `latest` fails

    def full_disk(fd, data):
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = real(fd, bytes(data[:budget[0]]))
        budget[0] -= written
        return written

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        _save(root, 2)
    monkeypatch.undo()
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert "No space left" in str(info.value) and "unchanged" in str(info.value)
    _assert_untouched(root)


# ---- verified loads ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "state.pt", "config.json"])
def test_truncated_or_bit_flipped_files_are_named(tmp_path, name):
    path = _save(tmp_path, 1) / name
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{name}.*truncated"):
        load_checkpoint(path.parent)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=rf"{name}.*SHA-256.*corrupted"):
        load_checkpoint(path.parent)
    with pytest.raises(CheckpointError, match=rf"no loadable checkpoint[\s\S]*{name}"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_without_its_manifest_is_refused_whole_or_by_its_weights(tmp_path):
    """Without the manifest nothing in the folder can be verified: the folder, or its weights
    named alone, are refused rather than read unverified (tests/test_model_files.py has more)."""
    path = _save(tmp_path, 1)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match=r"manifest.json is missing.*state.pt") as info:
        load_checkpoint(path / "model.safetensors")
    assert str(info.value).startswith(f"{path}: ")


def test_missing_files_are_listed(tmp_path):
    path = _save(tmp_path, 1)
    (path / "state.pt").unlink()
    (path / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing file\(s\) ema.safetensors, state.pt"):
        load_checkpoint(path)


class _Evil:
    """Pickles into a call that creates a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("packing", ["torch.save", "pickle"])
def test_a_crafted_pickle_is_refused_and_nothing_runs(tmp_path, packing):
    path = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    payload = {"step": 1, "x": _Evil(marker)}
    if packing == "torch.save":
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
    else:
        data = pickle.dumps(payload)
    _rewrite(path / "state.pt", data)  # the manifest agrees: only the unpickler stands in the way
    with pytest.raises(CheckpointError, match=r"state.pt: loading refused.*nothing in it was executed"):
        load_checkpoint(path)
    assert not marker.exists()
    if packing == "pickle":  # the payload is real: a plain unpickler runs it
        pickle.loads(data)
        assert marker.exists()


def test_pickle_files_are_not_taken_as_weights(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps(_Evil(tmp_path / "pwned")))
    with pytest.raises(CheckpointError, match=r"model.pt: expected a .safetensors"):
        load_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


def test_a_newer_format_version_is_an_error(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="version 99.*upgrade"):
        load_checkpoint(path)


# ---- falling back to the newest good checkpoint --------------------------------------------------
def test_latest_pointing_to_a_deleted_or_broken_directory_falls_back(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    (tmp_path / "latest").write_text("step_00000009\n")  # deleted
    with pytest.warns(UserWarning, match="step_00000009, which does not exist"):
        assert load_checkpoint(tmp_path).step == 3
    (tmp_path / "latest").write_text("step_00000003\n")
    (tmp_path / "step_00000003" / "model.safetensors").write_bytes(b"garbage")  # broken
    with pytest.warns(UserWarning, match=r"loaded .*step_00000002 instead[\s\S]*model.safetensors"):
        loaded = load_checkpoint(tmp_path)
    assert loaded.step == 2 and _value(loaded) == 2.0
    (tmp_path / "latest").unlink()  # no pointer at all: the newest that verifies
    with pytest.warns(UserWarning):
        assert load_checkpoint(tmp_path).step == 2
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000003"  # complete, not hashed
    assert latest_checkpoint(tmp_path, verify=True) == tmp_path / "step_00000002"


def test_a_crash_between_the_two_renames_of_a_resave_loses_nothing(tmp_path):
    """Killed after moving the old step_5 aside, before renaming the complete new one in."""
    root = tmp_path / "run"
    os.rename(_save(root, 5), root / ".step_00000005.old-89abcdef")
    os.rename(_save(tmp_path / "other", 5, value=55.0), root / ".step_00000005.tmp-0123abcd")
    (root / ".step_00000006.tmp-00000000").mkdir()  # a save killed early: no manifest
    assert latest_checkpoint(root) == root / ".step_00000005.tmp-0123abcd"
    with pytest.warns(UserWarning, match="step_00000005, which does not exist"):
        loaded = load_checkpoint(root)
    assert loaded.step == 5 and _value(loaded) == 55.0
    os.rename(root / ".step_00000005.tmp-0123abcd", tmp_path / "elsewhere")
    with pytest.warns(UserWarning):
        assert _value(load_checkpoint(root)) == 5.0  # the original, moved aside
    _save(root, 6)  # the next good save clears the leftovers
    assert _visible(root) == ["latest", "step_00000006"]


def test_empty_or_foreign_directories(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "step_00000001").mkdir()  # not a save of ours: no manifest
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        load_checkpoint(tmp_path)


# ---- pruning -------------------------------------------------------------------------------------
def test_keep_prunes_older_steps_but_never_the_one_just_saved(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert _visible(tmp_path) == ["latest", "step_00000004", "step_00000005"]
    _save(tmp_path, 2, keep=1)  # a run resumed from an older step
    assert _visible(tmp_path) == ["latest", "step_00000002", "step_00000005"]
    assert load_checkpoint(tmp_path).step == 2
    for step in (7, 8):
        _save(tmp_path, step, keep=None)
    assert len(_visible(tmp_path)) == 5


def test_resave_of_the_same_step_replaces_it(tmp_path):
    _save(tmp_path, 4)
    _save(tmp_path, 4, value=40.0)
    assert _value(load_checkpoint(tmp_path)) == 40.0
    assert _visible(tmp_path) == ["latest", "step_00000004"]


# ---- compatibility -------------------------------------------------------------------------------
def test_check_compatible_lists_every_mismatch(tmp_path):
    loaded = load_checkpoint(_save(tmp_path, 1))
    same = {"architecture": {"name": "UNet", "channels": (32, 64), "attention": True},
            "schedule": {"name": "linear", "beta_min": 0.1, "beta_max": 20}}
    check_compatible(loaded, same)  # tuples and lists, 20 and 20.0 agree
    other = {"architecture": {"name": "MLP", "channels": [32, 64], "attention": 1, "dim": 2},
             "schedule": {"name": "cosine", "cosine_s": 0.008}}
    with pytest.raises(CheckpointError) as info:
        check_compatible(loaded, other)
    message = str(info.value)
    assert str(tmp_path / "step_00000001" / "config.json") in message
    for line in ["architecture.name: saved 'UNet', expected 'MLP'",
                 "architecture.attention: saved True, expected 1",
                 "architecture.dim: saved (missing), expected 2",
                 "schedule.name: saved 'linear', expected 'cosine'",
                 "schedule.beta_max: saved 20.0, expected (missing)",
                 "schedule.cosine_s: saved (missing), expected 0.008"]:
        assert line in message
    assert "channels" not in message
    check_compatible(loaded, other, keys=("architecture.channels", "not.there"))
    with pytest.raises(CheckpointError) as info:
        check_compatible(loaded, other, keys=["schedule.name"])
    assert str(info.value).endswith("match:\n  schedule.name: saved 'linear', expected 'cosine'")
    with pytest.raises(CheckpointError, match="step: saved 1, expected 2"):
        check_compatible(loaded, {"step": 2}, keys=None)


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"step": -1}, ValueError, "step=-1"),
    ({"step": True}, TypeError, "step=True"),
    ({"keep": 0}, ValueError, "keep=0"),
    ({"model_state": {"w": [1.0]}}, TypeError, r"model_state\['w'\]"),
    ({"model_state": torch.zeros(3)}, TypeError, "model_state"),
    ({"ema_state": {1: torch.zeros(1)}}, TypeError, r"ema_state\[1\]"),
    ({"config": {"a": {1, 2}}}, TypeError, r"config\['a'\]: a set"),
    ({"config": {"a": {3: "x"}}}, TypeError, "key 3"),
    ({"config": {"a": np.int64(3)}}, TypeError, r"config\['a'\]"),
    ({"config": {"a": float("nan")}}, ValueError, "nan"),
    ({"state": {"x": [np.zeros(3)]}}, TypeError, r"state\['x'\]\[0\]: a numpy.ndarray.*weights_only"),
    ({"state": {"f": np.float32(1.0)}}, TypeError, r"state\['f'\]: a numpy.float32"),
    ({"state": [1]}, TypeError, "state: expected a dict"),
])
def test_bad_save_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, error, match):
    args = {"step": 1, "model_state": {"w": torch.zeros(2)}, "config": {}, "state": {}, **kwargs}
    with pytest.raises(error, match=match):
        save_checkpoint(tmp_path / "run", **args)
    assert not (tmp_path / "run").exists()


def test_map_location_moves_weights_but_keeps_the_state_on_the_cpu(tmp_path):
    loaded = load_checkpoint(_save(tmp_path, 1), map_location="meta")
    assert loaded.model_state["w"].device.type == "meta" and loaded.ema_state["w"].device.type == "meta"
    assert loaded.state["m"].device.type == "cpu"


def test_bad_load_arguments(tmp_path):
    path = _save(tmp_path, 1)
    with pytest.raises(ValueError, match="map_location='nowhere'"):
        load_checkpoint(path, map_location="nowhere")
    with pytest.raises(TypeError, match="path=3"):
        load_checkpoint(3)
    with pytest.raises(ValueError, match="unexpected keys"):
        set_rng_state({"step": 1})


# ---- SIGKILL at random moments -------------------------------------------------------------------
_CHILD = """
import sys, torch
from scoresde.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
root, n = sys.argv[1], 1 << 19
step = load_checkpoint(root).step + 1 if latest_checkpoint(root) is not None else 0
print("ready", step, flush=True)
while True:
    for version in (0, 1):  # each step saved twice: the second save replaces the first
        save_checkpoint(root, step, model_state={"w": torch.full((n,), float(step))},
                        ema_state={"w": torch.full((n,), -float(step))}, config={"step": step},
                        state={"step": step, "version": version, "m": torch.full((n,), float(step))}, keep=2)
        print("saved", step, flush=True)
    step += 1
"""


def _assert_consistent(loaded: Checkpoint):
    step = float(loaded.step)
    assert loaded.config["step"] == loaded.state["step"] == loaded.step
    assert bool((loaded.model_state["w"] == step).all()) and bool((loaded.ema_state["w"] == -step).all())
    assert bool((loaded.state["m"] == step).all())


@pytest.mark.parametrize("kills", [pytest.param(4, marks=pytest.mark.slow), pytest.param(25, marks=pytest.mark.slow)])
def test_sigkill_during_saves_always_leaves_a_loadable_checkpoint(tmp_path, kills):
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("no SIGKILL on this platform")
    root, chance, last = tmp_path / "run", random.Random(1234), -1
    for trial in range(kills):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        ready = child.stdout.readline()
        assert ready.startswith("ready"), child.communicate()[1]
        delay = chance.uniform(0.0, 0.8)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate()
        assert child.returncode == -signal.SIGKILL, err
        saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
        if not saved and latest_checkpoint(root) is None:
            continue  # killed before the first save ever finished
        loaded = load_checkpoint(root)
        _assert_consistent(loaded)
        assert loaded.step >= max(saved[-1] if saved else -1, last), (trial, delay, saved[-3:], loaded.step)
        last = loaded.step
        for path in root.glob("step_*"):  # every visible step directory is complete
            _assert_consistent(load_checkpoint(path))
