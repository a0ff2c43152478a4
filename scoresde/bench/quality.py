"""Quality per model call: every scoresde solver and diffusers' schedulers on exact Gaussian
mixtures, at equal NFE, from the same x_T.

    scoresde bench --only quality            (or: python benchmarks/quality.py [--nfe 5 10 20 50] [--n 4000])

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


@dataclass(frozen=True)
class QualityOptions:
    nfe: tuple[int, ...] = (5, 10, 20, 50)
    n: int = 4000  # samples per problem


def options(profile: str, env) -> QualityOptions:
    return {"tiny": QualityOptions((5,), 200), "quick": QualityOptions((5, 10, 20), 1000)}.get(
        profile, QualityOptions())


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


def our_runs(mixture, sde, x_T, nfe):
    """Every registered solver at the largest step count within `nfe` model calls."""
    configs = [(name, None) for name in sd.SOLVERS] + [(name, "karras") for name in KARRAS_VARIANTS]
    for name, grid in configs:
        spec = sd.SOLVERS[name]
        steps = (nfe - 1) // spec.nfe_per_step
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


def units(opts: QualityOptions, env):
    """(label, run) pairs for the suite; each run returns rows."""
    sde = sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, N_TRAIN, dtype=F64))
    out = []
    for name, mixture in problems(sde).items():
        problem = _Problem(name, mixture, opts.n)
        out.append((f"quality {name}: reference", partial(_floor_rows, problem)))
        out += [(f"quality {name}: NFE {nfe}", partial(_nfe_rows, problem, nfe, env.peers.get("diffusers")))
                for nfe in opts.nfe]
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
    """Per problem and NFE budget: the best sampler of each library and whether ours wins."""
    out = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        mine = [r for r in rows if r["problem"] == problem]
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


def summarize(rows, opts: QualityOptions) -> dict:
    return {"n": opts.n, "nfe": list(opts.nfe), "rows": rows, "verdicts": verdicts(rows, opts.n)}


# ---- Markdown and plots ----------------------------------------------------------------------------
def markdown(summary) -> list[str]:
    rows = summary["rows"]
    lines = ["## Quality per model call (exact mixtures)", "",
             f"n = {summary['n']} samples per problem; NFE budgets {summary['nfe']}. Metrics: lower is better.", ""]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        lines += [f"### {problem}", "", f"![quality {problem}](quality_{problem}.png)", ""]
        lines += table(["sampler", "NFE", "weight error", "stray", "spread error", "transport"],
                       [[r["sampler"], r["nfe"] or "—", f"{r['weight_error']:.4f}", f"{r['stray']:.4f}",
                         f"{r['spread_error']:.3f}", fmt(r.get("transport"), ".4f")]
                        for r in rows if r["problem"] == problem])
        lines.append("")
    lines += ["### Verdict", "", "Score: worst mode metric in units of the floor (<= 2: within twice the floor, "
              "where transport decides).", ""]
    lines += table(["problem", "NFE", "best scoresde", "score", "transport", "best diffusers", "score", "transport",
                    "ours wins"],
                   [[v["problem"], v["nfe"], v["ours"], f"{v['ours_score']:.2f}", fmt(v["ours_transport"], ".4f"),
                     v["theirs"] or "—", fmt(v["theirs_score"], ".2f"), fmt(v["theirs_transport"], ".4f"),
                     "yes" if v["ours_wins"] else "no"] for v in summary["verdicts"]],
                   align="lrlrrlrrc")
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
        ours = [s for s in samplers if not s.startswith("diffusers")]
        style = {s: {"color": plt.get_cmap("tab20")(k % 20), "ls": "-"} for k, s in enumerate(ours)}
        style.update({s: {"color": plt.get_cmap("Dark2")(k % 8), "ls": "--"}
                      for k, s in enumerate(x for x in samplers if x not in style)})
        fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
        for ax, metric in zip(axes.flat, PLOTTED, strict=True):
            for sampler in samplers:
                points = sorted((r["nfe"], max(r[metric], lowest)) for r in rows
                                if r["sampler"] == sampler and metric in r)
                if points:
                    ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, label=sampler, **style[sampler])
            if metric in MODE_METRICS:
                ax.axhline(max(floor[metric], lowest), color="black", ls=":", lw=2, label="floor (n samples)")
            ax.set(xscale="log", yscale="log", xlabel="NFE (model calls)", ylabel=metric.replace("_", " "))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(ScalarFormatter())
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
        fig.suptitle(f"{problem}: error against NFE, log-log (n = {summary['n']}; solid: scoresde, dashed: "
                     f"diffusers; values under 1/n drawn at 1/n)")
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
    args = parser.parse_args(argv)
    return suite.run_parts({"quality": QualityOptions(tuple(args.nfe), args.n)}, out=args.out,
                           threads=args.threads, command="python benchmarks/quality.py", argv=argv)
