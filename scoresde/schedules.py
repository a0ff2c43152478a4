"""Noise schedules: log alpha(t) as a float64 function of continuous time t in [0, 1].

A schedule is one class with `log_alpha(t)` and its derivative `dlog_alpha(t)`. Everything else
(sigma, log-SNR, beta, the discrete chain) is derived from them in `sde.VPSDE`.
"""
from __future__ import annotations

import math

import torch

from ._util import F64, as_time, check_number


class Schedule:
    """Base class. `t_max` is where sampling starts (the prior); t = 0 is the data."""

    t_max: float = 1.0
    num_steps: int | None = None  # N for a discrete DDPM chain, None for a continuous schedule

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dlog_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_from_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """Inverse of `log_alpha` (decreasing in t), by vectorised bisection on [0, 1].

        A fixed number of halvings, so no data-dependent loop and no host synchronisation.
        Subclasses with a closed form override this.
        """
        lo = torch.zeros_like(log_alpha)
        hi = torch.ones_like(log_alpha)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self.log_alpha(mid) > log_alpha  # mid is still too early
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def discretize(self, N: int) -> torch.Tensor:
        """DDPM betas whose chain matches this schedule at the knots t = n/N:
        beta_n = 1 - alpha(n/N)^2 / alpha((n-1)/N)^2 (the 'respacing' of Nichol & Dhariwal 2021)."""
        la = self.log_alpha(torch.arange(N + 1, dtype=F64) / N)
        return -torch.expm1(2.0 * (la[1:] - la[:-1]))


class LinearSchedule(Schedule):
    """beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, VP-SDE)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        check_number("beta_min", beta_min, low=0.0)
        check_number("beta_max", beta_max, low=0.0, low_open=True)
        if beta_max < beta_min:
            raise ValueError(f"beta_max={beta_max!r}: must be > 0 and >= beta_min={beta_min!r}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def __repr__(self):
        return f"LinearSchedule(beta_min={self.beta_min}, beta_max={self.beta_max})"

    def log_alpha(self, t):
        t = as_time(t)
        return -0.5 * t * (self.beta_min + 0.5 * t * (self.beta_max - self.beta_min))

    def dlog_alpha(self, t):
        t = as_time(t)
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))

    def t_from_log_alpha(self, log_alpha):
        # Solve beta_min t + (delta/2) t^2 = c, c = -2 log alpha, in the cancellation-free form.
        c = -2.0 * as_time(log_alpha)
        delta = self.beta_max - self.beta_min
        return 2.0 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * delta * c))

    def discretize(self, N: int) -> torch.Tensor:
        """Song et al.'s DDPM discretisation beta_i = beta((i-1)/(N-1)) / N; N = 1000 gives
        Ho et al.'s linspace(1e-4, 0.02, 1000)."""
        if self.beta_max / N >= 1.0:
            raise ValueError(
                f"N={N}: the linear schedule's DDPM betas beta_max/N must be < 1; use N > {self.beta_max:g}"
            )
        return torch.linspace(self.beta_min / N, self.beta_max / N, N, dtype=F64)


class CosineSchedule(Schedule):
    """alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t+s)/(1+s) pi/2) (Nichol & Dhariwal 2021).

    beta(t) diverges at t = 1 (alpha(1) = 0), so sampling starts at `t_max` < 1: by default
    0.9946, where alpha^2 is about 7e-5, the choice of Lu et al. (DPM-Solver, 2022).
    """

    def __init__(self, s: float = 0.008, t_max: float = 0.9946):
        check_number("s", s, low=0.0)  # the offset
        check_number("t_max", t_max, low=0.0, high=1.0, low_open=True, high_open=True)  # alpha(1) = 0
        self.s, self.t_max = float(s), float(t_max)
        self._a0 = self.s / (1 + self.s) * math.pi / 2  # the angle at t = 0
        self._rate = math.pi / (2 * (1 + self.s))  # d angle / dt

    def __repr__(self):
        return f"CosineSchedule(s={self.s}, t_max={self.t_max})"

    def log_alpha(self, t):
        # alpha = cos(a0 + d)/cos(a0) = 1 - 2 sin^2(d/2) - tan(a0) sin(d), d = rate t: exactly 0 at
        # t = 0 and free of the cancellation that log cos(a0 + d) - log cos(a0) suffers there.
        d = as_time(t) * self._rate
        # Clamped at -1: at t = 1 rounding can push the argument a hair below it (alpha = 0 there).
        return torch.log1p((-2 * torch.sin(d / 2) ** 2 - math.tan(self._a0) * torch.sin(d)).clamp(min=-1.0))

    def dlog_alpha(self, t):
        return -torch.tan(self._a0 + as_time(t) * self._rate) * self._rate

    def t_from_log_alpha(self, log_alpha):
        # cos(angle) = alpha cos(a0), with sin^2(angle) = sin^2(a0) - cos^2(a0) expm1(2 log alpha)
        # written without cancellation; atan2 keeps the small angles near t = 0 accurate.
        la = as_time(log_alpha)
        c0, s0 = math.cos(self._a0), math.sin(self._a0)
        angle = torch.atan2(torch.sqrt(s0**2 - c0**2 * torch.expm1(2 * la)), torch.exp(la) * c0)
        t = (angle - self._a0) / self._rate
        # One Newton step on log alpha(t) = la removes what subtracting a0 cost (for s > 0).
        slope = self.dlog_alpha(t)
        step = torch.where(slope != 0, (self.log_alpha(t) - la) / slope, torch.zeros_like(t))
        return t - step

    def discretize(self, N: int) -> torch.Tensor:
        """Nichol & Dhariwal's betas, clipped at 0.999 where alpha -> 0."""
        return super().discretize(N).clamp(max=0.999)


class DiscreteSchedule(Schedule):
    """A DDPM chain of N = len(betas) steps as a VP-SDE.

    Step n = 1..N sits at t = n/N with alpha(n/N)^2 = alpha_bar_n = prod_{i<=n} (1 - beta_i);
    log alpha is linear between the knots, so beta(t) = -N log(1 - beta_n) on ((n-1)/N, n/N].
    """

    def __init__(self, betas):
        if isinstance(betas, torch.Tensor) and (betas.device.type == "meta" or betas.is_complex()):
            raise TypeError(f"betas: expected real values to read, got a {betas.dtype} tensor on {betas.device}")
        if isinstance(betas, (str, bytes)):
            raise TypeError(f"betas={betas!r}: expected a 1-D sequence or tensor of numbers in (0, 1)")
        try:
            betas = torch.as_tensor(betas, dtype=F64).detach().cpu()
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise TypeError(f"betas={betas!r}: expected a 1-D sequence or tensor of numbers in (0, 1) "
                            f"({err})") from None
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas: expected a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        bad = ~((betas > 0) & (betas < 1))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"betas[{i}]={betas[i].item()!r}: every beta must lie in the open interval (0, 1)")
        self.betas = betas
        self.num_steps = betas.numel()
        # log alpha at the knots n/N, n = 0..N (alpha(0) = 1).
        self.knots = torch.cat([torch.zeros(1, dtype=F64), 0.5 * torch.cumsum(torch.log1p(-betas), 0)])
        self._knot_copies = {torch.device("cpu"): self.knots}

    def __repr__(self):
        return f"DiscreteSchedule(N={self.num_steps})"

    def _knots_on(self, device) -> torch.Tensor:
        """The knots on `device`, copied there once (a copy per call would wait for the GPU)."""
        if device not in self._knot_copies:
            self._knot_copies[device] = self.knots.to(device)
        return self._knot_copies[device]

    def _segment(self, t):
        """Index n-1 of the segment ((n-1)/N, n/N] holding t, and t's position N t."""
        pos = as_time(t) * self.num_steps
        # A knot n/N rounded in float64 lands a hair off n; snap it, so that beta at the chain's own
        # times comes from the step that ends there, not from the next one.
        near = torch.round(pos)
        snapped = torch.where((pos - near).abs() <= 4 * torch.finfo(F64).eps * near, near, pos)
        # nan_to_num: a NaN time must not become an int64 index (it stays NaN through pos).
        seg = (torch.ceil(snapped) - 1).nan_to_num(0.0).clamp(0, self.num_steps - 1).long()
        return seg, pos

    def log_alpha(self, t):
        seg, pos = self._segment(t)
        knots = self._knots_on(seg.device)
        left, right = knots[seg], knots[seg + 1]
        return left + (pos - seg) * (right - left)

    def dlog_alpha(self, t):
        seg, _ = self._segment(t)
        knots = self._knots_on(seg.device)
        return (knots[seg + 1] - knots[seg]) * self.num_steps

    def t_from_log_alpha(self, log_alpha):
        log_alpha = as_time(log_alpha)
        knots = self._knots_on(log_alpha.device)
        seg = (torch.searchsorted(-knots, -log_alpha.contiguous()) - 1).clamp(0, self.num_steps - 1)
        left, right = knots[seg], knots[seg + 1]
        return (seg + (log_alpha - left) / (right - left)) / self.num_steps

    def discretize(self, N: int) -> torch.Tensor:
        if N == self.num_steps:
            return self.betas.clone()
        return super().discretize(N)
