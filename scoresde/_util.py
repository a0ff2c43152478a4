"""Small shared helpers: float64 time tensors, per-sample broadcasting, host scalars."""
from __future__ import annotations

import torch

F64 = torch.float64


def as_time(t, device=None) -> torch.Tensor:
    """Any time input (float, sequence, tensor) as a float64 tensor."""
    if isinstance(t, torch.Tensor):
        return t.to(dtype=F64, device=device if device is not None else t.device)
    return torch.as_tensor(t, dtype=F64, device=device)


def per_sample(coef, x: torch.Tensor):
    """Broadcast a per-sample coefficient of shape (batch,) against x (batch, ...).

    Python floats and 0-d tensors pass through unchanged; tensors are cast to x's dtype.
    """
    if not isinstance(coef, torch.Tensor):
        return coef
    coef = coef.to(dtype=x.dtype, device=x.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def host_floats(values: torch.Tensor) -> list:
    """Per-step coefficients as Python floats, computed once before a sampling loop.

    The schedule math runs on CPU in float64, so this is no device synchronisation; Python
    floats then enter each step as kernel arguments, with no tensor indexing in the loop.
    """
    if values.device.type != "cpu":
        raise ValueError("host_floats expects CPU schedule tensors")
    return values.tolist()  # sync: none, CPU tensor
