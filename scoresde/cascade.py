"""Super-resolution and cascades (Saharia et al. 2021, SR3; Ho et al. 2022, cascaded diffusion).

A super-resolution model is a UNet conditioned on a low-resolution image (`scoresde.nn.UNet` with
`cond_channels`, `cond_size`: the image is upsampled bilinearly to the output size and
concatenated as extra input channels). `Denoiser(net, sde, cond=...)` passes the conditioning to
every network call, so it reaches the network through `sample` with any solver. A cascade draws
low-resolution samples from a base model, then upsamples them with the super-resolution model;
the low-resolution images are noised to a small fixed level s first (noise-conditioning
augmentation), as in training.

    base, sr = sd.load_model("runs/digits_4x4"), sd.load_model("runs/digits_sr")
    x = scoresde.cascade.sample_cascade(base, sr, 64, generator=torch.Generator().manual_seed(0))
"""
from __future__ import annotations

import torch

from .prediction import Denoiser
from .pretrained import Pretrained
from .train.objective import noised_lowres

__all__ = ["DEFAULT_LEVEL", "sr_level", "super_resolve", "sample_cascade"]

DEFAULT_LEVEL = 0.02  # the augmentation level s at sampling, when the model's config records none


def sr_level(sr: Pretrained) -> float:
    """The augmentation level s a super-resolution model samples with: its training config's
    `lowres_aug_sample`, else `DEFAULT_LEVEL`."""
    return float(sr.config.get("train", {}).get("lowres_aug_sample", DEFAULT_LEVEL))


def _lowres_size(sr: Pretrained) -> int:
    size = getattr(sr.denoiser.net, "cond_size", None)
    if not getattr(sr.denoiser.net, "cond_channels", 0) or not isinstance(size, int):
        raise ValueError(f"sr: {sr.path} is not a super-resolution model (its network takes no conditioning "
                         "image; expected one trained with lowres > 0, such as the digits_sr preset)")
    return size


def super_resolve(sr: Pretrained, low: torch.Tensor, *, level: float | None = None, solver: str = "heun",
                  steps: int = 20, generator: torch.Generator | None = None, **kwargs: object) -> torch.Tensor:
    """Upsample low-resolution images (model units) with a super-resolution model.

    Args:
        sr: the super-resolution model (`load_model` of a digits_sr run).
        low: (batch, C, s, s) images in model units, s the model's `cond_size`.
        level: the augmentation level s they are noised to first; default `sr_level(sr)`.
        solver: the solver, as for `sample`.
        steps: its steps.
        generator: seeds the augmentation noise and the solver.
        **kwargs: more arguments for `sample` (e.g. `device`).

    Returns:
        (batch, *sr.sample_shape) samples in model units.

    Raises:
        ValueError: `sr` takes no conditioning image, or `low` is not of its size (expected vs got).
    """
    from .solvers import sample

    size = _lowres_size(sr)
    want = (sr.sample_shape[0], size, size)
    if not isinstance(low, torch.Tensor) or low.ndim != 4 or tuple(low.shape[1:]) != want:
        got = tuple(low.shape) if isinstance(low, torch.Tensor) else type(low).__name__
        raise ValueError(f"low: expected low-resolution images of shape (batch, {', '.join(map(str, want))}) "
                         f"for the super-resolution model, got {got}")
    level = sr_level(sr) if level is None else float(level)
    device = kwargs.get("device") or low.device
    cond = {"cond": noised_lowres(sr.sde, low.to(device), size, level, generator=generator),
            "cond_t": torch.full((low.shape[0],), level, device=device)}
    model = Denoiser(sr.denoiser.net, sr.sde, prediction=sr.denoiser.prediction, cond=cond)
    return sample(model, sr.sde, shape=(low.shape[0], *sr.sample_shape), solver=solver, steps=steps,
                  generator=generator, **kwargs)


def sample_cascade(base: Pretrained, sr: Pretrained, n: int, *, base_steps: int = 20, sr_steps: int = 20,
                   solver: str = "heun", level: float | None = None, generator: torch.Generator | None = None,
                   return_low: bool = False, **kwargs: object) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw n samples from a cascade: the base model at low resolution, then super-resolution.

    Args:
        base: the low-resolution model (e.g. a digits_4x4 run), sampled unconditionally.
        sr: the super-resolution model (e.g. a digits_sr run); its `cond_size` must be the base's size.
        n: the number of samples.
        base_steps: the base solver's steps.
        sr_steps: the super-resolution solver's steps.
        solver: the solver of both stages.
        level: the augmentation level s of the low-resolution samples; default `sr_level(sr)`.
        generator: seeds both stages.
        return_low: also return the low-resolution samples.
        **kwargs: more arguments for `sample` (e.g. `device`).

    Returns:
        (n, *sr.sample_shape) samples in model units; with `return_low`, (samples, low-res samples).

    Raises:
        ValueError: `sr` takes no conditioning image, or the base's samples are not its size.
    """
    from .solvers import sample

    size = _lowres_size(sr)
    if tuple(base.sample_shape) != (sr.sample_shape[0], size, size):
        raise ValueError(f"base: its samples have shape {tuple(base.sample_shape)}, but the super-resolution model "
                         f"takes {(sr.sample_shape[0], size, size)}")
    low = sample(base.denoiser, base.sde, shape=(n, *base.sample_shape), solver=solver, steps=base_steps,
                 generator=generator, **kwargs)
    high = super_resolve(sr, low, level=level, solver=solver, steps=sr_steps, generator=generator, **kwargs)
    return (high, low) if return_low else high
