"""Data units: the affine map from a model's units (images in [-1, 1], standardised points) back to
the data set's own (the digits' 0..16, 8-bit pixels' 0..255, a toy set's coordinates).

One owner for training (each `Data` carries its map) and for sampling (a checkpoint records it,
`Pretrained.to_data_units` applies it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Affine", "EIGHT_BIT", "IDENTITY"]


@dataclass(frozen=True)
class Affine:
    """x -> x * scale + shift. A sequence is one value per channel: the first axis of a sample (an
    image's channels, a point's coordinates).

    A plain picklable object rather than a lambda, so a `Data` can cross process boundaries.
    """

    scale: float | tuple = 1.0
    shift: float | tuple = 0.0

    def __call__(self, x: torch.Tensor, sample_ndim: int | None = None) -> torch.Tensor:
        """Map x of shape (batch, *sample_shape), or (..., *sample_shape) given `sample_ndim`."""
        sample_ndim = x.ndim - 1 if sample_ndim is None else sample_ndim
        return x * _per_channel(self.scale, x, sample_ndim) + _per_channel(self.shift, x, sample_ndim)

    def inverse(self, y: torch.Tensor, sample_ndim: int | None = None) -> torch.Tensor:
        """The map back, data units -> model units: (y - shift) / scale (shapes as for calling it)."""
        sample_ndim = y.ndim - 1 if sample_ndim is None else sample_ndim
        return (y - _per_channel(self.shift, y, sample_ndim)) / _per_channel(self.scale, y, sample_ndim)


def _per_channel(value, x: torch.Tensor, sample_ndim: int) -> torch.Tensor:
    """A number as it is; a sequence along a sample's first axis, broadcast over its other axes."""
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return value.reshape(-1, *[1] * (sample_ndim - 1)) if value.ndim else value


EIGHT_BIT = Affine(127.5, 127.5)  # model units [-1, 1] -> 0..255
IDENTITY = Affine(1.0, 0.0)
