"""Log-likelihoods through the probability-flow ODE against exact Gaussian and mixture densities,
Hutchinson's estimator against the exact divergence, fixed-step orders, bits per dimension and
bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import scoresde as sd
from scoresde import cli
from scoresde.likelihood import (
    bin_width,
    bits_per_dim,
    dequantize,
    log_likelihood,
)

F64 = torch.float64
SDE = sd.VPSDE.linear()
DATA = {
    "gauss2": lambda: sd.Gaussian(SDE, [0.7, -0.4], 0.5),
    "gauss16": lambda: sd.Gaussian(SDE, torch.linspace(-1.0, 1.0, 16, dtype=F64), 0.3),
    "ring2d": lambda: sd.GaussianMixture.ring2d(SDE),  # six modes of std 0.04: sharp, stiff near the data
}




def draws(data, n, seed=0):
    return data.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def ode_error(data, res, x):
    """Error of the ODE part alone: the run's log p_{t_eps}(x) with the N(0, I) prior swapped for the
    exact p_T, against the exact log p_{t_eps}(x)."""
    swapped = res.nats - res.prior_logp + data.log_prob(res.x_T, SDE.T)
    return (swapped - data.log_prob(x, res.t_eps)).abs().max().item()


def fitted_order(steps, errors) -> float:
    return float(np.polyfit(np.log(1.0 / np.asarray(steps, float)), np.log(np.asarray(errors, float)), 1)[0])


# ---- exact data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DATA)
def test_exact_divergence_matches_exact_log_density(name):
    """dopri5 at rtol = atol = 1e-6 with the exact divergence: within 1e-3 nats of the exact
    log p_{t_eps}(x) (measured: <= 1e-4, the worst on the 16-D Gaussian)."""
    data = DATA[name]()
    x = draws(data, 8)
    res = log_likelihood(data, SDE, x, divergence="exact", rtol=1e-6, atol=1e-6, return_stats=True)
    assert res.nats.dtype == F64 and res.nats.shape == (8,) and res.std_error is None and res.bpd is None
    assert res.t_eps == 1e-5 and res.divergence == "exact" and res.nfe > 0
    assert ode_error(data, res, x) < 1e-3
    # With the N(0, I) prior the result is off by exactly the prior's mismatch at T, no more.
    exact = data.log_prob(x, res.t_eps)
    mismatch = res.prior_logp - data.log_prob(res.x_T, SDE.T)
    assert torch.allclose(res.nats - exact, mismatch, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["gauss2", "ring2d"])
def test_error_follows_the_tolerance(name):
    """The error is the solver's, not a modelling error: 100x tighter tolerances shrink it >= 10x
    (a wrong constant, such as a missing D log alpha term, would not shrink)."""
    data = DATA[name]()
    x = draws(data, 8, seed=1)
    loose, tight = (log_likelihood(data, SDE, x, divergence="exact", rtol=tol, atol=tol, return_stats=True)
                    for tol in (1e-5, 1e-7))
    assert ode_error(data, tight, x) < ode_error(data, loose, x) / 10
    assert ode_error(data, tight, x) < 1e-4


@pytest.mark.parametrize("sde", [SDE, sd.VPSDE.cosine()], ids=["linear", "cosine"])
def test_default_is_cheap_at_equal_error(sde):
    """The default solve (dopri5 in r = sqrt(-log alpha) on x, rtol = atol = 1e-5) of 16 draws from
    the sharp ring: within 1e-3 nats of the exact log p_{t_eps}(x) with at most 120 model calls
    (measured 98 calls and 2.2e-4 nats, linear; 92 and 3.1e-4, cosine). The form used before,
    (lambda, y = x/alpha), met both at once at no tolerance from 1e-3 to 1e-7: it took 140 calls
    for 1.4e-3 nats and 194 for 2.1e-4 (linear), 146 for 1.2e-3 and 176 for 2.6e-4 (cosine); a
    missing Jacobian term misses the error bound by nats."""
    data = sd.GaussianMixture.ring2d(sde)
    x = draws(data, 16, seed=3)
    res = log_likelihood(data, sde, x, divergence="exact", return_stats=True)
    swapped = res.nats - res.prior_logp + data.log_prob(res.x_T, sde.T)
    error = (swapped - data.log_prob(x, res.t_eps)).abs().max().item()
    assert error < 1e-3 and res.nfe <= 120, (error, res.nfe)


def test_a_ddpm_chain_matches_the_exact_density():
    """On a DDPM chain (piecewise-linear log alpha, t_eps = 1/N) the time r = sqrt(-log alpha) is
    inverted through the chain's own table: tight tolerances reach 1e-4 nats (measured 9e-7)."""
    chain = sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    data = sd.GaussianMixture.ring2d(chain)
    x = draws(data, 8, seed=12)
    res = log_likelihood(data, chain, x, divergence="exact", rtol=1e-7, atol=1e-7, return_stats=True)
    assert res.t_eps == 1e-3
    swapped = res.nats - res.prior_logp + data.log_prob(res.x_T, chain.T)
    assert (swapped - data.log_prob(x, res.t_eps)).abs().max().item() < 1e-4


def test_other_start_time_and_float32():
    """log p_{t_eps} for another t_eps, and a float32 input (the ODE state stays float64), under
    torch.no_grad (the divergence turns autograd back on for itself)."""
    data = DATA["gauss2"]()
    x = draws(data, 8, seed=2)
    with torch.no_grad():
        res = log_likelihood(data, SDE, x.float(), t_eps=1e-2, divergence="exact", return_stats=True)
    assert res.nats.dtype == F64 and res.t_eps == 1e-2
    assert ode_error(data, res, x) < 1e-3


@pytest.mark.parametrize("solver,order,steps_list", [
    ("euler", 1, [32, 64, 128, 256]),
    ("heun", 2, [16, 32, 64, 128]),
    ("rk4", 4, [16, 32, 64, 128]),
])
def test_fixed_step_orders(solver, order, steps_list):
    """Log-log slope of the error against the exact density (measured 1.06 / 1.99 / 3.94); the
    band +-0.3 fails a method one order off."""
    data = DATA["gauss2"]()
    x = draws(data, 8, seed=3)
    errors = [ode_error(data, log_likelihood(data, SDE, x, divergence="exact", solver=solver, steps=n,
                                             return_stats=True), x) for n in steps_list]
    assert errors[-1] > 1e-10, "error reached round-off: the fit would be meaningless"
    assert fitted_order(steps_list, errors) == pytest.approx(order, abs=0.3), errors


def test_rk4_converges_to_the_adaptive_value():
    data = DATA["ring2d"]()
    x = draws(data, 8, seed=4)
    adaptive = log_likelihood(data, SDE, x, divergence="exact", rtol=1e-9, atol=1e-9).nats
    gaps = [(log_likelihood(data, SDE, x, divergence="exact", solver="rk4", steps=n).nats - adaptive).abs().max().item()
            for n in (32, 64, 128)]
    # Fourth order: 4x the steps shrink the gap ~256x; >= 64x (third order) is required, and a
    # decrease at every doubling.
    assert gaps[0] > gaps[1] > gaps[2] and gaps[0] / gaps[2] > 64, gaps
    assert gaps[-1] < 1e-4, gaps


# ---- Hutchinson's estimator ------------------------------------------------------------------------
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_its_standard_error(probe):
    """On a fixed rk4 grid the trajectory does not depend on the probes, so Hutchinson's estimate is
    z^T A z for one matrix A with trace equal to the exact-divergence result: exactly unbiased. Per
    sample, r = (est - exact)/std_error is then about t-distributed with 15 dof (E r^2 = 15/13,
    Var r^2 = 3.4): over 64 samples the mean of r lies within 4 sqrt(15/13/64) = 0.54 of 0 and the
    mean of r^2 within 1.15 +- 4 * 0.23, so rms(r) in (0.5, 2.0); a standard error off by
    sqrt(probes) = 4 gives rms 4 or 0.27 and fails."""
    data = DATA["ring2d"]()  # a non-isotropic Jacobian: Rademacher probes have non-zero variance
    x = draws(data, 64, seed=5)
    exact = log_likelihood(data, SDE, x, divergence="exact", solver="rk4", steps=32).nats
    gen = torch.Generator().manual_seed(6)
    est = log_likelihood(data, SDE, x, divergence="hutchinson", probes=16, probe=probe, solver="rk4", steps=32,
                         generator=gen)
    assert est.divergence == "hutchinson" and est.std_error.shape == (64,) and (est.std_error > 0).all()
    z = (est.nats - exact) / est.std_error
    assert abs(z.mean().item()) < 4 * math.sqrt(15 / 13 / 64), z
    assert 0.5 < z.pow(2).mean().sqrt().item() < 2.0, z
    # Averaged over the samples: within 4 standard errors of that mean.
    assert abs((est.nats - exact).mean().item()) < 4 * est.std_error.pow(2).sum().sqrt().item() / 64


def test_hutchinson_with_adaptive_steps():
    """dopri5 with 8 Gaussian probes on the 16-D Gaussian: every sample within 6 reported standard
    errors of the exact density (t with 7 dof: P(|r| > 6) = 0.0005), rms(r) in (0.5, 2.0) as above."""
    data = DATA["gauss16"]()
    x = draws(data, 16, seed=7)
    res = log_likelihood(data, SDE, x, divergence="hutchinson", probes=8, probe="gaussian",
                         generator=torch.Generator().manual_seed(8), return_stats=True)
    swapped = res.nats - res.prior_logp + data.log_prob(res.x_T, SDE.T)
    z = (swapped - data.log_prob(x, res.t_eps)) / res.std_error
    assert z.abs().max().item() < 6 and 0.5 < z.pow(2).mean().sqrt().item() < 2.0, z


def test_rademacher_is_exact_for_an_isotropic_jacobian():
    """For Gaussian data d eps/dx is a multiple of I, and z^T (cI) z = cD for every Rademacher z."""
    data = DATA["gauss2"]()
    x = draws(data, 8, seed=9)
    exact = log_likelihood(data, SDE, x, divergence="exact", solver="heun", steps=20).nats
    est = log_likelihood(data, SDE, x, divergence="hutchinson", probes=3, solver="heun", steps=20)
    assert torch.allclose(est.nats, exact, atol=1e-10, rtol=0) and est.std_error.max() < 1e-10


def test_probes_repeat_with_the_seed_and_auto_picks_by_dimension():
    data = DATA["gauss16"]()
    x = draws(data, 4, seed=10)
    run = lambda seed: log_likelihood(data, SDE, x, divergence="hutchinson", probe="gaussian", probes=2,
                                      solver="euler", steps=5, generator=torch.Generator().manual_seed(seed)).nats
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert log_likelihood(data, SDE, x, solver="euler", steps=2).divergence == "exact"  # D = 16
    big = torch.zeros(2, 17, dtype=F64)
    assert log_likelihood(lambda x, t: 0.1 * x, SDE, big, solver="euler", steps=2).divergence == "hutchinson"


def test_fixed_step_integration_never_reads_the_device():
    """On the meta device (no data) any host read raises: the fixed-step solve runs through."""
    x = torch.empty(4, 3, 2, 2, device="meta")
    for divergence in ("exact", "hutchinson"):
        res = log_likelihood(lambda x, t: 0.5 * x * x, SDE, x, divergence=divergence, probes=2, solver="rk4",
                             steps=3, levels=256)
        assert res.nats.device.type == "meta" and res.nfe == 12


# ---- bits per dimension ------------------------------------------------------------------------------
def test_bits_per_dim_by_hand():
    # 8-bit: Delta = 2/255, bpd = -log p_x/(D ln 2) + log2(127.5).
    assert bits_per_dim(torch.tensor([0.0], dtype=F64), 3072, 256).item() == pytest.approx(math.log2(127.5))
    # digits: Delta = 1/8; log p_x = -100 nats over D = 64 gives 100/(64 ln 2) + 3 bits.
    assert bits_per_dim(torch.tensor([-100.0], dtype=F64), 64, 17).item() == pytest.approx(100 / (64 * math.log(2)) + 3)
    # Data uniform over L levels: dequantized, uniform on [-1 - Delta/2, 1 + Delta/2]^D, so
    # log p_x = -D log(L Delta), and the bits per dimension are log2 L.
    for levels, dim in ((256, 12), (17, 64), (2, 5)):
        nats = torch.tensor([-dim * math.log(levels * bin_width(levels))], dtype=F64)
        assert bits_per_dim(nats, dim, levels).item() == pytest.approx(math.log2(levels))


def test_dequantize_fills_each_level_bin():
    k = torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = dequantize(k, 256, generator=torch.Generator().manual_seed(1), dtype=F64)
    delta = 2 / 255
    offset = (x - (k.to(F64) * delta - 1)) / delta  # u - 1/2, uniform on [-1/2, 1/2)
    assert offset.min() >= -0.5 and offset.max() < 0.5
    assert abs(offset.mean().item()) < 4 * math.sqrt(1 / 12 / 20000)
    assert offset.var().item() == pytest.approx(1 / 12, rel=0.05)
    assert torch.equal(torch.round((x + 1) / delta).to(torch.uint8), k)
    digits = dequantize(torch.tensor([0, 16]), 17, generator=torch.Generator().manual_seed(2))
    assert -1.0625 <= digits[0] < -0.9375 and 0.9375 <= digits[1] < 1.0625


def test_levels_give_bits_per_dim():
    """A 2x2 'image' of 17 levels under a Gaussian model: bpd is the formula applied to nats."""
    data = sd.Gaussian(SDE, torch.zeros(4, dtype=F64), 0.6)
    k = torch.randint(0, 17, (6, 4), generator=torch.Generator().manual_seed(3))
    x = dequantize(k, 17, generator=torch.Generator().manual_seed(4), dtype=F64)
    res = log_likelihood(data, SDE, x, levels=17, solver="rk4", steps=20)
    assert torch.allclose(res.bpd, -(res.nats + 4 * math.log(1 / 8)) / (4 * math.log(2)))


# ---- bad input ------------------------------------------------------------------------------------
class Counting:
    """An eps model that counts its calls: bad input must be refused before the first."""

    event_shape = (2,)

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return 0.1 * x


@pytest.mark.parametrize("x,kwargs,error,words", [
    (torch.full((3, 2), 1.2, dtype=F64), {"levels": 256}, ValueError, "[-1.00392, 1.00392]"),
    (torch.zeros(3, 3, dtype=F64), {}, ValueError, "(batch, 2)"),
    (torch.zeros(2, dtype=F64), {}, TypeError, "(batch, *sample_shape)"),
    (torch.zeros(3, 2, dtype=torch.int64), {}, TypeError, "dequantize"),
    (torch.tensor([[0.0, float("nan")]], dtype=F64), {}, ValueError, "NaN"),
    (torch.zeros(3, 2), {"probes": 0}, ValueError, "probes=0"),
    (torch.zeros(3, 2), {"divergence": "trace"}, ValueError, "'exact'"),
    (torch.zeros(3, 2), {"probe": "sphere"}, ValueError, "'rademacher', 'gaussian'"),
    (torch.zeros(3, 2), {"solver": "rk45"}, ValueError, "'dopri5', 'euler', 'heun', 'rk4'"),
    (torch.zeros(3, 2), {"steps": 10}, ValueError, "adaptive"),
    (torch.zeros(3, 2), {"solver": "rk4", "steps": 0}, ValueError, "steps=0"),
    (torch.zeros(3, 2), {"t_eps": 1.5}, ValueError, "t_eps=1.5"),
    (torch.zeros(3, 2), {"rtol": -1.0}, ValueError, "rtol"),
    (torch.zeros(3, 2), {"levels": 1}, ValueError, "levels=1"),
    (torch.zeros(3, 2), {"generator": 0}, TypeError, "generator"),
])
def test_bad_input_is_refused_before_any_work(x, kwargs, error, words):
    model = Counting()
    with pytest.raises(error) as info:
        log_likelihood(model, SDE, x, **kwargs)
    assert words in str(info.value) and model.calls == 0


def test_inference_mode_is_refused_with_a_reason():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        log_likelihood(Counting(), SDE, torch.zeros(3, 2))


def test_dequantize_refuses_bad_levels():
    with pytest.raises(ValueError, match="0..16"):
        dequantize(torch.tensor([0, 17]), 17)
    with pytest.raises(TypeError, match="integer"):
        dequantize(torch.tensor([0.5]), 256)


def test_a_nan_model_is_reported():
    bad = lambda x, t: x * float("nan")
    for kwargs in ({"solver": "rk4", "steps": 3}, {}):
        with pytest.raises(FloatingPointError, match="NaN"):
            log_likelihood(bad, SDE, torch.zeros(2, 2), divergence="exact", **kwargs)


# ---- command line ----------------------------------------------------------------------------------
def test_cli_runs_on_the_shipped_model(capsys):
    assert cli.main(["likelihood", "--n", "2", "--solver", "euler", "--steps", "2", "--divergence", "hutchinson"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim:" in out and "NFE=2" in out


def test_cli_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal: a usage line and exit 2
        cli.main(["likelihood", "--probes", "0"])
    assert exit_.value.code == 2 and "--probes" in capsys.readouterr().err
