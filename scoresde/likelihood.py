"""Log-likelihood and bits per dimension through the probability-flow ODE with the instantaneous
change of variables (Song et al. 2021, "Score-Based Generative Modeling through SDEs", sec. 4.3).

The ODE. With tau = -log alpha (= int_0^t beta/2: the time of the VP-SDE whose beta is 2) the
probability-flow ODE dx/dt = -(beta/2)(x - eps/sigma) (Song et al. eq. 13, score = -eps/sigma)
reads dx/dtau = eps/sigma - x, with sigma^2 = 1 - exp(-2 tau) whatever the schedule. dopri5
integrates it in r = sqrt(tau) = sqrt(-log alpha), with x itself as the state:

    dx/dr = 2r (eps(x, t(r))/sigma - x),   t(r): log alpha(t) = -r^2.

Near the data sigma ~ sqrt(2) r, so r is the noise level there, and while sigma is below the
data's own scale the velocity is about linear in r (a few large steps); near T, x stays of the
prior's size (y = x/alpha, the state used before, grows to 1/alpha_T ~ 150 times x).
benchmarks/likelihood_cost.py measured this form against (lambda, y), (t, x) (score_sde's),
(tau, x), (lambda, x) and others on exact mixtures and the shipped digits model: at equal error it
takes 0.5-0.8 of the model calls of (lambda, y). (t, x) is as cheap on the linear schedule's
mixtures, but not on the cosine schedule (1.7x), a DDPM chain (beta jumps at every step) or the
shipped model (docs/benchmarks.md).

Change of variables. Along a trajectory d log p(x)/dr = -div_x(dx/dr) = -2r (div_x eps/sigma - D).
Integrating from r_0 = r(t_eps) (near the data) to r_T = r(T):

    log p_{t_eps}(x) = log p_T(x_T) + L - D (r_T^2 - r_0^2),   L = int_{r_0}^{r_T} (2r/sigma) div_x eps dr,

and r_T^2 - r_0^2 = log alpha_{t_eps} - log alpha_T. The state is x at both ends, so no Jacobian of
a change of state enters: the drift's -x supplies the whole D log alpha term, in closed form. With
the prior N(0, I) in place of p_T:

    log p_{t_eps}(x) = log N(x_T; 0, I) + L + D (log alpha_T - log alpha_{t_eps}).

(Check: with dtau = (beta/2) dt, L is Song et al.'s int (beta/(2 sigma)) div_x eps dt and the D term
their int -(beta/2) D dt, the drift's divergence.)

Fixed steps. euler, heun and rk4 step as the library's ODE samplers do (scoresde/solvers/ode.py):
time s = sigma/alpha = exp(-lambda), state y = x/alpha, dy/ds = eps, on a grid uniform in lambda.
There d log p(y)/ds = -div_y(dy/ds) = -alpha div_x eps, and alpha ds = (beta/(2 sigma)) dt, so the
same L = int_{s_0}^{s_T} alpha div_x eps ds comes out. y = x/alpha has the Jacobian alpha^-D, so
log p^X(x) = log p^Y(x/alpha) - D log alpha at both ends: -D log alpha_{t_eps} at the data and
+D log alpha_T at the prior give the same D (log alpha_T - log alpha_{t_eps}), x_T = alpha_T y_T.

The integral starts at t_eps (1e-5 by default, as Song et al.; 1/N for a DDPM chain, its first
step), so what comes out is log p_{t_eps}(x), the density of x under the model's marginal at t_eps;
it ends at T with the prior N(0, I) in place of the model's exact p_T.

Images. Integer data with L levels k in {0..L-1} are used in model units by the library's map
x = k Delta - 1 with Delta = 2/(L-1) (8-bit: k/127.5 - 1; scikit-learn's digits, L = 17: k/8 - 1).
`dequantize` adds u ~ U[0, 1) and centres the bin on that point: x = (k + u - 1/2) Delta - 1, so
each level owns [k Delta - 1 - Delta/2, k Delta - 1 + Delta/2), the whole range being
[-1 - Delta/2, 1 + Delta/2). The density of the dequantized integer value v = k + u is
p_v = p_x Delta^D, and E_u[-log2 p_v(k + u)] bounds the discrete -log2 P(k) from above, so

    bpd = -(log p_x + D log Delta) / (D ln 2) = -log p_x / (D ln 2) + log2((L - 1)/2)

(+6.994 for 8-bit data, +3 for the digits). Data uniform over the L levels have bpd = log2 L.
Song et al. scale 8-bit data by 1/128 instead ((k + u)/128 - 1, offset 7): their numbers differ
from ours by the scale of the model's input and log2(128/127.5) = 0.0056 bits in the offset.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ._util import F64, check_count, check_flag, host_floats
from .prediction import as_model, declared_sample_shape
from .sde import VPSDE
from .solvers.ode import EULER, HEUN, RK4, check_tolerances
from .solvers.plan import Planner, execute, runge_kutta

DIVERGENCES = ("auto", "exact", "hutchinson")
PROBE_KINDS = ("rademacher", "gaussian")
FIXED_STEP = {"euler": EULER, "heun": HEUN, "rk4": RK4}
SOLVERS = ("dopri5",) + tuple(FIXED_STEP)
# "auto" takes the exact divergence up to this dimension: it costs D vector-Jacobian products per
# model call where Hutchinson's estimator costs one per probe.
AUTO_EXACT_MAX_DIM = 16
DEFAULT_T_EPS = 1e-5
DEFAULT_NFE = 200  # fixed-step solvers default to about this many model calls


@dataclass
class LikelihoodResult:
    """What `log_likelihood` found, per sample.

    nats: log p_{t_eps}(x) in nats, float64 (batch,), the density of x in the units x is given in.
    bpd: bits per dimension of the dequantized integer data (when `levels` was given), else None.
    std_error: the standard error (nats) of Hutchinson's estimate across its probes (probes >= 2),
        None for the exact divergence. bpd_std_error: the same in bits per dimension.
    nfe: model evaluations; each also costs D (exact) or `probes` (Hutchinson) vector-Jacobian products.
    With return_stats: prior_logp (log N(x_T; 0, I)), delta_logp (nats - prior_logp) and x_T.
    """

    nats: torch.Tensor
    bpd: torch.Tensor | None
    std_error: torch.Tensor | None
    nfe: int
    divergence: str
    t_eps: float
    bpd_std_error: torch.Tensor | None = None
    prior_logp: torch.Tensor | None = None
    delta_logp: torch.Tensor | None = None
    x_T: torch.Tensor | None = None


# ---- bits per dimension and dequantization -----------------------------------------------------
def _check_levels(levels) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels={levels!r}: expected an int >= 2 (256 for 8-bit images, 17 for the digits)")
    return levels


def bin_width(levels: int) -> float:
    """Delta = 2/(L-1): the model-units width of one of L levels under x = k Delta - 1."""
    return 2.0 / (_check_levels(levels) - 1)


def bits_per_dim(nats: torch.Tensor, dim: int, levels: int = 256) -> torch.Tensor:
    """Bits per dimension of integer data with `levels` levels from log p_x (nats, model units) of its
    dequantized version (see `dequantize`): -(log p_x + D log Delta)/(D ln 2), Delta = 2/(L-1)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim={dim!r}: expected the number of dimensions per sample, an int >= 1")
    return -(nats + dim * math.log(bin_width(levels))) / (dim * math.log(2.0))


def dequantize(k: torch.Tensor, levels: int = 256, generator=None, dtype=torch.float32) -> torch.Tensor:
    """Integer data k in {0..levels-1} to model units, uniformly dequantized within each level's bin:
    x = (k + u - 1/2) Delta - 1, u ~ U[0, 1), Delta = 2/(levels-1), centred on the training map k Delta - 1."""
    delta = bin_width(levels)
    if not isinstance(k, torch.Tensor) or k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
        got = f"a {k.dtype} tensor" if isinstance(k, torch.Tensor) else type(k).__name__
        raise TypeError(f"k: expected an integer tensor of levels 0..{levels - 1} (uint8 for 8-bit images), got {got}")
    if k.numel() and (int(k.min()) < 0 or int(k.max()) > levels - 1):  # sync: validation, before any work
        raise ValueError(f"k: values must lie in 0..{levels - 1} for levels={levels}, "
                         f"found {int(k.min())}..{int(k.max())}")
    where = generator.device if generator is not None else k.device
    u = torch.rand(k.shape, generator=generator, dtype=F64, device=where).to(k.device)
    return ((k.to(F64) + u - 0.5) * delta - 1.0).to(dtype)


# ---- validation --------------------------------------------------------------------------------
def _choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")
    return value


def _check_x(x, model, levels):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a floating tensor of shape (batch, *sample_shape), got {got}"
                        + ("; integer images go through dequantize() first" if isinstance(x, torch.Tensor)
                           and not x.is_floating_point() else ""))
    if x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"x: expected a non-empty batch, got shape {tuple(x.shape)}")
    want = declared_sample_shape(model)
    if want is not None and tuple(x.shape[1:]) != want:
        raise ValueError(f"x: expected shape (batch, {', '.join(map(str, want))}) for this model, got {tuple(x.shape)}")
    if x.device.type == "meta":
        return  # no data to check (used to prove the fixed-step loop sync-free)
    if not bool(torch.isfinite(x).all()):  # sync: validation, once, before any work
        raise ValueError("x: holds NaN or infinite values")
    if levels is not None:
        half = bin_width(levels) / 2
        lo, hi = float(x.min()), float(x.max())  # sync: validation, once, before any work
        if lo < -1 - half or hi > 1 + half:
            raise ValueError(f"x: dequantized data with levels={levels} must lie in [{-1 - half:.6g}, {1 + half:.6g}] "
                             f"(model units, see dequantize), found [{lo:.6g}, {hi:.6g}]")


def _check_t_eps(sde, t_eps):
    if t_eps is None:
        return 1.0 / sde.num_steps if sde.num_steps else DEFAULT_T_EPS
    if isinstance(t_eps, bool) or not isinstance(t_eps, (int, float)) or not 0.0 < t_eps < sde.T:
        raise ValueError(f"t_eps={t_eps!r}: expected a float in (0, {sde.T}) (where the ODE starts; t = 0 is the data)")
    return float(t_eps)


# ---- the model's eps and its divergence ---------------------------------------------------------
class _EpsDiv:
    """eps(x, t) and div_x eps, exact (one vector-Jacobian product per dimension) or Hutchinson's
    z^T (d eps/dx) z per probe (one column per probe). Counts model calls; no host reads."""

    def __init__(self, denoiser, probes, model_dtype):
        self.denoiser, self.probes, self.model_dtype, self.nfe = denoiser, probes, model_dtype, 0
        self.sums = []  # per call: the sum of eps, to check finiteness after a fixed-step loop

    def __call__(self, state, t: float):
        """(eps, div_x eps of shape (batch, columns)), both in the state's dtype, at x = state."""
        x = state.to(self.model_dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            eps = self.denoiser.eps(x, t)
            if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
                got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
                raise ValueError(f"model output has shape {got}, expected the input's {tuple(x.shape)} (t={t:.6g})")
            if not eps.requires_grad:
                raise ValueError("the model's output does not depend on x through autograd: the divergence needs a "
                                 "differentiable model (no torch.no_grad or .detach() inside it)")
            div = self._divergence(eps, x)
        self.nfe += 1
        eps = eps.detach()
        self.sums.append(eps.sum(dtype=F64))
        return eps.to(state.dtype), div.to(state.dtype)

    def _divergence(self, eps, x):
        batch = x.shape[0]
        if self.probes is None:  # exact: the diagonal of the Jacobian, one row per backward pass
            flat, dim, cols = eps.reshape(batch, -1), x[0].numel(), []
            for i in range(dim):
                (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < dim - 1)
                cols.append(g.reshape(batch, -1)[:, i])
            return torch.stack(cols, 1).to(F64).sum(1, keepdim=True)
        ests = []
        for p, z in enumerate(self.probes):
            (g,) = torch.autograd.grad(eps, x, grad_outputs=z, retain_graph=p < len(self.probes) - 1)
            ests.append((g * z).reshape(batch, -1).sum(1, dtype=F64))
        return torch.stack(ests, 1)


def _check_probe_values(values, divergence, probes, x):
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        got = f"a {values.dtype} tensor" if isinstance(values, torch.Tensor) else type(values).__name__
        raise TypeError(f"probe_values: expected a float tensor of Hutchinson probes, got {got}")
    if divergence != "hutchinson":
        raise ValueError(f"probe_values: given with divergence={divergence!r}; the probes are Hutchinson's "
                         "(divergence='hutchinson')")
    if tuple(values.shape) != (probes, *x.shape):
        raise ValueError(f"probe_values: shape {tuple(values.shape)}, expected (probes, *x.shape) = "
                         f"{(probes, *x.shape)}")
    return values


def _draw_probes(kind, count, like, dtype, generator):
    where = generator.device if generator is not None else like.device
    shape = (count,) + tuple(like.shape)
    if kind == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=where).to(dtype) * 2 - 1
    else:
        z = torch.randn(shape, generator=generator, dtype=dtype, device=where)
    return z.to(like.device)


# ---- the two integrators: each returns (x_T, L) -------------------------------------------------
def _fixed_step(eps_div, sde, x, ell, t_eps, lam0, lam1, steps, tableau, bar):
    """Explicit Runge-Kutta through the solvers' engine (`runge_kutta`, in s = sigma/alpha on y = x/alpha)
    on a grid uniform in lambda from t_eps to T: dy/ds = eps, and dL/ds = alpha div_x eps adds, per
    model call, its quadrature weight times alpha div_x eps. The plan's coefficients are host floats and
    its executor reads no device tensor. `bar` (a tqdm of total `steps`) advances one per step."""
    times = sde.t_from_log_snr(torch.linspace(lam0, lam1, steps + 1, dtype=F64))
    times[0], times[-1] = t_eps, sde.T
    planner = Planner(sde, times, x)
    along = _Accumulated(eps_div, runge_kutta(planner, tableau), ell)

    def advance(i, x_now):
        bar.set_postfix(nfe=eps_div.nfe, refresh=False)
        bar.update(1)

    return execute(planner.finish(), along, x, None, advance), along.ell


class _Accumulated:
    """The model as the plan executor calls it, with the log-density change L carried along: each
    call gives eps and adds weight * alpha * div_x eps to L."""

    def __init__(self, eps_div, weights, ell):
        self.eps_div, self.weights, self.ell, self.calls, self.step = eps_div, weights, ell, 0, None

    def predict(self, x, t, alpha, sigma, kind):
        eps, div = self.eps_div(x, t)
        self.ell = self.ell + (self.weights[self.calls] * alpha) * div
        self.calls += 1
        return eps


def _adaptive(eps_div, sde, x, ell, r0, r1, lam0, rtol, atol, bar):
    """dopri5 through torchdiffeq in r = sqrt(-log alpha) on x: dx/dr = 2r (eps/sigma - x),
    dL/dr = (2r/sigma) div_x eps (see the module docstring). Its step control reads the state on the
    host at every step anyway, so the per-call host conversions and the finiteness check here add
    no sync of their own.

    `bar` (a tqdm whose total is the log-SNR span lam0 - lambda(T)) follows the solve: dopri5's last
    stage is evaluated at the step's end (first same as last), so when torchdiffeq reports an
    accepted step (its `callback_accept_step` hook) the last lambda evaluated is how far it has got."""
    from torchdiffeq import odeint

    last_lam = [lam0]

    def func(r, state):
        # Clamped to the span: torchdiffeq probes its first step size past the end, and beyond T the
        # schedule may end (the cosine's alpha reaches 0 just after its T).
        r = float(r.detach().to("cpu", F64).clamp(r0, r1))  # sync: adaptive stepping is host-driven
        t = sde.schedule.t_from_log_alpha(torch.tensor(-r * r, dtype=F64))
        alpha, sigma = (float(v) for v in sde.alpha_sigma(t))
        last_lam[0] = math.log(alpha / sigma)
        eps, div = eps_div(state[0], float(t))
        if not bool(torch.isfinite(eps_div.sums[-1])):  # sync: a NaN would otherwise stall the step control
            raise FloatingPointError(f"the model returned NaN or inf at t={float(t):.6g}")
        return (eps / sigma - state[0]) * (2 * r), div * (2 * r / sigma)

    func.callback_accept_step = lambda t0, y0, dt: _advance(bar, lam0 - last_lam[0], eps_div.nfe)
    span = torch.tensor([r0, r1], dtype=F64, device=x.device)
    # step_t: the last step lands on r(T) instead of stepping past it and interpolating back.
    x_path, ell_path = odeint(func, (x, ell), span, rtol=rtol, atol=atol, method="dopri5",
                              options=dict(step_t=span[1:]))
    return x_path[-1], ell_path[-1]


def _advance(bar, done, nfe):
    """Move `bar` forward to `done` (never back, never past its total), showing the model calls."""
    bar.set_postfix(nfe=nfe, refresh=False)
    bar.update(min(max(done, bar.n), bar.total) - bar.n)


def _progress_bar(progress, solver, steps, lam0, lam1, batch):
    """The bar of one solve: fixed-step solvers count steps, dopri5 the log-SNR covered (lam0 -> lam1)."""
    desc = f"log-likelihood, {batch} sample{'s' if batch != 1 else ''}"
    if solver != "dopri5":
        return tqdm(total=steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    return tqdm(total=lam0 - lam1, desc=desc, disable=not progress, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} of log-SNR [{elapsed}<{remaining}{postfix}]")


# ---- the entry point ---------------------------------------------------------------------------
def log_likelihood(model: Callable, sde: VPSDE, x: torch.Tensor, *, t_eps: float | None = None,
                   divergence: str = "auto", probes: int = 1, probe: str = "rademacher", solver: str = "dopri5",
                   steps: int | None = None, rtol: float = 1e-5, atol: float = 1e-5, levels: int | None = None,
                   generator: torch.Generator | None = None, return_stats: bool = False,
                   progress: bool = False, probe_values: torch.Tensor | None = None) -> LikelihoodResult:
    """log p_{t_eps}(x) per sample through the probability-flow ODE (Song et al. 2021, sec. 4.3).

    The ODE state is float64 (the model sees x's dtype); nats come back as float64 on x's device.

    Args:
        model: a Denoiser or a plain eps callable model(x, t); it must be differentiable in x and
            treat samples independently (eval mode: no dropout, no batch statistics).
        sde: the model's schedule.
        x: float (batch, *sample_shape) in model units; for images, dequantized data (see
            `dequantize`).
        t_eps: where the ODE starts (default 1e-5 as Song et al.; 1/N, the first step, for a DDPM
            chain).
        divergence: "exact" (D vector-Jacobian products per model call), "hutchinson" (one per
            probe, the `probes` probes drawn once from `generator` and fixed over the solve) or
            "auto" (exact for D <= 16).
        probes: Hutchinson probes per model call.
        probe: "rademacher" or "gaussian".
        solver: "dopri5" (adaptive, torchdiffeq; rtol, atol; in r = sqrt(-log alpha) on x, see the
            module docstring) or "euler", "heun", "rk4" (fixed `steps`, uniform in lambda, default
            about 200 model calls; no host read inside the loop).
        steps: steps of a fixed-step solver.
        rtol: dopri5's relative tolerance.
        atol: dopri5's absolute tolerance.
        levels: the number of integer levels x was dequantized from (256 for 8-bit, 17 for the
            digits): x's range is checked and `bpd` reported.
        generator: seeds the probes.
        return_stats: also return prior_logp, delta_logp and the latent x_T.
        progress: a tqdm progress bar with an ETA on stderr: the steps of a fixed-step solver, or the
            log-SNR span dopri5 has covered (its ETA is rough: step sizes change along the way),
            with the model calls so far.
        probe_values: Hutchinson's probes themselves, (probes, *x.shape), instead of drawing them
            from `generator`: a run split over processes draws the probes of the whole batch once
            and passes each process its share, ``z[:, share]``, so that every sample keeps its
            probes (what `scoresde likelihood` does under torchrun).

    Returns:
        A `LikelihoodResult` (nats per sample, bpd when `levels` is given, the NFE, and the stats
        asked for).

    Raises:
        TypeError, ValueError: an argument that is wrong, named with its value and what is allowed.
        FloatingPointError: the model returned NaN or inf, or the log-likelihood diverged.
        RuntimeError: called under torch.inference_mode() (the divergence needs autograd).
    """
    if not isinstance(sde, VPSDE):
        raise TypeError(f"sde={sde!r}: expected a scoresde.VPSDE")
    denoiser = as_model(model, sde)
    _choice("divergence", divergence, DIVERGENCES)
    _choice("probe", probe, PROBE_KINDS)
    _choice("solver", solver, SOLVERS)
    check_count("probes", probes)
    check_flag("return_stats", return_stats)
    check_flag("progress", progress)
    if levels is not None:
        _check_levels(levels)
    if solver == "dopri5":
        if steps is not None:
            raise ValueError(f"steps={steps!r}: solver 'dopri5' is adaptive (rtol, atol); steps are for "
                             f"{', '.join(FIXED_STEP)}")
        rtol, atol = check_tolerances(rtol, atol)
    else:
        tableau = FIXED_STEP[solver]
        if steps is None:
            steps = max(1, DEFAULT_NFE // len(tableau[1]))
        check_count("steps", steps)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator={generator!r}: expected a torch.Generator or None")
    t_eps = _check_t_eps(sde, t_eps)
    _check_x(x, model, levels)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("log_likelihood differentiates the model for the divergence: call it outside "
                           "torch.inference_mode() (torch.no_grad() is fine)")
    net = getattr(denoiser, "net", None)
    if isinstance(net, torch.nn.Module) and net.training:
        warnings.warn("log_likelihood: the network is in training mode (dropout, batch statistics); "
                      "call .eval() for a deterministic ODE", stacklevel=2)

    batch, dim = x.shape[0], x[0].numel()
    if divergence == "auto":
        divergence = "exact" if dim <= AUTO_EXACT_MAX_DIM else "hutchinson"
    state_dtype = F64 if x.device.type != "mps" else torch.float32  # MPS has no float64
    if probe_values is not None:
        probe_values = _check_probe_values(probe_values, divergence, probes, x)
    if divergence != "hutchinson":
        z = None
    elif probe_values is not None:
        z = probe_values.to(x.device, x.dtype)
    else:
        z = _draw_probes(probe, probes, x, x.dtype, generator)
    eps_div = _EpsDiv(denoiser, z, x.dtype)

    times = torch.tensor([t_eps, sde.T], dtype=F64)
    lam0, lam1 = host_floats(sde.log_snr(times))
    log_alpha0, log_alpha1 = host_floats(sde.log_alpha(times))
    state = x.detach().to(state_dtype)
    ell = torch.zeros(batch, 1 if z is None else probes, dtype=state_dtype, device=x.device)
    with _progress_bar(progress, solver, steps, lam0, lam1, batch) as bar:
        if solver == "dopri5":
            r0, r1 = math.sqrt(-log_alpha0), math.sqrt(-log_alpha1)
            x_T, ell = _adaptive(eps_div, sde, state, ell, r0, r1, lam0, rtol, atol, bar)
        else:
            x_T, ell = _fixed_step(eps_div, sde, state, ell, t_eps, lam0, lam1, steps, tableau, bar)

    prior = sde.prior_logp(x_T).to(F64)
    delta = ell.to(F64).mean(1) + dim * (log_alpha1 - log_alpha0)
    nats = prior + delta
    std_error = None
    if z is not None and probes >= 2:
        std_error = ell.to(F64).std(1) / math.sqrt(probes)
    if x.device.type != "meta" and not bool(torch.isfinite(nats).all()):  # sync: once, after the solve
        sums = torch.stack(eps_div.sums)
        bad = torch.nonzero(~torch.isfinite(sums))
        where = f" at model call {int(bad[0]) + 1}" if len(bad) else ""
        raise FloatingPointError(f"the log-likelihood came out NaN or inf{where}: the model returned NaN or inf, "
                                 "or the ODE diverged")
    bpd = bits_per_dim(nats, dim, levels) if levels is not None else None
    bpd_se = std_error / (dim * math.log(2.0)) if levels is not None and std_error is not None else None
    result = LikelihoodResult(nats, bpd, std_error, eps_div.nfe, divergence, t_eps, bpd_se)
    if return_stats:
        result.prior_logp, result.delta_logp, result.x_T = prior, delta, x_T.to(x.dtype)
    return result


__all__ = ["LikelihoodResult", "bin_width", "bits_per_dim", "dequantize", "log_likelihood"]
