"""Time grids for fixed-step solvers: float64 CPU tensors running from t_start down to t_end.

Every grid is a function grid(sde, steps, t_start, t_end) -> times of length steps + 1, so a
user's own spacing is one more function (functools.partial(karras, rho=5) works too).
"""
from __future__ import annotations

import torch

from ._util import F64, check_count, check_number
from .sde import VPSDE


def _fraction(steps: int) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, steps + 1, dtype=F64)


def _check_grid(sde, steps, t_start, t_end):
    """The shared contract of every grid: 0 < t_end < t_start <= sde.T and 1 <= steps <= MAX_STEPS."""
    if not isinstance(sde, VPSDE):
        raise TypeError(f"sde={sde!r}: expected a scoresde.VPSDE")
    check_count("steps", steps)
    t_start = check_number("t_start", t_start, low=0.0, high=sde.T, low_open=True)
    t_end = check_number("t_end", t_end, low=0.0, high=t_start, low_open=True, high_open=True)
    return t_start, t_end


def _pin_ends(times, t_start, t_end):
    """Exact end points, whatever rounding or the round trip through another variable did."""
    times[0], times[-1] = t_start, t_end
    return times


def uniform(sde, steps: int, t_start: float, t_end: float) -> torch.Tensor:
    """Equal steps in t (DDPM's and Song et al.'s choice)."""
    t_start, t_end = _check_grid(sde, steps, t_start, t_end)
    return _pin_ends(t_start + (t_end - t_start) * _fraction(steps), t_start, t_end)


def quadratic(sde, steps: int, t_start: float, t_end: float) -> torch.Tensor:
    """Steps growing quadratically away from the data: t - t_end ~ (1 - i/steps)^2 (DDIM)."""
    t_start, t_end = _check_grid(sde, steps, t_start, t_end)
    return _pin_ends(t_end + (t_start - t_end) * (1.0 - _fraction(steps)) ** 2, t_start, t_end)


def log_snr(sde, steps: int, t_start: float, t_end: float) -> torch.Tensor:
    """Equal steps in the half log-SNR lambda (DPM-Solver's choice)."""
    t_start, t_end = _check_grid(sde, steps, t_start, t_end)
    lam = sde.log_snr(torch.tensor([t_start, t_end], dtype=F64))
    lams = lam[0] + (lam[1] - lam[0]) * _fraction(steps)
    return _pin_ends(sde.t_from_log_snr(lams), t_start, t_end)


def karras(sde, steps: int, t_start: float, t_end: float, rho: float = 7.0) -> torch.Tensor:
    """Equal steps in (sigma/alpha)^(1/rho) (Karras et al. 2022), dense near the data."""
    t_start, t_end = _check_grid(sde, steps, t_start, t_end)
    rho = check_number("rho", rho, low=0.0, low_open=True)
    # In logs throughout: (sigma/alpha) itself overflows for chains with alpha_bar_N < 1e-616.
    root = torch.exp(-sde.log_snr(torch.tensor([t_start, t_end], dtype=F64)) / rho)
    lams = -rho * torch.log(root[0] + (root[1] - root[0]) * _fraction(steps))
    return _pin_ends(sde.t_from_log_snr(lams), t_start, t_end)


GRIDS = {"uniform": uniform, "quadratic": quadratic, "log_snr": log_snr, "karras": karras}
