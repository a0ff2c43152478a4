"""Train a small model on the two-moons toy set, then draw sampling trajectories (ODE and SDE) over it.

Training goes through the library's own loop (`scoresde.train.train`, what `scoresde train`
runs) with the toy2d preset, shrunk to train in about 15 s on a CPU: a narrower MLP,
fewer steps, a shorter EMA. The run's checkpoint is written to a temporary folder and read
back with `sd.load_model`, as any trained model would be.

Sampling runs the same 100 prior draws through the probability-flow ODE (Heun's method) and
through the reverse SDE (Euler-Maruyama); `sd.sample`'s `callback(i, t, x)` sees the state after
every step, which is all a trajectory needs. The picture shows paths from the Gaussian prior
(grey dots) to the samples (blue) over the training data (light red): smooth curves for the ODE,
jittering ones for the SDE, ending on the same distribution.

Run (about 20 s on a CPU, most of it training):

    python examples/toy2d_trajectories.py             # writes toy2d_trajectories.png
    python examples/toy2d_trajectories.py --data swissroll --train-steps 3000 --out swissroll.png
"""
import argparse
import tempfile

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt
import torch

import scoresde as sd
from scoresde.train import load_data, preset, train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", default="moons", choices=("moons", "swissroll"))
parser.add_argument("--train-steps", type=int, default=1500, help="optimizer steps")
parser.add_argument("--paths", type=int, default=100, help="trajectories to draw")
parser.add_argument("--steps", type=int, default=20, help="Heun steps of the ODE (the SDE takes 5x as many)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="toy2d_trajectories.png", help="the PNG to write")
args = parser.parse_args()

# ---- train: the toy2d preset, made small and short ----------------------------------------------
config = preset("toy2d")
config.data = args.data                               # standardised 2-D points (scoresde/train/data.py)
config.model_overrides = {"hidden": 128, "layers": 3}  # the preset's MLP is 256 wide, 4 deep
config.steps, config.batch_size, config.lr = args.train_steps, 256, 2e-3
config.warmup, config.ema_decay = 50, 0.99            # a short run wants a short EMA
config.sample_every = config.ckpt_every = config.steps  # no intermediate pictures or checkpoints
config.log_every, config.seed = 500, args.seed
with tempfile.TemporaryDirectory() as run_dir:
    config.out = run_dir
    checkpoint = train(config)                        # returns the last checkpoint's folder
    model = sd.load_model(checkpoint)                 # its EMA weights, schedule and data units

# ---- sample, recording the state after every step -------------------------------------------------
def trajectories(solver, steps, x_T):
    """Run `solver` from x_T and return every state it passed through: (steps + 2, paths, 2)."""
    path = [x_T]
    with torch.no_grad():
        x = sd.sample(model.denoiser, model.sde, x_T=x_T, solver=solver, steps=steps,
                      generator=torch.Generator().manual_seed(args.seed),  # the SDE's noise
                      callback=lambda i, t, x_now: path.append(x_now.clone()))
    path.append(x)  # after the final denoising step: x0 predicted at t_end
    return torch.stack(path)


x_T = torch.randn(args.paths, 2, generator=torch.Generator().manual_seed(args.seed))
runs = {  # the same starting points through the deterministic ODE and the stochastic reverse SDE
    f"probability-flow ODE, heun, {args.steps} steps": trajectories("heun", args.steps, x_T),
    f"reverse SDE, euler_maruyama, {5 * args.steps} steps": trajectories("euler_maruyama", 5 * args.steps, x_T),
}

# How well do samples sit on the data? Distance from each sample to its nearest training point.
data = load_data(args.data, seed=args.seed).x
print(f"{args.data}: {len(data)} training points; {args.paths} trajectories from the same x_T per solver")
for title, path in runs.items():
    nearest = torch.cdist(path[-1], data).min(1).values
    print(f"{title}: {len(path)} states; samples within 0.1 of a training point: "
          f"{(nearest < 0.1).float().mean():.0%} (median distance {nearest.median():.3f}; the data's scale is 1)")

# ---- the picture: one panel per solver ---------------------------------------------------------------
fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 6), dpi=100)
for ax, (title, path), lines in zip(axes, runs.items(), (args.paths, 8)):  # SDE paths are busy: 8 of them
    ax.scatter(data[:, 0], data[:, 1], s=2, color="tab:red", alpha=0.15, label="training data")
    ax.plot(path[:, :lines, 0], path[:, :lines, 1], color="black", alpha=0.3, linewidth=0.7)  # a line per path
    ax.scatter(path[0, :, 0], path[0, :, 1], s=8, color="grey", label="x_T (prior)")
    ax.scatter(path[-1, :, 0], path[-1, :, 1], s=10, color="tab:blue", label="samples")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
fig.tight_layout()
fig.savefig(args.out)  # 1200 x 600 pixels
print(f"wrote {args.out}")
