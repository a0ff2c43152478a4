"""Super-resolution and cascade measurements of docs/superres.md.

    scoresde train --preset digits_sr --out runs/digits_sr
    scoresde train --preset digits_4x4 --out runs/digits_4x4
    python benchmarks/superres.py runs results/superres      # N=1000 samples (env N to change)

Writes OUT/superres.json, OUT/superres_heldout.png, OUT/cascade_samples.png; prints the numbers.
1. The held-out digits (never trained on) pooled to 4x4, upsampled by the SR model, bicubic,
   bilinear, nearest: PSNR (model units, peak-to-peak 2) and the digits classifier's accuracy.
2. The cascade (digits_4x4 then digits_sr, a + a steps) against the shipped one-stage model with
   2a steps (equal model calls up to one): Frechet distance, heun and dpm_solver_pp_2m.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import scoresde as sd
from scoresde import evaluate, metrics
from scoresde.cascade import sample_cascade, super_resolve
from scoresde.plotting import save_image_grid

torch.set_num_threads(2)
runs, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
sr = sd.load_model(f"{runs}/digits_sr")
base = sd.load_model(f"{runs}/digits_4x4")
one = sd.load_model()
res = {}
# 1. super-resolution of held-out digits (never trained on: split="train")
_, held = evaluate.split_data("digits")
hi = held.x
low = F.avg_pool2d(hi, 2)
clf = metrics.load_features("digits")
def psnr(x):  # model units [-1, 1]: peak-to-peak 2
    mse = ((x.clamp(-1, 1) - hi) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse)).mean())
def acc(x):
    return float((clf.classify(x.clamp(-1, 1)) == held.y).double().mean())
g = torch.Generator().manual_seed(0)
x_sr = super_resolve(sr, low, steps=20, generator=g)
many = torch.stack([super_resolve(sr, low, steps=20, generator=torch.Generator().manual_seed(s)) for s in range(1, 9)])
cands = {"sr3 (one sample, heun 20 steps)": x_sr, "sr3 (mean of 8 samples)": many.mean(0),
         "bicubic": F.interpolate(low, size=(8, 8), mode="bicubic", align_corners=False),
         "bilinear": F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False),
         "nearest": F.interpolate(low, size=(8, 8), mode="nearest"), "held-out 8x8 (ceiling)": hi}
res["held_out"] = {k: {"psnr_db": round(psnr(v), 2), "classifier_accuracy": round(acc(v), 4)} for k, v in cands.items()}
res["held_out_n"] = len(hi)
print(json.dumps(res, indent=1), flush=True)
# 2. cascade vs the shipped one-stage model at equal model calls
ref = evaluate.reference("digits")
n = int(os.environ.get("N", 1000))
for solver, base_steps, sr_steps in (("heun", 10, 10), ("heun", 5, 5), ("dpm_solver_pp_2m", 10, 10),
                                     ("dpm_solver_pp_2m", 5, 5)):
    g = torch.Generator().manual_seed(1)
    t = time.time()
    x_c, x_low = sample_cascade(base, sr, n, base_steps=base_steps, sr_steps=sr_steps, solver=solver, generator=g,
                                  return_low=True)
    tc = time.time() - t
    _, info_b = sd.sample(base.denoiser, base.sde, shape=(2, 1, 4, 4), steps=base_steps, solver=solver,
                          return_info=True)
    nfe = 2 * info_b.nfe  # both stages run the same solver and steps
    steps_one = base_steps + sr_steps
    t = time.time()
    x_o, info_o = sd.sample(one.denoiser, one.sde, shape=(n, 1, 8, 8), steps=steps_one, solver=solver, return_info=True,
                            generator=torch.Generator().manual_seed(1))
    to = time.time() - t
    fc = evaluate.evaluate(x_c.clamp(-1, 1), ref).frechet_matched
    fo = evaluate.evaluate(x_o.clamp(-1, 1), ref).frechet_matched
    res[f"{solver} cascade_{base_steps}+{sr_steps}"] = {"model_calls": nfe, "frechet_matched": round(fc, 3), "seconds": round(tc, 1)}
    res[f"{solver} one_stage_{steps_one}"] = {"model_calls": info_o.nfe, "frechet_matched": round(fo, 3), "seconds": round(to, 1)}
    print(json.dumps(res, indent=1), flush=True)
    if (solver, base_steps) == ("heun", 10):
        save_image_grid((torch.cat([F.interpolate(x_low[:16], size=(8, 8), mode="nearest"), x_c[:16]]).clamp(-1, 1) + 1) / 2,
                        f"{out}/cascade_samples.png", nrow=16)
k = 16
rows = torch.cat([F.interpolate(low[:k], size=(8, 8), mode="nearest"), cands["bicubic"][:k], x_sr[:k], hi[:k]])
save_image_grid((rows.clamp(-1, 1) + 1) / 2, f"{out}/superres_heldout.png", nrow=16)
json.dump(res, open(f"{out}/superres.json", "w"), indent=1)
