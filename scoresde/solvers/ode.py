"""Probability-flow ODE solvers: explicit Runge-Kutta (euler, heun, rk4) and adaptive bridges
to torchdiffeq (dopri5 and its kin) and scipy's solve_ivp (rk45, Song et al.'s sampler).

All of them integrate the PF-ODE in the coordinates y = x/alpha, s = sigma/alpha = exp(-lambda),
where it reads dy/ds = eps(alpha y, t(s)) (Song et al. 2021, DDIM eq. 14; Karras et al. 2022).
There its trajectories are nearly straight: the linear drift is gone and the velocity stays
bounded as t -> 0 even for sharp data, so neither the fixed-step nor the adaptive solvers
stall near the data. In these coordinates Euler's method is exactly DDIM with eta = 0.
"""
from __future__ import annotations

import math

import torch

from .._util import F64, host_floats
from .base import register
from .options import Choice, Number
from .plan import runge_kutta

# Butcher tableaus (a: rows of the strictly lower triangle, b: weights, c: nodes).
EULER = ((), (1.0,), (0.0,))
HEUN = (((1.0,),), (0.5, 0.5), (0.0, 1.0))
RK4 = (((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), (0.0, 0.5, 0.5, 1.0))


@register("euler", grid="quadratic")
def euler(planner):
    """Euler's method on dy/ds = eps (first order; equals DDIM with eta = 0)."""
    runge_kutta(planner, EULER)


@register("heun", grid="quadratic")
def heun(planner):
    """Heun's method (explicit trapezoid, second order; Karras et al. 2022's deterministic sampler)."""
    runge_kutta(planner, HEUN)


@register("rk4", grid="quadratic")
def rk4(planner):
    """The classical fourth-order Runge-Kutta method."""
    runge_kutta(planner, RK4)


def _velocity(model):
    """dy/dlambda = -exp(-lambda) eps(alpha y, t(lambda)) as a function of a host float lambda.

    The adaptive solvers integrate in lambda rather than s: their steps then scale with s on
    their own, and a trial step past the end (torchdiffeq takes them) stays at a valid time.
    Step control runs on the host, so the syncs here cost nothing the method does not pay anyway.
    """
    sde = model.sde
    model.step = None  # no grid: errors name the time only

    def velocity(lam: float, y: torch.Tensor) -> torch.Tensor:
        t = sde.t_from_log_snr(torch.tensor(lam, dtype=F64))
        alpha = float(sde.alpha(t))
        eps = model(y * alpha, float(t))
        model.check_last()  # a NaN would otherwise surface as the step size underflowing
        return eps * -math.exp(-lam)

    return velocity


TORCHDIFFEQ_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


MIN_TOLERANCE = 1e-14  # beneath float64 resolution no step controller can meet a tolerance (scipy's floor too)


TOLERANCE = Number(MIN_TOLERANCE)  # an adaptive ODE solver's rtol and atol


def check_tolerances(rtol, atol) -> tuple[float, float]:
    """An adaptive ODE solver's error tolerances: finite numbers >= MIN_TOLERANCE."""
    return TOLERANCE.check("rtol", rtol), TOLERANCE.check("atol", atol)


@register("dopri5", grid=None, options={"rtol": TOLERANCE, "atol": TOLERANCE,
                                        "method": Choice(*TORCHDIFFEQ_ADAPTIVE)})
def dopri5(model, x, times, *, noise, callback, rtol: float = 1e-5, atol: float = 1e-5,
           method: str = "dopri5"):
    """Adaptive Runge-Kutta through torchdiffeq (any of its adaptive methods by `method`)."""
    from torchdiffeq import odeint

    if x.dtype == torch.float16:  # torchdiffeq's step-size selection overflows float16 (t becomes NaN)
        raise ValueError("dtype=torch.float16: solver 'dopri5' (torchdiffeq) cannot control its steps in float16; "
                         "use float32 or bfloat16, or a fixed-step solver")
    sde, velocity = model.sde, _velocity(model)
    lam_span = sde.log_snr(times[[0, -1]])
    alpha = host_floats(sde.alpha(times[[0, -1]]))
    func = lambda lam, y: velocity(float(lam), y)  # noqa: E731  (sync: see _velocity)
    y = odeint(func, x / alpha[0], lam_span.to(x.device), rtol=rtol, atol=atol, method=method)[-1]
    x = y * alpha[1]
    callback(0, x)  # adaptive: one call, at t_end
    return x


SCIPY_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")


@register("rk45", grid=None, options={"rtol": TOLERANCE, "atol": TOLERANCE, "method": Choice(*SCIPY_METHODS)})
def rk45(model, x, times, *, noise, callback, rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45"):
    """Adaptive integration through scipy.integrate.solve_ivp in float64 (Song et al.'s black-box
    sampler); `method` is any of solve_ivp's."""
    import numpy as np
    from scipy.integrate import solve_ivp

    if torch.is_grad_enabled():
        raise ValueError("grad=True: solver 'rk45' integrates in numpy (scipy), through which no gradient flows; "
                         "use solver='dopri5' or a fixed-step solver")
    sde, velocity = model.sde, _velocity(model)
    lam_span = host_floats(sde.log_snr(times[[0, -1]]))
    alpha = host_floats(sde.alpha(times[[0, -1]]))

    def func(lam, y_flat):
        y = torch.from_numpy(y_flat).to(x.device, x.dtype).reshape(x.shape)
        return velocity(lam, y).to(torch.float64).cpu().numpy().ravel()  # sync: scipy works on the host

    y0 = (x / alpha[0]).to(torch.float64).cpu().numpy().ravel()  # sync: scipy works on the host
    sol = solve_ivp(func, lam_span, y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp({method}) failed: {sol.message}")
    x = torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).to(x.device, x.dtype).reshape(x.shape) * alpha[1]
    callback(0, x)
    return x
