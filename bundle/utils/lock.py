"""One file lock for the bundle: an exclusive ``flock`` on a file beside what it protects.

flock locks are released by the kernel when the last process holding the descriptor exits, so a crashed or killed
process never leaves a stale lock behind. NFS clients emulate flock with POSIX locks. On a platform without
``fcntl`` (Windows) the lock is a no-op: single-process use only.

Two ways to hold it: :func:`file_lock` for a ``with`` block, :func:`hold_lock` for the rest of the process (a
training run's output folder). Both can write a one-line note naming the holder (pid, host, start time, command)
into the lock file; :func:`lock_holder` reads it back for the "in use by ..." message of whoever is refused.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator

__all__ = ["file_lock", "hold_lock", "release_lock", "lock_holder", "holder_note"]

_HELD: dict[str, int] = {}  # path -> fd of the locks this process holds until it exits (hold_lock)


def holder_note() -> str:
    """One line naming this process: pid, host, start time and command (what a refused process is told)."""
    cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
    return f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')} ({cmd})"


def _write_note(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder_note() + "\n").encode(), 0)


def lock_holder(path: str | os.PathLike) -> str:
    """The note the current holder wrote into the lock file ("unknown holder" when it wrote none)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            note = f.readline().strip()
    except OSError:
        note = ""
    return note or "an unknown holder (the lock file names none)"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, blocking: bool = True, owner_note: bool = False) -> Iterator[int | None]:
    """Hold an exclusive lock on ``path`` (created with its folder) for the ``with`` block.

    Yields the open file descriptor (a child process given it with ``pass_fds`` keeps the lock alive), or None
    when ``blocking=False`` and another process holds the lock. ``owner_note`` writes :func:`holder_note` into the
    file.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield -1
        return
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        try:
            if owner_note:
                _write_note(fd)
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def hold_lock(path: str | os.PathLike) -> int | None:
    """Take the exclusive lock on ``path`` without blocking and keep it until this process exits (or
    :func:`release_lock`). Returns the fd, or None when another process holds it. Writes :func:`holder_note`.

    Idempotent within a process. The descriptor is not inherited by exec'd children (PEP 446); a forked child (a
    DataLoader worker) shares it, which keeps the lock only as long as that child lives.
    """
    path = os.path.abspath(os.fspath(path))
    if path in _HELD:
        return _HELD[path]
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    _write_note(fd)
    _HELD[path] = fd
    return fd


def release_lock(path: str | os.PathLike) -> None:
    """Release a lock taken with :func:`hold_lock` (process exit does it anyway)."""
    fd = _HELD.pop(os.path.abspath(os.fspath(path)), None)
    if fd is not None and fd >= 0:
        os.close(fd)  # closing the last descriptor of the open file releases the flock
