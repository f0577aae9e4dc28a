"""The datalist: one JSON format for every dataset (docs/datalist.md).

:func:`load` parses, resolves relative paths against the datalist's directory, normalises sex / age /
labels and validates; :func:`validate` returns every :class:`Problem` at once; :func:`save` writes
atomically; :func:`summarize` / :func:`format_summary` count what a datalist holds. The format and its
validation are in :mod:`.schema`, reading and writing in :mod:`.io`, the counts in :mod:`.summary`.
"""

from bundle.data.datalist.io import MAX_DEPTH, load, loads_bytes, save, strict_json_default
from bundle.data.datalist.schema import (
    AGE_BINS,
    ATTENTION_TYPES,
    FRAME_FIX,
    MAX_PIXELS,
    METADATA_KEYS,
    DatalistError,
    Problem,
    age_group,
    age_scheme,
    coco_rle_counts,
    frame_missing,
    frame_missing_message,
    normalize_age,
    normalize_label,
    resolve_path,
    split_names,
    validate,
)
from bundle.data.datalist.summary import format_summary, summarize

__all__ = [
    "ATTENTION_TYPES",
    "AGE_BINS",
    "FRAME_FIX",
    "MAX_DEPTH",
    "MAX_PIXELS",
    "METADATA_KEYS",
    "DatalistError",
    "Problem",
    "age_group",
    "age_scheme",
    "coco_rle_counts",
    "format_summary",
    "frame_missing",
    "frame_missing_message",
    "load",
    "loads_bytes",
    "normalize_age",
    "normalize_label",
    "resolve_path",
    "save",
    "split_names",
    "strict_json_default",
    "summarize",
    "validate",
]
