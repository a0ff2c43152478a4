"""Training data: named data sets, image folders, CIFAR-10 batches and arrays, and a resumable
batch stream that shards each epoch across the ranks of a distributed run.

Model units. Images become float32 (N, C, H, W) in [-1, 1]: 8-bit values v map to v / 127.5 - 1,
scikit-learn's digits (integers 0..16) to v / 8 - 1. The 2-D toy sets "moons" and "swissroll" are
standardised: minus the sample's per-coordinate mean, divided by one scalar (the root mean square
of the centred coordinates), so the shape keeps its aspect ratio and has unit overall scale.
"mixture" is `scoresde.analytic.GaussianMixture.ring2d` left as it is (radius 1), so the exact
mixture stays the ground truth in model units. Every `Data` carries `to_data_units`, the inverse
map back to the data set's own units.

Fashion-MNIST (Zalando's 70,000 28x28 grayscale clothing images, 10 classes) is read from the IDX
files it is distributed as: "fashion" (the training split, 60,000 images) and "fashion-test" (the
test split, 10,000) find the folder through the environment variable SCORESDE_FASHION_MNIST, else
/usr/share/datasets/fashion-mnist (Debian's package dataset-fashion-mnist); "fashion:FOLDER" and
"fashion-test:FOLDER" name it; a plain path to such a folder reads its training split. The IDX
reader takes gzip or raw files and checks the header against the file's real size before it
reads: a crafted or truncated file is refused naming it, and nothing larger than the file can
hold is allocated.

Nothing is downloaded: digits ship with scikit-learn, the toy sets are generated, everything else
is read from a local path. Pickled CIFAR-10 batches go through a restricted unpickler that runs
nothing and builds no numpy object: the one uint8 array is rebuilt from its checked bytes.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import pickletools
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..analytic import GaussianMixture
from ..sde import VPSDE
from ..units import EIGHT_BIT, IDENTITY, Affine

DATASETS = ("digits", "moons", "swissroll", "mixture", "fashion", "fashion-test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TOY_DEFAULT_N = 10_000


class DataPathError(FileNotFoundError, ValueError):
    """A data path that does not exist (catchable as FileNotFoundError or ValueError)."""


# ---- the result type ------------------------------------------------------------------------
EIGHT_BIT_RANGE = (0.0, 255.0)  # the data range of EIGHT_BIT's images


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

    source: one of DATASETS, "fashion:FOLDER" or "fashion-test:FOLDER" (Fashion-MNIST's training or
    test split from that folder of IDX files), or a path to a folder of PNG/JPEG images, a
    Fashion-MNIST folder (its training split), a CIFAR-10 python folder (holding data_batch_1..5,
    or its parent), or a .npy/.npz file. Names win over same-named folders in the working
    directory (write "./digits" for the folder). "fashion" and "fashion-test" look for the folder
    in $SCORESDE_FASHION_MNIST, else in /usr/share/datasets/fashion-mnist.
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
    if isinstance(source, str) and source.partition(":")[0] in FASHION_SPLITS and ":" in source:
        name, _, folder = source.partition(":")
        return _subset(_fashion_from(folder, name, source), n, seed)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source={source!r}: expected a data set name {DATASETS} or a path")
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and os.sep not in source and "/" not in source and not path.suffix:
            raise ValueError(f"source={source!r}: unknown data set; expected one of {DATASETS}, "
                             "'fashion:FOLDER', or a path to an image folder, a Fashion-MNIST or CIFAR-10 "
                             "folder, or a .npy/.npz file")
        raise DataPathError(2, "data path does not exist", str(source))
    return _subset(_read_path(path), n, seed)


def _read_path(path: Path) -> Data:
    if path.is_dir():
        if _is_fashion_dir(path):
            return _load_fashion(path, "train", str(path))
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


def _fashion(n, seed) -> Data:
    """Fashion-MNIST's training split (60,000 images) from the folder _find_fashion finds."""
    return _subset(_load_fashion(_find_fashion("fashion"), "train", "fashion"), n, seed)


def _fashion_test(n, seed) -> Data:
    """Fashion-MNIST's test split (10,000 images), held-out real data for evaluation."""
    return _subset(_load_fashion(_find_fashion("fashion-test"), "test", "fashion-test"), n, seed)


_NAMED = {"digits": _digits, "moons": _moons, "swissroll": _swissroll, "mixture": _mixture,
          "fashion": _fashion, "fashion-test": _fashion_test}


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


# A batch is a pickle of {b'batch_label': bytes, b'labels': [int], b'data': uint8 array (N, 3072),
# b'filenames': [bytes]}, written by Python 2's cPickle (protocol 2) from numpy 1. Loading a pickle
# calls what it names, and numpy's array and dtype reconstruction trust their arguments: a crafted
# dtype state makes an object array over raw bytes, a segfault once anything reads it. So nothing
# numpy is built from the file. The unpickler turns numpy's calls into inert records of their
# arguments, and _cifar_pixels rebuilds the one uint8 array from its bytes after checking them.

_CIFAR_ROW = 3 * 32 * 32  # bytes per image: the red, green and blue planes, 32 x 32 each
_CIFAR_KEYS = ("data", "labels", "filenames", "batch_label")
# The opcodes of real batches, protocols 0-5 and Python 2 or 3: numbers, strings, tuples, lists,
# dicts, the memo, globals, calls (REDUCE) and BUILD. No sets, floats, extensions or out-of-band buffers.
_PICKLE_OPS = frozenset("""PROTO FRAME STOP MARK NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG
    LONG1 LONG4 STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINBYTES
    SHORT_BINBYTES BINBYTES8 BYTEARRAY8 EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND
    APPENDS EMPTY_DICT DICT SETITEM SETITEMS PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET
    GLOBAL STACK_GLOBAL REDUCE BUILD""".split())
_MEMO_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_OPCODES = {op.code.encode("latin1"): op for op in pickletools.opcodes}
_MAX_TUPLE_DEPTH = 8  # real batches nest tuples two deep (a shape inside an array's state)
# numpy's pickle of dtype('uint8'): dtype('u1', align=False, copy=True), then BUILD with its state
# (version 3, byte order '|', no subarray, names or fields, elsize and alignment -1, no flags)
_UINT8_ARGS = (("u1", 0, 1), ("|u1", 0, 1))
_UINT8_STATE = (3, "|", None, None, None, -1, -1, 0)


def _pickle_ops(blob: bytes):
    """Yield (opcode info, argument, byte offset) for each opcode up to STOP, running nothing.

    pickletools.genops, but refusing an opcode outside _PICKLE_OPS before reading its argument, and
    leaving strings undecoded (_read_arg): genops decodes Python 2's quoted strings as ASCII, and
    decoding the 30 MB of pixels a Python 3 protocol-2 pickle holds as text takes a second.
    """
    f = io.BytesIO(blob)
    while True:
        pos, code = f.tell(), f.read(1)
        op = _OPCODES.get(code)
        if not code:
            raise pickle.UnpicklingError(f"the pickle ends at byte {pos}, before its STOP")
        if op is None or op.name not in _PICKLE_OPS:
            name = f"opcode {op.name}" if op is not None else f"byte {code!r}"
            raise pickle.UnpicklingError(f"{name} at byte {pos} does not occur in CIFAR-10 batches")
        yield op, _read_arg(f, op, len(blob)), pos
        if op.name == "STOP":
            return


# struct formats of the length before a string argument, by pickletools' argument kinds
_LENGTH_PREFIX = {pickletools.TAKEN_FROM_ARGUMENT1: "<B", pickletools.TAKEN_FROM_ARGUMENT4: "<i",
                  pickletools.TAKEN_FROM_ARGUMENT4U: "<I", pickletools.TAKEN_FROM_ARGUMENT8U: "<Q"}


def _read_arg(f: io.BytesIO, op, size: int):
    """Read past `op`'s argument in `f` (of `size` bytes); returns it, or for a string its length."""
    if op.arg is None:
        return None
    if op.name in ("STRING", "UNICODE"):  # protocol 0's strings: a line each
        if not f.readline().endswith(b"\n"):
            raise pickle.UnpicklingError(f"a {op.name} without its newline")
        return None
    prefix = _LENGTH_PREFIX.get(op.arg.n)
    if prefix is None:  # numbers, memo keys, module and name lines: read and decoded by pickletools
        return op.arg.reader(f)
    head = f.read(struct.calcsize(prefix))
    length = struct.unpack(prefix, head)[0] if len(head) == struct.calcsize(prefix) else -1
    if not 0 <= length <= size - f.tell():
        raise pickle.UnpicklingError(f"a truncated {op.name} argument at byte {f.tell()}")
    f.seek(length, io.SEEK_CUR)
    return length


def _check_pickle_ops(blob: bytes) -> None:
    """Refuse opcodes that real batches do not use, and tuples nested deeper than _MAX_TUPLE_DEPTH.

    The opcodes are decoded, none is run. The depth limit guards CPython itself: hashing a dict
    key of a million nested tuples recurses in C until the stack overflows. Depths are followed on
    a simulated stack and memo, where the unpickler would hold the objects.

    Raises:
        pickle.UnpicklingError: an opcode outside _PICKLE_OPS, a stack underflow, or deep tuples.
        ValueError: a truncated argument (from pickletools' readers).
    """
    stack, marks, memo = [], [], {}  # the tuple depth of each object; MARK positions; memo key -> depth
    for op, arg, pos in _pickle_ops(blob):
        if op.name in _MEMO_PUT:  # these leave the stack as it is
            if len(stack) <= _floor(marks):
                raise pickle.UnpicklingError(f"opcode {op.name} at byte {pos} with nothing to memoise")
            memo[len(memo) if op.name == "MEMOIZE" else arg] = stack[-1]
            continue
        if op.name in _MEMO_GET and arg not in memo:
            raise pickle.UnpicklingError(f"opcode {op.name} at byte {pos} reads memo key {arg}, never written")
        if _apply_op(stack, marks, op, memo[arg] if op.name in _MEMO_GET else 0, pos) > _MAX_TUPLE_DEPTH:
            raise pickle.UnpicklingError(f"tuples nested more than {_MAX_TUPLE_DEPTH} deep at byte {pos}")


def _floor(marks: list) -> int:
    """The lowest stack position an opcode may pop: just above the last MARK (as CPython's unpickler)."""
    return marks[-1] if marks else 0


def _apply_op(stack: list, marks: list, op, memo_depth: int, pos: int) -> int:
    """Apply `op`'s stack effect (from pickletools' opcode table) to the simulated stack.

    memo_depth is the depth of the memo entry a GET would push.

    Returns:
        The tuple depth of what `op` pushes: 0 when that is nothing, or no tuple.
    """
    before, popped = op.stack_before, []
    if pickletools.markobject in before:  # pops the items down to the last MARK, then the ones below it
        if not marks:
            raise pickle.UnpicklingError(f"opcode {op.name} at byte {pos} without a MARK")
        start = marks.pop()
        popped, stack[start:] = stack[start:], []
        before = before[:before.index(pickletools.markobject)]
    start = len(stack) - len(before)
    if start < _floor(marks):
        raise pickle.UnpicklingError(f"opcode {op.name} at byte {pos} finds too few objects on the stack")
    popped, stack[start:] = stack[start:] + popped, []
    if pickletools.markobject in op.stack_after:  # MARK itself
        marks.append(len(stack))
        return 0
    if op.name == "BUILD":  # BUILD leaves its object (popped[0]) on the stack
        depth = popped[0]
    elif op.stack_after == [pickletools.pytuple]:
        depth = 1 + max(popped, default=0)
    else:
        depth = memo_depth if op.name in _MEMO_GET else 0
    stack.extend([depth] * len(op.stack_after))
    return depth


class _Marker:
    """A named placeholder: numpy.ndarray (which a pickle may pass to _reconstruct but never call)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_NDARRAY = _Marker("numpy.ndarray")
_UNSET = _Marker("(none)")  # a record's state before BUILD
_OTHER = _Marker("(other)")  # what _plain makes of anything that is not a plain number, text or tuple


class _Record:
    """An inert stand-in for the numpy object a pickle asks for: the call, its arguments, BUILD's state.

    Attributes:
        call: "numpy.dtype", "_reconstruct" (numpy's array pickle, protocols 0-4) or "_frombuffer"
            (protocol 5).
        args: the arguments the pickle passed, as they came.
        state: what BUILD passed afterwards (numpy sets a dtype's byte order and an array's shape,
            dtype and bytes this way), or _UNSET.
    """

    __slots__ = ("call", "args", "state")

    def __init__(self, call: str, args: tuple):
        self.call, self.args, self.state = call, args, _UNSET

    def __setstate__(self, state):
        # BUILD lands here (the class defines __setstate__), so it can only record, and only once
        if self.state is not _UNSET:
            raise pickle.UnpicklingError(f"refusing a second BUILD on {self.call}(...)")
        self.state = state

    def __repr__(self) -> str:
        return _brief(self)


def _recorder(call: str) -> Callable:
    """What find_class returns for numpy's `call`: a function that records its arguments, builds nothing.

    A plain function, not a class: NEWOBJ needs a class, and REDUCE may only call it.
    """
    def record(*args):
        return _Record(call, args)

    return record


def _latin1_bytes(text, encoding="latin1"):
    """What Python 3 pickles (protocol < 3) use to rebuild bytes: _codecs.encode(text, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _cifar_globals() -> dict:
    """The globals a CIFAR batch names (numpy 1 and 2 spell the module two ways), and their stand-ins."""
    allowed = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _recorder("numpy.dtype"),
               ("_codecs", "encode"): _latin1_bytes}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = _recorder("_reconstruct")
        allowed[(f"{package}.numeric", "_frombuffer")] = _recorder("_frombuffer")
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, strings and numbers; numpy's arrays and dtypes become _Records.

    A pickle can name any importable callable (os.system, say) and have it called while loading;
    here `find_class` resolves only the names a CIFAR batch uses, to stand-ins that build nothing,
    and raises for the rest. Run _check_pickle_ops on the bytes first: it refuses what this class
    cannot (tuples nested deep enough to crash CPython when hashed).
    """

    _allowed = _cifar_globals()

    def find_class(self, module, name):
        found = self._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy array "
                                         "reconstruction is allowed in a CIFAR-10 batch")
        return found


def _plain(value, depth: int = 0):
    """`value` with bytes read as text and bools as ints, to compare with what numpy writes.

    Python 2 batches hold b'u1' and 0 where Python 3 pickles hold 'u1' and False. Tuples are
    mapped item by item; anything but None, int, str, bytes, bool and _NDARRAY becomes _OTHER.
    """
    kind = type(value)
    if kind is tuple and depth < _MAX_TUPLE_DEPTH:
        return tuple(_plain(v, depth + 1) for v in value)
    if kind is bytes:
        return value.decode("latin1")
    if kind is bool:
        return int(value)
    if kind in (int, str) or value is None or value is _NDARRAY:
        return value
    return _OTHER


def _brief(value, depth: int = 0) -> str:
    """A short description of an unpickled value for an error message: never a long or deep repr."""
    kind = type(value)
    if kind in (str, bytes, bytearray):
        return repr(value) if len(value) <= 32 else f"{kind.__name__} of length {len(value)}"
    if kind is int:
        return repr(value) if abs(value) < 10 ** 18 else "a large int"
    if value is None or kind is bool:
        return repr(value)
    if kind is tuple:
        if depth >= 3 or len(value) > 10:
            return f"a tuple of {len(value)}"
        items = [_brief(v, depth + 1) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if kind is _Record:
        if depth >= 2:  # its arguments would be cut short
            return f"{value.call}(...)"
        state = "" if value.state is _UNSET else f" with state {_brief(value.state, depth + 1)}"
        return f"{value.call}{_brief(value.args, depth + 1)}{state}"
    if kind is _Marker:
        return value.name
    if kind in (list, dict):
        return f"a {kind.__name__} of {len(value)}"
    return f"a {kind.__name__}"


def _unpickle_cifar(path: Path):
    """The object a batch file pickles, numpy's arrays and dtypes as _Records.

    Raises:
        ValueError: naming the file, for an unreadable file, bytes that are no pickle, or a pickle
            that uses anything a CIFAR batch does not.
    """
    try:
        blob = path.read_bytes()
        _check_pickle_ops(blob)
        return RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as err:  # a corrupt pickle raises many types; no code runs in any case
        raise ValueError(f"{str(path)!r}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from err


def _cifar_fields(batch, path: Path) -> dict:
    """{name: value} of a batch dict, with bytes keys read as text (Python 3 batches may use str).

    Raises:
        ValueError: not a dict, a key other than _CIFAR_KEYS (or one twice), no 'data' or 'labels'.
    """
    if type(batch) is not dict:
        raise ValueError(f"{str(path)!r}: expected a dict with 'data' and 'labels', got {type(batch).__name__}")
    fields = {}
    for key in batch:
        name = key.decode("latin1") if type(key) is bytes else key
        if type(name) is not str or name not in _CIFAR_KEYS or name in fields:
            raise ValueError(f"{str(path)!r}: unexpected key {_brief(key)} in a CIFAR-10 batch; expected each of "
                             f"{_CIFAR_KEYS} at most once")
        fields[name] = batch[key]
    for key in ("data", "labels"):
        if key not in fields:
            raise ValueError(f"{str(path)!r}: CIFAR-10 batch without {key!r}; keys are {sorted(map(repr, batch))}")
    return fields


def _cifar_pixels(value, path: Path) -> np.ndarray:
    """The uint8 (N, 3072) array the 'data' record describes, rebuilt here from its bytes.

    Raises:
        ValueError: naming the file and what it holds, unless 'data' is a uint8 array of shape
            (N, 3072) pickled the way numpy pickles one.
    """
    where = f"{str(path)!r}: 'data'"
    if type(value) is not _Record or value.call == "numpy.dtype":
        raise ValueError(f"{where} should be a uint8 array of shape (N, {_CIFAR_ROW}), got {_brief(value)}")
    shape, dtype, raw = (_reconstruct_parts if value.call == "_reconstruct" else _frombuffer_parts)(value, where)
    if type(dtype) is not _Record or dtype.call != "numpy.dtype" or _plain(dtype.args) not in _UINT8_ARGS \
            or _plain(dtype.state) != _UINT8_STATE:
        raise ValueError(f"{where} should have dtype uint8, got {_brief(dtype)}")
    if type(raw) is str:  # numpy takes the bytes as latin-1 text too (Python 2 strings read as str)
        try:
            raw = raw.encode("latin1")
        except UnicodeEncodeError:
            raise ValueError(f"{where} holds text beyond latin-1 where its bytes should be") from None
    shaped = type(shape) is tuple and len(shape) == 2 and all(type(s) is int for s in shape) \
        and shape[0] >= 0 and shape[1] == _CIFAR_ROW
    if not shaped or len(raw) != shape[0] * _CIFAR_ROW:
        raise ValueError(f"{where} should have shape (N, {_CIFAR_ROW}) and N * {_CIFAR_ROW} bytes, got shape "
                         f"{_brief(shape)} and {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _reconstruct_parts(record: _Record, where: str) -> tuple:
    """(shape, dtype, bytes) from numpy's pickle for protocols 0-4: _reconstruct(ndarray, (0,), b'b'),
    then BUILD with (1, shape, dtype, is_fortran=False, bytes)."""
    state = record.state
    if _plain(record.args) != (_NDARRAY, (0,), "b") or type(state) is not tuple or len(state) != 5 \
            or _plain(state[0]) != 1 or _plain(state[3]) != 0 or type(state[4]) not in (bytes, str):
        raise ValueError(f"{where} is not an array as numpy pickles one: got {_brief(record)}")
    return state[1], state[2], state[4]


def _frombuffer_parts(record: _Record, where: str) -> tuple:
    """(shape, dtype, bytes) from numpy's pickle for protocol 5: _frombuffer(bytes, dtype, shape, 'C')."""
    args = record.args
    if len(args) != 4 or type(args[0]) not in (bytes, bytearray) or _plain(args[3]) != "C" \
            or record.state is not _UNSET:
        raise ValueError(f"{where} is not an array as numpy pickles one: got {_brief(record)}")
    return args[2], args[1], args[0]


def _list_problem(value, count: int, ok: Callable) -> str | None:
    """None if `value` is a list of `count` items that each pass `ok`; else what is wrong with it."""
    if type(value) is not list:
        return _brief(value)
    if len(value) != count:
        return f"a list of {len(value)}"
    for i, item in enumerate(value):
        if not ok(item):
            return f"item {i} = {_brief(item)}"
    return None


def _cifar_labels(labels, count: int, path: Path) -> np.ndarray:
    """int64 (count,) from the batch's list of class indices."""
    problem = _list_problem(labels, count, lambda v: type(v) is int and 0 <= v <= 9)
    if problem is not None:
        raise ValueError(f"{str(path)!r}: 'labels' should be a list of {count} ints in 0..9, got {problem}")
    return np.array(labels, dtype=np.int64)


def _check_cifar_names(fields: dict, count: int, path: Path) -> None:
    """'filenames' (count byte strings) and 'batch_label' (a byte string) go unused, but must be text."""
    text = (bytes, str)  # str where a Python 3 user wrote the batch with str values
    problem = _list_problem(fields["filenames"], count, lambda v: type(v) in text) if "filenames" in fields else None
    if problem is not None:
        raise ValueError(f"{str(path)!r}: 'filenames' should be a list of {count} byte strings, got {problem}")
    if type(fields.get("batch_label", b"")) not in text:
        raise ValueError(f"{str(path)!r}: 'batch_label' should be a byte string, got "
                         f"{_brief(fields['batch_label'])}")


def _read_cifar_batch(path: Path):
    """(uint8 (N, 3, 32, 32), int64 (N,)) from one CIFAR-10 python batch.

    Raises:
        ValueError: naming the file and what was found, for anything but what real batches hold.
    """
    fields = _cifar_fields(_unpickle_cifar(path), path)
    data = _cifar_pixels(fields["data"], path)
    labels = _cifar_labels(fields["labels"], len(data), path)
    _check_cifar_names(fields, len(data), path)
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(folder: Path) -> Data:
    """All data_batch_<k> files of a cifar-10-batches-py folder (the test batch is not used)."""
    parts = [_read_cifar_batch(p) for p in _cifar_batches(folder)]
    images = np.concatenate([p[0] for p in parts])
    if len(images) == 0:
        raise ValueError(f"{str(folder)!r}: the CIFAR-10 batches hold no images")
    x = torch.from_numpy(images).to(torch.float32) / 127.5 - 1.0
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return Data(x, y, 10, str(folder), EIGHT_BIT, EIGHT_BIT_RANGE)


# ---- IDX files and Fashion-MNIST ------------------------------------------------------------

# IDX (the format of LeCun's MNIST and Zalando's Fashion-MNIST): a big-endian magic number 00 00
# <type> <number of dimensions>, one big-endian uint32 size per dimension, then the values, C order.
_IDX_TYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
_IDX_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
# Deflate expands at most about 1032:1, so a gzip file of S bytes cannot hold more than this times S.
_DEFLATE_MAX_RATIO = 1032
_IDX_CHUNK = 1 << 20

# The split -> (images file, labels file), as Zalando distributes them (each also as NAME.gz).
FASHION_SPLITS = {"fashion": "train", "fashion-test": "test"}
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_ENV = "SCORESDE_FASHION_MNIST"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_CLASSES = 10


def read_idx(path) -> np.ndarray:
    """The uint8 array an IDX file holds, gzip-compressed (found by its magic bytes 1f 8b) or raw.

    The header's sizes are checked against the file's real size before the data is read: a raw
    file must hold exactly the header and prod(sizes) bytes; a gzip file may hold no more than
    deflate's largest expansion of its size, and is read in chunks that stop one byte past what
    the header promises, so a crafted header allocates nothing the file does not hold.

    Raises:
        ValueError: naming the file: not an IDX header, a type other than uint8 (0x08), a size that
            differs from the header's (truncated, or trailing bytes), or a corrupt gzip stream.
    """
    path = Path(path)
    with path.open("rb") as raw:
        file_size = os.fstat(raw.fileno()).st_size
        gzipped = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if not gzipped:
            return _read_idx_stream(raw, path, file_size, gzipped=False)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return _read_idx_stream(stream, path, file_size, gzipped=True)
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # a corrupt or cut-off gzip stream
            raise ValueError(f"{str(path)!r}: not a readable gzip file ({type(err).__name__}: {err})") from err


def _read_idx_stream(f, path: Path, file_size: int, gzipped: bool) -> np.ndarray:
    """The array from the IDX stream `f` (the file itself, or its decompressed gzip stream)."""
    where = str(path)
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[3] == 0:
        raise ValueError(f"{where!r}: not an IDX file: it starts with {magic.hex(' ') or '(nothing)'}; expected "
                         "00 00, a type code and the number of dimensions (>= 1)")
    if magic[2] != _IDX_UINT8:
        kind = _IDX_TYPES.get(magic[2], "an unknown type")
        raise ValueError(f"{where!r}: IDX data of type 0x{magic[2]:02x} ({kind}); only 0x08 (uint8) is supported")
    ndim = magic[3]
    head = f.read(4 * ndim)
    if len(head) != 4 * ndim:
        raise ValueError(f"{where!r}: truncated IDX header: {ndim} dimensions need {4 * ndim} bytes of sizes, "
                         f"the file holds {len(head)}")
    shape = struct.unpack(f">{ndim}I", head)
    expected = math.prod(shape)
    if gzipped:
        if expected > _DEFLATE_MAX_RATIO * file_size:
            raise ValueError(f"{where!r}: the IDX header promises shape {shape}, {expected} bytes, more than a "
                             f"gzip file of {file_size} bytes can hold")
        data = _read_at_most(f, expected + 1)
    else:
        have = file_size - 4 - 4 * ndim
        if have != expected:
            _idx_size_error(where, shape, expected, have)
        data = f.read(expected)
    if len(data) != expected:
        _idx_size_error(where, shape, expected, len(data), at_least=gzipped)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _idx_size_error(where: str, shape: tuple, expected: int, have: int, at_least: bool = False):
    """Raise for IDX data of another size than the header's (truncated, or with trailing bytes)."""
    if have < expected:
        raise ValueError(f"{where!r}: truncated IDX file: the header promises shape {shape}, {expected} bytes of "
                         f"data, but the file holds {have}")
    more = "more" if at_least else f"{have - expected}"
    raise ValueError(f"{where!r}: IDX file with trailing bytes: the header promises shape {shape}, {expected} "
                     f"bytes of data, and {more} bytes follow them")


def _read_at_most(f, limit: int) -> bytes:
    """Up to `limit` bytes of the stream `f`, read in chunks (no buffer of `limit` bytes up front)."""
    chunks, total = [], 0
    while total < limit:
        chunk = f.read(min(_IDX_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _fashion_file(folder: Path, name: str) -> Path | None:
    """folder/name, else folder/name.gz, else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _is_fashion_dir(folder: Path) -> bool:
    """Whether `folder` holds any of Fashion-MNIST's four IDX files (raw or .gz)."""
    return any(_fashion_file(folder, name) is not None for pair in FASHION_FILES.values() for name in pair)


def _find_fashion(source: str) -> Path:
    """The Fashion-MNIST folder for `source` ("fashion" or "fashion-test"): $SCORESDE_FASHION_MNIST
    when set (it must then be a folder), else Debian's /usr/share/datasets/fashion-mnist.

    Raises:
        DataPathError: the variable names no folder, or it is unset and the system folder is absent.
    """
    env = os.environ.get(FASHION_ENV)
    if env:
        if not Path(env).is_dir():
            raise DataPathError(f"source={source!r}: {FASHION_ENV}={env!r} is not a folder; point it at the "
                                "folder holding Fashion-MNIST's IDX files, or unset it")
        return Path(env)
    if FASHION_SYSTEM_DIR.is_dir():
        return FASHION_SYSTEM_DIR
    raise DataPathError(f"source={source!r}: no Fashion-MNIST folder found: {FASHION_ENV} is not set and "
                        f"{str(FASHION_SYSTEM_DIR)!r} does not exist; install it (apt install "
                        f"dataset-fashion-mnist), set {FASHION_ENV}=FOLDER, or write source='{source}:FOLDER' "
                        "for a folder holding Zalando's four IDX files")


def _fashion_from(folder: str, name: str, source: str) -> Data:
    """The split `name` ("fashion" or "fashion-test") from the folder of a "fashion:FOLDER" source."""
    if not folder:
        raise ValueError(f"source={source!r}: expected {name}:FOLDER, a folder holding Fashion-MNIST's IDX files")
    path = Path(folder)
    if not path.is_dir():
        raise DataPathError(2, f"source={source!r}: Fashion-MNIST folder does not exist or is not a folder",
                            folder)
    return _load_fashion(path, FASHION_SPLITS[name], name)


def _load_fashion(folder: Path, split: str, name: str) -> Data:
    """One split of a Fashion-MNIST folder: images (N, 1, H, W) as v / 127.5 - 1, labels 0..9.

    Raises:
        DataPathError: the split's images or labels file is missing (raw or .gz).
        ValueError: naming the file: what read_idx refuses, images that are not (N, H, W) or hold
            none, labels that are not (N,) for the images' N, or a label outside 0..9.
    """
    images_name, labels_name = FASHION_FILES[split]
    files = [_fashion_file(folder, images_name), _fashion_file(folder, labels_name)]
    missing = [n for n, f in zip((images_name, labels_name), files) if f is None]
    if missing:
        raise DataPathError(f"{str(folder)!r}: no {' or '.join(f'{m}[.gz]' for m in missing)} in this folder; a "
                            f"Fashion-MNIST folder holds {', '.join(n for p in FASHION_FILES.values() for n in p)} "
                            "(each raw or .gz)")
    images_file, labels_file = files
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"{str(images_file)!r}: expected images of shape (N, height, width) with N >= 1, got "
                         f"shape {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{str(labels_file)!r}: expected {len(images)} labels, one per image of "
                         f"{str(images_file)!r}, got shape {labels.shape}")
    bad = np.flatnonzero(labels >= FASHION_CLASSES)
    if len(bad):
        raise ValueError(f"{str(labels_file)!r}: label {labels[bad[0]]} at index {bad[0]} is outside "
                         f"0..{FASHION_CLASSES - 1} ({len(bad)} such labels)")
    x = torch.from_numpy(images.astype(np.float32))[:, None] / 127.5 - 1.0
    y = torch.from_numpy(labels.astype(np.int64))
    return Data(x.contiguous(), y, FASHION_CLASSES, name, EIGHT_BIT, EIGHT_BIT_RANGE)


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
