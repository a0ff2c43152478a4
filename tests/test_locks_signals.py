"""One writer per folder, and stopping cleanly: two samplers or two trainings into one folder, a fresh
run over another run's checkpoints, SIGINT and SIGTERM during training and sampling, --out checked
before anything is drawn, damaged sample manifests, and running out of memory."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import scoresde as sd
from scoresde import cli
from scoresde.chunked import FolderLockedError, sample_seed
from scoresde import files
from scoresde import checkpoint as ckpt
from scoresde.train import loop
from scoresde.train.config import apply_overrides, preset

from helpers import assert_same_run

# A toy2d run small enough for milliseconds per step on one CPU core, logging every step.
TOY = ["batch_size=32", "warmup=5", "log_every=1", "sample_every=100000", "model.hidden=32", "model.layers=2",
       "cond_drop=0.0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SIGNALS = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])


def toy(out, **overrides):
    config = apply_overrides(preset("toy2d"), TOY + [f"{k}={v}" for k, v in overrides.items()])
    config.out, config.device = str(out), "cpu"
    return config


def train_argv(out, *extra, steps=100_000):
    return ["train", "--preset", "toy2d", "--device", "cpu", "--out", str(out), *extra, "--set", *TOY,
            f"steps={steps}", "ckpt_every=100000"]


def wait_for(condition, child, timeout=120):
    """Poll `condition` until it holds; fail if the child exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            pytest.fail(f"the child exited ({child.returncode}) first: {child.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def logged_steps(out) -> int:
    try:
        return len((out / "log.jsonl").read_text().splitlines())
    except OSError:
        return 0


def lines_of(text: str, start: str) -> list[str]:
    """The lines from `start` on (a progress bar drawn with '\r' may precede one on its line)."""
    return re.findall(rf"{re.escape(start)}.*", text)


def send_to_self(signum):
    """Deliver `signum` to this process, but only to a handler train() installed: on code without
    one, SIGINT would end the test session and SIGTERM the process, instead of failing the test."""
    handler = signal.getsignal(signum)
    assert handler not in (signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN, None), \
        f"train() installed no handler for {signal.Signals(signum).name}"
    signal.raise_signal(signum)  # the Python handler runs before this returns


# ---- two writers, one folder ------------------------------------------------------------------------------
_BLOCKED_SAMPLER = textwrap.dedent("""
    import os, sys, time, torch, scoresde as sd
    out, go = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    sde = sd.VPSDE.linear()
    mixture = sd.GaussianMixture.ring2d(sde)
    def model(x, t):
        while not os.path.exists(go):  # holds the folder, mid-run, until the parent says go
            time.sleep(0.005)
        return mixture(x, t)
    sd.sample_to_disk(model, sde, 40, out, sample_shape=(2,), batch_size=8, seed=0, solver="ddim", steps=3,
                      progress=False)
""")


def test_a_second_sampler_into_the_same_folder_is_refused_naming_the_first(tmp_path):
    """The race of two `sample --out race/` at once: the first holds the folder (its manifest is written,
    no chunk yet, its model blocked); the second, another seed, is refused naming the folder and the
    first's PID, and writes nothing; the first then finishes, and the folder holds its seed's samples only."""
    out, go = tmp_path / "race", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", _BLOCKED_SAMPLER, str(out), str(go)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "manifest.json").is_file(), first)
        sde = sd.VPSDE.linear()
        mixture = sd.GaussianMixture.ring2d(sde)
        kwargs = dict(sample_shape=(2,), batch_size=8, solver="ddim", steps=3, progress=False)
        with pytest.raises(FolderLockedError) as info:
            sd.sample_to_disk(mixture, sde, 40, out, seed=1, **kwargs)
        assert info.value.pid == first.pid and info.value.folder == out
        assert str(out) in str(info.value) and f"PID {first.pid}" in str(info.value)
        assert isinstance(info.value, OSError)  # the CLI's one-line errors
        assert not list(out.glob("chunk_*")) and json.loads((out / "manifest.json").read_text())["args"]["seed"] == 0
    finally:
        go.touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    sd.sample_to_disk(mixture, sde, 40, tmp_path / "seed0", seed=0, **kwargs)
    assert torch.equal(sd.load_samples(out), sd.load_samples(tmp_path / "seed0"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the lock file went with its holder
    print(f"\n2 writers on one folder: the second refused naming PID {first.pid}; the folder holds seed 0 only")


def test_a_stale_lock_file_blocks_nothing_and_every_folder_scan_ignores_it(tmp_path):
    """A SIGKILLed run leaves `.lock` behind with its PID; the kernel released the lock, so the next run
    goes ahead. The file is hidden: a folder holding only it counts as empty for sample_to_disk, and the
    checkpoint code neither takes it for a checkpoint nor minds it beside one."""
    sde = sd.VPSDE.linear()
    mixture = sd.GaussianMixture.ring2d(sde)
    samples, run = tmp_path / "samples", tmp_path / "run"
    for folder in (samples, run):
        folder.mkdir()
        (folder / ".lock").write_text("999999999\n")
    assert sd.sample_to_disk(mixture, sde, 8, samples, sample_shape=(2,), batch_size=4, solver="ddim", steps=2,
                             progress=False).drawn == 2
    assert sorted(p.name for p in samples.iterdir()) == ["chunk_000000.npy", "chunk_000001.npy", "manifest.json"]
    assert ckpt.latest_checkpoint(run) is None
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint here"):
        ckpt.load_checkpoint(run)
    loop.train(toy(run, steps=2, ckpt_every=1, keep=1))  # not refused: no checkpoint in it
    (run / ".lock").write_text("999999999\n")
    assert ckpt.latest_checkpoint(run).name == "step_00000002" and ckpt.load_checkpoint(run).step == 2
    loop.train(toy(run, steps=3, ckpt_every=1, keep=1), resume=True)  # resumed past it, pruned and tidied
    assert sorted(p.name for p in run.iterdir()) == ["latest", "log.jsonl", "step_00000003"]


def test_two_trainings_into_one_folder_the_second_is_refused(tmp_path, monkeypatch, capsys):
    """A run in a thread holds the folder, blocked in its first step; a second run into it, from Python or
    the command line, fresh or --resume, is refused naming the folder and the PID; the first then ends
    as if alone. (The run in a thread also shows that train() leaves signals alone outside the main thread.)"""
    out, inside, release = tmp_path / "run", threading.Event(), threading.Event()
    real_loss = loop.diffusion_loss

    def blocks_in_the_first_run(*args, **kwargs):
        if threading.current_thread() is first:
            inside.set()
            assert release.wait(120)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", blocks_in_the_first_run)
    result = {}
    first = threading.Thread(target=lambda: result.update(last=loop.train(toy(out, steps=3, ckpt_every=3))))
    first.start()
    try:
        assert inside.wait(120)
        with pytest.raises(FolderLockedError) as info:
            loop.train(toy(out, steps=3))
        assert info.value.pid == os.getpid() and str(out) in str(info.value)
        for extra in ([], ["--resume"]):
            assert cli.main(train_argv(out, *extra, steps=3)) == 2
            errors = lines_of(capsys.readouterr().err, "scoresde train:")
            assert len(errors) == 1 and f"{out}: another process (PID {os.getpid()})" in errors[0], errors
    finally:
        release.set()
        first.join(120)
    assert result["last"] == out / "step_00000003" and ckpt.load_checkpoint(out).step == 3
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_fresh_run_over_another_runs_checkpoints_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    loop.train(toy(out, steps=4, ckpt_every=2, keep=10))
    before = sorted(p.name for p in out.iterdir())
    assert before == ["latest", "log.jsonl", "step_00000002", "step_00000004"]
    with pytest.raises(ValueError) as info:
        loop.train(toy(out, steps=3))
    message = str(info.value)
    assert str(out) in message and "latest step: 4" in message and "--resume" in message and "--overwrite" in message
    capsys.readouterr()
    assert cli.main(train_argv(out, steps=3)) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("scoresde train: error: ") and "--overwrite" in errors[0]
    with pytest.raises(ValueError, match="choose one"):
        loop.train(toy(out, steps=3), resume=True, overwrite=True)
    assert cli.main(train_argv(out, "--resume", "--overwrite", steps=3)) == 2
    assert "choose one" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before  # refused before anything was touched

    last = loop.train(toy(out, steps=3, ckpt_every=3, keep=10), overwrite=True)
    assert "overwrite: deleted the earlier run" in capsys.readouterr().out
    assert last == out / "step_00000003"
    assert sorted(p.name for p in out.iterdir()) == ["latest", "log.jsonl", "step_00000003"]  # no old checkpoint
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    loop.train(toy(tmp_path / "alone", steps=3, ckpt_every=3))
    assert_same_run(out, tmp_path / "alone")  # nothing of the old run mixed in


def test_resume_with_nothing_to_resume_says_so_and_starts_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_argv(out, "--resume", steps=2)) == 0
    printed = capsys.readouterr().out
    assert f"no checkpoint in {out}: starting a fresh run\n" in printed
    assert ckpt.load_checkpoint(out).step == 2


# ---- SIGINT and SIGTERM ----------------------------------------------------------------------------------
def _check_the_stop(out, code, stdout, stderr, signum, reached) -> tuple[list[str], int]:
    """Exit 128 + signum, one line naming the checkpoint of the step reached (>= `reached`) and the
    command that resumes, no traceback; returns that command's words and the step."""
    assert code == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    (line,) = lines_of(stderr, "scoresde train:")
    found = ckpt.load_checkpoint(out)
    assert reached <= found.step < 100_000  # saved on the way out: ckpt_every alone would have saved nothing
    assert (out / "latest").read_text().strip() == found.path.name
    assert f"stopped by {signal.Signals(signum).name} at step {found.step}; checkpoint saved: {found.path}; " \
           "resume with: scoresde train " in line
    words = shlex.split(line.split("resume with: ", 1)[1])
    assert words[0] == "scoresde" and words.count("--resume") == 1
    return words, found.step


@pytest.mark.parametrize("signum", [signal.SIGINT] + [pytest.param(s, marks=pytest.mark.slow) for s in SIGNALS[1:]])
def test_a_signal_stops_scoresde_train_at_the_step_reached_with_a_checkpoint(tmp_path, signum):
    """`scoresde train` (ckpt_every far beyond the run) gets the signal once it has logged 3 steps: it
    finishes its step, saves it, and exits 128 + signum with one line; the command that line gives (with
    a near end) continues exactly as an uninterrupted run."""
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "scoresde.cli", *train_argv(out)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(out) >= 3, child)
    reached = logged_steps(out)
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)
    words, step = _check_the_stop(out, child.returncode, stdout, stderr, signum, reached)
    end = step + 3
    assert cli.main([w if w != "steps=100000" else f"steps={end}" for w in words[1:]]) == 0
    loop.train(toy(tmp_path / "straight", steps=end, ckpt_every=100_000))
    assert_same_run(out, tmp_path / "straight")
    print(f"\n{signal.Signals(signum).name} after {reached} logged steps: exit {128 + signum}, checkpoint at step "
          f"{step}; its resume command ran on to step {end}, bit for bit an uninterrupted run")


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_in_process_stops_the_cli_at_the_step_reached(tmp_path, monkeypatch, capsys, signum):
    """The same through `cli.main` in this process, the signal raised during step 5 (SIGTERM here keeps
    the fast run's subprocesses to one); the handlers found are restored."""
    out, real_loss, calls = tmp_path / "run", loop.diffusion_loss, [0]

    def signal_in_step_5(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            send_to_self(signum)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", signal_in_step_5)
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    code = cli.main(train_argv(out, "--overwrite"))
    captured = capsys.readouterr()
    words, step = _check_the_stop(out, code, captured.out, captured.err, signum, 5)
    assert step == 5 and "--overwrite" not in words
    assert {s: signal.getsignal(s) for s in SIGNALS} == handlers


@pytest.mark.parametrize("signals, saved", [((signal.SIGINT, signal.SIGINT), False),
                                            ((signal.SIGTERM, signal.SIGINT), True)])
def test_a_second_signal_while_saving(tmp_path, monkeypatch, signals, saved):
    """The first signal arrives during step 6 (a checkpoint every 4 steps); the second while the stop's
    save of step 6 is writing. The same signal again stops at once: the save is abandoned whole and the
    checkpoint of step 4 stays the last. Another signal (torchrun's SIGTERM after the terminal's SIGINT)
    changes nothing. Either way no partial file remains, and the signal handlers are restored."""
    out = tmp_path / "run"
    first, second = signals
    real_loss, real_write, loss_calls = loop.diffusion_loss, files.write_file, [0]

    def signal_in_step_6(*args, **kwargs):
        loss_calls[0] += 1
        if loss_calls[0] == 6:
            send_to_self(first)
        return real_loss(*args, **kwargs)

    def signal_mid_save(path, data):
        if "step_00000006" in str(path) and path.name == "ema.safetensors":  # the second file of the save
            send_to_self(second)
        return real_write(path, data)

    monkeypatch.setattr(loop, "diffusion_loss", signal_in_step_6)
    monkeypatch.setattr(files, "write_file", signal_mid_save)
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    with pytest.raises(loop.TrainingInterrupted) as info:
        loop.train(toy(out, steps=1000, ckpt_every=4))
    stop = info.value
    assert (stop.signum, stop.step, stop.saved) == (first, 6, saved)
    assert stop.checkpoint == out / ("step_00000006" if saved else "step_00000004")
    assert ckpt.load_checkpoint(out).path == stop.checkpoint
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert {s: signal.getsignal(s) for s in SIGNALS} == handlers


def test_ctrl_c_during_chunked_sampling_in_process(tmp_path, monkeypatch, capsys):
    """What Ctrl-C raises (KeyboardInterrupt) in the third chunk of `scoresde sample --out DIR/`: exit
    130, one line saying that 2 of 5 chunks are finished and that a rerun draws the rest; the rerun
    draws only those and gives the uninterrupted run's samples."""
    import scoresde.chunked as chunked

    out, real_sample, calls = tmp_path / "chunks", chunked.sample, [0]

    def interrupted_in_the_third_chunk(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(chunked, "sample", interrupted_in_the_third_chunk)
    argv = ["sample", "--model", "mixture", "--solver", "ddim", "--steps", "2", "--n", "20", "--batch-size", "4",
            "--out"]
    try:
        code = cli.main(argv + [f"{out}/"])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt came out of the command line")
    captured = capsys.readouterr()
    assert code == 130 and captured.err.strip().splitlines() == [
        f"scoresde sample: interrupted: 2 of 5 chunk(s) are finished in {out}/; rerun the same command to draw "
        "the rest"]
    assert sd.load_samples(out, partial=True).shape == (8, 2)
    monkeypatch.undo()
    assert cli.main(argv + [f"{out}/"]) == 0 and "drew 3, found 2 finished" in capsys.readouterr().out
    assert cli.main(argv + [f"{tmp_path}/straight/"]) == 0
    assert torch.equal(sd.load_samples(out), sd.load_samples(tmp_path / "straight"))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_ctrl_c_during_chunked_sampling_keeps_the_finished_chunks(tmp_path):
    """SIGINT to `scoresde sample --out DIR/` after two chunks: exit 130, one line saying how many chunks
    are finished and that a rerun draws the rest, no traceback; the finished chunks load."""
    out = tmp_path / "chunks"
    child = subprocess.Popen([sys.executable, "-m", "scoresde.cli", "sample", "--model", "mixture", "--solver",
                              "euler", "--steps", "20", "--n", "10000000", "--batch-size", "100", "--out", f"{out}/"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(list(out.glob("chunk_*.npy"))) >= 2, child)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    (line,) = lines_of(stderr, "scoresde sample:")
    finished = len(list(out.glob("chunk_*.npy")))
    assert f"interrupted: {finished} of 100000 chunk(s) are finished in {out}/; rerun the same command" in line
    x = sd.load_samples(out, partial=True)
    assert x.shape == (100 * finished, 2) and torch.isfinite(x).all()
    sde = sd.VPSDE.linear()
    alone = sd.sample(sd.GaussianMixture.ring2d(sde), sde, shape=(1, 2), solver="euler", steps=20,
                      generator=[torch.Generator().manual_seed(sample_seed(0, len(x) - 1))])
    assert torch.equal(alone[0], x[-1])  # the last finished sample is whole and right
    print(f"\nSIGINT after 2 chunks: exit 130, {finished} finished chunk(s) kept and loadable")


# ---- --out, checked before drawing --------------------------------------------------------------------------
def test_out_is_checked_and_its_folder_made_before_any_model_call(tmp_path, monkeypatch, capsys):
    calls, real = [], cli.sample
    monkeypatch.setattr(cli, "sample", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    (tmp_path / "a_file").write_text("")
    base = ["sample", "--model", "mixture", "--n", "8", "--solver", "ddim", "--steps", "2", "--out"]
    for bad, says in ((tmp_path / "x.txt", "expected a file name ending in .png or .npy, or a folder"),
                      (tmp_path / "a_file" / "x.npy", "cannot write there"),
                      (tmp_path / "a_file" / "chunks", "cannot write there")):
        name = f"{bad}/" if bad.name == "chunks" else str(bad)
        assert cli.main(base + [name]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and f"--out {name!r}" in errors[0] and says in errors[0], errors
    assert calls == []  # refused before drawing anything
    npy = tmp_path / "missing" / "deeper" / "x.npy"
    assert cli.main(base + [str(npy)]) == 0
    assert np.load(npy).shape == (8, 2) and calls == [1]


def test_sample_raw_writes_unclipped_data_units(tmp_path):
    """--out x.npy gives data units clipped to the data set's range (0..16 for the digits); --raw the
    samples as drawn. Few steps: some samples stray outside the range."""
    base = ["sample", "--n", "16", "--solver", "euler", "--steps", "2", "--seed", "0", "--out"]
    assert cli.main(base + [str(tmp_path / "clipped.npy")]) == 0
    assert cli.main(base + [str(tmp_path / "raw.npy"), "--raw"]) == 0
    clipped, raw = np.load(tmp_path / "clipped.npy"), np.load(tmp_path / "raw.npy")
    assert clipped.min() >= 0 and clipped.max() <= 16
    assert (raw < 0).any() or (raw > 16).any()
    np.testing.assert_array_equal(clipped, np.clip(raw, 0, 16))


# ---- manifests, memory -------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, says", [
    (lambda args: args.update(batch_size=0), "args.batch_size=0: expected an int >= 1"),
    (lambda args: args.update(batch_size=-4), "args.batch_size=-4: expected an int >= 1"),
    (lambda args: args.pop("n"), "args.n is missing: expected an int >= 1"),
    (lambda args: args.update(batch_size=True), "args.batch_size=True: expected an int >= 1"),
    (lambda args: args.update(n=8.0), "args.n=8.0: expected an int >= 1"),
    (lambda args: args.update(sample_shape=[2, 0]), r"args.sample_shape=\[2, 0\]: expected a list of ints >= 1"),
    (lambda args: args.pop("sample_shape"), "args.sample_shape is missing"),
])
def test_load_samples_names_the_bad_field_of_a_manifest(tmp_path, edit, says):
    sde = sd.VPSDE.linear()
    sd.sample_to_disk(sd.GaussianMixture.ring2d(sde), sde, 8, tmp_path, sample_shape=(2,), batch_size=4,
                      solver="ddim", steps=2, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    edit(manifest["args"])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=f"^{re.escape(str(tmp_path / 'manifest.json'))}: {says}"):
        sd.load_samples(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=says):
        sd.load_samples(tmp_path, partial=True)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 8 GiB\n"
                           "of which ..."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 800000000000 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 800000000000 bytes."),
    MemoryError(),
], ids=["cuda", "cpu", "cpu-windows", "python"])
def test_running_out_of_memory_is_one_line_naming_what_to_lower(tmp_path, monkeypatch, capsys, error):
    def runs_out(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "sample", runs_out)
    assert cli.main(["sample", "--model", "mixture", "--n", "100000000", "--out", str(tmp_path / "x.npy")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("scoresde sample: error: out of memory (") and "lower --n (now 100000000)" in line
    monkeypatch.setattr(loop, "train", runs_out)
    assert cli.main(train_argv(tmp_path / "run")) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("scoresde train: error: out of memory (") and "lower batch_size" in line

    def breaks(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(cli, "sample", breaks)  # another RuntimeError is not taken for running out of memory
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli.main(["sample", "--model", "mixture", "--n", "4", "--out", str(tmp_path / "x.npy")])


# ---- many processes ----------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environ(pid: str) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().partition("=")[::2] for item in f.read().split(b"\0") if item)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_sigint_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """torchrun, two CPU processes: SIGINT to rank 1 alone. The stop request is all-reduced, so both ranks
    save together (the save gathers both ranks' RNG states) and stop at the same step; --resume continues."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    child = subprocess.Popen([*launch, "--master_port", str(_free_port()), "-m", "scoresde.cli",
                              *train_argv(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(out) >= 3, child)
    ranks = subprocess.run(["pgrep", "-P", str(child.pid)], capture_output=True, text=True).stdout.split()
    (rank_1,) = [int(pid) for pid in ranks if _environ(pid).get("RANK") == "1"]
    reached = logged_steps(out)
    os.kill(rank_1, signal.SIGINT)
    stdout, stderr = child.communicate(timeout=240)
    assert child.returncode != 0
    (line,) = lines_of(stderr, "scoresde train:")  # rank 0's, though rank 1 got the signal
    found = ckpt.load_checkpoint(out)
    assert f"at step {found.step}; checkpoint saved: {found.path}" in line and "(under torchrun" in line
    assert len(found.state["processes"]) == 2 and found.step >= reached
    resumed = subprocess.run([*launch, "--master_port", str(_free_port()), "-m", "scoresde.cli",
                              *train_argv(out, "--resume", steps=found.step + 2)],
                             env=ENV, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {found.path} at step {found.step}" in resumed.stdout
    assert ckpt.load_checkpoint(out).step == found.step + 2
    print(f"\nSIGINT to rank 1 of 2 after {reached} logged steps: both ranks stopped at step {found.step} and "
          f"saved it together; resumed to {found.step + 2}")
