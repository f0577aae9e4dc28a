"""Writing result files. Atomic writes: a crash or an exception never leaves half a file, readers see the old or the new one.

One primitive (temp file in the same folder, then ``os.replace``) for every text/JSON/CSV the bundle writes;
checkpoints (bundle.handlers.atomic_torch_save) and figures (bundle.plots.save_figure) use the same pattern
with their own serialisers.
"""
from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Mapping, Sequence

__all__ = ["write_text_atomic", "rows_to_csv"]


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

