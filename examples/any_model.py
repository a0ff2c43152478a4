"""One model, four conventions: the same Gaussian mixture written as a k-diffusion/EDM sigma-denoiser,
a flow-matching velocity field, a variance-exploding score network (NCSN++'s interface) and a
sub-VP noise predictor, each sampled by one call of the library's solver through its adapter.

Every Gaussian path x = a(t) x0 + s(t) eps is the VP path in disguise: at equal half log-SNR
log(a/s) the states differ by the scale sqrt(a^2 + s^2), and x0 and eps are the same. So every
adapter's samples equal the VP model's, to round-off, from the same x_T. The "networks" below are
the mixture's exact predictions written in each convention's own terms.

Run (about 2 s on a CPU):

    python examples/any_model.py                    # writes any_model.png: the four sample sets
    python examples/any_model.py --solver unipc --steps 5 --out few_steps.png
"""
import argparse
import math

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt
import torch

import scoresde as sd
from scoresde import paths

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--solver", default="dpm_solver_pp_2m")
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--n", type=int, default=2000)
parser.add_argument("--out", default="any_model.png")
args = parser.parse_args()

sde = sd.VPSDE.linear(beta_max=18.0)  # its noisiest point lies inside every path below
mixture = sd.GaussianMixture(sde, [1.0, 2.0, 3.0], [[0.8, 0.1], [-0.5, 0.6], [0.0, -0.9]], 0.15)


def posterior(x, a, s):
    """E[x0 | x] and the score of the mixture's marginal on the path x = a x0 + s eps (a, s: (batch,))."""
    a, s = a.reshape(-1, 1, 1), s.reshape(-1, 1, 1)
    var = a**2 * mixture.stds.reshape(1, -1, 1) ** 2 + s**2
    diff = x[:, None, :] - a * mixture.means[None]
    log_p = (torch.log(mixture.weights)[None, :, None] - 0.5 * diff.pow(2).sum(-1, keepdim=True) / var
             - 0.5 * x.shape[1] * torch.log(2 * math.pi * var))
    r = torch.softmax(log_p, dim=1)
    x0 = (r * (mixture.means[None] + a * mixture.stds.reshape(1, -1, 1) ** 2 / var * diff)).sum(1)
    return x0, (r * (-diff / var)).sum(1)


ve, subvp = paths.ve(0.002, 200.0), paths.subvp(0.1, 20.0)
models = {
    # k-diffusion / EDM: denoiser(x, sigma) -> x0, with x = x0 + sigma eps
    "sigma-denoiser": sd.Denoiser.from_sigma(lambda x, sigma: posterior(x, torch.ones_like(sigma), sigma)[0], sde),
    # rectified flow: v(x, t) = eps - x0, with x = (1 - t) x0 + t eps
    "flow matching": sd.Denoiser.from_flow(
        lambda x, t: (lambda x0, score: -t[:, None] * score - x0)(*posterior(x, 1 - t, t)), sde),
    # NCSN++ on the VE SDE: score(x, sigma)
    "VE score": sd.Denoiser.from_path(lambda x, sigma: posterior(x, torch.ones_like(sigma), sigma)[1], sde, ve,
                                      prediction="score", time="sigma"),
    # score_sde's sub-VP SDE with a noise predictor: eps(x, t) = -s(t) score
    "sub-VP eps": sd.Denoiser.from_path(lambda x, t: -subvp.s(t)[:, None] * posterior(x, subvp.a(t), subvp.s(t))[1],
                                        sde, subvp, prediction="eps"),
}

x_T = torch.randn(args.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
reference = sd.sample(mixture, sde, x_T=x_T, solver=args.solver, steps=args.steps)
fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4))
for ax, (name, model) in zip(axes, models.items()):
    x, info = sd.sample(model, sde, x_T=x_T, solver=args.solver, steps=args.steps, return_info=True)
    gap = float((x - reference).abs().max())
    print(f"{name:15s} {args.solver} NFE={info.nfe} largest difference from the VP model: {gap:.2e}")
    ax.scatter(*x.T, s=2, alpha=0.4)
    ax.set(title=f"{name}\n{args.solver}, {info.nfe} model calls", xlim=(-1.6, 1.6), ylim=(-1.6, 1.6), aspect="equal")
fig.tight_layout()
fig.savefig(args.out, dpi=80)
print(f"wrote {args.out}")
