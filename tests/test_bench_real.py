"""The real-network part of the benchmark suite (`scoresde bench --only real`): a tiny run writes
its rows, floor, tables and plots; the floor is `evaluate.floor`'s; every row makes exactly the
model calls it was asked for; the tuned rows sample on the shipped grids' times. No quality or
timing thresholds: those are the benchmark's to report."""
import json
import math

import pytest
import torch
from PIL import Image

import scoresde as sd
from scoresde import evaluate
from scoresde.bench import real, suite
from scoresde.bench.report import Env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_real")
    assert suite.run_parts({"real": "tiny"}, out=out, threads=1, profile="tiny") == 0
    return out, json.loads((out / "results.json").read_text())


def test_tiny_run_writes_rows_floor_tables_and_plots(tiny_run):
    out, results = tiny_run
    summary, opts = results["real"], real.options("tiny", None)
    samplers = {r["sampler"] for r in summary["rows"]}
    assert {*opts.solvers, "unipc (tuned)"} <= samplers
    if results["meta"]["versions"]["diffusers"]:
        assert "diffusers DPMSolverMultistep" in samplers
    for r in summary["rows"]:
        assert r["n"] == opts.n and r["ms_per_sample"] > 0 and math.isfinite(r["frechet"]), r
        assert 0 <= r["precision"] <= 1 and 0 <= r["replication_share"] <= 1, r
        assert r["frechet_matched"] is None  # n = 40 < 360 held-out digits: no distance comparable to the floor
    assert summary["metric"] == "frechet"
    assert set(results["meta"]["plots"]) == {"real_fd_time.png", "real_fd_nfe.png"}
    text = (out / "results.md").read_text()
    assert "## Quality against time on the digits network" in text and "### NFE 5" in text
    assert "### Best per NFE" in text
    assert "| **floor (held-out real digits)** | floor |" in text
    assert "training-split digits only" in text
    for sampler in samplers:
        assert f"| {sampler} |" in text
    for name in results["meta"]["plots"]:
        assert f"]({name})" in text
        with Image.open(out / name) as png:
            png.load()
            assert png.format == "PNG" and min(png.size) > 100


def test_floor_row_is_evaluate_floor(tiny_run):
    _, results = tiny_run
    floor = results["real"]["floor"]
    ref = evaluate.reference("digits")
    expected = evaluate.floor(ref)
    for key in real.METRICS:
        assert floor[key] == pytest.approx(getattr(expected, key), rel=1e-9), key
    assert floor["n"] == len(ref.held_x) == 360 and floor["threshold"] == pytest.approx(ref.threshold)
    assert floor["train_count"] + floor["held_count"] == 1797


def test_rows_make_the_requested_calls_and_tuned_rows_use_the_shipped_times(tiny_run):
    _, results = tiny_run
    rows = results["real"]["rows"]
    for r in rows:
        assert r["nfe"] == r["nfe_budget"], r
    grids = {path.name: sd.TunedGrid.load(path) for path in sd.load_model(None).tuned_grids()}
    (tuned,) = [r for r in rows if r["kind"] == "tuned"]
    grid = grids[tuned["grid"]]
    assert tuned["nfe"] == grid.nfe == 5 and tuned["solver"] == grid.solver
    assert torch.equal(torch.tensor(tuned["times"], dtype=torch.float64), grid.times)
    (fixed,) = [r for r in rows if r["sampler"] == grid.solver]  # the same solver on its default grid
    assert fixed["grid"] == sd.SOLVERS[grid.solver].grid and fixed["steps"] == tuned["steps"]


def test_full_profile_skips_budgets_a_solver_cannot_meet_exactly():
    """heun (2 calls a step + the final one) has no NFE-10 row, rk4 none at 10, 20 or 50, diffusers'
    Heun only odd budgets; the NFE-8 tuned grid brings its solver's default-grid row; every row of
    the units starts from the same x_T."""
    assert real.exact_steps("heun", 5) == 2 and real.exact_steps("heun", 10) == 0
    assert real.exact_steps("dpm_solver_3", 5) == 0 and real.exact_steps("dpm_solver_3", 10) == 3
    assert [real.exact_steps("rk4", nfe) for nfe in (5, 10, 20, 50)] == [1, 0, 0, 0]
    env = Env(torch.device("cpu"), peers={"diffusers": object()})
    labels = [label for label, _ in real.units(real.options("full", env), env)]
    assert "real NFE 5: heun" in labels and "real NFE 10: heun" not in labels
    assert "real NFE 5: diffusers HeunDiscrete" in labels and "real NFE 10: diffusers HeunDiscrete" not in labels
    assert "real NFE 50: diffusers DDPM" in labels
    assert [x for x in labels if x.startswith("real NFE 8:")] == ["real NFE 8: unipc", "real NFE 8: unipc (tuned)"]
    assert not any(sd.SOLVERS[name].adaptive for name in (x.split(": ")[1] for x in labels if ": " in x)
                   if name in sd.SOLVERS)
    digits = real._Digits(real.RealOptions(n=3), torch.device("cpu"))
    assert torch.equal(digits.start()[0], digits.start()[0])


def test_missing_diffusers_is_said(tiny_run):
    env = Env(torch.device("cpu"), peers={"diffusers": None})
    opts = real.options("tiny", env)
    assert not any("diffusers" in label for label, _ in real.units(opts, env))
    _, results = tiny_run
    ours = [r for r in results["real"]["rows"] if r["library"] != "diffusers"] + [results["real"]["floor"]]
    summary = real.summarize(ours, opts)
    assert summary["diffusers_skipped"]
    assert "diffusers' rows: skipped" in "\n".join(real.markdown(summary))
