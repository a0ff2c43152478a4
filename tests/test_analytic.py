"""Exact Gaussian / Gaussian-mixture ground truth: eps, score, log-density, PF-ODE map, sampling."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.stats import chi2

import scoresde as sd
from scoresde.analytic import Gaussian, GaussianMixture

F64 = torch.float64
SETTINGS = settings(deadline=None, max_examples=30)

SDES = {
    "linear": lambda: sd.VPSDE.linear(),
    "cosine": lambda: sd.VPSDE.cosine(),
    "discrete": lambda: sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64)),
}


@st.composite
def mixtures(draw, max_k=4, dims=(1, 2, 3)):
    sde = SDES[draw(st.sampled_from(list(SDES)))]()
    K = draw(st.integers(1, max_k))
    D = draw(st.sampled_from(dims))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weights = rng.uniform(0.1, 1.0, K)
    means = rng.normal(0, 2, (K, D))
    stds = 10.0 ** rng.uniform(-2, 0.3, K)
    return GaussianMixture(sde, weights, means, stds), dict(weights=weights / weights.sum(), means=means, stds=stds)


def reference_log_prob(sde, p, x, t):
    """log p_t with torch.distributions: sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)."""
    t = torch.as_tensor(t, dtype=F64)
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    loc = a * torch.as_tensor(p["means"])
    scale = torch.sqrt(a**2 * torch.as_tensor(p["stds"]) ** 2 + s**2)[:, None].expand_as(loc)
    comp = torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(torch.as_tensor(p["weights"])), comp)
    return mix.log_prob(x.flatten(1))


# ---- eps, score, log-density ---------------------------------------------------------------------
# Times drawn from [1e-6 T, T]: t = 0 itself is covered by the parametrized tests below (the cosine
# schedule has sigma(0) = NaN today, see test_schedules.py::test_time_zero_is_the_data).
UNIT = st.floats(1e-6, 1.0)


@SETTINGS
@given(mixtures(), UNIT, st.integers(0, 2**31))
def test_log_prob_matches_torch_distributions(gm_p, u, seed):
    gm, p = gm_p
    t = u * gm.sde.T
    x = 3 * torch.randn(16, gm.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    torch.testing.assert_close(gm.log_prob(x, t), reference_log_prob(gm.sde, p, x, t), rtol=1e-11, atol=1e-10)


@SETTINGS
@given(mixtures(), st.integers(0, 2**31))
def test_eps_is_minus_sigma_times_autograd_score(gm_p, seed):
    gm, _ = gm_p
    g = torch.Generator().manual_seed(seed)
    B = 12
    x = (3 * torch.randn(B, gm.dim, generator=g, dtype=F64)).requires_grad_(True)
    t = (0.01 + 0.98 * torch.rand(B, generator=g, dtype=F64)) * gm.sde.T  # per-sample times
    (grad,) = torch.autograd.grad(gm.log_prob(x, t).sum(), x)
    sigma = gm.sde.sigma(t)[:, None]
    x = x.detach()
    # Analytic vs autograd gradient of the same float64 log-density: agreement to ~1e-12 relative,
    # degraded by the softmax responsibilities only at the 1e-13 level.
    torch.testing.assert_close(gm.score(x, t), grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gm.eps(x, t), -sigma * grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gm(x, t), gm.eps(x, t))
    # responsibilities: softmax over components, rows sum to one
    r = gm.responsibilities(x, t)
    assert r.shape == (B, len(gm.weights)) and torch.allclose(r.sum(1), torch.ones(B, dtype=F64))




@pytest.mark.parametrize("sde_name", [
    "linear", "discrete", "cosine"])
def test_log_prob_integrates_to_one_in_1d_at_t0(sde_name):
    _check_normalised(SDES[sde_name](), 0.0)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("t_frac", [0.001, 0.3, 1.0])
def test_log_prob_integrates_to_one_in_1d(sde_name, t_frac):
    _check_normalised(SDES[sde_name](), t_frac)


def _check_normalised(sde, t_frac):
    t = t_frac * sde.T
    gm = GaussianMixture(sde, [1.0, 2.0, 0.5], [[-1.5], [0.3], [2.0]], [0.05, 0.3, 0.01])
    a = float(sde.alpha(torch.tensor(t, dtype=F64)))
    dens = lambda y: math.exp(float(gm.log_prob(torch.tensor([[y]], dtype=F64), t)))  # noqa: E731
    # Mass beyond +-12 is far below 1e-12 (every component std <= 1); breakpoints at the modes.
    points = sorted(a * np.array([-1.5, 0.3, 2.0]))
    total, err = integrate.quad(dens, -12.0, 12.0, points=points, limit=400, epsabs=1e-12, epsrel=1e-12)
    assert abs(total - 1.0) < 1e-9 + 10 * err


def test_one_component_mixture_is_the_gaussian():
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(1, 2, 2, generator=g, dtype=F64)  # image-shaped event
    c = 0.4
    for sde in (f() for f in SDES.values()):
        one = GaussianMixture(sde, [3.0], mean[None], c)
        gauss = Gaussian(sde, mean, c)
        x = torch.randn(6, 1, 2, 2, generator=g, dtype=F64)
        t = torch.linspace(0.05, 0.95, 6, dtype=F64) * sde.T
        torch.testing.assert_close(one.eps(x, t), gauss.eps(x, t), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(one.log_prob(x, t), gauss.log_prob(x, t), rtol=1e-14, atol=1e-14)
        # closed form for N(mu, c^2 I): eps = sigma (x - alpha mu) / (alpha^2 c^2 + sigma^2)
        a, s = sde.alpha(t).reshape(-1, 1, 1, 1), sde.sigma(t).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(gauss.eps(x, t), s * (x - a * mean) / (a**2 * c**2 + s**2),
                                   rtol=1e-12, atol=1e-12)
        assert gauss.eps(x, t).shape == x.shape


def test_eps_model_with_per_sample_t_on_image_shaped_x():
    sde = sd.VPSDE.cosine()
    g = torch.Generator().manual_seed(8)
    gm = GaussianMixture(sde, [1.0, 2.0], torch.randn(2, 3, 2, 2, generator=g, dtype=F64), [0.1, 0.5])
    x = torch.randn(5, 3, 2, 2, generator=g, dtype=F64)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=F64) * sde.T
    out = gm(x, t)
    assert out.shape == x.shape
    for b in range(5):
        torch.testing.assert_close(out[b:b + 1], gm(x[b:b + 1], float(t[b])), rtol=1e-14, atol=1e-14)
    assert gm(x.float(), t).dtype == torch.float32


@pytest.mark.parametrize("sde_name", list(SDES))
def test_eps_is_the_conditional_mean_of_the_noise(sde_name):
    """Tweedie: eps(x_t) = E[z | x_t], so z - eps(x_t) is orthogonal to every function of x_t.
    Checked for h(x_t) = x_t and h = eps(x_t) itself on exact samples, within 5 standard errors."""
    sde = SDES[sde_name]()
    gm = GaussianMixture.ring2d(sde, k=4, radius=1.0, std=0.2)
    g = torch.Generator().manual_seed(11)
    n = 40000
    x0 = gm.sample(n, generator=g, dtype=F64)
    z = torch.randn(n, 2, generator=g, dtype=F64)
    for t in (0.05, 0.3, 0.7):
        xt = sde.marginal(x0, t, z)
        resid = z - gm.eps(xt, t)
        for h in (xt, gm.eps(xt, t)):
            terms = (resid * h).sum(1)
            assert abs(terms.mean().item()) < 5 * terms.std().item() / math.sqrt(n)
    # A wrong noise level fails it: pretend x_t came from time 0.3 when it is from 0.5.
    xt = sde.marginal(x0, 0.5, z)
    terms = ((z - gm.eps(xt, 0.3)) * xt).sum(1)
    assert abs(terms.mean().item()) > 5 * terms.std().item() / math.sqrt(n)


# ---- the exact probability-flow map of a Gaussian ---------------------------------------------------------
def _interior(sde, u):
    """Keep u (and u +- h) inside one segment of a discrete chain, where beta is constant."""
    if sde.num_steps is None:
        return u
    N = sde.num_steps
    return (math.floor(u * N) + 0.5) / N


@pytest.mark.parametrize("sde_name", list(SDES))
def test_gaussian_flow_satisfies_the_pf_ode(sde_name):
    sde = SDES[sde_name]()
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(3, generator=g, dtype=F64)
    gauss = Gaussian(sde, mean, 0.3)
    x_t = torch.randn(8, 3, generator=g, dtype=F64)
    t = 0.9 * sde.T
    h = 1e-6
    for u in (0.02, 0.2, 0.5, 0.8):
        u = _interior(sde, u * sde.T)
        x_u = gauss.flow(x_t, t, u)
        # Central difference: truncation O(h^2) ~ 1e-12 times x''' (<= ~1e3 here), rounding
        # eps |x| / h ~ 1e-10: compare to 1e-7 of the drift's scale.
        fd = (gauss.flow(x_t, t, u + h) - gauss.flow(x_t, t, u - h)) / (2 * h)
        exact = sde.pf_drift(x_u, u, gauss.score(x_u, u))
        torch.testing.assert_close(fd, exact, rtol=1e-6, atol=1e-7 * (1 + exact.abs().max().item()))
        # The reverse-SDE drift (full g^2 score) is a different field: it must not match.
        wrong = sde.reverse_drift(x_u, u, gauss.score(x_u, u))
        assert (fd - wrong).abs().max() > 1e-3


@SETTINGS
@given(st.sampled_from(list(SDES)), UNIT, UNIT, UNIT,
       st.floats(0.01, 3.0), st.integers(0, 2**31))
def test_gaussian_flow_is_a_flow(sde_name, a, b, c, std, seed):
    sde = SDES[sde_name]()
    t, u, w = a * sde.T, b * sde.T, c * sde.T
    g = torch.Generator().manual_seed(seed)
    gauss = Gaussian(sde, torch.randn(2, 2, generator=g, dtype=F64), std)
    x = torch.randn(5, 2, 2, generator=g, dtype=F64)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gauss.flow(x, t, t), x, **tol)
    torch.testing.assert_close(gauss.flow(gauss.flow(x, t, u), u, t), x, **tol)
    torch.testing.assert_close(gauss.flow(gauss.flow(x, t, u), u, w), gauss.flow(x, t, w), **tol)
    # It transports p_t to p_u: change of variables with Jacobian (r_u / r_t)^D for this affine map.
    at, st_ = float(sde.alpha(torch.tensor(t, dtype=F64))), float(sde.sigma(torch.tensor(t, dtype=F64)))
    au, su = float(sde.alpha(torch.tensor(u, dtype=F64))), float(sde.sigma(torch.tensor(u, dtype=F64)))
    r_t, r_u = math.hypot(at * std, st_), math.hypot(au * std, su)
    lhs = gauss.log_prob(gauss.flow(x, t, u), u) + 4 * math.log(r_u / r_t)
    torch.testing.assert_close(lhs, gauss.log_prob(x, t), rtol=1e-10, atol=1e-9)


# ---- sampling and the mode report ------------------------------------------------------------------------------
def _nearest(x, means):
    return torch.cdist(x.to(F64).flatten(1), means.flatten(1)).argmin(1)


def test_sample_component_weights_means_and_stds():
    sde = sd.VPSDE.linear()
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    means = torch.tensor([[0.0, 0.0, 0.0], [8.0, 0.0, 0.0], [0.0, 8.0, -8.0]], dtype=F64)[:, None]  # (K,1,3)
    stds = torch.tensor([1.0, 0.5, 0.1], dtype=F64)  # modes >= 8 sd apart: assignment is exact
    gm = GaussianMixture(sde, 2 * weights, means, stds)  # unnormalised weights are normalised
    n = 30000
    x = gm.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 1, 3) and x.dtype == torch.float32
    again = gm.sample(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    x = x.to(F64)
    k = _nearest(x, means)
    D = 3
    for j in range(3):
        nj = int((k == j).sum())
        w = weights[j].item()
        # multinomial count: SE sqrt(w (1 - w) / n); bounds at 4.5 SE (9 comparisons in this test).
        assert abs(nj / n - w) < 4.5 * math.sqrt(w * (1 - w) / n)
        xj = x[k == j].flatten(1)
        # mean per coordinate: SE s / sqrt(n_j)
        assert ((xj.mean(0) - means[j].flatten()).abs() < 4.5 * stds[j] / math.sqrt(nj)).all()
        # pooled std over D coordinates with known mean: relative SE 1 / sqrt(2 n_j D)
        s_hat = (xj - means[j].flatten()).pow(2).mean().sqrt().item()
        assert abs(s_hat / stds[j].item() - 1) < 4.5 / math.sqrt(2 * nj * D)


def test_ring2d_layout():
    sde = sd.VPSDE.linear()
    gm = GaussianMixture.ring2d(sde, k=5, radius=2.0, std=0.1)
    torch.testing.assert_close(gm.weights, torch.arange(1, 6, dtype=F64) / 15)
    torch.testing.assert_close(gm.means.norm(dim=1), torch.full((5,), 2.0, dtype=F64))
    angles = torch.atan2(gm.means[:, 1], gm.means[:, 0]) % (2 * math.pi)
    torch.testing.assert_close(angles, torch.arange(5, dtype=F64) * 2 * math.pi / 5, atol=1e-12, rtol=0)
    assert torch.equal(gm.stds, torch.full((5,), 0.1, dtype=F64)) and gm.event_shape == (2,)


def _report_bounds(gm, n, tail=1e-4):
    w = gm.weights
    weight_se = torch.sqrt(w * (1 - w) / n)
    # std_ratio = sqrt(mean of chi2_D / D over n_k samples): SE ~ 1 / sqrt(2 D n_k), and truncation
    # at the 1 - tail quantile biases it low by < 1e-3 for D = 2.
    ratio_se = 1 / torch.sqrt(2 * gm.dim * w * n)
    stray_se = math.sqrt(tail / n)
    return weight_se, ratio_se, stray_se


def test_mode_report_on_exact_samples():
    gm = GaussianMixture.ring2d(sd.VPSDE.linear(), k=6, radius=1.0, std=0.04)
    n = 20000
    x = gm.sample(n, generator=torch.Generator().manual_seed(1))
    rep = gm.mode_report(x)
    weight_se, ratio_se, stray_se = _report_bounds(gm, n)
    assert ((rep["weights"] - gm.weights).abs() < 4 * weight_se).all()
    # Exact samples land outside the chi-square(2) 1 - 1e-4 ball with probability 1e-4.
    assert rep["stray"] < 1e-4 + 4 * stray_se
    assert ((rep["std_ratio"] - 1).abs() < 4 * ratio_se + 1e-3).all()


def test_mode_report_detects_wrong_samples():
    gm = GaussianMixture.ring2d(sd.VPSDE.linear(), k=6, radius=1.0, std=0.04)
    n = 20000
    g = torch.Generator().manual_seed(2)
    x = gm.sample(n, generator=g, dtype=F64)
    weight_se, ratio_se, stray_se = _report_bounds(gm, n)
    # (a) modes 30% too wide: the ratio moves by 0.3 >> its SE (a few 1e-2 at most).
    k = _nearest(x, gm.means)
    wide = gm.means[k] + 1.3 * (x - gm.means[k])
    rep = gm.mode_report(wide)
    assert ((rep["std_ratio"] - 1.3).abs() < 0.05).all()
    assert ((rep["std_ratio"] - 1).abs() > 4 * ratio_se + 1e-3).all()
    # (b) 5% junk spread uniformly over [-2, 2]^2: the stray fraction is 5% times the chance that a
    # junk point misses all six acceptance disks of radius 0.04 sqrt(chi2_2(1 - 1e-4)) (area 16 box).
    m = n // 20
    junk = x.clone()
    junk[:m] = 4 * torch.rand(m, 2, generator=g, dtype=F64) - 2
    r2 = 0.04**2 * chi2.ppf(1 - 1e-4, 2)
    p_miss = 1 - 6 * math.pi * r2 / 16
    expected = (m * p_miss + (n - m) * 1e-4) / n
    stray = gm.mode_report(junk)["stray"]
    assert abs(stray - expected) < 4 * math.sqrt(expected / n)
    # (c) equal weights instead of 1..6: the extreme modes miss by >> 4 SE.
    flat = GaussianMixture(gm.sde, torch.ones(6), gm.means, gm.stds).sample(n, generator=g)
    rep = gm.mode_report(flat)
    assert (rep["weights"] - gm.weights).abs().max() > 10 * weight_se.max()


def test_mixture_validates_arguments():
    sde = sd.VPSDE.linear()
    with pytest.raises(ValueError):
        GaussianMixture(sde, [1.0, -1.0], [[0.0], [1.0]], 0.1)
    with pytest.raises(ValueError):
        GaussianMixture(sde, [1.0, 1.0], [[0.0], [1.0]], [0.1, 0.0])
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(sde, [1.0, 1.0], [[0.0], [1.0], [2.0]], 0.1)
    with pytest.raises(TypeError, match="sde"):
        GaussianMixture("linear", [1.0], [[0.0]], 0.1)
