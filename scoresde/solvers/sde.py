"""Reverse-SDE solvers: Euler-Maruyama on dx = [f - g^2 score] dt + g dw (Song et al. 2021), and a
bridge to torchsde's solvers driven by a seeded Brownian interval."""
from __future__ import annotations

import torch

from .._util import F64, host_floats
from .base import register


@register("euler_maruyama", grid="log_snr", stochastic=True)
def euler_maruyama(model, x, times, *, noise, callback):
    """Euler-Maruyama on the reverse SDE, with score = -eps/sigma:
    x <- x + dt (beta x / 2 - beta eps / sigma) + sqrt(beta dt) z,  dt = t_i - t_{i+1} > 0."""
    sde = model.sde
    t, dt = times[:-1], times[:-1] - times[1:]
    beta_dt = sde.beta(t) * dt
    keep = host_floats(1.0 + 0.5 * beta_dt)
    eps_coef = host_floats(-beta_dt / sde.sigma(t))
    noise_coef = host_floats(torch.sqrt(beta_dt))
    t_host = host_floats(times)
    for i in range(len(keep)):
        eps = model(x, t_host[i])
        z = noise(x, t_host[i], t_host[i + 1])
        x = (x * keep[i]).add_(eps, alpha=eps_coef[i]).add_(z, alpha=noise_coef[i])
        callback(i, x)
    return x


TORCHSDE_METHODS = ("euler", "milstein", "srk", "midpoint", "heun")
STRATONOVICH_ONLY = ("midpoint", "heun")


class _ReverseSDE(torch.nn.Module):
    """The reverse SDE in u = T - t (torchsde integrates forwards), on flattened states.
    The noise is additive, so the Ito and Stratonovich forms coincide."""

    noise_type = "diagonal"

    def __init__(self, model, shape, t_start, sde_type):
        super().__init__()
        self.model, self.shape, self.t_start, self.sde_type = model, shape, t_start, sde_type
        self._first = None  # (y, drift) of the first call: see f

    def _at(self, u):
        t = self.t_start - float(u)  # sync: torchsde hands over time as a tensor
        t64 = torch.tensor(t, dtype=F64)
        sde = self.model.sde
        return t, float(sde.beta(t64)), float(sde.sigma(t64))

    def f(self, u, y):
        # torchsde evaluates the drift once at the start to check shapes, then again, at the
        # same (u, y), in its first step: answer the second from the first, one model call.
        if self._first is not None and self._first[0] is y:
            return self._first[1]
        t, beta, sigma = self._at(u)
        eps = self.model(y.reshape(self.shape), t).reshape(y.shape)
        self.model.check_last()
        drift = 0.5 * beta * y - (beta / sigma) * eps  # -(f - g^2 score), as du = -dt
        self._first = (y, drift) if self._first is None else self._first
        return drift

    def g(self, u, y):
        _, beta, _ = self._at(u)
        return torch.full_like(y, beta**0.5)


@register("torchsde", grid="uniform", stochastic=True)
def torchsde_solver(model, x, times, *, noise, callback, method: str = "euler"):
    """Any torchsde method on the reverse SDE with a uniform step dt = (T - t_end)/steps and a
    BrownianInterval seeded from the generator (so the same seed gives the same samples).
    The interval spans the batch: a sample's noise depends on the batch it is drawn in."""
    import torchsde

    if method not in TORCHSDE_METHODS:
        raise ValueError(f"method={method!r}: expected one of {TORCHSDE_METHODS}")
    if isinstance(noise.generator, (list, tuple)):
        raise ValueError("generator: solver 'torchsde' draws one Brownian interval for the whole batch; "
                         "pass a single torch.Generator, not a list")
    steps, dts = len(times) - 1, times[:-1] - times[1:]
    if not torch.allclose(dts, dts.mean(), rtol=1e-9, atol=0):
        raise ValueError("grid: solver 'torchsde' steps uniformly in t; use grid='uniform' (the default)")
    model.step = None  # torchsde steps on its own: errors name the time only
    t_host = host_floats(times)
    span = t_host[0] - t_host[-1]
    sde_type = "stratonovich" if method in STRATONOVICH_ONLY else "ito"
    seed = int(noise.draw((1,), torch.float64, "cpu").abs().mul(2**31).long())  # sync: once, CPU
    flat = x.reshape(x.shape[0], -1)
    ts = torch.tensor([0.0, span], dtype=torch.float64, device=x.device)
    bm = torchsde.BrownianInterval(t0=0.0, t1=span, size=flat.shape, dtype=x.dtype, device=x.device,
                                   entropy=seed, levy_area_approximation="space-time")
    func = _ReverseSDE(model, x.shape, t_host[0], sde_type)
    # A hair over span/steps, so that `steps` additions of dt reach the end (torchsde clips the
    # last step to it) instead of falling 1e-16 short and taking one more, tiny, step.
    dt = span / steps * (1 + 1e-12)
    y = torchsde.sdeint(func, flat, ts, bm=bm, method=method, dt=dt)[-1]
    x = y.reshape(x.shape)
    callback(steps - 1, x)
    return x
