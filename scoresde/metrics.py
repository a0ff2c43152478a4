"""Sample quality in a feature space: the Fréchet distance (Heusel et al. 2017) from statistics
streamed batch by batch, and the feature network it is measured in for the digits: a small
classifier of scikit-learn's 8x8 digits, shipped in the package with the command that trains it.

    python -m scoresde.metrics train-digits      # retrains the shipped classifier (about a minute)
"""
from __future__ import annotations

import json
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import write_atomic

DIGITS_FEATURES = Path(__file__).parent / "assets" / "digits_features"
HELD_OUT_EVERY = 5  # the digits' held-out split: every fifth image (index % 5 == 0), never trained on


class FeatureStats:
    """Running mean and covariance of feature vectors, in float64: memory flat in the sample count.

    Args:
        dim: the features' dimension.
    """

    def __init__(self, dim: int):
        self.n, self.total, self.outer = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim,
                                                                                              dtype=torch.float64)

    def update(self, features: torch.Tensor) -> FeatureStats:
        """Add a batch of feature vectors, shape (batch, dim).

        Args:
            features: the batch.

        Returns:
            self.
        """
        f = features.detach().to("cpu", torch.float64).flatten(1)
        self.n += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f
        return self

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n

    @property
    def covariance(self) -> torch.Tensor:
        """The unbiased covariance (n - 1 in the denominator)."""
        return (self.outer - self.n * torch.outer(self.mean, self.mean)) / (self.n - 1)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance between Gaussians with the two sets' means and covariances:
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)).

    Args:
        a: one set's statistics.
        b: the other's.

    Returns:
        The distance (>= 0 up to round-off).
    """
    import scipy.linalg  # here: importing scoresde stays free of it

    cov_a, cov_b = a.covariance.numpy(), b.covariance.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # a singular product: handled below
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():  # a tiny ridge, as Heusel et al.'s code does
            ridge = 1e-6 * np.eye(len(cov_a))
            root = scipy.linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    diff = (a.mean - b.mean).numpy()
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real))


class DigitsClassifier(nn.Module):
    """A small CNN on 8x8 digits in model units ([-1, 1]); `features` is its 64-d last hidden layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                                  nn.SiLU(), nn.Flatten(), nn.Linear(64 * 16, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def digits_split():
    """The digits (model units) and labels, split into (train x, train y, held-out x, held-out y)."""
    from .train.data import load_data

    data = load_data("digits")
    held = torch.arange(len(data.x)) % HELD_OUT_EVERY == 0
    return data.x[~held], data.y[~held], data.x[held], data.y[held]


def train_digits_classifier(seed: int = 0, epochs: int = 40) -> tuple[DigitsClassifier, float]:
    """Train the digits feature network on the training split (Adam, batch 64, light shifts).

    Args:
        seed: seeds the weights and the batches.
        epochs: passes over the training split.

    Returns:
        The network (eval mode) and its accuracy on the held-out split.
    """
    torch.manual_seed(seed)
    x, y, x_held, y_held = digits_split()
    net = DigitsClassifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for part in torch.randperm(len(x), generator=generator).split(64):
            shift = tuple(torch.randint(-1, 2, (2,), generator=generator).tolist())  # a pixel's jitter
            loss = nn.functional.cross_entropy(net(torch.roll(x[part], shift, dims=(2, 3))), y[part])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x_held).argmax(1) == y_held).float().mean())
    return net, accuracy


@lru_cache(maxsize=None)
def digits_classifier() -> DigitsClassifier:
    """The shipped digits feature network (see the module docstring for how it is trained)."""
    import safetensors.torch

    net = DigitsClassifier()
    net.load_state_dict(safetensors.torch.load_file(DIGITS_FEATURES / "model.safetensors"))
    return net.eval()


def digits_features(x: torch.Tensor, batch: int = 1000) -> FeatureStats:
    """The shipped network's feature statistics of digits x (model units, (n, 1, 8, 8)), in batches.

    Args:
        x: the digits.
        batch: images per forward pass.

    Returns:
        Their `FeatureStats`.
    """
    net, stats = digits_classifier(), FeatureStats(64)
    with torch.no_grad():
        for part in x.split(batch):
            stats.update(net.features(part.to("cpu", torch.float32)))
    return stats


def _train_and_ship(seed: int = 0):
    import safetensors.torch

    net, accuracy = train_digits_classifier(seed)
    DIGITS_FEATURES.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(net.state_dict(), str(DIGITS_FEATURES / "model.safetensors"))
    record = {"accuracy_held_out": accuracy, "held_out": f"every {HELD_OUT_EVERY}th digit (index % 5 == 0)",
              "command": "python -m scoresde.metrics train-digits", "seed": seed}
    write_atomic(DIGITS_FEATURES / "config.json", (json.dumps(record, indent=1) + "\n").encode())
    print(f"held-out accuracy {accuracy:.4f}; wrote {DIGITS_FEATURES}")


if __name__ == "__main__":
    if sys.argv[1:] != ["train-digits"]:
        sys.exit("usage: python -m scoresde.metrics train-digits")
    _train_and_ship()

__all__ = ["FeatureStats", "frechet_distance", "DigitsClassifier", "digits_features", "train_digits_classifier"]
