"""Reading and writing datalist files: :func:`load` (parse, validate, normalise) and :func:`save` (atomic).

The file stays readable by ``monai.data.load_decathlon_datalist``: relative paths resolve against the
datalist's folder by the same rule.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass

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

__all__ = ["load", "save", "strict_json_default"]

logger = logging.getLogger(__name__)


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


def load(path: str | os.PathLike, check_images: bool = False, strict: bool = True) -> dict:
    """Read, validate and normalise a datalist file.

    Relative ``image`` and mask ``path`` values become absolute (against the datalist's folder); sex
    becomes "M"/"F"/"unknown", age a number or None, labels lists of 1/0/-1. Errors raise
    :class:`DatalistError` listing every problem; with ``strict=False`` they are logged and returned
    in ``datalist["_problems"]`` instead.
    """
    path = os.path.abspath(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise DatalistError(
            f"{path}: datalist file not found; give the path of the datalist JSON "
            "(e.g. scripts/make_synthetic.py or scripts/prepare_data.py writes one)",
            path=path,
        ) from None
    except json.JSONDecodeError as e:
        raise DatalistError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            "fix the syntax (comments and trailing commas are not allowed in JSON)",
            path=path,
        ) from e
    base_dir = os.path.dirname(path)
    problems = validate(raw, base_dir=base_dir, check_images=check_images)
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
