"""What every solver shares: the registry entry, the counted model call and the noise source."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..prediction import Denoiser

# The arguments every solver takes; everything else in its signature is a solver option.
SHARED_ARGS = ("model", "x", "times", "noise", "callback")


@dataclass(frozen=True)
class Solver:
    """A registered solver: `fn(model, x, times, *, noise, callback, **options) -> x`.

    grid: the default time grid's name, or None for an adaptive solver (which takes no grid).
    nfe_per_step: model calls per step of a fixed-step solver (for progress and docs).
    """

    name: str
    fn: Callable
    grid: str | None
    stochastic: bool
    nfe_per_step: int
    options: dict = field(default_factory=dict)  # option name -> default value

    @property
    def adaptive(self) -> bool:
        return self.grid is None

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


SOLVERS: dict[str, Solver] = {}


def register(name: str, *, grid: str | None = "uniform", stochastic: bool = False, nfe_per_step: int = 1):
    """Register `fn` in SOLVERS under `name` (decorator)."""

    def decorate(fn):
        params = inspect.signature(fn).parameters
        options = {k: p.default for k, p in params.items() if k not in SHARED_ARGS}
        SOLVERS[name] = Solver(name, fn, grid, stochastic, nfe_per_step, options)
        return fn

    return decorate


_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _where(step, t) -> str:
    """Where a model call happened, for messages: the step (None for solvers without a grid) and t."""
    return f"t={float(t):.6g}" if step is None else f"step {step}, t={float(t):.6g}"


class ModelRun:
    """The model as one sampling run sees it: eps(x, t) with t a Python float or a 0-d tensor.

    Counts model calls (NFE), checks the output's shape at once and its finiteness without a
    host round trip (the flags are read once, after the loop, by `check_finite`), and drives
    the progress bar. `step` is the solver step in progress, for error messages (None for
    solvers that do not step on a grid: adaptive ones and bridges).
    """

    def __init__(self, denoiser: Denoiser, sde, *, progress: bool = False, total: int | None = None):
        self.denoiser, self.sde, self.step = denoiser, sde, 0
        self._calls: list[tuple] = []  # (sum of the output, step, t) per call, read after the loop
        self._bar = tqdm(total=total, unit="NFE", leave=False) if progress else None

    @property
    def nfe(self) -> int:
        return len(self._calls)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        eps = self.denoiser.eps(x, t)
        if eps.shape != x.shape:
            raise ValueError(f"model output has shape {tuple(eps.shape)}, expected the input's "
                             f"{tuple(x.shape)} ({_where(self.step, t)})")
        # A sum is NaN or inf whenever an element is, and costs one pass where isfinite() costs
        # several; half-precision outputs are summed in float32 so the sum cannot overflow.
        self._calls.append((eps.sum(dtype=_SUM_DTYPE.get(eps.dtype)), self.step, t))
        if self._bar is not None:
            self._bar.update()
        return eps if eps.dtype == x.dtype else eps.to(x.dtype)

    def check_last(self):
        """Raise now if the latest model output held NaN or inf: for adaptive solvers and bridges,
        whose step control reads every evaluation on the host anyway."""
        if not bool(torch.isfinite(self._calls[-1][0])):  # sync: the caller syncs every call anyway
            self.check_finite()

    def check_finite(self):
        """Raise if any model output held NaN or inf, naming the first step and t."""
        if self._bar is not None:
            self._bar.close()
        if not self._calls:
            return
        finite = torch.isfinite(torch.stack([c[0] for c in self._calls]))
        if not bool(finite.all()):  # sync: once, after the loop
            call = int((~finite).nonzero()[0])
            _, step, t = self._calls[call]
            raise FloatingPointError(f"the model returned NaN or inf at model call {call + 1} ({_where(step, t)})")


class GaussianNoise:
    """Standard normal draws from one generator, or from a list of generators, one per sample
    (then a sample's noise does not depend on the batch it is drawn in)."""

    def __init__(self, generator=None):
        if isinstance(generator, (list, tuple)):
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("generator: a list must hold torch.Generator objects only")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r}: expected a torch.Generator, a list of them, or None")
        self.generator = generator

    def draw(self, shape, dtype, device) -> torch.Tensor:
        g = self.generator
        if isinstance(g, (list, tuple)):
            if len(g) != shape[0]:
                raise ValueError(f"generator: a list of {len(g)} generators for a batch of {shape[0]}")
            return torch.stack([self._one(shape[1:], gi, dtype, device) for gi in g])
        return self._one(shape, g, dtype, device)

    @staticmethod
    def _one(shape, g, dtype, device):
        where = g.device if g is not None else device
        z = torch.randn(shape, generator=g, dtype=dtype, device=where)
        return z.to(device, non_blocking=True)

    def __call__(self, like: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
        """Standard normal noise for the step from t0 to t1."""
        return self.draw(like.shape, like.dtype, like.device)


class BrownianNoise(GaussianNoise):
    """Increments of one Brownian path (torchsde's BrownianInterval), scaled to unit variance.

    Solvers on different grids then see the same path: their fine steps add up to the coarse
    ones, as strong-order tests and coupled comparisons need.
    """

    def __init__(self, shape, t0: float, t1: float, *, seed: int = 0, dtype=torch.float32, device=None):
        import torchsde

        super().__init__(None)
        self.shape = tuple(shape)
        self.path = torchsde.BrownianInterval(
            t0=min(t0, t1), t1=max(t0, t1), size=(self.shape[0], int(torch.Size(self.shape[1:]).numel())),
            dtype=dtype, device=device, entropy=seed)

    def __call__(self, like, t0, t1):
        lo, hi = min(t0, t1), max(t0, t1)
        dw = self.path(lo, hi) / (hi - lo) ** 0.5
        return dw.reshape(like.shape).to(like.dtype)
