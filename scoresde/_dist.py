"""Many processes under torchrun: the process group, which rank does what, and how ranks agree.

    with process_group() as (rank, world):      # (0, 1) and nothing started without torchrun
        found = on_main(lambda: check_folder())  # rank 0 decides; its result or its error on every rank
        mine = shard(items)                      # items[rank::world]
        results = on_every_rank(lambda: work(mine))   # every rank's result, or every rank raises
        if is_main():
            report(results)

One process is the case of world size 1: every helper is then a plain call (no collective, no
pickling, errors raised as they are). Under torchrun (``RANK`` and ``WORLD_SIZE`` in the
environment) every rank must make the same calls in the same order: the helpers are collectives.

A rank that fails alone must not leave the others waiting forever in a collective it never
joins. `on_main` and `on_every_rank` catch the error where it happens and hand it to every rank in
the collective they share, so every rank raises: the deciding or failing rank its own error, the
others a copy (or, when the error does not survive pickling, a RuntimeError with its type and
message). Errors raised that way ended the run together on every rank; `process_group` then
waits for the others before it destroys the group, since gloo aborts a process whose peer closes
the connection under it. What these helpers cannot catch (a rank killed by a signal, a segfault,
an error outside them) is torchrun's to handle: it stops the remaining workers when one exits
with an error.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["barrier", "broadcast_from_main", "gather_to_main", "is_main", "local_device", "on_every_rank",
           "on_main", "process_group", "rank_and_world", "shard"]

T = TypeVar("T")
_TOGETHER = "_scoresde_raised_on_every_rank"  # set on an error every rank raised at the same point


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): the default process group's when one is initialised, else torchrun's
    ``RANK`` and ``WORLD_SIZE``; (0, 1) without either."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this is rank 0 (the one process without torchrun)."""
    return rank_and_world()[0] == 0


def local_device(device: str) -> str:
    """A plain "cuda" under torchrun with many processes: this process's GPU, cuda:LOCAL_RANK (torchrun
    starts one process per GPU). Any other device is returned as given."""
    if device == "cuda" and rank_and_world()[1] > 1 and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _backend(device) -> str:
    """nccl for work on CUDA (device None: whenever CUDA is available, as the training loop chose it);
    gloo otherwise."""
    if not torch.cuda.is_available():
        return "gloo"
    on_cuda = device is None or (getattr(device, "type", None) or str(device).split(":")[0]) == "cuda"
    return "nccl" if on_cuda else "gloo"


@contextlib.contextmanager
def process_group(device: str | torch.device | None = None,
                  ended_together: Callable[[BaseException], bool] | None = None) -> Iterator[tuple[int, int]]:
    """Yield (rank, world size) for the `with` block; under torchrun, with the default process group
    initialised (gloo on CPU, nccl for `device` on CUDA, or with no device whenever CUDA is available),
    unless one is already.

    A group started here is left in order: after a block that ended together on every rank (it
    returned; or it raised an error that `on_main` or `on_every_rank` raised on every rank, or that
    `ended_together(error)` says every rank raised at the same point), each rank waits for the others
    (a barrier) before the group is destroyed. After any other error it is destroyed at once: the
    other ranks may be anywhere, and torchrun stops them. A group found initialised is left alone.
    """
    if "RANK" not in os.environ:
        yield rank_and_world()
        return
    started = not dist.is_initialized()
    if started:
        backend = _backend(device)
        if backend == "nccl" and "LOCAL_RANK" in os.environ:  # one GPU per process: "cuda" means ours
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, **_fresh_rendezvous())
    together = False
    try:
        yield rank_and_world()
        together = True
    except BaseException as error:
        together = getattr(error, _TOGETHER, False) or (ended_together is not None and ended_together(error))
        raise
    finally:
        if started:
            if together:
                dist.barrier()
            dist.destroy_process_group()


_GROUPS_STARTED = 0  # by `process_group` in this process: each gets keys of its own in the store


def _fresh_rendezvous() -> dict:
    """torchrun's store (env://), under a prefix of this group's own. The default group's keys in the
    store do not go away with the group, and a group started again under the same names can read
    the last one's (a rank then connects to a peer's closed port: "Gloo connectFullMesh failed ...
    Connection refused", or hangs). Every rank starts the same groups in the same order (the
    helpers are collectives), so the n-th group has the same prefix on every rank."""
    global _GROUPS_STARTED
    store, rank, world = next(dist.rendezvous("env://"))
    _GROUPS_STARTED += 1
    return {"store": dist.PrefixStore(f"scoresde/group{_GROUPS_STARTED}", store), "rank": rank, "world_size": world}


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: ``items[rank::world]`` (all of them in one process). The shares
    are disjoint, cover `items`, and do not depend on anything but the rank and the world size."""
    rank, world = rank_and_world()
    return list(items[rank::world])


def _object_device() -> torch.device | None:
    """Where the object collectives stage their bytes: the current GPU under nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0; None on the others ([obj] in one
    process)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    found = [None] * world if rank == 0 else None
    dist.gather_object(obj, found, dst=0)
    return found


def _all_gather(obj: T) -> list[T]:
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    found = [None] * world
    dist.all_gather_object(found, obj)
    return found


def broadcast_from_main(obj: T) -> T:
    """Rank 0's `obj` (picklable) on every rank (`obj` itself in one process)."""
    rank, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_object_device())
    return box[0]


def barrier():
    """Wait until every rank gets here (nothing in one process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling as itself, else a RuntimeError carrying its type and message."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:  # noqa: BLE001 (anything pickling can raise)
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")


def _raise_together(error: BaseException, origin: BaseException | None = None):
    """Raise `error` (every rank raises at this point): marked for `process_group`."""
    try:
        setattr(error, _TOGETHER, True)
    except AttributeError:  # an exception type with __slots__: it still raises, the barrier is skipped
        pass
    if origin is error:
        raise error
    raise error from None


def on_main(decide: Callable[[], T]) -> T:
    """`decide()` on rank 0; its result on every rank, or its error raised on every rank (the ranks
    that did not decide raise a copy). Ranks 1.. must not go on into a collective that rank 0, having
    refused (a locked folder, arguments that differ from a run on disk), never joins.

    In one process: `decide()`, its errors raised as they are.
    """
    rank, world = rank_and_world()
    if world == 1:
        return decide()
    own, outcome = None, [None, None]
    if rank == 0:
        try:
            outcome[0] = decide()
        except Exception as error:  # noqa: BLE001 (every error must reach the other ranks)
            own, outcome = error, [None, _portable(error)]
    dist.broadcast_object_list(outcome, src=0, device=_object_device())
    if own is not None:
        _raise_together(own, own)
    if outcome[1] is not None:
        error = outcome[1]
        if hasattr(error, "add_note"):  # Python 3.11+: the traceback says where it came from
            error.add_note(f"(raised on rank 0 of {world}; this is rank {rank})")
        _raise_together(error)
    return outcome[0]


def on_every_rank(work: Callable[[], T]) -> list[T]:
    """`work()` on every rank; every rank's result in rank order on every rank, or, if `work` raised
    on any rank, an error on every rank: the failing rank its own, the others a copy of the error of
    the lowest failing rank. Every rank waits here until all have finished `work` (a barrier).

    In one process: ``[work()]``, its errors raised as they are.
    """
    rank, world = rank_and_world()
    if world == 1:
        return [work()]
    own = None
    try:
        mine = (work(), None)
    except Exception as error:  # noqa: BLE001 (every error must reach the other ranks)
        own = error
        mine = (None, _portable(error))
    found = _all_gather(mine)
    failed = [r for r, (_, error) in enumerate(found) if error is not None]
    if own is not None:
        _raise_together(own, own)
    if failed:
        error = found[failed[0]][1]
        if hasattr(error, "add_note"):  # Python 3.11+: the traceback says where it came from
            error.add_note(f"(raised on rank {failed[0]} of {world}; this is rank {rank})")
        _raise_together(error)
    return [result for result, _ in found]
