"""Three fast solvers on the shipped digits model, at the same budget of 10 model calls.

Every solver starts from the same noise (the same seed), so what differs between the three
pictures is the solver alone. At a budget of NFE model calls a one-call-per-step solver gets
steps = NFE - 1: the final denoising step (x0 predicted at t_end) costs one more call.
`return_info=True` reports the calls the run actually made.

Run (about 5 s on a CPU):

    python examples/compare_solvers.py                # writes compare_solvers.png
    python examples/compare_solvers.py --nfe 20 --seed 3 --out more_steps.png
"""
import argparse
import time

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt
import torch

import scoresde as sd
from scoresde.plotting import image_grid

SOLVERS = ("ddim", "dpm_solver_pp_2m", "unipc")  # each calls the model once per step

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--nfe", type=int, default=10, help="model calls per solver, final denoising included")
parser.add_argument("--n", type=int, default=36, help="digits per grid")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="compare_solvers.png", help="the PNG to write")
args = parser.parse_args()

# The shipped model: a Denoiser, its VP-SDE and how to map samples back to pixel values 0..16.
model = sd.load_model()
low, high = model.config["data"]["data_range"]  # (0, 16) for the digits

fig, axes = plt.subplots(1, len(SOLVERS), figsize=(3 * len(SOLVERS), 3.5), dpi=100)
fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.8, wspace=0.05)
for ax, solver in zip(axes, SOLVERS):
    start = time.perf_counter()
    with torch.no_grad():
        x, info = sd.sample(model.denoiser, model.sde, shape=(args.n, *model.sample_shape), solver=solver,
                            steps=args.nfe - 1, generator=torch.Generator().manual_seed(args.seed),
                            return_info=True)
    seconds = time.perf_counter() - start
    pixels = model.to_data_units(x)  # model units [-1, 1] -> the digits' 0..16
    print(f"{solver:<17} steps={info.steps} NFE={info.nfe} wall={seconds:.2f}s "
          f"mean pixel={pixels.mean():.2f} (real digits: 4.88)")

    grid = image_grid((pixels - low) / (high - low))  # one (1, H, W) image in [0, 1]
    ax.imshow(grid[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"{solver}\n{info.nfe} model calls", fontsize=10)
    ax.axis("off")

fig.suptitle(f"the same noise (seed {args.seed}), three solvers", fontsize=11)
fig.savefig(args.out)  # fixed figure size and dpi: a 900 x 350 pixel PNG for three solvers
print(f"wrote {args.out}")
