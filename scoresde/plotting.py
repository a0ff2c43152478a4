"""Pictures people would rather look at than read: image grids and 2-D scatters (matplotlib)."""
from __future__ import annotations

import math

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> torch.Tensor:
    """Tile (N, C, H, W) images with values in [0, 1] into one (C, H', W') image."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for k, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, q = divmod(k, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = img
    return grid


def save_image_grid(images: torch.Tensor, path: str, *, title: str | None = None, scale: int = 8,
                    nrow: int | None = None):
    """Write (N, C, H, W) images in [0, 1] as one PNG grid, each pixel `scale` pixels wide, `nrow`
    images to a row (default: a square)."""
    plt = _pyplot()
    grid = image_grid(images, nrow)
    c, h, w = grid.shape
    fig = plt.figure(figsize=(w * scale / 100, h * scale / 100 + (0.3 if title else 0)), dpi=100)
    ax = fig.add_axes((0, 0, 1, h / (h + (30 / scale if title else 0))))
    ax.imshow((grid[0] if c == 1 else grid.permute(1, 2, 0)).numpy(), cmap="gray" if c == 1 else None,
              vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9, y=0.995)
    fig.savefig(path)
    plt.close(fig)


def save_scatter(points: torch.Tensor, path: str, *, title: str = "", log_density=None, lim: float = 1.5):
    """Scatter 2-D points; with `log_density` (a function of (M, 2) float64 points), draw the true
    density beside them."""
    plt = _pyplot()
    panels = 2 if log_density is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 5), sharex=True, sharey=True, squeeze=False)
    axes = axes[0]
    if log_density is not None:
        grid = torch.linspace(-lim, lim, 300, dtype=torch.float64)
        xx, yy = torch.meshgrid(grid, grid, indexing="xy")
        density = log_density(torch.stack([xx.flatten(), yy.flatten()], 1)).exp().reshape(xx.shape)
        axes[0].imshow(density.sqrt().numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="magma")
        axes[0].set_title("true density (square root)")
    pts = points.detach().float().cpu().numpy()
    axes[-1].scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="tab:blue")
    axes[-1].set_title(title)
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
