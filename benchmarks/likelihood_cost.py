"""Model calls against error of the likelihood ODE, per integration variable and error norm.

`sd.log_likelihood` integrates the probability-flow ODE and the instantaneous change of variables
with an adaptive solver (dopri5). How many model calls that takes at a given error depends on the
variable it integrates in and on the norm its step control measures the error in, not only on the
tolerance. This script integrates the same ODE (the same dopri5 of torchdiffeq) in several forms

    lambda_y   time lambda = log(alpha/sigma), state y = x/alpha   (scoresde before this benchmark)
    lambda_x   time lambda, state x
    t_x        time t, state x                                     (score_sde's recipe)
    t_x_jac    time t, state x, the drift's divergence -beta D/2 inside the logp state (score_sde's
               delta_logp exactly; the other forms add its integral D (log alpha_T - log alpha_eps)
               analytically)
    lambda_x_jac  time lambda, state x, -beta D/2 dt/dlambda = D sigma^2 inside the logp state
    t_y        time t, state y
    s_y        time s = sigma/alpha, state y       (the fixed-step solvers' coordinates)
    logt_x     time log t, state x
    tau_x, tau_y  time tau = -log alpha (= int_0^t beta/2: the time of the VP-SDE with beta = 2, in
               which dx/dtau = eps/sigma - x whatever the schedule), state x or y
    r_x        time r = sqrt(tau) = sqrt(-log alpha), state x          (scoresde since this benchmark)

each with the error norms

    mixed      torchdiffeq's default: the larger of the RMS errors of the state and of logp, each
               against atol + rtol |value|
    state      the state's alone (logp is integrated along but does not steer the steps)
    perdim     the larger of the state's RMS error and logp's divided by the dimension D (logp is
               a sum over D dimensions: a per-dimension error of e moves it by about D e)

and records model calls (NFE) and the error of log p_{t_eps}(x) in nats. Every form solves

    d(state)/d theta = v_state(t) dt/dtheta,   d ell/d theta = (beta/(2 sigma)) div_x eps dt/dtheta,
    log p_{t_eps}(x) = log p_T(x_T) + ell + D (log alpha_T - log alpha_{t_eps}),

with v_x = -(beta/2)(x - eps/sigma), v_y = beta eps/(2 sigma alpha) and theta one of the times above.

1. Exact Gaussian mixtures (`sd.GaussianMixture`: exact eps, exact log p_t), the exact divergence
   (no Hutchinson noise): the error is the ODE solver's alone, |log p_{t_eps}(x) - exact| with the
   N(0, I) prior swapped for the exact p_T (the prior's own mismatch is no solver's fault).
   Data: `ring2d` (six modes of std 0.04 in 2-D) and `digits64` (ten modes at the class means of
   scikit-learn's digits in model units, std 0.15, 64-D).
2. The shipped digits model with one fixed Rademacher probe per digit (Hutchinson; the probes do
   not change between runs, so the ODE is one deterministic problem): bits/dim against a
   reference from dopri5 at rtol = atol = --ref-tol, where no exact value exists (the references
   of the other --ref-forms show how far it can be trusted). `sd.log_likelihood` runs last, with
   the same probes.

Both parts end with `sd.log_likelihood` itself at each tolerance (rows "sd.log_likelihood"), which
shows the form the library runs. The summary tables give, for each form and norm and each
target error (the worst sample's), the model calls read off a least-squares line of log NFE against
log error over the tolerances (within the errors measured), and in brackets the fewest model calls
among the runs whose error was within the target.

    python benchmarks/likelihood_cost.py [--n 16] [--digits 8] [--threads 1] [--out results/likelihood_cost]
    python benchmarks/likelihood_cost.py --sde cosine --digits 0    # the mixtures on another schedule

Writes likelihood_cost.json and likelihood_cost.md under --out and prints the Markdown tables.
Measures only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

import scoresde as sd

F64 = torch.float64
FORMS = ("lambda_y", "lambda_x", "lambda_x_jac", "t_x", "t_x_jac", "t_y", "s_y", "logt_x", "tau_x", "tau_y", "r_x")
NORMS = ("mixed", "state", "perdim")
LIBRARY = "sd.log_likelihood"  # the row label of the library's own default solve


# ---- the candidate forms ------------------------------------------------------------------------
class Form:
    """One integration variable theta and state (x or y = x/alpha) for dopri5."""

    def __init__(self, name: str, sde):
        self.name, self.sde = name, sde
        self.time, state = name.split("_")[:2]
        self.on_y, self.jac_inside = state == "y", name.endswith("_jac")

    def theta(self, t: float) -> float:
        t_ = torch.tensor(t, dtype=F64)
        lam = self.sde.log_snr(t_)
        return float({"lambda": lam, "t": t_, "s": torch.exp(-lam), "logt": torch.log(t_),
                      "tau": -self.sde.log_alpha(t_), "r": (-self.sde.log_alpha(t_)).sqrt()}[self.time])

    def t(self, theta: torch.Tensor) -> torch.Tensor:
        if self.time == "t":
            return theta
        if self.time == "logt":
            return torch.exp(theta)
        if self.time in ("tau", "r"):
            return self.sde.schedule.t_from_log_alpha(-theta if self.time == "tau" else -theta**2)
        return self.sde.t_from_log_snr(theta if self.time == "lambda" else -torch.log(theta))

    def dt_dtheta(self, t, alpha, sigma, beta):
        """dt/dtheta: dlambda/dt = -beta/(2 sigma^2), s = exp(-lambda), dtau/dt = beta/2, tau = r^2."""
        return {"lambda": -2 * sigma**2 / beta, "t": 1.0, "s": 2 * sigma * alpha / beta, "logt": t,
                "tau": 2 / beta, "r": 4 * math.sqrt(-math.log(alpha)) / beta}[self.time]


def velocity_in_t(on_y: bool, z, eps, alpha, sigma, beta):
    """dx/dt = -(beta/2)(x - eps/sigma) (Song et al. 2021, eq. 13, f = -beta x/2, g^2 = beta), or
    dy/dt = beta eps/(2 sigma alpha) for y = x/alpha."""
    if on_y:
        return eps * (beta / (2 * sigma * alpha))
    return (z - eps / sigma) * (-beta / 2)


def exact_divergence(eps, x):
    """sum_i d eps_i/d x_i per sample, one batched backward pass over the D basis vectors."""
    dim = x[0].numel()
    basis = torch.eye(dim, dtype=eps.dtype).reshape((dim, 1) + tuple(x.shape[1:])).expand((dim,) + tuple(x.shape))
    (rows,) = torch.autograd.grad(eps, x, grad_outputs=basis, is_grads_batched=True)
    return torch.einsum("dbi,di->b", rows.reshape(dim, x.shape[0], dim), torch.eye(dim, dtype=rows.dtype))


def hutchinson(eps, x, probe):
    (g,) = torch.autograd.grad(eps, x, grad_outputs=probe)
    return (g * probe).flatten(1).sum(1, dtype=F64)


def norm_of(name: str, dim: int):
    """The step control's norm over (state, logp), both already divided by atol + rtol |value|."""
    rms = lambda v: v.pow(2).mean().sqrt()  # noqa: E731
    return {"mixed": lambda zs: torch.maximum(rms(zs[0]), rms(zs[1])),
            "state": lambda zs: rms(zs[0]),
            "perdim": lambda zs: torch.maximum(rms(zs[0]), rms(zs[1]) / dim)}[name]


@dataclass
class Solve:
    nats: torch.Tensor
    x_T: torch.Tensor
    prior: torch.Tensor
    nfe: int
    seconds: float


def solve(denoiser, sde, x, form_name, norm, tol, t_eps, probe=None, model_dtype=None) -> Solve:
    """dopri5 (torchdiffeq) in one form and norm; `probe` None: the exact divergence."""
    from torchdiffeq import odeint

    form, dim = Form(form_name, sde), x[0].numel()
    times = torch.tensor([t_eps, sde.T], dtype=F64)
    log_alpha0, log_alpha1 = (float(v) for v in sde.log_alpha(times))
    theta0, theta1 = form.theta(t_eps), form.theta(sde.T)
    lo, hi = min(theta0, theta1), max(theta0, theta1)
    nfe = [0]

    def func(theta, state):
        t = form.t(theta.detach().clamp(lo, hi))  # torchdiffeq probes its first step past the end
        alpha, sigma = (float(v) for v in sde.alpha_sigma(t))
        beta, t = float(sde.beta(t)), float(t)
        z = state[0]
        xin = (z * alpha if form.on_y else z).to(model_dtype or x.dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            eps = denoiser.eps(xin, t)
            div = exact_divergence(eps, xin) if probe is None else hutchinson(eps, xin, probe)
        nfe[0] += 1
        eps = eps.detach().to(F64)
        dt = form.dt_dtheta(t, alpha, sigma, beta)
        dell = div.detach().to(F64) * (beta / (2 * sigma))
        if form.jac_inside:
            dell = dell - beta * dim / 2
        return velocity_in_t(form.on_y, z, eps, alpha, sigma, beta) * dt, (dell * dt)[:, None]

    z0 = x.to(F64) / math.exp(log_alpha0) if form.on_y else x.to(F64)
    span = torch.tensor([theta0, theta1], dtype=F64)
    start = time.process_time()
    z, ell = odeint(func, (z0, torch.zeros(x.shape[0], 1, dtype=F64)), span, rtol=tol, atol=tol,
                    method="dopri5", options=dict(step_t=span[1:], norm=norm_of(norm, dim)))
    seconds = time.process_time() - start
    x_T = z[-1] * math.exp(log_alpha1) if form.on_y else z[-1]
    analytic = 0.0 if form.jac_inside else dim * (log_alpha1 - log_alpha0)
    prior = sde.prior_logp(x_T).to(F64)
    return Solve(prior + ell[-1][:, 0] + analytic, x_T, prior, nfe[0], seconds)


# ---- data ---------------------------------------------------------------------------------------
def digits_means() -> torch.Tensor:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images, dtype=F64) / 8 - 1  # model units: k/8 - 1
    return torch.stack([images[torch.as_tensor(d.target) == c].mean(0) for c in range(10)])[:, None]


def mixture(name: str, sde):
    if name == "ring2d":
        return sd.GaussianMixture.ring2d(sde)
    if name == "digits64":
        return sd.GaussianMixture(sde, torch.arange(1, 11, dtype=F64), digits_means(), 0.15)
    raise ValueError(f"data={name!r}: expected 'ring2d' or 'digits64'")


def make_sde(name: str):
    if name == "ddpm":
        return sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    return sd.VPSDE.cosine() if name == "cosine" else sd.VPSDE.linear()


@dataclass
class Row:
    data: str
    form: str
    norm: str
    tol: float
    nfe: int
    err_max: float
    err_mean: float
    cpu_s: float
    value: float  # mean nats (mixtures) or bits/dim (digits)


def exact_rows(args, sde, bar):
    rows = []
    for data_name in args.data:
        data = mixture(data_name, sde)
        x = data.sample(args.n, generator=torch.Generator().manual_seed(args.seed), dtype=F64)
        exact = data.log_prob(x, args.t_eps)
        denoiser = sd.Denoiser(data, sde)
        for form in args.forms:
            for norm in args.norms:
                for tol in args.tols:
                    bar.set_postfix_str(f"{data_name} {form} {norm} {tol:g}")
                    r = solve(denoiser, sde, x, form, norm, tol, args.t_eps)
                    rows.append(exact_row(data, data_name, form, norm, tol, r, exact))
                    bar.update()
        for tol in args.tols:  # the library as it is, to check which form it runs
            bar.set_postfix_str(f"{data_name} log_likelihood {tol:g}")
            start = time.process_time()
            res = sd.log_likelihood(data, sde, x, t_eps=args.t_eps, divergence="exact", rtol=tol, atol=tol,
                                    return_stats=True)
            r = Solve(res.nats, res.x_T, res.prior_logp, res.nfe, time.process_time() - start)
            rows.append(exact_row(data, data_name, LIBRARY, "default", tol, r, exact))
            bar.update()
    return rows


def exact_row(data, data_name, form, norm, tol, r: Solve, exact) -> Row:
    """The error of one solve against the exact log p_{t_eps}, with the prior swapped for the exact p_T."""
    swapped = r.nats - r.prior + data.log_prob(r.x_T, data.sde.T)
    err = (swapped - exact).abs()
    return Row(data_name, form, norm, tol, r.nfe, err.max().item(), err.mean().item(), r.seconds, r.nats.mean().item())


def digits_rows(args, bar):
    """The shipped model on --digits digits, one fixed Rademacher probe each, against a reference."""
    from sklearn.datasets import load_digits

    from scoresde.likelihood import bits_per_dim, dequantize

    model = sd.load_model()
    k = torch.as_tensor(load_digits().images, dtype=torch.int64)[:, None][: args.digits]
    gen = torch.Generator().manual_seed(args.seed)
    x = dequantize(k, 17, generator=gen)
    state = gen.get_state()  # the library draws its probe from here: the same one
    probe = (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x.dtype)
    bpd = lambda r: bits_per_dim(r.nats, 64, 17)  # noqa: E731
    refs = {}
    for form in args.ref_forms:
        bar.set_postfix_str(f"digits reference {form} {args.ref_tol:g}")
        refs[form] = solve(model.denoiser, model.sde, x, form, "mixed", args.ref_tol, args.t_eps, probe)
        bar.update()
    ref = bpd(refs[args.ref_forms[0]])
    rows = [Row("digits", f"{f} (reference)", "mixed", args.ref_tol, r.nfe, (bpd(r) - ref).abs().max().item(),
                (bpd(r) - ref).abs().mean().item(), r.seconds, bpd(r).mean().item()) for f, r in refs.items()]
    for form in args.digit_forms:
        for norm in args.norms:
            for tol in args.digit_tols:
                bar.set_postfix_str(f"digits {form} {norm} {tol:g}")
                r = solve(model.denoiser, model.sde, x, form, norm, tol, args.t_eps, probe)
                err = (bpd(r) - ref).abs()
                rows.append(Row("digits", form, norm, tol, r.nfe, err.max().item(), err.mean().item(), r.seconds,
                                bpd(r).mean().item()))
                bar.update()
    for tol in args.digit_tols:
        bar.set_postfix_str(f"digits log_likelihood {tol:g}")
        gen.set_state(state)
        start = time.process_time()
        res = sd.log_likelihood(model.denoiser, model.sde, x, t_eps=args.t_eps, divergence="hutchinson",
                                rtol=tol, atol=tol, levels=17, generator=gen)
        seconds, err = time.process_time() - start, (res.bpd - ref).abs()
        rows.append(Row("digits", LIBRARY, "default", tol, res.nfe, err.max().item(), err.mean().item(), seconds,
                        res.bpd.mean().item()))
        bar.update()
    return rows


# ---- reporting ----------------------------------------------------------------------------------
def fewest_calls(rows, target):
    """The fewest model calls among the rows whose worst error is within target (None: none is)."""
    ok = [r.nfe for r in rows if r.err_max <= target]
    return min(ok) if ok else None


def fitted_calls(rows, target):
    """Model calls at `target` from a least-squares line of log NFE against log(worst error) over
    the tolerances (smoother than the fewest calls: the error of one run scatters about 3x);
    None outside the errors measured (no extrapolation)."""
    pts = [(math.log(r.err_max), math.log(r.nfe)) for r in rows if r.err_max > 0]
    if len(pts) < 2 or not min(p[0] for p in pts) <= math.log(target) <= max(p[0] for p in pts):
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return math.exp(my + slope * (math.log(target) - mx))


def summary_table(rows, data, targets, unit):
    """Per form and norm: NFE at each target error, fitted (and the fewest that reached it, in brackets)."""
    mine = [r for r in rows if r.data == data and "reference" not in r.form]
    head = "| form | norm | " + " | ".join(f"NFE at {t:g} {unit}" for t in targets) + " |"
    lines = [head, "|---|---|" + "---:|" * len(targets)]
    for form, norm in dict.fromkeys((r.form, r.norm) for r in mine):
        group = [r for r in mine if r.form == form and r.norm == norm]
        cells = [(fitted_calls(group, t), fewest_calls(group, t)) for t in targets]
        lines.append(f"| {form} | {norm} | " + " | ".join(
            f"{'-' if f is None else f'{f:.0f}'} ({'-' if c is None else c})" for f, c in cells) + " |")
    return "\n".join(lines)


def full_table(rows, data, unit):
    mine = [r for r in rows if r.data == data]
    lines = [f"| form | norm | rtol = atol | NFE | max err ({unit}) | mean err ({unit}) | CPU s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in mine:
        lines.append(f"| {r.form} | {r.norm} | {r.tol:g} | {r.nfe} | {r.err_max:.2e} | {r.err_mean:.2e} "
                     f"| {r.cpu_s:.2f} |")
    return "\n".join(lines)


def floats(text: str):
    return [float(v) for v in text.split(",") if v]


def names(allowed):
    def parse(text: str):
        out = [v for v in text.split(",") if v]
        bad = [v for v in out if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{','.join(bad)}: expected some of {','.join(allowed)}")
        return out
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=names(("ring2d", "digits64")), default=["ring2d", "digits64"])
    p.add_argument("--n", type=int, default=16, help="samples per mixture (one batch)")
    p.add_argument("--forms", type=names(FORMS), default=list(FORMS))
    p.add_argument("--norms", type=names(NORMS), default=list(NORMS))
    p.add_argument("--tols", type=floats, default=[1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7],
                   help="rtol = atol values for the mixtures")
    p.add_argument("--targets", type=floats, default=[1e-2, 1e-3, 1e-4, 1e-5], help="errors (nats) to reach")
    p.add_argument("--digits", type=int, default=8, help="digits for the shipped model (0: skip)")
    p.add_argument("--digit-forms", type=names(FORMS), default=["lambda_y", "lambda_x", "t_x", "tau_x", "r_x"])
    p.add_argument("--digit-tols", type=floats, default=[1e-3, 1e-4, 1e-5, 1e-6])
    p.add_argument("--digit-targets", type=floats, default=[1e-2, 1e-3, 1e-4], help="errors (bits/dim) to reach")
    p.add_argument("--ref-tol", type=float, default=1e-7, help="tolerance of the digits' reference")
    p.add_argument("--ref-forms", type=names(FORMS), default=["r_x", "t_x", "lambda_y"],
                   help="the first is the reference; the others check it")
    p.add_argument("--sde", choices=("linear", "cosine", "ddpm"), default="linear",
                   help="the mixtures' schedule ('ddpm': the chain of linspace(1e-4, 0.02, 1000)); the "
                   "shipped model keeps its own (linear)")
    p.add_argument("--t-eps", type=float, default=None, help="default: 1e-5, 1/N for 'ddpm'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="results/likelihood_cost")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    sde = make_sde(args.sde)
    if args.t_eps is None:
        args.t_eps = 1.0 / sde.num_steps if sde.num_steps else 1e-5  # as log_likelihood's default

    load_before = os.getloadavg()
    start = time.perf_counter()
    total = (len(args.data) * (len(args.forms) * len(args.norms) + 1) * len(args.tols)
             + (len(args.ref_forms) + (len(args.digit_forms) * len(args.norms) + 1) * len(args.digit_tols))
             * (args.digits > 0))
    with tqdm(total=total, desc="likelihood cost", unit="solve") as bar:
        rows = exact_rows(args, sde, bar)
        if args.digits:
            rows += digits_rows(args, bar)
    elapsed, load_after = time.perf_counter() - start, os.getloadavg()

    sections = ["## Likelihood: model calls against error, per integration variable and norm", "",
                f"Command: `{command}`", "",
                f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}, "
                f"{os.cpu_count()} cores; 1-minute load {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
                f"{elapsed:.0f} s in all. dopri5 (torchdiffeq), {args.sde} VP-SDE, t_eps = {args.t_eps:g}.", ""]
    for data in args.data:
        sections += [f"### {data}: model calls at each error (worst of {args.n} samples, exact divergence, "
                     "error against the exact log-density; fitted, and in brackets the fewest that reached it)", "",
                     summary_table(rows, data, args.targets, "nats"), ""]
    if args.digits:
        sections += [f"### shipped digits model, {args.digits} digits, one fixed Rademacher probe: model calls at "
                     f"each error in bits/dim (worst digit) against dopri5 at {args.ref_tol:g} in {args.ref_forms[0]} "
                     "(fitted, and in brackets the fewest that reached it)", "",
                     summary_table(rows, "digits", args.digit_targets, "bpd"), ""]
    for data in args.data + (["digits"] if args.digits else []):
        sections += [f"### {data}: every run", "", full_table(rows, data, "bpd" if data == "digits" else "nats"), ""]
    md = "\n".join(sections)
    print(md)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "likelihood_cost.md"), "w") as f:
        f.write(md)
    payload = dict(command=command, args=vars(args), elapsed_s=elapsed, torch=torch.__version__,
                   load_average=dict(before=load_before, after=load_after), rows=[asdict(r) for r in rows])
    with open(os.path.join(out, "likelihood_cost.json"), "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {out}/likelihood_cost.json and likelihood_cost.md")


if __name__ == "__main__":
    main()
