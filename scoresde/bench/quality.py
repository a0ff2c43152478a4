"""Quality per model call: every scoresde solver and diffusers' schedulers on exact Gaussian
mixtures, at equal NFE, from the same x_T.

    scoresde bench --only quality            (or: python benchmarks/quality.py [--nfe 5 10 20 50] [--n 4000]
                                              [--tuned SOLVER ...])

Both libraries sample the same exact eps-model on the same discrete chain (Ho et al.'s
linspace(1e-4, 0.02, 1000)); every model call counts, our final denoising step included.
Metrics, lower is better:
- weight error: the largest error of a mode's mass;
- stray: the mass between modes (where the mixture has almost none);
- spread error: the worst relative error of a mode's std against its exact value (the std of
  E[x0 | x_t_end], which is what a final x0 prediction at the chain's first step has);
- transport: RMS distance to a tight probability-flow solution (dopri5, rtol = atol = 1e-8,
  float64) from the same x_T (deterministic samplers only).
The "floor" row applies the metrics to that reference itself: pure sampling noise of n samples.

Tuned rows ("unipc (tuned)"): a deterministic solver on a grid learned by `tune_grid` (LD3, Tong et
al. 2025) for the problem's exact model, at the step count (and so the model calls) of that solver's
fixed-grid row, fitted on starting points of another seed than the benchmark's x_T, then sampled from
the benchmark's x_T. The verdict below compares the libraries on fixed grids only (diffusers has no
learned grids); a second table sets the best tuned sampler against the best fixed-grid one.

Verdict per problem and NFE: a sampler's score is its worst mode metric in units of the floor
(each floor taken as at least one sample, 1/n); a score of at most 2 is "within twice the floor",
where the mode metrics no longer tell samplers apart, so there the smaller transport error decides.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import torch

import scoresde as sd

from .report import fmt, table

F64 = torch.float64
N_TRAIN = 1000


# The deterministic solvers whose grids the benchmark also learns (tune_grid), and the seed of the
# starting points they are tuned on: not 0, the seed of the benchmark's own x_T.
TUNED = ("ddim", "heun", "dpm_solver_2", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc")
TUNE_SEED = 2


@dataclass(frozen=True)
class QualityOptions:
    nfe: tuple[int, ...] = (5, 10, 20, 50)
    n: int = 4000  # samples per problem
    tuned: tuple[str, ...] = TUNED  # solvers with a tuned-grid row at every NFE budget
    tune_n: int = 128  # tune_grid's n, held_out and iterations
    tune_held_out: int = 64
    tune_iterations: int = 40


def options(profile: str, env) -> QualityOptions:
    return {"tiny": QualityOptions((5,), 200, tuned=("unipc",), tune_n=32, tune_held_out=32, tune_iterations=5),
            "quick": QualityOptions((5, 10, 20), 1000, tuned=("ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc"),
                                    tune_n=64, tune_iterations=20)}.get(profile, QualityOptions())


def problems(sde):
    """The 2-D ring (6 modes, std 2% of the range) and a 16-D mixture of 4 sharp modes."""
    ring = sd.GaussianMixture.ring2d(sde)
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 16, generator=g, dtype=F64)
    means = means / means.norm(dim=1, keepdim=True) * 1.5
    high = sd.GaussianMixture(sde, torch.tensor([1.0, 2.0, 3.0, 4.0]), means, 0.05)
    return {"ring2d": ring, "mixture16d": high}


def expected_spread(mixture, sde, t_end):
    s = math.exp(-float(sde.log_snr(torch.tensor(t_end, dtype=F64))))
    return mixture.stds / torch.sqrt(mixture.stds**2 + s**2)


def metrics(mixture, x, expected, reference=None):
    report = mixture.mode_report(x)
    out = {"weight_error": (report["weights"] - mixture.weights).abs().max().item(),
           "stray": report["stray"],
           "spread_error": torch.nan_to_num(report["std_ratio"] / expected - 1, nan=1.0).abs().max().item()}
    if reference is not None:
        out["transport"] = (x.to(F64) - reference).flatten(1).norm(dim=1).pow(2).mean().sqrt().item()
    return out


# The multistep solvers also run on Karras et al.'s grid, as diffusers' do with use_karras_sigmas.
KARRAS_VARIANTS = ("dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc")


def fixed_steps(spec, nfe: int) -> int:
    """The step count of a solver's fixed-grid run within `nfe` model calls (0: none fits)."""
    return (nfe - 1) // spec.nfe_per_step


def our_runs(mixture, sde, x_T, nfe):
    """Every registered solver at the largest step count within `nfe` model calls."""
    configs = [(name, None) for name in sd.SOLVERS] + [(name, "karras") for name in KARRAS_VARIANTS]
    for name, grid in configs:
        spec = sd.SOLVERS[name]
        steps = fixed_steps(spec, nfe)
        if spec.adaptive or name == "torchsde" or steps < 1:
            continue
        x, info = sd.sample(mixture, sde, x_T=x_T.clone(), solver=name, steps=steps, grid=grid, return_info=True,
                            generator=torch.Generator().manual_seed(1))
        label = name if grid is None else f"{name} ({grid})"
        yield label, x, info.nfe, not spec.stochastic or name == "ddim"


def diffusers_runs(diffusers, mixture, x_T, nfe):
    """diffusers' schedulers driving the same exact model (timestep n sits at t = (n + 1)/N)."""
    configs = {
        "DDIM": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
        "DPM++2M": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
        "DPM++3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
        "DPM++2M-karras": ("DPMSolverMultistepScheduler", {"solver_order": 2, "use_karras_sigmas": True}),
        "DPM++3M-karras": ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
        "UniPC": ("UniPCMultistepScheduler", {}),
        "Euler": ("EulerDiscreteScheduler", {}),
    }
    for label, (cls, kwargs) in configs.items():
        scheduler = getattr(diffusers, cls)(num_train_timesteps=N_TRAIN, beta_schedule="linear",
                                            beta_start=1e-4, beta_end=0.02, **kwargs)
        scheduler.set_timesteps(nfe)
        x = x_T.clone() * scheduler.init_noise_sigma
        calls = 0
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(x, t)
            if label == "Euler":  # fractional timesteps: call the model at the time of its sigma
                time_ = mixture.sde.t_from_log_snr(-torch.log(scheduler.sigmas[i].to(F64))).expand(x.shape[0])
            else:
                time_ = torch.full((x.shape[0],), (float(t) + 1) / N_TRAIN, dtype=F64)
            eps = mixture.eps(model_input, time_)
            calls += 1
            x = scheduler.step(eps, t, x).prev_sample
        yield f"diffusers {label}", x, calls, True


# ---- the suite's units: a reference per problem, then every sampler at each NFE budget ----------
class _Problem:
    """One exact mixture with its x_T and tight reference solution, computed on first use."""

    def __init__(self, name, mixture, n):
        self.name, self.mixture, self.sde, self.n = name, mixture, mixture.sde, n
        self.expected = expected_spread(mixture, self.sde, self.sde.t_min)

    @cached_property
    def x_T(self):
        return torch.randn((self.n, self.mixture.dim), generator=torch.Generator().manual_seed(0), dtype=F64)

    @cached_property
    def reference(self):
        return sd.sample(self.mixture, self.sde, x_T=self.x_T, solver="dopri5", rtol=1e-8, atol=1e-8)


def _floor_rows(problem: _Problem):
    return [{"problem": problem.name, "sampler": "floor (reference)", "nfe": None,
             **metrics(problem.mixture, problem.reference, problem.expected, problem.reference)}]


def _nfe_rows(problem: _Problem, nfe: int, diffusers):
    rows = []
    for runs in (our_runs(problem.mixture, problem.sde, problem.x_T, nfe),
                 diffusers_runs(diffusers, problem.mixture, problem.x_T, nfe) if diffusers else ()):
        for name, x, calls, deterministic in runs:
            rows.append({"problem": problem.name, "sampler": name, "nfe_budget": nfe, "nfe": calls,
                         **metrics(problem.mixture, x, problem.expected,
                                   problem.reference if deterministic else None)})
    return rows


def _tuned_rows(problem: _Problem, nfe: int, opts: QualityOptions):
    """Each solver of opts.tuned on a grid learned (LD3, Tong et al. 2025) at its fixed-grid run's step count."""
    rows = []
    for name in opts.tuned:
        spec = sd.SOLVERS[name]
        steps = fixed_steps(spec, nfe)
        if steps < 1:
            continue
        tuned = sd.tune_grid(problem.mixture, problem.sde, solver=name, nfe=spec.calls(steps, {}) + 1,
                             shape=(problem.mixture.dim,), dtype=F64, n=opts.tune_n, held_out=opts.tune_held_out,
                             iterations=opts.tune_iterations, generator=torch.Generator().manual_seed(TUNE_SEED))
        x, info = sd.sample(problem.mixture, problem.sde, x_T=problem.x_T.clone(), solver=name, grid=tuned,
                            return_info=True)
        start = tuned.validation["initial"]
        rows.append({"problem": problem.name, "sampler": f"{name} (tuned)", "nfe_budget": nfe, "nfe": info.nfe,
                     **metrics(problem.mixture, x, problem.expected, problem.reference),
                     "tuned": True, "tune_seconds": tuned.seconds, "tune_start": start,
                     "tune_held_out": {"start": tuned.validation["fixed"][start], "tuned": tuned.validation["tuned"]},
                     "times": tuned.times.tolist()})
    return rows


def units(opts: QualityOptions, env):
    """(label, run) pairs for the suite; each run returns rows."""
    sde = sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, N_TRAIN, dtype=F64))
    out = []
    for name, mixture in problems(sde).items():
        problem = _Problem(name, mixture, opts.n)
        out.append((f"quality {name}: reference", partial(_floor_rows, problem)))
        for nfe in opts.nfe:
            out.append((f"quality {name}: NFE {nfe}", partial(_nfe_rows, problem, nfe, env.peers.get("diffusers"))))
            if opts.tuned:
                out.append((f"quality {name}: NFE {nfe}, tuned grids", partial(_tuned_rows, problem, nfe, opts)))
    return out


MODE_METRICS = ("weight_error", "stray", "spread_error")


def floor_score(row, floor, n):
    """The worst mode metric in units of its sampling-noise floor (at least one sample, 1/n)."""
    return max(row[m] / max(floor[m], 1.0 / n) for m in MODE_METRICS)


def best(rows, floor, n):
    """The sampler with the lowest floor score; within twice the floor, the lowest transport error."""
    def key(r):
        score = floor_score(r, floor, n)
        return (max(score, 2.0), r.get("transport", math.inf), score)
    return min(rows, key=key, default=None)


def verdicts(rows, n):
    """Per problem and NFE budget: the best sampler of each library on a fixed grid and whether ours wins."""
    out = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        mine = [r for r in rows if r["problem"] == problem and not r.get("tuned")]
        floor = next(r for r in mine if r["nfe"] is None)
        for nfe in dict.fromkeys(r["nfe_budget"] for r in mine if r["nfe"] is not None):
            ours = best([r for r in mine if r.get("nfe_budget") == nfe and not r["sampler"].startswith("diffusers")],
                        floor, n)
            theirs = best([r for r in mine if r.get("nfe_budget") == nfe and r["sampler"].startswith("diffusers")],
                          floor, n)
            out.append({"problem": problem, "nfe": nfe, "ours": ours["sampler"], "ours_score": floor_score(ours, floor, n),
                        "ours_transport": ours.get("transport"), "theirs": theirs and theirs["sampler"],
                        "theirs_score": theirs and floor_score(theirs, floor, n),
                        "theirs_transport": theirs and theirs.get("transport"),
                        "ours_wins": theirs is None or best([ours, theirs], floor, n) is ours})
    return out


def _ratio(a, b):
    return None if a is None or b is None else a / b if b > 0 else math.inf


def tuned_against_fixed(rows, n):
    """Per problem and NFE budget: the best tuned sampler against the best fixed-grid one (either
    library), by `best`; ratio = the tuned one's floor score over the fixed one's (< 1: tuning wins);
    own_ratio = the same over its own solver's on its default fixed grid."""
    out = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        mine = [r for r in rows if r["problem"] == problem]
        floor = next(r for r in mine if r["nfe"] is None)
        for nfe in dict.fromkeys(r["nfe_budget"] for r in mine if r.get("tuned")):
            at = [r for r in mine if r.get("nfe_budget") == nfe]
            tuned = best([r for r in at if r.get("tuned")], floor, n)
            fixed = best([r for r in at if not r.get("tuned")], floor, n)
            if fixed is None:
                continue
            scores = floor_score(tuned, floor, n), floor_score(fixed, floor, n)
            own = next((r for r in at if r["sampler"] == tuned["sampler"].removesuffix(" (tuned)")), None)
            out.append({"problem": problem, "nfe": nfe, "tuned": tuned["sampler"], "tuned_score": scores[0],
                        "tuned_transport": tuned["transport"], "tune_seconds": tuned["tune_seconds"],
                        "fixed": fixed["sampler"], "fixed_score": scores[1], "fixed_transport": fixed.get("transport"),
                        "ratio": _ratio(*scores), "transport_ratio": _ratio(tuned["transport"], fixed.get("transport")),
                        "own_ratio": own and _ratio(scores[0], floor_score(own, floor, n)),
                        "tuned_wins": best([tuned, fixed], floor, n) is tuned})
    return out


def summarize(rows, opts: QualityOptions) -> dict:
    tuning = {"solvers": list(opts.tuned), "n": opts.tune_n, "held_out": opts.tune_held_out,
              "iterations": opts.tune_iterations, "seed": TUNE_SEED}
    return {"n": opts.n, "nfe": list(opts.nfe), "rows": rows, "verdicts": verdicts(rows, opts.n),
            "tuning": tuning, "tuned_vs_fixed": tuned_against_fixed(rows, opts.n)}


# ---- Markdown and plots ----------------------------------------------------------------------------
def markdown(summary) -> list[str]:
    rows = summary["rows"]
    lines = ["## Quality per model call (exact mixtures)", "",
             f"n = {summary['n']} samples per problem; NFE budgets {summary['nfe']}. Metrics: lower is better.", ""]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        lines += [f"### {problem}", "", f"![quality {problem}](quality_{problem}.png)", ""]
        lines += table(["sampler", "NFE", "weight error", "stray", "spread error", "transport", "tuning s"],
                       [[r["sampler"], r["nfe"] or "—", f"{r['weight_error']:.4f}", f"{r['stray']:.4f}",
                         f"{r['spread_error']:.3f}", fmt(r.get("transport"), ".4f"), fmt(r.get("tune_seconds"), ".1f")]
                        for r in rows if r["problem"] == problem])
        lines.append("")
    lines += ["### Verdict", "", "Score: worst mode metric in units of the floor (<= 2: within twice the floor, "
              "where transport decides). Fixed grids only: tuned rows are compared below.", ""]
    lines += table(["problem", "NFE", "best scoresde", "score", "transport", "best diffusers", "score", "transport",
                    "ours wins"],
                   [[v["problem"], v["nfe"], v["ours"], f"{v['ours_score']:.2f}", fmt(v["ours_transport"], ".4f"),
                     v["theirs"] or "—", fmt(v["theirs_score"], ".2f"), fmt(v["theirs_transport"], ".4f"),
                     "yes" if v["ours_wins"] else "no"] for v in summary["verdicts"]],
                   align="lrlrrlrrc")
    return lines + [""] + _tuned_markdown(summary)


def _tuned_markdown(summary) -> list[str]:
    comparisons, tuning = summary.get("tuned_vs_fixed"), summary.get("tuning")
    if not comparisons:
        return []
    lines = ["### Tuned grids against fixed grids", "",
             f"Tuned rows: `tune_grid` (LD3) for {', '.join(tuning['solvers'])} at the step count of each one's "
             f"fixed-grid row, fitted on {tuning['n']} starting points (and {tuning['held_out']} held out, to pick "
             f"the grid kept) of seed {tuning['seed']}, not the benchmark's x_T, in {tuning['iterations']} "
             "iterations; then sampled from the "
             "benchmark's x_T. Best of each kind as in the verdict (fixed grids: both libraries); ratio = the best "
             "tuned sampler's worst mode metric (score, in floor units) over the best fixed-grid sampler's: below "
             "1, the tuned grid is better; own solver: the same ratio against that solver on its default grid. "
             "Tuning s: the best tuned sampler's tuning wall time.", ""]
    lines += table(["problem", "NFE", "best fixed grid", "score", "transport", "best tuned", "score", "transport",
                    "ratio", "transport ratio", "ratio, own solver", "tuning s", "tuned wins"],
                   [[c["problem"], c["nfe"], c["fixed"], f"{c['fixed_score']:.2f}", fmt(c["fixed_transport"], ".4f"),
                     c["tuned"], f"{c['tuned_score']:.2f}", fmt(c["tuned_transport"], ".4f"), f"{c['ratio']:.2f}",
                     fmt(c["transport_ratio"], ".2f"), fmt(c["own_ratio"], ".2f"), f"{c['tune_seconds']:.1f}",
                     "yes" if c["tuned_wins"] else "no"] for c in comparisons], align="lrlrrlrrrrrrc")
    return lines + [""]


PLOTTED = (*MODE_METRICS, "transport")


def plots(summary, out: Path) -> list[str]:
    """One PNG per problem: each metric against NFE, log-log, a line per sampler, the floor dashed.
    Zeros cannot sit on a log axis: values below one sample's worth (1/n) are drawn at 1/n."""
    from ..plotting import _pyplot

    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    lowest = 1.0 / summary["n"]
    names = []
    for problem in dict.fromkeys(r["problem"] for r in summary["rows"]):
        rows = [r for r in summary["rows"] if r["problem"] == problem]
        floor = next(r for r in rows if r["nfe"] is None)
        samplers = list(dict.fromkeys(r["sampler"] for r in rows if r["nfe"] is not None))
        tuned = {r["sampler"] for r in rows if r.get("tuned")}
        ours = [s for s in samplers if not s.startswith("diffusers") and s not in tuned]
        style = {s: {"color": plt.get_cmap("tab20")(k % 20), "ls": "-", "marker": "o", "ms": 3} for k, s in
                 enumerate(ours)}
        style.update({s: {"color": plt.get_cmap("Dark2")(k % 8), "ls": "--", "marker": "o", "ms": 3}
                      for k, s in enumerate(x for x in samplers if x not in style and x not in tuned)})
        # a tuned grid: its solver's colour a shade darker, dash-dot, thicker, large stars, drawn on top
        def darker(sampler):
            return tuple(0.7 * c for c in style.get(sampler, {"color": (0.3, 0.3, 0.3)})["color"][:3])

        style.update({s: {"color": darker(s.removesuffix(" (tuned)")), "ls": "-.",
                          "lw": 1.8, "marker": "*", "ms": 10, "mec": "black", "mew": 0.6, "zorder": 3}
                      for s in tuned})
        fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
        for ax, metric in zip(axes.flat, PLOTTED, strict=True):
            for sampler in samplers:
                points = sorted((r["nfe"], max(r[metric], lowest)) for r in rows
                                if r["sampler"] == sampler and metric in r)
                if points:
                    ax.plot(*zip(*points), label=sampler, **{"lw": 1.2, **style[sampler]})
            if metric in MODE_METRICS:
                ax.axhline(max(floor[metric], lowest), color="black", ls=":", lw=2, label="floor (n samples)")
            ax.set(xscale="log", yscale="log", xlabel="NFE (model calls)", ylabel=metric.replace("_", " "))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(ScalarFormatter())
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
        fig.suptitle(f"{problem}: error against NFE, log-log (n = {summary['n']}; solid: scoresde, dashed: "
                     f"diffusers, stars: tuned grids; values under 1/n drawn at 1/n)")
        fig.tight_layout(rect=(0, 0, 0.8, 1))
        name = f"quality_{problem}.png"
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        names.append(name)
    return names


def main(argv=None):
    """The quality part alone (the old `python benchmarks/quality.py` command)."""
    from . import suite

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--out", default="results/quality")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tuned", nargs="*", default=list(TUNED), choices=sorted(sd.SOLVERS), metavar="SOLVER",
                        help="deterministic fixed-step solvers with tuned-grid rows (default: %(default)s; "
                             "none: --tuned alone)")
    args = parser.parse_args(argv)
    return suite.run_parts({"quality": QualityOptions(tuple(args.nfe), args.n, tuple(args.tuned))}, out=args.out,
                           threads=args.threads, command="python benchmarks/quality.py", argv=argv)
