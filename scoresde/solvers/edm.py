"""Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"),
Algorithm 2: the stochastic Heun sampler, run on the VP-SDE through its sigma-space form.

With s = sigma/alpha (EDM's sigma) and y = x/alpha (EDM's x), the probability-flow ODE reads
dy/ds = (y - D(y; s))/s, where D is the model's x0 prediction at x = alpha y, t = t(s). Each step
first "churns": it raises the noise level from s_i to s_hat = s_i (1 + gamma_i), gamma_i =
min(s_churn/steps, sqrt(2) - 1) while s_tmin <= s_i <= s_tmax, by adding fresh noise of variance
s_hat^2 - s_i^2 (times s_noise^2); then it takes a Heun step from s_hat to s_{i+1}. With s_churn = 0
this is Heun's method in (y, s), the library's "heun". The churn depends only on the grid and the
options, so every coefficient (the off-grid time t(s_hat) included) is fixed before the loop.
"""
from __future__ import annotations

import math
import sys

import torch

from .._util import host_floats
from ..prediction import eps_to_x0
from .base import register

GAMMA_MAX = math.sqrt(2.0) - 1.0  # Karras et al.: churn at most doubles the variance


def _check_options(s_churn, s_tmin, s_tmax, s_noise) -> tuple[float, ...]:
    """The options as floats, after checking them (s_tmax alone may be inf)."""
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # NaN fails >=
            raise ValueError(f"{name}={value!r}: expected a number >= 0")
        if name != "s_tmax" and not value <= sys.float_info.max:  # not math.isinf: huge ints overflow it
            raise ValueError(f"{name}={value!r}: expected a finite number >= 0")
    if s_tmin > s_tmax:
        raise ValueError(f"s_tmin={s_tmin!r} > s_tmax={s_tmax!r}: churn acts where s_tmin <= sigma/alpha <= s_tmax")
    return tuple(float(v) if v <= sys.float_info.max else math.inf for v in (s_churn, s_tmin, s_tmax, s_noise))


def _plan(sde, times, s_churn, s_tmin, s_tmax, s_noise):
    """Per step, as host floats: the churned time t_hat with its alpha, sigma and s_hat, the noise
    scale s_noise sqrt(s_hat^2 - s_i^2) (0 where no churn), and whether the step churns.

    s_hat is capped at s(T), the grid's start: the model is never called above T (where a
    schedule or an index-time network may be undefined), so the first step never churns.
    """
    steps = len(times) - 1
    lam = sde.log_snr(times)  # s = exp(-lambda), in logs: s overflows for long DDPM chains
    gamma = min(s_churn / steps, GAMMA_MAX)
    s_host = host_floats(torch.exp(-lam))
    churn = [gamma > 0 and s_tmin <= s <= s_tmax for s in s_host[:-1]]
    lam_hat = torch.maximum(lam[:-1] - torch.tensor([math.log1p(gamma) if c else 0.0 for c in churn],
                                                    dtype=lam.dtype), lam[0])
    churned = lam_hat < lam[:-1]
    t_hat = torch.where(churned, sde.t_from_log_snr(lam_hat), times[:-1])  # grid times stay exact
    alpha_hat, sigma_hat = sde.alpha_sigma(t_hat)
    s_hat = torch.exp(-lam_hat)
    # s_hat^2 - s_i^2 = s_i^2 expm1(2 (lam_i - lam_hat)), without cancellation
    noise_scale = s_noise * torch.exp(-lam[:-1]) * torch.sqrt(torch.expm1(2 * (lam[:-1] - lam_hat)))
    return (host_floats(t_hat), host_floats(alpha_hat), host_floats(sigma_hat), host_floats(s_hat),
            host_floats(noise_scale), host_floats(churned))


@register("edm", grid="karras", stochastic=True, nfe_per_step=2)
def edm(model, x, times, *, noise, callback, s_churn: float = 0.0, s_tmin: float = 0.0,
        s_tmax: float = math.inf, s_noise: float = 1.0):
    """Karras et al. 2022's stochastic sampler (Algorithm 2): churn noise in, then a Heun step, in
    (x/alpha, sigma/alpha). s_churn = 0 (the default) is deterministic Heun; noise is added where
    s_tmin <= sigma/alpha <= s_tmax, gamma = min(s_churn/steps, sqrt(2) - 1), scaled by s_noise."""
    s_churn, s_tmin, s_tmax, s_noise = _check_options(s_churn, s_tmin, s_tmax, s_noise)
    sde = model.sde
    t_hat, alpha_hat, sigma_hat, s_hat, noise_scale, churned = _plan(sde, times, s_churn, s_tmin, s_tmax, s_noise)
    t_host = host_floats(times)
    alpha, sigma = (host_floats(v) for v in sde.alpha_sigma(times))
    s = host_floats(torch.exp(-sde.log_snr(times)))

    def denoise(y, a, sg, t):
        """D(y; s): the model's x0 prediction at x = alpha y (the one place it is formed)."""
        x_at = y * a
        return eps_to_x0(x_at, model(x_at, t), a, sg)

    y = x / alpha[0]
    for i in range(len(times) - 1):
        # Churn: raise the noise level from s_i to s_hat with fresh noise: the step's one draw,
        # labelled with the step's own interval (so BrownianNoise gives independent increments).
        if churned[i]:
            y = y.add(noise(y, t_host[i], t_host[i + 1]), alpha=noise_scale[i])
        # Heun from s_hat to s_{i+1}: Euler, then the trapezoid with the slope at the end.
        h = s[i + 1] - s_hat[i]
        d = (y - denoise(y, alpha_hat[i], sigma_hat[i], t_hat[i])) / s_hat[i]
        y_next = y + h * d
        d_next = (y_next - denoise(y_next, alpha[i + 1], sigma[i + 1], t_host[i + 1])) / s[i + 1]
        y = y + (0.5 * h) * (d + d_next)
        x = y * alpha[i + 1]
        callback(i, x)
    return x
