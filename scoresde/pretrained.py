"""Load a trained model for sampling: the shipped digits model, or a checkpoint of ours."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .prediction import PREDICTIONS, Denoiser
from .sde import VPSDE
from .files import CheckpointError, write_atomic
from .units import Affine

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "digits"


class _Missing:
    """An absent config field, as a message shows it."""

    def __repr__(self):
        return "(missing)"


_MISSING = _Missing()


@dataclass
class Pretrained:
    """A network ready to sample: its Denoiser, schedule, sample shape and data units.

    Attributes:
        denoiser: the network as a `Denoiser` (eps, x0, v or score prediction).
        sde: the VP-SDE it was trained on.
        sample_shape: the shape of one sample, e.g. (1, 8, 8) for the digits, (2,) for a toy set.
        config: the config.json it was loaded with (architecture, schedule, prediction, data).
        path: the weights file or checkpoint directory it was loaded from.
    """

    denoiser: Denoiser
    sde: VPSDE
    sample_shape: tuple
    config: dict
    path: Path

    def to_data_units(self, x: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """Samples in model units mapped back to the data set's own units.

        The map is the affine one the checkpoint recorded (`config["data"]["units"]`: x * scale +
        shift, a scale or shift per channel where it is a list): the digits' 0..16, 8-bit images'
        0..255, a toy set's coordinates.

        Args:
            x: samples in model units, shape (..., *sample_shape).
            clip: for image data (a 3-D sample shape and a `data_range` in the config), clamp the
                result to `data_range`: a sampler overshoots [-1, 1] a little, and pixels outside
                the data's range do not exist. `clip=False` gives the raw affine values. Other data
                (toy 2-D sets) is never clipped: its `data_range` is only the range observed in
                the training set, not a bound that samples must respect.

        Returns:
            A tensor of x's shape and dtype.

        Raises:
            TypeError: x is not a floating tensor.
            ValueError: x's trailing dimensions are not `sample_shape`.
        """
        shape = tuple(self.sample_shape)
        dims = ", ".join(map(str, shape))
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x: expected a floating tensor of shape (batch, {dims}) in model units, got {got}")
        if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape):]) != shape:
            raise ValueError(f"x: expected shape (..., {dims}) (the model's sample_shape), "
                             f"got {tuple(x.shape)}")
        data = self.config.get("data", {})
        y = self._units()(x, sample_ndim=len(shape))
        if clip and len(shape) == 3 and data.get("data_range") is not None:
            low, high = data["data_range"]
            y = y.clamp(low, high)
        return y


    def to_model_units(self, y: torch.Tensor) -> torch.Tensor:
        """Data in the data set's own units (e.g. digits 0..16) mapped to model units, the inverse of
        `to_data_units` without clipping: images to edit with `sample(..., x_start=)`.

        Args:
            y: data, shape (batch, *sample_shape).

        Returns:
            A tensor of y's shape and dtype.
        """
        return self._units().inverse(y, sample_ndim=len(self.sample_shape))

    def _units(self) -> Affine:
        units = self.config.get("data", {}).get("units", {"scale": 1.0, "shift": 0.0})
        return Affine(units["scale"], units["shift"])

    def identity(self) -> str:
        """The model as tuned grids record it: its folder's name and a digest of its weights."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.denoiser.net.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        where = self.path.parent.name if self.path.is_file() else self.path.name
        return f"{where} sha256:{digest.hexdigest()[:16]}"

    def tuned_grids(self) -> list[Path]:
        """The tuned grids shipped with the model: JSON files in a `grids` folder beside its weights."""
        folder = (self.path.parent if self.path.is_file() else self.path) / "grids"
        return sorted(folder.glob("*.json")) if folder.is_dir() else []


def sde_from_config(schedule: dict) -> VPSDE:
    """The VP-SDE a stored `schedule` config describes (linear or cosine)."""
    kind = schedule.get("schedule")
    if kind == "linear":
        return VPSDE.linear(schedule["beta_min"], schedule["beta_max"])
    if kind == "cosine":
        return VPSDE.cosine(schedule["cosine_s"])
    raise ValueError(f"schedule {schedule!r}: expected a 'linear' or 'cosine' schedule")


# ---- checking a config.json before anything is built ------------------------------------------------
def _require(config_path: Path, field: str, value, ok: bool, allowed: str):
    """Refuse a config field that is not `ok`: the file, the field, its value and what is allowed."""
    if not ok:
        raise CheckpointError(f"{config_path}: {field}={value!r}: expected {allowed}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _units_ok(value, channels: int, nonzero: bool) -> bool:
    """A finite number, or a list of one per channel; a scale of 0 would send every sample to the
    shift."""
    if isinstance(value, list) and len(value) != channels:
        return False
    return all(_finite(v) and (v != 0 or not nonzero) for v in (value if isinstance(value, list) else [value]))


def _check_data(config_path: Path, config: dict) -> tuple:
    """`config["data"]`: sample_shape, units and data_range; returns the sample shape."""
    data = config.get("data", _MISSING)
    _require(config_path, "data", data, isinstance(data, dict),
             'an object with "sample_shape" and "units"')
    shape = data.get("sample_shape", _MISSING)
    _require(config_path, "data.sample_shape", shape,
             isinstance(shape, list) and len(shape) > 0
             and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape),
             "a non-empty list of ints >= 1 (e.g. [1, 8, 8] or [2])")
    units = data.get("units", _MISSING)
    _require(config_path, "data.units", units, isinstance(units, dict),
             'an object {"scale": ..., "shift": ...} (data units = model units * scale + shift)')
    for key in ("scale", "shift"):
        value, nonzero = units.get(key, _MISSING), key == "scale"
        _require(config_path, f"data.units.{key}", value, _units_ok(value, shape[0], nonzero),
                 f"a finite{' nonzero' if nonzero else ''} number or a list of {shape[0]} of them "
                 f"(one per channel: sample_shape[0] = {shape[0]})")
    if "data_range" in data:
        span = data["data_range"]
        _require(config_path, "data.data_range", span,
                 isinstance(span, list) and len(span) == 2 and all(map(_finite, span)) and span[0] < span[1],
                 "two finite numbers [low, high] with low < high")
    return tuple(shape)


def _input_shape(arch: dict) -> list | None:
    """The sample shape a network of ours takes, from its (complete) config."""
    if arch["architecture"] == "UNet":
        return [arch["in_channels"], arch["image_size"], arch["image_size"]]
    if arch["architecture"] == "MLP":
        return [arch["dim"]]
    return None


class _NoRandomFills(TorchFunctionMode):
    """For building a skeleton inside `torch.device("meta")`: a random fill of a meta tensor (an
    Embedding's normal_, Fourier features' randn) gives an unfilled one. Only names and shapes are
    wanted, and torch computes a meta random fill through its compiler stack, whose first import
    takes seconds."""

    _FILLS = frozenset({"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "cauchy_",
                        "log_normal_", "geometric_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        target = next(iter((*args, *kwargs.values())), None)  # the tensor filled (nn.init passes tensor=)
        if getattr(func, "__name__", "") in self._FILLS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        if func in (torch.randn, torch.rand):
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)  # on the device the enclosing torch.device names
        return func(*args, **kwargs)


# Where a network's size fields show in its weights: field -> (tensor, axis). It lets a mismatch
# name the config field that disagrees (an edited `hidden`), not only the tensors that differ.
_SIZE_FIELDS = {
    "MLP": {"dim": ("inp.weight", 1), "hidden": ("inp.weight", 0)},
    "UNet": {"in_channels": ("conv_in.weight", 1), "base_channels": ("conv_in.weight", 0),
             "out_channels": ("conv_out.weight", 0)},
}


def _misfit(skeleton: torch.nn.Module, state: dict) -> list[str]:
    """How the weights differ from what the (meta-device) network expects, first the fields of
    the architecture that disagree; empty if every name and shape matches."""
    arch = skeleton.config
    wanted = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    have = {name: tuple(t.shape) for name, t in state.items()}
    extra = {"in_channels": arch.get("cond_channels", 0)}  # a super-resolution UNet's conditioning channels
    problems = [f"architecture.{field}={arch[field]!r}, but the weights were made with "
                f"{have[name][axis] - extra.get(field, 0)} ({name} has shape {list(have[name])})"
                for field, (name, axis) in _SIZE_FIELDS.get(arch["architecture"], {}).items()
                if len(have.get(name, ())) > axis and have[name][axis] != arch[field] + extra.get(field, 0)]
    lists = (("size mismatch for", [f"{n} ({list(have[n])} in the weights, {list(wanted[n])} in the network)"
                                     for n in wanted if n in have and have[n] != wanted[n]]),
             ("missing from the weights:", [n for n in wanted if n not in have]),
             ("in the weights but not in the network:", [n for n in have if n not in wanted]))
    for what, names in lists:
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{what} {', '.join(names[:3])}{more}")
    return problems


def load_model(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               ema: bool = True) -> Pretrained:
    """A trained network ready to sample.

    The files are verified first (a checkpoint against its manifest, an exported model against the
    digest in its config.json), then the config is checked against the weights before any memory
    is spent on the network: the network is built on the meta device, and every parameter's name
    and shape compared with the weights'.

    Args:
        path: a checkpoint directory or run folder of ours, an exported model (a folder with
            model.safetensors and config.json, or that model.safetensors), or a diffusers pipeline
            folder (with unet/ and scheduler/, or model_index.json: loaded by
            `scoresde.diffusers_io.load_diffusers`); by default the shipped digits model.
        device: where the network goes.
        ema: use the EMA weights where the checkpoint has them (a diffusers pipeline has one set).

    Returns:
        A `Pretrained`.

    Raises:
        CheckpointError: a file is missing, damaged, not verifiable, or not ours; or config.json
            describes another network than the weights, or holds a field out of range. The
            message names the file and the field.
        ImportError: a diffusers pipeline folder, and diffusers is not installed.
    """
    from . import nn as networks
    from . import checkpoint as ckpt

    if isinstance(path, (str, os.PathLike)):
        from .diffusers_io import is_diffusers_folder, load_diffusers

        if is_diffusers_folder(path):  # a diffusers pipeline: its own layout, its own loader
            return load_diffusers(path, device=device)
    found = ckpt.load_checkpoint(path if path is not None else DEFAULT_MODEL, map_location=device)
    config, config_path = found.config, found.config_path
    state = found.ema_state if ema and found.ema_state else found.model_state
    sample_shape = _check_data(config_path, config)
    prediction = config.get("prediction", "eps")
    _require(config_path, "prediction", prediction, prediction in PREDICTIONS, f"one of {PREDICTIONS}")
    # A config that is not ours: an error naming the file.
    try:
        with torch.device("meta"), _NoRandomFills():  # shapes only: a hand-edited size allocates nothing
            skeleton = networks.build_network(config["architecture"])
        sde = sde_from_config(config["schedule"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        what = f"no {e} entry" if isinstance(e, KeyError) else str(e)
        raise ckpt.CheckpointError(f"{config_path}: not a model config of scoresde ({what})") from None
    problems = _misfit(skeleton, state)
    if problems:
        raise ckpt.CheckpointError(f"{found.path}: the weights do not fit the network described in "
                                   f"{config_path}: {'; '.join(problems)}")
    expected = _input_shape(skeleton.config)
    _require(config_path, "data.sample_shape", list(sample_shape), expected in (None, list(sample_shape)),
             f"{expected}, the shape the network in architecture takes")
    # Built for real only now that its size is the weights' size (and built, not materialised
    # from the skeleton, so that anything not in the state dict is initialised as usual).
    net = networks.build_network(config["architecture"])
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{found.path}: the weights do not fit the network described in "
                                   f"{config_path}: {e}") from None
    net.to(device).eval()
    return Pretrained(Denoiser(net, sde, prediction=prediction), sde, sample_shape, config, found.path)


def export_model(checkpoint_path, out_dir) -> Path:
    """Write a checkpoint's weights and config as an exported model: what ships in scoresde/assets.

    `out_dir/model.safetensors` holds the EMA weights (the model's if there are none);
    `out_dir/config.json` the architecture, schedule, prediction and data units, where the model
    came from, and `"weights": {"file", "size", "sha256"}`, which `load_model` verifies the
    weights against. Each file is replaced atomically, the weights first.

    Args:
        checkpoint_path: anything `load_checkpoint` loads (a checkpoint, a run folder, an
            exported model).
        out_dir: the folder to write (created if needed).

    Returns:
        `out_dir` as a Path.
    """
    import safetensors.torch

    from . import checkpoint as ckpt

    found = ckpt.load_checkpoint(checkpoint_path)
    out = Path(out_dir)
    source = found.path if found.path.is_dir() else found.path.parent
    if out.resolve() == source.resolve():  # it would rewrite the model it reads (the shipped one, say)
        raise ValueError(f"out={str(out)!r} is the folder of the model being exported; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    weights = found.ema_state or found.model_state
    data = safetensors.torch.save({k: v.contiguous() for k, v in weights.items()},
                                  metadata={"step": str(found.step)})
    config = {key: found.config[key] for key in ("architecture", "schedule", "prediction", "data")}
    config["weights"] = {"file": ckpt.MODEL, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    config["source"] = {"checkpoint": str(found.path), "step": found.step, "train": found.config.get("train")}
    write_atomic(out / ckpt.MODEL, data)
    write_atomic(out / ckpt.CONFIG, (json.dumps(config, indent=1) + "\n").encode())
    return out
