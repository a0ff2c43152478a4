"""Learned time grids (`tune_grid`, `TunedGrid`): on exact models the tuned grid beats every fixed grid
of the same solver at the same number of model calls, on starting points it was not tuned on; files
keep every bit; a grid is refused for a run it was not tuned for."""
from __future__ import annotations

import json
import math

import pytest
import torch

import scoresde as sd
from scoresde.files import CheckpointError
from scoresde.grids import GRIDS, TunedGrid
from scoresde.tuning import _GridParameters, _times_at, tune_grid

F64 = torch.float64
SDE = sd.VPSDE.linear()
RING = sd.GaussianMixture.ring2d(SDE)
GAUSS = sd.Gaussian(SDE, [0.7, -0.4], 0.5)
FRESH = torch.randn(2000, 2, dtype=F64, generator=torch.Generator().manual_seed(99))  # never tuned on


def tuned(model, solver, nfe=5, **kw):
    kw = {"shape": (2,), "dtype": F64, "n": 128, "held_out": 128, "iterations": 60,
          "generator": torch.Generator().manual_seed(0), **kw}
    return tune_grid(model, SDE, solver=solver, nfe=nfe, **kw)


def fixed_grids(steps):
    return {name: grid(SDE, steps, SDE.T, SDE.t_min) for name, grid in GRIDS.items()}


def rms(x, reference):
    return float((x - reference).norm(dim=1).pow(2).mean().sqrt())


@pytest.mark.parametrize("solver", ["unipc", "dpm_solver_pp_2m"])
def test_a_tuned_grid_beats_every_fixed_grid_on_the_exact_gaussian_flow(solver):
    """Distance to the exact probability-flow map (then the exact denoiser at t_min), at 5 model calls."""
    exact = sd.Denoiser(GAUSS, SDE).x0(GAUSS.flow(FRESH, SDE.T, SDE.t_min), SDE.t_min)
    grid = tuned(GAUSS, solver)
    error = {name: rms(sd.sample(GAUSS, SDE, x_T=FRESH, solver=solver, grid=times), exact)
             for name, times in fixed_grids(grid.steps).items()}
    tuned_error = rms(sd.sample(GAUSS, SDE, x_T=FRESH, solver=solver, grid=grid), exact)
    assert tuned_error < 0.5 * min(error.values()), (tuned_error, error)


@pytest.mark.parametrize("solver", ["unipc", "dpm_solver_pp_2m"])
def test_a_tuned_grid_beats_every_fixed_grid_on_the_sharp_ring(solver):
    """The worst mode metric (stray mass, largest mode-weight error) and the distance to a tight
    solution from the same fresh x_T, at 5 model calls."""
    reference = sd.sample(RING, SDE, x_T=FRESH, solver="dopri5", rtol=1e-8, atol=1e-8)

    def scores(times):
        x = sd.sample(RING, SDE, x_T=FRESH, solver=solver, grid=times)
        report = RING.mode_report(x)
        return max(report["stray"], float((report["weights"] - RING.weights).abs().max())), rms(x, reference)

    grid = tuned(RING, solver)
    fixed = {name: scores(times) for name, times in fixed_grids(grid.steps).items()}
    worst, transport = scores(grid)
    assert worst < 0.8 * min(f[0] for f in fixed.values()), (worst, fixed)
    assert transport < min(f[1] for f in fixed.values()), (transport, fixed)


def test_the_record_says_what_was_tuned_and_how():
    grid = tuned(RING, "ddim", iterations=20)
    assert grid.solver == "ddim" and grid.nfe == 5 and grid.steps == 4 and len(grid.loss) == 20
    assert grid.times.dtype == F64 and grid.times[0] == SDE.T and bool((grid.times.diff() < 0).all())
    assert grid.validation["tuned"] <= min(grid.validation["fixed"].values())
    assert grid.validation["initial"] in GRIDS and "dopri5" in grid.teacher and grid.seconds > 0


def test_saved_and_loaded_grids_sample_bit_for_bit(tmp_path):
    grid = tuned(RING, "unipc", iterations=10)
    loaded = TunedGrid.load(grid.save(tmp_path / "grid.json"))
    assert torch.equal(loaded.times, grid.times) and loaded.identity() == grid.identity()
    assert loaded.loss == grid.loss and loaded.validation == grid.validation
    x_T = FRESH[:64]
    assert torch.equal(sd.sample(RING, SDE, x_T=x_T, solver="unipc", grid=loaded),
                       sd.sample(RING, SDE, x_T=x_T, solver="unipc", grid=grid.times))


@pytest.mark.parametrize("run,named", [
    (dict(solver="dpm_solver_pp_2m"), "solver: saved 'unipc', this run 'dpm_solver_pp_2m'"),
    (dict(solver="unipc", order=3), "options.order: saved 2, this run 3"),
    (dict(solver="unipc", final_denoise=False), "nfe: saved 5, this run 4"),
    (dict(solver="unipc", sde=sd.VPSDE.cosine()), "schedule: saved 'LinearSchedule"),
])
def test_a_tuned_grid_is_refused_for_another_run(run, named):
    grid = tuned(RING, "unipc", iterations=2)
    sde = run.pop("sde", SDE)
    with pytest.raises(ValueError, match="grid: a TunedGrid for another run") as caught:
        sd.sample(RING, sde, x_T=FRESH[:8], grid=grid, **run)
    assert named in str(caught.value)


def test_two_chains_of_one_length_are_told_apart():
    a = sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 100, dtype=F64))
    b = sd.VPSDE.from_betas(torch.linspace(1e-4, 0.03, 100, dtype=F64))
    assert repr(a) == repr(b) and sd.grids.schedule_id(a) != sd.grids.schedule_id(b)


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.update(format="other"), "format 'other'"),
    (lambda r: r.pop("nfe"), r"fields \['nfe'\] unknown or missing"),
    (lambda r: r.update(times=[0.1, 0.5]), "strictly decreasing"),
    (lambda r: r.update(times="1.0"), "times must be a list"),
    (lambda r: r.update(nfe=True), r"field\(s\) \['nfe'\] of the wrong type"),
])
def test_a_damaged_grid_file_is_refused_naming_it(tmp_path, edit, message):
    path = TunedGrid(torch.tensor([1.0, 0.5, 1e-3], dtype=F64), "ddim", {"eta": 0.0}, 3, "s").save(tmp_path / "g.json")
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=message):
        TunedGrid.load(path)


def test_the_grid_parameters_keep_any_grid_valid():
    """Whatever the parameters, the times start at T exactly, fall strictly and end in [t_min, T)."""
    grid = _GridParameters(SDE, GRIDS["log_snr"](SDE, 6, SDE.T, SDE.t_min), SDE.t_min)
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        with torch.no_grad():
            grid.shares.copy_(5 * torch.randn(6, generator=g, dtype=F64))
            grid.log_span.copy_(4 * torch.randn((), generator=g, dtype=F64))
        times = grid().detach()
        assert times[0] == SDE.T and bool((times.diff() < 0).all()) and times[-1] >= SDE.t_min * (1 - 1e-12)


@pytest.mark.parametrize("sde", [SDE, sd.VPSDE.cosine(), sd.VPSDE.from_betas(SDE.discretize(1000))],
                         ids=["linear", "cosine", "chain"])
def test_the_times_are_differentiable_in_lambda_for_every_schedule(sde):
    lam = torch.tensor([-3.0, 0.5, 4.0], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(_times_at(sde, lam).sum(), lam)
    h = 1e-6
    numeric = (sde.t_from_log_snr(lam.detach() + h) - sde.t_from_log_snr(lam.detach() - h)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=0)
    torch.testing.assert_close(_times_at(sde, lam).detach(), sde.t_from_log_snr(lam.detach()), rtol=0, atol=0)


# ---- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,error,message", [
    (dict(solver="dopri5"), ValueError, "adaptive solver"),
    (dict(solver="ancestral"), ValueError, "draws noise"),
    (dict(solver="ddim", eta=1.0), ValueError, "draws noise"),
    (dict(solver="dpm_solver_2", nfe=4), ValueError, r"makes \[3, 5.*model calls"),
    (dict(solver="ddim", nfe=1), ValueError, "nfe=1"),
    (dict(solver="ddim", loss="huber"), ValueError, "loss='huber'"),
    (dict(solver="ddim", radius=-1.0), ValueError, "radius"),
    (dict(solver="ddim", shape=None), ValueError, "shape=None"),
    (dict(solver="nope"), ValueError, "solver='nope' is unknown"),
])
def test_bad_input_is_refused_before_any_model_call(kw, error, message):
    kw = {"nfe": 5, "shape": (2,), **kw}
    if "eta" in kw:
        kw["options"] = {"eta": kw.pop("eta")}

    def never(x, t):
        raise AssertionError("called despite bad input")

    with pytest.raises(error, match=message):
        tune_grid(never, SDE, **kw)


def test_a_teacher_no_better_than_the_student_is_warned_about():
    with pytest.warns(UserWarning, match="no reference"):
        tuned(RING, "ddim", iterations=1, teacher={"solver": "ddim", "steps": 3})


class NaNLater:
    """The ring's eps, until `calls` model calls have been made; NaN after."""

    def __init__(self, calls):
        self.left = calls

    def __call__(self, x, t):
        self.left -= 1
        return RING(x, t) if self.left >= 0 else torch.full_like(x, math.nan)


def test_a_nan_loss_stops_tuning_and_keeps_the_best_grid():
    # the teacher (one dopri5 solve) and the four fixed grids' held-out runs come first
    probe = NaNLater(10**9)
    tuned(probe, "ddim", iterations=1)
    before_tuning = 10**9 - probe.left - 10  # the teacher and the fixed grids; not the iteration nor its check
    with pytest.warns(UserWarning, match="the loss became nan at iteration 1; stopped"):
        grid = tuned(NaNLater(before_tuning), "ddim", iterations=50)
    assert len(grid.loss) == 1 and torch.equal(grid.times, GRIDS[grid.validation["initial"]](SDE, 4, SDE.T, SDE.t_min))


# ---- the command line -----------------------------------------------------------------------------------
def test_tune_then_sample_with_the_grid_from_the_command_line(tmp_path, capsys):
    from scoresde import cli

    grid_file = tmp_path / "g.json"
    assert cli.main(["tune", "--model", "mixture", "--solver", "unipc", "--nfe", "5", "--n", "16", "--iterations", "2",
                     "--out", str(grid_file)]) == 0
    assert "tuned unipc at NFE 5 (4 steps)" in capsys.readouterr().out
    out = tmp_path / "x.npy"
    assert cli.main(["sample", "--model", "mixture", "--solver", "unipc", "--grid", str(grid_file), "--n", "8",
                     "--out", str(out)]) == 0
    assert "NFE=5" in capsys.readouterr().out
    tuned = TunedGrid.load(grid_file)
    expected = sd.sample(RING, SDE, shape=(8, 2), solver="unipc", grid=tuned.times,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.from_numpy(__import__("numpy").load(out)), expected)
    # another solver, another model: refused, naming what differs
    assert cli.main(["sample", "--model", "mixture", "--solver", "dpm_solver_pp_2m", "--grid", str(grid_file),
                     "--out", str(out)]) == 2
    assert "solver: saved 'unipc', this run 'dpm_solver_pp_2m'" in capsys.readouterr().err
    assert cli.main(["sample", "--solver", "unipc", "--grid", str(grid_file), "--out", str(out)]) == 2
    assert "tuned for the model 'mixture ring2d', not this one ('digits sha256:" in capsys.readouterr().err
    assert cli.main(["sample", "--model", "mixture", "--grid", "nope", "--out", str(out)]) == 2
    assert "--grid 'nope': expected one of karras" in capsys.readouterr().err


@pytest.mark.parametrize("nfe", [5, 8, 10])
def test_the_shipped_model_ships_tuned_grids_that_sample_picks_by_step_count(tmp_path, capsys, nfe):
    from scoresde import cli

    model = sd.load_model()
    grids = {TunedGrid.load(path).nfe: TunedGrid.load(path) for path in model.tuned_grids()}
    tuned = grids[nfe]
    assert tuned.solver == "unipc" and tuned.model == model.identity()
    assert tuned.validation["tuned"] <= min(tuned.validation["fixed"].values())
    out = tmp_path / "x.npy"
    assert cli.main(["sample", "--solver", "unipc", "--steps", str(tuned.steps), "--n", "4", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"the tuned grid shipped with the model (unipc-nfe{nfe}.json: unipc at NFE {nfe})" in said
    assert f"NFE={nfe}" in said
    assert cli.main(["sample", "--solver", "unipc", "--steps", str(tuned.steps), "--grid", "log_snr", "--n", "4",
                     "--out", str(out)]) == 0
    assert "tuned grid shipped" not in capsys.readouterr().out


def test_batches_and_ctrl_c_keep_the_best_grid(monkeypatch):
    """Gradient steps on batches of the starting points; Ctrl-C in an iteration returns the best grid so far."""
    grid = tuned(RING, "unipc", batch=32, iterations=2)
    assert len(grid.loss) == 2 and all(math.isfinite(v) for v in grid.loss)
    import scoresde.tuning as tuning

    calls = {"n": 0}
    one_pass = tuning._one_pass

    def interrupted_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return one_pass(*args)

    monkeypatch.setattr(tuning, "_one_pass", interrupted_second)
    with pytest.warns(UserWarning, match="interrupted in iteration 2; returning the best grid so far"):
        grid = tuned(RING, "unipc", iterations=10)
    assert len(grid.loss) == 1 and grid.times[0] == SDE.T and bool((grid.times.diff() < 0).all())
