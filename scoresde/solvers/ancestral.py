"""Ancestral DDPM sampling and DDIM: draws from the Gaussian posterior q(x_s | x_t, x0_hat).

Both step as x_s = alpha_s x0_hat + c_eps eps_hat + c_z z with coefficients fixed before the loop.
From t to s < t, with alpha_ts = alpha_t/alpha_s and sigma_ts^2 = 1 - alpha_ts^2, the posterior
has variance sigma_tilde^2 = sigma_ts^2 sigma_s^2 / sigma_t^2, and its mean in this form has
c_eps = alpha_ts sigma_s^2 / sigma_t. On the N-step grid of a discrete chain this is Ho et al.'s
Algorithm 2; DDIM(eta) (Song et al. 2021) keeps the marginals with c_eps = sqrt(sigma_s^2 - eta^2 sigma_tilde^2).
"""
from __future__ import annotations

import torch

from .base import register
from .options import Choice, Number

VARIANCES = ("posterior", "beta", "learned")


def _posterior_terms(sde, times):
    """Per-step float64 tensors: alpha_t, sigma_t, alpha_s, sigma_s, sigma_ts^2, sigma_tilde^2."""
    la = sde.log_alpha(times)
    la_t, la_s = la[:-1], la[1:]
    var_t, var_s = -torch.expm1(2 * la_t), -torch.expm1(2 * la_s)  # sigma^2 = 1 - alpha^2
    var_ts = -torch.expm1(2 * (la_t - la_s))
    return dict(alpha_t=la_t.exp(), sigma_t=var_t.sqrt(), alpha_s=la_s.exp(), sigma_s=var_s.sqrt(),
                var_ts=var_ts, var_tilde=var_ts * var_s / var_t)


def _mean_coefficients(p, c_eps):
    """The posterior mean alpha_s x0_hat + c_eps eps with x0_hat = (x - sigma_t eps)/alpha_t folded in:
    (alpha_s/alpha_t) x + (c_eps - sigma_t alpha_s/alpha_t) eps, per step."""
    ratio = p["alpha_s"] / p["alpha_t"]
    return ratio, c_eps - ratio * p["sigma_t"]


def _posterior_plan(planner, p, c_eps, c_z):
    """x_s = (alpha_s/alpha_t) x + (c_eps - sigma_t alpha_s/alpha_t) eps + c_z z (`_mean_coefficients`):
    two passes over x per step instead of five."""
    keep, eps_coef = (planner.values(v) for v in _mean_coefficients(p, c_eps))
    c_z = [None] * planner.steps if c_z is None else planner.values(c_z)  # None: no draws
    start = planner.nodes(planner.times[:-1])
    for i in range(planner.steps):
        eps = planner.stage(*start[i], "eps")
        planner.step(i, x=keep[i], terms=[(eps, eps_coef[i])], noise=c_z[i])


def _learned_if_any(model) -> dict:
    """A model with a learned variance is sampled with it unless the caller says otherwise."""
    return {"variance": "learned"} if getattr(model, "variance", None) == "learned_range" else {}


@register("ancestral", grid="quadratic", stochastic=True, options={"variance": Choice(*VARIANCES)},
          model_defaults=_learned_if_any)
def ancestral(planner, variance: str = "posterior"):
    """Ancestral sampling from the DDPM posterior (Ho et al. 2020) on any grid.
    variance="posterior" draws with sigma_tilde^2 (the exact posterior), "beta" with sigma_ts^2
    (Ho et al.'s other choice, sigma_t^2 = beta_t), "learned" with the model's own (Nichol & Dhariwal
    2021: exp(f log sigma_ts^2 + (1 - f) log sigma_tilde^2) per element, f = (v + 1)/2 from the model;
    the default for a Denoiser with variance="learned_range")."""
    p = _posterior_terms(planner.sde, planner.times)
    c_eps = (p["alpha_t"] / p["alpha_s"]) * p["sigma_s"] ** 2 / p["sigma_t"]
    if variance == "learned":
        return _learned_variance_plan(planner, p, c_eps)
    c_z = (p["var_tilde"] if variance == "posterior" else p["var_ts"]).sqrt()
    _posterior_plan(planner, p, c_eps, c_z)


def _learned_variance_plan(planner, p, c_eps):
    """The posterior mean as in `_posterior_plan`, the draw scaled per element by the model's variance."""
    keep, eps_coef, log_beta, log_tilde = (planner.values(v) for v in (
        *_mean_coefficients(p, c_eps), p["var_ts"].log(), p["var_tilde"].log()))
    start = planner.nodes(planner.times[:-1])
    for i in range(planner.steps):
        ref = planner.stage(*start[i], "eps_variance")
        planner.step(i, terms=[(ref, None)], noise=1.0,
                     custom=_learned_draw(ref, keep[i], eps_coef[i], log_beta[i], log_tilde[i]))


def _learned_draw(ref, keep, eps_coef, log_beta, log_tilde):
    def update(x, outputs, z):
        eps, v = outputs[ref]
        frac = (v.to(x.dtype) + 1) / 2
        std = torch.exp(0.5 * (frac * log_beta + (1 - frac) * log_tilde))
        return (x * keep).add_(eps * eps_coef).addcmul_(std, z)

    return update


@register("ddim", grid="quadratic", stochastic=True, options={"eta": Number(0.0, 1.0)})
def ddim(planner, eta: float = 0.0):
    """DDIM (Song, Meng & Ermon 2021): eta = 0 is deterministic (the PF-ODE's first-order
    exponential integrator), eta = 1 is ancestral sampling."""
    p = _posterior_terms(planner.sde, planner.times)
    c_eps = (p["sigma_s"] ** 2 - eta**2 * p["var_tilde"]).clamp(min=0).sqrt()
    _posterior_plan(planner, p, c_eps, eta * p["var_tilde"].sqrt() if eta else None)
