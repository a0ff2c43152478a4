"""Learned time grids: the steps of a fixed-step solver fitted, for one model at one number of model
calls, to a teacher's samples from the same starting points (Tong et al. 2025, LD3).

The student is the solver itself, run by `sample` with `grad=True` on a grid that is a differentiable
function of a few parameters: the grid's half log-SNR rises from lambda(T) in positive increments
(a softmax of `steps` logits) to a learned end, so the times stay strictly decreasing and inside
(t_min, T] whatever the parameters. The teacher is a tight solve of the probability-flow ODE from the
same x_T. The loss is the distance between the two final samples; with LD3's soft teacher forcing the
student may start anywhere in a small ball around x_T, which spares a grid of a few parameters from
fitting every sample exactly. The grid kept is the best on held-out starting points.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ._util import F64, check_count, check_flag, check_number
from .grids import GRIDS, TunedGrid, schedule_id
from .prediction import as_model, declared_sample_shape
from .sde import VPSDE
from .solvers import _solver, sample
from .solvers.options import validate

LOSSES = ("soft", "plain")
TEACHER = {"solver": "dopri5", "rtol": 1e-5, "atol": 1e-5}
EVAL_EVERY = 10  # iterations between held-out checks


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance."""
    return (a - b).flatten(1).pow(2).mean(1).sqrt()


class _GridParameters(torch.nn.Module):
    """steps + 1 strictly decreasing times from T to an end in [t_min, T), as a differentiable function
    of `steps` logits (the shares of the log-SNR span each step takes) and the span's log."""

    def __init__(self, sde: VPSDE, initial: torch.Tensor, t_min: float):
        super().__init__()
        self.sde = sde
        lam = sde.log_snr(initial.detach().to(F64))
        self.lam_T, self.lam_max = float(lam[0]), float(sde.log_snr(torch.tensor(t_min, dtype=F64)))
        self.shares = torch.nn.Parameter(torch.log(lam.diff()))
        # the span in log: Adam's steps then move the end by a share of the span, near the data and far
        self.log_span = torch.nn.Parameter(torch.log(lam[-1] - lam[0]))

    def forward(self) -> torch.Tensor:
        span = torch.clamp(torch.exp(self.log_span), max=self.lam_max - self.lam_T)
        lam = self.lam_T + torch.cumsum(torch.softmax(self.shares, 0), 0) * span
        return torch.cat([torch.tensor([self.sde.T], dtype=F64), _times_at(self.sde, lam)])


def _times_at(sde: VPSDE, lam: torch.Tensor) -> torch.Tensor:
    """t(lambda), differentiable in lambda for any schedule: the schedule's inverse (which may be a
    bisection, flat for autograd) plus the implicit function theorem's first-order term,
    dt/dlambda = 1 / (dlambda/dt) = -2 sigma^2 / beta."""
    t = sde.t_from_log_snr(lam.detach())
    slope = -2.0 * sde.sigma(t) ** 2 / sde.beta(t)
    return t + (lam - lam.detach()) * slope


def _steps_for(spec, options: dict, nfe: int) -> int:
    """The step count at which `spec` makes `nfe` model calls with the final denoising call."""
    made = {}
    for steps in range(1, nfe):
        made[steps] = spec.calls(steps, options) + 1
        if made[steps] == nfe:
            return steps
        if made[steps] > nfe:
            break
    reachable = sorted(set(made.values()) | {spec.calls(len(made) + 1, options) + 1})
    raise ValueError(f"nfe={nfe}: solver {spec.name!r} makes {reachable} model calls (the final denoising call "
                     "included) on 1, 2, ... steps; choose one of those")


def tune_grid(model: Callable, sde: VPSDE, *, solver: str, nfe: int, shape: Sequence[int] | None = None,
              n: int = 128, held_out: int = 64, iterations: int = 40, lr: float = 0.02, loss: str = "soft",
              radius: float = 0.05, batch: int | None = None, teacher: Mapping | None = None,
              options: Mapping | None = None, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              generator: torch.Generator | None = None, progress: bool = False,
              model_name: str | None = None) -> TunedGrid:
    """Learn the time grid of `solver` at `nfe` model calls for `model` (LD3, Tong et al. 2025).

    Args:
        model: a `Denoiser` (or any `PredictionModel`), or a callable model(x, t) -> eps.
        sde: its schedule.
        solver: a deterministic fixed-step solver (ddim, euler, heun, rk4, dpm_solver_2/3,
            dpm_solver_pp_2m/3m, unipc, edm without churn).
        nfe: model calls of a run on the grid, the final denoising call included.
        shape: one sample's shape (default: the shape the model declares).
        n: starting points x_T that the grid is fitted on.
        held_out: further starting points, only for choosing the best grid (and reporting it).
        iterations: passes over the n starting points.
        lr: Adam's learning rate for the grid's parameters.
        loss: "soft" (LD3's soft teacher forcing: the student starts anywhere within `radius` of
            x_T) or "plain" (the student starts at x_T).
        radius: the ball's radius, as a root-mean-square per coordinate (x_T's is 1).
        batch: starting points per gradient step (default: all n).
        teacher: how the reference samples are made: `sample` arguments (default: dopri5 at
            rtol = atol = 1e-5), from the same x_T with the final denoising step.
        options: the solver's options.
        dtype: the samples' dtype (default: torch's default).
        device: where to sample (default: cpu).
        generator: seeds the starting points.
        progress: show a progress bar with the loss.
        model_name: what the grid is tuned for, recorded in the result (and compared by the
            command line when the grid is used).

    Returns:
        A `TunedGrid`: `sample(model, sde, solver=solver, grid=tuned, **options)` samples with it.

    Raises:
        TypeError, ValueError: an argument that is wrong, named with its value and what is allowed:
            an adaptive or stochastic solver, an nfe the solver cannot make.

    A loss that becomes NaN or inf, or Ctrl-C during the iterations, stops tuning with a warning and
    returns the best grid found so far.
    """
    started = time.perf_counter()
    model = as_model(model, sde)
    spec, options, steps = _tunable(solver, options, nfe)
    n, held_out, iterations = (check_count(k, v) for k, v in (("n", n), ("held_out", held_out),
                                                               ("iterations", iterations)))
    batch = n if batch is None else min(check_count("batch", batch), n)
    lr = check_number("lr", lr, low=0.0, low_open=True)
    radius = check_number("radius", radius, low=0.0)
    check_flag("progress", progress)
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
    shape = tuple(shape) if shape is not None else declared_sample_shape(model)
    if shape is None:
        raise ValueError("shape=None: the model declares no sample shape; give shape=(...) of one sample")
    teacher = dict(TEACHER if teacher is None else teacher)

    x_T = torch.randn((n + held_out, *shape), generator=generator, dtype=dtype or torch.get_default_dtype())
    x_T = x_T.to(device or "cpu")
    target, teacher_nfe = _teach(model, sde, x_T, teacher, progress)
    if teacher_nfe <= nfe:
        warnings.warn(f"teacher={teacher}: {teacher_nfe} model calls per sample, no more than the student's {nfe}; "
                      "its samples are no reference", stacklevel=2)

    def held_out_distance(times: torch.Tensor) -> float:
        try:
            with torch.no_grad():
                out = sample(model, sde, x_T=x_T[n:], solver=spec.name, grid=times, **options)
        except FloatingPointError:  # the model returned NaN or inf on this grid
            return math.inf
        return float(_rms(out, target[n:]).mean())

    fixed = {name: held_out_distance(grid(sde, steps, sde.T, sde.t_min)) for name, grid in GRIDS.items()}
    start = min(fixed, key=fixed.get)  # tuning starts from the best fixed grid, and keeps it unless beaten
    initial = GRIDS[start](sde, steps, sde.T, sde.t_min)
    grid = _GridParameters(sde, initial, sde.t_min)
    shift = torch.zeros_like(x_T[:n], requires_grad=loss == "soft")  # soft teacher forcing: where students start
    groups = [{"params": grid.parameters(), "lr": lr}] + ([{"params": [shift], "lr": radius / 5}] if loss == "soft"
                                                          else [])
    optimizer = torch.optim.Adam(groups)
    best, losses = (fixed[start], initial), []
    bar = tqdm(range(iterations), desc=f"tune {spec.name} at {nfe} NFE", disable=not progress, leave=False)
    for it in bar:
        try:
            losses.append(_one_pass(model, sde, spec.name, options, grid, x_T[:n] + shift, target[:n], optimizer,
                                    batch, generator))
        except FloatingPointError:  # the model returned NaN or inf on this grid: a loss of NaN
            losses.append(math.nan)
        except KeyboardInterrupt:  # Ctrl-C: minutes of tuning are not thrown away
            warnings.warn(f"tune_grid: interrupted in iteration {it + 1}; returning the best grid so far",
                          stacklevel=2)
            break
        _project(shift, radius)
        if not math.isfinite(losses[-1]):
            warnings.warn(f"tune_grid: the loss became {losses[-1]} at iteration {it + 1}; stopped, keeping the best "
                          "grid so far", stacklevel=2)
            break
        if (it + 1) % EVAL_EVERY == 0 or it + 1 == iterations:
            times = grid().detach()
            best = min(best, (held_out_distance(times), times), key=lambda pair: pair[0])
        bar.set_postfix(loss=f"{losses[-1]:.4g}", held_out=f"{best[0]:.4g}")
    return TunedGrid(times=best[1].clone(), solver=spec.name, options=options, nfe=nfe, schedule=schedule_id(sde),
                     model=model_name, teacher=f"{teacher} ({teacher_nfe} model calls)", loss=losses,
                     validation={"initial": start, "tuned": best[0], "fixed": fixed},
                     seconds=time.perf_counter() - started)


def _tunable(solver, options, nfe) -> tuple:
    """The solver (a deterministic fixed-step one), its options checked, and its steps at `nfe` calls."""
    spec = _solver(solver)
    if spec.adaptive or not spec.plans:
        raise ValueError(f"solver={solver!r}: an adaptive solver or a bridge picks its own steps; tune a fixed-step "
                         "solver's grid")
    options = validate(spec.name, spec.declared, spec.options, dict(options or {}))
    if any(step.draws for step in spec.probe(2, options).finish().steps):
        raise ValueError(f"solver={solver!r} draws noise with these options: tune a deterministic solver (its "
                         "grid may then serve the stochastic one)")
    check_count("nfe", nfe, minimum=2)
    return spec, options, _steps_for(spec, options, nfe)


def _one_pass(model, sde: VPSDE, solver: str, options: dict, grid: _GridParameters, starts: torch.Tensor,
              target: torch.Tensor, optimizer, batch: int, generator) -> float:
    """One pass over the starting points in random batches, a gradient step per batch; the mean loss."""
    total = 0.0
    for part in torch.randperm(len(starts), generator=generator).split(batch):
        out = sample(model, sde, x_T=starts[part], solver=solver, grid=grid(), grad=True, **options)
        batch_loss = _rms(out, target[part]).mean()
        optimizer.zero_grad()
        batch_loss.backward()
        optimizer.step()
        total += float(batch_loss.detach()) * len(part)  # sync: once per gradient step, for the record
    return total / len(starts)


def _teach(model, sde: VPSDE, x_T: torch.Tensor, teacher: dict, progress: bool,
           chunk: int = 256) -> tuple[torch.Tensor, int]:
    """The teacher's final samples from x_T (in chunks, so memory stays flat), and its model calls per sample."""
    outs, calls = [], 0
    with torch.no_grad():
        for part in x_T.split(chunk):
            out, info = sample(model, sde, x_T=part, return_info=True, progress=progress, **teacher)
            outs.append(out)
            calls = max(calls, info.nfe)
    return torch.cat(outs), calls


def _project(shift: torch.Tensor, radius: float):
    """Move each sample's shift back into the ball of root-mean-square radius `radius`."""
    with torch.no_grad():
        norm = shift.flatten(1).pow(2).mean(1).sqrt()
        scale = (radius / norm.clamp(min=1e-30)).clamp(max=1.0)
        shift.mul_(scale.reshape((-1,) + (1,) * (shift.ndim - 1)))


__all__ = ["tune_grid", "TunedGrid"]
