"""Which fixed grid should the stochastic solvers default to? Sliced Wasserstein-2 distance to exact
samples on the benchmark's two sharp mixtures (the 2-D ring and the 16-D four-mode mixture), on
Ho et al.'s 1000-step chain, for every grid at NFE 10, 20 and 50.

    python benchmarks/stochastic_grids.py [--n 4000] [--seeds 3] [--out results/stochastic_grids]

--tuned adds a column: the grid `tune_grid` learns for `ddim` (eta = 0, its deterministic counterpart)
at the same step count, handed to the stochastic solver (ancestral only: one call per step, as ddim).

Sliced W2: the root-mean-square over 256 random unit directions of the 1-D W2 distance between the
projected samples and as many exact samples (sorted, matched). The "floor" is the same distance
between two sets of exact samples: what n samples cannot resolve. Each cell averages `--seeds` runs.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import scoresde as sd
from scoresde.bench.quality import problems

F64 = torch.float64
SOLVERS = ("ancestral", "euler_maruyama", "dpm_solver_pp_2m_sde", "pc")


def sliced_w2(x: torch.Tensor, y: torch.Tensor, directions: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equally large sample sets (Rabin et al. 2011)."""
    d = torch.randn(x.shape[1], directions, generator=torch.Generator().manual_seed(seed), dtype=F64)
    d /= d.norm(dim=0)
    a, _ = (x.to(F64) @ d).sort(0)
    b, _ = (y.to(F64) @ d).sort(0)
    return float((a - b).pow(2).mean().sqrt())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--out", default="results/stochastic_grids")
    parser.add_argument("--tuned", action="store_true", help="also ancestral on a grid tuned for ddim")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sde = sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    results = {"meta": {"command": "python benchmarks/stochastic_grids.py " + " ".join(argv or []), "n": args.n,
                        "seeds": args.seeds, "load_average": os.getloadavg()[0]}, "floor": {}, "rows": []}
    columns = list(sd.GRIDS) + (["tuned (ddim)"] if args.tuned else [])
    lines = ["| problem | solver | NFE | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for name, mixture in problems(sde).items():
        exact = mixture.sample(args.n, generator=torch.Generator().manual_seed(5)).to(F64)
        floor = sum(sliced_w2(mixture.sample(args.n, generator=torch.Generator().manual_seed(50 + s)), exact, seed=s)
                    for s in range(args.seeds)) / args.seeds
        results["floor"][name] = floor
        for solver in SOLVERS:
            spec = sd.SOLVERS[solver]
            for nfe in args.nfe:
                steps = (nfe - 1) // spec.nfe_per_step
                row = {"problem": name, "solver": solver, "nfe": steps * spec.nfe_per_step + 1}
                grids = dict(sd.GRIDS)
                if args.tuned and solver == "ancestral":
                    grids["tuned (ddim)"] = sd.tune_grid(mixture, sde, solver="ddim", nfe=steps + 1, shape=(mixture.dim,),
                                                         dtype=F64, generator=torch.Generator().manual_seed(1)).times
                for grid in grids:
                    runs = [sliced_w2(sd.sample(mixture, sde, shape=(args.n, mixture.dim), dtype=F64, solver=solver,
                                                steps=steps, grid=grids[grid] if grid not in sd.GRIDS else grid,
                                                generator=torch.Generator().manual_seed(10 + s)),
                                      exact, seed=s) for s in range(args.seeds)]
                    row[grid] = sum(runs) / len(runs)
                results["rows"].append(row)
                best = min(sd.GRIDS, key=row.get)
                cells = [f"**{row[g]:.4f}**" if g == best else f"{row[g]:.4f}" for g in sd.GRIDS]
                cells += [f"{row['tuned (ddim)']:.4f}" if "tuned (ddim)" in row else "—"] if args.tuned else []
                lines.append(f"| {name} (floor {floor:.4f}) | {solver} | {row['nfe']} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stochastic_grids.json").write_text(json.dumps(results, indent=1))
    (out / "stochastic_grids.md").write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
