"""Long sampling runs written to disk chunk by chunk: flat memory, resumable after a kill, and
samples that do not depend on the chunking.

    run = sd.sample_to_disk(model, sde, 10_000, "samples/", sample_shape=(3, 32, 32), batch_size=500,
                            seed=0, solver="heun", steps=25)
    x = sd.load_samples("samples/")                       # (10000, 3, 32, 32)

The folder holds ``manifest.json`` (the run's arguments, written first) and ``chunk_000000.npy``,
``chunk_000001.npy``, ... (samples ``k * batch_size`` onwards), each written to a hidden temporary
file, fsync'd and renamed into place when it is finished: a chunk visible under its name is
complete. A rerun with the same arguments draws only the missing chunks; other arguments are
refused, naming what differs. One run writes to a folder at a time: `sample_to_disk` holds the
folder's lock (the hidden file ``.lock``) from start to end, and a second writer is refused with
`FolderLockedError`, naming the folder and the first writer's PID.

Sample i is drawn with its own generator, seeded from (seed, i), so it is the same sample whatever
the batch size, as long as the solver treats the samples of a batch independently (the adaptive ODE
solvers "dopri5" and "rk45" do not: one step size serves the whole batch) and the model's output
for a sample does not depend on the batch beside it (a network's batched matrix products may round
differently at another batch size; the analytic models in `scoresde.analytic` do not).

Under torchrun (``torchrun --nproc_per_node=N -m scoresde -- sample --out DIR/ ...``, or a script
in which every rank calls `sample_to_disk` with the same arguments: it is a collective), the ranks
split one run. Rank 0 holds the folder's lock for the whole run and checks or writes the manifest;
its decision, or its refusal (a locked folder, other arguments), reaches every rank before any
draw. Rank r draws the missing chunks k with k % N == r, each the same batch with the same
per-sample seeds as in one process, so the folder is the one a single process writes (bit for bit
where the arithmetic is the same: the same kind of device, and thread count where a kernel's
rounding depends on it; torchrun sets one thread per process unless told otherwise), and a run cut
short in one way is finished by a rerun in the other. A rank with no chunk to draw says so on
stderr and waits; all ranks meet at the end, and every rank returns the counts over all ranks. The
progress bar is rank 0's, counting its own share. If one rank fails (a NaN in its chunk), the
others finish their share, then every rank raises that error: no rank waits forever. A rank killed
outright is torchrun's to handle (it stops the others); the finished chunks stay and a rerun draws
the rest. All ranks must see the same folder (one machine, or a shared file system). The ``--``
keeps torchrun's own parser from taking ``--n`` for an abbreviation of its ``--nnodes``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .sde import VPSDE
from .solvers import sample
from . import _dist
from ._lock import FolderLockedError, folder_lock
from ._util import as_path, check_count
from .files import CheckpointError, config_differences, write_atomic
from .grids import TunedGrid

__all__ = ["ChunkedRun", "FolderLockedError", "load_samples", "sample_to_disk", "sample_seed"]

FORMAT, VERSION = "scoresde.samples", 1
MANIFEST = "manifest.json"
_CHUNK = re.compile(r"chunk_(\d{6,})\.npy")
_LEFTOVER = re.compile(r"\.(chunk_\d{6,}\.npy|manifest\.json)\.tmp-[0-9a-f]+")  # a killed writer's
# Arguments of `sample` that per-sample seeding replaces or that return something else.
_NOT_HERE = {"shape": "sample_shape and n", "x_T": "seed", "generator": "seed", "noise": "seed",
             "return_info": "the returned ChunkedRun"}
# Not compared on reruns: they do not change what is drawn (another device: up to rounding).
_NOT_RECORDED = ("callback", "device")


@dataclass
class ChunkedRun:
    """What `sample_to_disk` did: `drawn` chunks now, `skipped` found finished on disk."""

    out_dir: Path
    n: int
    chunks: int
    drawn: int
    skipped: int


def chunk_name(k: int) -> str:
    return f"chunk_{k:06d}.npy"


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit seed of sample `index` of a run seeded with `seed` (numpy's SeedSequence hash of
    the pair, so that neighbouring seeds give unrelated streams)."""
    low, high = np.random.SeedSequence((seed, index)).generate_state(2, np.uint32).tolist()
    return low | high << 32


def _check_sample_shape(sample_shape) -> tuple:
    if not isinstance(sample_shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in sample_shape):
        raise ValueError(f"sample_shape={sample_shape!r}: expected a tuple of ints >= 1, the shape of one "
                         "sample (no batch dimension)")
    return tuple(sample_shape)


def _recordable(name: str, value):
    """A `sample` argument as JSON data for the manifest: what a rerun must repeat."""
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, TunedGrid):  # checked against the run by `sample`; its times are what matter
        value = value.times
    if isinstance(value, torch.Tensor) and value.ndim == 1:  # an explicit grid of times
        return value.detach().to("cpu", torch.float64).tolist()
    raise TypeError(f"{name}={value!r}: sample_to_disk records its arguments to resume a run, and a "
                    f"{type(value).__name__} cannot be recorded; give a grid name or a 1-D tensor of times, "
                    "and plain numbers or strings for solver options")


def _run_args(sde, n, sample_shape, batch_size, seed, meta, sample_kwargs) -> dict:
    refused = sorted(set(sample_kwargs) & set(_NOT_HERE))
    if refused:
        raise TypeError(f"sample_to_disk got {', '.join(refused)}: use "
                        + "; ".join(f"{_NOT_HERE[k]} instead of {k}" for k in refused))
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta={meta!r}: expected a dict of JSON data (e.g. the model's path) or None")
    return {"n": n, "batch_size": batch_size, "sample_shape": list(sample_shape), "seed": seed, "sde": repr(sde),
            "sample": {k: _recordable(k, v) for k, v in sorted(sample_kwargs.items()) if k not in _NOT_RECORDED},
            "meta": meta}


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("args"), dict):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('version')!r}; this scoresde reads "
                              f"version {VERSION} or older: upgrade scoresde")
    _check_manifest_args(path, manifest["args"])
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_manifest_args(path: Path, args: dict):
    """The fields `load_samples` reads: a hand-edited or foreign manifest is an error naming the field,
    not a ZeroDivisionError, a KeyError or silently no samples."""
    for name in ("n", "batch_size"):
        if not _is_count(args.get(name)):
            shown = f"={args[name]!r}" if name in args else " is missing"
            raise CheckpointError(f"{path}: args.{name}{shown}: expected an int >= 1")
    shape = args.get("sample_shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        shown = f"={shape!r}" if "sample_shape" in args else " is missing"
        raise CheckpointError(f"{path}: args.sample_shape{shown}: expected a list of ints >= 1, the shape "
                              "of one sample")


def _chunks_on_disk(out: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in out.iterdir() if (m := _CHUNK.fullmatch(p.name)))


def _open_run(out: Path, args: dict):
    """Check `out` against this run's arguments, or start it: write the manifest, clear leftovers."""
    manifest = _read_manifest(out)
    finished = _chunks_on_disk(out)
    if manifest is None and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ValueError(f"out_dir={str(out)!r} is not empty and holds no {MANIFEST}: not a sample_to_disk "
                         "folder; choose a new or empty folder")
    if manifest is not None and finished:
        differences = config_differences(manifest["args"], args)
        if differences:
            raise CheckpointError(f"{out / MANIFEST}: {len(finished)} chunk(s) were drawn with other arguments "
                                  "('saved': theirs, 'expected': this call's; delete the folder or choose "
                                  "another to start afresh):\n  " + "\n  ".join(differences))
    elif manifest is None or manifest["args"] != args:  # nothing drawn yet: (re)start with these arguments
        body = {"format": FORMAT, "version": VERSION, "args": args}
        write_atomic(out / MANIFEST, json.dumps(body, indent=1, allow_nan=False).encode())
    for entry in out.iterdir():
        if _LEFTOVER.fullmatch(entry.name):
            entry.unlink(missing_ok=True)


def _write_chunk(path: Path, x: torch.Tensor):
    x = x.detach().to("cpu")
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16
        x = x.float()
    buffer = io.BytesIO()
    np.save(buffer, x.numpy(), allow_pickle=False)
    write_atomic(path, buffer.getvalue())


def sample_to_disk(model: Callable, sde: VPSDE, n: int, out_dir: str | os.PathLike, *,
                   sample_shape: Sequence[int], batch_size: int = 1000, seed: int = 0,
                   transform: Callable | None = None, meta: dict | None = None, progress: bool = True,
                   **sample_kwargs: object) -> ChunkedRun:
    """Draw `n` samples in chunks of at most `batch_size`, writing each chunk to `out_dir` as it finishes.

    A rerun with the same arguments draws only the chunks missing on disk. The folder's lock is held
    for the whole run: a second writer is refused and writes nothing. Under torchrun every rank
    calls it with the same arguments and draws its share of the chunks (see the module docstring).

    Args:
        model: a `Denoiser` or a callable model(x, t) -> eps, as for `sample`.
        sde: its schedule.
        n: how many samples.
        out_dir: the folder (created if needed; new, empty, or an earlier run of the same arguments).
        sample_shape: one sample's shape (no batch dimension).
        batch_size: samples per chunk.
        seed: sample i uses a generator seeded with `sample_seed(seed, i)` (see the module docstring
            for when the chunking cannot matter).
        transform: applied to each chunk before it is written (e.g. `Pretrained.to_data_units`);
            not recorded: say so in `meta`.
        meta: JSON data recorded in the manifest and compared on reruns.
        progress: a progress bar of samples.
        **sample_kwargs: passed to `sd.sample` (solver, steps, grid, t_end, dtype, device, solver
            options).

    Returns:
        A `ChunkedRun`: how many chunks there are, were drawn now and were found finished (over all
        ranks, on every rank, under torchrun).

    Raises:
        FolderLockedError: another process writes to `out_dir` (an OSError naming its PID).
        CheckpointError: the folder holds chunks drawn with other arguments, or a damaged manifest.
        FloatingPointError: the model returned NaN or inf; the chunks before it stay on disk.
            Under torchrun every rank raises what rank 0 refused or what a rank failed with.
    """
    out = as_path("out_dir", out_dir)
    n, batch_size = check_count("n", n, maximum=None), check_count("batch_size", batch_size, maximum=None)
    seed = check_count("seed", seed, minimum=0, maximum=None)
    sample_shape = _check_sample_shape(sample_shape)
    if transform is not None and not callable(transform):
        raise TypeError(f"transform={transform!r}: expected a callable chunk -> chunk, or None")
    args = _run_args(sde, n, sample_shape, batch_size, seed, meta, sample_kwargs)
    count = math.ceil(n / batch_size)
    with _dist.process_group(sample_kwargs.get("device")) as (rank, world), contextlib.ExitStack() as held:
        def claim() -> list[int]:  # rank 0 (the one process): lock, check or write the manifest
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(folder_lock(out))  # one writer at a time: a second run would mix its chunks
            _open_run(out, args)
            return _chunks_on_disk(out)

        done = set(_dist.on_main(claim))  # rank 0's decision (or refusal) on every rank, before any draw
        missing = [k for k in range(count) if k not in done]
        mine = [k for k in missing if k % world == rank]  # a fixed chunk -> rank map
        if missing and not mine:
            print(f"sample_to_disk: rank {rank} of {world} has no chunk to draw ({len(missing)} of {count} "
                  f"chunk(s) missing, {world} processes); waiting for the others", file=sys.stderr, flush=True)
        share = range(rank, count, world)  # this rank's chunks, finished or not: its bar's total
        drawn = _dist.on_every_rank(lambda: _draw_missing(
            model, sde, out, mine, share, n, sample_shape, batch_size, seed, transform, progress and rank == 0,
            sample_kwargs))
    return ChunkedRun(out, n, count, sum(drawn), count - sum(drawn))


def _draw_missing(model, sde, out: Path, todo: list[int], share, n, sample_shape, batch_size, seed, transform,
                  progress, sample_kwargs) -> int:
    """Draw and write the chunks `todo`; returns how many were drawn. The bar counts the samples of
    the chunks `share` (all of them in one process), those not in `todo` as done."""
    size = lambda k: min(batch_size, n - k * batch_size)  # noqa: E731
    total = sum(size(k) for k in share)
    with tqdm(total=total, initial=total - sum(size(k) for k in todo), unit="sample",
              disable=not progress, dynamic_ncols=True) as bar, torch.no_grad():
        for k in todo:
            first, last = k * batch_size, min(n, (k + 1) * batch_size)
            generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(first, last)]
            try:
                x = sample(model, sde, shape=(last - first, *sample_shape), generator=generators, **sample_kwargs)
            except FloatingPointError as e:
                raise FloatingPointError(f"chunk {k} (samples {first}..{last - 1}): {e}; the {k} chunk(s) "
                                         f"before it are in {out}") from None
            if transform is not None:
                x = transform(x)
                if tuple(x.shape) != (last - first, *sample_shape):
                    raise ValueError(f"transform: changed the chunk's shape to {tuple(x.shape)}; it must keep "
                                     f"{(last - first, *sample_shape)}")
            _write_chunk(out / chunk_name(k), x)
            bar.update(last - first)
    return len(todo)


def load_samples(out_dir, *, partial: bool = False) -> torch.Tensor:
    """The samples `sample_to_disk` wrote to `out_dir`, in order, as one tensor.

    partial: return the finished leading chunks of an unfinished run instead of raising.
    Raises `CheckpointError` naming the file for a missing, unreadable or misshapen chunk.
    """
    out = as_path("out_dir", out_dir)
    manifest = _read_manifest(out) if out.is_dir() else None
    if manifest is None:
        raise CheckpointError(f"{out}: no {MANIFEST}: not a folder written by sample_to_disk")
    args = manifest["args"]
    n, batch_size, shape = args["n"], args["batch_size"], tuple(args["sample_shape"])
    chunks = []
    for k in range(math.ceil(n / batch_size)):
        path = out / chunk_name(k)
        if not path.is_file():
            if partial:
                break
            raise CheckpointError(f"{path}: missing: the run is unfinished (rerun sample_to_disk with the same "
                                  "arguments, or load_samples(..., partial=True))")
        expected = (min(batch_size, n - k * batch_size), *shape)
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise CheckpointError(f"{path}: not a readable .npy file ({e})") from None
        if x.shape != expected or (chunks and x.dtype != chunks[0].dtype):
            raise CheckpointError(f"{path}: holds {x.dtype} samples of shape {x.shape}, expected shape {expected}"
                                  + (f" and dtype {chunks[0].dtype}, as in the chunks before it" if chunks else ""))
        chunks.append(x)
    if not chunks:
        return torch.empty((0, *shape))
    return torch.from_numpy(np.concatenate(chunks))
