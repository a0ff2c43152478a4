"""One writer per folder: an exclusive lock that a sampling or training run holds from start to end.

    with folder_lock(out):      # FolderLockedError (an OSError) if another process holds it
        ...                     # write into `out`

The lock is the hidden file ``<folder>/.lock`` (the folder scans of `chunked` and the checkpoint
code skip names starting with '.'), holding the holder's PID. It never blocks: a second writer is
refused at once, with the folder and that PID.

How it is held, per platform:

- POSIX: ``fcntl.flock`` on the file. The kernel drops the lock when the holder exits, however it
  dies, so the file a SIGKILLed run leaves behind never blocks the next one.
- Windows: ``msvcrt.locking`` on one byte past the PID (a locked byte cannot be read), with the
  same guarantee.
- Neither (some embedded Pythons): the file is created with O_CREAT | O_EXCL and its existence is
  the lock; a killed holder leaves it behind, and the refusal says to delete it when no process
  with that PID runs.

An advisory lock binds only writers that take it (every writer in scoresde does). On a network
file system the lock is as good as the server's lock support; where taking it fails for another
reason than a holder (ENOLCK, EOPNOTSUPP), the run goes on unlocked with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import os
import time
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows, or no locking at all
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

__all__ = ["FolderLockedError", "folder_lock", "LOCK_NAME"]

LOCK_NAME = ".lock"
_WINDOWS_BYTE = 1 << 16  # the byte msvcrt locks: past any PID text, so the PID stays readable
_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK}


class FolderLockedError(OSError):
    """Another process (PID `pid`, None if unknown) is writing to `folder`."""

    def __init__(self, folder, pid: int | None, hint: str = ""):
        self.folder, self.pid, self.hint = Path(folder), pid, hint
        who = f"another process (PID {pid})" if pid is not None else "another process"
        super().__init__(f"{folder}: {who} is writing to this folder; wait until it finishes, or choose "
                         f"another folder{hint}")

    def __reduce__(self):  # pickles with its own arguments (a distributed run sends it to every rank)
        return type(self), (self.folder, self.pid, self.hint)


def _lock_fd(fd: int) -> bool:
    """Lock the open file `fd` without blocking: True if this process holds it now, False if another
    does. Raises OSError where the file system cannot lock."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, _WINDOWS_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as e:
        if e.errno in _BUSY:
            return False
        raise
    return True


def _read_pid(fd: int) -> int | None:
    """The PID the holder wrote; it may not have written it yet, so look a few times."""
    for attempt in range(5):
        os.lseek(fd, 0, os.SEEK_SET)
        first = os.read(fd, 64).split(b"\n", 1)[0]
        if first.strip().isdigit():
            return int(first)
        time.sleep(0.01 * (attempt + 1))
    return None


def _write_pid(fd: int):
    """Write our PID over the file's start, then cut what an earlier holder left after it: a reader
    sees the old first line or ours, never a mix of the two."""
    text = f"{os.getpid()}\n".encode()
    try:
        if hasattr(os, "pwrite"):
            os.pwrite(fd, text, 0)
        else:
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, text)
        os.ftruncate(fd, len(text))
    except OSError:  # a full disk: the PID is for the error message of another writer, the lock holds
        pass


def _still_named(fd: int, path: Path) -> bool:
    """Whether `path` still names the file `fd` has open (a releasing holder unlinks it)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _acquire(path: Path) -> int | None:
    """Open and lock `path`; returns the descriptor, or None where the file system cannot lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        try:
            locked = _lock_fd(fd)
        except OSError as e:
            os.close(fd)
            warnings.warn(f"{path.parent}: cannot take the writer's lock {path.name} ({e.strerror or e}); "
                          "going on without it: make sure no other run writes to this folder", stacklevel=4)
            return None
        if not locked:
            pid = _read_pid(fd)
            os.close(fd)
            raise FolderLockedError(path.parent, pid)
        if _still_named(fd, path):
            _write_pid(fd)
            return fd
        os.close(fd)  # we locked a file its last holder had just removed: take the new one


def _release(fd: int, path: Path):
    # Remove the name while still holding the lock, then unlock by closing: whoever opened the old
    # file in between finds it unnamed (`_still_named`) and starts over with a new one.
    if os.name != "nt":
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        return
    with contextlib.suppress(OSError):
        os.lseek(fd, _WINDOWS_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    os.close(fd)
    with contextlib.suppress(OSError):  # Windows refuses while another process has it open: it stays
        os.unlink(path)


@contextlib.contextmanager
def _exclusive_file(path: Path):
    """The fallback without any OS lock: the file's existence is the lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    except FileExistsError:
        try:
            pid = int(path.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            pid = None
        raise FolderLockedError(path.parent, pid, f" (if no such process runs, a killed run left {path} "
                                                  "behind: delete it)") from None
    try:
        _write_pid(fd)
        yield path
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def folder_lock(folder):
    """Hold the exclusive writer's lock of `folder` (which must exist) for the `with` block.

    Raises `FolderLockedError` naming the folder and the holder's PID if another writer holds it.
    The lock file is removed on release.
    """
    path = Path(folder) / LOCK_NAME
    if fcntl is None and msvcrt is None:
        with _exclusive_file(path):
            yield path
        return
    fd = _acquire(path)
    try:
        yield path
    finally:
        if fd is not None:
            _release(fd, path)
