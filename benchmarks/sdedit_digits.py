"""Image-to-image (SDEdit, Meng et al. 2022) on the shipped digits model: held-out digits edited from
four noise levels, one row per t_start.

    python benchmarks/sdedit_digits.py --out docs/img/sdedit_digits.png

Row 0: twelve held-out digits (every fifth digit, the feature network's held-out split). Rows 1-4:
`sample(x_start=digits, t_start=t)` with unipc at 10 model calls, t in 0.2, 0.4, 0.6, 1.0, one
generator seed. A few seconds on one CPU thread.
"""
from __future__ import annotations

import argparse

import torch

import scoresde as sd
from scoresde.metrics import digits_split
from scoresde.plotting import save_image_grid

T_STARTS = (0.2, 0.4, 0.6, 1.0)


def edits(count: int = 12, seed: int = 0) -> torch.Tensor:
    """The digits and their edits, (1 + len(T_STARTS)) * count images in model units, row by row."""
    model = sd.load_model()
    digits = digits_split()[2][:count]
    rows = [digits] + [sd.sample(model.denoiser, model.sde, x_start=digits, t_start=t, solver="unipc", steps=9,
                                 generator=torch.Generator().manual_seed(seed)) for t in T_STARTS]
    return torch.cat(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sdedit_digits.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = edits()
    save_image_grid(((images + 1) / 2).clamp(0, 1), args.out, nrow=12, scale=10,
                    title="held-out digits; SDEdit from t_start = " + ", ".join(map(str, T_STARTS)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
