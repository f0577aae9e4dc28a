"""Shared machinery of the dataset converters (bundle.data.converters.<dataset>).

Every converter reads the files of one public chest X-ray dataset exactly as distributed, maps its findings to
the bundle's conditions, and hands a list of datalist records to :func:`finalize`, which splits by patient,
selects classes, makes paths relative, writes the datalist atomically and writes a summary beside it.

What lives here and why:
- :class:`ConversionError`: the one exception users see for bad input; the message names the file, the
  column or file that is missing, what was found instead, and the fix.
- :class:`ConversionReport`: bad rows are *counted and reported with examples* (file line numbers) instead of
  crashing on the first one; :func:`finalize` prints it and stores it in the summary.
- header matching (:func:`match_columns`): case-insensitive, whitespace-tolerant, with per-column aliases, so
  known variants (``Patient Gender`` / ``Patient Sex``, ``LabelCUIS`` / ``labelCUIS``) read the same.
- vectorised parsers for ages, sexes and tri-state labels (pandas, no per-row Python): the full NIH table
  must convert in seconds. Sex and age *semantics* are bundle.demographics' (sex_label, AGE_PATTERN,
  AGE_MIN/AGE_MAX); these add the bad-row reporting. Summaries and writing are bundle.data.datalist's
  (summarize, format_summary, save); :func:`write_datalist` writes a datalist and its summary.
- the converters' command-line options and :func:`~bundle.data.converters.registry.prepare` are in
  :mod:`bundle.data.converters.registry`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bundle.data.datalist import AGE_BINS, format_summary, save, strict_json_default, summarize
from bundle.data.splits import patient_split
from bundle.demographics import AGE_MAX, AGE_MIN, AGE_PATTERN, AGE_UNIT_YEARS, sex_labels
from bundle.utils.atomic import write_json_atomic

__all__ = [
    "CLASSES",
    "AGE_BINS",
    "ConversionError",
    "ConversionReport",
    "find_file",
    "find_files",
    "read_csv",
    "read_json_file",
    "match_columns",
    "file_lines",
    "parse_age",
    "parse_sex",
    "parse_tristate",
    "drop_duplicates",
    "require_key",
    "assign_splits",
    "select_classes",
    "check_images",
    "finalize",
    "write_datalist",
    "summary_path",
    "age_list",
]

#: The bundle's conditions, in label-vector order.
CLASSES: tuple[str, ...] = ("nodule_mass", "pleural_effusion", "edema")
#: Ages outside [MIN_AGE, MAX_AGE] are impossible (fairness.md) and become unknown (counted).
MIN_AGE, MAX_AGE = AGE_MIN, AGE_MAX
MAX_EXAMPLES = 5


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, the field and the fix."""


# --------------------------------------------------------------------------------------------------- report
@dataclass
class ConversionReport:
    """Counts (with a few examples) of everything a converter dropped, repaired or could not parse."""

    dataset: str
    files: dict[str, str] = field(default_factory=dict)
    issues: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, count: int, examples: Iterable = (), action: str = "", file: str | None = None):
        """Add ``count`` occurrences of issue ``kind`` (examples are kept up to MAX_EXAMPLES)."""
        if count <= 0:
            return
        entry = self.issues.setdefault(kind, {"count": 0, "action": action, "examples": []})
        if file and "file" not in entry:
            entry["file"] = file
        entry["count"] += int(count)
        if action and not entry["action"]:
            entry["action"] = action
        room = MAX_EXAMPLES - len(entry["examples"])
        if room > 0:
            entry["examples"].extend(list(examples)[:room])

    def add_rows(self, kind: str, file: str | os.PathLike, lines: Sequence, values: Sequence = (), action: str = ""):
        """Add bad rows by their file line numbers (1-based, header = line 1), with their offending values."""
        lines = list(lines)
        values = list(values) if len(values) else [None] * len(lines)
        ex = [
            {"line": int(ln), "value": (None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))}
            for ln, v in zip(lines[:MAX_EXAMPLES], values[:MAX_EXAMPLES], strict=False)
        ]
        self.add(kind, len(lines), ex, action, file=os.path.basename(str(file)))

    def note(self, text: str):
        self.notes.append(text)

    @property
    def n_issues(self) -> int:
        return sum(v["count"] for v in self.issues.values())

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "files": dict(self.files), "issues": self.issues, "notes": list(self.notes)}

    def format(self) -> str:
        if not self.issues and not self.notes:
            return "no bad rows"
        out = []
        for kind, e in self.issues.items():
            where = f" in {e['file']}" if e.get("file") else ""
            out.append(f"  {kind}{where}: {e['count']} ({e['action']}); e.g. {e['examples'][:3]}")
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- files
def _listing(root: Path, limit: int = 30) -> str:
    try:
        names = sorted(os.listdir(root))
    except OSError as e:
        return f"(cannot list: {e})"
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return (", ".join(names[:limit]) or "(empty)") + more


def find_files(root: str | os.PathLike, patterns: Sequence[str]) -> list[Path]:
    """All files matching any of the glob ``patterns`` (relative to root), case-insensitively on the basename."""
    root = Path(root)
    found: list[Path] = []
    for pat in patterns:
        parent, _, base = pat.rpartition("/")
        rx = re.compile(_glob_to_regex(base), re.IGNORECASE)
        for d in sorted(root.glob(parent)) if parent else [root]:
            if not d.is_dir():
                continue
            for name in sorted(os.listdir(d)):
                p = d / name
                if rx.fullmatch(name) and p.is_file() and p not in found:
                    found.append(p)
    return found


def _glob_to_regex(pat: str) -> str:
    import fnmatch

    return fnmatch.translate(pat).replace("\\Z", "").replace("(?s:", "(?:")


def find_file(root: str | os.PathLike, patterns: Sequence[str], what: str, required: bool = True) -> Path | None:
    """The first file under ``root`` matching ``patterns`` (in preference order); a clear error if none does."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"--root {root} is not a directory. Point --root at the folder holding {what}.")
    for pat in patterns:
        hits = find_files(root, [pat])
        if hits:
            return hits[0]
    if not required:
        return None
    raise ConversionError(
        f"--root {root}: expected {what} ({' or '.join(patterns)}) but it is missing. "
        f"Found there: {_listing(root)}. Fix: point --root at the dataset folder as downloaded."
    )


def read_csv(path: str | os.PathLike, **kw) -> pd.DataFrame:
    """pandas.read_csv with every column as text (parsed and counted afterwards) and a clear error on failure."""
    kw.setdefault("dtype", str)
    kw.setdefault("keep_default_na", False)
    kw.setdefault("na_values", ["", "nan", "NaN"])
    try:
        return pd.read_csv(path, **kw)
    except (pd.errors.ParserError, ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise ConversionError(f"{path}: cannot be read as a table ({e}). Fix: supply the file as distributed.") from e


def read_json_file(path: str | os.PathLike, what: str):
    """The JSON in ``path``; a :class:`ConversionError` naming the file and ``what`` it should be if unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not readable JSON ({e}). Fix: use the {what} file as distributed.") from e


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", str(name)).strip().lower()


def match_columns(
    df: pd.DataFrame,
    spec: Mapping[str, Sequence[str]],
    path: str | os.PathLike,
    optional: Iterable[str] = (),
) -> pd.DataFrame:
    """Rename ``df``'s columns to the canonical names of ``spec`` ({canonical: [accepted names...]}).

    Matching ignores case and repeated/edge whitespace. A required column that is missing raises a
    :class:`ConversionError` naming the column, the file, the accepted spellings and the columns found.
    """
    optional = set(optional)
    lookup: dict[str, str] = {}
    for col in df.columns:
        lookup.setdefault(_norm(col), col)
    rename, missing = {}, []
    for canon, aliases in spec.items():
        hit = next((lookup[_norm(a)] for a in [canon, *aliases] if _norm(a) in lookup), None)
        if hit is None:
            if canon not in optional:
                missing.append((canon, aliases))
            continue
        rename[hit] = canon
    if missing:
        what = "; ".join(f"{c!r} (accepted: {', '.join(map(repr, [c, *a]))})" for c, a in missing)
        raise ConversionError(
            f"{path}: required column {what} not found. Columns found: {list(map(str, df.columns))}. "
            f"Fix: use the file as distributed, or rename the column to one of the accepted names."
        )
    out = df.rename(columns=rename)
    return out.loc[:, ~out.columns.duplicated()]


def file_lines(df: pd.DataFrame, header_lines: int = 1) -> np.ndarray:
    """1-based line numbers of the rows of a freshly read CSV (header on line 1)."""
    return np.arange(len(df)) + 1 + header_lines


# -------------------------------------------------------------------------------------------------- parsers
def parse_age(
    values: pd.Series,
    report: ConversionReport,
    file: str | os.PathLike,
    lines: np.ndarray,
    zero_is_missing: bool = False,
    column: str = "age",
) -> np.ndarray:
    """Ages in years (float, NaN = unknown) from numbers or DICOM-style strings ("045Y", "018M").

    Vectorised :func:`bundle.demographics.age_years` (same grammar and limits) plus reporting: unparsable
    values and impossible ages (< 0 or > 110) become unknown and are counted with examples.
    ``zero_is_missing``: datasets that write 0 for "unknown" (CheXpert) count those as unknown, too.
    """
    s = values.astype("string")
    m = s.str.extract(AGE_PATTERN.pattern, flags=AGE_PATTERN.flags)
    num = pd.to_numeric(m[0], errors="coerce")
    unit = m[1].fillna("").str.upper().map(AGE_UNIT_YEARS).astype(float)
    age = (num * unit).to_numpy(dtype=float, na_value=np.nan)
    present = s.notna().to_numpy() & (s.str.strip() != "").fillna(False).to_numpy()
    bad = present & np.isnan(age)
    if bad.any():
        report.add_rows(f"unparsable {column}", file, lines[bad], s[bad].tolist(), "age set to unknown")
    impossible = ~np.isnan(age) & ((age < MIN_AGE) | (age > MAX_AGE))
    if zero_is_missing:
        zero = age == 0
        if zero.any():
            report.add_rows(f"{column} 0 (placeholder)", file, lines[zero], s[zero].tolist(), "age set to unknown")
        impossible &= ~zero
        age[zero] = np.nan
    if impossible.any():
        report.add_rows(
            f"impossible {column}",
            file,
            lines[impossible],
            s[impossible].tolist(),
            f"outside [{MIN_AGE:g}, {MAX_AGE:g}]: age set to unknown",
        )
        age[impossible] = np.nan
    return np.round(age, 2)


def parse_sex(values: pd.Series) -> np.ndarray:
    """ "M"/"F"/"unknown" per row: :func:`bundle.demographics.sex_label` (M/Male/Man/1, F/Female/Woman/2, any
    case), evaluated once per distinct value; anything else (O, Unknown, blank) is "unknown"."""
    return sex_labels(values)


def parse_tristate(
    values: pd.Series,
    report: ConversionReport,
    file: str | os.PathLike,
    lines: np.ndarray,
    column: str,
    blank: int = -1,
) -> np.ndarray:
    """1/0/-1 labels (int8) from CheXpert-style 1.0/0.0/-1.0/blank; blank -> ``blank``; other values counted, -1."""
    s = values.astype("string").str.strip()
    num = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    empty = (s.isna() | (s == "")).to_numpy()
    ok = np.isin(num, (1.0, 0.0, -1.0))
    bad = ~ok & ~empty
    if bad.any():
        report.add_rows(f"unparsable label {column!r}", file, lines[bad], s[bad].tolist(), "label set to -1")
    out = np.where(ok, num, np.where(empty, blank, -1))
    return out.astype(np.int8)


def require_key(df: pd.DataFrame, key: str, report: ConversionReport, file, lines: np.ndarray, what: str):
    """Strip the key column, drop (and report) rows without a key, then drop (and report) duplicated keys.

    Returns (df, lines) for the rows that remain. ``what`` names the key in messages, e.g. "Image Index".
    """
    df[key] = df[key].str.strip()
    missing = df[key].isna().to_numpy()
    if missing.any():
        report.add_rows(f"row without {what}", file, lines[missing], action="row dropped")
        df, lines = df.loc[~missing].reset_index(drop=True), lines[~missing]
    return drop_duplicates(df, key, report, file, lines)


def drop_duplicates(df: pd.DataFrame, key: str | list[str], report: ConversionReport, file, lines: np.ndarray):
    """Drop repeated rows of ``key`` (first kept). Exact copies and conflicting copies are reported separately.

    Returns (df, lines) without the duplicates.
    """
    dup_key = df.duplicated(subset=key, keep="first").to_numpy()
    if not dup_key.any():
        return df, lines
    exact = df.duplicated(keep="first").to_numpy()
    conflicting = dup_key & ~exact
    keycol = key if isinstance(key, str) else key[0]
    if (dup_key & exact).any():
        m = dup_key & exact
        report.add_rows("duplicated rows", file, lines[m], df.loc[m, keycol].tolist(), "exact copy dropped")
    if conflicting.any():
        report.add_rows(
            f"conflicting rows for the same {key}",
            file,
            lines[conflicting],
            df.loc[conflicting, keycol].tolist(),
            "first occurrence kept, later ones dropped",
        )
    keep = ~dup_key
    return df.loc[keep].reset_index(drop=True), lines[keep]


# ------------------------------------------------------------------------------------------------- splits
#: official split names (as the datasets spell them) -> datalist split they are pinned to
_FIXED = {
    "test": "test",
    "valid": "validation",
    "validate": "validation",
    "validation": "validation",
    "val": "validation",
}
_FREE = {"train", "train_val", "training", "trainval"}


def assign_splits(
    records: Sequence[dict],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    report: ConversionReport | None = None,
    respect_official: bool = True,
) -> dict[str, list[dict]]:
    """Patient-level, seeded training/validation/test split that respects official splits.

    A record whose ``split_source`` is an official validation or test split stays there. The other records
    (official train, or no official split) are split by patient: the validation share is carved out only if
    no official validation split exists, the test share only if no official test split exists. A patient
    who appears in an official split pulls all his other records into it, so no patient is in two splits.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise ConversionError(f"--{name.replace('_', '-')} must be in [0, 1), got {f}")
    out: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    fixed_of_patient: dict[str, str] = {}
    free: list[dict] = []
    unknown_sources: dict[str, int] = {}
    for r in records:
        src = str(r.get("split_source") or "").strip().lower()
        if respect_official and src in _FIXED:
            out[_FIXED[src]].append(r)
            fixed_of_patient.setdefault(str(r.get("patient_id")), _FIXED[src])
        else:
            if src and src not in _FREE:
                unknown_sources[src] = unknown_sources.get(src, 0) + 1
            free.append(r)
    if unknown_sources and report is not None:
        report.note(f"split names treated as training pool: {unknown_sources}")
    moved = 0
    pool = []
    for r in free:
        dest = fixed_of_patient.get(str(r.get("patient_id")))
        if dest is not None:
            out[dest].append(r)
            moved += 1
        else:
            pool.append(r)
    if moved and report is not None:
        report.add("records moved to their patient's official split", moved, [], "keeps patients in one split")
    fractions = {
        "training": 1.0,
        "validation": 0.0 if out["validation"] else val_fraction,
        "test": 0.0 if out["test"] else test_fraction,
    }
    fractions["training"] = 1.0 - fractions["validation"] - fractions["test"]
    if fractions["training"] <= 0:
        raise ConversionError(f"--val-fraction + --test-fraction must be < 1, got {val_fraction} + {test_fraction}")
    if pool:
        parts = patient_split(pool, fractions, seed=seed)
        for k, v in parts.items():
            out[k].extend(v)
    return out


# ------------------------------------------------------------------------------------------------ classes
def select_classes(
    records: Iterable[dict], source: Sequence[str], target: Sequence[str], rename: Mapping[str, str] | None = None
) -> list[dict]:
    """Re-index labels and attention from class list ``source`` to ``target`` (after optional renaming).

    A target class the source lacks gets label -1 (unknown) and no attention.
    """
    rename = dict(rename or {})
    src = [rename.get(c, c) for c in source]
    unknown = [c for c in target if c not in src and c not in CLASSES]
    if unknown:
        raise ConversionError(f"unknown class(es) {unknown}; known: {list(CLASSES)} (and {src} in this datalist)")
    idx = [src.index(c) if c in src else None for c in target]
    keep = set(target)
    out = []
    for r in records:
        lab = r["label"]
        r = dict(r)
        r["label"] = [lab[i] if i is not None else -1 for i in idx]
        att = r.get("attention") or []
        if att:
            r["attention"] = [dict(a, **{"class": rename.get(a["class"], a["class"])}) for a in att]
            r["attention"] = [a for a in r["attention"] if a["class"] in keep]
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------- images
def _image_ok(path: str) -> str | None:
    """None if the file exists and its header reads; else the reason. Headers only (fast), never pixels."""
    if not os.path.isfile(path):
        return "missing"
    low = path.lower()
    try:
        if low.endswith((".dcm", ".dicom")):
            import pydicom  # noqa: PLC0415

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if "Rows" not in ds or "Columns" not in ds:
                return "DICOM without Rows/Columns"
        elif low.endswith(".img"):
            size = os.path.getsize(path)
            if size != 2048 * 2048 * 2:
                return f"raw size {size} bytes, expected {2048 * 2048 * 2} (2048x2048 uint16)"
        else:
            from PIL import Image  # noqa: PLC0415

            with Image.open(path) as im:
                im.size  # noqa: B018 - header parse
    except Exception as e:  # noqa: BLE001 - any reader failure means "unreadable"
        return f"unreadable: {type(e).__name__}: {e}"[:200]
    return None


def check_images(records: list[dict], report: ConversionReport) -> list[dict]:
    """Keep the records whose image exists and whose header reads; list and count the others."""
    keep, bad = [], []
    for r in records:
        why = _image_ok(r["image"])
        if why is None:
            keep.append(r)
        else:
            bad.append({"image": r["image"], "reason": why})
    if bad:
        missing = [b for b in bad if b["reason"] == "missing"]
        other = [b for b in bad if b["reason"] != "missing"]
        report.add("missing image files", len(missing), missing, "record left out")
        report.add("unreadable image files", len(other), other, "record left out")
    return keep


# ---------------------------------------------------------------------------------------------- geometry
def _clip_shape(a: dict) -> dict | None:
    """The shape clipped to its frame (or to [0, 1] when normalised); None if nothing is left inside."""
    if a.get("normalized"):
        fw = fh = 1.0
    else:
        fr = a.get("frame")
        if not fr:
            return a
        fw, fh = float(fr[0]), float(fr[1])
    t, c = a["type"], a["coords"]

    def cx(v):
        return min(max(v, 0.0), fw)

    def cy(v):
        return min(max(v, 0.0), fh)

    if t == "bbox_xywh":
        if c[0] >= 0 and c[1] >= 0 and c[0] + c[2] <= fw and c[1] + c[3] <= fh:
            return a  # inside: untouched (x + w - x would not round-trip exactly)
        x0, y0, x1, y1 = cx(c[0]), cy(c[1]), cx(c[0] + c[2]), cy(c[1] + c[3])
        new = [x0, y0, x1 - x0, y1 - y0]
        if new[2] <= 0 or new[3] <= 0:
            return None
    elif t in ("bbox_xyxy", "ellipse_bbox"):
        new = [cx(c[0]), cy(c[1]), cx(c[2]), cy(c[3])]
        if new[2] <= new[0] or new[3] <= new[1]:
            return None
    elif t == "polygon":
        new = [[cx(x), cy(y)] for x, y in c]
    elif t == "point_radius":
        new = [cx(c[0]), cy(c[1]), c[2]]
    else:
        return a
    if new == list(c):
        return a
    return dict(a, coords=new, clipped=True)


def clip_attention(records: Iterable[dict], report: ConversionReport):
    """Clip shapes that overshoot their frame (annotation tools let boxes run past the image edge).

    The datalist validator rejects coordinates outside the frame; clipping keeps the part inside the image,
    marks the shape ``"clipped": true`` and is counted; shapes with nothing inside are dropped (counted).
    """
    clipped, dropped = [], []
    for r in records:
        att = r.get("attention")
        if not att:
            continue
        new = []
        for a in att:
            b = _clip_shape(a)
            if b is None:
                dropped.append({"patient_id": r.get("patient_id"), "class": a["class"], "coords": a["coords"]})
            else:
                if b is not a:
                    clipped.append({"patient_id": r.get("patient_id"), "class": a["class"], "coords": a["coords"]})
                new.append(b)
        r["attention"] = new
    report.add("attention shape overshooting its frame", len(clipped), clipped, "clipped to the frame")
    report.add("attention shape entirely outside its frame", len(dropped), dropped, "dropped")


# ------------------------------------------------------------------------------------------------ finalize
def finalize(
    records: list[dict],
    name: str,
    out: str | os.PathLike,
    report: ConversionReport,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    check: bool = False,
    absolute_paths: bool = False,
    bins: Sequence[float] = AGE_BINS,
    verbose: bool = True,
) -> tuple[dict, dict]:
    """Split, select classes, relativise image paths, write ``out`` and ``<out stem>.summary.json``.

    ``records`` carry absolute image paths and labels in :data:`CLASSES` order. Returns (datalist, summary).
    """
    if not records:
        raise ConversionError(f"{name}: no records left to write; see the report:\n{report.format()}")
    if check:
        records = check_images(records, report)
    clip_attention(records, report)
    classes = list(classes or CLASSES)
    if classes != list(CLASSES):
        records = select_classes(records, CLASSES, classes)
    splits = assign_splits(records, val_fraction, test_fraction, seed, report)
    out = Path(out).resolve()
    base = out.parent
    datalist: dict = {"name": name, "classes": classes}
    rel_cache: dict[str, str] = {}
    for split, recs in splits.items():
        if not recs:
            continue
        for r in recs:
            if not absolute_paths:
                r["image"] = _relpath(r["image"], base, rel_cache)
            if r.get("split_source") is None:
                r.pop("split_source", None)
        datalist[split] = recs
    return datalist, write_datalist(datalist, out, report, bins, verbose)


def write_datalist(
    datalist: dict, out: Path, report: ConversionReport, bins: Sequence[float] = AGE_BINS, verbose: bool = True
) -> dict:
    """Write ``datalist`` to ``out`` and its summary (with the report) to ``<out stem>.summary.json``, print
    the summary when ``verbose``. Returns the summary. Both files are written strictly (NaN is an error)."""
    save(datalist, out, indent=None)  # one line: json's C encoder, ~1 s for the full NIH datalist
    summary = summarize(datalist, age_bins=bins, report=report)
    write_json_atomic(summary_path(out), summary, indent=2, allow_nan=False, default=strict_json_default)
    if verbose:
        print(format_summary(summary))
        print(f"wrote {out} and {summary_path(out)}")
    return summary


def _relpath(path: str, base: Path, cache: dict) -> str:
    """os.path.relpath per folder, not per file (relpath costs ~60 us; 112k images share 12 folders)."""
    d, _, name = path.rpartition("/")
    rel = cache.get(d)
    if rel is None:
        rel = cache[d] = os.path.relpath(d or "/", base)
    return name if rel == "." else f"{rel}/{name}"


def summary_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(stem + ".summary.json")


def age_list(age: np.ndarray) -> list:
    """Ages for JSON: None for unknown, int when whole (57, not 57.0)."""
    out = []
    for a in age.tolist():
        if a != a:  # NaN
            out.append(None)
        elif float(a).is_integer():
            out.append(int(a))
        else:
            out.append(a)
    return out
