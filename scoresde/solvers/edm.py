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

import torch

from .base import register
from .ode import HEUN
from .options import Number
from .plan import Start, runge_kutta

GAMMA_MAX = math.sqrt(2.0) - 1.0  # Karras et al.: churn at most doubles the variance


def _churn(sde, times, s_churn, s_tmin, s_tmax, s_noise):
    """Per step: whether it churns (host bools), the churned time t_hat and lam_hat, and the noise
    scale s_noise sqrt(s_hat^2 - s_i^2) in y = x/alpha (zero where no churn).

    s_hat is capped at s(T), the grid's start: the model is never called above T (where a
    schedule or an index-time network may be undefined), so the first step never churns.
    """
    steps = len(times) - 1
    lam = sde.log_snr(times)  # s = exp(-lambda), in logs: s overflows for long DDPM chains
    gamma = min(s_churn / steps, GAMMA_MAX)
    s_host = torch.exp(-lam.detach()).tolist()  # sync: none, CPU schedule math (a host decision per step)
    churn = [gamma > 0 and s_tmin <= s <= s_tmax for s in s_host[:-1]]
    lam_hat = torch.maximum(lam[:-1] - torch.tensor([math.log1p(gamma) if c else 0.0 for c in churn],
                                                    dtype=lam.dtype), lam[0])
    mask = lam_hat < lam[:-1]
    t_hat = torch.where(mask, sde.t_from_log_snr(lam_hat), times[:-1])  # grid times stay exact
    # s_hat^2 - s_i^2 = s_i^2 expm1(2 (lam_i - lam_hat)), without cancellation; steps that do not
    # churn take the square root of 1, not of 0, whose infinite slope would make the gradient NaN
    gap = torch.where(mask, torch.expm1(2 * (lam[:-1] - lam_hat)), torch.ones_like(lam_hat))
    noise_scale = torch.where(mask, s_noise * torch.exp(-lam[:-1]) * torch.sqrt(gap), torch.zeros_like(gap))
    return mask.tolist(), t_hat, lam_hat, noise_scale  # sync: none, CPU


@register("edm", grid="karras", stochastic=True, options={
    "s_churn": Number(0.0), "s_tmin": Number(0.0), "s_tmax": Number(0.0, finite=False), "s_noise": Number(0.0)})
def edm(planner, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
    """Karras et al. 2022's stochastic sampler (Algorithm 2): churn noise in, then a Heun step, in
    (x/alpha, sigma/alpha). s_churn = 0 (the default) is deterministic Heun; noise is added where
    s_tmin <= sigma/alpha <= s_tmax, gamma = min(s_churn/steps, sqrt(2) - 1), scaled by s_noise.
    The Heun step is the library's Runge-Kutta engine from the churned noise level: with
    D = x0 prediction, dy/ds = (y - D)/s is eps, the probability-flow ODE of every RK solver."""
    if s_tmin > s_tmax:
        raise ValueError(f"s_tmin={s_tmin!r} > s_tmax={s_tmax!r}: churn acts where s_tmin <= sigma/alpha <= s_tmax")
    churned, t_hat, lam_hat, noise_scale = _churn(planner.sde, planner.times, s_churn, s_tmin, s_tmax, s_noise)
    runge_kutta(planner, HEUN, Start(t_hat, lam_hat, noise_scale, churned))
