"""Faults end to end: a training run killed at random moments, a disk that fills during a save,
checkpoints of another schedule or architecture, corrupted or hostile files given to every loader,
NaN during sampling, and long sampling in chunks (flat memory, killed, resumed)."""
from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch

import scoresde as sd
from scoresde.chunked import sample_seed
from scoresde.pretrained import export_model
from scoresde import checkpoint as ckpt
from scoresde.train import data as datasets
from scoresde.train import loop
from scoresde.train.config import apply_overrides, preset

from helpers import assert_same_run

# A toy2d run small enough for seconds on one CPU core.
TOY = ["batch_size=32", "warmup=5", "log_every=5", "sample_every=100000", "model.hidden=32", "model.layers=2",
       "cond_drop=0.0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def toy(out, **overrides):
    config = apply_overrides(preset("toy2d"), TOY + [f"{k}={v}" for k, v in overrides.items()])
    config.out, config.device = str(out), "cpu"
    return config


# ---- a training run killed again and again -----------------------------------------------------------
def _mid_save_leftovers(root) -> set[str]:
    """What a save killed between its first write and its last rename leaves: hidden temporaries."""
    return {p.name for p in root.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)}


def _wait_for(condition, child, timeout):
    """Poll `condition` every millisecond until it holds, the child exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)


def _latest_step(root) -> int:
    try:
        return int((root / "latest").read_text().strip()[5:])
    except (OSError, ValueError):
        return -1


@pytest.mark.slow
def test_sigkilled_training_resumes_to_the_same_weights(tmp_path):
    """`scoresde train` (a save every step) killed 10 times at seeded random moments, each a few steps
    after the last, every other one aimed inside a save: after each kill the checkpoint `latest` names
    loads and verifies, as does every step directory; `--resume` then finishes with the weights, EMA
    and optimiser moments of an uninterrupted run."""
    steps, kills, chance = 150, 10, random.Random(6)  # room for 10 kills on a fast machine too
    command = [sys.executable, "-m", "scoresde.cli", "train", "--preset", "toy2d", "--device", "cpu", "--set",
               *TOY, f"steps={steps}", "ckpt_every=1", "keep=2", "--out"]
    straight = subprocess.Popen(command + [str(tmp_path / "straight")], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    root, landed, mid_save, last = tmp_path / "killed", 0, 0, -1
    root.mkdir()
    for trial in range(kills):
        leftovers = _mid_save_leftovers(root)
        child = subprocess.Popen(command + [str(root)] + ["--resume"] * (trial > 0), env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = last + chance.randint(1, 4)  # let it make a little progress first
        _wait_for(lambda: _latest_step(root) >= target, child, timeout=120)
        if trial % 2:  # aimed: wait for the next save to start writing, then kill within 20 ms
            _wait_for(lambda: _mid_save_leftovers(root) - leftovers, child, timeout=2)
            time.sleep(chance.uniform(0.0, 0.02))
        else:  # anywhere in the next steps and saves
            time.sleep(chance.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.returncode == 0:
            break  # finished before the kill
        landed += 1
        mid_save += bool(_mid_save_leftovers(root) - leftovers)  # new ones: this kill landed inside a save
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # `latest` itself must verify: no fallback
            found = ckpt.load_checkpoint(root)
        assert found.path.name == (root / "latest").read_text().strip()
        assert found.step >= max(last, target), (trial, found.step, last, target)
        last = found.step
        for path in root.glob("step_*"):  # every visible step directory is complete
            assert ckpt.load_checkpoint(path).step == int(path.name[5:])
    finish = subprocess.run(command + [str(root), "--resume"], env=ENV, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert straight.wait() == 0, straight.stderr.read()[-2000:]
    assert_same_run(tmp_path / "straight", root)
    assert ckpt.load_checkpoint(root).step == steps
    print(f"\n{landed} kills landed, {mid_save} of them inside a save; every one left a loadable checkpoint")
    assert landed >= 8


def test_a_disk_that_fills_during_a_training_save(tmp_path, monkeypatch):
    """The save at step 4 meets a full disk: the run stops with the error, step 2 stays `latest` and
    intact, and a resumed run ends where an uninterrupted one does."""
    loop.train(toy(tmp_path / "straight", steps=6, ckpt_every=2))
    real_write, saves = os.write, []

    def full_at_the_second_save(fd, data):
        if len(saves) >= 1 and saves[-1] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    real_save = ckpt.save_checkpoint

    def counting_save(root, step, **kwargs):
        saves.append(step)
        return real_save(root, step, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", counting_save)
    monkeypatch.setattr(os, "write", full_at_the_second_save)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        loop.train(toy(tmp_path / "full", steps=6, ckpt_every=2))
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and "unchanged" in str(info.value)
    root = tmp_path / "full"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(("step_", "latest", "."))) == \
        ["latest", "step_00000002"]
    assert ckpt.load_checkpoint(root).step == 2
    loop.train(toy(root, steps=6, ckpt_every=2), resume=True)
    assert_same_run(tmp_path / "straight", root)


# ---- checkpoints that do not match -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real training checkpoint (2 steps of the toy run) and its exported weights."""
    root = tmp_path_factory.mktemp("trained")
    loop.train(toy(root / "run", steps=2, ckpt_every=2))
    export_model(root / "run", root / "exported")
    return root


@pytest.mark.parametrize("change, mismatches", [
    ({"beta_max": 10.0}, ["schedule.beta_max: saved 20.0, expected 10.0"]),
    ({"schedule": "cosine"}, ["schedule.schedule: saved 'linear', expected 'cosine'",
                              "schedule.cosine_s: saved (missing), expected 0.008",
                              "schedule.beta_min: saved 0.1, expected (missing)",
                              "schedule.beta_max: saved 20.0, expected (missing)"]),
    ({"time": "discrete", "num_steps": 1000}, ["train.time: saved 'continuous', expected 'discrete'",
                                               "train.num_steps: saved None, expected 1000"]),
    ({"target": "v"}, ["prediction: saved 'eps', expected 'v'"]),
    ({"model.hidden": 16}, ["architecture.hidden: saved 32, expected 16"]),
])
def test_resume_against_another_schedule_chain_or_prediction_names_the_file_and_fields(
        trained, tmp_path, change, mismatches):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ckpt.CheckpointError) as info:
        loop.train(toy(run, steps=4, **change), resume=True)
    message = str(info.value)
    assert message.startswith(f"{run / 'step_00000002' / 'config.json'}: the checkpoint does not match")
    for line in mismatches:
        assert line in message
    assert len(message.splitlines()) == 1 + len(mismatches)  # nothing else reported as different
    assert sorted(p.name for p in run.iterdir()) == before  # refused before anything was written


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _edit_config(path, edit):
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _replace_exported_weights(folder, data):
    """New weights with the digest in config.json updated to match, as someone with write access could."""
    (folder / "model.safetensors").write_bytes(data)
    digest = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _edit_config(folder / "config.json", lambda c: c["weights"].update(digest))


@pytest.mark.parametrize("where, damage, names, match", [
    ("run", lambda d: _truncate(d / "step_00000002" / "model.safetensors"), "model.safetensors", "truncated"),
    ("run", lambda d: _flip(d / "step_00000002" / "ema.safetensors"), "ema.safetensors", "corrupted"),
    ("run", lambda d: _flip(d / "step_00000002" / "config.json"), "config.json", "corrupted"),
    ("exported", lambda d: _truncate(d / "model.safetensors"), "model.safetensors", "truncated"),
    ("exported", lambda d: _replace_exported_weights(d, b"\x10" + bytes(40)), "model.safetensors",
     "not a readable safetensors"),
    ("exported", lambda d: _edit_config(d / "config.json", lambda c: c["architecture"].update(hidden=64)),
     "model.safetensors", r"do not fit the network described in \S*config.json[\s\S]*size mismatch"),
    ("exported", lambda d: _edit_config(d / "config.json", lambda c: c.update(schedule={"schedule": "sigmoid"})),
     "config.json", "not a model config of scoresde.*sigmoid"),
    ("exported", lambda d: _edit_config(d / "config.json", lambda c: c.pop("architecture")),
     "config.json", "no 'architecture' entry"),
    ("exported", lambda d: (d / "config.json").write_text("[]"), "config.json", "expected a JSON object"),
])
def test_load_model_on_a_damaged_or_foreign_file_names_it(trained, tmp_path, where, damage, names, match):
    folder = tmp_path / where
    shutil.copytree(trained / where, folder)
    sd.load_model(folder)  # undamaged, it loads
    damage(folder)
    with pytest.raises(ckpt.CheckpointError, match=match) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a run folder warns before it gives up
        sd.load_model(folder)
    assert re.search(rf"{re.escape(str(folder))}\S*{re.escape(names)}", str(info.value))


# ---- a crafted pickle, to every loader of user files ------------------------------------------------------
class _Payload:
    """Unpickles into a call that creates `marker`: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _npy_payload(path, marker):
    np.save(path, np.array([_Payload(marker), None], dtype=object), allow_pickle=True)


def _to_checkpoint_state(folder, marker):
    """state.pt replaced by a pickle, its manifest entry updated to match (write access assumed)."""
    path = folder / "run" / "step_00000002" / "state.pt"
    data = pickle.dumps({"step": 2, "x": _Payload(marker)})
    path.write_bytes(data)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path.parent / "manifest.json").write_text(json.dumps(manifest))
    return folder / "run", path


def _as_exported_weights(folder, marker):
    path = folder / "exported" / "model.safetensors"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    return folder / "exported", path


def _as_weights_file(folder, marker):
    path = folder / "model.pt"
    path.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    return path, path


def _as_npy(folder, marker):
    _npy_payload(folder / "data.npy", marker)
    return folder / "data.npy", folder / "data.npy"


def _as_npz(folder, marker):
    np.savez(folder / "data.npz", x=np.array([_Payload(marker)], dtype=object))
    return folder / "data.npz", folder / "data.npz"


def _as_cifar(folder, marker):
    path = folder / "cifar" / "data_batch_1"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=2))
    return path.parent, path


def _as_image(folder, marker):
    path = folder / "images" / "a.png"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(_Payload(marker)))
    return path.parent, path


def _as_sample_chunk(folder, marker):
    sde = sd.VPSDE.linear()
    sd.sample_to_disk(sd.GaussianMixture.ring2d(sde), sde, 4, folder / "chunks", sample_shape=(2,), batch_size=4,
                      solver="ddim", steps=2, progress=False)
    path = folder / "chunks" / "chunk_000000.npy"
    _npy_payload(path, marker)
    return path.parent, path


def _naive_load(path):
    """What an unguarded reader does with the file: this runs the payload."""
    if path.suffix in (".npy", ".npz"):
        loaded = np.load(path, allow_pickle=True)
        return [loaded[k] for k in loaded.files] if path.suffix == ".npz" else loaded
    return pickle.loads(path.read_bytes())


LOADERS = {  # how the hostile file is planted, and the loader that must refuse it
    "checkpoint state.pt": (_to_checkpoint_state, sd.load_model),
    "exported model.safetensors": (_as_exported_weights, sd.load_model),
    "model.pt": (_as_weights_file, sd.load_model),
    "data .npy": (_as_npy, datasets.load_data),
    "data .npz": (_as_npz, datasets.load_data),
    "CIFAR-10 batch": (_as_cifar, datasets.load_data),
    "image folder": (_as_image, datasets.load_data),
    "sample chunk": (_as_sample_chunk, sd.load_samples),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", list(LOADERS))
def test_a_crafted_pickle_is_refused_by_every_loader_and_nothing_runs(trained, tmp_path, kind):
    plant, load = LOADERS[kind]
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    marker = tmp_path / "pwned"
    source, hostile = plant(tmp_path, marker)
    with pytest.raises(ValueError) as info:  # CheckpointError is a ValueError
        load(source)
    assert not marker.exists(), f"{kind}: the payload ran"
    assert str(hostile) in str(info.value)
    _naive_load(hostile)  # the payload is real
    assert marker.exists()


# ---- NaN during sampling ---------------------------------------------------------------------------------
def test_nan_in_a_chunk_stops_with_chunk_step_and_t_and_keeps_the_chunks_before(tmp_path):
    """The documented policy: sampling stops with FloatingPointError naming the first bad model call's
    step and t (after the loop: no host sync per step); in chunks, also the chunk and its samples."""
    sde = sd.VPSDE.linear()
    mixture, calls = sd.GaussianMixture.ring2d(sde), [0]

    def breaks_in_the_third_chunk(x, t):
        calls[0] += 1
        eps = mixture(x, t)
        return eps * float("nan") if calls[0] == 2 * 5 + 3 else eps  # 5 calls per chunk (4 steps + denoise)

    kwargs = dict(sample_shape=(2,), batch_size=3, solver="euler", steps=4, progress=False)
    with pytest.raises(FloatingPointError, match=r"chunk 2 \(samples 6\.\.8\).*model call 3 \(step 2, t=") as info:
        sd.sample_to_disk(breaks_in_the_third_chunk, sde, 10, tmp_path / "out", **kwargs)
    _, grid = sd.sample(mixture, sde, shape=(1, 2), solver="euler", steps=4, return_info=True)
    assert float(re.search(r"t=([\d.e-]+)\)", str(info.value)).group(1)) == pytest.approx(grid.times[2].item(), 1e-5)
    assert sd.load_samples(tmp_path / "out", partial=True).shape == (6, 2)
    with pytest.raises(ckpt.CheckpointError, match=r"chunk_000002.npy: missing"):
        sd.load_samples(tmp_path / "out")
    run = sd.sample_to_disk(mixture, sde, 10, tmp_path / "out", **kwargs)  # the model fixed: it finishes
    assert (run.drawn, run.skipped) == (2, 2)
    sd.sample_to_disk(mixture, sde, 10, tmp_path / "straight", **kwargs)
    assert torch.equal(sd.load_samples(tmp_path / "out"), sd.load_samples(tmp_path / "straight"))


# ---- chunked sampling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver, options", [("euler_maruyama", {"steps": 6}), ("ddim", {"steps": 4, "eta": 1.0}),
                                             ("heun", {"steps": 3})])
def test_chunked_samples_do_not_depend_on_the_chunking(tmp_path, solver, options):
    sde = sd.VPSDE.linear()
    mixture = sd.GaussianMixture.ring2d(sde)
    runs = {}
    for batch_size in (4, 10, 23):
        sd.sample_to_disk(mixture, sde, 23, tmp_path / str(batch_size), sample_shape=(2,), batch_size=batch_size,
                          seed=3, solver=solver, progress=False, **options)
        runs[batch_size] = sd.load_samples(tmp_path / str(batch_size))
    assert runs[4].shape == (23, 2) and len({tuple(x.tolist()) for x in runs[4]}) == 23
    assert torch.equal(runs[4], runs[10]) and torch.equal(runs[4], runs[23])
    # Sample i is exactly the sample drawn alone with the generator seeded by sample_seed(3, i) ...
    alone = sd.sample(mixture, sde, shape=(1, 2), solver=solver, **options,
                      generator=[torch.Generator().manual_seed(sample_seed(3, 17))])
    assert torch.equal(alone[0], runs[4][17])
    # ... and another seed gives other samples.
    sd.sample_to_disk(mixture, sde, 23, tmp_path / "seed4", sample_shape=(2,), batch_size=10, seed=4,
                      solver=solver, progress=False, **options)
    assert not torch.isclose(sd.load_samples(tmp_path / "seed4"), runs[4]).all(1).any()


def test_rerun_with_other_arguments_is_refused_naming_them(tmp_path):
    sde = sd.VPSDE.linear()
    mixture = sd.GaussianMixture.ring2d(sde)
    kwargs = dict(sample_shape=(2,), batch_size=4, seed=0, solver="ddim", steps=3, progress=False)
    sd.sample_to_disk(mixture, sde, 8, tmp_path / "run", **kwargs)
    with pytest.raises(ckpt.CheckpointError) as info:
        sd.sample_to_disk(mixture, sd.VPSDE.cosine(), 8, tmp_path / "run", **{**kwargs, "steps": 5, "seed": 1})
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'run' / 'manifest.json'}: 2 chunk(s) were drawn with other arguments")
    for line in ("sample.steps: saved 3, expected 5", "seed: saved 0, expected 1",
                 "sde: saved 'VPSDE(LinearSchedule(beta_min=0.1, beta_max=20.0))', expected 'VPSDE(CosineSchedule("):
        assert line in message
    assert len(message.splitlines()) == 4  # the three differences, nothing else
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no manifest.json"):
        sd.sample_to_disk(mixture, sde, 8, tmp_path / "other", **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n": 0}, ValueError, "n=0"),
    ({"batch_size": 2.5}, TypeError, "batch_size=2.5"),
    ({"seed": -1}, ValueError, "seed=-1"),
    ({"sample_shape": (2, 0)}, ValueError, r"sample_shape=\(2, 0\)"),
    ({"generator": torch.Generator()}, TypeError, "seed instead of generator"),
    ({"shape": (4, 2)}, TypeError, "sample_shape and n instead of shape"),
    ({"grid": lambda sde, n, t0, t1: None}, TypeError, "grid=.*cannot be recorded"),
    ({"meta": ["x"]}, TypeError, "meta="),
    ({"transform": 3}, TypeError, "transform=3"),
    ({"transform": lambda x: x[:, :1]}, ValueError, r"transform: changed the chunk's shape to \(4, 1\)"),
])
def test_bad_arguments_are_refused_at_the_door(tmp_path, kwargs, error, match):
    sde = sd.VPSDE.linear()
    args = {"n": 8, "sample_shape": (2,), "batch_size": 4, "solver": "ddim", "steps": 2, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        sd.sample_to_disk(sd.GaussianMixture.ring2d(sde), sde, out_dir=tmp_path / "out", **args)
    assert not list(tmp_path.rglob("chunk_*"))


def test_a_disk_that_fills_during_a_chunk_keeps_the_chunks_before(tmp_path, monkeypatch):
    sde = sd.VPSDE.linear()
    mixture = sd.GaussianMixture.ring2d(sde)
    kwargs = dict(sample_shape=(2,), batch_size=4, solver="ddim", steps=2, progress=False)
    real_write, writes = os.write, [0]

    def full_from_the_third_chunk(fd, data):
        writes[0] += 1
        if writes[0] > 3:  # the manifest, then one write per chunk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_from_the_third_chunk)
    with pytest.raises(OSError, match="No space left"):
        sd.sample_to_disk(mixture, sde, 20, tmp_path, **kwargs)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk_000000.npy", "chunk_000001.npy", "manifest.json"]
    assert sd.load_samples(tmp_path, partial=True).shape == (8, 2)
    assert sd.sample_to_disk(mixture, sde, 20, tmp_path, **kwargs).drawn == 3


_SAMPLER = textwrap.dedent("""
    import resource, sys, time, torch, scoresde as sd
    n, out, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    torch.set_num_threads(1)
    sde = sd.VPSDE.linear()
    gaussian = sd.Gaussian(sde, torch.zeros(1024), 0.5)
    def model(x, t):
        time.sleep(delay)  # slow enough for the parent to kill it between chunks
        return gaussian(x, t)
    sd.sample_to_disk(model, sde, n, out, sample_shape=(1024,), batch_size=500, seed=0, solver="euler_maruyama",
                      steps=3, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: kilobytes
""")


def _run_sampler(n, out, delay=0.0):
    # glibc: blocks over 64 KiB come from mmap and go back on free, so that the peak RSS follows live
    # memory rather than the allocator's slack (which wanders by ~10 MiB from run to run otherwise).
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return subprocess.Popen([sys.executable, "-c", _SAMPLER, str(n), str(out), str(delay)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # ~5 s: 10,000 samples in a subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units and /proc are Linux's")
def test_ten_thousand_samples_in_chunks_keep_memory_flat(tmp_path):
    """Peak memory drawing 10,000 samples of 1,024 floats (41 MB in all) in chunks of 500 stays within
    a quarter of that of drawing one chunk: an implementation that kept the samples (or their graphs)
    would add the whole 41 MB."""
    children = {n: _run_sampler(n, tmp_path / str(n)) for n in (500, 10_000)}
    peaks = {}
    for n, child in children.items():
        out, err = child.communicate()
        assert child.returncode == 0, err[-2000:]
        peaks[n] = int(out.split()[-1])
    total = 10_000 * 1024 * 4
    growth = peaks[10_000] - peaks[500]
    print(f"\npeak RSS: {peaks[500] / 2**20:.1f} MiB for 500 samples, {peaks[10_000] / 2**20:.1f} MiB for 10,000 "
          f"({total / 2**20:.1f} MiB of samples)")
    assert growth < total / 4, (peaks, total)
    assert sd.load_samples(tmp_path / "10000").shape == (10_000, 1024)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no SIGKILL on this platform")
def test_killed_chunked_sampling_keeps_finished_chunks_and_resumes_bit_for_bit(tmp_path):
    out = tmp_path / "killed"
    straight = _run_sampler(3000, tmp_path / "straight")  # the uninterrupted run, alongside
    child = _run_sampler(3000, out, delay=0.05)
    _wait_for(lambda: len(list(out.glob("chunk_*.npy"))) >= 2, child, timeout=120)
    time.sleep(random.Random(0).uniform(0.0, 0.2))
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    finished = visible[:-1]
    assert visible[-1] == "manifest.json" and finished == [f"chunk_{k:06d}.npy" for k in range(len(finished))]
    assert 2 <= len(finished) < 6
    for name in finished:  # complete files, never a partial one under a chunk's name
        assert np.load(out / name, allow_pickle=False).shape == (500, 1024)
    before = {name: os.stat(out / name).st_mtime_ns for name in finished}
    assert sd.load_samples(out, partial=True).shape == (500 * len(finished), 1024)

    rerun = _run_sampler(3000, out)
    _, err = rerun.communicate()
    assert rerun.returncode == 0, err[-2000:]
    assert all(os.stat(out / name).st_mtime_ns == ns for name, ns in before.items())  # kept, not redrawn
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # a killed writer's temporary is gone
    _, err = straight.communicate()
    assert straight.returncode == 0, err[-2000:]
    assert torch.equal(sd.load_samples(out), sd.load_samples(tmp_path / "straight"))


def test_cli_writes_chunks_to_a_folder_and_refuses_batch_size_with_a_file(tmp_path, capsys):
    from scoresde.cli import main

    args = ["sample", "--model", "mixture", "--n", "25", "--solver", "ddim", "--steps", "3", "--seed", "2"]
    assert main(args + ["--batch-size", "10", "--out", f"{tmp_path}/chunks/"]) == 0
    assert "drew 3, found 0 finished" in capsys.readouterr().out
    assert main(args + ["--batch-size", "10", "--out", str(tmp_path / "chunks")]) == 0  # an existing folder
    assert "drew 0, found 3 finished" in capsys.readouterr().out
    x = sd.load_samples(tmp_path / "chunks")
    sde = sd.VPSDE.linear()
    sd.sample_to_disk(sd.GaussianMixture.ring2d(sde), sde, 25, tmp_path / "api", sample_shape=(2,), batch_size=7,
                      seed=2, solver="ddim", steps=3, meta={"model": "mixture"}, progress=False)
    assert torch.equal(x, sd.load_samples(tmp_path / "api"))
    assert main(args + ["--batch-size", "10", "--out", str(tmp_path / "x.npy")]) == 2
    assert "--batch-size goes with a folder" in capsys.readouterr().err
