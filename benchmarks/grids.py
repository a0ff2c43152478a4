"""Which time grid gives the best samples at a given step count? Measures every fixed-step solver
on every grid against the exact sharp 2-D mixture, and writes a Markdown table.

    python benchmarks/grids.py [--n 20000] [--nfe 20 100] [--out results/grids]

Metrics (lower is better): the largest error of a mode's weight, the stray mass between modes,
and the worst relative error of a mode's spread against its exact value (with the final
denoising step, a mode of std c comes out with std c^2 / sqrt(c^2 + s^2), s = sigma/alpha at t_end).
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch
from tqdm import tqdm

import scoresde as sd


def measure(sde, mixture, solver, grid, nfe, n, seed=0):
    spec = sd.SOLVERS[solver]
    steps = max(1, (nfe - 1) // spec.nfe_per_step)
    x, info = sd.sample(mixture, sde, shape=(n, 2), solver=solver, steps=steps, grid=grid,
                        generator=torch.Generator().manual_seed(seed), return_info=True)
    report = mixture.mode_report(x)
    s_end = float(torch.exp(-sde.log_snr(info.times[-1])))
    c = mixture.stds
    expected = c / torch.sqrt(c**2 + s_end**2)  # std ratio of x0_hat at t_end, per mode
    return {
        "solver": solver, "grid": grid, "nfe": info.nfe,
        "weight_error": (report["weights"] - mixture.weights).abs().max().item(),
        "stray": report["stray"],
        "spread_error": (report["std_ratio"] / expected - 1).abs().max().item(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--nfe", type=int, nargs="+", default=[21, 101])
    parser.add_argument("--out", default="results/grids")
    args = parser.parse_args()
    sde = sd.VPSDE.linear()
    mixture = sd.GaussianMixture.ring2d(sde)
    solvers = [name for name, spec in sd.SOLVERS.items() if not spec.adaptive and name != "torchsde"]
    cases = [(s, g, nfe) for nfe in args.nfe for s in solvers for g in sd.GRIDS]
    rows = [measure(sde, mixture, s, g, nfe, args.n) for s, g, nfe in tqdm(cases, desc="grids")]

    lines = [f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}; "
             f"n = {args.n} samples of `GaussianMixture.ring2d` (linear VP-SDE).", "",
             "| solver | NFE | " + " | ".join(sd.GRIDS) + " |", "|---|---|" + "---|" * len(sd.GRIDS)]
    for nfe in args.nfe:
        for s in solvers:
            cells = []
            for g in sd.GRIDS:
                r = next(r for r in rows if r["solver"] == s and r["grid"] == g and r["nfe"] <= nfe
                         and r["nfe"] > nfe - 1 - sd.SOLVERS[s].nfe_per_step)
                cells.append(f"{r['spread_error']:.3f} / {r['stray']:.4f} / {r['weight_error']:.3f}")
            lines.append(f"| {s} | {r['nfe']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grids.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "grids.md"), "w") as f:
        f.write("Cells: spread error / stray mass / weight error.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
