"""Networks: the eps-UNet (Ho et al. 2020) for images, a residual MLP for low-dimensional data,
named presets, and rebuilding a network from its stored `config`.

    net = scoresde.nn.from_preset("digits")            # or from_preset("tiny", dropout=0.0)
    same = scoresde.nn.build_network(net.config)       # the config is a JSON-ready dict
    print(scoresde.nn.describe(net))                   # one line, with the parameter count
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping

from torch import nn

from .embeddings import (
    TIME_EMBEDDINGS,
    Conditioning,
    TimeEmbedding,
    sinusoidal_embedding,
)
from .mlp import MLP
from .unet import UNet

ARCHITECTURES = {"UNet": UNet, "MLP": MLP}

PRESETS: dict[str, dict] = {
    # For tests on CPU: two levels (8x8, 4x4), attention at 4x4.
    "tiny": dict(architecture="UNet", image_size=8, in_channels=1, base_channels=16, channel_mults=[1, 2],
                 num_res_blocks=1, attention_resolutions=[4], dropout=0.1, num_groups=8),
    # scikit-learn's 8x8 digits, 10 classes plus the null class: the shipped model, trained on CPU.
    "digits": dict(architecture="UNet", image_size=8, in_channels=1, base_channels=32, channel_mults=[1, 2, 2],
                   num_res_blocks=1, attention_resolutions=[4], dropout=0.1, num_classes=10, num_groups=8),
    # Super-resolution 4x4 -> 8x8 digits: the 4x4 input upsampled (bilinear) and concatenated as a
    # second input channel; no class labels.
    "digits_sr": dict(architecture="UNet", image_size=8, in_channels=1, base_channels=16, channel_mults=[1, 2],
                      num_res_blocks=1, attention_resolutions=[], dropout=0.1, num_groups=8, cond_channels=1,
                      cond_size=4),
    # A cascade's 4x4 base: the digits average-pooled to 4x4, 10 classes plus the null class.
    "digits_4x4": dict(architecture="UNet", image_size=4, in_channels=1, base_channels=16, channel_mults=[1, 2],
                       num_res_blocks=1, attention_resolutions=[2], dropout=0.1, num_classes=10, num_groups=8),
    # Fashion-MNIST, 28x28 grayscale, 10 classes plus the null class: three levels 28 -> 14 -> 7
    # (28 divides by 2**2), attention at 14x14 and in the middle at 7x7; 1.62M parameters, 6.5 MB
    # of float32 safetensors.
    "fashion": dict(architecture="UNet", image_size=28, in_channels=1, base_channels=32, channel_mults=[1, 2, 2],
                    num_res_blocks=2, attention_resolutions=[14], dropout=0.1, num_classes=10, num_groups=8),
    # Ho et al. 2020's CIFAR-10 network (35.7M parameters).
    "cifar10": dict(architecture="UNet", image_size=32, in_channels=3, base_channels=128,
                    channel_mults=[1, 2, 2, 2], num_res_blocks=2, attention_resolutions=[16], dropout=0.1,
                    num_groups=32),
    # 2-D toy data (Gaussian mixtures).
    "toy2d": dict(architecture="MLP", dim=2, hidden=256, layers=4),
}


def _arguments(cls) -> list[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


def build_network(config: Mapping) -> nn.Module:
    """The network a `config` describes (a `net.config`, a preset, or one read back from JSON).

    Fresh weights: load a state_dict to restore a trained network.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config: expected a dict with an 'architecture' key, got {type(config).__name__}")
    kwargs = dict(config)
    arch = kwargs.pop("architecture", None)
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(f"config['architecture']={arch!r}: expected one of {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    valid = _arguments(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"config has unknown key(s) {unknown} for {arch}; valid keys: architecture, "
                         f"{', '.join(valid)}")
    return cls(**kwargs)


def from_preset(name: str, **overrides) -> nn.Module:
    """A fresh network from the preset `name` (see PRESETS), with some arguments overridden."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; known presets: {', '.join(PRESETS)}")
    config = copy.deepcopy(PRESETS[name])
    valid = _arguments(ARCHITECTURES[config["architecture"]])
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"override(s) {unknown} unknown for preset {name!r} ({config['architecture']}); "
                         f"valid keys: {', '.join(valid)}")
    config.update(overrides)
    return build_network(config)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters (shared ones counted once); buffers are not parameters."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def format_count(n: int) -> str:
    """35746307 -> '35.75M', 12345 -> '12.3k'."""
    if n >= 10**6:
        return f"{n / 1e6:.2f}M"
    if n >= 10**3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def describe(module: nn.Module) -> str:
    """One line: the architecture, its key sizes and the parameter count."""
    n = format_count(count_parameters(module))
    c = getattr(module, "config", None)
    if not isinstance(c, Mapping) or c.get("architecture") not in ARCHITECTURES:
        return f"{type(module).__name__}: {n} parameters"
    label = "unconditional" if c["num_classes"] is None else f"{c['num_classes']} classes + null"
    if c["architecture"] == "UNet":
        size = f"{c['in_channels']}x{c['image_size']}x{c['image_size']}"
        return (f"UNet {size}, base {c['base_channels']}, mults {tuple(c['channel_mults'])}, "
                f"{c['num_res_blocks']} res blocks/level, attention at {tuple(c['attention_resolutions'])}, "
                f"{c['time_embedding']} time, {label}: {n} parameters")
    return (f"MLP dim {c['dim']}, {c['layers']} layers of {c['hidden']}, {c['time_embedding']} time, "
            f"{label}: {n} parameters")


__all__ = [
    "ARCHITECTURES",
    "MLP",
    "PRESETS",
    "TIME_EMBEDDINGS",
    "Conditioning",
    "TimeEmbedding",
    "UNet",
    "build_network",
    "count_parameters",
    "describe",
    "format_count",
    "from_preset",
    "sinusoidal_embedding",
]
