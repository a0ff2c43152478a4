"""Every script in examples/ runs as a newcomer would run it, and what it writes and prints makes sense:
the PNGs decode at their size with something drawn in them, the printed numbers (NFE, fitted orders,
mode weights, bits/dim, how close samples land to the data) sit where a working example puts them
and where a broken one does not."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TESTED = ("compare_solvers", "diffusers_unet", "custom_solver", "digits_bpd", "toy2d_trajectories", "any_model")


def run_example(name: str, out: Path) -> str:
    """Run examples/NAME.py --out OUT in OUT's folder; return its stdout (stderr shown on failure)."""
    # One intra-op thread, as the rest of the suite runs: these small models gain nothing from more,
    # and on a shared 2-core machine extra threads only contend.
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--out", str(out)],
                          check=False, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name}.py failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert out.exists(), f"{name}.py did not write {out}"
    return proc.stdout


def check_png(path: Path, size: tuple[int, int]):
    """The PNG decodes, has the size the example fixes, and is not one flat colour."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 10, "the picture is (almost) blank"


def numbers_after(label: str, text: str) -> list[float]:
    """The numbers on the line that starts (after spaces) with `label`."""
    match = re.search(rf"^\s*{re.escape(label)}(.*)$", text, re.MULTILINE)
    assert match, f"no line starting with {label!r} in:\n{text}"
    return [float(v) for v in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", match.group(1))]


def test_every_example_is_tested_and_documented():
    """A new example without a test here fails; each says what it shows and how to run it."""
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(TESTED)
    for name in TESTED:
        source = (EXAMPLES / f"{name}.py").read_text()
        doc = ast.get_docstring(ast.parse(source))
        assert doc and f"python examples/{name}.py" in doc, f"{name}.py: docstring must show how to run it"
        assert '"--out"' in source


def test_compare_solvers(tmp_path):
    out = tmp_path / "solvers.png"
    stdout = run_example("compare_solvers", out)
    for solver in ("ddim", "dpm_solver_pp_2m", "unipc"):
        steps, nfe, _, mean_pixel, _ = numbers_after(solver, stdout)
        assert (steps, nfe) == (9, 10)  # a budget of 10 calls: 9 steps + the final denoising step
        # Real digits average 4.88 on the 0..16 scale; samples left in model units ([-1, 1]) or
        # mapped with a wrong affine land far outside this band.
        assert 3.5 < mean_pixel < 6.5, stdout
    check_png(out, (900, 350))


@pytest.mark.slow  # ~8 s: imports diffusers and runs its UNet
def test_diffusers_unet(tmp_path):
    pytest.importorskip("diffusers")  # in the test extra; the example itself exits with a message
    out = tmp_path / "numbers.json"
    stdout = run_example("diffusers_unet", out)
    assert "UNet2DOutput" in stdout  # diffusers' own return type, which the Denoiser unwraps
    report = json.loads(out.read_text())
    # The Denoiser at t = 500/1000 calls the UNet with index 499: the very same call.
    assert report["index_call_difference"] < 1e-6
    calls_per_step = {"ddim": 1, "dpm_solver_pp_2m": 1, "heun": 2}
    assert set(report["runs"]) == set(calls_per_step)
    for solver, run in report["runs"].items():
        assert run["nfe"] == run["steps"] * calls_per_step[solver] + 1
        assert run["shape"] == [4, 3, 16, 16]
        assert run["finite"] and run["seconds"] > 0


def test_custom_solver(tmp_path):
    out = tmp_path / "order.png"
    stdout = run_example("custom_solver", out)
    # Fitted orders against the exact Gaussian flow: bands of +-0.25, so a first-order (or broken)
    # Adams-Bashforth step fails, and the built-in references confirm the measurement itself.
    for solver, order in (("euler", 1), ("ab2", 2), ("heun", 2)):
        assert abs(numbers_after(f"{solver} ", stdout)[0] - order) < 0.25, stdout
    assert numbers_after("ring2d, ab2,", stdout)[:2] == [50, 51]  # 50 steps, 1 call each + final
    weights = np.array(numbers_after("mode weights", stdout))
    truth = np.array(numbers_after("true weights", stdout))
    np.testing.assert_allclose(truth, np.arange(1, 7) / 21, atol=1e-3)
    # 4000 samples: the standard error of a weight is at most 0.0072, so 0.03 is > 4 of them.
    assert np.abs(weights - truth).max() < 0.03, stdout
    assert numbers_after("stray mass", stdout)[0] < 0.01
    spread = np.array(numbers_after("spread ratio", stdout)[:6])
    assert ((spread > 0.8) & (spread < 1.25)).all(), stdout
    check_png(out, (600, 450))


@pytest.mark.slow  # over 5 s: in the slow run, to keep the default run within its budget
def test_digits_bpd(tmp_path):
    out = tmp_path / "bpd.json"
    stdout = run_example("digits_bpd", out)
    assert "NOT a held-out likelihood" in stdout  # the caveat is said, not only written in the source
    report = json.loads(out.read_text())
    bpd = np.array(report["bpd"])
    assert bpd.shape == (64,) and np.isfinite(bpd).all()
    assert report["mean"] == pytest.approx(bpd.mean())
    assert report["std_error"] == pytest.approx(bpd.std(ddof=1) / np.sqrt(len(bpd)))
    # The shipped model scores about 2.1 bits/dim; uniform noise over the 17 levels scores 4.09, and a
    # wrong dequantization width or a dropped log2(8) offset moves the mean by a bit or more.
    assert 1.5 < report["mean"] < 2.7, report["mean"]
    assert numbers_after("bits/dim:", stdout)[:2] == pytest.approx([report["mean"], report["std_error"]], abs=1e-3)


@pytest.mark.slow
def test_toy2d_trajectories(tmp_path):
    out = tmp_path / "paths.png"
    stdout = run_example("toy2d_trajectories", out)
    assert numbers_after("moons:", stdout)[1] == 100  # paths per solver
    # Each line: states recorded (x_T, one per step, the final denoising step), then the share of
    # samples within 0.1 of a training point. The example's 1500 training steps put ~90 % there (the
    # data have unit scale); 150 steps put 58 % there, an untrained network none.
    for label, states in (("probability-flow ODE, heun, 20 steps:", 22),
                          ("reverse SDE, euler_maruyama, 100 steps:", 102)):
        recorded, _, within, *_ = numbers_after(label, stdout)
        assert recorded == states
        assert within >= 70, stdout
    check_png(out, (1200, 600))


def test_any_model(tmp_path):
    """Four conventions of one mixture, each through its adapter: the VP model's samples, to round-off."""
    out = tmp_path / "any.png"
    stdout = run_example("any_model", out)
    rows = re.findall(r"^(.+?)\s+dpm_solver_pp_2m NFE=(\d+) largest difference from the VP model: (\S+)$", stdout, re.M)
    assert [r[0] for r in rows] == ["sigma-denoiser", "flow matching", "VE score", "sub-VP eps"], stdout
    assert all(int(nfe) == 11 and float(gap) < 1e-10 for _, nfe, gap in rows), stdout
    check_png(out, (1280, 320))
