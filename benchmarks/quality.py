"""Quality per model call: every scoresde solver and diffusers' schedulers on exact Gaussian
mixtures, at equal NFE, from the same x_T.

    python benchmarks/quality.py [--nfe 5 10 20 50] [--n 4000] [--out results/quality]

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
import json
import math
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

import scoresde as sd

F64 = torch.float64
N_TRAIN = 1000


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--out", default="results/quality")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import diffusers
    except ImportError:
        diffusers = None
        print("diffusers is not installed: its schedulers are skipped")
    betas = torch.linspace(1e-4, 0.02, N_TRAIN, dtype=F64)
    sde = sd.VPSDE.from_betas(betas)
    rows, start = [], time.perf_counter()
    for problem, mixture in problems(sde).items():
        x_T = torch.randn((args.n, mixture.dim), generator=torch.Generator().manual_seed(0), dtype=F64)
        reference = sd.sample(mixture, sde, x_T=x_T, solver="dopri5", rtol=1e-8, atol=1e-8)
        expected = expected_spread(mixture, sde, sde.t_min)
        rows.append({"problem": problem, "sampler": "floor (reference)", "nfe": None,
                     **metrics(mixture, reference, expected, reference)})
        cases = [(nfe, run) for nfe in args.nfe for run in ("ours", "diffusers")]
        for nfe, side in tqdm(cases, desc=problem):
            runs = our_runs(mixture, sde, x_T, nfe) if side == "ours" else (
                diffusers_runs(diffusers, mixture, x_T, nfe) if diffusers else [])
            for name, x, calls, deterministic in runs:
                rows.append({"problem": problem, "sampler": name, "nfe_budget": nfe, "nfe": calls,
                             **metrics(mixture, x, expected, reference if deterministic else None)})
    write(rows, args, time.perf_counter() - start)


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


def write(rows, args, seconds):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=1))
    lines = [f"Command: `python benchmarks/quality.py --nfe {' '.join(map(str, args.nfe))} --n {args.n}`; "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {seconds:.0f} s.", ""]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        lines += [f"### {problem}", "", "| sampler | NFE | weight error | stray | spread error | transport |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["problem"] == problem):
            transport = f"{r['transport']:.4f}" if "transport" in r else "—"
            lines.append(f"| {r['sampler']} | {r['nfe'] or '—'} | {r['weight_error']:.4f} | {r['stray']:.4f} | "
                         f"{r['spread_error']:.3f} | {transport} |")
        lines.append("")
    lines += ["### Verdict", "", "Score: worst mode metric in units of the floor (<= 2: within twice the floor, "
              "where transport decides).", "",
              "| problem | NFE | best scoresde | score | transport | best diffusers | score | transport | ours wins |",
              "|---|---:|---|---:|---:|---|---:|---:|:---:|"]
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for v in verdicts(rows, args.n):
        lines.append(f"| {v['problem']} | {v['nfe']} | {v['ours']} | {v['ours_score']:.2f} | "
                     f"{fmt(v['ours_transport'], '.4f')} | {v['theirs'] or '—'} | {fmt(v['theirs_score'], '.2f')} | "
                     f"{fmt(v['theirs_transport'], '.4f')} | {'yes' if v['ours_wins'] else 'no'} |")
    text = "\n".join(lines)
    (out / "quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
