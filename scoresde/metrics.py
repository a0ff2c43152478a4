"""Sample quality in a feature space and beside the training data: the Fréchet distance (Heusel et
al. 2017) from statistics streamed batch by batch, k-NN precision and recall (Kynkäänniemi et al.
2019), class coverage, and nearest training images for a replication check (Somepalli et al. 2023).

The feature space is a small classifier trained on the data set (`FeatureNet`): shipped in the
package for the digits and Fashion-MNIST, trained and saved by `train_features` (``scoresde
train-features``) for any other image set. The pipeline that reads samples and prints these numbers beside the real
data's floor is `scoresde.evaluate`.

    python -m scoresde.metrics train-digits      # retrains the shipped digits classifier (about 10 s)
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import write_atomic

DIGITS_FEATURES = Path(__file__).parent / "assets" / "digits_features"
# Feature networks shipped in the package, by data set name (`scoresde train-features` for others).
SHIPPED_FEATURES = {"digits": DIGITS_FEATURES, "fashion": Path(__file__).parent / "assets" / "fashion_features"}
HELD_OUT_EVERY = 5  # the digits' held-out split: every fifth image (index % 5 == 0), never trained on
FEATURES_FORMAT = "scoresde.features"
TRAIN_IMAGES = 60_000  # images one `train_features` run sees by default (its epochs: this over the set's size)


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

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another set's statistics (another process's share of the same samples).

        Args:
            other: the statistics to add.

        Returns:
            self.
        """
        self.n += other.n
        self.total += other.total
        self.outer += other.outer
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


# ---- neighbours ----------------------------------------------------------------------------------
def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of a and b, in float64 (exact enough to compare radii)."""
    return torch.cdist(a.to(torch.float64).flatten(1), b.to(torch.float64).flatten(1),
                       compute_mode="donot_use_mm_for_euclid_dist")


def kth_neighbour_radii(points: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point (the radius of its k-NN ball).

    Args:
        points: (n, dim), n > k.
        k: which neighbour.
        block: rows per distance block (memory: block x n float64).

    Returns:
        (n,) float64 radii.
    """
    if len(points) <= k:
        raise ValueError(f"k={k}: needs more than k points, got {len(points)}")
    return torch.cat([_distances(part, points).topk(k + 1, largest=False).values[:, k]  # [:, 0]: itself
                      for part in points.split(block)])


def within_balls(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                 block: int = 1024) -> torch.Tensor:
    """Whether each query lies in the union of the balls (centres, radii).

    Args:
        queries: (m, dim).
        centres: (n, dim).
        radii: (n,).
        block: queries per distance block.

    Returns:
        (m,) bool.
    """
    return torch.cat([(_distances(part, centres) <= radii).any(1) for part in queries.split(block)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019): the share of fake points inside the real
    points' k-NN balls, and of real points inside the fake points' balls.

    Args:
        real: real features, (n, dim).
        fake: generated features, (m, dim).
        k: the neighbour that sets each ball's radius (the paper's default: 3).

    Returns:
        (precision, recall), each in [0, 1].
    """
    precision = within_balls(fake, real, kth_neighbour_radii(real, k)).double().mean()
    recall = within_balls(real, fake, kth_neighbour_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def nearest(queries: torch.Tensor, pool: torch.Tensor, block: int = 256,
            candidates: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's nearest pool item (Euclidean, over all coordinates), in blocks: a float32 matrix
    product shortlists `candidates` items per query, whose distances are then taken in float64 (a
    copy of a pool item is at distance exactly 0).

    Args:
        queries: (m, ...).
        pool: (n, ...), the same item shape.
        block: queries per distance block (memory: block x n float32).
        candidates: the shortlist's length.

    Returns:
        (distances (m,) float64, indices (m,) int64).
    """
    flat, exact = pool.flatten(1).float(), pool.flatten(1).double()
    squares = flat.pow(2).sum(1)
    found_distance, found_index = [], []
    for part in queries.split(block):
        shortlist = (squares - 2 * part.flatten(1).float() @ flat.T).topk(min(candidates, len(pool)), largest=False)
        distance = (part.flatten(1).double()[:, None] - exact[shortlist.indices]).norm(dim=-1).min(1)
        found_distance.append(distance.values)
        found_index.append(shortlist.indices.gather(1, distance.indices[:, None])[:, 0])
    return torch.cat(found_distance), torch.cat(found_index)


# ---- the feature network --------------------------------------------------------------------------
class FeatureNet(nn.Module):
    """A small CNN classifier of images (C, H, W) in model units ([-1, 1]); `features` is its `dim`-d
    last hidden layer. Stride-2 convolutions halve the image until it is at most 7 pixels wide.

    Args:
        sample_shape: one image's (C, H, W).
        num_classes: the classifier's classes.
        dim: the features' dimension.
    """

    def __init__(self, sample_shape: tuple = (1, 8, 8), num_classes: int = 10, dim: int = 64):
        super().__init__()
        channels, height, width = sample_shape
        layers = [nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                  nn.SiLU()]
        height, width = math.ceil(height / 2), math.ceil(width / 2)
        while max(height, width) > 7:
            layers += [nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU()]
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * height * width, dim), nn.SiLU())
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Features:
    """A trained `FeatureNet` and what it was trained on: the data set's name and image shape, its
    accuracy on held-out images, and how to train it again."""

    net: FeatureNet
    data: str
    sample_shape: tuple
    num_classes: int
    record: dict

    def stats(self, x: torch.Tensor, batch: int = 1000) -> FeatureStats:
        """Feature statistics of images x (model units), in batches.

        Args:
            x: (n, C, H, W).
            batch: images per forward pass.

        Returns:
            Their `FeatureStats`.
        """
        return FeatureStats(self.net.head.in_features).update(self.features(x, batch))

    def features(self, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        """The features of images x (model units), (n, dim) float32 on the CPU."""
        with torch.no_grad():
            return torch.cat([self.net.features(part.to("cpu", torch.float32)) for part in x.split(batch)])

    def classify(self, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        """The predicted class of each image x (model units), (n,) int64."""
        with torch.no_grad():
            return torch.cat([self.net(part.to("cpu", torch.float32)).argmax(1) for part in x.split(batch)])

    def check(self, data: str, sample_shape: tuple):
        """Refuse data this network was not trained on, naming the difference.

        Raises:
            ValueError: another data set's name or image shape.
        """
        differences = [f"{what}: trained on {mine!r}, given {theirs!r}" for what, mine, theirs in
                       (("data", self.data, data), ("image shape", tuple(self.sample_shape), tuple(sample_shape)))
                       if mine != theirs]
        if differences:
            raise ValueError(f"features {self.record.get('path', '')}: for another data set ("
                             + "; ".join(differences) + "); train features for this one with scoresde train-features")

    def save(self, folder) -> Path:
        """Write model.safetensors and config.json into `folder` (created); returns it."""
        import safetensors.torch

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(self.net.state_dict(), str(out / "model.safetensors"))
        record = {"format": FEATURES_FORMAT, "version": 1, "data": self.data, "sample_shape": list(self.sample_shape),
                  "num_classes": self.num_classes, "dim": self.net.head.in_features, **self.record}
        record.pop("path", None)
        write_atomic(out / "config.json", (json.dumps(record, indent=1) + "\n").encode())
        return out


def load_features(source: str | Path = "digits") -> Features:
    """A saved feature network: a shipped one by its data set's name ("digits", "fashion"), or a
    folder `Features.save` wrote.

    Args:
        source: a name of `SHIPPED_FEATURES` or a folder path.

    Returns:
        The `Features`.

    Raises:
        ValueError: a folder that holds no feature network, or a damaged config.
    """
    folder = SHIPPED_FEATURES[source] if isinstance(source, str) and source in SHIPPED_FEATURES else Path(source)
    return _load_features(str(folder))


@lru_cache(maxsize=8)
def _load_features(folder: str) -> Features:
    import safetensors.torch

    path = Path(folder)
    try:
        record = json.loads((path / "config.json").read_text())
        state = safetensors.torch.load_file(str(path / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise ValueError(f"features {folder!r}: not a feature network folder (model.safetensors and config.json "
                         f"from scoresde train-features): {e}") from None
    if not isinstance(record, dict) or record.get("format") != FEATURES_FORMAT:
        raise ValueError(f"features {folder!r}: config.json is not a {FEATURES_FORMAT} record")
    shape, classes, dim = tuple(record["sample_shape"]), record["num_classes"], record["dim"]
    net = FeatureNet(shape, classes, dim)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"features {folder!r}: the weights do not fit the network config.json describes "
                         f"({str(e).splitlines()[0]})") from None
    return Features(net.eval(), record["data"], shape, classes, {**record, "path": folder})


def train_features(x: torch.Tensor, y: torch.Tensor, x_held: torch.Tensor, y_held: torch.Tensor, *, data: str,
                   num_classes: int, seed: int = 0, epochs: int | None = None, progress: bool = False,
                   command: str = "") -> tuple[Features, float]:
    """Train a `FeatureNet` classifier (Adam, batch 64, one-pixel shifts) on labelled images.

    Args:
        x: training images (n, C, H, W), model units.
        y: their labels.
        x_held: held-out images, never trained on.
        y_held: their labels.
        data: the data set's name, recorded (evaluation refuses features of another data set).
        num_classes: the labels' count.
        seed: seeds the weights and the batches.
        epochs: passes over x (default: about 60,000 images in all, at least 2 passes).
        progress: a progress bar of epochs.
        command: the command that trains it, recorded.

    Returns:
        The `Features` (eval mode) and its accuracy on the held-out images.
    """
    from tqdm.auto import trange

    torch.manual_seed(seed)
    epochs = epochs or max(2, round(TRAIN_IMAGES / len(x)))
    net = FeatureNet(tuple(x.shape[1:]), num_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in trange(epochs, disable=not progress, desc="epochs"):
        for part in torch.randperm(len(x), generator=generator).split(64):
            shift = tuple(torch.randint(-1, 2, (2,), generator=generator).tolist())  # a pixel's jitter
            loss = nn.functional.cross_entropy(net(torch.roll(x[part], shift, dims=(2, 3))), y[part])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = float(torch.cat([net(p).argmax(1) for p in x_held.split(1000)]).eq(y_held).float().mean())
    record = {"accuracy_held_out": accuracy, "held_out_images": len(x_held), "trained_images": len(x),
              "epochs": epochs, "seed": seed, "command": command}
    return Features(net, data, tuple(x.shape[1:]), num_classes, record), accuracy


def digits_split():
    """The digits (model units) and labels, split into (train x, train y, held-out x, held-out y)."""
    from .train.data import load_data

    data = load_data("digits")
    held = torch.arange(len(data.x)) % HELD_OUT_EVERY == 0
    return data.x[~held], data.y[~held], data.x[held], data.y[held]


def digits_features(x: torch.Tensor, batch: int = 1000) -> FeatureStats:
    """The shipped digits network's feature statistics of digits x (model units, (n, 1, 8, 8)).

    Args:
        x: the digits.
        batch: images per forward pass.

    Returns:
        Their `FeatureStats`.
    """
    return load_features("digits").stats(x, batch)


def _train_and_ship(seed: int = 0):
    x, y, x_held, y_held = digits_split()
    features, accuracy = train_features(x, y, x_held, y_held, data="digits", num_classes=10, seed=seed, epochs=40,
                                        command="python -m scoresde.metrics train-digits")
    features.record["held_out"] = f"every {HELD_OUT_EVERY}th digit (index % 5 == 0)"
    features.save(DIGITS_FEATURES)
    print(f"held-out accuracy {accuracy:.4f}; wrote {DIGITS_FEATURES}")


if __name__ == "__main__":
    if sys.argv[1:] != ["train-digits"]:
        sys.exit("usage: python -m scoresde.metrics train-digits")
    _train_and_ship()

__all__ = ["FeatureStats", "frechet_distance", "precision_recall", "kth_neighbour_radii", "within_balls", "nearest",
           "FeatureNet", "Features", "load_features", "train_features", "digits_features", "digits_split"]
