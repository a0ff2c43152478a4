"""A learned time grid against the fixed ones: unipc on the exact sharp 2-D ring at 5 model calls.

    python benchmarks/tuned_grids.py --out docs/img/tuned_grids.png
    python benchmarks/tuned_grids.py --cost       (tune_grid's wall time at NFE 5 and 10 instead)

Tunes unipc's grid with `tune_grid` (LD3, Tong et al. 2025) at its defaults, on starting points of
seed 0, then draws (a) the four fixed grids and the tuned one as points on the half log-SNR axis,
one row per grid, with each grid's held-out distance to the teacher, and (b) samples from the same
fresh starting points (seed 1, never tuned on) on the best fixed grid and on the tuned grid, beside
exact samples of the ring. The best fixed grid is the one with the smallest worst mode metric (the
larger of the stray mass and the largest error of a mode's weight) on those fresh samples.
Runs in a few seconds on one CPU thread.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import scoresde as sd
from scoresde.plotting import _pyplot

F64 = torch.float64
SOLVER, NFE, N = "unipc", 5, 2000


def worst_mode_metric(ring, x) -> tuple[float, float, float]:
    """(the larger of the two, stray mass, largest error of a mode's weight)."""
    report = ring.mode_report(x)
    weight = float((report["weights"] - ring.weights).abs().max())
    return max(report["stray"], weight), report["stray"], weight


def cost(repeats: int = 3):
    """tune_grid's wall time for unipc on the ring at its defaults (float32), NFE 5 and 10, in this
    process: the first call also pays one-time imports (torch.optim pulls in torch._dynamo)."""
    sde = sd.VPSDE.linear()
    ring = sd.GaussianMixture.ring2d(sde)
    for k in range(repeats):
        for nfe in (5, 10):
            tuned = sd.tune_grid(ring, sde, solver=SOLVER, nfe=nfe, shape=(2,),
                                 generator=torch.Generator().manual_seed(0))
            start = tuned.validation["initial"]
            print(f"round {k + 1}: {SOLVER} at NFE {nfe}: {tuned.seconds:.2f} s; held-out distance to the teacher "
                  f"{tuned.validation['fixed'][start]:.4f} ({start}) -> {tuned.validation['tuned']:.4f}; "
                  f"teacher {tuned.teacher}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/tuned_grids.png", help="the PNG to write")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--cost", action="store_true", help="time tune_grid at NFE 5 and 10 instead of plotting")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cost:
        cost()
        return 0
    started = time.perf_counter()

    sde = sd.VPSDE.linear()
    ring = sd.GaussianMixture.ring2d(sde)
    tuned = sd.tune_grid(ring, sde, solver=SOLVER, nfe=NFE, shape=(2,), dtype=F64,
                         generator=torch.Generator().manual_seed(0))
    grids = {name: grid(sde, tuned.steps, sde.T, sde.t_min) for name, grid in sd.GRIDS.items()}
    x_T = torch.randn(N, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    samples = {name: sd.sample(ring, sde, x_T=x_T, solver=SOLVER, grid=times) for name, times in grids.items()}
    scores = {name: worst_mode_metric(ring, x) for name, x in samples.items()}
    best = min(scores, key=lambda name: scores[name][0])
    tuned_x = sd.sample(ring, sde, x_T=x_T, solver=SOLVER, grid=tuned)
    tuned_score = worst_mode_metric(ring, tuned_x)
    exact = ring.sample(N, generator=torch.Generator().manual_seed(2), dtype=F64)

    plt = _pyplot()
    fig = plt.figure(figsize=(12, 6.6))
    top = fig.add_gridspec(2, 3, height_ratios=(1, 1.25), hspace=0.45, wspace=0.25)
    ax = fig.add_subplot(top[0, :])
    rows = {**grids, "tuned": tuned.times}
    distance = {**tuned.validation["fixed"], "tuned": tuned.validation["tuned"]}
    for k, (name, times) in enumerate(rows.items()):
        lam = sde.log_snr(times).numpy()
        color = "crimson" if name == "tuned" else "tab:blue"
        ax.plot(lam, [k] * len(lam), color=color, lw=0.8, alpha=0.5)
        ax.plot(lam, [k] * len(lam), "o" if name != "tuned" else "*", color=color, ms=7 if name != "tuned" else 12)
        ax.annotate(f"to the teacher: {distance[name]:.3f}", (1.01, k), xycoords=("axes fraction", "data"),
                    va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("half log-SNR  λ(t) = log(α/σ)   (noise on the left, data on the right)")
    ax.set_title(f"(a) the {tuned.steps + 1} times of {SOLVER}'s grid at {NFE} model calls; tuning started from "
                 f"{tuned.validation['initial']}, took {tuned.seconds:.1f} s", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)

    panels = [(f"best fixed grid ({best})", samples[best], scores[best]), ("tuned grid", tuned_x, tuned_score),
              ("exact ring", exact, worst_mode_metric(ring, exact))]
    for j, (title, x, (_, stray, weight)) in enumerate(panels):
        axj = fig.add_subplot(top[1, j])
        axj.scatter(*x.T.numpy(), s=1.5, alpha=0.4, color="crimson" if title == "tuned grid" else "tab:blue")
        axj.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), aspect="equal", xticks=[], yticks=[])
        axj.set_title(f"{'(b) ' if j == 0 else ''}{title}\nstray {stray:.3f}, weight error {weight:.3f}", fontsize=10)
    fig.suptitle(f"{SOLVER} at {NFE} model calls on the exact sharp ring (n = {N} fresh starting points)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"{SOLVER} at NFE {NFE}: worst mode metric {scores[best][0]:.4f} on the best fixed grid ({best}), "
          f"{tuned_score[0]:.4f} on the tuned grid; tuning {tuned.seconds:.1f} s; wrote {out} in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
