"""eps / x0 / score / v conversions and the Denoiser wrapper (prediction kinds, time inputs)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scoresde as sd
from scoresde import prediction as P

F64 = torch.float64
KINDS = ("eps", "x0", "v", "score")
SETTINGS = settings(deadline=None, max_examples=40)


def _draw(seed, shape, B):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((B,) + shape, generator=g, dtype=F64) for _ in range(2))


def _alphas(seed, B):
    """Per-sample alpha in (0.001, 0.999) and sigma = sqrt(1 - alpha^2), shaped (B, 1, 1)."""
    a = torch.as_tensor(np.random.default_rng(seed).uniform(1e-3, 1 - 1e-3, B)).reshape(B, 1, 1)
    return a, torch.sqrt(1 - a**2)


# ---- conversions ----------------------------------------------------------------------------------
@SETTINGS
@given(st.floats(1e-3, 1 - 1e-3), st.integers(0, 2**31))
def test_conversions_from_definitions(alpha, seed):
    sigma = math.sqrt(1 - alpha**2)
    x0, eps = _draw(seed, (3, 4), 5)
    x = alpha * x0 + sigma * eps
    # Scale of the rounding: x0 = (x - sigma eps)/alpha amplifies ulp(|x|) by 1/alpha, and
    # eps = (x - alpha x0)/sigma by 1/sigma.
    tol = dict(rtol=1e-12, atol=1e-13 / min(alpha, sigma))
    torch.testing.assert_close(P.eps_to_x0(x, eps, alpha, sigma), x0, **tol)
    torch.testing.assert_close(P.x0_to_eps(x, x0, alpha, sigma), eps, **tol)
    # score of N(alpha x0, sigma^2 I) at x is -(x - alpha x0)/sigma^2 = -eps/sigma
    torch.testing.assert_close(P.eps_to_score(eps, sigma), -(x - alpha * x0) / sigma**2, **tol)
    torch.testing.assert_close(P.score_to_eps(-eps / sigma, sigma), eps, **tol)
    # v = alpha eps - sigma x0 (Salimans & Ho 2022); then x0 = alpha x - sigma v, eps = sigma x + alpha v.
    v = P.eps_to_v(x, eps, alpha, sigma)
    torch.testing.assert_close(v, alpha * eps - sigma * x0, **tol)
    torch.testing.assert_close(alpha * x - sigma * v, x0, **tol)
    torch.testing.assert_close(P.v_to_eps(x, v, alpha, sigma), eps, **tol)


@SETTINGS
@given(st.integers(0, 2**31))
def test_round_trips_with_per_sample_alpha(seed):
    B = 6
    alpha, sigma = _alphas(seed, B)
    x, eps = _draw(seed + 1, (3, 2), B)
    tol = dict(rtol=1e-11, atol=1e-11 / float(torch.minimum(alpha, sigma).min()))
    x0 = P.eps_to_x0(x, eps, alpha, sigma)
    torch.testing.assert_close(P.x0_to_eps(x, x0, alpha, sigma), eps, **tol)
    torch.testing.assert_close(P.score_to_eps(P.eps_to_score(eps, sigma), sigma), eps, **tol)
    v = P.eps_to_v(x, eps, alpha, sigma)
    torch.testing.assert_close(P.v_to_eps(x, v, alpha, sigma), eps, **tol)
    # eps -> x0 -> score -> v -> eps, each hop through the eps-form of the next kind.
    e1 = P.x0_to_eps(x, x0, alpha, sigma)
    s1 = P.eps_to_score(e1, sigma)
    v1 = P.eps_to_v(x, P.score_to_eps(s1, sigma), alpha, sigma)
    torch.testing.assert_close(P.v_to_eps(x, v1, alpha, sigma), eps, **tol)


@SETTINGS
@given(st.sampled_from(KINDS), st.integers(0, 2**31))
def test_to_eps_and_from_eps_are_inverse(kind, seed):
    B = 4
    alpha, sigma = _alphas(seed, B)
    x, eps = _draw(seed + 2, (5, 1), B)
    tol = dict(rtol=1e-11, atol=1e-11 / float(torch.minimum(alpha, sigma).min()))
    out = P.from_eps(kind, eps, x, alpha, sigma)
    torch.testing.assert_close(P.to_eps(kind, out, x, alpha, sigma), eps, **tol)
    torch.testing.assert_close(P.from_eps(kind, P.to_eps(kind, eps, x, alpha, sigma), x, alpha, sigma), eps,
                               **tol)
    # and from_eps produces the quantity its name says
    x0 = (x - sigma * eps) / alpha
    expected = {"eps": eps, "x0": x0, "score": -eps / sigma, "v": alpha * eps - sigma * x0}[kind]
    torch.testing.assert_close(out, expected, **tol)


# ---- Denoiser -----------------------------------------------------------------------------------------
MU, C = 0.7, 0.5  # data N(MU, C^2 I)


def exact_eps(sde, x, t):
    """eps of Gaussian data N(MU, C^2): E[eps | x_t] = sigma (x - alpha MU) / (alpha^2 C^2 + sigma^2)."""
    t = torch.as_tensor(t, dtype=F64).expand(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
    a, s = sde.alpha(t), sde.sigma(t)
    return s * (x - a * MU) / (a**2 * C**2 + s**2)


def exact_kind(kind, sde, x, t):
    t = torch.as_tensor(t, dtype=F64).expand(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
    a, s = sde.alpha(t), sde.sigma(t)
    eps = exact_eps(sde, x, t.flatten())
    x0 = (x - s * eps) / a
    return {"eps": eps, "x0": x0, "score": -eps / s, "v": a * eps - s * x0}[kind]


class KindNet:
    """A 'network' returning prediction `kind` of the exact Gaussian model at continuous time t."""

    def __init__(self, kind, sde):
        self.kind, self.sde = kind, sde

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],)
        return exact_kind(self.kind, self.sde, x, t)


SDES = {
    "linear": lambda: sd.VPSDE.linear(),
    "cosine": lambda: sd.VPSDE.cosine(),
    "discrete": lambda: sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64)),
}


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("kind", KINDS)
def test_denoiser_recovers_eps_for_every_prediction_kind(kind, sde_name):
    sde = SDES[sde_name]()
    den = sd.Denoiser(KindNet(kind, sde), sde, prediction=kind)
    g = torch.Generator().manual_seed(0)
    B = 8
    x = torch.randn(B, 2, 3, 3, generator=g, dtype=F64)
    t = (0.02 + 0.96 * torch.rand(B, generator=g, dtype=F64)) * sde.T
    # Conversions near t = T divide by alpha ~ 1e-2: ~1e-14 relative, far below 1e-10.
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(den.eps(x, t), exact_eps(sde, x, t), **tol)
    torch.testing.assert_close(den(x, t), exact_eps(sde, x, t), **tol)
    for other in KINDS:
        torch.testing.assert_close(getattr(den.predict(x, t), other), exact_kind(other, sde, x, t), **tol)
    torch.testing.assert_close(den.x0(x, t), exact_kind("x0", sde, x, t), **tol)
    torch.testing.assert_close(den.score(x, t), exact_kind("score", sde, x, t), **tol)
    torch.testing.assert_close(den.v(x, t), exact_kind("v", sde, x, t), **tol)
    # A Python float t means the same time for every sample.
    tf = float(t[0])
    torch.testing.assert_close(den.eps(x, tf), exact_eps(sde, x, tf), **tol)


class Recorder:
    """Records the time argument it was called with; returns zeros."""

    def __init__(self):
        self.times = []

    def __call__(self, x, t):
        self.times.append(t)
        return torch.zeros_like(x)


@settings(deadline=None, max_examples=25)
@given(st.integers(1, 2000), st.integers(0, 2**31), st.sampled_from([torch.float32, F64]))
def test_index_time_input_on_chain_grid(N, seed, dtype):
    betas = np.sort(np.random.default_rng(seed).uniform(1e-4, 0.05, N))
    sde = sd.VPSDE.from_betas(torch.as_tensor(betas))
    rec = Recorder()
    den = sd.Denoiser(rec, sde, time_input="index")
    n = torch.as_tensor(np.random.default_rng(seed + 1).integers(1, N + 1, 7))
    t = n.to(F64) / N  # step n sits at t = n/N
    den.eps(torch.zeros(7, 3, dtype=dtype), t)
    got = rec.times[-1]
    assert got.dtype == dtype and got.shape == (7,)
    # The 0-based diffusers index n - 1 = tN - 1; t N is n up to one rounding, an exact integer in
    # float32 and within 1e-12 of it in float64.
    torch.testing.assert_close(got.to(F64), (n - 1).to(F64), rtol=0, atol=1e-12 * N)
    assert torch.equal(got.to(F64).round(), (n - 1).to(F64))
    # A Python float time takes the same route to the same index, for every sample.
    den.eps(torch.zeros(7, 3, dtype=dtype), float(n[0]) / N)
    got = rec.times[-1]
    assert got.dtype == dtype and got.shape == (7,)
    torch.testing.assert_close(got.to(F64), torch.full((7,), float(n[0] - 1), dtype=F64), rtol=0, atol=1e-12 * N)


@pytest.mark.parametrize("N", [1, 10, 1000])
def test_index_time_input_with_num_steps(N):
    rec = Recorder()
    # A continuous sde needs the training chain length.
    with pytest.raises(ValueError, match="num_steps"):
        sd.Denoiser(rec, sd.VPSDE.linear(), time_input="index")
    den = sd.Denoiser(rec, sd.VPSDE.linear(), time_input="index", num_steps=N)
    n = torch.arange(1, N + 1)
    den.eps(torch.zeros(N, 2, dtype=F64), n.to(F64) / N)
    torch.testing.assert_close(rec.times[-1], (n - 1).to(F64), rtol=0, atol=1e-12 * N)
    # num_steps overrides a chain's own N: a 50-step chain queried for a 2N-step network.
    chain = sd.VPSDE.from_betas(torch.full((50,), 0.02, dtype=F64))
    den = sd.Denoiser(rec, chain, time_input="index", num_steps=2 * N)
    den.eps(torch.zeros(3, 2, dtype=F64), torch.tensor([0.5, 0.25, 1.0], dtype=F64))
    torch.testing.assert_close(rec.times[-1], torch.tensor([N - 1.0, N / 2 - 1, 2 * N - 1], dtype=F64))


def test_continuous_time_input_and_scalar_t():
    rec = Recorder()
    den = sd.Denoiser(rec, sd.VPSDE.cosine(), time_input="t")
    den.eps(torch.zeros(4, 2, dtype=torch.float32), 0.3)
    got = rec.times[-1]
    assert got.shape == (4,) and got.dtype == torch.float32
    assert torch.equal(got, torch.full((4,), 0.3, dtype=torch.float32))


def test_callable_time_input_gets_float64_t():
    seen = {}

    def to_net_time(t):
        seen["t"] = t
        return 1000.0 * t + 7.0

    rec = Recorder()
    den = sd.Denoiser(rec, sd.VPSDE.linear(), time_input=to_net_time)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float32)
    den.eps(torch.zeros(3, 2, dtype=torch.float32), t)
    assert seen["t"].dtype == F64 and seen["t"].shape == (3,)
    torch.testing.assert_close(seen["t"], t.to(F64))
    torch.testing.assert_close(rec.times[-1], 1000.0 * t.to(F64) + 7.0)  # passed through as is
    den.eps(torch.zeros(3, 2, dtype=torch.float32), 0.25)  # a float t, expanded to (batch,)
    assert seen["t"].dtype == F64 and torch.equal(seen["t"], torch.full((3,), 0.25, dtype=F64))


@pytest.mark.parametrize("kind", KINDS)
def test_net_returning_sample_object(kind):
    sde = sd.VPSDE.linear()
    inner = KindNet(kind, sde)
    den = sd.Denoiser(lambda x, t: SimpleNamespace(sample=inner(x, t)), sde, prediction=kind)
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=F64)
    torch.testing.assert_close(den.eps(x, t), exact_eps(sde, x, t), rtol=1e-10, atol=1e-10)


def test_net_returning_something_else_is_a_type_error():
    den = sd.Denoiser(lambda x, t: [x], sd.VPSDE.linear())
    with pytest.raises(TypeError):
        den.eps(torch.zeros(2, 2), 0.5)


def test_denoiser_validates_its_arguments():
    sde = sd.VPSDE.linear()
    with pytest.raises(TypeError, match="net"):
        sd.Denoiser(42, sde)
    with pytest.raises(TypeError, match="sde"):
        sd.Denoiser(Recorder(), "linear")
    with pytest.raises(ValueError, match="prediction"):
        sd.Denoiser(Recorder(), sde, prediction="noise")
    with pytest.raises(ValueError, match="time_input"):
        sd.Denoiser(Recorder(), sde, time_input="sigma")
    with pytest.raises(ValueError, match="num_steps"):
        sd.Denoiser(Recorder(), sde, num_steps=0)
