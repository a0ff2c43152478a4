"""Image-to-image (SDEdit, Meng et al. 2022): `sd.sample(..., x_start=images, t_start=t)` noises the
images to t through the forward marginal, alpha(t) x_start + sigma(t) eps, and runs the solver from t.
Checked on exact models: the Gaussian's closed-form flow and posterior, the ring's responsibilities."""
from __future__ import annotations

import math

import pytest
import torch

import scoresde as sd
from scoresde.grids import TunedGrid, schedule_id

F64 = torch.float64
SDE = sd.VPSDE.linear()
RING = sd.GaussianMixture.ring2d(SDE)
MEAN, STD = torch.tensor([0.7, -0.4], dtype=F64), 0.5
GAUSS = sd.Gaussian(SDE, MEAN, STD)
# Points off the data (one on its mean), each repeated: the start is fixed, eps varies.
STARTS = torch.tensor([[2.0, 1.0], [-1.5, 0.3], [0.0, 0.0], [0.7, -0.4]], dtype=F64).repeat(8, 1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def coefficients(t) -> tuple[float, float]:
    """alpha(t), sigma(t) as `sample` computes them (host floats of the float64 schedule)."""
    return tuple(torch.cat(SDE.alpha_sigma(torch.tensor([t], dtype=F64))).tolist())


def gaussian_terms(t, u):
    """alpha, sigma and r = sqrt(alpha^2 s^2 + sigma^2) at t and u (float64 scalars)."""
    alpha, sigma = SDE.alpha_sigma(torch.tensor([t, u], dtype=F64))
    return alpha, sigma, torch.sqrt(alpha**2 * STD**2 + sigma**2)


def nearest_mode(x):
    return (x[:, None, :].to(F64) - RING.means[None]).pow(2).sum(-1).argmin(1)


# 1. exactness on a Gaussian --------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["dopri5", "rk45"])
def test_ode_sdedit_is_the_exact_gaussian_flow_map_of_the_noised_start(solver):
    """Data N(m, s^2 I): x_t ~ N(alpha m, r_t^2 I), r^2 = alpha^2 s^2 + sigma^2, and the probability-flow
    map from t to u is affine, x_u = alpha_u m + (r_u / r_t)(x_t - alpha_t m) (u = 0: m + (s / r_t)(x_t -
    alpha_t m)). So the ODE SDEdit sample is that map applied to alpha_t x_start + sigma_t eps, with eps
    the generator's first draw; written out here, and `Gaussian.flow` agrees."""
    t, u = 0.5, 1e-3
    x, info = sd.sample(GAUSS, SDE, x_start=STARTS, t_start=t, t_end=u, solver=solver, rtol=1e-9, atol=1e-9,
                        final_denoise=False, generator=gen(3), return_info=True)
    eps = torch.randn(STARTS.shape, dtype=F64, generator=gen(3))
    (alpha_t, alpha_u), (sigma_t, _), (r_t, r_u) = gaussian_terms(t, u)
    x_t = alpha_t * STARTS + sigma_t * eps
    exact = alpha_u * MEAN + (r_u / r_t) * (x_t - alpha_t * MEAN)
    torch.testing.assert_close(GAUSS.flow(x_t, t, u), exact, rtol=0, atol=1e-14)
    assert (x - exact).abs().max() < 1e-7
    assert info.t_start == t and info.times.tolist() == [t, u]


def test_reverse_sde_sdedit_has_the_gaussian_posterior_law():
    """The reverse SDE from x_t draws x_u ~ p(x_u | x_t): for Gaussian data, mean alpha_u m + c (x_t -
    alpha_t m) and variance r_u^2 - c alpha_t|u r_u^2, c = alpha_t|u r_u^2 / r_t^2; averaged over x_t ~
    N(alpha_t x_start, sigma_t^2 I): mean alpha_u m + c alpha_t (x_start - m), variance that + c^2 sigma_t^2.
    (The ODE's law differs: mean slope alpha_t r_u / r_t, variance (r_u sigma_t / r_t)^2.)"""
    t, u, n = 0.4, 1e-3, 4000
    start = torch.tensor([[1.5, 0.5]], dtype=F64)
    x = sd.sample(GAUSS, SDE, x_start=start.expand(n, 2).clone(), t_start=t, t_end=u, solver="ancestral",
                  steps=200, final_denoise=False, generator=gen(5))
    (alpha_t, alpha_u), (sigma_t, _), (r_t, r_u) = gaussian_terms(t, u)
    c = (alpha_t / alpha_u) * r_u**2 / r_t**2
    mean = alpha_u * MEAN + c * alpha_t * (start[0] - MEAN)
    var = r_u**2 - c * (alpha_t / alpha_u) * r_u**2 + c**2 * sigma_t**2
    se = (var / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se).all(), (x.mean(0), mean)
    # + 0.03: ancestral's own variance bias at 200 steps, 1-2% here (8% at 60 steps)
    assert ((x.var(0) / var - 1).abs() < 4 * math.sqrt(2 / n) + 0.03).all(), (x.var(0), var)


# 2. the mixture: t_start trades the start's mode for the data's law ------------------------------
def test_mode_weights_shift_to_the_start_mode_as_t_start_falls():
    """Starting from the lightest mode (weight 1/21), the exact reverse process from x_t lands in mode k
    with probability resp_k(x_t, t): its mean over x_t = alpha x_start + sigma eps rises monotonically as
    t_start falls. Ancestral samples match it (nearest mode) within sampling error, rise with it where
    the steps are resolvable by 2000 samples, and at t_start = 0.05 nearly all stay in the start mode."""
    n, times = 2000, [SDE.T, 0.6, 0.3, 0.1, 0.05]
    x_start = RING.means[:1].expand(n, 2).clone()
    eps = torch.randn(20000, 2, dtype=F64, generator=gen(11))
    exact, sampled = [], []
    for t in times:
        alpha, sigma = coefficients(t)
        exact.append(RING.responsibilities(alpha * RING.means[:1] + sigma * eps, t)[:, 0].mean().item())
        x = sd.sample(RING, SDE, x_start=x_start, t_start=t, solver="ancestral", steps=30, generator=gen(2))
        sampled.append((nearest_mode(x) == 0).to(F64).mean().item())
    assert all(a < b for a, b in zip(exact, exact[1:])), exact
    assert exact[0] == pytest.approx(1 / 21, abs=2e-3)
    for p, q in zip(exact, sampled):
        assert abs(q - p) < 4 * math.sqrt(p * (1 - p) / n) + 0.01, (exact, sampled)
    resolvable = [sampled[k] for k in (0, 2, 3, 4)]  # T and 0.6 differ by 0.002 in exact weight
    assert all(a < b for a, b in zip(resolvable, resolvable[1:])), sampled
    assert sampled[-1] > 0.97
    report = RING.mode_report(sd.sample(RING, SDE, x_start=x_start, t_start=0.05, solver="ancestral", steps=30,
                                        generator=gen(2)))
    assert report["weights"][0] > 0.95


# 3. t_start = T and the definition, bit for bit ------------------------------------------------
@pytest.mark.parametrize("solver", ["heun", "ancestral", "torchsde"])
def test_at_T_sdedit_of_zeros_is_plain_sampling_from_sigma_T_eps(solver):
    """x_start = 0, t_start = T: the start is 0 * alpha(T) + sigma(T) eps = sigma(T) eps exactly, eps the
    generator's first draw; the solver then draws on from the same generator. So it equals plain
    sampling from x_T = sigma(T) eps with the generator past that draw. (With images, x_start leaks in
    as alpha(T) x_start: alpha(T) = 0.0066 on the linear schedule, not 0.)"""
    shape = (6, 2)
    a = sd.sample(RING, SDE, x_start=torch.zeros(shape), t_start=SDE.T, solver=solver, steps=5, generator=gen(7))
    g = gen(7)
    eps = torch.randn(shape, generator=g)
    b = sd.sample(RING, SDE, x_T=eps * coefficients(SDE.T)[1], solver=solver, steps=5, generator=g)
    assert torch.equal(a, b)


def test_sdedit_is_the_solver_run_from_the_noised_images_on_the_same_grid():
    """The definition at any t_start: sample(x_start, t_start, grid=G) equals sample(x_T = alpha x_start +
    sigma eps, grid=G) with G starting at t_start (an explicit grid may start below T) — and with a
    noise source: BrownianNoise's eps is its seeded draw, the steps its path's increments."""
    t = 0.45
    grid = sd.GRIDS["quadratic"](SDE, 6, t, SDE.t_min)
    x_start = RING.sample(5, generator=gen(1))
    alpha, sigma = coefficients(t)
    a = sd.sample(RING, SDE, x_start=x_start, t_start=t, grid=grid, solver="ancestral", generator=gen(4))
    g = gen(4)
    eps = torch.randn(x_start.shape, generator=g)
    b = sd.sample(RING, SDE, x_T=x_start * alpha + eps * sigma, grid=grid, solver="ancestral", generator=g)
    assert torch.equal(a, b)
    path = sd.BrownianNoise(x_start.shape, SDE.t_min, t, seed=9)
    a = sd.sample(RING, SDE, x_start=x_start, t_start=t, solver="euler_maruyama", steps=6, noise=path)
    eps = path.draw(x_start.shape, x_start.dtype, x_start.device)
    b = sd.sample(RING, SDE, x_T=x_start * alpha + eps * sigma, grid=sd.GRIDS["quadratic"](SDE, 6, t, SDE.t_min),
                  solver="euler_maruyama", noise=path)
    assert torch.equal(a, b)


# 4. per-sample generators ----------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["ancestral", "euler_maruyama", "adaptive_sde"])
def test_a_samples_edit_does_not_depend_on_its_batch(solver):
    x_start = RING.sample(6, generator=gen(0), dtype=F64)
    kw = {"rtol": 5e-2, "atol": 5e-2} if solver == "adaptive_sde" else {"steps": 8}
    whole = sd.sample(RING, SDE, x_start=x_start, t_start=0.4, solver=solver,
                      generator=[gen(k) for k in range(6)], **kw)
    part = sd.sample(RING, SDE, x_start=x_start[2:4], t_start=0.4, solver=solver,
                     generator=[gen(k) for k in (2, 3)], **kw)
    assert torch.equal(whole[2:4], part)


# 5. every solver from t_start < T --------------------------------------------------------------
REFUSED: dict[str, str] = {}  # solver -> its message, for any that cannot start below T (none do)


@pytest.mark.parametrize("solver", sorted(name for name, spec in sd.SOLVERS.items()
                                          if spec.fn.__module__.startswith("scoresde.")))
def test_every_solver_edits_from_t_start(solver):
    spec = sd.SOLVERS[solver]
    kw = {"rtol": 5e-2, "atol": 5e-2} if spec.adaptive else {"steps": 3}
    x_start = RING.means[:1].expand(4, 2).to(torch.float32).clone()
    if solver in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[solver]):
            sd.sample(RING, SDE, x_start=x_start, t_start=0.5, solver=solver, **kw)
        return
    x, info = sd.sample(RING, SDE, x_start=x_start, t_start=0.5, solver=solver, generator=gen(0),
                        return_info=True, **kw)
    assert x.shape == x_start.shape and x.dtype == x_start.dtype and bool(torch.isfinite(x).all())
    assert info.t_start == 0.5 and info.times[0].item() == 0.5
    if not spec.adaptive:  # NFE means what it means in plain sampling
        _, plain = sd.sample(RING, SDE, shape=(4, 2), solver=solver, generator=gen(0), return_info=True, **kw)
        assert info.nfe == plain.nfe and plain.t_start == SDE.T


def test_gradients_reach_the_images_and_the_grid():
    x_start = RING.means[:1].expand(3, 2).clone().requires_grad_()
    grid = sd.GRIDS["quadratic"](SDE, 3, 0.5, 1e-3).requires_grad_()
    x = sd.sample(RING, SDE, x_start=x_start, t_start=0.5, grid=grid, solver="ddim", grad=True, generator=gen(0))
    x.sum().backward()
    assert bool(torch.isfinite(x_start.grad).all()) and x_start.grad.abs().sum() > 0
    assert grid.grad[0] != 0  # the noise level itself, through alpha(t_start) and sigma(t_start)


def test_a_tuned_grid_serves_sdedit_only_from_its_first_time():
    tuned = TunedGrid(times=sd.GRIDS["quadratic"](SDE, 4, SDE.T, 1e-3), solver="heun", options={}, nfe=9,
                      schedule=schedule_id(SDE))
    x_start = torch.zeros(2, 2)
    assert sd.sample(RING, SDE, x_start=x_start, t_start=SDE.T, grid=tuned, solver="heun").shape == (2, 2)
    with pytest.raises(ValueError, match=r"grid: a TunedGrid starts at t=1.0, not at t_start=0.5"):
        sd.sample(RING, SDE, x_start=x_start, t_start=0.5, grid=tuned, solver="heun")


# 6. bad input ----------------------------------------------------------------------------------
GOOD = torch.zeros(4, 2)
BAD = [
    (dict(x_start=[[0.0, 0.0]], t_start=0.5), TypeError, r"x_start: expected a floating tensor of shape \(batch, "
                                                          r"\.\.\.\), got list"),
    (dict(x_start=torch.zeros(4, 2, dtype=torch.int64), t_start=0.5), TypeError, r"x_start: .* got a torch.int64"),
    (dict(x_start=torch.zeros(4), t_start=0.5), TypeError, r"x_start: expected a floating tensor .* shape \(4,\)"),
    (dict(x_start=torch.zeros(0, 2), t_start=0.5), ValueError, r"x_start: an empty tensor of shape \(0, 2\)"),
    (dict(x_start=torch.tensor([[0.0, 0.0], [math.nan, 1.0]]), t_start=0.5), ValueError,
     r"x_start: sample 1 \(of 2\) holds NaN or inf"),
    (dict(x_start=GOOD, t_start=0.5, shape=(3, 2)), ValueError,
     r"shape=\(3, 2\) disagrees with x_start.shape=\(4, 2\)"),
    (dict(x_start=GOOD, t_start=0.5, x_T=GOOD), ValueError, r"x_T and x_start: give one"),
    (dict(x_start=GOOD, t_start=0.5, dtype=F64), ValueError, r"dtype=torch.float64 disagrees with x_start.dtype"),
    (dict(x_start=GOOD), ValueError, r"x_start without t_start: give t_start in \(t_end, T\]"),
    (dict(t_start=0.5, shape=(4, 2)), ValueError, r"t_start=0.5 without x_start"),
    (dict(t_start=0.5, x_T=GOOD), ValueError, r"t_start=0.5 without x_start"),
    (dict(x_start=GOOD, t_start=1.5), ValueError, r"t_start=1.5: expected a float in \(t_end, T\] = \(0.001, 1.0\]"),
    (dict(x_start=GOOD, t_start=0.0), ValueError, r"t_start=0.0: expected a float in \(t_end, T\]"),
    (dict(x_start=GOOD, t_start=math.nan), ValueError, r"t_start=nan: expected a float in \(t_end, T\]"),
    (dict(x_start=GOOD, t_start=0.5, t_end=0.5), ValueError, r"t_start=0.5: expected a float in \(t_end, T\] = "
                                                             r"\(0.5, 1.0\]"),
    (dict(x_start=GOOD, t_start=0.5, t_end=0.6), ValueError, r"t_start=0.5: .* = \(0.6, 1.0\]"),
    (dict(x_start=GOOD, t_start="0.5"), TypeError, r"t_start='0.5': expected a float in \(t_end, T\]"),
    (dict(x_start=GOOD, t_start=True), TypeError, r"t_start=True: expected a float"),
    (dict(x_start=GOOD, t_start=0.5, solver="dopri5", steps=None), None, None),  # adaptive: fine
    (dict(x_start=GOOD, t_start=0.5, grid=torch.linspace(1.0, 1e-3, 5, dtype=F64), steps=None), ValueError,
     r"t_start=0.5 disagrees with the explicit grid's first time 1.0"),
    (dict(x_start=GOOD, t_start=0.5, noise=lambda like, t0, t1: torch.zeros_like(like)), TypeError,
     r"noise=.*draw\(shape, dtype, device\) for x_T \(or x_start's noise\)"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[f"bad{k}" for k in range(len(BAD))])
def test_bad_sdedit_input_is_refused_at_the_door(kwargs, error, message):
    calls = []

    def model(x, t):
        calls.append(t)
        return RING.eps(x, t)

    kwargs = {"steps": 2, **kwargs}
    if error is None:
        assert sd.sample(model, SDE, **kwargs).shape == GOOD.shape
        return
    with pytest.raises(error, match=message):
        sd.sample(model, SDE, **kwargs)
    assert not calls


# ---- the command line: scoresde sample --from IMAGES.npy --t-start T -------------------------------
def test_the_command_line_edits_the_given_points(tmp_path, capsys):
    """On the exact ring, points at one mode edited from a small t_start stay by their start; from
    t_start = T they spread over the modes."""
    import numpy as np

    from scoresde.cli import main

    sde = sd.VPSDE.linear()
    mode = sd.GaussianMixture.ring2d(sde).means[0].numpy()
    np.save(tmp_path / "start.npy", np.tile(mode, (200, 1)))
    spread = {}
    for t_start in (0.05, 1.0):
        out = tmp_path / f"edit{t_start}.npy"
        assert main(["sample", "--model", "mixture", "--from", str(tmp_path / "start.npy"), "--t-start", str(t_start),
                     "--solver", "ddim", "--steps", "20", "--out", str(out)]) == 0
        assert f"t_start={t_start:g} (edited the --from images)" in capsys.readouterr().out
        edited = np.load(out)
        assert edited.shape == (200, 2)
        spread[t_start] = float(np.linalg.norm(edited - mode, axis=1).mean())
    assert spread[0.05] < 0.1 < 0.5 < spread[1.0]


@pytest.mark.parametrize("extra,message", [
    (["--t-start", "0.5"], "--t-start needs --from"),
    (["--from", "X"], "--from needs --t-start"),
    (["--from", "X", "--t-start", "0.5", "--n", "3"], "--n 3: with --from the images set the count"),
    (["--from", "X", "--t-start", "0.5", "--out", "dir/"], "--from goes with a .png or .npy --out"),
    (["--from", "BAD", "--t-start", "0.5"], "images of shape (4, 3); the model draws (n, 2)"),
])
def test_the_command_line_refuses_a_bad_edit(tmp_path, capsys, extra, message):
    import numpy as np

    from scoresde.cli import main

    np.save(tmp_path / "bad.npy", np.zeros((4, 3)))
    extra = [str(tmp_path / "bad.npy") if w == "BAD" else str(tmp_path / "dir") + "/" if w == "dir/" else w
             for w in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "x.npy")]
    assert main(["sample", "--model", "mixture", *extra, *out]) == 2
    assert message in capsys.readouterr().err


def test_the_docs_figure_script_edits_held_out_digits():
    import importlib.util
    from pathlib import Path

    from scoresde.metrics import digits_split

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sdedit_digits.py"
    spec = importlib.util.spec_from_file_location("sdedit_digits", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    images = script.edits(count=2)
    assert images.shape == (2 * (1 + len(script.T_STARTS)), 1, 8, 8)
    assert torch.equal(images[:2], digits_split()[2][:2])
    assert (images[2:4] - images[:2]).abs().mean() < (images[-2:] - images[:2]).abs().mean()  # 0.2 keeps more
