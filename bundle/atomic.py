"""Atomic file writing: a crash or an exception never leaves half a file, readers see the old or the new one.

One primitive (temp file in the same folder, then ``os.replace``) for every text/JSON/CSV the bundle writes;
checkpoints (bundle.handlers.atomic_torch_save) and figures (bundle.plots.save_figure) use the same pattern
with their own serialisers.
"""
from __future__ import annotations

import os
import tempfile

__all__ = ["write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> str:
    """Write ``text`` to ``path`` atomically (parent folders created). Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
