"""The variance-preserving SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw (Song et al. 2021).

The discrete DDPM chain is the same object: `VPSDE.from_betas(betas)` is a VP-SDE whose alpha
matches the chain's alpha_bar at t = n/N. All schedule math is float64; t broadcasts in any shape.
"""
from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._util import (F64, MAX_CHAIN, as_time, check_batch_time, check_count, check_device, check_shape, check_tensor,
                    per_sample)
from .schedules import CosineSchedule, DiscreteSchedule, LinearSchedule, Schedule


def _check_index_time(name: str, value):
    """A time or a step index for the index <-> t mapping: a real number or a tensor (kept as given)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name}={value!r}: expected a number or a tensor")
    if isinstance(value, numbers.Integral) and abs(value) > sys.float_info.max:  # int / int would overflow
        raise ValueError(f"{name}={value!r}: beyond the float range")
    return value


def _check_like(name: str, value, x: torch.Tensor):
    """A floating tensor of the (already checked) state x's shape."""
    if check_tensor(name, value).shape != x.shape:
        raise ValueError(f"{name}: shape {tuple(value.shape)} differs from the state's {tuple(x.shape)}")
    return value


class VPSDE:
    """A VP-SDE given by a `Schedule`. Time runs from t = 0 (data) to t = T (prior).

    Build one with `VPSDE.linear`, `VPSDE.cosine` or `VPSDE.from_betas` (a DDPM chain). All of its
    math is float64, and a time `t` broadcasts in any shape.

    Args:
        schedule: log alpha(t) and its derivative (see `scoresde.schedules`).

    Raises:
        TypeError: `schedule` is not a `Schedule`.
    """

    def __init__(self, schedule: Schedule):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule={schedule!r}: expected a scoresde.schedules.Schedule")
        self.schedule = schedule

    # ---- constructors -----------------------------------------------------------------
    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0) -> "VPSDE":
        """beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021).

        Args:
            beta_min: beta at t = 0, >= 0.
            beta_max: beta at t = 1, > 0 and >= beta_min.
        """
        return cls(LinearSchedule(beta_min, beta_max))

    @classmethod
    def cosine(cls, s: float = 0.008, t_max: float = 0.9946) -> "VPSDE":
        """alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t+s)/(1+s) pi/2) (Nichol & Dhariwal 2021).

        Args:
            s: the offset, >= 0.
            t_max: where sampling starts, in (0, 1) (alpha reaches 0 at t = 1).
        """
        return cls(CosineSchedule(s, t_max))

    @classmethod
    def from_betas(cls, betas: Sequence[float] | torch.Tensor) -> "VPSDE":
        """The DDPM chain of len(betas) steps as a VP-SDE (step n sits at t = n/N).

        Args:
            betas: the chain's betas, each in (0, 1).
        """
        return cls(DiscreteSchedule(betas))

    def __repr__(self):
        return f"VPSDE({self.schedule!r})"

    # ---- time range ---------------------------------------------------------------------
    @property
    def T(self) -> float:
        """Where sampling starts: the prior N(0, I)."""
        return self.schedule.t_max

    @property
    def num_steps(self) -> int | None:
        """N of a discrete chain; None for a continuous schedule."""
        return self.schedule.num_steps

    @property
    def t_min(self) -> float:
        """Default end of sampling: 1/N for a chain (its first step), 1e-3 otherwise."""
        return 1.0 / self.num_steps if self.num_steps else 1e-3

    # ---- the DDPM index <-> t mapping (the only place it lives) ---------------------------
    def t_to_index(self, t, N: int | None = None):
        """Step n (1..N, possibly fractional) of the chain at time t: n = t N."""
        return _check_index_time("t", t) * self._chain_length(N)

    def index_to_t(self, n, N: int | None = None):
        return _check_index_time("n", n) / self._chain_length(N)

    def _chain_length(self, N):
        if N is None:
            N = self.num_steps
            if N is None:
                raise ValueError("N=None: a continuous schedule needs the chain length N for index time")
        return check_count("N", N, maximum=MAX_CHAIN)

    # ---- marginal ----------------------------------------------------------------------------
    def log_alpha(self, t) -> torch.Tensor:
        return self.schedule.log_alpha(as_time(t))

    def alpha(self, t) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t) -> torch.Tensor:
        return self.alpha_sigma(t)[1]

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) from one evaluation of log alpha; sigma^2 = -expm1(2 log alpha)."""
        la = self.log_alpha(t)
        return torch.exp(la), torch.sqrt(-torch.expm1(2.0 * la))

    def log_snr(self, t) -> torch.Tensor:
        """Half log-SNR lambda(t) = log(alpha/sigma), strictly decreasing in t."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def t_from_log_snr(self, lam) -> torch.Tensor:
        """Inverse of `log_snr`: alpha^2 = sigmoid(2 lambda), so log alpha = -softplus(-2 lambda)/2."""
        lam = as_time(lam, name="lam")
        return self.schedule.t_from_log_alpha(-0.5 * F.softplus(-2.0 * lam, threshold=40.0))

    def beta(self, t) -> torch.Tensor:
        """beta(t) = -2 d log alpha / dt."""
        return -2.0 * self.schedule.dlog_alpha(as_time(t))

    def marginal(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise, with t a float or a (batch,) tensor."""
        check_batch_time(t, check_tensor("x0", x0))
        _check_like("noise", noise, x0)
        return per_sample(self.alpha(t), x0) * x0 + per_sample(self.sigma(t), x0) * noise

    # ---- the SDE ------------------------------------------------------------------------------
    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        check_batch_time(t, check_tensor("x", x))
        return -0.5 * per_sample(self.beta(t), x) * x

    def diffusion(self, t) -> torch.Tensor:
        return torch.sqrt(self.beta(t))

    def drift_coefficients(self, t, *, ode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) such that the reverse-time drift f - g^2 score (ode=False) or the probability-flow
        velocity f - g^2 score / 2 (ode=True) at t is a x + b score: a = -beta/2, b = -beta or -beta/2.
        With score = -eps/sigma it is a x - (b/sigma) eps. The one place the solvers take it from."""
        beta = self.beta(t)
        return -0.5 * beta, -beta * (0.5 if ode else 1.0)

    def reverse_drift(self, x: torch.Tensor, t, score: torch.Tensor) -> torch.Tensor:
        """f - g^2 score, the drift of the reverse-time SDE (in dt, run backwards)."""
        return self._drift_at(x, t, score, ode=False)

    def pf_drift(self, x: torch.Tensor, t, score: torch.Tensor) -> torch.Tensor:
        """f - g^2 score / 2, the probability-flow ODE's velocity dx/dt."""
        return self._drift_at(x, t, score, ode=True)

    def _drift_at(self, x, t, score, *, ode: bool) -> torch.Tensor:
        _check_like("score", score, check_tensor("x", x))
        check_batch_time(t, x)
        a, b = self.drift_coefficients(t, ode=ode)
        return per_sample(a, x) * x + per_sample(b, x) * score

    # ---- prior -----------------------------------------------------------------------------------
    def prior_sample(self, shape, *, generator=None, dtype=None, device=None) -> torch.Tensor:
        shape = check_shape("shape", shape)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r}: expected a torch.Generator or None")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype={dtype!r}: expected a floating torch.dtype")
        device = check_device("device", device) if device is not None else None
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def prior_logp(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, I) per sample."""
        d = math.prod(check_tensor("x", x).shape[1:])  # not x[0]: the batch may be empty
        return -0.5 * x.reshape(len(x), d).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)

    # ---- the discrete chain -------------------------------------------------------------------
    def discretize(self, N: int) -> torch.Tensor:
        """DDPM betas (float64) of an N-step chain: Song et al.'s for the linear schedule,
        alpha_bar-matching otherwise; `from_betas(sde.discretize(N))` reproduces a chain's betas."""
        return self.schedule.discretize(check_count("N", N))

    # ---- diffusers -----------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, scheduler_or_config: object) -> "VPSDE":
        """The training chain of a diffusers scheduler (DDPM, DDIM, ...) as a VP-SDE.

        Its `num_train_timesteps` betas are computed in float64 from `trained_betas`, or from
        `beta_schedule` "linear", "scaled_linear" or "squaredcos_cap_v2" with `beta_start` and
        `beta_end`, as diffusers computes them (in float32); step n of the chain sits at t = n/N,
        where alpha(t)^2 is diffusers' `alphas_cumprod[n - 1]`. diffusers itself is not needed.

        Args:
            scheduler_or_config: a diffusers scheduler (anything with a `.config` mapping), or its
                config as a mapping (a dict, or the parsed scheduler_config.json).

        Returns:
            A discrete-chain `VPSDE`, as `VPSDE.from_betas` builds it.

        Raises:
            TypeError: `scheduler_or_config` is neither, or a config field has the wrong type.
            ValueError: a field the schedule needs is missing, or is out of range; an unknown
                `beta_schedule` (the message names the supported ones).
        """
        from .diffusers_io import diffusers_betas  # here: diffusers_io imports this module

        return cls.from_betas(diffusers_betas(scheduler_or_config))


__all__ = ["VPSDE", "F64"]
