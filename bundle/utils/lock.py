"""One file lock for the bundle: an exclusive ``flock`` on a file beside what it protects.

flock locks are released by the kernel when the last process holding the descriptor exits, so a crashed or killed
process never leaves a stale lock behind. NFS clients emulate flock with POSIX locks. On a platform without
``fcntl`` (Windows) the lock is a no-op: single-process use only.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

__all__ = ["file_lock"]


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, blocking: bool = True, owner_note: bool = False) -> Iterator[int | None]:
    """Hold an exclusive lock on ``path`` (created with its folder) for the ``with`` block.

    Yields the open file descriptor (a child process given it with ``pass_fds`` keeps the lock alive), or None
    when ``blocking=False`` and another process holds the lock. ``owner_note`` writes "host pid N" into the file.
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
                os.ftruncate(fd, 0)
                os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
