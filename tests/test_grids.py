"""Time grids: shape, dtype, exact end points, monotonicity and the spacing each one promises."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scoresde as sd

F64 = torch.float64
EPS = np.finfo(np.float64).eps
SETTINGS = settings(deadline=None, max_examples=40)


@st.composite
def sdes(draw):
    kind = draw(st.sampled_from(["linear", "cosine", "discrete"]))
    if kind == "linear":
        beta_min = draw(st.floats(0.01, 2.0))
        return sd.VPSDE.linear(beta_min, beta_min + draw(st.floats(0.5, 30.0)))
    if kind == "cosine":
        return sd.VPSDE.cosine(s=draw(st.floats(0.0, 0.05)))
    # A DDPM table: sorted uniform betas, alpha_bar_N between ~1e-12 and ~0.1 (realistic chains).
    n = draw(st.integers(1, 2000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    total = draw(st.floats(2.0, 25.0))  # -log alpha_bar_N
    lo = 10.0 ** draw(st.floats(-5.0, -1.0))
    raw = np.sort(rng.uniform(lo, 1.0, n))
    betas = -np.expm1(-total * raw / raw.sum())  # sum of -log(1 - beta) = total
    return sd.VPSDE.from_betas(torch.as_tensor(np.clip(betas, 1e-12, 0.999)))


@st.composite
def t_ends(draw, sde, lowest=1e-5):
    """t_end in (0, T): from `lowest` T up to 0.5 T, log-uniform."""
    return sde.T * 10.0 ** draw(st.floats(math.log10(lowest), math.log10(0.5)))


def spacing_t_ends(sde):
    return t_ends(sde, 1e-5)


def _lam(sde, t):
    return sde.log_snr(t).numpy()


def _check_common(times, sde, steps, t_start, t_end):
    assert isinstance(times, torch.Tensor) and times.dtype == F64 and times.shape == (steps + 1,)
    assert times.device.type == "cpu"
    assert (torch.diff(times) < 0).all()
    assert times[0].item() == t_start, (times[0].item(), t_start)  # exactly, not approximately
    assert times[-1].item() == t_end, (times[-1].item(), t_end)


@pytest.mark.parametrize("name", list(sd.GRIDS))
@SETTINGS
@given(data=st.data())
def test_grid_dtype_length_and_monotone(name, data):
    sde = data.draw(sdes())
    steps = data.draw(st.integers(1, 300))
    t_end = data.draw(t_ends(sde))
    _check_common(sd.GRIDS[name](sde, steps, sde.T, t_end), sde, steps, sde.T, t_end)


@pytest.mark.parametrize("name", list(sd.GRIDS))
def test_grid_starts_exactly_at_T_and_ends_exactly_at_t_end(name):
    # A dense deterministic sweep. Without pinning the ends, T + (t_end - T) * 1.0 (uniform) misses
    # t_end by an ulp for ~90% of these t_end, and t_end + (T - t_end) * 1.0 (quadratic) misses T
    # for some of them.
    grid = sd.GRIDS[name]
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    for sde in (sd.VPSDE.linear(), sd.VPSDE.cosine(), sd.VPSDE.from_betas(betas)):
        for t_end in np.geomspace(1e-5, 0.5, 200) * sde.T:
            for steps in (1, 7, 50):
                _check_common(grid(sde, steps, sde.T, float(t_end)), sde, steps, sde.T, float(t_end))


def _assert_equal_spacing(values: np.ndarray, tol: float):
    """All consecutive differences equal to the mean difference within `tol` (absolute)."""
    d = np.diff(values)
    mean = (values[-1] - values[0]) / (len(values) - 1)
    assert np.abs(d - mean).max() <= tol, (np.abs(d - mean).max(), tol)


@SETTINGS
@given(data=st.data())
def test_uniform_has_equal_t_steps(data):
    sde, steps = data.draw(sdes()), data.draw(st.integers(1, 300))
    times = sd.GRIDS["uniform"](sde, steps, sde.T, data.draw(t_ends(sde))).numpy()
    _assert_equal_spacing(times, 8 * EPS)  # a + (b - a) k/steps: a few roundings of O(1) numbers


@SETTINGS
@given(data=st.data())
def test_quadratic_is_as_documented(data):
    """t_i - t_end = (T - t_end)(1 - i/steps)^2 (Song et al. 2021, DDIM's quadratic spacing)."""
    sde, steps = data.draw(sdes()), data.draw(st.integers(1, 300))
    t_end = data.draw(t_ends(sde))
    times = sd.GRIDS["quadratic"](sde, steps, sde.T, t_end).numpy()
    i = np.arange(steps + 1)
    np.testing.assert_allclose(times, t_end + (sde.T - t_end) * (1 - i / steps) ** 2, rtol=8 * EPS, atol=4 * EPS)
    # Hence sqrt((t - t_end)/(T - t_end)) has equal steps, and the steps in t shrink towards the data.
    _assert_equal_spacing(np.sqrt(np.maximum(times - t_end, 0) / (sde.T - t_end)), 1e-7)
    assert (np.diff(np.diff(times)) > -1e-15).all()


@SETTINGS
@given(data=st.data())
def test_log_snr_grid_has_equal_lambda_steps(data):
    sde, steps = data.draw(sdes()), data.draw(st.integers(1, 300))
    t_end = data.draw(spacing_t_ends(sde))
    times = sd.GRIDS["log_snr"](sde, steps, sde.T, t_end)
    lam = _lam(sde, times)
    # lambda(t_from_log_snr(l)) = l up to a few ulp of |l| (the inverse's round trip).
    _assert_equal_spacing(lam, 1e-11 * (1 + np.abs(lam).max()))
    assert (np.diff(lam) > 0).all()  # lambda increases as t decreases


@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
@SETTINGS
@given(data=st.data())
def test_karras_has_equal_steps_in_sigma_over_alpha_to_one_over_rho(rho, data):
    """Karras et al. (2022), eq. 5: equal steps in sigma^(1/rho), sigma = sigma_t/alpha_t here."""
    sde, steps = data.draw(sdes()), data.draw(st.integers(1, 300))
    t_end = data.draw(spacing_t_ends(sde))
    grid = sd.GRIDS["karras"] if rho == 7.0 else functools.partial(sd.grids.karras, rho=rho)
    times = grid(sde, steps, sde.T, t_end)
    _check_common(times, sde, steps, sde.T, t_end)
    s = np.exp(-_lam(sde, times) / rho)  # (sigma/alpha)^(1/rho)
    # Each point carries the lambda round trip error (~1e-12 relative in sigma/alpha).
    _assert_equal_spacing(s, 1e-10 * s.max())


def test_karras_default_rho_is_seven():
    sde = sd.VPSDE.linear()
    a = sd.GRIDS["karras"](sde, 20, sde.T, 1e-3)
    b = sd.grids.karras(sde, 20, sde.T, 1e-3, rho=7.0)
    assert torch.equal(a, b)
    c = sd.grids.karras(sde, 20, sde.T, 1e-3, rho=3.0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", list(sd.GRIDS))
def test_grid_with_explicit_start(name):
    # t_start is honoured too, not only T.
    sde = sd.VPSDE.cosine()
    times = sd.GRIDS[name](sde, 17, 0.8, 0.01)
    _check_common(times, sde, 17, 0.8, 0.01)


def test_grids_differ_where_they_should():
    # uniform: equal t steps; log_snr and karras crowd the points near the data; quadratic too.
    sde = sd.VPSDE.linear()
    g = {name: fn(sde, 10, sde.T, 1e-3).numpy() for name, fn in sd.GRIDS.items()}
    last_step = {name: t[-2] - t[-1] for name, t in g.items()}
    assert last_step["uniform"] > last_step["quadratic"]
    assert last_step["uniform"] > last_step["log_snr"]
    assert last_step["uniform"] > last_step["karras"]
    assert set(sd.GRIDS) >= {"uniform", "quadratic", "log_snr", "karras"}


def test_karras_survives_extreme_chain():
    """(sigma/alpha)^(1/rho) is formed as exp(-lambda/rho): exp(-lambda) alone overflows once
    lambda(T) < -709, i.e. for chains with alpha_bar_N < 1e-616."""
    sde = sd.VPSDE.from_betas(torch.full((2000,), 0.6, dtype=F64))  # lambda(T) = 1000 log(0.4) ~ -916
    times = sd.GRIDS["karras"](sde, 10, sde.T, 1e-3)
    assert torch.isfinite(times).all() and (torch.diff(times) < 0).all()
