"""Atomic writes: a crash, a kill or an exception never leaves half a file; readers see the old file or the new one.

One primitive, :func:`atomic_path` (write to a temp file in the same folder, then ``os.replace``), serves every
writer the bundle has: text, JSON, CSV, torch checkpoints and matplotlib figures. Every writer takes the
destination path first.

A process killed mid-write (SIGKILL, power loss) leaves its temp file behind. Temp files are named
``.<name>.tmp-<pid>@<host>.<random><suffix>`` so that :func:`remove_stale_temp_files` can tell an orphan (its
process is dead on this host, or it is older than ``max_age_hours``) from a write in progress; training removes
the orphans in its output folder at start (:func:`bundle.run_identity.claim_output_dir`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass

__all__ = [
    "atomic_path",
    "write_text_atomic",
    "write_json_atomic",
    "torch_save_atomic",
    "save_figure_atomic",
    "rows_to_csv",
    "read_json",
    "file_sha256",
    "json_default",
    "TEMP_TAG",
    "temp_file_owner",
    "stale_temp_files",
    "remove_stale_temp_files",
]

TEMP_TAG = ".tmp-"  # .<name>.tmp-<pid>@<host>.<random><suffix>
_TEMP_RE = re.compile(r"^\..*\.tmp-(\d+)@([A-Za-z0-9_-]*)\.[^/]*$")


def _host_tag() -> str:
    """This host's name as it appears in temp-file names: [A-Za-z0-9_-] only, at most 32 characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32]


def _temp_prefix(path: str) -> str:
    # the name is cut so that prefix + mkstemp's 8 random characters + a suffix stay within NAME_MAX (255)
    return f".{os.path.basename(path)[:160]}{TEMP_TAG}{os.getpid()}@{_host_tag()}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any exception it is removed.

    ``suffix`` keeps the extension a serialiser may need (matplotlib picks the format from it).
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> str:
    """Write ``text`` (UTF-8, newlines untranslated) to ``path`` atomically. Returns the absolute path."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return os.path.abspath(os.fspath(path))


def json_default(o):
    """JSON for the values results are made of: numpy scalars and arrays, dataclasses; anything else as ``str``."""
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    if hasattr(o, "item") and getattr(o, "ndim", 0) == 0:  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_json_atomic(
    path: str | os.PathLike,
    obj,
    indent: int | None = 1,
    sort_keys: bool = False,
    allow_nan: bool = True,
    default=json_default,
    fsync: bool = False,
) -> str:
    """Write ``obj`` as JSON atomically. The text is built with one ``json.dumps`` before anything is written
    (with ``indent=None`` that is the C encoder: ~20x faster than ``json.dump`` on a 112k-record datalist)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default) + "\n"
    return write_text_atomic(path, text, fsync=fsync)


def read_json(path: str | os.PathLike):
    """The JSON in ``path``, or None when it is missing or unreadable (atomic writes: never half a file)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def torch_save_atomic(path: str | os.PathLike, obj) -> str:
    """``torch.save(obj)`` atomically (checkpoints, models/model.pt)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return os.path.abspath(os.fspath(path))


def save_figure_atomic(path: str | os.PathLike, fig, dpi: int = 120, close: bool = True) -> str:
    """Save a matplotlib figure atomically (format from ``path``'s extension), then close it."""
    import matplotlib.pyplot as plt

    ext = os.path.splitext(os.fspath(path))[1] or ".png"
    try:
        with atomic_path(path, suffix=ext) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        if close:
            plt.close(fig)
    return os.fspath(path)


def rows_to_csv(rows: Sequence[Mapping]) -> str:
    """CSV text of a list of dicts: columns in first-seen order over all rows; NaN and missing cells are empty."""
    buf = io.StringIO()
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    return buf.getvalue()


def temp_file_owner(name: str) -> tuple[int, str] | None:
    """``(pid, host)`` of a temp file name made by :func:`atomic_path`, None for any other name."""
    m = _TEMP_RE.match(os.path.basename(name))
    return (int(m.group(1)), m.group(2)) if m else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


def stale_temp_files(folder: str | os.PathLike, recursive: bool = True, max_age_hours: float = 24.0) -> list[str]:
    """Orphaned :func:`atomic_path` temp files under ``folder``: made on this host by a process that is gone, or
    (any host) last modified more than ``max_age_hours`` ago. A live writer's temp file is never listed."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    host, now, out = _host_tag(), time.time(), []
    walker = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for root, _dirs, names in walker:
        for name in names:
            owner = temp_file_owner(name)
            if owner is None:
                continue
            path = os.path.join(root, name)
            try:
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                age_h = (now - os.path.getmtime(path)) / 3600.0
            except OSError:  # removed meanwhile (its write finished)
                continue
            pid, from_host = owner
            if (from_host == host and pid != os.getpid() and not _pid_alive(pid)) or age_h > max_age_hours:
                out.append(path)
    return sorted(out)


def remove_stale_temp_files(
    folder: str | os.PathLike, recursive: bool = True, max_age_hours: float = 24.0
) -> list[str]:
    """Remove :func:`stale_temp_files` under ``folder``; returns the removed paths."""
    removed = []
    for path in stale_temp_files(folder, recursive=recursive, max_age_hours=max_age_hours):
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's content, read in 1 MiB blocks: the one digest of datalists, weights and checkpoints."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
