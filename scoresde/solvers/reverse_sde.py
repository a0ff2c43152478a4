"""Reverse-SDE solvers: Euler-Maruyama on dx = [f - g^2 score] dt + g dw (Song et al. 2021), and a
bridge to torchsde's solvers driven by the generator's draws."""
from __future__ import annotations

import math

import torch
import torchsde

from .._util import F64, host_floats
from .base import BrownianNoise, register
from .options import Choice


@register("euler_maruyama", grid="quadratic", stochastic=True)
def euler_maruyama(planner):
    """Euler-Maruyama on the reverse SDE, whose drift is a x + b score = a x - (b/sigma) eps:
    x <- x - dt (a x - (b/sigma) eps) + g sqrt(dt) z,  dt = t_i - t_{i+1} > 0 (for the VP-SDE
    x + dt (beta x / 2 - beta eps / sigma) + sqrt(beta dt) z)."""
    sde, times = planner.sde, planner.times
    t, dt = times[:-1], times[:-1] - times[1:]
    a, b = sde.drift_coefficients(t)
    keep, eps_coef, noise_coef = (planner.values(v) for v in (1.0 - a * dt, b * dt / sde.sigma(t),
                                                                sde.diffusion(t) * torch.sqrt(dt)))
    start = planner.nodes(t)
    for i in range(planner.steps):
        eps = planner.stage(*start[i], "eps")
        planner.step(i, x=keep[i], terms=[(eps, eps_coef[i])], noise=noise_coef[i])


TORCHSDE_METHODS = ("euler", "milstein", "srk", "midpoint", "heun")
# Model calls of each method: (per step, less on the first step). Counted, not derived from torchsde's
# internals; tests/test_solvers.py checks them against the calls a run makes.
TORCHSDE_CALLS = {"euler": (1, 0), "milstein": (1, 0), "srk": (10, 3), "midpoint": (2, 0), "heun": (2, 0)}


def _torchsde_calls(steps: int, options: dict) -> int:
    per_step, first_saves = TORCHSDE_CALLS[options["method"]]
    return per_step * steps - first_saves
STRATONOVICH_ONLY = ("midpoint", "heun")


class _BrownianSteps(torchsde.BaseBrownian):
    """The Brownian motion of a fixed-step solve, drawn step by step from the noise source: the
    increment W ~ N(0, h I) of each step and, for "srk", its space-time Levy area H ~ N(0, h/12 I),
    independent (as torchsde's BrownianInterval draws them), handed over as U = h (W/2 + H).

    With one generator per sample, a sample's draws come from its own generator alone, so it does
    not depend on the batch it is drawn in; a step costs one or two draws, where a BrownianInterval
    per sample would cost a tree query per sample. Draws are not stored, so the queries must be the
    consecutive steps (torchsde's fixed-step methods query each step once, in order): any other is
    refused rather than answered inconsistently.
    """

    def __init__(self, noise, like: torch.Tensor, t0: float):
        self._noise, self._like, self._t = noise, like, t0

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        ta, tb = float(ta), float(tb if tb is not None else ta)  # sync: torchsde's times are tensors
        if return_A or ta != self._t or not tb > ta:
            raise RuntimeError(f"torchsde bridge: the Brownian motion is drawn step by step, in order; got a "
                               f"query for [{ta}, {tb}] after the step that ended at {self._t}")
        self._t, h = tb, tb - ta
        W = self._draw() * math.sqrt(h)
        if not return_U:
            return W
        return W, h * (0.5 * W + self._draw() * math.sqrt(h / 12))

    def _draw(self) -> torch.Tensor:
        return self._noise.draw(self._like.shape, self._like.dtype, self._like.device)

    def __repr__(self):
        return f"_BrownianSteps(shape={tuple(self.shape)})"

    @property
    def dtype(self):
        return self._like.dtype

    @property
    def device(self):
        return self._like.device

    @property
    def shape(self):
        return self._like.shape

    @property
    def levy_area_approximation(self):
        return "space-time"


class _ReversedPath(_BrownianSteps):
    """A BrownianNoise path, queried in torchsde's time u = t_start - t: the increment over [ua, ub]
    is the path's over [t_start - ub, t_start - ua], as euler_maruyama takes it, so both solvers see
    one path. Reversing time keeps W and turns U = int (W_s - W_a) ds into h W - U."""

    def __init__(self, noise: BrownianNoise, like: torch.Tensor, t_start: float):
        super().__init__(noise, like, 0.0)
        self._path, self._t_start = noise.path, t_start

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        ua, ub = float(ta), float(tb if tb is not None else ta)  # sync: torchsde's times are tensors
        if return_A:
            raise RuntimeError("torchsde bridge: the Brownian path gives no Levy area A, only U")
        lo, hi = self._t_start - ub, self._t_start - ua
        found = self._path(lo, hi, return_U=return_U)
        if not return_U:
            return found.to(self.dtype)
        W, U = found
        return W.to(self.dtype), ((hi - lo) * W - U).to(self.dtype)

    @property
    def levy_area_approximation(self):
        return self._path.levy_area_approximation


class _ReverseSDE(torch.nn.Module):
    """The reverse SDE in u = T - t (torchsde integrates forwards), on flattened states.
    The noise is additive, so the Ito and Stratonovich forms coincide."""

    noise_type = "diagonal"

    def __init__(self, model, shape, t_start, sde_type):
        super().__init__()
        self.model, self.shape, self.t_start, self.sde_type = model, shape, t_start, sde_type
        self._first = None  # (y, drift) of the first call: see f

    def _at(self, u):
        """t, the drift's coefficients of y and eps in u = T - t, and the diffusion g (host floats)."""
        t = self.t_start - float(u)  # sync: torchsde hands over time as a tensor
        t64 = torch.tensor(t, dtype=F64)
        sde = self.model.sde
        a, b = sde.drift_coefficients(t64)
        return t, -float(a), float(b / sde.sigma(t64)), float(sde.diffusion(t64))  # du = -dt flips the drift

    def f(self, u, y):
        # torchsde evaluates the drift once at the start to check shapes, then again, at the
        # same (u, y), in its first step: answer the second from the first, one model call.
        if self._first is not None and self._first[0] is y:
            return self._first[1]
        t, c_y, c_eps, _ = self._at(u)
        eps = self.model(y.reshape(self.shape), t).reshape(y.shape)
        self.model.check_last()
        drift = c_y * y + c_eps * eps
        self._first = (y, drift) if self._first is None else self._first
        return drift

    def g(self, u, y):
        return torch.full_like(y, self._at(u)[3])


@register("torchsde", grid="uniform", stochastic=True, options={"method": Choice(*TORCHSDE_METHODS)},
          nfe=_torchsde_calls)
def torchsde_solver(model, x, times, *, noise, callback, method: str = "euler"):
    """Any torchsde method on the reverse SDE with a uniform step dt = (T - t_end)/steps, its Brownian
    increments drawn step by step from the generator (the same seed gives the same samples; with one
    generator per sample, a sample does not depend on its batch), or taken from a BrownianNoise path."""
    on_path = isinstance(noise, BrownianNoise)
    if on_path and method == "srk" and noise.path.levy_area_approximation != "space-time":
        raise ValueError("noise: method='srk' needs the path's space-time Levy area: "
                         "BrownianNoise(..., levy_area=True)")
    if x.device.type == "meta":
        raise ValueError("device=meta (of x_T or device=): solver 'torchsde' reads the state on the host; a meta "
                         "tensor holds no values: use a fixed-step solver")
    steps, dts = len(times) - 1, times[:-1] - times[1:]
    if not torch.allclose(dts, dts.mean(), rtol=1e-9, atol=0):
        raise ValueError("grid: solver 'torchsde' steps uniformly in t; use grid='uniform' (the default)")
    model.step = None  # torchsde steps on its own: errors name the time only
    t_host = host_floats(times)
    span = t_host[0] - t_host[-1]
    sde_type = "stratonovich" if method in STRATONOVICH_ONLY else "ito"
    flat = x.reshape(x.shape[0], -1)
    ts = torch.tensor([0.0, span], dtype=torch.float64, device=x.device)
    bm = _ReversedPath(noise, flat, t_host[0]) if on_path else _BrownianSteps(noise, flat, 0.0)
    func = _ReverseSDE(model, x.shape, t_host[0], sde_type)
    # A hair over span/steps, so that `steps` additions of dt reach the end (torchsde clips the
    # last step to it) instead of falling 1e-16 short and taking one more, tiny, step.
    dt = span / steps * (1 + 1e-12)
    y = torchsde.sdeint(func, flat, ts, bm=bm, method=method, dt=dt)[-1]
    x = y.reshape(x.shape)
    callback(steps - 1, x)
    return x
