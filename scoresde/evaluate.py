"""Evaluate samples against their data set: Fréchet distance and k-NN precision/recall in a
classifier's feature space, class coverage, and a replication check, beside the same numbers for
real held-out images (the floor a perfect model reaches at that sample count).

    ref = evaluate.reference("digits")                 # the training split, the held-out split, features
    result = evaluate.evaluate(samples, ref)           # samples: model units (N, 1, 8, 8), or a folder
    floor = evaluate.floor(ref)                        # real held-out digits, measured the same way
    print(evaluate.report(result, floor, ref))

The splits. "digits": every fifth image (index % 5 == 0) is held out, as for the shipped feature
network; "fashion[:PATH]": Fashion-MNIST's training and test files; any other data set: every fifth
item. Fréchet distance, precision and recall compare with the training split.

The replication check (Somepalli et al. 2023) finds each sample's nearest training image in pixel
space (Euclidean, model units). Its threshold is calibrated on real images the training split does
not hold: the held-out split's even-numbered half gives the `quantile` (default 5 %) of its
nearest-training distances, so a share of about `quantile` of new real images falls under it; the
odd-numbered half, not used for the threshold, gives the floor's share. A model that copies its
training images puts many more of its samples under the threshold than that.

Many processes: under torchrun, the samples' chunks are shared among the ranks and rank 0 gathers
the partial results; `evaluate` returns the evaluation on rank 0 and None on the others.
"""
from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import metrics as M
from .train.data import Data

CHUNK = 1000  # samples per streamed chunk of a tensor or .npy file
RANGE_SLACK = 0.25  # samples may leave the data's range by this much of its width (unclipped --raw samples)


@dataclass
class Reference:
    """A data set prepared for evaluation: its splits (model units), its feature network and the
    training split's features, and the calibrated replication threshold."""

    data: str
    train_x: torch.Tensor
    held_x: torch.Tensor
    held_y: torch.Tensor | None
    class_share: torch.Tensor | None
    features: M.Features
    train_stats: M.FeatureStats
    train_features: torch.Tensor
    held_nearest: tuple
    threshold: float
    quantile: float
    to_data_units: object
    data_range: tuple

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])

    def to_model_units(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in the data set's units -> model units (the inverse of its affine map)."""
        return self.to_data_units.inverse(x.to(torch.float64)).to(torch.float32)


@dataclass
class Evaluation:
    """The metrics of one set of samples (`floor`: of real held-out images)."""

    n: int
    frechet: float
    frechet_matched: float
    precision: float
    recall: float
    class_share: list | None
    coverage: float | None
    class_distance: float | None
    replication_share: float
    nearest_distance: torch.Tensor = field(repr=False)
    nearest_index: torch.Tensor = field(repr=False)
    closest: list = field(repr=False, default_factory=list)

    def summary(self) -> dict:
        """The numbers, as JSON data."""
        return {key: getattr(self, key) for key in ("n", "frechet", "frechet_matched", "precision", "recall", "coverage",
                                                     "class_distance", "replication_share", "class_share")}


# ---- the data set --------------------------------------------------------------------------------
def split_data(source: str | Path) -> tuple[Data, Data]:
    """The training and held-out splits of a data set (see the module docstring).

    Args:
        source: a data set name or path, as for `scoresde.train.data.load_data`.

    Returns:
        (training `Data`, held-out `Data`).
    """
    from .train.data import load_data

    text = str(source)
    if text == "fashion" or text.startswith("fashion:"):
        return load_data(text), load_data(text.replace("fashion", "fashion-test", 1))
    data = load_data(source)
    held = torch.arange(len(data)) % M.HELD_OUT_EVERY == 0

    def part(mask):
        y = None if data.y is None else data.y[mask]
        return Data(data.x[mask], y, data.num_classes, data.name, data.to_data_units, data.data_range)

    return part(~held), part(held)


def reference(data: str | Path = "digits", features: str | Path | None = None, *, quantile: float = 0.05,
              max_points: int = 10_000, seed: int = 0) -> Reference:
    """Prepare a data set for `evaluate`.

    Args:
        data: a data set name or path.
        features: a feature network folder (`scoresde train-features`); default: the shipped one for
            "digits" and "fashion", required for other data sets.
        quantile: the share of new real images the replication threshold lets through.
        max_points: at most this many training images' features for precision and recall (a seeded
            random subset; their k-NN balls cost max_points^2 distances).
        seed: seeds that subset.

    Returns:
        The `Reference`.

    Raises:
        ValueError: no features given for a data set other than the digits, features of another data
            set, or images that are not (C, H, W).
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile={quantile!r}: expected a number in (0, 1)")
    train, held = split_data(data)
    if len(train.sample_shape) != 3:
        raise ValueError(f"data={str(data)!r}: items of shape {train.sample_shape}; evaluation needs images (C, H, W)")
    if features is None and train.name not in M.SHIPPED_FEATURES:
        raise ValueError(f"data={str(data)!r}: no feature network ships for {train.name!r}; train one with "
                         f"scoresde train-features --data {data} --out DIR and pass --features DIR")
    net = M.load_features(features if features is not None else train.name)
    net.check(train.name, train.sample_shape)
    held_nearest = M.nearest(held.x, train.x)
    threshold = float(torch.quantile(held_nearest[0][::2], quantile))  # the even-numbered half calibrates
    train_features = net.features(train.x)
    share = None if train.y is None else torch.bincount(train.y, minlength=net.num_classes).double() / len(train)
    return Reference(train.name, train.x, held.x, held.y, share, net, M.FeatureStats(train_features.shape[1]).update(
        train_features), _subset(train_features, max_points, seed), held_nearest, threshold, quantile, train.to_data_units,
        train.data_range)


def _subset(x: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    if len(x) <= limit:
        return x
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return x[keep]


# ---- the samples ---------------------------------------------------------------------------------
@dataclass
class _Chunk:
    start: int
    count: int
    load: object  # () -> tensor of the chunk's samples


def sample_chunks(samples: torch.Tensor | str | Path, units: str = "auto") -> tuple[list, str, str]:
    """Samples as streamed chunks: a tensor, a .npy file, or a `sample_to_disk` folder.

    Args:
        samples: the samples.
        units: "model", "data", or "auto": a tensor is in model units, a .npy file in data units (what
            `scoresde sample --out X.npy` writes), a folder in the units its manifest records.

    Returns:
        (chunks, units, a description).

    Raises:
        ValueError: an empty or unreadable source, unknown units.
    """
    if units not in ("auto", "model", "data"):
        raise ValueError(f"units={units!r}: expected 'auto', 'model' or 'data'")
    if isinstance(samples, torch.Tensor):
        return _tensor_chunks(samples), "model" if units == "auto" else units, f"{len(samples)} samples"
    path = Path(samples)
    if path.is_dir():
        return _folder_chunks(path, units)
    if path.suffix != ".npy" or not path.is_file():
        raise ValueError(f"samples {str(path)!r}: expected a .npy file or a folder written by scoresde sample "
                         "--out DIR/ (sample_to_disk)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"samples {str(path)!r}: not a readable .npy file ({e})") from None
    if array.ndim == 0 or len(array) == 0:
        raise ValueError(f"samples {str(path)!r}: holds no samples (shape {array.shape})")
    chunks = [_Chunk(s, min(CHUNK, len(array) - s), lambda s=s: torch.from_numpy(np.array(array[s:s + CHUNK])))
              for s in range(0, len(array), CHUNK)]
    return chunks, "data" if units == "auto" else units, f"{len(array)} samples from {path}"


def _tensor_chunks(x: torch.Tensor) -> list:
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"samples: holds no samples (shape {tuple(x.shape)})")
    return [_Chunk(s, len(part), lambda part=part: part) for s, part in zip(range(0, len(x), CHUNK), x.split(CHUNK))]


def _folder_chunks(path: Path, units: str):
    from .chunked import MANIFEST, _read_manifest, chunk_name
    from .files import CheckpointError

    try:
        manifest = _read_manifest(path)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    if manifest is None:
        raise ValueError(f"samples {str(path)!r}: no {MANIFEST}: an empty folder, or not one written by scoresde "
                         "sample --out DIR/ (sample_to_disk)")
    args = manifest["args"]
    n, batch = args["n"], args["batch_size"]
    missing = [k for k in range(math.ceil(n / batch)) if not (path / chunk_name(k)).is_file()]
    if missing:
        raise ValueError(f"samples {str(path)!r}: the run is unfinished ({len(missing)} chunk(s) missing, e.g. "
                         f"{chunk_name(missing[0])}): rerun its sample command to finish it")
    recorded = (args.get("meta") or {}).get("units", "model")
    chunks = [_Chunk(k * batch, min(batch, n - k * batch),
                     lambda k=k: torch.from_numpy(np.load(path / chunk_name(k), allow_pickle=False)))
              for k in range(math.ceil(n / batch))]
    return chunks, recorded if units == "auto" else units, f"{n} samples from {path}"


def _model_units(x: torch.Tensor, ref: Reference, units: str, where: str) -> torch.Tensor:
    """Check one chunk's shape and range; return it in model units."""
    if tuple(x.shape[1:]) != ref.sample_shape:
        raise ValueError(f"samples {where}: shape {tuple(x.shape[1:])} per sample; {ref.data!r} images are "
                         f"{ref.sample_shape}")
    x = ref.to_model_units(x) if units == "data" else x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"samples {where}: NaN or inf")
    low, high = float(x.min()), float(x.max())  # sync: one check per chunk, on the CPU
    if low < -1 - 2 * RANGE_SLACK or high > 1 + 2 * RANGE_SLACK:
        lo, hi = ref.data_range
        raise ValueError(f"samples {where}: values span [{low:.3g}, {high:.3g}] in model units ({units} units "
                         f"given); {ref.data!r} spans [-1, 1] in model units, [{lo:g}, {hi:g}] in data units: "
                         "another data set, or the wrong --units?")
    return x


# ---- the evaluation ------------------------------------------------------------------------------
def evaluate(samples: torch.Tensor | str | Path, ref: Reference, *, units: str = "auto", k: int = 3, max_points: int = 10_000,
             seed: int = 0, closest: int = 16, progress: bool = False) -> Evaluation | None:
    """Measure samples against the reference: memory flat in their count but for one feature vector
    and two numbers per sample.

    Args:
        samples: a tensor (N, C, H, W), a .npy file or a `sample_to_disk` folder (see `sample_chunks`).
        ref: the data set (`reference`).
        units: the samples' units (see `sample_chunks`).
        k: the k-NN balls' neighbour for precision and recall.
        max_points: at most this many samples' features for precision and recall (a seeded subset).
        seed: seeds that subset.
        closest: keep this many samples nearest to a training image (for `save_replicas`).
        progress: a progress bar of chunks.

    Returns:
        The `Evaluation` (under torchrun: on rank 0; None on the other ranks).
    """
    from tqdm.auto import tqdm

    from . import _dist

    chunks, units, _ = sample_chunks(samples, units)
    n = sum(c.count for c in chunks)
    kept = set(range(n)) if n <= max_points else set(
        torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points].tolist())
    with _dist.process_group():
        mine = _dist.shard(chunks)
        gathered = _dist.on_every_rank(lambda: [_measure(c, ref, units, kept, closest) for c in
                                                tqdm(mine, disable=not progress or not _dist.is_main(), unit="chunk")])
        if not _dist.is_main():
            return None
    return _combine([p for rank in gathered for p in rank], ref, k, closest)


def _frechet(ref: Reference, stats: M.FeatureStats) -> float:
    return M.frechet_distance(ref.train_stats, stats) if stats.n > 1 else math.nan


def _measure(chunk: _Chunk, ref: Reference, units: str, kept: set, closest: int, found=None) -> dict:
    """One chunk's share of the statistics (`found`: its nearest training images, when known)."""
    where = f"{chunk.start}..{chunk.start + chunk.count - 1}"
    x = _model_units(chunk.load(), ref, units, where)
    features = ref.features.features(x)
    with torch.no_grad():
        labels = ref.features.net.head(features).argmax(1)
    distance, index = M.nearest(x, ref.train_x) if found is None else found
    keep = [i for i in range(chunk.count) if chunk.start + i in kept]
    near = sorted(range(chunk.count), key=lambda i: float(distance[i]))[:closest]
    return {"start": chunk.start, "stats": M.FeatureStats(features.shape[1]).update(features),
            "labels": torch.bincount(labels, minlength=ref.features.num_classes),
            "kept": features[keep], "distance": distance, "index": index,
            "closest": [(float(distance[i]), chunk.start + i, x[i], int(index[i])) for i in near]}


def _combine(parts: list, ref: Reference, k: int, closest: int) -> Evaluation:
    parts.sort(key=lambda p: p["start"])
    stats = M.FeatureStats(ref.train_stats.total.shape[0])
    for part in parts:
        stats.merge(part["stats"])
    labels = sum(p["labels"] for p in parts)
    fake = torch.cat([p["kept"] for p in parts])
    precision, recall = M.precision_recall(ref.train_features, fake, k) if len(fake) > k else (math.nan, math.nan)
    distance = torch.cat([p["distance"] for p in parts])
    share, coverage, gap = _classes(labels, ref)
    matched = fake[:len(ref.held_x)]  # the floor's count: the Fréchet distance grows as n shrinks
    return Evaluation(stats.n, _frechet(ref, stats), _frechet(ref, M.FeatureStats(stats.total.shape[0]).update(matched))
                      if len(matched) == len(ref.held_x) else math.nan, precision, recall, share, coverage, gap, float((distance < ref.threshold).double().mean()), distance,
                      torch.cat([p["index"] for p in parts]),
                      heapq.nsmallest(closest, (c for p in parts for c in p["closest"]), key=lambda c: c[:2]))


def _classes(labels: torch.Tensor, ref: Reference):
    """The samples' class shares (by the feature network), the share of classes they cover (at least
    half the class's share of the training data), and the total variation distance between the two."""
    if ref.class_share is None:
        return None, None, None
    share = labels.double() / labels.sum()
    coverage = float((share >= ref.class_share / 2).double().mean())
    return share.tolist(), coverage, float((share - ref.class_share).abs().sum() / 2)


def floor(ref: Reference, *, k: int = 3) -> Evaluation:
    """The metrics of real held-out images: what a model that draws new images from the data
    distribution scores at the held-out set's size. The replication share counts only the held-out
    half the threshold was not calibrated on.

    Args:
        ref: the data set.
        k: as for `evaluate`.

    Returns:
        The `Evaluation` of the held-out images.
    """
    distance, index = ref.held_nearest
    result = _combine([_measure(c, ref, "model", set(range(len(ref.held_x))), 0,
                                (distance[c.start:c.start + c.count], index[c.start:c.start + c.count]))
                       for c in _tensor_chunks(ref.held_x)], ref, k, 0)
    odd = torch.arange(len(ref.held_x)) % 2 == 1
    result.replication_share = float((result.nearest_distance[odd] < ref.threshold).double().mean())
    return result


# ---- what is printed and drawn -------------------------------------------------------------------
def report(result: Evaluation, floor_result: Evaluation, ref: Reference) -> str:
    """The two evaluations side by side, as a text table."""
    def cell(value, kind):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.1%}" if kind == "%" else f"{value:.4g}"

    rows = [("Fréchet distance (features)", "frechet", ""),
            (f"  at the held-out count, {len(ref.held_x)}", "frechet_matched", ""), ("precision (k-NN)", "precision", "%"),
            ("recall (k-NN)", "recall", "%"), ("class coverage", "coverage", "%"),
            ("class distance (total variation)", "class_distance", ""),
            ("replication share", "replication_share", "%")]
    lines = [f"{'':34s}{'samples':>12s}{'held-out real':>16s}",
             f"{'n':34s}{result.n:>12d}{floor_result.n:>16d}"]
    lines += [f"{label:34s}{cell(getattr(result, key), kind):>12s}{cell(getattr(floor_result, key), kind):>16s}"
              for label, key, kind in rows]
    lines.append(f"replication threshold: {ref.threshold:.4g} (pixel distance in model units to the nearest training "
                 f"image; {ref.quantile:.0%} of {math.ceil(len(ref.held_x) / 2)} held-out images fall under it)")
    return "\n".join(lines)


def save_replicas(result: Evaluation, ref: Reference, path: str | Path, count: int = 16):
    """A PNG of the samples nearest to a training image (left) beside that image (right), nearest first.

    Args:
        result: an evaluation that kept its closest samples (`evaluate(..., closest=count)`).
        ref: its data set.
        path: the PNG to write.
        count: how many pairs.
    """
    from .plotting import save_image_grid

    pairs = result.closest[:count]
    if not pairs:
        raise ValueError("result: kept no closest samples (evaluate(..., closest=0))")
    images = torch.stack([img for d, _, sample, i in pairs for img in (sample, ref.train_x[i])])
    title = f"sample | nearest training image: {pairs[0][0]:.3g}..{pairs[-1][0]:.3g} (threshold {ref.threshold:.3g})"
    save_image_grid((images + 1) / 2, str(path), title=title, nrow=8 if len(pairs) >= 4 else 2 * len(pairs))


def write_json(result: Evaluation, floor_result: Evaluation, ref: Reference, path: str | Path):
    """Both evaluations' numbers and the threshold, as JSON."""
    from .files import write_atomic

    body = {"data": ref.data, "samples": result.summary(), "held_out_real": floor_result.summary(),
            "replication_threshold": ref.threshold, "quantile": ref.quantile}
    write_atomic(Path(path), (json.dumps(body, indent=1) + "\n").encode())


__all__ = ["Reference", "Evaluation", "reference", "evaluate", "floor", "report", "save_replicas", "split_data",
           "sample_chunks", "write_json"]
