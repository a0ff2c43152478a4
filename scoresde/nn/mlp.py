"""A small residual MLP eps-network for low-dimensional data (2-D toy mixtures and the like)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import (
    Conditioning,
    check_dropout,
    check_int,
    check_num_classes,
    check_positive,
    check_t_y,
    check_time_embedding,
)


class MLPBlock(nn.Module):
    """h + dropout(Linear(SiLU(h + E emb))): the embedding is injected in every layer."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.emb = nn.Linear(hidden, hidden)
        self.linear = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.dropout(self.linear(F.silu(h + self.emb(F.silu(emb)))))


class MLP(nn.Module):
    """eps-network on vectors: forward(x, t, y=None) -> a tensor of x's shape (batch, dim).

    `layers` hidden layers of width `hidden`, each a residual block that sees the time (and class)
    embedding. t and y follow `UNet`'s conventions: (batch,) times in [0, 1]; labels in
    [0, num_classes], `num_classes` being the null class, y=None meaning the null class.
    Default PyTorch initialisation (no zero-initialised output layer).
    """

    def __init__(self, *, dim: int, hidden: int = 256, layers: int = 4, num_classes: int | None = None,
                 time_embedding: str = "sinusoidal", time_scale: float = 1000.0, dropout: float = 0.0):
        super().__init__()
        self.config = dict(
            architecture="MLP", dim=check_int("dim", dim), hidden=check_int("hidden", hidden, 4),
            layers=check_int("layers", layers), num_classes=check_num_classes(num_classes),
            time_embedding=check_time_embedding(time_embedding),
            time_scale=check_positive("time_scale", time_scale), dropout=check_dropout(dropout))
        if hidden % 2:
            raise ValueError(f"hidden={hidden}: expected an even width (it is also the time embedding's)")
        self.dim, self.num_classes = dim, num_classes
        self.cond = Conditioning(hidden, hidden, kind=time_embedding, time_scale=time_scale, num_classes=num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, dropout) for _ in range(layers))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating tensor of shape (batch, {self.dim}), got "
                            + (f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: expected shape (batch, {self.dim}) (dim={self.dim}), got {tuple(x.shape)}")
        t, y = check_t_y(t, y, x.shape[0], self.num_classes, x.device)
        emb = self.cond(t, y)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(h))
