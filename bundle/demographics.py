"""Subgroup labels: sex normalisation, age parsing and binning schemes, intersections.

This module is the single home of the demographic semantics: the datalist loader/validator
(bundle.data.datalist), the dataset converters (bundle.data.converters.common) and the DICOM reader
(bundle.transforms.io) all call :func:`sex_label` / :func:`age_years` / :func:`age_groups` or share
:data:`AGE_PATTERN`, :data:`AGE_UNIT_YEARS`, :data:`AGE_MIN` and :data:`AGE_MAX`.

Every labelling function returns plain ``str`` labels (object arrays) so reports stay JSON-serialisable, and
maps anything it cannot interpret to ``"unknown"`` (reported, counted, excluded from gaps) instead of dropping it.

Records whose datalist entry lacks sex or age get them from the image's DICOM header (:func:`fill_demographics`, with
the header reader passed in: this module imports nothing of the bundle); ages may come from PatientBirthDate and the
study date (:func:`age_from_dates`). The datalist wins when it knows the value; each record says where its came from.
"""

from __future__ import annotations

import datetime
import itertools
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "UNKNOWN",
    "AGE_SCHEMES",
    "AGE_MIN",
    "AGE_MAX",
    "AGE_PATTERN",
    "AGE_UNIT_YEARS",
    "sex_label",
    "age_years",
    "sex_labels",
    "age_groups",
    "intersect_groups",
    "clean_labels",
    "demographic_groups",
    "natural_key",
    "SOURCES",
    "dicom_date",
    "age_from_dates",
    "fill_demographics",
    "demographics_counts",
]

UNKNOWN = "unknown"
AGE_MIN, AGE_MAX = 0.0, 110.0  # outside this range an age is treated as a data error -> unknown

# Left-closed bins given by their lower edges; the last bin is open ([e_k, inf)).
AGE_SCHEMES: dict[str, list[float] | str] = {
    "chexclusion": [0, 20, 40, 60, 80],  # CheXclusion / MEDFAIR default
    "yang2024": [0, 18, 40, 60, 80],  # Yang et al., Nat. Med. 2024
    "binary60": "binary60",  # MEDFAIR / FairMedFM: <=60 vs >60
}

#: An age as written in datasets: a number of years ("57", "57.5") or a DICOM AS string ("045Y", "006M",
#: "003W", "010D"; unit letter in any case, blanks around it tolerated).
AGE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
#: AGE_PATTERN's unit letter (upper case; "" = years) -> years per unit
AGE_UNIT_YEARS: dict[str, float] = {"": 1.0, "Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}

# ISO/IEC 5218 numeric codes (1 male, 2 female; 0 not known, 9 not applicable -> unknown).
_MALE = {"m", "male", "man", "1"}
_FEMALE = {"f", "female", "woman", "2"}


def _is_missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float | np.floating) and math.isnan(v):
        return True
    return isinstance(v, str) and v.strip() == ""


def _as_list(values) -> list:
    if isinstance(values, str | bytes):
        raise TypeError(f"expected a sequence of values (one per sample), got the single string {values!r}")
    if isinstance(values, np.ndarray):
        return values.ravel().tolist()
    try:
        return list(values)
    except TypeError:
        raise TypeError(f"expected a sequence of values (one per sample), got {type(values).__name__}") from None


def sex_label(value) -> str:
    """One sex value -> "M", "F" or "unknown".

    "M", "Male", "Man" (any case, blanks ignored) and the ISO/IEC 5218 code 1 (number or string) -> "M";
    "F", "Female", "Woman" and code 2 -> "F"; anything else (missing, "O", "Other", 0, 9, booleans, ...) ->
    "unknown". Never raises.
    """
    if _is_missing(value) or isinstance(value, bool | np.bool_):
        return UNKNOWN  # a boolean carries no documented sex coding
    if isinstance(value, numbers.Real):
        value = str(int(value)) if math.isfinite(value) and float(value).is_integer() else str(value)
    s = str(value).strip().lower()
    return "M" if s in _MALE else "F" if s in _FEMALE else UNKNOWN


def age_years(value) -> float | None:
    """One age -> years (float), or None when missing, unparsable or impossible (outside [AGE_MIN, AGE_MAX]).

    Accepts numbers (numpy included) and strings matching :data:`AGE_PATTERN`: "57", "57.5" or DICOM AS
    strings "045Y", "006M", "003W", "010D". Booleans are not ages. Never raises.
    """
    if value is None or isinstance(value, bool | np.bool_):
        return None
    if type(value) in (int, float) or isinstance(value, numbers.Real):  # exact types first: the ABC check is slow
        age = float(value)
    elif isinstance(value, str):
        m = AGE_PATTERN.match(value)
        if m is None:
            return None
        age = float(m.group(1)) * AGE_UNIT_YEARS[m.group(2).upper()]
    else:
        return None
    if not math.isfinite(age) or age < AGE_MIN or age > AGE_MAX:
        return None
    return age


def _map_unique(values, fn) -> np.ndarray:
    """Apply ``fn`` once per distinct value (few distinct values, many samples); missing -> fn(None)."""
    lst = _as_list(values)
    types = set(map(type, lst))
    if bool in types or np.bool_ in types:  # factorize would merge True with 1
        return np.asarray([fn(v) for v in lst], dtype=object).reshape(len(lst))
    arr = np.empty(len(lst), dtype=object)
    arr[:] = lst
    codes, uniq = pd.factorize(arr)  # None / NaN -> -1
    lookup = np.asarray([fn(u) for u in uniq] + [fn(None)], dtype=object)
    return lookup[codes]


def sex_labels(values) -> np.ndarray:
    """Map sex codes to "M" / "F" / "unknown" (:func:`sex_label` of each value, computed once per distinct value)."""
    return _map_unique(values, sex_label)


def _edge_str(e: float) -> str:
    return str(int(e)) if float(e).is_integer() else repr(float(e))


def _age_array(ages) -> np.ndarray:
    """Ages in years as float64, NaN where :func:`age_years` gives None (numeric arrays without a Python loop)."""
    if isinstance(ages, np.ndarray) and ages.dtype.kind in "iuf":
        vals = ages.astype(np.float64).ravel()
        with np.errstate(invalid="ignore"):
            return np.where((vals >= AGE_MIN) & (vals <= AGE_MAX), vals, np.nan)  # NaN/inf fail both tests
    return _map_unique(ages, _age_or_nan).astype(np.float64)  # ages repeat: parse each distinct value once


def _age_or_nan(v) -> float:
    a = age_years(v)
    return math.nan if a is None else a


def age_groups(ages, scheme: str | Sequence[float] = "chexclusion") -> np.ndarray:
    """Bin ages into left-closed labels such as "[0,20)", ..., "[80,inf)".

    ``scheme``: "chexclusion" ([0,20) [20,40) [40,60) [60,80) [80,inf)), "yang2024" ([0,18) [18,40) [40,60)
    [60,80) [80,inf)), "binary60" ("<=60" / ">60"), or a custom increasing list of lower edges ``[e0, ..., ek]``
    giving [e0,e1) ... [ek,inf) (ages below e0 -> "unknown"). Ages are read by :func:`age_years` (numbers or
    DICOM AS strings such as "045Y"); missing, unparsable, negative or > 110 ages -> "unknown".
    """
    vals = _age_array(ages)
    out = np.full(vals.shape, UNKNOWN, dtype=object)
    ok = ~np.isnan(vals)
    if isinstance(scheme, str):
        if scheme not in AGE_SCHEMES:
            raise ValueError(
                f"age_groups: unknown scheme {scheme!r}; use one of {sorted(AGE_SCHEMES)} "
                "or a list of increasing lower bin edges such as [0, 20, 40, 60, 80]"
            )
        spec = AGE_SCHEMES[scheme]
        if spec == "binary60":
            out[ok & (vals <= 60)] = "<=60"
            out[ok & (vals > 60)] = ">60"
            return out
        edges = np.asarray(spec, dtype=float)
    else:
        edges = np.asarray(list(scheme), dtype=float)
        if edges.ndim != 1 or edges.size == 0 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise ValueError(
                f"age_groups: custom scheme must be a non-empty, strictly increasing list of finite "
                f"lower edges, e.g. [0, 20, 40, 60, 80]; got {list(scheme)}"
            )
    labels = [f"[{_edge_str(lo)},{_edge_str(hi)})" for lo, hi in itertools.pairwise(edges)]
    labels.append(f"[{_edge_str(edges[-1])},inf)")
    idx = np.searchsorted(edges, vals[ok], side="right") - 1  # bin i holds edges[i] <= age < edges[i+1]
    lab = np.asarray(labels + [UNKNOWN], dtype=object)
    out[ok] = lab[np.where(idx < 0, len(labels), idx)]
    return out


def _label_one(v) -> str:
    if _is_missing(v):
        return UNKNOWN
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v)


def clean_labels(values) -> np.ndarray:
    """Generic attribute values -> str labels; missing (None, NaN, "") -> "unknown"."""
    return _map_unique(values, _label_one)


def intersect_groups(*label_arrays, sep: str = " & ") -> np.ndarray:
    """Intersection labels, e.g. "M & [60,80)"; "unknown" if any component is unknown."""
    if not label_arrays:
        raise ValueError("intersect_groups: give at least one label array")
    arrs = [clean_labels(a) for a in label_arrays]
    n = {len(a) for a in arrs}
    if len(n) != 1:
        raise ValueError(f"intersect_groups: label arrays differ in length {sorted(n)}")
    out = [UNKNOWN if UNKNOWN in parts else sep.join(parts) for parts in zip(*arrs, strict=True)]
    return np.asarray(out, dtype=object)


def demographic_groups(
    sex=None,
    age=None,
    age_scheme: str | Sequence[float] = "chexclusion",
    extra: Mapping[str, Sequence] | None = None,
) -> dict[str, np.ndarray]:
    """Convenience: ``{"sex": sex_labels(sex), "age": age_groups(age, age_scheme), **extra}``."""
    groups: dict[str, np.ndarray] = {}
    if sex is not None:
        groups["sex"] = sex_labels(sex)
    if age is not None:
        groups["age"] = age_groups(age, age_scheme)
    for k, v in (extra or {}).items():
        groups[str(k)] = clean_labels(v)
    return groups


def natural_key(label: str):
    """Sort key: numbers compared numerically ("[5,10)" before "[10,20)"), "unknown" last."""
    parts = re.split(r"(-?\d+(?:\.\d+)?)", str(label))
    key = tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts) if p != "")
    return (label == UNKNOWN, key)


# ------------------------------------------------------------------------------------- record demographics
#: where a record's sex / age came from (the ``sex_source`` / ``age_source`` of :func:`fill_demographics`)
SOURCES = ("datalist", "dicom", "dicom_birth_date", "unknown")


def dicom_date(value) -> datetime.date | None:
    """A DICOM DA value ("20240131"; the old ACR-NEMA "2024.01.31" and "2024-01-31" too; a ``datetime.date``; the
    first 8 digits of a DT) -> date, or None when missing or not a real date. Never raises."""
    if isinstance(value, datetime.date):
        return value if not isinstance(value, datetime.datetime) else value.date()
    if _is_missing(value) or not isinstance(value, str | bytes):
        return None
    s = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    digits = re.sub(r"[.\-\s]", "", s)[:8]
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None


def age_from_dates(birth, on) -> float | None:
    """Age in years on date ``on`` of someone born on ``birth`` (DICOM DA values or dates; :func:`dicom_date`).

    Completed years, as a DICOM PatientAge "063Y" counts them (the day before the 64th birthday is 63); under one
    year, the fraction days / 365.25 (as "006M" is 0.5). None when a date is missing or unparsable, the birth is
    after ``on``, or the age is outside [AGE_MIN, AGE_MAX] (e.g. anonymisers' 1900-01-01 birth dates). Never raises.
    """
    b, d = dicom_date(birth), dicom_date(on)
    if b is None or d is None or b > d:
        return None
    years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    age = float(years) if years >= 1 else (d - b).days / 365.25
    return age_years(age)


def _safe_header(read_header: Callable | None, image) -> Mapping:
    if read_header is None or not (isinstance(image, str | bytes) or hasattr(image, "__fspath__")):
        return {}
    try:
        return read_header(image) or {}
    except Exception:  # noqa: BLE001  (a header that cannot be read leaves the value unknown, like a missing one)
        return {}


def fill_demographics(records: Sequence[Mapping], read_header: Callable | None = None) -> list[dict]:
    """Copies of ``records`` with ``sex`` ("M"/"F"/"unknown"), ``age`` (years or None) and their sources.

    The datalist's value wins when it is known (:func:`sex_label` / :func:`age_years`); otherwise ``read_header(
    record["image"])`` (e.g. :func:`bundle.transforms.io.read_dicom_demographics`, header only) may give ``sex``
    and ``age`` (and ``age_from``: "PatientAge" or "PatientBirthDate"). The header is read at most once per record
    and only when the record lacks one of the two. ``sex_source`` is "datalist", "dicom" or "unknown";
    ``age_source`` is "datalist", "dicom" (PatientAge), "dicom_birth_date" (PatientBirthDate with StudyDate or
    AcquisitionDate) or "unknown".
    """
    out = []
    for r in records:
        d = dict(r)
        sex, age = sex_label(d.get("sex")), age_years(d.get("age"))
        d["sex_source"] = "datalist" if sex != UNKNOWN else UNKNOWN
        d["age_source"] = "datalist" if age is not None else UNKNOWN
        if sex == UNKNOWN or age is None:
            hdr = _safe_header(read_header, d.get("image"))
            if sex == UNKNOWN and sex_label(hdr.get("sex")) != UNKNOWN:
                sex, d["sex_source"] = sex_label(hdr.get("sex")), "dicom"
            if age is None and age_years(hdr.get("age")) is not None:
                age = age_years(hdr.get("age"))
                d["age_source"] = "dicom_birth_date" if hdr.get("age_from") == "PatientBirthDate" else "dicom"
        d["sex"], d["age"] = sex, age
        out.append(d)
    return out


def demographics_counts(records: Sequence[Mapping]) -> dict[str, dict[str, int]]:
    """``{"sex": {source: n}, "age": {source: n}}`` over records of :func:`fill_demographics` (every source of
    :data:`SOURCES` listed, 0 included; "unknown" = records whose value is unknown)."""
    out: dict[str, dict[str, int]] = {}
    for a in ("sex", "age"):
        counts = dict.fromkeys(SOURCES, 0) if a == "age" else dict.fromkeys(("datalist", "dicom", UNKNOWN), 0)
        for r in records:
            src = r.get(f"{a}_source", UNKNOWN)
            counts[src] = counts.get(src, 0) + 1
        out[a] = counts
    return out
