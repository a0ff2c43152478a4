"""The shipped digits model at few model calls: its shipped tuned grids against every fixed grid.

    python benchmarks/tuned_digits.py [--n 2000] [--out results/tuned_digits]

For each shipped tuned grid (unipc at NFE 5, 8, 10) and each fixed grid of the same solver and step
count, from the same n starting points: the RMS distance to the teacher (dopri5, rtol = atol = 1e-5,
the teacher the grids were tuned against, final denoising step included), the Fréchet distance to
the 1,797 real digits in the shipped digits classifier's 64 features (`scoresde.metrics`), and the
same on the raw 64 pixels (model units). The teacher's own row gives the floor the few-call
samplers approach.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import scoresde as sd
from scoresde.metrics import FeatureStats, digits_features, frechet_distance
from scoresde.train.data import load_data


def frechet(x: torch.Tensor, y: torch.Tensor) -> float:
    """The Fréchet distance between two sets of images on their raw pixels."""
    return frechet_distance(*(FeatureStats(x[0].numel()).update(v.flatten(1)) for v in (x, y)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="samples per row")
    parser.add_argument("--seed", type=int, default=123, help="seeds the starting points (not those tuned on)")
    parser.add_argument("--out", default="results/tuned_digits")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = sd.load_model()
    real = load_data("digits").x
    real_features = digits_features(real)
    x_T = torch.randn((args.n, *model.sample_shape), generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    teacher, info = sd.sample(model.denoiser, model.sde, x_T=x_T, solver="dopri5", rtol=1e-5, atol=1e-5,
                              return_info=True)
    rows = [{"grid": "teacher (dopri5)", "nfe": info.nfe, "to_teacher": 0.0, "frechet_pixels": frechet(teacher, real),
             "frechet_features": frechet_distance(real_features, digits_features(teacher)),
             "seconds": time.perf_counter() - start}]
    for path in sorted(model.tuned_grids(), key=lambda p: sd.TunedGrid.load(p).nfe):
        tuned = sd.TunedGrid.load(path)
        grids = {"tuned": tuned, **{name: fn(model.sde, tuned.steps, model.sde.T, model.sde.t_min)
                                    for name, fn in sd.GRIDS.items()}}
        for name, grid in grids.items():
            start = time.perf_counter()
            x, info = sd.sample(model.denoiser, model.sde, x_T=x_T, solver=tuned.solver, grid=grid, return_info=True)
            rows.append({"grid": name, "solver": tuned.solver, "nfe": info.nfe,
                         "to_teacher": float((x - teacher).flatten(1).pow(2).mean(1).sqrt().mean()),
                         "frechet_pixels": frechet(x, real),
                         "frechet_features": frechet_distance(real_features, digits_features(x)),
                         "seconds": time.perf_counter() - start})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| solver | grid | NFE | RMS distance to the teacher | Fréchet distance (features) | Fréchet distance "
             "(pixels) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.get('solver', '')} | {r['grid']} | {r['nfe']} | {r['to_teacher']:.4f} | "
              f"{r['frechet_features']:.2f} | {r['frechet_pixels']:.3f} |" for r in rows]
    meta = {"command": "python benchmarks/tuned_digits.py " + " ".join(argv or []), "n": args.n,
            "load_average": os.getloadavg()[0], "threads": 1}
    (out / "tuned_digits.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "tuned_digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
