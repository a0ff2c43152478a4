"""Training data: named data sets, image folders, CIFAR-10 batches and arrays, and a resumable
batch stream that shards each epoch across the ranks of a distributed run.

Model units. Images become float32 (N, C, H, W) in [-1, 1]: 8-bit values v map to v / 127.5 - 1,
scikit-learn's digits (integers 0..16) to v / 8 - 1. The 2-D toy sets "moons" and "swissroll" are
standardised: minus the sample's per-coordinate mean, divided by one scalar (the root mean square
of the centred coordinates), so the shape keeps its aspect ratio and has unit overall scale.
"mixture" is `scoresde.analytic.GaussianMixture.ring2d` left as it is (radius 1), so the exact
mixture stays the ground truth in model units. Every `Data` carries `to_data_units`, the inverse
map back to the data set's own units.

Nothing is downloaded: digits ship with scikit-learn, the toy sets are generated, everything else
is read from a local path. Pickled CIFAR-10 batches go through a restricted unpickler that can
rebuild numpy arrays and nothing else.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..analytic import GaussianMixture
from ..sde import VPSDE

DATASETS = ("digits", "moons", "swissroll", "mixture")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TOY_DEFAULT_N = 10_000


class DataPathError(FileNotFoundError, ValueError):
    """A data path that does not exist (catchable as FileNotFoundError or ValueError)."""


# ---- the result type ------------------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """x -> x * scale + shift; scale and shift are floats or per-coordinate tuples (last axis).

    A plain picklable object rather than a lambda, so a `Data` can cross process boundaries.
    """

    scale: float | tuple = 1.0
    shift: float | tuple = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
        shift = torch.as_tensor(self.shift, dtype=x.dtype, device=x.device)
        return x * scale + shift


EIGHT_BIT = Affine(127.5, 127.5)  # model units [-1, 1] -> 0..255
EIGHT_BIT_RANGE = (0.0, 255.0)
IDENTITY = Affine(1.0, 0.0)


@dataclass
class Data:
    """A data set in model units.

    x: float32 (N, *sample_shape); y: int64 (N,) labels or None; num_classes: labels' count or
    None; name: the named set, or the path it was read from; to_data_units: model units -> the
    data set's own units; data_range: (low, high) of the data in its own units, the bounds that
    to_data_units maps [-1, 1] onto for images (digits (0, 16), 8-bit images (0, 255), float image
    arrays (-1, 1)), the observed minimum and maximum over all coordinates for other data.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    num_classes: int | None
    name: str
    to_data_units: Callable[[torch.Tensor], torch.Tensor]
    data_range: tuple

    def __post_init__(self):
        if not isinstance(self.x, torch.Tensor):
            raise TypeError(f"Data.x: expected a float32 tensor of shape (N, ...), got {_describe(self.x)}")
        if self.x.dtype != torch.float32 or self.x.ndim < 2:
            raise ValueError(f"Data.x: expected a float32 tensor of shape (N, ...), got {_describe(self.x)}")
        if self.y is not None:
            if not isinstance(self.y, torch.Tensor) or self.y.dtype != torch.int64 or self.y.shape != self.x.shape[:1]:
                raise ValueError(f"Data.y: expected None or an int64 tensor of shape ({len(self.x)},), "
                                 f"got {_describe(self.y)}")

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> Data:
        """The same data with x and y on `device` (a small set can live on the GPU whole)."""
        y = None if self.y is None else self.y.to(device)
        return Data(self.x.to(device), y, self.num_classes, self.name, self.to_data_units, self.data_range)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return repr(value)


# ---- entry point ----------------------------------------------------------------------------


def load_data(source, *, n: int | None = None, seed: int = 0) -> Data:
    """Load a named data set or read one from a local path.

    source: one of DATASETS, or a path to a folder of PNG/JPEG images, a CIFAR-10 python folder
    (holding data_batch_1..5, or its parent), or a .npy/.npz file. Names win over same-named
    folders in the working directory (write "./digits" for the folder).
    n: toy sets draw n points (default 10,000); finite sets keep a random subset of n items
    (without replacement, drawn with `seed`, in their original order); None keeps them all.
    seed: the toy sets' random state and the subset's draw.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r}: expected an int")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise TypeError(f"n={n!r}: expected None or an int >= 1")
    if n is not None and n < 1:
        raise ValueError(f"n={n!r}: expected None or an int >= 1")
    if isinstance(source, str) and source in DATASETS:
        return _NAMED[source](n, seed)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source={source!r}: expected a data set name {DATASETS} or a path")
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and os.sep not in source and "/" not in source and not path.suffix:
            raise ValueError(f"source={source!r}: unknown data set; expected one of {DATASETS} or a path "
                             "to an image folder, a CIFAR-10 python folder, or a .npy/.npz file")
        raise DataPathError(2, "data path does not exist", str(source))
    return _subset(_read_path(path), n, seed)


def _read_path(path: Path) -> Data:
    if path.is_dir():
        cifar = _cifar_dir(path)
        return _load_cifar(cifar) if cifar is not None else _load_image_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _load_npy(path)
    if suffix == ".npz":
        return _load_npz(path)
    raise ValueError(f"source={str(path)!r}: unsupported file type {suffix or '(none)'!r}; expected a .npy or "
                     ".npz file, or a folder of PNG/JPEG images or CIFAR-10 batches")


def _subset(data: Data, n: int | None, seed: int) -> Data:
    """Keep n items drawn without replacement (in their original order)."""
    if n is None or n == len(data):
        return data
    if n > len(data):
        raise ValueError(f"n={n}: larger than the data set {data.name!r} of {len(data)} items")
    keep = _subset_indices(len(data), n, seed)
    y = None if data.y is None else data.y[keep]
    return Data(data.x[keep].contiguous(), y, data.num_classes, data.name, data.to_data_units, data.data_range)


def _subset_indices(total: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_mix_seed(seed, "subset"))
    return torch.randperm(total, generator=gen)[:n].sort().values


def _mix_seed(*parts) -> int:
    """A 63-bit seed from any tuple of parts, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- named sets -----------------------------------------------------------------------------


def _sklearn_datasets():
    try:
        import sklearn.datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits, moons and swissroll data sets need scikit-learn "
                          "(pip install scikit-learn)") from err
    return sklearn.datasets


def _digits(n, seed) -> Data:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16), x = v / 8 - 1."""
    bunch = _sklearn_datasets().load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return _subset(Data(x, y, 10, "digits", Affine(8.0, 8.0), (0.0, 16.0)), n, seed)


def _standardised(name: str, raw: np.ndarray, y) -> Data:
    """(raw - mean) / rms, one scalar rms over both coordinates so the shape is not distorted."""
    raw = torch.as_tensor(raw, dtype=torch.float64)
    mean = raw.mean(0)
    rms = (raw - mean).pow(2).mean().sqrt()
    x = ((raw - mean) / rms).to(torch.float32)
    to_data = Affine(float(rms), tuple(mean.tolist()))
    labels = None if y is None else torch.as_tensor(y, dtype=torch.int64)
    num_classes = None if y is None else 2
    return Data(x, labels, num_classes, name, to_data, _observed_range(raw))


def _moons(n, seed) -> Data:
    x, y = _sklearn_datasets().make_moons(n_samples=n or TOY_DEFAULT_N, noise=0.05, random_state=seed)
    return _standardised("moons", x, y)


def _swissroll(n, seed) -> Data:
    x, _ = _sklearn_datasets().make_swiss_roll(n_samples=n or TOY_DEFAULT_N, noise=0.3, random_state=seed)
    return _standardised("swissroll", x[:, [0, 2]], None)


def _mixture(n, seed) -> Data:
    """Draws of GaussianMixture.ring2d (the same as its `sample` with this seed), labelled by mode."""
    mix = GaussianMixture.ring2d(VPSDE.linear())
    n = n or TOY_DEFAULT_N
    gen = torch.Generator().manual_seed(seed)
    k = torch.multinomial(mix.weights, n, replacement=True, generator=gen)  # as in mix.sample
    z = torch.randn((n, mix.dim), generator=gen, dtype=mix.means.dtype)
    x = (mix.means[k] + mix.stds[k, None] * z).to(torch.float32)
    return Data(x, k, len(mix.weights), "mixture", IDENTITY, _observed_range(x))


_NAMED = {"digits": _digits, "moons": _moons, "swissroll": _swissroll, "mixture": _mixture}


def _observed_range(x: torch.Tensor) -> tuple:
    return (float(x.min()), float(x.max()))


# ---- image folders --------------------------------------------------------------------------


def _load_image_folder(folder: Path) -> Data:
    """Every PNG/JPEG directly in `folder` (sorted by name), one size and one colour mode."""
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{str(folder)!r}: no PNG/JPEG images (and no CIFAR-10 data_batch_* files) in this folder")
    arrays = [_read_image(p) for p in files]
    _check_consistent(files, arrays)
    x = torch.from_numpy(np.stack(arrays))  # (N, H, W, C) uint8
    x = x.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    return Data(x.contiguous(), None, None, str(folder), EIGHT_BIT, EIGHT_BIT_RANGE)


def _read_image(path: Path) -> np.ndarray:
    """One image as uint8 (H, W, C), C = 1 (grayscale) or 3 (colour)."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("image folders need Pillow (pip install Pillow)") from err
    try:
        with Image.open(path) as img:
            img.load()
            mode, problem = img.mode, _mode_problem(img.mode, img.info)
            arr = None if problem else np.asarray(img.convert("L" if mode in ("L", "1") else "RGB"), dtype=np.uint8)
    except Exception as err:  # PIL raises several types for unreadable or truncated files
        raise ValueError(f"{str(path)!r}: not a readable PNG/JPEG image ({type(err).__name__}: {err})") from err
    if problem:
        raise ValueError(f"{str(path)!r}: {problem}")
    return arr[:, :, None] if arr.ndim == 2 else arr


def _mode_problem(mode: str, info: dict) -> str | None:
    """Why an image mode is refused, or None: 8-bit grayscale and colour only, no alpha."""
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in info):
        return f"has an alpha channel (mode {mode}); convert the images to RGB or grayscale first"
    if mode not in ("L", "RGB", "1", "P", "CMYK", "YCbCr"):
        return f"image mode {mode} is not supported; expected 8-bit grayscale or RGB"
    return None


def _check_consistent(files, arrays) -> None:
    first_file, first = files[0], arrays[0]
    for path, arr in zip(files[1:], arrays[1:]):
        if arr.shape[:2] != first.shape[:2]:
            raise ValueError(f"images of different sizes: {str(first_file)!r} is {first.shape[1]}x{first.shape[0]}, "
                             f"{str(path)!r} is {arr.shape[1]}x{arr.shape[0]}; resize them to one size first")
        if arr.shape[2] != first.shape[2]:
            kinds = {1: "grayscale", 3: "RGB"}
            raise ValueError(f"images of different colour modes: {str(first_file)!r} is {kinds[first.shape[2]]}, "
                             f"{str(path)!r} is {kinds[arr.shape[2]]}; convert them to one mode first")


# ---- CIFAR-10 python batches ----------------------------------------------------------------


def _cifar_dir(path: Path) -> Path | None:
    """The folder holding data_batch_* files: `path` itself or its cifar-10-batches-py child."""
    for candidate in (path, path / "cifar-10-batches-py"):
        if candidate.is_dir() and _cifar_batches(candidate):
            return candidate
    return None


def _cifar_batches(folder: Path) -> list:
    batches = [p for p in folder.glob("data_batch_*") if p.is_file() and p.name[len("data_batch_"):].isdigit()]
    return sorted(batches, key=lambda p: int(p.name[len("data_batch_"):]))


def _latin1_bytes(text, encoding="latin1"):
    """What Python 3 pickles (protocol < 3) use to rebuild bytes: _codecs.encode(text, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _numpy_globals() -> dict:
    """The only globals a CIFAR batch needs: numpy's array and dtype reconstruction."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, strings, numbers and numpy arrays; refuses every other global.

    A pickle can name any importable callable (os.system, say) and have it called while loading;
    here `find_class` resolves only numpy's array and dtype reconstruction and raises for the rest.
    """

    _allowed = None

    def find_class(self, module, name):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _numpy_globals()
        found = RestrictedUnpickler._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy array "
                                         "reconstruction is allowed in a CIFAR-10 batch")
        return found


def _read_cifar_batch(path: Path):
    """(uint8 (N, 3, 32, 32), int64 (N,)) from one CIFAR-10 python batch."""
    try:
        with open(path, "rb") as f:
            batch = RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a corrupt pickle raises many types; no code runs in any case
        raise ValueError(f"{str(path)!r}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{str(path)!r}: expected a dict with 'data' and 'labels', got {type(batch).__name__}")
    data, labels = _key(batch, "data", path), _key(batch, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{str(path)!r}: 'data' should be a uint8 array of shape (N, 3072), "
                         f"got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{str(path)!r}: 'labels' should be {data.shape[0]} integers in 0..9")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _key(batch: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"{str(path)!r}: CIFAR-10 batch without {key!r}; keys are {sorted(map(repr, batch))}")


def _load_cifar(folder: Path) -> Data:
    """All data_batch_<k> files of a cifar-10-batches-py folder (the test batch is not used)."""
    parts = [_read_cifar_batch(p) for p in _cifar_batches(folder)]
    images = np.concatenate([p[0] for p in parts])
    if len(images) == 0:
        raise ValueError(f"{str(folder)!r}: the CIFAR-10 batches hold no images")
    x = torch.from_numpy(images).to(torch.float32) / 127.5 - 1.0
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return Data(x, y, 10, str(folder), EIGHT_BIT, EIGHT_BIT_RANGE)


# ---- arrays ---------------------------------------------------------------------------------


def _load_npy(path: Path) -> Data:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:  # truncated header or data, object arrays, not an .npy at all
        raise ValueError(f"{str(path)!r}: not a readable .npy array ({type(err).__name__}: {err})") from err
    return _from_array(arr, None, path)


def _load_npz(path: Path) -> Data:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise KeyError(f"no array 'x'; arrays are {archive.files}")
            arr = archive["x"]
            labels = archive["y"] if "y" in archive.files else None
    except Exception as err:
        raise ValueError(f"{str(path)!r}: not a readable .npz with an array 'x' "
                         f"({type(err).__name__}: {err})") from err
    return _from_array(arr, labels, path)


def _from_array(arr: np.ndarray, labels, path: Path) -> Data:
    """uint8 arrays are 8-bit data (v / 127.5 - 1); float arrays are model units, kept as they are.

    Float arrays of images (3 or more dimensions) must lie in [-1, 1]; float vectors (N, D) may
    have any finite values. Other dtypes are refused. Shapes are kept: images as (N, C, H, W).
    """
    where = str(path)
    if arr.ndim < 2:
        raise ValueError(f"{where!r}: expected an array of shape (N, ...) with at least 2 dimensions, "
                         f"got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{where!r}: the array holds no samples (shape {arr.shape})")
    if arr.dtype == np.uint8:
        x = torch.from_numpy(arr).to(torch.float32) / 127.5 - 1.0
        to_data, data_range = EIGHT_BIT, EIGHT_BIT_RANGE
    elif np.issubdtype(arr.dtype, np.floating):
        x = torch.from_numpy(arr.astype(np.float32))
        to_data, data_range = IDENTITY, _check_float_range(x, where)
    else:
        raise ValueError(f"{where!r}: array of dtype {arr.dtype}; expected uint8 (0..255) or float "
                         "(model units, images in [-1, 1])")
    y, num_classes = _labels(labels, len(x), where)
    return Data(x.contiguous(), y, num_classes, where, to_data, data_range)


def _check_float_range(x: torch.Tensor, where: str) -> tuple:
    if not torch.isfinite(x).all():
        raise ValueError(f"{where!r}: the array holds NaN or infinite values")
    if x.ndim >= 3:
        if x.min() < -1 or x.max() > 1:
            raise ValueError(f"{where!r}: float images must lie in [-1, 1], found [{float(x.min()):.4g}, "
                             f"{float(x.max()):.4g}]; scale them, or save uint8 0..255")
        return (-1.0, 1.0)
    return _observed_range(x)


def _labels(labels, count: int, where: str):
    if labels is None:
        return None, None
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"{where!r}: 'y' should be {count} non-negative integers, got dtype {labels.dtype} "
                         f"and shape {labels.shape}")
    return torch.from_numpy(labels.astype(np.int64)), int(labels.max()) + 1


# ---- batches ---------------------------------------------------------------------------------


class BatchStream:
    """Endless (x, y) batches, epoch after epoch, for one rank of `world_size`.

    Each epoch is a fresh permutation drawn from a generator seeded by (seed, epoch); like
    torch's DistributedSampler, rank r takes positions r, r + W, r + 2W, ... of its first
    (N // W) * W entries, so the ranks see disjoint shares of equal size. drop_last=True drops
    each share's last partial batch (every batch is full); otherwise it comes out smaller.
    y is None for unlabelled data. Batches are index views of data.x (on data.x's device).

    `state_dict()` holds the epoch and the position within it; the ranks stay in step, so one
    rank's state resumes all of them, with exactly the batches an uninterrupted run would see.
    """

    def __init__(self, data: Data, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        _check_stream_args(data, batch_size, seed, rank, world_size)
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, bool(drop_last)
        self.share = len(data) // world_size
        rounding = math.floor if self.drop_last else math.ceil
        self.batches_per_epoch = rounding(self.share / batch_size)
        self.epoch, self.position = 0, 0
        self._cached = (None, None)  # (epoch, this rank's indices)

    def _indices(self) -> torch.Tensor:
        if self._cached[0] != self.epoch:
            gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
            perm = torch.randperm(len(self.data), generator=gen)
            mine = perm[self.rank:self.share * self.world_size:self.world_size]
            self._cached = (self.epoch, mine.to(self.data.x.device))
        return self._cached[1]

    def __iter__(self):
        return self

    def __next__(self):
        start = self.position * self.batch_size
        idx = self._indices()[start:start + self.batch_size]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        y = None if self.data.y is None else self.data.y[idx]
        return self.data.x[idx], y

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.data),
                "batch_size": self.batch_size, "world_size": self.world_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off.

        The seed and the data set size must match. With another batch size, world size or
        drop_last the position inside an epoch means nothing: the stream then starts at the next
        epoch boundary (with a warning), still on the saved seed's permutations.
        """
        missing = {"epoch", "position", "seed", "size"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}; expected a BatchStream.state_dict()")
        if state["seed"] != self.seed or state["size"] != len(self.data):
            raise ValueError(f"state: saved for seed={state['seed']} and {state['size']} items, but this stream "
                             f"has seed={self.seed} and {len(self.data)} items")
        epoch, position = int(state["epoch"]), int(state["position"])
        same = all(state.get(k) == getattr(self, k) for k in ("batch_size", "world_size", "drop_last"))
        if not same and position:
            warnings.warn("BatchStream: batch size, world size or drop_last changed since the state was "
                          f"saved; resuming at the start of epoch {epoch + 1}", stacklevel=2)
            epoch, position = epoch + 1, 0
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"state: epoch={epoch}, position={position} out of range "
                             f"(0 <= position < {self.batches_per_epoch})")
        self.epoch, self.position = epoch, position


def _check_stream_args(data, batch_size, seed, rank, world_size) -> None:
    if not isinstance(data, Data):
        raise TypeError(f"data={data!r}: expected a scoresde.train.data.Data (from load_data)")
    for name, value in (("batch_size", batch_size), ("seed", seed), ("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}={value!r}: expected an int")
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: expected an int >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected an int >= 1")
    if batch_size > len(data) // world_size:
        raise ValueError(f"batch_size={batch_size} is larger than each rank's share of the data set "
                         f"{data.name!r}: {len(data)} items / world_size={world_size} = "
                         f"{len(data) // world_size}; use batch_size <= {len(data) // world_size}")


def make_loader(data: Data, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                drop_last: bool = True) -> BatchStream:
    """An endless, resumable `BatchStream` of (x, y) batches for one rank (see BatchStream)."""
    return BatchStream(data, batch_size, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
