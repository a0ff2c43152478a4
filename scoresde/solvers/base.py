"""What every solver shares: the registry entry, the counted model call and the noise source."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .._util import check_count, check_flag, check_number, check_shape, per_sample
from ..grids import GRIDS
from ..prediction import PredictionModel
from .options import Option, check_declarations

# The arguments of a whole-run solver (adaptive ones and bridges); a plan builder takes (planner, **options).
SHARED_ARGS = ("model", "x", "times", "noise", "callback")
PROBE_STEPS = (2, 3)  # a plan builder's model calls per step: the difference of its plans on these step counts


@dataclass(frozen=True)
class Solver:
    """A registered solver: a plan builder `fn(planner, **options)` (see `scoresde.solvers.plan`), or a
    whole-run function `fn(model, x, times, *, noise, callback, **options) -> x` (adaptive solvers, bridges).

    grid: the default time grid's name, or None for an adaptive solver (which takes no grid).
    options: option name -> default value; declared: option name -> what it allows (an `Option`).
    """

    name: str
    fn: Callable
    grid: str | None
    stochastic: bool
    options: dict = field(default_factory=dict)
    declared: dict = field(default_factory=dict)  # option name -> its Option (type and range)
    run_nfe: Callable | None = None  # a whole-run solver's model calls: run_nfe(steps, options) -> int
    plans: bool = False  # fn builds a plan (rather than running the whole solve itself)
    model_defaults: Callable | None = None  # model -> defaults that depend on it (ancestral: a learned variance)

    def defaults_for(self, model) -> dict:
        """The option defaults for sampling `model`: the solver's, then those the model implies."""
        return {**self.options, **(self.model_defaults(model) if self.model_defaults else {})}

    @property
    def adaptive(self) -> bool:
        return self.grid is None

    @property
    def nfe_per_step(self) -> int:
        """Model calls per step with the default options."""
        return self.calls_per_step({})

    def calls_per_step(self, options: dict) -> int:
        """Model calls per step with `options` (after the solver's defaults), counted from plans."""
        small, large = (self.calls(steps, options) for steps in PROBE_STEPS)
        return large - small

    def calls(self, steps: int, options: dict) -> int:
        """Model calls of `steps` steps with `options` (the final denoising call not included); a plan
        builder's are counted from a plan on a probe grid."""
        if not self.plans:
            return self.run_nfe(steps, {**self.options, **options})
        return self.probe(steps, options).finish().nfe

    def probe(self, steps: int, options: dict):
        """A plan builder's plan (its Planner, unfinished) of `steps` steps on a probe grid: for what
        a plan's shape tells (model calls, which outputs each step reads), not for sampling."""
        from ..sde import VPSDE
        from .plan import Planner

        planner = Planner(VPSDE.linear(), torch.linspace(1.0, 1e-3, steps + 1, dtype=torch.float64),
                          torch.zeros(1, 1))
        self.fn(planner, **{**self.options, **options})
        return planner


SOLVERS: dict[str, Solver] = {}
"""Every registered solver by name (`sd.sample(..., solver=name)`); `register` adds to it."""


def register(name: str, *, grid: str | None = "uniform", stochastic: bool = False,
             options: Mapping[str, Option] | None = None, nfe_per_step: int | None = None,
             nfe: Callable | None = None, model_defaults: Callable | None = None,
             replace: bool = False) -> Callable[[Callable], Callable]:
    """Register `fn` in SOLVERS under `name` (decorator).

    Args:
        name: the solver's name (an identifier).
        grid: the default grid's name, or None for an adaptive solver.
        stochastic: whether it draws noise.
        options: what each of fn's options allows (`scoresde.solvers.options`); every option with a
            default in fn's signature is declared here, and `sample` checks given values against it.
        nfe_per_step: a whole-run function's model calls per step (default 1); a plan builder's are
            counted from its plans.
        nfe: for a whole-run function whose count is not steps * nfe_per_step: nfe(steps, options) ->
            its model calls (options with the defaults filled in).
        model_defaults: model -> option defaults that depend on the model sampled (ancestral draws
            with a learned variance when the model has one); options the caller gives win.
        replace: replace a solver of that name (a name already taken is refused otherwise, so a new
            solver cannot silently shadow a built-in one).

    Returns:
        The decorator: it registers a plan builder `fn(planner, **options)` (see
        `scoresde.solvers.plan`) or a whole-run function `fn(model, x, times, *, noise, callback,
        **options)` that returns the samples, and gives fn back.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name={name!r}: expected a solver name made of letters, digits and underscores")
    if grid is not None and (not isinstance(grid, str) or grid not in GRIDS):
        raise ValueError(f"grid={grid!r}: expected one of {sorted(GRIDS)}, or None for an adaptive solver")
    check_flag("stochastic", stochastic)
    check_flag("replace", replace)
    if nfe_per_step is not None:
        check_count("nfe_per_step", nfe_per_step, maximum=None)
    if nfe is not None and not callable(nfe):
        raise TypeError(f"nfe={nfe!r}: expected a function nfe(steps, options) -> model calls, or None")
    if name in SOLVERS and not replace:
        raise ValueError(f"name={name!r}: a solver of that name is registered already; pass replace=True to "
                         "replace it")

    def decorate(fn):
        if not callable(fn):
            raise TypeError(f"register({name!r}) decorates a solver function, got {fn!r}")
        params = inspect.signature(fn).parameters
        builds = "planner" in params
        missing = [arg for arg in SHARED_ARGS if arg not in params]
        if missing and not builds:
            raise TypeError(f"solver {name!r}: its signature lacks the shared argument(s) {missing}: expected a "
                            "plan builder fn(planner, **options) or fn(model, x, times, *, noise, callback, **options)")
        shared = ("planner",) if builds else SHARED_ARGS
        defaults = {k: p.default for k, p in params.items() if k not in shared}
        declared = dict(options or {})
        check_declarations(name, declared, defaults)
        per_step = nfe_per_step or 1
        run_nfe = None if builds else nfe or (lambda steps, _: steps * per_step)
        SOLVERS[name] = Solver(name, fn, grid, stochastic, defaults, declared, run_nfe, builds, model_defaults)
        return fn

    return decorate


_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _per_sample_times(t) -> bool:
    """Whether t holds one time per sample (adaptive_sde's steps) rather than one for the batch."""
    return isinstance(t, torch.Tensor) and t.numel() > 1


def _where(step, t) -> str:
    """Where a model call happened, for messages: the step (None for solvers without a grid) and t
    (per-sample times, as adaptive_sde passes them: their range)."""
    if _per_sample_times(t):
        lo, hi = float(t.min()), float(t.max())
        at = f"t={lo:.6g}" if lo == hi else f"t={lo:.6g} to {hi:.6g} across the batch"
    else:
        at = f"t={float(t.detach() if isinstance(t, torch.Tensor) else t):.6g}"
    return at if step is None else f"step {step}, {at}"


class ModelRun:
    """The model as one sampling run sees it: `predict(x, t, alpha, sigma, kind)` for plans, eps(x, t)
    for whole-run solvers, with t a Python float or a 0-d tensor, or a (batch,) tensor of per-sample
    times (adaptive_sde).

    Counts model calls (NFE), checks the output's shape at once and its finiteness without a
    host round trip (the flags are read once, after the loop, by `check_finite`), and drives
    the progress bar. `step` is the solver step in progress, for error messages (None for
    solvers that do not step on a grid: adaptive ones and bridges).
    """

    def __init__(self, model: PredictionModel, sde, *, progress: bool = False, total: int | None = None):
        self.model, self.sde, self.step = model, sde, 0
        self._calls: list[tuple] = []  # (sum of the output, step, t) per call, read after the loop
        self._last_rows = None  # per-sample sums of the latest output, kept for per-sample times only
        self._bar = tqdm(total=total, unit="NFE", leave=False) if progress else None

    @property
    def nfe(self) -> int:
        return len(self._calls)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.predict(x, t, None, None, "eps")

    def predict(self, x: torch.Tensor, t, alpha, sigma, kind: str) -> torch.Tensor:
        """The model's prediction of `kind` ("eps", "x0" or "alpha_x0") at (x, t), converted at most once
        with the alpha and sigma the caller holds (floats, 0-d tensors of a differentiable plan, or
        None: from the schedule); "eps_variance": the pair (eps, the learned variance's v). x and t
        come from the solver: not checked again."""
        prediction = self.model.forward(x, t, alpha, sigma)
        variance = prediction.variance if kind == "eps_variance" else None
        if kind == "eps_variance" and variance is None:
            raise ValueError(f"variance='learned': the model ({self.model!r}) learns no variance; give a "
                             "Denoiser(..., variance='learned_range'), or another variance")
        self._note(prediction.value, x, t, also=variance)
        return (prediction.as_kind("eps"), variance) if variance is not None else prediction.as_kind(kind)

    def _note(self, out: torch.Tensor, x: torch.Tensor, t, also: torch.Tensor | None = None):
        """Check the output's shape and device and note its sum (for `check_finite`; with `also`, a
        learned variance's output, whose NaN counts too)."""
        if out.shape != x.shape:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected the input's "
                             f"{tuple(x.shape)} ({_where(self.step, t)})")
        if out.device != x.device or out.is_complex():
            raise ValueError(f"model output is a {out.dtype} tensor on {out.device}, expected a real one on the "
                             f"input's device {x.device} ({_where(self.step, t)})")
        # A sum is NaN or inf whenever an element is, and costs one pass where isfinite() costs
        # several; half-precision outputs are summed in float32 so the sum cannot overflow.
        # With per-sample times (adaptive_sde) the per-sample sums are kept too, to name the sample.
        sum_dtype = _SUM_DTYPE.get(out.dtype)
        rows = out.flatten(1).sum(1, dtype=sum_dtype) if _per_sample_times(t) else None
        total = out.sum(dtype=sum_dtype) if rows is None else rows.sum()
        if also is not None:
            total = total + also.sum(dtype=sum_dtype)
        self._calls.append((total, self.step, t))
        self._last_rows = rows
        if self._bar is not None:
            self._bar.update()

    def check_last(self):
        """Raise now if the latest model output held NaN or inf: for adaptive solvers and bridges,
        whose step control reads every evaluation on the host anyway."""
        total, step, t = self._calls[-1]
        if bool(torch.isfinite(total)):  # sync: the caller syncs every call anyway
            return
        bad = (~torch.isfinite(self._last_rows)).nonzero() if self._last_rows is not None else []
        if len(bad):  # per-sample times: name the first sample that went wrong, and its time
            k = int(bad[0])
            raise FloatingPointError(f"the model returned NaN or inf at model call {self.nfe} "
                                     f"({_where(step, t[k])}, sample {k})")
        self.check_finite()

    def check_finite(self):
        """Raise if any model output held NaN or inf, naming the first step and t."""
        if self._bar is not None:
            self._bar.close()
        if not self._calls or self._calls[0][0].device.type == "meta":  # meta tensors hold no values to check
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

    def check(self, shape: tuple, t_start: float, t_end: float):
        """Refuse, before any work, a run this source cannot serve: a list of generators of another
        length than the batch. (The times are for sources that cover a span, see BrownianNoise.)"""
        g = self.generator
        if isinstance(g, (list, tuple)) and len(g) != shape[0]:
            raise ValueError(f"generator: a list of {len(g)} generators for a batch of {shape[0]}")

    def draw(self, shape, dtype, device) -> torch.Tensor:
        g = self.generator
        if isinstance(g, (list, tuple)):
            self.check(shape, 0.0, 0.0)
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
    ones, as strong-order tests and coupled comparisons need. The times of a call are floats (one
    step for the whole batch) or per-sample (batch,) CPU tensors (adaptive_sde steps each sample
    on its own); an empty step gives zeros.
    cache_size: how many of the path's pieces torchsde keeps (each of the batch's size; None: all).
    Its default 45 suits one step for the batch; per-sample steps touch a piece per sample at each
    step, and a cache of several times the batch size (or None) spares recomputing them.
    seed: seeds the path and x_T (when `sample` draws it), so one seed gives one run, every time.
    levy_area: keep the path's space-time Levy area too, which torchsde's "srk" method needs.
    """

    def __init__(self, shape, t0: float, t1: float, *, seed: int = 0, dtype=torch.float32, device=None,
                 cache_size: int | None = 45, levy_area: bool = False):
        import torchsde

        super().__init__(None)
        self.shape = check_shape("shape", shape)
        self.seed = check_count("seed", seed, minimum=0, maximum=2**63 - 1)
        lo, hi = check_number("t0", t0, low=0.0), check_number("t1", t1, low=0.0)
        self.t_min, self.t_max = min(lo, hi), max(lo, hi)
        self.path = torchsde.BrownianInterval(
            t0=self.t_min, t1=self.t_max, size=(self.shape[0], int(torch.Size(self.shape[1:]).numel())),
            dtype=dtype, device=device, entropy=self.seed, cache_size=cache_size,
            levy_area_approximation="space-time" if check_flag("levy_area", levy_area) else "none")

    def check(self, shape: tuple, t_start: float, t_end: float):
        """Refuse a run that this path cannot drive: another shape, or times outside the path."""
        if tuple(shape) != self.shape:
            raise ValueError(f"noise: a BrownianNoise of shape {self.shape} for samples of shape {tuple(shape)}")
        if not self.t_min <= t_end < t_start <= self.t_max:
            raise ValueError(f"noise: the BrownianNoise path covers t in [{self.t_min:g}, {self.t_max:g}], the run "
                             f"goes from t={t_start:g} to t={t_end:g}")

    def draw(self, shape, dtype, device) -> torch.Tensor:
        """x_T, seeded by `seed` alone: every run on this path starts from the same x_T (coupled runs
        compare their solvers, not their starts)."""
        return self._one(shape, torch.Generator().manual_seed(self.seed), dtype, device)

    def __call__(self, like, t0, t1):
        if isinstance(t0, torch.Tensor) and t0.ndim == 1:  # per-sample steps
            lo, hi = torch.minimum(t0, t1), torch.maximum(t0, t1)
            dw = self._rows(lo.tolist(), hi.tolist())  # sync: none, CPU times
            h = hi - lo
            dw = dw * per_sample(torch.where(h > 0, h, 1.0).rsqrt(), dw)  # an empty step's dw is 0
        else:
            lo, hi = min(t0, t1), max(t0, t1)
            dw = self.path(lo, hi)
            dw = dw / (hi - lo) ** 0.5 if hi > lo else dw
        return dw.reshape(like.shape).to(like.dtype)

    def _rows(self, lo: list, hi: list) -> torch.Tensor:
        """Sample k's row of the path's increment over [lo[k], hi[k]], for every k: each distinct
        interval is queried once."""
        queried = {}
        for a, b in zip(lo, hi):
            if (a, b) not in queried:
                queried[a, b] = self.path(a, b)
        return torch.stack([queried[a, b][k] for k, (a, b) in enumerate(zip(lo, hi))])
