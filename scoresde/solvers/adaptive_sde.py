"""Adaptive reverse-SDE solver with error control (Jolicoeur-Martineau et al. 2021, "Gotta Go Fast When
Generating Data with Score-Based Models", Algorithm 1).

Each attempted step from t to s = t - h draws one z and takes
    x'  = x + k1,              k1 = h b(x, t) + sqrt(beta(t) h) z           (Euler-Maruyama)
    x'' = x + (k1 + k2) / 2,   k2 = h b(x', s) + sqrt(beta(s) h) z          (improved Euler, same z)
with b(x, t) = beta(t) (x/2 - eps(x, t)/sigma(t)) the reverse drift (score = -eps/sigma). The local
error x'' - x' is measured against the mixed tolerance delta = max(atol, rtol max(|x'|, |x'_prev|))
(element-wise; x'_prev is x' of the last accepted step) in the scaled L2 norm
E = sqrt(mean((x'' - x')^2 / delta^2)). The step is accepted (x <- x'') when E <= 1, and either way
h <- min(t - t_end, theta h E^-r) with theta = 0.9 and r = 0.9, the authors' values.

As in the authors' code, every sample has its own t and h and is accepted or rejected on its own
error: the model is called on the whole batch with per-sample times, a sample that reached t_end
takes empty steps (and stops changing) until the last one arrives, and NFE counts batched model
calls, 2 per attempt, so it is set by the sample that needs the most attempts. With one generator
per sample, a sample does not depend on its batch.

Unlike the authors' code, a rejected step's draw is kept, not replaced by a fresh one: the retry's
shorter increment comes from the Brownian bridge through it (rejection sampling with memory,
Rackauckas & Nie 2017, `_PathAhead`), so the path does not depend on the decisions. Fresh draws
discard exactly the draws that gave large errors, and where the error reads single draws (2-D data:
30-45% rejections) that leans the noise small: on the sharp 2-D ring at 40000 samples, mode weights
4-6 standard errors off (too many in the lightest mode, too few in the heaviest), at rtol = atol =
1e-2 and 3e-3 alike; with memory, within 2.5.
`noise=BrownianNoise(...)` is a path already: a retry asks it for the shorter step of the same path.
The noise source is called with per-sample (batch,) float64 CPU tensors t0, t1.
"""
from __future__ import annotations

import itertools
import math

import torch

from .._util import F64, host_floats, per_sample
from .base import _SUM_DTYPE, BrownianNoise, register
from .options import Integer, Number

SAFETY = 0.9  # theta: aim at 90% of the step the error estimate allows (the authors' value)
EXPONENT = 0.9  # r in h <- theta h E^-r (the authors' value; step-size theory for an order-1 pair gives 1/2)


def _scaled_errors(x_low, x_high, x_prev, rtol, atol) -> torch.Tensor:
    """Per-sample scaled L2 norms of the local error (shape (batch,), on the device)."""
    dtype = _SUM_DTYPE.get(x_low.dtype, x_low.dtype)  # half precision: in float32
    x_low, x_high, x_prev = (v.flatten(1).to(dtype) for v in (x_low, x_high, x_prev))
    delta = torch.maximum(x_low.abs(), x_prev.abs()).mul_(rtol).clamp_(min=atol)
    return ((x_high - x_low) / delta).pow_(2).mean(1).sqrt_()


def _against(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A mask over x's leading dimensions, on x's device and shaped to broadcast against x."""
    return mask.to(x.device).reshape(*mask.shape, *[1] * (x.ndim - mask.ndim))


class _PathAhead:
    """What the attempts have drawn of each sample's Brownian path ahead of its t (Rackauckas & Nie
    2017, "Adaptive methods for SDEs ... rejection sampling with memory"): a rejected step's increment
    is kept, a retry's shorter one comes from the Brownian bridge through it, and the rest serves the
    next steps. The path then does not depend on the accept/reject decisions.

    Per sample: breakpoints c, durations ahead of t in ascending order (+inf pads unused slots; CPU
    float64), and w, the path's increment from t over each (on the device).
    """

    def __init__(self, x: torch.Tensor):
        self.c = torch.empty(x.shape[0], 0, dtype=F64)
        self.w = x.new_empty(x.shape[0], 0, *x.shape[1:])

    def unit_increment(self, h: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        """The path's increment over the next h (per sample, >= 0) over sqrt(h); xi ~ N(0, I) serves
        where the path is not yet known. h becomes a breakpoint, at slot k (h = 0: a finished sample)."""
        rows = torch.arange(len(h))
        k = torch.searchsorted(self.c, h[:, None]).squeeze(1)  # c[k - 1] < h <= c[k]
        c = torch.cat([torch.zeros_like(h)[:, None], self.c, torch.full_like(h, math.inf)[:, None]], 1)
        w = torch.cat([torch.zeros_like(xi)[:, None], self.w, torch.zeros_like(xi)[:, None]], 1)
        lo, hi = c[rows, k], c[rows, k + 1]
        # From the known point below h: the bridge to the one above, or a free path past the last.
        bridged = torch.isfinite(hi)
        frac = torch.where(bridged, (h - lo) / (hi - lo), 0.0)
        var = torch.where(bridged, (h - lo) * (hi - h) / (hi - lo), h - lo)
        coef = torch.stack([frac, var.sqrt(), torch.where(h > 0, h, 1.0).rsqrt()]).to(xi.device, xi.dtype)
        frac, std, scale = (per_sample(v, xi) for v in coef)
        w_lo, w_hi = w[rows, k], w[rows, k + 1]
        inc = w_lo + frac * (w_hi - w_lo) + std * xi
        new = (h > 0) & (h < hi)  # h = hi: that breakpoint is h already (slot k all the same)
        self._insert(torch.where(new, h, math.inf), torch.where(new, k, self.c.shape[1]),
                     torch.where(_against(new, inc), inc, 0.0))
        self._k, self._h, self._inc = k, h, inc
        return inc * scale

    def _insert(self, h, k, inc):
        """Insert h and inc at each row's slot k (h = inf goes last: an unused slot)."""
        slots = torch.arange(self.c.shape[1] + 1)
        take = slots - (slots > k[:, None]).long()  # slot j takes j before k, j - 1 after it
        at = slots == k[:, None]
        self.c = torch.cat([self.c, h[:, None]], 1).gather(1, take)
        self.w = torch.cat([self.w, inc[:, None]], 1)[torch.arange(len(h))[:, None], take]
        self.c[at], self.w[at] = h, inc

    def advance(self, accept: torch.Tensor):
        """Accepted samples move on by their h: the breakpoints up to it (slots 0..k) are passed."""
        n = self.c.shape[1]
        take = torch.arange(n) + torch.where(accept, self._k + 1, 0)[:, None]
        past = take >= n
        take = take.clamp(max=n - 1)
        c = self.c.gather(1, take) - torch.where(accept, self._h, 0.0)[:, None]
        w = self.w[torch.arange(len(accept))[:, None], take]
        w = w - torch.where(_against(accept, self._inc), self._inc, 0.0)[:, None]
        self.c = torch.where(past, math.inf, c)
        self.w = torch.where(_against(past, w), 0.0, w)
        keep = int(torch.isfinite(self.c).sum(1).max())  # sync: none, CPU
        self.c, self.w = self.c[:, :keep].contiguous(), self.w[:, :keep]


@register("adaptive_sde", grid=None, stochastic=True, options={
    "rtol": Number(0.0), "atol": Number(0.0, low_open=True), "h_init": Number(0.0, low_open=True),
    "max_steps": Integer(1)})
def adaptive_sde(model, x, times, *, noise, callback, rtol: float = 1e-2, atol: float = 1e-2,
                 h_init: float = 0.01, max_steps: int = 10000):
    """Adaptive Euler-Maruyama / improved-Euler pair on the reverse SDE with per-sample step-size control
    (Jolicoeur-Martineau et al. 2021). rtol, atol: the mixed tolerance; 1e-2 are the defaults of the
    authors' code, about one 8-bit level (2/255) of data in [-1, 1]: local errors below what an image
    can show. h_init: the first step in t (theirs). max_steps: the most attempted steps (accepted or
    rejected) of any sample before giving up. Two model calls per attempt. The error estimate is a mean
    over a sample's elements, so it is steady for images and rejections are rare (1-3% of attempts on a
    two-mode mixture in 256 or 3072 dimensions) but in 2-D it swings with each draw: 30-45% there."""
    model.step = None  # no grid: errors name the time only
    t_start, t_end = host_floats(times[[0, -1]])
    # The step control runs on the host, in float64: per-sample t and h (CPU tensors).
    t = torch.full((x.shape[0],), t_start, dtype=F64)
    h = torch.full_like(t, min(h_init, t_start - t_end))
    x_prev = x  # x' of each sample's last accepted step; the start state before the first
    path = None if isinstance(noise, BrownianNoise) else _PathAhead(x)  # BrownianNoise is a path itself
    for attempt in itertools.count():
        active = t > t_end
        if not active.any():
            break
        if attempt == max_steps:
            raise RuntimeError(
                f"solver 'adaptive_sde' reached max_steps={max_steps} attempted steps with {int(active.sum())} of "
                f"{len(t)} samples short of t_end={t_end:.6g} (the furthest behind at t={float(t.max()):.6g}); "
                f"raise max_steps or loosen rtol={rtol!r}, atol={atol!r}")
        s = torch.where(active, torch.where(h >= t - t_end, t_end, t - h), t)  # done: empty steps at t_end
        stuck = (active & ~(s < t)).nonzero()
        if len(stuck):
            k = int(stuck[0])
            raise RuntimeError(f"solver 'adaptive_sde': the step size underflowed (h={float(h[k]):.3g}) at "
                               f"t={float(t[k]):.6g} (sample {k})")
        h = t - s
        z = noise(x, t, s)  # unit-variance increments over [s, t]; from GaussianNoise, fresh draws
        x_low, x_high = _attempt(model, x, t, s, z if path is None else path.unit_increment(h, z))
        err = _scaled_errors(x_low, x_high, x_prev, rtol, atol).to("cpu", F64)  # sync: step control
        err = torch.where(active, err, 0.0)
        bad = (~torch.isfinite(err)).nonzero()
        if len(bad):
            k = int(bad[0])
            raise FloatingPointError(f"solver 'adaptive_sde': the state became NaN or inf in the step from "
                                     f"t={float(t[k]):.6g} to t={float(s[k]):.6g} (sample {k})")
        accept = active & (err <= 1.0)
        if path is not None:
            path.advance(accept)
        on_x = _against(accept, x)
        x, x_prev, t = torch.where(on_x, x_high, x), torch.where(on_x, x_low, x_prev), torch.where(accept, s, t)
        grown = torch.where(err > 0, SAFETY * h * err.pow(-EXPONENT), math.inf)  # err = 0: as far as t_end
        h = torch.minimum(t - t_end, grown)
    callback(0, x)  # adaptive: one call, at t_end
    return x


def _step_coefficients(sde, t, h) -> tuple:
    """Per sample, the coefficients of x, eps and z in an Euler-Maruyama step back by h from t."""
    (a, b), sigma = sde.drift_coefficients(t), sde.sigma(t)
    return -h * a, h * b / sigma, sde.diffusion(t) * torch.sqrt(h)


def _attempt(model, x, t, s, z):
    """One attempted step from t to s (per-sample CPU float64 times) with the unit-variance Brownian
    increment z: (x', x'')."""
    sde, h = model.sde, t - s
    # Per-sample coefficients of x, eps and z in k1 and k2, moved to the device in one copy: a step
    # back by h moves x by -h (a x - (b/sigma) eps) + g sqrt(h) z, the reverse drift a x + b score.
    coef = torch.stack([c for u in (t, s) for c in _step_coefficients(sde, u, h)])
    coef = coef.to(x.device, x.dtype).reshape(6, -1, *[1] * (x.ndim - 1))
    # Euler-Maruyama: x' = x + h beta (x/2 - eps/sigma) + sqrt(beta h) z, then the same at (x', s).
    eps = model(x, t)
    model.check_last()  # sync: step control reads the host anyway; a NaN stops the solve at once
    k1 = (x * coef[0]).addcmul_(eps, coef[1]).addcmul_(z, coef[2])
    x_low = x + k1
    eps = model(x_low, s)
    model.check_last()  # sync: as above
    k2 = (x_low * coef[3]).addcmul_(eps, coef[4]).addcmul_(z, coef[5])
    return x_low, x + 0.5 * (k1 + k2)
