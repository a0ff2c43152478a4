"""Exact ground truth: Gaussian and Gaussian-mixture data pushed through a VP-SDE.

For data sum_k w_k N(mu_k, s_k^2 I), the marginal at time t is sum_k w_k N(alpha mu_k, v_k I) with
v_k = alpha^2 s_k^2 + sigma^2; its score is the responsibility-weighted sum of the components'
scores, eps = -sigma score. For one Gaussian the probability-flow map is exact too:
x_u = alpha_u mu + (r_u / r_t)(x_t - alpha_t mu), r = sqrt(alpha^2 s^2 + sigma^2).
These models are plain callables model(x, t) -> eps, so every solver can be checked against them.
"""
from __future__ import annotations

import math

import torch

from ._util import F64, as_time, check_tensor
from .sde import VPSDE


class GaussianMixture:
    """Exact eps, score and log-density of a Gaussian mixture under `sde`.

    weights: (K,), positive (normalised here); means: (K, *event_shape); stds: (K,) or a float.
    """

    def __init__(self, sde: VPSDE, weights, means, stds):
        if not isinstance(sde, VPSDE):
            raise TypeError(f"sde={sde!r}: expected a scoresde.VPSDE")
        means = torch.as_tensor(means, dtype=F64)
        weights = torch.as_tensor(weights, dtype=F64).reshape(-1)
        stds = torch.as_tensor(stds, dtype=F64).reshape(-1).expand(weights.shape[0]).clone()
        if means.ndim < 2 or means.shape[0] != weights.shape[0]:
            raise ValueError(f"means: expected shape (K={weights.shape[0]}, *event_shape), got {tuple(means.shape)}")
        if not (weights > 0).all() or not (stds > 0).all():
            raise ValueError("weights and stds must be positive")
        self.sde, self.event_shape = sde, tuple(means.shape[1:])
        self.weights, self.means, self.stds = weights / weights.sum(), means.flatten(1), stds

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _components(self, x, t):
        """Flattened float64 x, per-component offsets x - alpha mu_k and variances v_k."""
        if tuple(check_tensor("x", x).shape[1:]) != self.event_shape:
            raise ValueError(f"x: expected shape (batch, {', '.join(map(str, self.event_shape))}) for this "
                             f"mixture, got {tuple(x.shape)}")
        x = x.to(F64).flatten(1)
        t = as_time(t, device=x.device).reshape(-1, 1)
        alpha, sigma = self.sde.alpha(t), self.sde.sigma(t)  # (B or 1, 1)
        means, stds = self.means.to(x.device), self.stds.to(x.device)
        diff = x[:, None, :] - alpha[:, :, None] * means[None]  # (B, K, D)
        var = alpha**2 * stds**2 + sigma**2  # (B or 1, K)
        return x, diff, var, sigma

    def _log_joint(self, diff, var):
        """log w_k + log N(x; alpha mu_k, v_k I), shape (B, K)."""
        sq = diff.pow(2).sum(-1)
        return (self.weights.to(diff.device).log() - 0.5 * sq / var
                - 0.5 * self.dim * torch.log(2 * math.pi * var))

    def log_prob(self, x: torch.Tensor, t=0.0) -> torch.Tensor:
        """log p_t(x) per sample (float64)."""
        _, diff, var, _ = self._components(x, t)
        return torch.logsumexp(self._log_joint(diff, var), dim=1)

    def responsibilities(self, x: torch.Tensor, t=0.0) -> torch.Tensor:
        _, diff, var, _ = self._components(x, t)
        return torch.softmax(self._log_joint(diff, var), dim=1)

    def _weighted_offset(self, x, t):
        """sum_k r_k (x - alpha mu_k) / v_k = -score, and sigma_t."""
        _, diff, var, sigma = self._components(x, t)
        resp = torch.softmax(self._log_joint(diff, var), dim=1)
        return (resp[:, :, None] * diff / var[:, :, None]).sum(1).reshape(x.shape), sigma

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        offset, _ = self._weighted_offset(x, t)
        return (-offset).to(x.dtype)

    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        offset, sigma = self._weighted_offset(x, t)
        return (offset * sigma.reshape((-1,) + (1,) * (x.ndim - 1))).to(x.dtype)

    __call__ = eps

    def sample(self, n: int, *, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        """n draws from the data distribution (t = 0)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=F64)
        x = self.means[k] + self.stds[k, None] * z
        return x.reshape((n,) + self.event_shape).to(dtype=dtype, device=device)

    def mode_report(self, x: torch.Tensor, tail: float = 1e-4) -> dict:
        """How samples x spread over the modes, for distribution checks.

        Each sample goes to its nearest mode (in units of that mode's std); it is `stray` when its
        squared distance exceeds the chi-square(dim) quantile 1 - tail, i.e. when it lies where the
        true mixture puts almost no mass. Returns the fraction per mode (`weights`, to compare with
        self.weights), the stray fraction, and per mode the ratio of the samples' std to the true std.
        """
        from scipy.stats import chi2

        x = x.detach().to("cpu", F64).flatten(1)
        sq = (x[:, None, :] - self.means[None]).pow(2).sum(-1) / self.stds**2  # (B, K)
        best_sq, k = sq.min(1)
        inside = best_sq <= chi2.ppf(1 - tail, self.dim)
        counts = torch.bincount(k[inside], minlength=len(self.weights)).to(F64)
        spread = torch.full((len(self.weights),), float("nan"), dtype=F64)
        for j in range(len(self.weights)):
            mine = inside & (k == j)
            if mine.sum() > 1:
                spread[j] = (best_sq[mine].mean() / self.dim).sqrt()
        return {"weights": counts / len(x), "stray": 1.0 - inside.to(F64).mean().item(), "std_ratio": spread}

    @classmethod
    def ring2d(cls, sde: VPSDE, k: int = 6, radius: float = 1.0, std: float = 0.04) -> "GaussianMixture":
        """k sharp modes on a circle with unequal weights (1, 2, ..., k): std 0.04 is 2% of the data range."""
        angle = torch.arange(k, dtype=F64) * (2 * math.pi / k)
        means = radius * torch.stack([angle.cos(), angle.sin()], 1)
        return cls(sde, torch.arange(1, k + 1, dtype=F64), means, std)


class Gaussian(GaussianMixture):
    """Data N(mean, std^2 I): a one-component mixture with an exact probability-flow map."""

    def __init__(self, sde: VPSDE, mean, std: float):
        super().__init__(sde, [1.0], torch.as_tensor(mean, dtype=F64)[None], std)

    def _r(self, t):
        alpha, sigma = self.sde.alpha(t), self.sde.sigma(t)
        return alpha, torch.sqrt(alpha**2 * self.stds[0] ** 2 + sigma**2)

    def flow(self, x_t: torch.Tensor, t: float, u: float) -> torch.Tensor:
        """The exact probability-flow ODE map from time t to time u (float64)."""
        (alpha_t, r_t), (alpha_u, r_u) = self._r(as_time(t)), self._r(as_time(u))
        mean = self.means[0].to(x_t.device)
        x = x_t.to(F64).flatten(1)
        return (alpha_u * mean + (r_u / r_t) * (x - alpha_t * mean)).reshape(x_t.shape)
