"""Load a trained model for sampling: the shipped digits model, or a checkpoint of ours."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .prediction import Denoiser
from .sde import VPSDE

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "digits"


@dataclass
class Pretrained:
    """A network ready to sample: its Denoiser, schedule, sample shape and data units."""

    denoiser: Denoiser
    sde: VPSDE
    sample_shape: tuple
    config: dict
    path: Path

    def to_data_units(self, x: torch.Tensor) -> torch.Tensor:
        """Model units back to the data set's own (the digits' 0..16, 8-bit images' 0..255, a toy
        set's coordinates): the affine map the checkpoint recorded."""
        from .train.data import Affine

        units = self.config["data"].get("units", {"scale": 1.0, "shift": 0.0})
        return Affine(*(tuple(v) if isinstance(v, list) else v for v in (units["scale"], units["shift"])))(x)


def sde_from_config(schedule: dict) -> VPSDE:
    kind = schedule.get("schedule")
    if kind == "linear":
        return VPSDE.linear(schedule["beta_min"], schedule["beta_max"])
    if kind == "cosine":
        return VPSDE.cosine(schedule["cosine_s"])
    raise ValueError(f"schedule {schedule!r}: expected a 'linear' or 'cosine' schedule")


def load_model(path=None, *, device="cpu", ema: bool = True) -> Pretrained:
    """The network at `path` (a checkpoint directory or run folder of ours, or a model.safetensors
    with its config.json), by default the shipped digits model, with its EMA weights if saved."""
    from . import nn as networks
    from .train import checkpoint as ckpt

    path = Path(path) if path is not None else DEFAULT_MODEL / "model.safetensors"
    if path.is_dir() and (path / "model.safetensors").exists() and not (path / "manifest.json").exists():
        path = path / "model.safetensors"  # an exported model: weights and config only
    found = ckpt.load_checkpoint(path, map_location=device)
    config = found.config
    # A config that is not ours, or weights of another network: an error naming the files.
    try:
        net = networks.build_network(config["architecture"])
        sde = sde_from_config(config["schedule"])
        denoiser = Denoiser(net, sde, prediction=config.get("prediction", "eps"))
        sample_shape = tuple(config["data"]["sample_shape"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        what = f"no {e} entry" if isinstance(e, KeyError) else str(e)
        raise ckpt.CheckpointError(f"{found.config_path}: not a model config of scoresde ({what})") from None
    try:
        net.load_state_dict(found.ema_state if ema and found.ema_state else found.model_state)
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{found.path}: the weights do not fit the network described in "
                                   f"{found.config_path}: {e}") from None
    net.to(device).eval()
    return Pretrained(denoiser, sde, sample_shape, config, found.path)


def export_model(checkpoint_path, out_dir) -> Path:
    """Write a checkpoint's EMA weights and config as `out_dir/model.safetensors` + `config.json`:
    what ships in scoresde/assets."""
    from safetensors.torch import save_file

    from .train import checkpoint as ckpt

    found = ckpt.load_checkpoint(checkpoint_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = found.ema_state or found.model_state
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"step": str(found.step)})
    config = {key: found.config[key] for key in ("architecture", "schedule", "prediction", "data")}
    config["source"] = {"checkpoint": str(found.path), "step": found.step, "train": found.config.get("train")}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out
