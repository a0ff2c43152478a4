"""The benchmark suite (`scoresde bench`): a tiny run writes everything it promises, its model-call
accounting holds up, and a missing peer is reported as skipped. No timing thresholds."""
import json
import math
import sys

import pytest
from PIL import Image

import scoresde as sd
from scoresde.bench import quality, speed, suite


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert suite.main(["--tiny", "--threads", "1", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_json_holds_the_run_and_every_fixed_step_solver(tiny_run):
    _, results = tiny_run
    meta = results["meta"]
    assert meta["command"].startswith("scoresde bench --tiny")
    assert meta["machine"]["cores"] >= 1 and meta["versions"]["torch"] and meta["date"]
    rows = results["speed"]["rows"]
    fixed = {r["solver"] for r in rows if r["library"] == "scoresde" and r["kind"] == "fixed"}
    assert fixed == {name for name, spec in sd.SOLVERS.items() if not spec.adaptive}
    assert {"diffusers", "torchsde", "torchdiffeq"} <= {r["library"] for r in rows}
    assert {r["problem"] for r in results["quality"]["verdicts"]} == {"ring2d", "mixture16d"}
    (train,) = results["train"]["rows"]
    assert train["images_per_s"] > 0 and 0 <= train["outside_forward_backward"] < 1


def test_model_calls_are_counted_as_the_solvers_make_them(tiny_run):
    """Our NFE is steps x calls per step; diffusers' Heun makes 2k - 1 calls for k timesteps."""
    _, results = tiny_run
    for r in results["speed"]["rows"]:
        if r["library"] == "scoresde" and r["kind"] == "fixed":
            per_step = sd.SOLVERS[r["solver"]].nfe_per_step
            assert r["nfe"] == max(1, r["nfe_budget"] // per_step) * per_step, r
        elif r["solver"] == "HeunDiscreteScheduler":
            assert r["nfe"] == 2 * ((r["nfe_budget"] + 1) // 2) - 1, r
        elif r["library"] == "diffusers":
            assert r["nfe"] == r["nfe_budget"], r


def test_ratios_are_finite_and_per_sample_times_consistent(tiny_run):
    """Every timing made it into the results; the ratio's size is the benchmark's to report, not a
    test's to assert (timings on a shared machine move by tens of percent). The call accounting the
    ratio rests on is checked in test_json_holds_the_run_and_every_fixed_step_solver."""
    _, results = tiny_run
    for r in results["speed"]["rows"]:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert math.isfinite(r["ratio_cpu"]) and r["ratio_cpu"] > 0, r
        assert r["ms_per_sample"] == pytest.approx(1e3 * r["seconds"] / r["batch"])
        assert r["ms_per_nfe"] == pytest.approx(1e3 * r["seconds"] / r["nfe"])


def test_plots_decode_and_markdown_has_the_tables(tiny_run):
    out, results = tiny_run
    assert set(results["meta"]["plots"]) == {"quality_ring2d.png", "quality_mixture16d.png", "speed.png"}
    for name in results["meta"]["plots"]:
        with Image.open(out / name) as png:
            png.load()
            assert png.format == "PNG" and min(png.size) > 100
    text = (out / "results.md").read_text()
    for heading in ("### ring2d", "### Verdict", "## Sampling speed", "### tiny, batch 2, NFE 2",
                    "### tiny, batch 2, adaptive solvers", "## Training throughput"):
        assert heading in text
    table_rows = [line for line in text.splitlines() if line.startswith("| scoresde | ")]
    assert len(table_rows) == sum(r["library"] == "scoresde" for r in results["speed"]["rows"])
    for name in results["meta"]["plots"]:
        assert f"]({name})" in text


def test_tuned_grid_rows_are_labelled_and_set_against_the_best_fixed_grid(tiny_run):
    """Every solver the tiny profile tunes has a "<solver> (tuned)" row per problem and NFE budget, at the
    model calls of its fixed-grid row; per problem and NFE the summary and results.md give the ratio of
    the best tuned sampler's score to the best fixed-grid sampler's; the libraries' verdict stays on
    fixed grids."""
    out, results = tiny_run
    summary, opts = results["quality"], quality.options("tiny", None)
    assert opts.tuned and opts.tune_iterations <= 10  # the tiny profile tunes, and cheaply
    rows = summary["rows"]
    cases = {(p, nfe) for p in ("ring2d", "mixture16d") for nfe in opts.nfe}
    for problem, nfe in cases:
        tuned = {r["sampler"]: r for r in rows if r["problem"] == problem and r.get("nfe_budget") == nfe
                 and r.get("tuned")}
        assert set(tuned) == {f"{name} (tuned)" for name in opts.tuned}, (problem, nfe, set(tuned))
        for label, r in tuned.items():
            (fixed,) = [f for f in rows if f["problem"] == problem and f.get("nfe_budget") == nfe
                        and f["sampler"] == label.removesuffix(" (tuned)")]
            assert r["nfe"] == fixed["nfe"] and r["tune_seconds"] > 0 and math.isfinite(r["transport"]), r
            steps = quality.fixed_steps(sd.SOLVERS[fixed["sampler"]], nfe)
            assert len(r["times"]) == steps + 1 and r["tune_start"] in sd.GRIDS
    comparisons = summary["tuned_vs_fixed"]
    assert {(c["problem"], c["nfe"]) for c in comparisons} == cases
    text = (out / "results.md").read_text()
    assert "### Tuned grids against fixed grids" in text
    for c in comparisons:
        assert c["tuned"].endswith(" (tuned)") and not c["fixed"].endswith(" (tuned)")
        assert math.isfinite(c["ratio"]) and c["ratio"] == pytest.approx(c["tuned_score"] / c["fixed_score"])
        assert f"| {c['problem']} | {c['nfe']} | {c['fixed']} |" in text and f"| {c['ratio']:.2f} |" in text
    assert not any(v["ours"].endswith(" (tuned)") for v in summary["verdicts"])


def test_a_missing_peer_is_reported_as_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    assert suite.main(["--tiny", "--only", "quality", "--out", str(tmp_path)]) == 0
    assert "skipped peer diffusers" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["meta"]["skipped_peers"]) == {"diffusers"}
    assert not any(r["sampler"].startswith("diffusers") for r in results["quality"]["rows"])
    assert "diffusers (cannot import it" in (tmp_path / "results.md").read_text()
    assert "speed" not in results and "train" not in results


def test_speed_cases_leave_out_what_is_missing():
    setting = speed.Setting("tiny", 1, (2,), adaptive=("dopri5",))
    env = type("Env", (), {"peers": {"diffusers": None, "torchsde": None, "torchdiffeq": None}})()
    libraries = {c.library for c in speed.cases(setting, env)}
    assert libraries == {"scoresde"}


def test_bad_arguments_are_refused_at_the_door(tmp_path, capsys):
    assert suite.main(["--tiny", "--device", "nonsense", "--out", str(tmp_path)]) == 2
    assert "device='nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.main(["--threads", "0"])
    with pytest.raises(SystemExit):
        suite.main(["--only", "everything"])
