"""The training loop: exact resume, DDP on CPU with gloo, NaN steps, bad input, the CLI around it."""
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from scoresde import checkpoint as ckpt
from scoresde.train import loop
from scoresde.train.config import apply_overrides, preset


def tiny(tmp_path, name="run", **overrides):
    """A few-second run: the tiny UNet on the digits, everything small."""
    items = ["model=tiny", "batch_size=16", "steps=6", "warmup=2", "log_every=2", "sample_every=1000",
             "ckpt_every=3", "sample_n=4", "sample_steps=2", "cond_drop=0.1"]
    config = apply_overrides(preset("digits"), items + [f"{k}={v}" for k, v in overrides.items()])
    config.out = str(tmp_path / name)
    return config




def final_weights(root):
    found = ckpt.load_checkpoint(root)
    return found.step, found.model_state, found.ema_state, found.state["optimizer"]


def test_a_stopped_and_resumed_run_ends_with_the_same_weights(tmp_path):
    """CPU, fixed seed: 6 steps straight, against 3 steps, a stop, and --resume to 6. Data order,
    t/eps/label-dropout noise, dropout, optimiser moments and EMA must all continue exactly."""
    loop.train(tiny(tmp_path, "straight"))
    loop.train(tiny(tmp_path, "stopped", steps=3))
    loop.train(tiny(tmp_path, "stopped", steps=6), resume=True)
    step_a, model_a, ema_a, opt_a = final_weights(tmp_path / "straight")
    step_b, model_b, ema_b, opt_b = final_weights(tmp_path / "stopped")
    assert step_a == step_b == 6
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
        assert torch.equal(ema_a[name], ema_b[name]), name
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for k in opt_a["state"]:
        assert torch.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"])


def test_resume_without_the_same_rng_would_differ(tmp_path):
    """The exactness above is not vacuous: another seed gives other weights."""
    loop.train(tiny(tmp_path, "a", steps=3))
    loop.train(tiny(tmp_path, "b", steps=3, seed=1))
    _, model_a, _, _ = final_weights(tmp_path / "a")
    _, model_b, _, _ = final_weights(tmp_path / "b")
    assert any(not torch.equal(model_a[k], model_b[k]) for k in model_a)


def test_resume_refuses_another_architecture(tmp_path):
    loop.train(tiny(tmp_path, "run", steps=3))
    other = tiny(tmp_path, "run", steps=6)
    other.model_overrides = {"base_channels": 8, "num_groups": 4}
    with pytest.raises(ckpt.CheckpointError, match="base_channels"):
        loop.train(other, resume=True)
    assert ckpt.load_checkpoint(tmp_path / "run").step == 3  # nothing lost


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    """A NaN loss skips its step with a warning; after max_nan_steps in a row the run stops with a
    clear message, and the last good checkpoint is still there."""
    real = loop.diffusion_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(loop, "diffusion_loss", flaky)
    config = tiny(tmp_path, steps=10, max_nan_steps=3)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(FloatingPointError, match="in a row"):
        warnings.simplefilter("always")
        loop.train(config)
    assert sum("step skipped" in str(w.message) for w in caught) == 3
    assert ckpt.load_checkpoint(config.out).step == 3


def test_batch_larger_than_the_data_is_refused(tmp_path):
    config = tiny(tmp_path, data="moons", model="toy2d", batch_size=64)
    config.data = str(tmp_path / "small.npy")
    np.save(config.data, np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32))
    with pytest.raises(ValueError, match="batch"):
        loop.train(config)


def test_missing_data_path_is_named(tmp_path):
    config = tiny(tmp_path, data=str(tmp_path / "nowhere"))
    with pytest.raises((ValueError, FileNotFoundError), match="nowhere"):
        loop.train(config)


def test_shape_mismatch_between_preset_and_data(tmp_path):
    config = tiny(tmp_path, data="moons")
    with pytest.raises(ValueError, match="shape"):
        loop.train(config)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # over 5 s: in the slow run, to keep the default run within its budget
def test_two_processes_with_gloo(tmp_path):
    """torchrun with two CPU processes: DDP over gloo on loopback, rank 0 writes, resume works."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for steps, extra in ((2, []), (4, ["--resume"])):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                   "-m", "scoresde.cli", "train", "--preset", "toy2d", "--out", str(out), "--device", "cpu",
                   *extra, "--set", "batch_size=32", "warmup=2", "log_every=2", "sample_every=1000",
                   "ckpt_every=2", "model.hidden=32", f"steps={steps}"]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-3000:]
    found = ckpt.load_checkpoint(out)
    assert found.step == 4 and len(found.state["processes"]) == 2
    assert all(torch.isfinite(v).all() for v in found.model_state.values())
    assert "resumed from" in run.stdout


def test_cli_samples_a_checkpoint_in_data_units(tmp_path, capsys):
    from scoresde.cli import main

    config = tiny(tmp_path, steps=2, ckpt_every=2)
    loop.train(config)
    assert main(["sample", "--model", config.out, "--n", "5", "--steps", "3", "--out", str(tmp_path / "x.npy")]) == 0
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (5, 1, 8, 8)
    printed = capsys.readouterr().out
    assert "NFE=7" in printed and "wall=" in printed
    assert main(["sample", "--model", config.out, "--n", "4", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    assert main(["sample", "--model", config.out, "--out", str(tmp_path / "g.txt")]) != 0


def test_cli_train_rejects_unknown_override(capsys):
    from scoresde.cli import main

    assert main(["train", "--preset", "digits", "--set", "stepz=3"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err


def test_cli_lists_presets_with_parameter_counts(capsys):
    from scoresde.cli import main

    assert main(["presets"]) == 0
    printed = capsys.readouterr().out
    assert "35.75M parameters" in printed and "digits" in printed and "toy2d" in printed
