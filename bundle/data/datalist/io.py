"""Reading and writing datalist files: :func:`load` (parse, validate, normalise) and :func:`save` (atomic).

The file stays readable by ``monai.data.load_decathlon_datalist``: relative paths resolve against the
datalist's folder by the same rule.

Hostile files end in a :class:`DatalistError` naming the file: it must be a regular file (not a device or a FIFO),
UTF-8 (a BOM is accepted; the error gives the byte offset of the first bad byte), and nested at most
:data:`MAX_DEPTH` levels (checked on the bytes before ``json.loads`` recurses).
"""

from __future__ import annotations

import codecs
import copy
import json
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass

import numpy as np

from bundle.data.datalist.schema import (
    DatalistError,
    Problem,
    normalize_age,
    normalize_label,
    resolve_path,
    split_names,
    validate,
)
from bundle.demographics import sex_label
from bundle.utils.atomic import write_json_atomic

__all__ = ["MAX_DEPTH", "load", "loads_bytes", "save", "strict_json_default"]

logger = logging.getLogger(__name__)

#: deepest JSON nesting a datalist may have (a datalist needs 5: top, split, record, attention list, coords)
MAX_DEPTH = 64
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _max_depth(data: bytes) -> int:
    """Maximum bracket nesting of JSON text: a fast scan of the raw bytes (bytes.translate keeps only the brackets,
    numpy sums them). Callers confirm an excess with the strings removed (brackets in file names count here)."""
    b = np.frombuffer(data.translate(None, _NOT_BRACKETS), np.uint8)
    if b.size == 0:
        return 0
    step = np.where((b == ord("[")) | (b == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(step).max())


def _decode(data: bytes, path: str) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)) or (
        len(data) >= 2 and (data[0] == 0 or data[1] == 0)
    ):
        raise DatalistError(
            f"{path}: the datalist is UTF-16/UTF-32 encoded (byte offset 0: {data[:4]!r}), not UTF-8; "
            "save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8, or open(..., encoding='utf-8') when writing)",
            path=path,
        )
    try:
        return data.decode("utf-8-sig")  # a UTF-8 BOM is accepted
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 4]
        raise DatalistError(
            f"{path}: not UTF-8 at byte offset {e.start} ({bad!r}: {e.reason}; latin-1 / Windows-1252 text?); "
            "save it as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8, or open(..., encoding='utf-8') when writing)",
            path=path,
        ) from None


def loads_bytes(data: bytes, path: str = "datalist", max_depth: int = MAX_DEPTH):
    """Parse datalist bytes: UTF-8 (BOM accepted), nesting <= ``max_depth``, strict JSON. Raises DatalistError."""
    text = _decode(data, path)
    if _max_depth(data) > max_depth and _max_depth(_STRING.sub("", text).encode("utf-8")) > max_depth:
        raise DatalistError(
            f"{path}: JSON nested deeper than {max_depth} levels; a datalist needs about 5 "
            "(top, split, record, attention, coords): the file is damaged or not a datalist",
            path=path,
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatalistError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            "fix the syntax (comments and trailing commas are not allowed in JSON)",
            path=path,
        ) from e
    except RecursionError:  # nesting hidden from the byte scan (should not happen): still a precise error
        raise DatalistError(
            f"{path}: JSON nested too deeply to parse; the file is damaged or not a datalist", path=path
        ) from None


def _normalize(datalist: dict, base_dir: str) -> dict:
    out = copy.deepcopy(datalist)
    n = len(out.get("classes") or []) or None
    for split in split_names(out):
        for rec in out[split]:
            if not isinstance(rec, dict):
                continue
            if isinstance(rec.get("image"), str) and rec["image"]:
                rec["image"] = resolve_path(rec["image"], base_dir)
            try:
                rec["label"] = normalize_label(rec.get("label"), n)
            except ValueError:
                pass  # reported by validate; left as is
            rec["sex"] = sex_label(rec.get("sex"))
            rec["age"] = normalize_age(rec.get("age"))
            for att in rec.get("attention") or []:
                if isinstance(att, dict) and isinstance(att.get("path"), str) and att["path"]:
                    att["path"] = resolve_path(att["path"], base_dir)
    return out


def _format(problems: list[Problem], path: str | None) -> str:
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    head = f"{path or 'datalist'}: {len(errors)} error(s), {len(warnings)} warning(s)"
    lines = [head] + [f"  {p}" for p in errors]
    if warnings:
        groups = Counter((p.code, p.key.split("[")[0] if p.key else None) for p in warnings)
        lines.append("  warnings (counted):")
        for (code, key), count in groups.most_common():
            ex = next(p for p in warnings if p.code == code and (p.key.split("[")[0] if p.key else None) == key)
            lines.append(f"    {count} x {code or key}, e.g. {ex}")
    return "\n".join(lines)


def _read(path: str) -> bytes:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise DatalistError(
            f"{path}: datalist file not found; give the path of the datalist JSON "
            "(e.g. scripts/make_synthetic.py or scripts/prepare_data.py writes one)",
            path=path,
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise DatalistError(
            f"{path}: not a regular file (a directory, device or FIFO); give the path of the datalist JSON file",
            path=path,
        )
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DatalistError(f"{path}: cannot be read ({e}); check permissions and the mount", path=path) from e


def load(
    path: str | os.PathLike,
    check_images: bool = False,
    strict: bool = True,
    data_root: str | os.PathLike | None = None,
    required_splits=(),
    max_pixels: int | None = None,
) -> dict:
    """Read, validate and normalise a datalist file.

    Relative ``image`` and mask ``path`` values become absolute (against the datalist's folder); sex
    becomes "M"/"F"/"unknown", age a number or None, labels lists of 1/0/-1. Errors raise
    :class:`DatalistError` listing every problem; with ``strict=False`` they are logged and returned
    in ``datalist["_problems"]`` instead. ``data_root``, ``required_splits`` and ``max_pixels`` are passed to
    :func:`validate`. The file must be UTF-8 (BOM accepted) and nested at most :data:`MAX_DEPTH` levels.
    """
    path = os.path.abspath(os.fspath(path))
    raw = loads_bytes(_read(path), path)
    base_dir = os.path.dirname(path)
    problems = validate(
        raw,
        base_dir=base_dir,
        check_images=check_images,
        data_root=data_root,
        required_splits=required_splits,
        max_pixels=max_pixels,
    )
    errors = [p for p in problems if p.severity == "error"]
    if errors and strict:
        raise DatalistError(_format(problems, path), problems, path)
    if not isinstance(raw, dict):
        raise DatalistError(_format(problems, path), problems, path)
    out = _normalize(raw, base_dir)
    if problems:
        log = logger.error if errors else logger.warning
        log("%s", _format(problems, path))
    if not strict:
        out["_problems"] = problems
    return out


def strict_json_default(o):
    """JSON for numpy scalars/arrays and dataclasses; anything else is an error (a datalist holds plain values).

    With ``allow_nan=False`` this is the strict writing of datalists and conversion summaries: an unserialisable
    value or a NaN raises before anything is written (:func:`bundle.utils.atomic.write_json_atomic`).
    """
    if is_dataclass(o):
        return asdict(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"datalist value of type {type(o).__name__} is not JSON serialisable: {o!r}")


def save(datalist: Mapping, path: str | os.PathLike, indent: int | None = 1) -> str:
    """Write a datalist atomically; NaN/inf and unserialisable values raise before anything is written.

    Values are written as given (make paths relative to the datalist's folder first for a portable
    dataset); keys starting with "_" (e.g. ``_problems``) are not written. ``indent=None`` writes one line
    (fastest, what the converters use for large datasets).
    """
    data = {k: v for k, v in datalist.items() if not str(k).startswith("_")}
    return write_json_atomic(path, data, indent=indent, allow_nan=False, default=strict_json_default)
