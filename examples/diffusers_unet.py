"""Sample a diffusers UNet2DModel with scoresde's solvers.

A network trained with diffusers' DDPMScheduler predicts eps and takes the 0-based step index
n - 1 of a discrete chain of N steps as its time. `sd.Denoiser(..., time_input="index")` does
that conversion (continuous t = n/N -> index n - 1) and unwraps the `UNet2DOutput` diffusers
returns (its `.sample` tensor), so every solver of ours can drive the network. The UNet here has
random weights (no download): the point is the plumbing, so the samples are noise. With a
trained one, `UNet2DModel.from_pretrained(...)` replaces the constructor and nothing else changes.

Run (about 10 s on a CPU; needs diffusers: `pip install diffusers`, or the `bench` extra):

    python examples/diffusers_unet.py                 # writes diffusers_unet.json
    python examples/diffusers_unet.py --n 8 --out numbers.json
"""
import argparse
import json
import sys
import time

import torch

import scoresde as sd

try:
    from diffusers import UNet2DModel
except ImportError:
    sys.exit("this example needs diffusers: pip install diffusers  (or: pip install -e '.[bench]')")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--n", type=int, default=4, help="images per run")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="diffusers_unet.json", help="where to write the runs' numbers (JSON)")
args = parser.parse_args()

# A small UNet2DModel (3 x 16 x 16 images) with random weights, seeded so runs repeat.
torch.manual_seed(args.seed)
unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                   block_out_channels=(32, 64), norm_num_groups=8,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
print(f"UNet2DModel: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters (random weights)")

# The DDPM chain it would have been trained on (Ho et al. 2020): 1000 steps, betas 1e-4 .. 0.02.
sde = sd.VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000))
net = sd.Denoiser(unet, sde, prediction="eps", time_input="index")

# What the Denoiser handles: diffusers returns an output object, not a tensor, and wants an index.
x = torch.randn(args.n, 3, 16, 16, generator=torch.Generator().manual_seed(args.seed))
with torch.no_grad():
    raw = unet(x, torch.full((args.n,), 499))          # step n = 500 of 1000, index 499
    eps = net(x, 500 / 1000)                           # the same call, through the Denoiser at t = 0.5
difference = (raw.sample - eps).abs().max().item()
print(f"unet(x, 499) returns {type(raw).__name__}; its .sample has shape {tuple(raw.sample.shape)}")
print(f"Denoiser at t=0.5 vs unet(x, 499).sample: max |difference| = {difference:.3g}")

# Three of our solvers at about 20 model calls each, from the same noise.
runs = {}
for solver, steps in (("ddim", 19), ("dpm_solver_pp_2m", 19), ("heun", 10)):
    start = time.perf_counter()
    with torch.no_grad():
        x0, info = sd.sample(net, sde, shape=(args.n, 3, 16, 16), solver=solver, steps=steps,
                             generator=torch.Generator().manual_seed(args.seed), return_info=True)
    seconds = time.perf_counter() - start
    print(f"{solver:<17} steps={info.steps} NFE={info.nfe} shape={tuple(x0.shape)} wall={seconds:.2f}s "
          f"finite={bool(x0.isfinite().all())}")
    runs[solver] = {"steps": info.steps, "nfe": info.nfe, "shape": list(x0.shape), "seconds": seconds,
                    "finite": bool(x0.isfinite().all())}

with open(args.out, "w") as f:
    json.dump({"index_call_difference": difference, "runs": runs}, f, indent=1)
print(f"wrote {args.out}")
