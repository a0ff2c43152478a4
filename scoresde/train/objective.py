"""The denoising objective on a VP-SDE: regress eps (or x0, or v) from x_t = alpha x0 + sigma eps
(Ho et al. 2020; Song et al. 2021), with continuous t ~ U(t_eps, T) or DDPM indices n ~ U{1..N}
and optional min-SNR-gamma weighting (Hang et al. 2023)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._util import F64, MAX_CHAIN, check_count, check_number, per_sample
from ..prediction import PREDICTIONS, from_eps
from ..sde import VPSDE

TIME_SAMPLING = ("continuous", "discrete")
TARGETS = tuple(p for p in PREDICTIONS if p != "score")


@dataclass(frozen=True)
class Objective:
    """What the network learns and how t is drawn.

    target: the network's output kind ("eps", "x0" or "v"); sampling wraps it in a Denoiser with
        the same `prediction`.
    time: "continuous" draws t ~ U(t_eps, T); "discrete" draws the chain step n ~ U{1..N} and
        uses t = n/N (N = `num_steps`, or the sde's own chain length).
    min_snr_gamma: if set, weight each sample's loss so that its effective weight on the x0 error
        is min(SNR, gamma) (Hang et al. 2023); None weights every t alike in the target's units.
    """

    target: str = "eps"
    time: str = "continuous"
    t_eps: float = 1e-3
    num_steps: int | None = None
    min_snr_gamma: float | None = None

    def __post_init__(self):
        if not isinstance(self.target, str) or self.target not in TARGETS:
            raise ValueError(f"target={self.target!r}: expected one of {TARGETS}")
        if not isinstance(self.time, str) or self.time not in TIME_SAMPLING:
            raise ValueError(f"time={self.time!r}: expected one of {TIME_SAMPLING}")
        check_number("t_eps", self.t_eps, low=0.0, high=1.0, low_open=True, high_open=True)
        if self.num_steps is not None:
            check_count("num_steps", self.num_steps, maximum=MAX_CHAIN)
        if self.min_snr_gamma is not None:
            check_number("min_snr_gamma", self.min_snr_gamma, low=0.0, low_open=True)

    def sample_times(self, sde: VPSDE, batch: int, *, generator=None, device=None) -> torch.Tensor:
        """float64 times of shape (batch,)."""
        if self.time == "discrete":
            n_steps = self.num_steps or sde.num_steps
            if n_steps is None:
                raise ValueError("time='discrete' needs num_steps=N for a continuous sde")
            n = torch.randint(1, n_steps + 1, (batch,), generator=generator, device=device)
            return sde.index_to_t(n.to(F64), n_steps)
        u = torch.rand(batch, generator=generator, dtype=F64, device=device)
        return self.t_eps + (sde.T - self.t_eps) * u

    def weight(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights for min-SNR-gamma, in the target's units; None for uniform."""
        if self.min_snr_gamma is None:
            return None
        snr = (alpha / sigma) ** 2
        clipped = snr.clamp(max=self.min_snr_gamma)
        # The x0 error is SNR times the eps error and (SNR + 1) times the v error.
        return {"x0": clipped, "eps": clipped / snr, "v": clipped / (snr + 1)}[self.target]


def noised_lowres(sde: VPSDE, x: torch.Tensor, size: int, level, *, generator=None) -> torch.Tensor:
    """x average-pooled to size x size, then noised to the level s of cascaded diffusion's
    noise-conditioning augmentation (Ho et al. 2022): alpha_s low + sigma_s eps on the same schedule.
    `level`: a float or a (batch,) tensor of s in [0, 1]; s = 0 leaves the image clean."""
    low = torch.nn.functional.adaptive_avg_pool2d(x, size) if x.shape[-1] != size else x
    s = level if isinstance(level, torch.Tensor) else torch.full((x.shape[0],), float(level), dtype=F64)
    alpha, sigma = sde.alpha_sigma(s.to(device=x.device, dtype=F64))
    eps = torch.randn(low.shape, generator=generator, dtype=low.dtype, device=low.device)
    return per_sample(alpha, low).to(low.dtype) * low + per_sample(sigma, low).to(low.dtype) * eps


def diffusion_loss(net, sde: VPSDE, x0: torch.Tensor, objective: Objective, *, y=None,
                   generator=None, cond: dict | None = None) -> torch.Tensor:
    """Mean squared error of `net(x_t, t[, y], **cond)` against the objective's target, averaged over
    samples and dimensions. Noise and times come from `generator` (on x0's device)."""
    batch = x0.shape[0]
    t = objective.sample_times(sde, batch, generator=generator, device=x0.device)
    alpha, sigma = sde.alpha_sigma(t)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    a, s = per_sample(alpha, x0), per_sample(sigma, x0)
    x_t = a * x0 + s * eps
    t_in = t.to(x0.dtype)
    kwargs = cond or {}
    out = net(x_t, t_in, **kwargs) if y is None else net(x_t, t_in, y, **kwargs)
    target = from_eps(objective.target, eps, x_t, a, s)
    per_sample_loss = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    weight = objective.weight(alpha, sigma)
    if weight is not None:
        per_sample_loss = per_sample_loss * weight.to(per_sample_loss.dtype)
    return per_sample_loss.mean()
