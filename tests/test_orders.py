"""Convergence orders measured from log-log slopes against exact Gaussian ground truth, and the
algebraic identities between the first-order samplers (DDIM(0) = exponential Euler = "euler",
DDIM(1) = ancestral)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import scoresde as sd

from helpers import F64, MEAN, SDES, STD, assert_order, fitted_order, flow_errors

T_END = 1e-3


def log_snr_grid(sde, steps, t_end=T_END):
    return sd.GRIDS["log_snr"](sde, steps, sde.T, t_end)


def uniform_grid(sde, steps, t_end=T_END):
    return sd.GRIDS["uniform"](sde, steps, sde.T, t_end)


# ---- deterministic PF-ODE solvers against the exact probability-flow map -------------------------
# Step ranges chosen so that the error sits in its asymptotic regime (successive halvings already
# shrink it by about 2^p) and stays orders of magnitude above float64 round-off: for rk4 the
# smallest error is ~1e-6..1e-7, for euler ~1e-2.
ODE_CASES = [
    ("linear", "euler", 1, [16, 32, 64, 128, 256]),
    ("linear", "heun", 2, [16, 32, 64, 128, 256]),
    ("linear", "rk4", 4, [16, 32, 64, 128]),
    ("cosine", "euler", 1, [16, 32, 64, 128, 256]),
    ("cosine", "heun", 2, [16, 32, 64, 128, 256]),
    ("cosine", "rk4", 4, [16, 32, 64, 128]),
]


@pytest.mark.parametrize("sde_name,solver,order,steps_list", ODE_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in ODE_CASES])
def test_pf_ode_solver_order(sde_name, solver, order, steps_list):
    errors = flow_errors(SDES[sde_name](), solver, steps_list, t_end=T_END)
    # Band +-0.25 around the nominal order: a method one order lower or higher is off by >= 1.
    assert_order(steps_list, errors, order, band=0.25)


def test_heun_order_on_uniform_grid():
    """The order does not hinge on the log-SNR grid: uniform steps in t give the same slope."""
    steps_list = [16, 32, 64, 128, 256]
    errors = flow_errors(sd.VPSDE.linear(), "heun", steps_list, grid="uniform", t_end=T_END, seed=2)
    assert_order(steps_list, errors, 2, band=0.25)


# ---- Euler-Maruyama: strong order 1 (additive noise) on coupled Brownian paths ------------------------
def test_euler_maruyama_strong_order():
    """With additive noise EM converges strongly with order 1 (Kloeden & Platen 1992, sec. 10.2).

    All runs share one Brownian path (`BrownianNoise`); the reference is EM on a 16x finer
    grid of the same path. The coarse runs go first: BrownianInterval is cheapest queried
    coarse-to-fine.
    """
    sde = sd.VPSDE.linear()
    data = sd.Gaussian(sde, MEAN, STD)
    B = 128
    x_T = torch.randn(B, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    noise = sd.BrownianNoise((B, 2), t0=sde.T, t1=T_END, seed=7, dtype=F64)
    steps_list = [16, 32, 64, 128]
    runs = [sd.sample(data, sde, x_T=x_T, solver="euler_maruyama", grid=uniform_grid(sde, n), noise=noise,
                      final_denoise=False) for n in steps_list + [2048]]
    ref = runs.pop()
    errors = [(x - ref).pow(2).sum(1).mean().sqrt().item() for x in runs]  # root-mean-square error
    # Band +-0.25: strong order 1/2 (what multiplicative noise or mis-scaled increments give) fails.
    assert fitted_order(steps_list, errors) == pytest.approx(1.0, abs=0.25), errors


def test_brownian_noise_couples_grids():
    """The coupling the strong-order test relies on: a coarse step's increment is the sum of the
    fine increments it covers (so errors between grids are pathwise, not Monte Carlo)."""
    noise = sd.BrownianNoise((5, 3), t0=1.0, t1=0.0, seed=11, dtype=F64)
    like = torch.zeros(5, 3, dtype=F64)
    coarse = noise(like, 1.0, 0.5) * math.sqrt(0.5)
    fine = sum(noise(like, a, b) * math.sqrt(a - b) for a, b in [(1.0, 0.75), (0.75, 0.6), (0.6, 0.5)])
    torch.testing.assert_close(coarse, fine, rtol=1e-10, atol=1e-12)
    # ... and other seeds give other paths.
    other = sd.BrownianNoise((5, 3), t0=1.0, t1=0.0, seed=12, dtype=F64)
    assert not torch.allclose(other(like, 1.0, 0.5), noise(like, 1.0, 0.5))


# ---- Euler-Maruyama: weak order 1 in exact moments ------------------------------------------------------
class OrthogonalNoise:
    """Noise whose columns (x_T, then one draw per step) are exactly orthogonal across the batch,
    centred, and of unit sample variance.

    For Gaussian data the EM iterate is affine in its Gaussian inputs, x = c + A x_T + sum_i B_i z_i,
    so with such inputs the batch mean is exactly c and the batch variance exactly A^2 + sum B_i^2:
    the law's moments with no Monte Carlo error at all. The weak error is then pure bias.
    """

    def __init__(self, batch: int, draws: int, seed: int):
        a = torch.randn(batch, draws + 1, dtype=F64, generator=torch.Generator().manual_seed(seed))
        a[:, 0] = 1.0  # orthogonal to the constant vector: exactly centred
        q, _ = torch.linalg.qr(a)
        self.columns = q[:, 1:] * math.sqrt(batch - 1)
        self.used = 0

    def _next(self):
        z = self.columns[:, self.used]
        self.used += 1
        return z

    def x_T(self):
        return self._next()[:, None].clone()

    def __call__(self, like, t0, t1):
        return self._next().reshape(like.shape).to(like.dtype)


def exact_moments(sde, t, mu, s):
    """Data N(mu, s^2) -> x_t ~ N(alpha_t mu, alpha_t^2 s^2 + sigma_t^2)."""
    a, sg = sde.alpha(torch.tensor(t)).item(), sde.sigma(torch.tensor(t)).item()
    return a * mu, a * a * s * s + sg * sg


def test_euler_maruyama_weak_order_exact_moments():
    sde = sd.VPSDE.linear()
    mu, s = 0.7, 0.5
    data = sd.Gaussian(sde, [mu], s)
    mean_exact, var_exact = exact_moments(sde, T_END, mu, s)
    steps_list = [32, 64, 128, 256]
    mean_err, var_err = [], []
    for n in steps_list:
        noise = OrthogonalNoise(batch=600, draws=n + 1, seed=0)
        x = sd.sample(data, sde, x_T=noise.x_T(), solver="euler_maruyama", grid=uniform_grid(sde, n),
                      noise=noise, final_denoise=False)
        assert noise.used == n + 1  # one draw per step: the solver consumed exactly our inputs
        mean_err.append(abs(x.mean().item() - mean_exact))
        var_err.append(abs(x.var().item() - var_exact))
    # Band +-0.25 around weak order 1; a wrong drift or noise coefficient leaves an O(1) bias (slope 0).
    assert fitted_order(steps_list, mean_err) == pytest.approx(1.0, abs=0.25), mean_err
    assert fitted_order(steps_list, var_err) == pytest.approx(1.0, abs=0.25), var_err


# ---- identities between the first-order samplers --------------------------------------------------------
def exponential_euler(sde, eps_model, x, times):
    """First-order exponential integrator of the PF-ODE (DPM-Solver-1, Lu et al. 2022, eq. 3.7):
    x_s = (alpha_s/alpha_t) x_t - sigma_s (e^h - 1) eps(x_t, t), h = lambda_s - lambda_t."""
    for t, s in zip(times[:-1].tolist(), times[1:].tolist()):
        t_, s_ = torch.tensor(t, dtype=F64), torch.tensor(s, dtype=F64)
        h = (sde.log_snr(s_) - sde.log_snr(t_)).item()
        eps = eps_model(x, torch.full((x.shape[0],), t, dtype=F64))
        x = (sde.alpha(s_) / sde.alpha(t_)).item() * x - sde.sigma(s_).item() * math.expm1(h) * eps
    return x


@pytest.mark.parametrize("sde_factory", [sd.VPSDE.linear, sd.VPSDE.cosine,
                                         lambda: sd.VPSDE.from_betas(np.linspace(1e-4, 0.02, 200))],
                         ids=["linear", "cosine", "discrete"])
@pytest.mark.parametrize("grid", ["log_snr", "uniform", "karras"])
def test_ddim_eta0_is_exponential_euler_and_euler(sde_factory, grid):
    sde = sde_factory()
    mix = sd.GaussianMixture(sde, [1.0, 2.0], [[0.8, 0.1], [-0.5, -0.6]], [0.2, 0.3])
    times = sd.GRIDS[grid](sde, 12, sde.T, sde.t_min)
    x_T = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    by_hand = exponential_euler(sde, mix, x_T.clone(), times)
    ddim = sd.sample(mix, sde, x_T=x_T, solver="ddim", eta=0.0, grid=times, final_denoise=False)
    euler = sd.sample(mix, sde, x_T=x_T, solver="euler", grid=times, final_denoise=False)
    # float64 round-off: a handful of ulps of O(1) numbers accumulated over 12 steps.
    torch.testing.assert_close(ddim, by_hand, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(euler, by_hand, rtol=1e-11, atol=1e-11)
    # ... and the identity is not vacuous: the step moved x far from where it started.
    assert (by_hand - x_T).abs().max() > 0.1


@pytest.mark.parametrize("grid", ["log_snr", "uniform"])
def test_ddim_eta1_is_ancestral(grid):
    """DDIM with eta = 1 draws from the DDPM posterior (Song, Meng & Ermon 2021, sec. 4.1)."""
    sde = sd.VPSDE.linear()
    mix = sd.GaussianMixture(sde, [1.0, 2.0], [[0.8, 0.1], [-0.5, -0.6]], [0.2, 0.3])
    kw = dict(shape=(16, 2), dtype=F64, steps=20, grid=grid)
    ddim = sd.sample(mix, sde, solver="ddim", eta=1.0, generator=torch.Generator().manual_seed(9), **kw)
    anc = sd.sample(mix, sde, solver="ancestral", variance="posterior",
                    generator=torch.Generator().manual_seed(9), **kw)
    torch.testing.assert_close(ddim, anc, rtol=1e-11, atol=1e-11)
    # Intermediate eta is neither endpoint.
    half = sd.sample(mix, sde, solver="ddim", eta=0.5, generator=torch.Generator().manual_seed(9), **kw)
    assert (half - anc).abs().max() > 1e-3
