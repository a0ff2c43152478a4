"""The solver registry and `sample`, the one entry point every solver runs through."""
from __future__ import annotations

import difflib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .._util import (F64, MAX_SAMPLING_STEPS, check_count, check_device, check_flag, check_shape, check_tensor,
                     host_floats)
from ..grids import GRIDS, TunedGrid
from ..prediction import as_model, declared_sample_shape
from ..sde import VPSDE
from .base import SOLVERS, BrownianNoise, GaussianNoise, ModelRun, Solver, register
from .options import catalogue_rows, validate
from .plan import Plan, Planner, execute, execute_compiled
from . import ancestral, ode, reverse_sde  # noqa: F401  (each registers its solvers)
from . import adaptive_sde, dpm, edm, pc, unipc  # noqa: F401

DEFAULT_NFE = 50  # steps default to about this many model calls


@dataclass
class SampleInfo:
    """What a sampling run did: model calls (the final denoising step included), its grid, and the time
    t_start it started from (T, an explicit grid's first time, or SDEdit's t_start: see `sample`)."""

    nfe: int
    solver: str
    steps: int | None
    times: torch.Tensor  # float64, from t_start down to t_end
    t_start: float | None = None  # times[0]; filled in by `sample`


def _solver(name) -> Solver:
    if not isinstance(name, str):
        raise TypeError(f"solver={name!r}: expected a solver name (str), one of {sorted(SOLVERS)}")
    if name not in SOLVERS:
        close = difflib.get_close_matches(name, SOLVERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"solver={name!r} is unknown{hint}; known solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def _check_t_end(sde: VPSDE, t_end):
    if t_end is None:
        if sde.t_min >= sde.T:  # a one-step chain: its first step is T itself
            raise ValueError(f"sde={sde!r}: t_end defaults to the chain's first step 1/N = {sde.t_min}, which is T "
                             f"itself: nothing to integrate; give t_end in (0, {sde.T}) or use a longer chain")
        return sde.t_min
    if isinstance(t_end, bool) or not isinstance(t_end, (int, float)):
        raise TypeError(f"t_end={t_end!r}: expected a float in (0, {sde.T}) (t = 0 is the data)")
    if not 0.0 < t_end < sde.T:
        raise ValueError(f"t_end={t_end!r}: expected a float in (0, {sde.T}) (t = 0 is the data)")
    return float(t_end)


def _check_t_start(sde: VPSDE, t_start, t_end: float) -> float:
    """SDEdit's t_start: a float in (t_end, T], where the given images are noised to and the solver starts."""
    if isinstance(t_start, bool) or not isinstance(t_start, (int, float)):
        raise TypeError(f"t_start={t_start!r}: expected a float in (t_end, T] = ({t_end}, {sde.T}], the time the "
                        "x_start images are noised to")
    if not t_end < t_start <= sde.T:  # NaN fails too
        raise ValueError(f"t_start={t_start!r}: expected a float in (t_end, T] = ({t_end}, {sde.T}], the time the "
                         "x_start images are noised to")
    return float(t_start)


def _check_plan_size(what: str, steps: int):
    """At most MAX_SAMPLING_STEPS steps: a solver plans every step before its first model call."""
    if steps > MAX_SAMPLING_STEPS:
        raise ValueError(f"{what}: {steps} steps, more than the {MAX_SAMPLING_STEPS} a run may take (each step's "
                         "coefficients are planned before the first model call, so the plan's memory grows with "
                         "the steps)")


def _check_times(times, sde: VPSDE, what: str) -> torch.Tensor:
    if not isinstance(times, torch.Tensor) or times.ndim != 1 or times.numel() < 2:
        raise ValueError(f"{what}: expected a 1-D tensor of at least 2 times from T down to t_end")
    if times.device.type == "meta" or times.is_complex():
        raise ValueError(f"{what}: expected real times to read, got a {times.dtype} tensor on {times.device}")
    _check_plan_size(what, times.numel() - 1)
    times = times.to("cpu", F64)  # not detached: a differentiable plan keeps the grid's gradient
    values = times.detach().tolist()  # sync: none, a CPU grid checked before the loop
    if not all(a > b for a, b in zip(values, values[1:])):  # NaN fails every comparison
        raise ValueError(f"{what}: times must be finite and strictly decreasing, got {values[:8]}...")
    if not (values[-1] > 0 and values[0] <= sde.T):  # inf and -inf fail these
        raise ValueError(f"{what}: times must lie in (0, {sde.T}], got [{values[-1]}, {values[0]}]")
    return times


# Grids made by a grid function, by (function, sde, steps, t_end), with the sample dtypes the schedule
# was found to resolve on them (`_check_resolved`), most recent last; and solvers' calls per step.
_GRIDS_MADE: OrderedDict = OrderedDict()
_CALLS_PER_STEP: dict = {}
GRID_CACHE_SIZE = 64


def _calls_per_step(spec: Solver, options: dict) -> int:
    key = (spec.fn, _options_key(options))
    if key not in _CALLS_PER_STEP:
        _CALLS_PER_STEP[key] = spec.calls_per_step(options)
    return _CALLS_PER_STEP[key]


def _made_grid(fn: Callable, sde: VPSDE, steps: int, t_start: float, t_end: float) -> tuple[torch.Tensor, set]:
    """fn's grid from t_start to t_end, checked, and the dtypes it is known to be resolved in (empty when new)."""
    key = (fn, sde.schedule, steps, t_start, t_end)  # the schedule object: the math, even if an sde's is swapped
    if key in _GRIDS_MADE:
        _GRIDS_MADE.move_to_end(key)
        return _GRIDS_MADE[key]
    made = (_check_times(fn(sde, steps, t_start, t_end), sde, "grid(...)"), set())
    if getattr(fn, "__module__", None) == "scoresde.grids":  # the library's own grids are pure: kept
        _GRIDS_MADE[key] = made
        if len(_GRIDS_MADE) > GRID_CACHE_SIZE:
            _GRIDS_MADE.popitem(last=False)
    return made


def _time_grid(spec: Solver, sde: VPSDE, steps, grid, t_end, options: dict,
               t_start: float | None = None) -> tuple[torch.Tensor, set]:
    """The float64 CPU grid from T (or SDEdit's t_start, when given) down to t_end, after checking
    steps/grid/t_start/t_end together, and the dtypes the schedule is known to resolve on it."""
    if spec.adaptive and (steps is not None or grid is not None):
        given = f"steps={steps!r}" if steps is not None else f"grid={grid!r}"
        raise ValueError(f"solver {spec.name!r} is adaptive: it takes rtol/atol, not {given}")
    if isinstance(grid, torch.Tensor):
        times = _check_times(grid, sde, "grid")
        if steps is not None and steps != len(times) - 1:
            raise ValueError(f"steps={steps!r} disagrees with the explicit grid of {len(times) - 1} steps")
        first, last = host_floats(times[[0, -1]])  # sync: none, a CPU grid
        if t_end is not None and not math.isclose(_check_t_end(sde, t_end), last):
            raise ValueError(f"t_end={t_end!r} disagrees with the explicit grid's last time {last}")
        if t_start is not None and not math.isclose(_check_t_start(sde, t_start, last), first):
            raise ValueError(f"t_start={t_start!r} disagrees with the explicit grid's first time {first}: the grid "
                             "must start where the x_start images are noised to")
        return times, set()
    t_end = _check_t_end(sde, t_end)
    t_start = sde.T if t_start is None else _check_t_start(sde, t_start, t_end)
    if spec.adaptive:
        return torch.tensor([t_start, t_end], dtype=F64), set()
    if steps is None:
        steps = max(1, DEFAULT_NFE // _calls_per_step(spec, options))
    check_count("steps", steps, maximum=None)
    _check_plan_size(f"steps={steps}", steps)
    grid = spec.grid if grid is None else grid
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"grid={grid!r}: expected one of {sorted(GRIDS)}, a tensor of times or a callable")
        grid = GRIDS[grid]
    if not callable(grid):
        raise TypeError(f"grid={grid!r}: expected one of {sorted(GRIDS)}, a tensor of times or a callable")
    return _made_grid(grid, sde, steps, t_start, t_end)


def _check_x_T(x_T, name: str = "x_T") -> torch.Tensor:
    """A user's x_T (or SDEdit's x_start, by `name`): a floating (batch, ...) tensor of at least one
    sample, with no NaN or inf (one reduction before the loop; a NaN in x_T would come out of every
    solver as a NaN sample)."""
    check_tensor(name, x_T, min_ndim=2)
    if x_T.numel() == 0:
        raise ValueError(f"{name}: an empty tensor of shape {tuple(x_T.shape)}; expected at least one sample")
    if x_T.device.type != "meta":
        finite = torch.isfinite(x_T.detach().flatten(1)).all(1)
        if not bool(finite.all()):  # sync: once, before the loop
            k = int((~finite).nonzero()[0])
            raise ValueError(f"{name}: sample {k} (of {len(x_T)}) holds NaN or inf; expected finite starting points")
    return x_T


def _initial_state(x_T, shape, dtype, device, noise, name: str = "x_T"):
    """x_T as given (or, name="x_start", SDEdit's images, checked alike), or drawn from the noise source."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r}: expected a floating torch.dtype")
    device = check_device("device", device) if device is not None else None
    if x_T is not None:
        _check_x_T(x_T, name)
        if shape is not None and check_shape("shape", shape) != tuple(x_T.shape):
            raise ValueError(f"shape={tuple(shape)} disagrees with {name}.shape={tuple(x_T.shape)}")
        if dtype is not None and dtype != x_T.dtype:
            raise ValueError(f"dtype={dtype} disagrees with {name}.dtype={x_T.dtype}; cast {name} or drop dtype")
        wanted = device if device is not None else x_T.device
        if wanted.type != x_T.device.type or wanted.index not in (None, x_T.device.index):
            raise ValueError(f"device={device} disagrees with {name}.device={x_T.device}; move {name} or drop device")
        return x_T
    if shape is None:
        raise ValueError("give shape=(batch, ...) or x_T")
    shape = check_shape("shape", shape)
    if len(shape) < 2:
        raise ValueError(f"shape={shape}: expected (batch, ...) with at least one dimension per sample; for "
                         "scalar data use (batch, 1)")
    dtype = dtype or torch.get_default_dtype()
    return noise.draw(shape, dtype, device or torch.device("cpu"))


def _check_sdedit(x_T, x_start, t_start, grid):
    """SDEdit's arguments together: t_start goes with x_start (both or neither), x_T with neither, and
    a TunedGrid (which starts at T) only where it starts at t_start."""
    if x_start is None:
        if t_start is not None:
            raise ValueError(f"t_start={t_start!r} without x_start: t_start is the time SDEdit noises the x_start "
                             "images to; plain sampling starts at T (give x_start=images, or drop t_start)")
        return
    if x_T is not None:
        raise ValueError("x_T and x_start: give one; x_T is the starting point at T, x_start the images that SDEdit "
                         "noises to t_start")
    if t_start is None:
        raise ValueError("x_start without t_start: give t_start in (t_end, T], the time the images are noised to "
                         "(small: close to the images; T: the images are forgotten)")
    if isinstance(grid, TunedGrid):
        first = float(grid.times[0])  # sync: none, a CPU grid
        number = isinstance(t_start, (int, float)) and not isinstance(t_start, bool)  # else: _check_t_start
        if number and not math.isclose(first, t_start):
            raise ValueError(f"grid: a TunedGrid starts at t={first}, not at t_start={t_start!r}; tuned grids run "
                             "from T: pass its times only with t_start equal to their first time")


def _noised(sde: VPSDE, x_start: torch.Tensor, times: torch.Tensor, noise, grad: bool) -> torch.Tensor:
    """SDEdit's start: alpha(t) x_start + sigma(t) eps at the grid's first time t (t_start), eps drawn as
    x_T is drawn (noise.draw: from the run's generator, or one generator per sample). The coefficients
    are host floats, or 0-d tensors that keep the grid's gradient under grad=True."""
    eps = noise.draw(tuple(x_start.shape), x_start.dtype, x_start.device)
    alpha, sigma = sde.alpha_sigma(times[:1])
    if grad and times.requires_grad:
        alpha, sigma = (v.reshape(()).to(x_start.device, x_start.dtype) for v in (alpha, sigma))
    else:
        alpha, sigma = host_floats(torch.cat([alpha, sigma]))  # sync: none, CPU float64 schedule math
    return x_start * alpha + eps * sigma


def _check_resolved(sde: VPSDE, times: torch.Tensor, dtype: torch.dtype):
    """Refuse a grid that the schedule cannot resolve in the samples' precision: the half log-SNR
    lambda must rise strictly from T to t_end, and alpha/sigma = exp(lambda) and its inverse must be
    finite in `dtype` (solvers form both). This catches a chain whose alpha underflows at T, a t_end
    where sigma rounds to 0, and times that a schedule maps to one lambda (a beta that rounds away)."""
    limit = math.log(torch.finfo(dtype).max)  # float64: 709.8; float32, bfloat16: 88.7; float16: 11.1
    times = times.detach()
    lam, t = sde.log_snr(times).tolist(), times.tolist()  # sync: none, a CPU grid
    outside = [k for k, value in enumerate(lam) if not abs(value) < limit]  # NaN too
    if outside:
        k = outside[0]
        low, high = sde.t_from_log_snr(torch.tensor([limit, -limit], dtype=F64)).tolist()  # sync: none, CPU
        where, fix = (("sde", "the schedule's alpha underflows at T: use a chain with a larger alpha_bar_N")
                      if k == 0 else ("t_end", "raise t_end (or sample in float64)") if k == len(t) - 1
                      else ("grid", "choose times inside that range"))
        raise ValueError(f"{where}: at t={t[k]:.6g} the schedule's half log-SNR is {lam[k]:.6g}, beyond what "
                         f"{dtype} samples resolve (|lambda| < {limit:.4g}, so that alpha/sigma and sigma/alpha are "
                         f"finite); the usable times are ({max(low, 0.0):.3g}, {high:.6g}]: {fix}")
    flat = [k for k in range(len(lam) - 1) if not lam[k + 1] > lam[k]]
    if flat:
        k = flat[0]
        raise ValueError(f"sde, grid: t={t[k]:.6g} and t={t[k + 1]:.6g} have the same half log-SNR {lam[k]:.6g} in "
                         "float64: the schedule does not tell them apart (a beta too small to change 1 - beta?); "
                         "every solver needs lambda strictly rising from T to t_end")


def sample(model: Callable, sde: VPSDE, *, shape: Sequence[int] | None = None, x_T: torch.Tensor | None = None,
           x_start: torch.Tensor | None = None, t_start: float | None = None, solver: str = "heun",
           steps: int | None = None,
           grid: str | Callable | torch.Tensor | TunedGrid | None = None,
           t_end: float | None = None, final_denoise: bool = True,
           generator: torch.Generator | Sequence[torch.Generator] | None = None, noise: Callable | None = None,
           dtype: torch.dtype | None = None, device: str | torch.device | None = None,
           callback: Callable | None = None, progress: bool = False, return_info: bool = False,
           grad: bool = False, compile: bool = False,
           **options: object) -> torch.Tensor | tuple[torch.Tensor, SampleInfo]:
    """Draw samples by running `solver` from the prior at T down to `t_end`; or, given `x_start` and
    `t_start`, edit images (SDEdit, Meng et al. 2022): noise them to t_start through the forward
    marginal, x = alpha(t_start) x_start + sigma(t_start) eps, and run the solver from there.

    The whole input is checked before the first model call (see the validation catalogue).

    Args:
        model: a `Denoiser` (or a guidance transform, any `PredictionModel`), or a callable
            model(x, t) -> eps with t a (batch,) tensor of times.
        sde: the schedule the model was trained on.
        shape: (batch, ...) of the samples to draw; or give `x_T` (or `x_start`).
        x_T: the starting points at T (finite; at least one dimension after the batch).
        x_start: SDEdit's images in model units, (batch, ...), finite; not with x_T. Their noise eps is
            drawn as x_T would be (from the generator, one per sample when a list is given, or
            noise.draw), then the solver's own draws follow.
        t_start: SDEdit's noise level, a time in (t_end, T], given with x_start (and only then): small
            keeps the images, T forgets them. Fixed-step solvers step on their grid from t_start
            (an explicit grid must start there), adaptive ones integrate from it.
        solver: a name in `SOLVERS`.
        steps: steps of a fixed-step solver (default: about 50 model calls); at most 10^5.
        grid: "uniform", "quadratic", "log_snr", "karras", a callable grid(sde, steps, t_start,
            t_end), an explicit decreasing tensor of times, or a `TunedGrid` (checked against
            the run: solver, options, model calls, schedule) (default: the solver's own).
            Adaptive solvers ("dopri5", "rk45", "adaptive_sde") take neither steps nor grid.
        t_end: where the solver stops (default: sde.t_min); the schedule must resolve it in the
            samples' dtype.
        final_denoise: return x0_hat at t_end (one more model call).
        generator: seeds x_T and every draw; a list of them, one per sample, makes a sample's noise
            independent of its batch.
        noise: a noise source in place of the generator (e.g. `BrownianNoise` to couple runs).
        dtype: the samples' dtype (default: torch's default, or x_T's).
        device: where to sample (default: cpu, or x_T's device).
        callback: callback(i, t, x), called after each step.
        progress: show a progress bar of model calls.
        return_info: also return a `SampleInfo` (NFE, solver, grid, t_start).
        grad: record the run for autograd, so that gradients reach x_T (or x_start), the model's
            parameters or the grid (memory grows with the steps). By default sampling runs under
            torch.no_grad().
        compile: run the fixed-step loop under torch.compile (CPU: inductor; CUDA: CUDA graphs,
            mode="reduce-overhead"). The first run of a plan compiles it (seconds to minutes); runs
            with the same solver, grid, options and sample shape reuse it. The noise is drawn before
            the loop; no callback, and the progress bar does not move inside the compiled loop.
        **options: the solver's own options (see its entry in `SOLVERS`).

    Returns:
        The samples, shaped like x_T (or x_start); with `return_info`, the pair (samples, SampleInfo).

    Raises:
        TypeError, ValueError: an argument that is wrong, named with its value and what is allowed.
        FloatingPointError: the model returned NaN or inf (with the model call, step and t).
        RuntimeError: an adaptive solver gave up (max_steps, step-size underflow).
    """
    if not isinstance(sde, VPSDE):
        raise TypeError(f"sde={sde!r}: expected a scoresde.VPSDE")
    model = as_model(model, sde)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback={callback!r}: expected a callable callback(i, t, x) or None")
    for name, flag in (("final_denoise", final_denoise), ("progress", progress), ("return_info", return_info),
                       ("grad", grad), ("compile", compile)):
        check_flag(name, flag)
    spec = _solver(solver)
    if compile and not spec.plans:
        raise ValueError(f"compile=True: solver {spec.name!r} runs its own loop (an adaptive solver or a bridge); "
                         "compile applies to the fixed-step solvers' plans")
    if compile and callback is not None:
        raise ValueError("callback: compile=True runs the whole loop as one compiled graph, which a callback "
                         "would break; drop the callback or compile")
    options = validate(spec.name, spec.declared, spec.defaults_for(model), options)
    _check_sdedit(x_T, x_start, t_start, grid)
    if isinstance(grid, TunedGrid):
        grid.check(spec.name, options, spec.calls(grid.steps, options) + final_denoise, sde)
        grid = grid.times
    times, resolved = _time_grid(spec, sde, steps, grid, t_end, options, t_start)
    t_host = times.detach().tolist()  # sync: none, the grid lives on the CPU
    if noise is None:
        noise = GaussianNoise(generator)
    elif generator is not None:
        raise ValueError("give generator= or noise=, not both: a noise source carries its own randomness")
    elif not callable(noise) or (x_T is None and not callable(getattr(noise, "draw", None))):
        raise TypeError(f"noise={noise!r}: expected a noise source noise(like, t0, t1) -> N(0, I) draw, with "
                        f"draw(shape, dtype, device) for x_T (or x_start's noise) unless x_T is given "
                        f"(see GaussianNoise)")
    if x_start is not None:
        x = _initial_state(x_start, shape, dtype, device, noise, "x_start")
    else:
        x = _initial_state(x_T, shape, dtype, device, noise)
    want = declared_sample_shape(model)
    if want is not None and tuple(x.shape[1:]) != want:
        raise ValueError(f"shape/x_T/x_start: samples of shape {tuple(x.shape)}, but the model takes (batch, "
                         f"{', '.join(map(str, want))})")
    if spec.adaptive and x.device.type == "meta":
        raise ValueError(f"device=meta (of x_T or device=): solver {spec.name!r} is adaptive: its step control "
                         "reads the state on the host, and a meta tensor holds no values; use a fixed-step solver")
    if callable(getattr(noise, "check", None)):
        noise.check(tuple(x.shape), t_host[0], t_host[-1])
    if x.dtype not in resolved:
        _check_resolved(sde, times, x.dtype)
        resolved.add(x.dtype)

    with torch.set_grad_enabled(grad):
        if x_start is not None:
            x = _noised(sde, x, times, noise, grad)
        if spec.plans:
            x, run = _run_plan(spec, model, sde, times, x, noise, final_denoise, progress, callback, compile, options)
        else:
            x, run = _run_whole(spec, model, sde, times, x, noise, final_denoise, progress, callback, options)
    run.check_finite()
    if return_info:
        return x, SampleInfo(run.nfe, spec.name, None if spec.adaptive else len(times) - 1, times.detach().clone(),
                             t_host[0])
    return x


def _reporter(run: ModelRun, t_host: list, callback):
    """The solvers' callback(i, x): notes the step for messages, then calls the user's callback(i, t, x)."""
    def on_step(i, x_now):
        run.step = i + 1
        if callback is not None:
            callback(i, t_host[i + 1], x_now)

    return on_step


# Plans built without gradients, by what they depend on, most recent last: a run that repeats another's
# solver, grid and options (the chunks of sample_to_disk, a benchmark's rounds) reuses its plan.
_PLANS: OrderedDict = OrderedDict()
PLAN_CACHE_SIZE = 32
PLAN_CACHE_MAX_STEPS = 10_000  # longer plans are rebuilt each time rather than kept


def _options_key(options: Mapping) -> tuple:
    """Solver options as a hashable key (pc's predictor_options is itself a mapping)."""
    return tuple(sorted((name, _options_key(v) if isinstance(v, Mapping) else v) for name, v in options.items()))


def _plan(spec, sde, times, x, noise, final_denoise, options) -> tuple[Plan, list]:
    """The solver's plan (the final denoising step included) and the grid as host floats."""
    planner = Planner(sde, times, x, noise)
    key = None
    if not planner.differentiable and planner.steps <= PLAN_CACHE_MAX_STEPS:
        key = (spec.fn, sde.schedule, tuple(planner.t_host), final_denoise, x.dtype, x.device, type(noise),
               _options_key(options))
        if key in _PLANS:
            _PLANS.move_to_end(key)
            return _PLANS[key], planner.t_host
    spec.fn(planner, **options)
    if final_denoise:
        planner.denoise()
    plan = planner.finish()
    if key is not None:
        _PLANS[key] = plan
        if len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan, planner.t_host


def _run_plan(spec, model, sde, times, x, noise, final_denoise, progress, callback, compile, options):
    """Build (or reuse) the solver's plan, then execute it (compiled or not)."""
    plan, t_host = _plan(spec, sde, times, x, noise, final_denoise, options)
    if compile:
        run = ModelRun(model, sde)
        return execute_compiled(plan, run, x, noise), run
    run = ModelRun(model, sde, progress=progress, total=plan.nfe)
    return execute(plan, run, x, noise, _reporter(run, t_host, callback)), run


def _run_whole(spec, model, sde, times, x, noise, final_denoise, progress, callback, options):
    """An adaptive solver or a bridge, which runs the whole solve itself; then the final denoising step."""
    t_host = times.detach().tolist()  # sync: none, a CPU grid
    total = None if spec.adaptive else spec.calls(len(times) - 1, options) + final_denoise
    run = ModelRun(model, sde, progress=progress, total=total)
    x = spec.fn(run, x, times, noise=noise, callback=_reporter(run, t_host, callback), **options)
    if final_denoise:
        x = run.predict(x, t_host[-1], None, None, "x0")
    return x, run


def options_table() -> str:
    """The Markdown table of the built-in solvers' declared options (docs/validation.md holds it)."""
    return catalogue_rows((name, spec.declared, spec.options) for name, spec in sorted(SOLVERS.items())
                          if spec.fn.__module__.startswith("scoresde."))


__all__ = ["SOLVERS", "sample", "register", "Solver", "SampleInfo", "GaussianNoise", "BrownianNoise"]
