"""Read what diffusers writes: a scheduler's beta schedule as a `VPSDE`, a DDPM pipeline as a `Pretrained`.

`VPSDE.from_diffusers(scheduler_or_config)` builds the discrete chain of a diffusers scheduler
(its `num_train_timesteps` betas, in float64), and `load_diffusers(folder)` a folder written by
`DDPMPipeline.save_pretrained`: its `UNet2DModel` as a `Denoiser` on that chain, fed the 0-based
DDPM index as diffusers feeds it. diffusers itself is needed only to build the UNet, and is
imported there.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ._util import F64, as_path, check_count, check_device, check_number
from .files import CheckpointError
from .prediction import Denoiser
from .pretrained import Pretrained
from .sde import VPSDE

# diffusers' beta_schedule names that are read (the others diffusers knows are refused, naming these).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# diffusers' prediction_type -> the Denoiser's prediction.
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# Nichol & Dhariwal's cosine schedule as diffusers discretizes it: the offset s, the cap on beta.
COSINE_S = 0.008
COSINE_MAX_BETA = 0.999

UNET, SCHEDULER = "unet", "scheduler"
UNET_CONFIG, SCHEDULER_CONFIG, MODEL_INDEX = "config.json", "scheduler_config.json", "model_index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
EXPECTED = (f"a diffusers pipeline folder as DDPMPipeline.save_pretrained writes it: {UNET}/ with {UNET_CONFIG} "
            f"and {WEIGHTS}, and {SCHEDULER}/ with {SCHEDULER_CONFIG}")
# Images of a diffusers pipeline live in [-1, 1]; DDPMPipeline shows them as x / 2 + 0.5 in [0, 1].
DATA_UNITS = {"scale": 0.5, "shift": 0.5}
DATA_RANGE = [0.0, 1.0]


# ---- the scheduler's chain ------------------------------------------------------------------------------
def _scheduler_config(scheduler_or_config: object) -> Mapping:
    """The config mapping of a scheduler, or the mapping itself."""
    if isinstance(scheduler_or_config, Mapping):
        return scheduler_or_config
    config = getattr(scheduler_or_config, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"scheduler_or_config={scheduler_or_config!r}: expected a diffusers scheduler (an object "
                        "with a .config mapping) or a scheduler config mapping (a dict, or scheduler_config.json "
                        "parsed)")
    return config


def _field(config: Mapping, name: str, what: str):
    """config[name], or a ValueError naming the missing field and what it should hold."""
    if name not in config:
        raise ValueError(f"scheduler config: no {name!r} field: expected {what}")
    return config[name]


def _trained_betas(value: object, num_steps: int) -> torch.Tensor:
    """`trained_betas` as a float64 tensor of `num_steps` betas in (0, 1)."""
    allowed = f"a 1-D sequence or array of {num_steps} numbers in (0, 1) (num_train_timesteps={num_steps})"
    if isinstance(value, (str, bytes, Mapping)) or not (isinstance(value, (Sequence, torch.Tensor))
                                                        or hasattr(value, "__array__")):
        raise TypeError(f"trained_betas={value!r}: expected {allowed}")
    if isinstance(value, torch.Tensor) and (value.is_complex() or value.device.type == "meta"):
        raise TypeError(f"trained_betas: expected {allowed}, got a {value.dtype} tensor on {value.device}")
    try:
        betas = torch.as_tensor(value, dtype=F64).detach().cpu()
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise TypeError(f"trained_betas={value!r}: expected {allowed} ({err})") from None
    if tuple(betas.shape) != (num_steps,):
        raise ValueError(f"trained_betas: expected {allowed}, got shape {tuple(betas.shape)}")
    bad = ~((betas > 0) & (betas < 1))  # NaN is bad too
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"trained_betas[{i}]={betas[i].item()!r}: expected {allowed}")
    return betas


def _cosine_betas(num_steps: int) -> torch.Tensor:
    """Nichol & Dhariwal's betas: 1 - alpha_bar((i+1)/N) / alpha_bar(i/N), capped at 0.999, with
    alpha_bar(t) = cos((t + s)/(1 + s) pi/2)^2 and s = 0.008 (diffusers' "squaredcos_cap_v2")."""
    t = torch.arange(num_steps + 1, dtype=F64) / num_steps
    alpha_bar = torch.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=COSINE_MAX_BETA)


def diffusers_betas(scheduler_or_config: object) -> torch.Tensor:
    """The betas of a diffusers scheduler's training chain, computed in float64.

    `trained_betas` when the config gives them, else `beta_schedule`: "linear" (linspace from
    `beta_start` to `beta_end`), "scaled_linear" (linspace of their square roots, squared) or
    "squaredcos_cap_v2" (Nichol & Dhariwal's cosine alpha_bar with s = 0.008, betas capped at 0.999),
    over `num_train_timesteps` steps. Only the fields a schedule needs are read.

    Args:
        scheduler_or_config: a diffusers scheduler (anything with a `.config` mapping), or its
            config as a mapping (a dict, or the parsed scheduler_config.json).

    Returns:
        A float64 tensor of `num_train_timesteps` betas, each in (0, 1).

    Raises:
        TypeError: `scheduler_or_config` is neither; or a field has the wrong type (named).
        ValueError: a field the schedule needs is missing, or a field's value is out of range,
            an unknown `beta_schedule` (the message names the supported ones), `trained_betas` of
            another length than `num_train_timesteps`, or `rescale_betas_zero_snr=True` (a chain
            that ends at zero signal-to-noise has no Gaussian prior to start from).
    """
    config = _scheduler_config(scheduler_or_config)
    num_steps = check_count("num_train_timesteps",
                            _field(config, "num_train_timesteps", "the chain's length, an int >= 1"))
    if config.get("rescale_betas_zero_snr") not in (None, False):
        raise ValueError(f"rescale_betas_zero_snr={config['rescale_betas_zero_snr']!r}: expected False (a chain "
                         "rescaled to zero terminal SNR ends at pure noise, beta = 1, which a VPSDE cannot hold)")
    if config.get("trained_betas") is not None:
        return _trained_betas(config["trained_betas"], num_steps)
    supported = f"one of {', '.join(map(repr, BETA_SCHEDULES))} (or trained_betas)"
    schedule = _field(config, "beta_schedule", supported)
    if not isinstance(schedule, str):
        raise TypeError(f"beta_schedule={schedule!r}: expected {supported}")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={schedule!r}: expected {supported}")
    if schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_steps)
    start, end = (check_number(name, _field(config, name, "a number in (0, 1)"), low=0.0, high=1.0, low_open=True,
                               high_open=True) for name in ("beta_start", "beta_end"))
    if schedule == "linear":
        return torch.linspace(start, end, num_steps, dtype=F64)
    return torch.linspace(math.sqrt(start), math.sqrt(end), num_steps, dtype=F64) ** 2


# ---- a pipeline folder ----------------------------------------------------------------------------------
def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder that looks like a diffusers pipeline: it holds `unet/` and
    `scheduler/`, or a model_index.json.

    Args:
        path: any path.

    Returns:
        True for such a folder (it may still be refused by `load_diffusers`), False otherwise.
    """
    folder = Path(path)
    return folder.is_dir() and (((folder / UNET).is_dir() and (folder / SCHEDULER).is_dir())
                                or (folder / MODEL_INDEX).is_file())


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or a CheckpointError naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _weights_file(unet_dir: Path) -> Path:
    """unet/diffusion_pytorch_model.safetensors; a folder with only pickled weights is refused."""
    weights = unet_dir / WEIGHTS
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in unet_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{unet_dir}: holds pickled weights ({', '.join(pickles)}) but no {WEIGHTS}: scoresde "
                              "loads only safetensors, since unpickling a file can run arbitrary code. Save the "
                              "pipeline with save_pretrained(..., safe_serialization=True) where you trust the file")
    raise CheckpointError(f"{unet_dir}: no {WEIGHTS}: expected {EXPECTED}")


def _sample_shape(unet_config: dict, config_path: Path, learned_variance: bool) -> tuple:
    """(in_channels, height, width) of the UNet's samples; it must give back as many channels (twice as
    many when it also learns its variance)."""
    channels, size = unet_config.get("in_channels"), unet_config.get("sample_size")

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not count(channels):
        raise CheckpointError(f"{config_path}: in_channels={channels!r}: expected an int >= 1")
    sizes = [size, size] if count(size) else size
    if not (isinstance(sizes, list) and len(sizes) == 2 and all(map(count, sizes))):
        raise CheckpointError(f"{config_path}: sample_size={size!r}: expected an int >= 1 or a pair of them")
    out, expected = unet_config.get("out_channels", channels), 2 * channels if learned_variance else channels
    if out != expected:
        why = ("in_channels doubled: the scheduler's variance_type is 'learned_range'" if learned_variance else
               "in_channels; twice as many outputs, a learned variance, need the scheduler's variance_type "
               "'learned_range'")
        raise CheckpointError(f"{config_path}: out_channels={out!r}: expected {expected} ({why})")
    return (channels, *sizes)


def load_diffusers(folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> Pretrained:
    """A diffusers DDPM pipeline folder as a model ready to sample.

    The folder is one `DDPMPipeline.save_pretrained` writes (or any folder holding `unet/` and
    `scheduler/` in that layout): the `UNet2DModel` is built from unet/config.json with diffusers
    and given the weights of unet/diffusion_pytorch_model.safetensors (only safetensors are read:
    pickled weights are refused); the chain is `VPSDE.from_diffusers` of
    scheduler/scheduler_config.json, and the network takes the 0-based DDPM index as its time
    (`time_input="index"`). Samples live in [-1, 1] as diffusers' do; `to_data_units` maps them
    to [0, 1] (x / 2 + 1/2, clipped), the images DDPMPipeline returns.

    Args:
        folder: the pipeline folder.
        device: where the network goes.

    Returns:
        A `Pretrained` whose config holds `prediction`, `data` (sample_shape, units, data_range)
        and `diffusers` (the unet and scheduler configs as read).

    Raises:
        TypeError: `folder` is not a path, or `device` is not a device.
        ValueError: `device` names no available device.
        CheckpointError: the folder is not a pipeline (the message says what is expected), a file
            is missing, damaged or not JSON, the weights are pickled or do not fit the UNet, or a
            config field is wrong (the file and the field are named), such as an unknown
            prediction_type.
        ImportError: diffusers is not installed.
    """
    folder = as_path("folder", folder)
    device = check_device("device", device)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder: expected {EXPECTED}")
    for part, name in ((UNET, UNET_CONFIG), (SCHEDULER, SCHEDULER_CONFIG)):
        if not (folder / part / name).is_file():
            raise CheckpointError(f"{folder}: no {part}/{name}: expected {EXPECTED}")
    unet_path, scheduler_path = folder / UNET / UNET_CONFIG, folder / SCHEDULER / SCHEDULER_CONFIG
    unet_config, scheduler_config = _read_json(unet_path), _read_json(scheduler_path)
    weights = _weights_file(folder / UNET)

    # The chain and the prediction, from the scheduler's config.
    try:
        sde = VPSDE.from_diffusers(scheduler_config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{scheduler_path}: {err}") from None
    kind = scheduler_config.get("prediction_type", "epsilon")  # diffusers' default
    if not isinstance(kind, str) or kind not in PREDICTION_TYPES:
        raise CheckpointError(f"{scheduler_path}: prediction_type={kind!r}: expected one of "
                              f"{', '.join(map(repr, PREDICTION_TYPES))}")

    # The network, from the UNet's config and weights.
    name = unet_config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise CheckpointError(f"{unet_path}: _class_name={name!r}: expected 'UNet2DModel' (an unconditional "
                              "DDPM UNet)")
    learned_variance = scheduler_config.get("variance_type") == "learned_range"  # iDDPM's: see Denoiser
    sample_shape = _sample_shape(unet_config, unet_path, learned_variance)
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise ImportError(f"load_diffusers needs diffusers to build the UNet of {folder}: pip install diffusers "
                          f"({err})") from None
    import safetensors.torch

    try:
        net = UNet2DModel.from_config(unet_config)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{unet_path}: diffusers cannot build a UNet2DModel from it ({err})") from None
    try:
        state = safetensors.torch.load_file(weights)
    except Exception as err:  # safetensors raises its own SafetensorError for a damaged file
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{weights}: the weights do not fit the UNet2DModel described in {unet_path}: "
                              f"{err}") from None
    net.to(device).eval()

    prediction = PREDICTION_TYPES[kind]
    config = {"prediction": prediction,
              "data": {"name": None, "sample_shape": list(sample_shape), "units": dict(DATA_UNITS),
                       "data_range": list(DATA_RANGE)},
              "diffusers": {"unet": unet_config, "scheduler": scheduler_config}}
    denoiser = Denoiser(net, sde, prediction=prediction, time_input="index",
                        variance="learned_range" if learned_variance else None)
    return Pretrained(denoiser, sde, sample_shape, config, folder)


__all__ = ["diffusers_betas", "is_diffusers_folder", "load_diffusers", "BETA_SCHEDULES", "PREDICTION_TYPES"]
