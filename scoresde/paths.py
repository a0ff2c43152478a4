"""Models trained on other Gaussian diffusion paths, served exactly by every solver of the library.

A path x = a(t) x0 + s(t) eps is the VP path in disguise (Kingma et al. 2021, "Variational
Diffusion Models"; Karras et al. 2022, sec. 2): at equal half log-SNR lambda = log(a/s) the two
states differ by a scale, x_vp = x / sqrt(a^2 + s^2), and x0 and eps are the same. So at a VP time
with (alpha, sigma) the adapter calls the network at the path time t with log(a(t)/s(t)) =
log(alpha/sigma), on x_vp * sqrt(a^2 + s^2), and reads its output as x0 or eps: no approximation.

Ready paths: `ve` (Song et al. 2021's variance-exploding SDE, sigma_min (sigma_max/sigma_min)^t),
`subvp` (their sub-VP SDE, s = 1 - a^2), `flow` (rectified flow / flow matching: a = 1 - t,
s = t), `sigma` (the variance-exploding convention with sigma itself as the time, as k-diffusion's
and EDM's denoisers take it); `Path.from_coefficients` makes one from any a(t) and s(t).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._util import F64, check_number
from .prediction import Coef, Prediction, PredictionModel, Time, schedule_at
from .schedules import LinearSchedule
from .sde import VPSDE

PREDICTIONS = ("eps", "x0", "score", "velocity")  # velocity: v = eps - x0 (flow matching)
TIME_ARGUMENTS = ("t", "sigma")


def _log(value):
    return math.log(value) if isinstance(value, float) else torch.log(value)


@dataclass(frozen=True)
class Path:
    """A Gaussian diffusion path x = a(t) x0 + s(t) eps.

    Attributes:
        name: for messages.
        a: t -> a(t), on float64 tensors.
        s: t -> s(t), on float64 tensors.
        time_at: half log-SNR lambda = log(a/s) -> the path time t there (float64 tensors).
        lam_range: the lowest and highest half log-SNR the path covers (its noise range); a
            sampling grid outside it is refused.
    """

    name: str
    a: Callable
    s: Callable
    time_at: Callable
    lam_range: tuple[float, float]

    @classmethod
    def from_coefficients(cls, a: Callable, s: Callable, t_min: float = 0.0, t_max: float = 1.0,
                          name: str = "custom") -> Path:
        """A path from its coefficients, its log-SNR inverted by bisection on [t_min, t_max].

        Args:
            a: t -> a(t) on float64 tensors.
            s: t -> s(t) on float64 tensors, with log(a/s) strictly decreasing on [t_min, t_max].
            t_min: where the path starts (the data end).
            t_max: where it ends (the noise end).
            name: for messages.

        Returns:
            The Path.
        """
        t_min = check_number("t_min", t_min)
        t_max = check_number("t_max", t_max, low=t_min, low_open=True)
        ends = torch.tensor([t_min, t_max], dtype=F64)
        lam_ends = (torch.log(a(ends)) - torch.log(s(ends))).tolist()

        def time_at(lam):
            lo, hi = torch.full_like(lam, t_min), torch.full_like(lam, t_max)
            for _ in range(64):  # a fixed number of halvings: no data-dependent loop
                mid = 0.5 * (lo + hi)
                later = torch.log(a(mid)) - torch.log(s(mid)) > lam  # still too much signal: go later
                lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
            return 0.5 * (lo + hi)

        return cls(name, a, s, time_at, (min(lam_ends), max(lam_ends)))


def ve(sigma_min: float = 0.01, sigma_max: float = 50.0) -> Path:
    """Song et al. 2021's variance-exploding path: a = 1, s(t) = sigma_min (sigma_max/sigma_min)^t, t in [0, 1].

    Args:
        sigma_min: the noise at t = 0.
        sigma_max: the noise at t = 1.

    Returns:
        The Path.
    """
    sigma_min = check_number("sigma_min", sigma_min, low=0.0, low_open=True)
    sigma_max = check_number("sigma_max", sigma_max, low=sigma_min, low_open=True)
    ratio = math.log(sigma_max / sigma_min)
    return Path(f"ve(sigma_min={sigma_min:g}, sigma_max={sigma_max:g})", torch.ones_like,
                lambda t: sigma_min * torch.exp(ratio * t), lambda lam: (-lam - math.log(sigma_min)) / ratio,
                (-math.log(sigma_max), -math.log(sigma_min)))


def subvp(beta_min: float = 0.1, beta_max: float = 20.0) -> Path:
    """Song et al. 2021's sub-VP path: a(t) the linear VP schedule's alpha, s = 1 - a^2, t in (0, 1].

    Args:
        beta_min: beta(0).
        beta_max: beta(1).

    Returns:
        The Path.
    """
    schedule = LinearSchedule(beta_min, beta_max)

    def a(t):
        return torch.exp(schedule.log_alpha(t))

    def s(t):
        return -torch.expm1(2 * schedule.log_alpha(t))  # 1 - a^2

    def time_at(lam):
        # a / (1 - a^2) = e^lam: the positive root of e^lam a^2 + a - e^lam = 0, written without cancellation
        e = torch.exp(-lam) if isinstance(lam, torch.Tensor) else math.exp(-lam)
        alpha = 2.0 / (e + torch.sqrt(torch.as_tensor(e * e + 4.0, dtype=F64)))
        return schedule.t_from_log_alpha(torch.log(alpha))

    end = torch.tensor(1.0, dtype=F64)
    lam_end = float(torch.log(a(end)) - torch.log(s(end)))
    return Path(f"subvp(beta_min={beta_min:g}, beta_max={beta_max:g})", a, s, time_at, (lam_end, math.inf))


def flow() -> Path:
    """The rectified-flow / flow-matching path: a = 1 - t, s = t, t in (0, 1) (t = 1 is noise).

    Returns:
        The Path.
    """
    return Path("flow", lambda t: 1.0 - t, lambda t: t, lambda lam: torch.sigmoid(-torch.as_tensor(lam, dtype=F64)),
                (-math.inf, math.inf))


def sigma() -> Path:
    """The variance-exploding convention with the noise level as the time: a = 1, s = sigma = t.

    Returns:
        The Path.
    """
    return Path("sigma", torch.ones_like, lambda t: t, lambda lam: torch.exp(-torch.as_tensor(lam, dtype=F64)),
                (-math.inf, math.inf))


class PathDenoiser(PredictionModel):
    """A network trained on another path, as a model on the VP-SDE `sde` (see the module docstring).

    Args:
        fn: the network, fn(x, time) -> its output, of x's shape, with x on its own path.
        sde: the VP-SDE the library samples with (any: the solvers see log-SNR, not its time).
        path: the network's path.
        prediction: what fn returns: "eps", "x0", "score" (of the path's marginal) or "velocity"
            (v = eps - x0, flow matching).
        time: the time argument fn takes: "t" (the path's time) or "sigma" (its s(t)), as a
            (batch,) tensor in x's dtype.
    """

    def __init__(self, fn: Callable, sde: VPSDE, path: Path, prediction: str = "eps", time: str = "t"):
        if not callable(fn):
            raise TypeError(f"fn={fn!r}: expected a callable network fn(x, time)")
        if not isinstance(sde, VPSDE):
            raise TypeError(f"sde={sde!r}: expected a scoresde.VPSDE")
        if not isinstance(path, Path):
            raise TypeError(f"path={path!r}: expected a scoresde.paths.Path (ve(), subvp(), flow(), sigma(), ...)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}: expected one of {PREDICTIONS}")
        if time not in TIME_ARGUMENTS:
            raise ValueError(f"time={time!r}: expected one of {TIME_ARGUMENTS}")
        self.fn, self.sde, self.path, self.prediction, self.time = fn, sde, path, prediction, time

    def __repr__(self):
        return f"PathDenoiser({type(self.fn).__name__}, path={self.path.name}, prediction={self.prediction!r})"

    def forward(self, x: torch.Tensor, t: Time, alpha: Coef = None, sigma: Coef = None) -> Prediction:
        if alpha is None or sigma is None:
            alpha, sigma = schedule_at(self.sde, t, x)
        lam = _log(alpha) - _log(sigma)
        self._check_range(lam)
        t_path = self.path.time_at(lam if isinstance(lam, torch.Tensor) else torch.tensor(lam, dtype=F64))
        a, s = self.path.a(t_path), self.path.s(t_path)
        x_path = x * torch.sqrt(a * a + s * s).to(x.dtype)
        out = self.fn(x_path, _batch_time(s if self.time == "sigma" else t_path, x))
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"fn (the network behind the {self.path.name} adapter) returned {got}, expected x's shape "
                             f"{tuple(x.shape)}")
        a, s = a.to(x.dtype), s.to(x.dtype)
        if self.prediction == "score":  # eps = -s * score of the path's marginal
            return Prediction("eps", -s * out, x, t, self.sde, alpha, sigma)
        if self.prediction == "velocity":  # x_path = a x0 + s eps and v = eps - x0 give x0 = (x_path - s v) / (a + s)
            return Prediction("x0", (x_path - s * out) / (a + s), x, t, self.sde, alpha, sigma)
        return Prediction(self.prediction, out, x, t, self.sde, alpha, sigma)

    def _check_range(self, lam):
        """Refuse a half log-SNR outside the path's noise range (host floats: a free check)."""
        if not isinstance(lam, float):
            return
        low, high = self.path.lam_range
        if lam < low:
            raise ValueError(f"the sampling grid reaches half log-SNR {lam:.6g}, noisier than the {self.path.name} path "
                             f"goes (its noisiest point has {low:.6g}): start the grid later (a smaller T, or a grid "
                             "from a later time)")
        if lam > high:
            raise ValueError(f"the sampling grid reaches half log-SNR {lam:.6g}, cleaner than the {self.path.name} path "
                             f"goes (its least noisy point has {high:.6g}): end the grid earlier (a larger t_end)")


def _batch_time(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A path time (0-d, or per sample broadcast against x) as the network's (batch,) time argument."""
    value = value.to(x.dtype)
    return value.expand(x.shape[0]) if value.numel() == 1 else value.reshape(x.shape[0])


__all__ = ["Path", "PathDenoiser", "ve", "subvp", "flow", "sigma"]
