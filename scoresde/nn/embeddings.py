"""Time and class conditioning shared by the networks, and the argument checks they share.

A network sees continuous time t in [0, 1] through s = t * time_scale, embedded as
  "sinusoidal"  [sin(s w_k), cos(s w_k)], w_k = 10000^(-k / (half - 1))   (Ho et al. 2020,
                after Vaswani et al. 2017; time_scale = 1000 puts s on the DDPM index scale);
  "fourier"     [sin(2 pi W s), cos(2 pi W s)] with fixed W ~ N(0, (16 / time_scale)^2)
                (Gaussian Fourier features, Tancik et al. 2020 / Song et al. 2021): the
                frequencies are drawn relative to time_scale, so in terms of t they have Song
                et al.'s standard deviation 16 whatever time_scale is.
The embedding then goes through Linear -> SiLU -> Linear (Ho et al. 2020); a class label adds a
learned vector. Label `num_classes` is the null class ("no label", for classifier-free guidance,
Ho & Salimans 2022).
"""
from __future__ import annotations

import math

import torch
from torch import nn

TIME_EMBEDDINGS = ("sinusoidal", "fourier")
FOURIER_STD = 16.0  # Song et al. 2021's scale of the Gaussian Fourier frequencies


# ---- argument checks (constructor arguments) ------------------------------------------------
def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
    return value


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name}={value!r}: expected a finite number > 0")
    return float(value)


def check_dropout(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"dropout={value!r}: expected a probability in [0, 1)")
    return float(value)


def check_num_classes(value):
    if value is not None:
        check_int("num_classes", value)
    return value


def check_time_embedding(value) -> str:
    if not isinstance(value, str) or value not in TIME_EMBEDDINGS:
        raise ValueError(f"time_embedding={value!r}: expected one of {TIME_EMBEDDINGS}")
    return value


# ---- time embeddings ------------------------------------------------------------------------
def sinusoidal_embedding(s: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Ho et al. 2020's embedding of a (batch,) tensor `s` as (batch, dim): sines, then cosines."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=s.dtype, device=s.device) * (-math.log(max_period) / (half - 1)))
    args = s[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TimeEmbedding(nn.Module):
    """t (batch,) -> (batch, dim) features of s = t * time_scale, computed in at least float32."""

    def __init__(self, kind: str, dim: int, time_scale: float):
        super().__init__()
        check_time_embedding(kind)
        if check_int("dim", dim, 4) % 2:
            raise ValueError(f"dim={dim}: the time embedding needs an even width")
        self.kind, self.dim, self.time_scale = kind, dim, check_positive("time_scale", time_scale)
        if kind == "fourier":  # fixed random frequencies, saved with the weights
            self.register_buffer("freqs", torch.randn(dim // 2) * (FOURIER_STD / self.time_scale))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # float32 at least: bf16 would round t * 1000 to a step of 4 near t = 1
        s = t.to(torch.promote_types(dtype, torch.float32)) * self.time_scale
        if self.kind == "sinusoidal":
            return sinusoidal_embedding(s, self.dim).to(dtype)
        args = (2 * math.pi) * s[:, None] * self.freqs.to(s.dtype)[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1).to(dtype)


class Conditioning(nn.Module):
    """(t, y) -> one embedding vector per sample: time features -> Linear -> SiLU -> Linear, plus
    a learned vector per class when `num_classes` is set (row `num_classes` is the null class)."""

    def __init__(self, feature_dim: int, emb_dim: int, *, kind: str, time_scale: float, num_classes=None):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.time = TimeEmbedding(kind, feature_dim, time_scale)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None

    def forward(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        emb = self.mlp(self.time(t, self.mlp[0].weight.dtype))
        if self.label is not None:
            emb = emb + self.label(y)
        return emb


# ---- forward-time checks (shapes and dtypes only: no data-dependent control flow) ----------
def check_t_y(t, y, batch: int, num_classes, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """t as a (batch,) floating tensor; y as (batch,) labels, the null class when y is None."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.full((batch,), float(t), device=device)
    if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"t: expected a (batch,) tensor of times in [0, 1], got {type(t).__name__}"
                        + (f" of dtype {t.dtype}" if isinstance(t, torch.Tensor) else ""))
    if t.ndim == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"t: expected shape ({batch},) (one time per sample) or (), got {tuple(t.shape)}")
    if num_classes is None:
        if y is not None:
            raise ValueError("y: this network is unconditional (num_classes=None); pass y=None")
        return t, None
    if y is None:
        return t, torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y: expected a (batch,) integer tensor of labels in [0, {num_classes}] "
                        f"({num_classes} = no label), got {type(y).__name__}"
                        + (f" of dtype {y.dtype}" if isinstance(y, torch.Tensor) else ""))
    if tuple(y.shape) != (batch,):
        raise ValueError(f"y: expected shape ({batch},) (one label per sample), got {tuple(y.shape)}")
    return t, y.long()
