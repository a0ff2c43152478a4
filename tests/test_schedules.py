"""Schedule and VP-SDE identities for the linear, cosine and discrete (DDPM table) schedules.

Every check compares the library with an independent reference: a numpy closed form, an mpmath
evaluation, torch.autograd, or scipy quadrature. Tolerances are stated next to each assertion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import integrate

import scoresde as sd

F64 = torch.float64
EPS = np.finfo(np.float64).eps
SETTINGS = settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])


# ---- independent references (numpy, written from the formulas of DESIGN.md) -------------------
@dataclass
class Case:
    kind: str
    sde: sd.VPSDE
    log_alpha: Callable[[np.ndarray], np.ndarray]  # reference log alpha(t)
    beta: Callable[[np.ndarray], np.ndarray]  # reference beta(t); discrete: inside segments
    params: dict

    @property
    def T(self) -> float:
        return self.sde.T


def linear_case(beta_min: float, beta_max: float) -> Case:
    delta = beta_max - beta_min
    return Case(
        "linear", sd.VPSDE.linear(beta_min, beta_max),
        lambda t: -0.5 * (beta_min * t + 0.5 * delta * t**2),
        lambda t: beta_min + delta * t,
        dict(beta_min=beta_min, beta_max=beta_max),
    )


def cosine_case(s: float) -> Case:
    def angle(t):
        return (t + s) / (1 + s) * np.pi / 2

    return Case(
        "cosine", sd.VPSDE.cosine(s=s),
        # cos(a0 + d)/cos(a0) = 1 - 2 sin^2(d/2) - tan(a0) sin d: no cancellation near t = 0.
        lambda t: np.log1p(-2 * np.sin(angle(t) / 2 - angle(0.0) / 2) ** 2
                           - np.tan(angle(0.0)) * np.sin(angle(t) - angle(0.0))),
        lambda t: np.pi / (1 + s) * np.tan(angle(t)),  # -d log(f(t)/f(0))/dt
        dict(s=s),
    )


def discrete_case(betas: np.ndarray) -> Case:
    N = len(betas)
    knots = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-betas))])

    def beta(t):
        seg = np.clip(np.ceil(np.asarray(t) * N).astype(int), 1, N)  # segment n holds ((n-1)/N, n/N]
        return -N * np.log1p(-betas[seg - 1])

    return Case(
        "discrete", sd.VPSDE.from_betas(torch.as_tensor(betas)),
        lambda t: np.interp(np.asarray(t) * N, np.arange(N + 1), knots),
        beta,
        dict(betas=betas, knots=knots, N=N),
    )


@st.composite
def linear_cases(draw):
    beta_min = draw(st.floats(0.0, 2.0))
    beta_max = beta_min + draw(st.floats(0.05, 40.0))
    return linear_case(beta_min, beta_max)


@st.composite
def cosine_cases(draw):
    return cosine_case(draw(st.floats(0.0, 0.05)))


@st.composite
def betas_arrays(draw, max_n=2000, max_hi=0.999):
    """Sorted uniform draws on (lo, hi) inside (0, 1); N from 1 to max_n."""
    n = draw(st.integers(1, max_n))
    lo = 10.0 ** draw(st.floats(-6.0, min(-0.5, math.log10(max_hi) - 0.3)))
    hi = draw(st.floats(lo, max_hi))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return np.sort(rng.uniform(lo, hi, n))


@st.composite
def discrete_cases(draw, max_n=2000, max_hi=0.999):
    return discrete_case(draw(betas_arrays(max_n, max_hi)))


def any_case():
    return st.one_of(linear_cases(), cosine_cases(), discrete_cases())


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def time_grid(case: Case) -> np.ndarray:
    """Times over (0, T]: log-spaced near the data, linear elsewhere, plus T itself."""
    T = case.T
    t = np.concatenate([np.geomspace(1e-6, 1e-2, 60) * T, np.linspace(1e-2, 1.0, 500) * T])
    if case.kind == "discrete":  # every knot and every segment midpoint up to T
        N = case.params["N"]
        t = np.concatenate([t, np.arange(1, N + 1) / N, (np.arange(N) + 0.5) / N])
    t = np.unique(np.clip(t, None, T))
    # Times within a few ulp of each other (a knot n/N next to a linspace point) have one float64
    # lambda: no schedule can order them, so keep one of each such pair.
    return t[np.concatenate([[True], np.diff(t) > 1e-12 * t[1:]])]


# ---- alpha, sigma, log-SNR ---------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    pytest.param(lambda: sd.VPSDE.linear(), id="linear"),
    pytest.param(lambda: sd.VPSDE.linear(0.0, 5.0), id="linear-bmin0"),
    pytest.param(lambda: sd.VPSDE.from_betas([0.3, 0.5]), id="discrete"),
    pytest.param(lambda: sd.VPSDE.cosine(s=0.0), id="cosine-s0"),
    pytest.param(lambda: sd.VPSDE.cosine(), id="cosine-default"),
])
def test_time_zero_is_the_data(make):
    sde = make()
    t0 = torch.zeros(3, dtype=F64)
    assert (sde.log_alpha(t0) == 0).all() and (sde.alpha(t0) == 1).all() and (sde.sigma(t0) == 0).all()
    assert (sde.log_snr(t0) == math.inf).all()


@SETTINGS
@given(any_case())
def test_alpha_squared_plus_sigma_squared_is_one(case):
    t = t64(time_grid(case))
    alpha, sigma = case.sde.alpha(t), case.sde.sigma(t)
    assert alpha.dtype == sigma.dtype == F64
    # alpha^2 and sigma^2 = -expm1(2 log alpha) are each within a few ulp of exact: their sum too.
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=8 * EPS)


@SETTINGS
@given(any_case())
def test_log_alpha_matches_closed_form(case):
    t = time_grid(case)
    ref = case.log_alpha(t)
    got = case.sde.log_alpha(t64(t)).numpy()
    # Same formula, different rounding: a few ulp of the terms; a discrete chain accumulates
    # one rounding per knot in the cumulative sum (N <= 2000), hence the (1 + |ref|) scale.
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13 * (1 + np.abs(ref)).max())


def _mp_sigma(case: Case, t: float):
    """sigma(t) = sqrt(1 - alpha^2) evaluated with 50 digits from the float64 parameters."""
    import mpmath as mp

    mt = mp.mpf(t)
    if case.kind == "linear":
        bmin, bmax = mp.mpf(case.params["beta_min"]), mp.mpf(case.params["beta_max"])
        la = -(bmin * mt + (bmax - bmin) * mt**2 / 2) / 2
    elif case.kind == "cosine":
        s = mp.mpf(case.params["s"])
        angle = lambda u: (u + s) / (1 + s) * mp.pi / 2  # noqa: E731
        la = mp.log(mp.cos(angle(mt))) - mp.log(mp.cos(angle(0)))
    else:
        betas, N = case.params["betas"], case.params["N"]
        pos = mt * N
        n = max(int(mp.ceil(pos)), 1)
        left = sum(mp.log1p(-mp.mpf(b)) for b in betas[: n - 1]) / 2
        right = left + mp.log1p(-mp.mpf(betas[n - 1])) / 2
        la = left + (pos - (n - 1)) * (right - left)
    return mp.sqrt(-mp.expm1(2 * la))


SMALL_T = np.geomspace(1e-10, 1e-1, 25)


def _check_sigma_relative(case: Case, t: np.ndarray, rtol: float):
    mp = pytest.importorskip("mpmath")  # ships with torch (through sympy)

    with mp.workdps(50):
        ref = np.array([float(_mp_sigma(case, float(ti))) for ti in t])
    got = case.sde.sigma(t64(t)).numpy()
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=0)


@SETTINGS
@given(st.one_of(linear_cases(), discrete_cases()))
def test_sigma_relative_accuracy_near_zero(case):
    # sigma ~ sqrt(2 |log alpha|) -> 0: 1 - alpha^2 must not be formed by subtraction (expm1),
    # and log alpha itself must be relatively accurate. A few ulp of log alpha give ~1e-15.
    _check_sigma_relative(case, SMALL_T * case.T, rtol=1e-12)


@pytest.mark.parametrize("s", [0.0, 0.008, 0.05])
def test_cosine_sigma_relative_accuracy_near_zero(s):
    case = cosine_case(s)
    _check_sigma_relative(case, SMALL_T * case.T, rtol=1e-12)


@SETTINGS
@given(cosine_cases())
def test_cosine_sigma_accuracy_from_t_min(case):
    # What the cosine schedule achieves today over the sampling range [t_min = 1e-3, T]: the
    # subtraction of two logs of size ~ a0^2/2 <= 3e-3 (or log cos x ~ x^2/2 ~ 3e-6 for s = 0)
    # loses at most ~ eps / 3e-6 ~ 4e-11 relative in log alpha, half of that in sigma.
    _check_sigma_relative(case, np.geomspace(1e-3, 1.0, 15) * case.T, rtol=1e-9)


@SETTINGS
@given(any_case())
def test_log_snr_strictly_decreasing(case):
    t = time_grid(case)
    lam = case.sde.log_snr(t64(t)).numpy()
    assert np.isfinite(lam).all()
    assert (np.diff(lam) < 0).all()
    # The half log-SNR is log(alpha / sigma), not the full log(alpha^2 / sigma^2).
    la = case.log_alpha(t)
    np.testing.assert_allclose(lam, la - 0.5 * np.log(-np.expm1(2 * la)), rtol=1e-10, atol=1e-10)


@SETTINGS
@given(any_case(), st.floats(1e-6, 1.0), st.floats(1e-6, 1.0))
def test_log_snr_decreasing_random_pair(case, u, v):
    # (Below ~1e-160 log alpha itself underflows for beta_min = 0, and lambda = inf is all float64 has.)
    t1, t2 = sorted([u * case.T, v * case.T])
    if t2 - t1 <= 1e-12 * t2:  # closer than float64's lambda (|lambda| up to ~25, dlambda ~ dt/2t) can resolve
        return
    lam = case.sde.log_snr(t64([t1, t2]))
    assert lam[0] > lam[1]


def _round_trip_error(case: Case, t: np.ndarray):
    """|t_from_log_snr(log_snr(t)) - t| and its derived tolerance.

    Condition number of the inverse: a relative rounding of lambda (and of log alpha inside it)
    of a few ulp moves t by ~ ulp (1 + |lambda|) / |d lambda/dt|, d lambda/dt = -beta/(2 sigma^2).
    """
    lam = case.sde.log_snr(t64(t))
    back = case.sde.t_from_log_snr(lam).numpy()
    sigma2 = -np.expm1(2 * case.log_alpha(t))
    dlam = case.beta(t) / (2 * sigma2)
    tol = 64 * EPS * (t + (1 + np.abs(lam.numpy())) / dlam)
    return np.abs(back - t), tol


@SETTINGS
@given(st.one_of(linear_cases(), discrete_cases()))
def test_t_from_log_snr_inverts_log_snr(case):
    err, tol = _round_trip_error(case, time_grid(case))
    assert (err <= tol).all(), np.max(err / tol)
    assert err.max() < 1e-12


@pytest.mark.parametrize("s", [0.0, 0.008, 0.05])
def test_cosine_t_from_log_snr_inverts_log_snr(s):
    case = cosine_case(s)
    err, tol = _round_trip_error(case, time_grid(case))
    assert (err <= tol).all(), np.max(err / tol)


@SETTINGS
@given(cosine_cases())
def test_cosine_t_from_log_snr_round_trip_absolute(case):
    # What the current cosine inverse achieves: arccos of cos(angle) = exp(log alpha + log f(0)/2),
    # carrying ~eps absolute, returns the angle to ~eps / sin(angle); t = angle 2(1+s)/pi - s.
    s = case.params["s"]
    t = time_grid(case)
    err, tol = _round_trip_error(case, t)
    angle = (t + s) / (1 + s) * np.pi / 2
    tol = tol + 64 * EPS / np.sin(angle) * 2 * (1 + s) / np.pi
    assert (err <= tol).all(), np.max(err / tol)
    assert err.max() < 1e-10


# ---- beta = -2 d log alpha / dt ----------------------------------------------------------------
def _interior_times(case: Case, u: np.ndarray) -> np.ndarray:
    """Times in (0, T); for a chain, strictly inside segments (away from the knots)."""
    if case.kind != "discrete":
        return u * case.T
    N = case.params["N"]
    n = np.floor(u * N)  # segment index 0..N-1
    frac = 0.05 + 0.9 * ((u * N) % 1.0)
    return (n + frac) / N


@SETTINGS
@given(any_case(), st.integers(0, 2**32 - 1))
def test_beta_is_minus_twice_autograd_of_log_alpha(case, seed):
    u = np.random.default_rng(seed).uniform(0.001, 0.999, 64)
    t = t64(_interior_times(case, u)).requires_grad_(True)
    (grad,) = torch.autograd.grad(case.sde.log_alpha(t).sum(), t)
    beta = case.sde.beta(t.detach())
    # Analytic derivative vs autograd of the same float64 expression: a few ulp apart.
    torch.testing.assert_close(beta, -2 * grad, rtol=1e-12, atol=0)
    np.testing.assert_allclose(beta.numpy(), case.beta(t.detach().numpy()), rtol=1e-12)


@settings(deadline=None, max_examples=15)
@given(st.one_of(linear_cases(), cosine_cases(), discrete_cases(max_n=40)), st.floats(0.01, 1.0))
def test_beta_integrates_to_minus_twice_log_alpha(case, u):
    t = u * case.T
    beta = lambda s: float(case.sde.beta(torch.tensor(s, dtype=F64)))  # noqa: E731
    points = None
    if case.kind == "discrete":  # beta is piecewise constant: tell quad where it jumps
        knots = np.arange(1, case.params["N"]) / case.params["N"]
        points = knots[knots < t] if (knots < t).any() else None
    integral, err = integrate.quad(beta, 0.0, t, points=points, limit=200, epsabs=1e-13, epsrel=1e-13)
    expected = -2.0 * float(case.sde.log_alpha(torch.tensor(t, dtype=F64)))
    # quad's own error estimate plus a margin: the integrand is smooth (or constant) per piece.
    assert abs(integral - expected) <= 1e-10 * (1 + abs(expected)) + 10 * err


# ---- linear schedule ----------------------------------------------------------------------------
@SETTINGS
@given(linear_cases())
def test_linear_closed_forms(case):
    bmin, bmax = case.params["beta_min"], case.params["beta_max"]
    t = np.linspace(0.0, 1.0, 101)
    sde = case.sde
    # beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021)
    np.testing.assert_allclose(sde.beta(t64(t)).numpy(), bmin + t * (bmax - bmin), rtol=1e-14, atol=1e-14)
    # alpha(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2) / 2)
    alpha = np.exp(-0.5 * (bmin * t + 0.5 * (bmax - bmin) * t**2))
    np.testing.assert_allclose(sde.alpha(t64(t)).numpy(), alpha, rtol=1e-14)
    np.testing.assert_allclose(sde.sigma(t64(t)).numpy(), np.sqrt(1 - alpha**2), rtol=1e-10, atol=1e-15)
    assert sde.T == 1.0 and sde.num_steps is None and sde.t_min == 1e-3


def test_linear_discretize_is_ho_linspace():
    """Ho et al. (2020): betas = linspace(1e-4, 0.02, 1000)."""
    got = sd.VPSDE.linear(0.1, 20.0).discretize(1000)
    assert got.dtype == F64 and got.shape == (1000,)
    # Not bit-identical by construction: 0.1/1000 and 20/1000 are rounded quotients (the literal
    # 1e-4 is the nearest double to 10^-4, 0.1/1000 is the rounded quotient of a rounded 0.1), and
    # torch.linspace and numpy.linspace use different interpolation formulas (each ~1 ulp off the
    # exact value). So each entry may differ by a couple of ulp, never by more.
    ref = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_array_max_ulp(got.numpy(), ref, maxulp=4)
    assert np.abs(got.numpy() - ref).max() <= 4 * np.spacing(0.02)


@SETTINGS
@given(st.floats(0.01, 2.0), st.floats(0.1, 40.0), st.integers(2, 5000))
def test_linear_discretize_song_formula(beta_min, width, N):
    beta_max = beta_min + width
    if beta_max / N >= 1:
        with pytest.raises(ValueError, match="N="):
            sd.VPSDE.linear(beta_min, beta_max).discretize(N)
        return
    got = sd.VPSDE.linear(beta_min, beta_max).discretize(N).numpy()
    i = np.arange(1, N + 1)
    # Song et al. (2021), appendix: beta_i = beta_min/N + (i-1)(beta_max-beta_min)/(N(N-1)).
    ref = beta_min / N + (i - 1) * (beta_max - beta_min) / (N * (N - 1))
    np.testing.assert_allclose(got, ref, rtol=8 * EPS, atol=8 * EPS * beta_max / N)


def test_linear_discretize_single_step():
    # N = 1: Song's formula has 0/0 in its slope; the single step is beta_min / N.
    sde = sd.VPSDE.linear(0.1, 0.5)
    assert sde.discretize(1).tolist() == [0.1]


def test_linear_discretization_chain_converges_at_first_order():
    """Song's betas are not alpha_bar-matching: the chain's log alpha_bar differs from the SDE's
    by O(1/N) (Riemann-sum offset plus sum beta_i^2 / 2). Fit the order from a log-log slope."""
    sde = sd.VPSDE.linear(0.1, 20.0)
    Ns = np.array([250, 500, 1000, 2000, 4000, 8000])
    errs = []
    for N in Ns:
        chain = sd.VPSDE.from_betas(sde.discretize(int(N)))
        t = torch.arange(1, N + 1, dtype=F64) / N
        errs.append((chain.log_alpha(t) - sde.log_alpha(t)).abs().max().item())
    slope = np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert -1.1 < slope < -0.9, (slope, errs)


# ---- cosine schedule ----------------------------------------------------------------------------
@SETTINGS
@given(cosine_cases())
def test_cosine_alpha_bar_is_f_over_f0(case):
    """Nichol & Dhariwal (2021): alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t+s)/(1+s) pi/2)."""
    s = case.params["s"]
    f = lambda t: np.cos((t + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    t = np.linspace(0.0, case.T, 301)
    # f(T)/f(0) ~ 7e-5: cos of an angle near pi/2 carries ~ ulp(pi/2)/cos ~ 3e-14 relative error.
    np.testing.assert_allclose(case.sde.alpha(t64(t)).numpy() ** 2, f(t) / f(0.0), rtol=1e-11)
    assert case.sde.T == 0.9946 and case.sde.num_steps is None


@SETTINGS
@given(cosine_cases(), st.integers(1, 2000))
def test_cosine_discretize_is_nichol_dhariwal(case, N):
    s = case.params["s"]
    f = lambda t: np.cos((t + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    alpha_bar = lambda t: f(t) / f(0.0)  # noqa: E731
    n = np.arange(1, N + 1)
    ref = np.minimum(1 - alpha_bar(n / N) / alpha_bar((n - 1) / N), 0.999)
    got = case.sde.discretize(N).numpy()
    assert got.shape == (N,)
    # Small betas come out of 1 - ratio with ratio ~ 1: both sides carry ~1e-16 absolute error.
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14)
    assert got[-1] == 0.999  # alpha(1) = 0: the last step is the clipped one


# ---- the discrete chain ---------------------------------------------------------------------------
@SETTINGS
@given(discrete_cases())
def test_discrete_knots_are_cumprod(case):
    betas, N = case.params["betas"], case.params["N"]
    n = np.arange(1, N + 1)
    alpha_bar = np.cumprod(1 - betas)
    got_log = 2 * case.sde.log_alpha(t64(n / N)).numpy()
    got = np.exp(got_log)
    normal = alpha_bar > 1e-250  # where cumprod has not underflowed into subnormals
    # cumprod: n roundings (relative n eps); the library's exp(sum log1p): n roundings of terms up
    # to |log alpha_bar| in size -> absolute n eps (1 + |log alpha_bar|) in the exponent.
    tol = 4 * n * EPS * (2 + np.abs(got_log))
    assert (np.abs(got[normal] / alpha_bar[normal] - 1) <= tol[normal]).all()
    assert (alpha_bar[~normal] < 1e-240).all() and (got[~normal] < 1e-240).all()


@SETTINGS
@given(discrete_cases(), st.integers(0, 2**32 - 1))
def test_discrete_log_alpha_linear_between_knots(case, seed):
    N, knots = case.params["N"], case.params["knots"]
    rng = np.random.default_rng(seed)
    n = rng.integers(1, N + 1, 50)
    w = rng.uniform(0, 1, 50)
    t = (n - 1 + w) / N
    expected = (1 - w) * knots[n - 1] + w * knots[n]
    got = case.sde.log_alpha(t64(t)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13 * (1 + np.abs(knots).max()))


@SETTINGS
@given(discrete_cases())
def test_discrete_beta_on_segment(case):
    betas, N = case.params["betas"], case.params["N"]
    n = np.arange(1, N + 1)
    # Just after the left knot, the middle, just before the right knot. (At a float knot fl(n/N),
    # ceil(fl(n/N) N) picks the segment the rounded time really lies in, which may be n + 1.)
    for frac in (1e-9, 0.5, 1 - 1e-9):
        t = (n - 1 + frac) / N
        got = case.sde.beta(t64(t)).numpy()
        np.testing.assert_allclose(got, -N * np.log1p(-betas), rtol=1e-12)


@SETTINGS
@given(discrete_cases())
def test_discretize_of_chain_returns_its_betas(case):
    betas = case.params["betas"]
    got = case.sde.discretize(case.params["N"])
    assert got.dtype == F64
    assert torch.equal(got, torch.as_tensor(betas))  # exactly, not approximately


def _check_chain_reproduces(sde: sd.VPSDE, M: int):
    betas = sde.discretize(M)
    # A respaced step can swallow so much noise that 1 - alpha_bar ratio rounds to beta = 1.0,
    # which no DDPM table can hold (from_betas rightly refuses it): nothing to compare then.
    assume(bool((betas < 1).all()))
    unclipped = int(torch.nonzero(betas >= 0.999)[0]) if (betas >= 0.999).any() else M
    chain = sd.VPSDE.from_betas(betas)
    assert chain.num_steps == M
    t = torch.arange(1, unclipped + 1, dtype=F64) / M
    ref = sde.log_alpha(t)
    # log1p(expm1(2 d)) / 2 = d up to a few ulp per knot; the cumulative sum adds n ulp of |log alpha|.
    tol = 1e-13 * (1 + ref.abs()) * (1 + torch.arange(1, unclipped + 1) / 100)
    assert ((chain.log_alpha(t) - ref).abs() <= tol).all()


@SETTINGS
@given(cosine_cases(), st.integers(1, 2000))
def test_from_betas_of_cosine_discretize_matches_alpha_at_knots(case, M):
    _check_chain_reproduces(case.sde, M)


@SETTINGS
@given(discrete_cases(max_hi=0.1), st.integers(1, 2000))
def test_from_betas_of_chain_respacing_matches_alpha_at_knots(case, M):
    # Respacing an N-step chain to M steps keeps alpha at the M knots (Nichol & Dhariwal 2021).
    _check_chain_reproduces(case.sde, M)


@SETTINGS
@given(discrete_cases(), st.integers(0, 2**32 - 1))
def test_t_to_index_round_trip(case, seed):
    sde, N = case.sde, case.params["N"]
    assert sde.num_steps == N and sde.t_min == 1.0 / N and sde.T == 1.0
    n = torch.arange(1, N + 1, dtype=F64)
    idx = sde.t_to_index(sde.index_to_t(n))
    assert torch.allclose(idx, n, rtol=2 * EPS, atol=0) and torch.equal(idx.round(), n)
    t = t64(np.random.default_rng(seed).uniform(0, 1, 100))
    torch.testing.assert_close(sde.index_to_t(sde.t_to_index(t)), t, rtol=2 * EPS, atol=0)
    # On a chain, step n sits at t = n/N.
    assert torch.allclose(sde.t_to_index(n / N), n, rtol=2 * EPS, atol=0)


def test_t_to_index_needs_N_for_continuous():
    sde = sd.VPSDE.linear()
    with pytest.raises(ValueError, match="N"):
        sde.t_to_index(torch.tensor([0.5], dtype=F64))
    assert float(sde.t_to_index(torch.tensor(0.25, dtype=F64), N=1000)) == 250.0
    assert float(sde.index_to_t(torch.tensor(250.0, dtype=F64), N=1000)) == 0.25


@pytest.mark.parametrize("N", [0, -3])
def test_discretize_rejects_bad_N(N):
    with pytest.raises(ValueError, match="N="):
        sd.VPSDE.cosine().discretize(N)


def test_from_betas_rejects_betas_outside_open_interval():
    for bad in ([0.1, 1.0], [0.0, 0.2], [], [[0.1]]):
        with pytest.raises(ValueError, match="betas"):
            sd.VPSDE.from_betas(bad)


# ---- SDE coefficients, marginal, prior ---------------------------------------------------------
@SETTINGS
@given(any_case(), st.integers(0, 2**32 - 1))
def test_drift_diffusion_reverse_and_pf_drift(case, seed):
    g = torch.Generator().manual_seed(seed)
    B = 5
    x = torch.randn(B, 3, 4, 2, generator=g, dtype=F64)
    score = torch.randn(B, 3, 4, 2, generator=g, dtype=F64)
    u = torch.rand(B, generator=g, dtype=F64).numpy() * 0.98 + 0.01
    t_np = _interior_times(case, u)
    t = t64(t_np)
    beta = t64(case.beta(t_np)).reshape(B, 1, 1, 1)  # independent reference beta, per sample
    sde = case.sde
    f = sde.drift(x, t)
    torch.testing.assert_close(f, -0.5 * beta * x, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(sde.diffusion(t), beta.flatten().sqrt(), rtol=1e-12, atol=0)
    # Reverse SDE drift f - g^2 score and probability-flow drift f - g^2 score / 2 (Song et al. 2021).
    torch.testing.assert_close(sde.reverse_drift(x, t, score), -0.5 * beta * x - beta * score,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sde.pf_drift(x, t, score), -0.5 * beta * x - 0.5 * beta * score,
                               rtol=1e-12, atol=1e-12)
    # Per-sample t: row b uses t[b] only (same as calling with that scalar time).
    for b in range(B):
        tb = float(t[b])
        torch.testing.assert_close(sde.pf_drift(x[b:b + 1], tb, score[b:b + 1]),
                                   sde.pf_drift(x, t, score)[b:b + 1], rtol=1e-14, atol=0)
    # Output keeps x's dtype.
    assert sde.drift(x.float(), t).dtype == torch.float32


@SETTINGS
@given(any_case(), st.integers(0, 2**32 - 1))
def test_marginal_is_alpha_x0_plus_sigma_noise(case, seed):
    g = torch.Generator().manual_seed(seed)
    B = 6
    x0 = torch.randn(B, 2, 3, 3, generator=g, dtype=F64)
    z = torch.randn(B, 2, 3, 3, generator=g, dtype=F64)
    t_np = torch.rand(B, generator=g, dtype=F64).numpy() * case.T
    alpha = np.exp(case.log_alpha(t_np))
    sigma = np.sqrt(-np.expm1(2 * case.log_alpha(t_np)))
    expected = t64(alpha).reshape(B, 1, 1, 1) * x0 + t64(sigma).reshape(B, 1, 1, 1) * z
    torch.testing.assert_close(case.sde.marginal(x0, t64(t_np), z), expected, rtol=1e-11, atol=1e-13)
    # A Python float t applies to every sample.
    tt = float(t_np[0])
    a, s = math.exp(case.log_alpha(np.array(tt))), math.sqrt(-math.expm1(2 * case.log_alpha(np.array(tt))))
    torch.testing.assert_close(case.sde.marginal(x0, tt, z), a * x0 + s * z, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("shape", [(7, 1), (4, 3), (3, 2, 5, 5)])
def test_prior_logp_is_standard_normal(shape):
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(shape, generator=g, dtype=F64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    for sde in (sd.VPSDE.linear(), sd.VPSDE.cosine(), sd.VPSDE.from_betas([0.1, 0.2])):
        got = sde.prior_logp(x)
        assert got.shape == (shape[0],)
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-12)


def test_prior_sample_is_seeded_standard_normal():
    sde = sd.VPSDE.linear()
    a = sde.prior_sample((4000, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    b = sde.prior_sample((4000, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.equal(a, b) and a.dtype == F64
    # mean SE 1/sqrt(8000) ~ 0.011, variance SE sqrt(2/8000) ~ 0.016; 5 SE bounds.
    assert abs(a.mean().item()) < 5 / math.sqrt(8000)
    assert abs(a.var().item() - 1) < 5 * math.sqrt(2 / 8000)
