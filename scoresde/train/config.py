"""Training configuration: one dataclass, named presets, and `key=value` overrides."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import os
from dataclasses import dataclass, field

from .. import nn as networks
from .._util import MAX_SAMPLING_STEPS, MAX_SEED, check_count, check_device, check_flag, check_number
from ..sde import VPSDE
from .objective import Objective


@dataclass
class TrainConfig:
    # what to learn
    data: str = "digits"  # a data set name or path (see scoresde.train.data)
    model: str = "digits"  # a network preset (see scoresde.nn.PRESETS)
    model_overrides: dict = field(default_factory=dict)  # e.g. {"base_channels": 32}
    schedule: str = "linear"  # "linear" (beta_min, beta_max) or "cosine" (cosine_s)
    beta_min: float = 0.1
    beta_max: float = 20.0
    cosine_s: float = 0.008
    target: str = "eps"  # what the network predicts: "eps", "x0" or "v"
    time: str = "continuous"  # t ~ U(t_eps, T), or "discrete" DDPM indices
    t_eps: float = 1e-3
    num_steps: int | None = None  # chain length for time="discrete"
    min_snr_gamma: float | None = None
    cond_drop: float = 0.1  # label dropout (to the null class) for classifier-free guidance
    split: str = "all"  # "train": leave out the held-out split of scoresde.evaluate (every fifth image)
    resolution: int = 0  # > 0: train on the images average-pooled to resolution x resolution (a cascade's base)
    lowres: int = 0  # > 0: super-resolution, conditioned on the images average-pooled to lowres x lowres
    lowres_aug: float = 0.1  # training noises the low-res input to a level s ~ U(0, lowres_aug) (cascades)
    lowres_aug_sample: float = 0.02  # the fixed level s of the low-res input when sampling
    # how
    steps: int = 20000
    batch_size: int = 128  # per optimizer step, over all processes
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 500  # linear learning-rate warm-up, in steps
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    bf16: bool = True  # autocast to bfloat16 (CUDA only)
    compile: bool = False  # torch.compile the network
    channels_last: bool = True  # memory format for images (CUDA only)
    max_nan_steps: int = 5  # stop after this many non-finite losses in a row
    # what to write
    out: str = "runs/digits"
    log_every: int = 100
    sample_every: int = 2000  # a PNG grid of EMA samples
    ckpt_every: int = 2000
    keep: int = 3  # checkpoints kept
    sample_n: int = 64
    sample_solver: str = "heun"
    sample_steps: int = 20
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu

    def objective(self) -> Objective:
        return Objective(self.target, self.time, self.t_eps, self.num_steps, self.min_snr_gamma)

    def sde(self) -> VPSDE:
        if self.schedule == "linear":
            return VPSDE.linear(self.beta_min, self.beta_max)
        if self.schedule == "cosine":
            return VPSDE.cosine(self.cosine_s)
        raise ValueError(f"schedule={self.schedule!r}: expected 'linear' or 'cosine'")

    def schedule_config(self) -> dict:
        """The schedule's identity, stored with checkpoints and compared on resume."""
        if self.schedule == "cosine":
            return {"schedule": "cosine", "cosine_s": self.cosine_s}
        return {"schedule": self.schedule, "beta_min": self.beta_min, "beta_max": self.beta_max}

    def validate(self) -> "TrainConfig":
        """Check every field before any data, network or step: a ValueError or TypeError naming it."""
        from ..solvers import SOLVERS

        for name in ("data", "out"):  # a data set name or a path; the run folder
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise TypeError(f"{name}={value!r}: expected a non-empty string or path")
        if not isinstance(self.model, str) or self.model not in networks.PRESETS:
            raise ValueError(f"model={self.model!r}: expected a network preset, one of {', '.join(networks.PRESETS)}")
        if not isinstance(self.model_overrides, dict) or not all(isinstance(k, str) for k in self.model_overrides):
            raise TypeError(f"model_overrides={self.model_overrides!r}: expected a dict of network arguments")
        # Both schedules' parameters, whichever is used: a stored config must not hold nonsense.
        VPSDE.linear(self.beta_min, self.beta_max)
        check_number("cosine_s", self.cosine_s, low=0.0)
        self.sde()
        objective = self.objective()
        if objective.time == "discrete" and objective.num_steps is None:
            raise ValueError("num_steps=None: time='discrete' needs the chain length num_steps=N (the schedule is "
                             "continuous)")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "sample_every", "ckpt_every", "keep",
                     "sample_n", "max_nan_steps"):
            check_count(name, getattr(self, name), maximum=None)
        check_count("sample_steps", self.sample_steps, maximum=MAX_SAMPLING_STEPS)
        check_count("warmup", self.warmup, minimum=0, maximum=None)
        check_count("seed", self.seed, minimum=0, maximum=MAX_SEED)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("grad_clip", self.grad_clip, low=0.0, low_open=True, finite=False)  # inf: no clipping
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("cond_drop", self.cond_drop, low=0.0, high=1.0, high_open=True)
        if self.split not in ("all", "train"):
            raise ValueError(f"split={self.split!r}: expected 'all' or 'train' (without the held-out images)")
        check_count("resolution", self.resolution, minimum=0, maximum=None)
        check_count("lowres", self.lowres, minimum=0, maximum=None)
        check_number("lowres_aug", self.lowres_aug, low=0.0, high=1.0)
        check_number("lowres_aug_sample", self.lowres_aug_sample, low=0.0, high=1.0)
        check_number("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        for name in ("ema_warmup", "bf16", "compile", "channels_last"):
            check_flag(name, getattr(self, name))
        if not isinstance(self.sample_solver, str) or self.sample_solver not in SOLVERS:
            raise ValueError(f"sample_solver={self.sample_solver!r}: expected one of {', '.join(sorted(SOLVERS))}")
        if self.device != "auto":
            check_device("device", self.device)
        return self


PRESETS = {
    # The shipped model: a small conditional UNet on scikit-learn's 8x8 digits, trained on CPU.
    "digits": TrainConfig(data="digits", model="digits", steps=6000, batch_size=128, lr=1e-3, warmup=200,
                          ema_decay=0.999, sample_every=1000, ckpt_every=1000, log_every=50, out="runs/digits"),
    "toy2d": TrainConfig(data="mixture", model="toy2d", steps=5000, batch_size=512, lr=1e-3, warmup=100,
                         cond_drop=0.0, sample_n=2000, sample_every=1000, ckpt_every=1000, log_every=100,
                         out="runs/toy2d"),
    # Fashion-MNIST's 60,000 training images (found in $SCORESDE_FASHION_MNIST or Debian's
    # /usr/share/datasets/fashion-mnist; or data=fashion:FOLDER), the 1.62M-parameter `fashion` UNet:
    # about 43 epochs. A GPU run; see docs/training.md for its measured CPU cost.
    "fashion": TrainConfig(data="fashion", model="fashion", steps=20_000, batch_size=128, lr=5e-4, warmup=500,
                           ema_decay=0.9995, sample_every=2000, ckpt_every=2000, log_every=100,
                           out="runs/fashion"),
    # Ho et al. 2020's CIFAR-10 run (35.7M parameters); point `data` at a local cifar-10-batches-py.
    "cifar10": TrainConfig(data="cifar-10-batches-py", model="cifar10", steps=800_000, batch_size=128, lr=2e-4,
                           warmup=5000, ema_decay=0.9999, cond_drop=0.0, sample_every=10_000,
                           ckpt_every=10_000, log_every=100, out="runs/cifar10"),
    # Super-resolution 4x4 -> 8x8 digits (SR3, with cascaded diffusion's noise-conditioning
    # augmentation): the `digits_sr` UNet, conditioned on the 8x8 digit average-pooled to 4x4.
    "digits_sr": TrainConfig(data="digits", model="digits_sr", lowres=4, split="train", steps=3000,
                             batch_size=128, lr=1e-3, warmup=200, cond_drop=0.0, sample_every=1000,
                             ckpt_every=1000, log_every=50, out="runs/digits_sr"),
    # A cascade's base: the digits average-pooled to 4x4, the `digits_4x4` class-conditional UNet.
    "digits_4x4": TrainConfig(data="digits", model="digits_4x4", resolution=4, split="train", steps=3000,
                              batch_size=128, lr=1e-3, warmup=200, sample_every=1000, ckpt_every=1000,
                              log_every=50, out="runs/digits_4x4"),
}


def preset(name: str) -> TrainConfig:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], model_overrides=dict(PRESETS[name].model_overrides))


def _parse(text: str, like):
    """`text` as a value of the type of `like` (the field's default)."""
    if text.lower() in ("none", "null"):
        return None
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    for kind in (int, float):
        if isinstance(like, kind) or like is None:
            try:
                return kind(text)
            except ValueError:
                if isinstance(like, kind):
                    raise ValueError(f"{text!r} is not a {kind.__name__}") from None
    return text


def _literal(text: str):
    """A network argument: a Python literal ("32", "0.1", "(1, 2)", "None") or else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: TrainConfig, overrides) -> TrainConfig:
    """Apply `key=value` strings: a TrainConfig field, or `model.KEY` for the network preset."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config={config!r}: expected a TrainConfig (e.g. preset('digits'))")
    if isinstance(overrides, str) or not isinstance(overrides, (list, tuple)):
        raise TypeError(f"overrides={overrides!r}: expected a list of 'key=value' strings")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "model_overrides"}
    for item in overrides:
        if not isinstance(item, str):
            raise TypeError(f"override {item!r}: expected a 'key=value' string")
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        if key.startswith("model."):
            config.model_overrides[key[6:]] = _literal(text)
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"override key {key!r} is unknown{hint}; valid keys: {', '.join(fields)}, "
                             "or model.<network argument>")
        try:
            setattr(config, key, _parse(text, getattr(PRESETS["digits"], key)))
        except ValueError as err:
            raise ValueError(f"override {item!r}: {err}") from None
    return config
