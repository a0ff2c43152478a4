"""Plan, then step: a fixed-step solver builds a plan from the schedule and the grid, and one
executor runs any plan.

A plan is a list of steps. A step evaluates the model at a few stages and then moves the state;
every point involved is a linear combination

    c_x x + sum_j c_j out_j + c_z z

of the state x at the step's start, model outputs out_j (of this step's stages, or of earlier
steps: a multistep method's history) and the step's one noise draw z. The coefficients are computed
with torch ops from the grid tensor: floats when nothing asks for gradients, and 0-d tensors when the
grid requires grad under `grad=True`, so that samples are differentiable with respect to the times.
Each stage names the prediction it wants ("eps", "x0", or "alpha_x0" = alpha x0 = x - sigma eps, which
saves a pass over the state when the weights that read it carry the 1/alpha); the executor converts the
model's output once, with the alpha and sigma the plan already holds.

Runge-Kutta methods come from one engine (`runge_kutta`, Butcher tableaus) in the coordinates
y = x/alpha, s = sigma/alpha where the probability-flow ODE reads dy/ds = eps (DDIM eq. 14).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..sde import VPSDE

Coef = float | torch.Tensor  # a host float, or a 0-d tensor on the samples' device (differentiable plans)
Terms = Sequence[tuple[int, Coef]]  # (ref, coefficient) pairs


class Combo:
    """c_x x + sum c_j out[ref_j] + c_z z, with refs indexing the run's model outputs. Zero terms
    (float zeros) are dropped; what the executor needs to know is worked out once, here."""

    __slots__ = ("x", "terms", "noise", "start", "parts", "floats")

    def __init__(self, x: Coef = 1.0, terms=(), noise: Coef | None = None):
        floats = type(x) is float
        kept = []
        for ref, c in terms:
            if type(c) is not float:
                floats = False
            elif c == 0.0:
                continue
            kept.append((ref, c))
        self.x, self.terms = x, tuple(kept)
        self.noise = None if _is_zero(noise) else noise
        if self.noise is not None:
            floats = floats and type(noise) is float
            kept.append((None, noise))  # None: the step's draw z
        self.parts, self.floats = tuple(kept), floats
        # how the state enters: 0 not at all, 1 as it is, 2 scaled
        self.start = (0 if x == 0.0 else 1 if x == 1.0 else 2) if type(x) is float else 2


@dataclass(slots=True)
class Custom:
    """A step's update that no fixed linear combination says (pc's batch-norm step size):
    fn(x, outputs, z) -> the new state. terms: the outputs it reads, as (ref, unused) pairs."""

    fn: Callable
    terms: tuple[tuple[int, Coef], ...]


@dataclass(slots=True)
class Stage:
    """One model call: at the point `at`, time t (with its alpha and sigma), wanting prediction `kind`;
    kind None: no call, the point itself is kept (for a later combination to read, see `Planner.point`)."""

    t: Coef
    alpha: Coef
    sigma: Coef
    kind: str | None
    at: Combo


@dataclass(slots=True)
class Step:
    """Stages, then the new state `update`. index: the grid step it belongs to (messages and the
    callback); t0, t1: the span its noise draw stands for; report: call the callback after it."""

    index: int
    t0: float
    t1: float
    stages: tuple[Stage, ...]
    update: Combo | Custom
    draws: bool
    report: bool
    release: tuple[int, ...] = ()  # outputs no later step reads: dropped after this one


@dataclass
class Plan:
    """The steps of one run; `nfe` counts its model calls (the final denoising call not included)."""

    steps: list[Step] = field(default_factory=list)

    @property
    def nfe(self) -> int:
        return sum(stage.kind is not None for step in self.steps for stage in step.stages)


def per_history(weights: torch.Tensor, alpha: torch.Tensor, back: int) -> torch.Tensor:
    """weights[i] / alpha[i - back]: per-step weights on the output `back` steps ago, for outputs of
    kind "alpha_x0" taken at the steps' starts (alpha: per step). Steps too early to have that output
    get alpha[0], never used."""
    return weights / torch.cat([alpha[:1].expand(back), alpha[:len(alpha) - back]])


def _is_zero(c) -> bool:
    return c is None or (isinstance(c, float) and c == 0.0)


class Planner:
    """What a plan builder works with: the schedule, the grid, and how coefficients reach the
    executor (`values`). Builders add stages and steps in order; refs are the outputs' positions."""

    def __init__(self, sde: VPSDE, times: torch.Tensor, like: torch.Tensor, noise=None):
        self.sde, self.times, self.noise, self._like = sde, times, noise, like
        self.differentiable = times.requires_grad and torch.is_grad_enabled()
        self._device = like.device
        self._dtype = torch.promote_types(like.dtype, torch.float32)
        self.t_host = times.detach().tolist()  # sync: none, a CPU grid
        self.plan = Plan()
        self._stages: list[Stage] = []
        self._outputs = 0

    def nodes(self, t: torch.Tensor) -> list:
        """Per element of the float64 times t, (t, alpha(t), sigma(t)) as the executor takes them: the
        first three arguments of `stage`."""
        return list(zip(*(self.values(v) for v in (t, *self.sde.alpha_sigma(t)))))

    def sibling(self) -> "Planner":
        """A fresh planner on the same schedule, grid and samples (to build another solver's plan)."""
        return Planner(self.sde, self.times, self._like, self.noise)

    @property
    def steps(self) -> int:
        return len(self.t_host) - 1

    def values(self, vector: torch.Tensor) -> list:
        """A float64 CPU vector of per-step coefficients as the executor takes them: host floats,
        or (differentiable plans) 0-d tensors on the samples' device that keep their gradient."""
        if not self.differentiable:
            return vector.detach().tolist()  # sync: none, CPU float64 schedule math
        return list(vector.to(self._device, self._dtype).unbind(0))

    def stage(self, t: Coef, alpha: Coef, sigma: Coef, kind: str = "eps", x: Coef = 1.0, terms: Terms = (),
              noise: Coef | None = None) -> int:
        """One model call of the current step, at the point x * (the step's start state) + sum c * out[ref]
        (+ noise * z, the step's one draw).

        Args:
            t: the time of the call (a float, or a 0-d tensor of a differentiable plan).
            alpha: alpha(t), for converting the model's output.
            sigma: sigma(t), likewise.
            kind: the prediction wanted, "eps", "x0" or "alpha_x0" (converted once from what the model
                predicts).
            x: the coefficient of the state at the step's start.
            terms: (ref, coefficient) pairs of earlier outputs (this step's or a history's).
            noise: the coefficient of the step's draw z, or None.

        Returns:
            The ref of this call's output.
        """
        self._stages.append(Stage(t, alpha, sigma, kind, Combo(x, terms, noise)))
        self._outputs += 1
        return self._outputs - 1

    def point(self, x: Coef = 1.0, terms: Terms = (), noise: Coef | None = None) -> int:
        """Keep a point (x, terms, noise as for `stage`) without calling the model, so that a stage can
        be evaluated there and the step's update can start from it (one pass over the state fewer).

        Args:
            x: the coefficient of the state at the step's start.
            terms: (ref, coefficient) pairs of earlier outputs or points.
            noise: the coefficient of the step's draw z, or None.

        Returns:
            The ref of the point.
        """
        self._stages.append(Stage(0.0, 1.0, 1.0, None, Combo(x, terms, noise)))
        self._outputs += 1
        return self._outputs - 1

    def step(self, i: int, x: Coef = 1.0, terms: Terms = (), noise: Coef | None = None, *, t0: float | None = None,
             t1: float | None = None, report: bool = True, custom: Callable | None = None):
        """End grid step i (or a sub-step of it) with its new state, x * (the start state) + sum
        c * out[ref] (+ noise * z), or custom(x, outputs, z).

        Args:
            i: the grid step (for the callback and messages).
            x: the coefficient of the state at the step's start.
            terms: (ref, coefficient) pairs of outputs and points (for `custom`: the refs it reads).
            noise: the coefficient of the step's draw z, or None (for `custom`: whether it draws).
            t0: the start of the span the draw stands for (default: the grid's t_i).
            t1: its end (default: t_{i+1}; t0 = t1 for draws that are no Brownian increment).
            report: call the callback after this step (False for sub-steps such as pc's predictor).
            custom: an update no fixed combination says (pc's batch step size).
        """
        update = Combo(x, terms, noise) if custom is None else Custom(custom, tuple(terms))
        stages, self._stages = tuple(self._stages), []
        draws = not _is_zero(noise) or any(not _is_zero(s.at.noise) for s in stages)
        t0 = self.t_host[i] if t0 is None else t0
        t1 = self.t_host[i + 1] if t1 is None else t1
        self.plan.steps.append(Step(i, t0, t1, stages, update, draws, report))

    def denoise(self):
        """The final denoising step: the model's x0 at the grid's last time (one more model call)."""
        ref = self.stage(*self.nodes(self.times[-1:])[0], "x0")
        end = self.t_host[-1]
        self.step(self.steps, x=0.0, terms=[(ref, 1.0)], t0=end, t1=end, report=False)

    def finish(self) -> Plan:
        """The plan, with each output released after the last step that reads it."""
        last_read: dict[int, int] = {}
        for k, step in enumerate(self.plan.steps):
            for combo in [s.at for s in step.stages] + [step.update]:
                for ref, _ in combo.terms:
                    last_read[ref] = k
        for ref, k in last_read.items():
            self.plan.steps[k].release += (ref,)
        return self.plan


# ---- the executor ---------------------------------------------------------------------------------------
def combine(x: torch.Tensor, combo: Combo, outputs: list, z: torch.Tensor | None) -> torch.Tensor:
    """The point c_x x + sum c_j out_j + c_z z, in as few passes over the state as it takes: one
    multiply-add per term, in place on a tensor of our own."""
    start = combo.start
    acc, fresh = (x, False) if start == 1 else (x * combo.x, True) if start == 2 else (None, False)
    floats = combo.floats
    for ref, c in combo.parts:
        y = z if ref is None else outputs[ref]
        if acc is None:  # the state does not enter (a final denoising step)
            acc, fresh = (y, False) if floats and c == 1.0 else (y * c, True)
        elif fresh:  # floats: host scalars; else a differentiable plan's 0-d tensors
            acc = acc.add_(y, alpha=c) if floats else acc.addcmul_(y, c)
        else:
            acc, fresh = torch.add(acc, y, alpha=c) if floats else torch.addcmul(acc, y, c), True
    return acc


def execute(plan: Plan, model, x: torch.Tensor, noise, callback) -> torch.Tensor:
    """Run `plan` from x: sync-free (no host reads), one model call per stage."""
    outputs: list = []
    for step in plan.steps:
        model.step = step.index
        z = noise(x, step.t0, step.t1) if step.draws else None
        for stage in step.stages:
            u = combine(x, stage.at, outputs, z)
            outputs.append(u if stage.kind is None else model.predict(u, stage.t, stage.alpha, stage.sigma, stage.kind))
        update = step.update
        x = update.fn(x, outputs, z) if type(update) is Custom else combine(x, update, outputs, z)
        for ref in step.release:
            outputs[ref] = None
        if step.report:
            callback(step.index, x)
    return x


class _Drawn:
    """The noise of a compiled run, drawn before it (in the order the eager loop draws it)."""

    def __init__(self, plan: Plan, noise, x: torch.Tensor):
        self.draws = [noise(x, step.t0, step.t1) for step in plan.steps if step.draws]
        self.used = 0

    def __call__(self, like, t0, t1):
        self.used += 1
        return self.draws[self.used - 1]


def _no_callback(i, x):
    pass


_COMPILED: dict = {}  # the compiled executor, by device type
# Each plan (solver, grid, options) and sample shape is a compiled variant of the one executor;
# torch's default of 8 variants per function would fall back to eager, silently, past the eighth.
COMPILED_VARIANTS = 64


def execute_compiled(plan: Plan, model, x: torch.Tensor, noise) -> torch.Tensor:
    """Run `plan` under torch.compile (inductor; on CUDA mode="reduce-overhead", i.e. CUDA graphs).
    The noise is drawn before the loop; progress and callbacks do not reach inside the graph. A plan
    built again (another grid, other options) is compiled again: plans are reused for equal runs."""
    kind = x.device.type
    if kind not in _COMPILED:
        _COMPILED[kind] = torch.compile(execute, mode="reduce-overhead" if kind == "cuda" else None)
    with torch._dynamo.config.patch(recompile_limit=COMPILED_VARIANTS):
        x = _COMPILED[kind](plan, model, x, _Drawn(plan, noise, x), _no_callback)
    return x.clone() if kind == "cuda" else x  # a CUDA graph's output is overwritten by its next replay


# ---- Runge-Kutta in (y = x/alpha, s = sigma/alpha) -----------------------------------------------------
@dataclass
class Start:
    """Where the steps of a Runge-Kutta plan start when not at the grid's times (EDM's churn): per step
    the time t and half log-SNR lam of the start, and the noise scale n by which y = x/alpha is raised
    there first (y + n z); churned[i] (host bools) says which steps draw."""

    t: torch.Tensor
    lam: torch.Tensor
    noise: torch.Tensor
    churned: list


def runge_kutta(planner: Planner, tableau, start: Start | None = None):
    """Explicit Runge-Kutta on dy/ds = eps, written in x: stage j of step i evaluates eps at
    x_ij = (alpha_ij/alpha_i) x_i + sum_m alpha_ij h_i a_jm k_m and t_ij = t(s_i + c_j h_i), and the step
    ends at x_{i+1} = (alpha_{i+1}/alpha_i) x_i + sum_j alpha_{i+1} h_i b_j k_j. With a `start`, step i
    starts from s_i = exp(-lam_i) at t_i with y raised by n_i z: every point gains alpha n_i z.

    Returns the weight h_i b_j of each model call, in call order: its share of the integral over s
    that the step takes (what an integral carried along the ODE, like the likelihood's, adds up)."""
    a, b, c = tableau
    sde, times = planner.sde, planner.times
    alpha, sigma = sde.alpha_sigma(times)
    t0, s0 = (times[:-1], sigma[:-1] / alpha[:-1]) if start is None else (start.t, torch.exp(-start.lam))
    h = sigma[1:] / alpha[1:] - s0
    churned = [False] * planner.steps if start is None else start.churned
    noise = torch.zeros_like(h) if start is None else start.noise
    # Nodes at a step's ends reuse the grid's own times (exact DDPM indices for index-time nets);
    # only interior nodes need t(s) inverted.
    nodes = {}
    for node in set(c) | {1.0}:
        t = t0 if node == 0 else times[1:] if node == 1 else sde.t_from_log_snr(-torch.log(s0 + node * h))
        node_alpha, node_sigma = sde.alpha_sigma(t)
        nodes[node] = [planner.values(v) for v in (t, node_alpha, node_sigma, node_alpha / alpha[:-1],
                                                    node_alpha * h, node_alpha * noise)]
    for i in range(planner.steps):
        refs = []
        for j, node in enumerate(c):
            t, node_alpha, node_sigma, scale, node_weight, node_noise = (v[i] for v in nodes[node])
            terms = [(refs[m], node_weight * a_jm) for m, a_jm in enumerate(a[j - 1] if j else ()) if a_jm]
            refs.append(planner.stage(t, node_alpha, node_sigma, "eps", x=scale, terms=terms,
                                      noise=node_noise if churned[i] else None))
        _, _, _, keep, weight, end_noise = (v[i] for v in nodes[1.0])
        planner.step(i, x=keep, terms=[(ref, weight * b_j) for ref, b_j in zip(refs, b)],
                     noise=end_noise if churned[i] else None)
    return [h_i * b_j for h_i in planner.values(h) for b_j in b]
