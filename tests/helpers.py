"""Shared test helpers: errors of a solver against the exact probability-flow map of a Gaussian
and the log-log slope that turns them into an order; two training runs compared bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import scoresde as sd
from scoresde import checkpoint as ckpt

F64 = torch.float64
MEAN, STD = [0.7, -0.4], 0.5  # a non-trivial Gaussian: off-centre and narrower than the prior
SDES = {"linear": sd.VPSDE.linear, "cosine": sd.VPSDE.cosine}


def fitted_order(steps, errors) -> float:
    """Slope of log(error) against log(1/steps): the empirical order of convergence."""
    return float(np.polyfit(np.log(1.0 / np.asarray(steps, float)), np.log(np.asarray(errors, float)), 1)[0])


def flow_errors(sde, solver, steps_list, grid="log_snr", t_end=1e-3, seed=1, **options) -> list[float]:
    """Max error against the exact Gaussian flow from T to t_end, for each step count."""
    data = sd.Gaussian(sde, MEAN, STD)
    x_T = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
    exact = data.flow(x_T, sde.T, t_end)
    return [(sd.sample(data, sde, x_T=x_T, solver=solver, grid=sd.GRIDS[grid](sde, n, sde.T, t_end),
                       final_denoise=False, **options) - exact).abs().max().item() for n in steps_list]


def assert_order(steps_list, errors, order, band):
    """The fitted slope lies within `band` of `order`, measured well above float64 round-off."""
    assert errors[-1] > 1e3 * np.finfo(np.float64).eps, "error reached round-off: the fit would be meaningless"
    assert fitted_order(steps_list, errors) == pytest.approx(order, abs=band), errors


def assert_same_run(root_a, root_b):
    """Step, weights, EMA and optimiser moments bit for bit."""
    a, b = ckpt.load_checkpoint(root_a), ckpt.load_checkpoint(root_b)
    assert a.step == b.step
    for name in a.model_state:
        assert torch.equal(a.model_state[name], b.model_state[name]), name
        assert torch.equal(a.ema_state[name], b.ema_state[name]), name
    for key, moments in a.state["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[name], b.state["optimizer"]["state"][key][name]), (key, name)
