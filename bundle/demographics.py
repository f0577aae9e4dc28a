"""Subgroup labels: sex normalisation, age parsing and binning schemes, intersections.

This module is the single home of the demographic semantics: the datalist loader/validator
(bundle.data.datalist), the dataset converters (bundle.data.converters.common) and the DICOM reader
(bundle.transforms.io) all call :func:`sex_label` / :func:`age_years` / :func:`age_groups` or share
:data:`AGE_PATTERN`, :data:`AGE_UNIT_YEARS`, :data:`AGE_MIN` and :data:`AGE_MAX`.

Every labelling function returns plain ``str`` labels (object arrays) so reports stay JSON-serialisable, and
maps anything it cannot interpret to ``"unknown"`` (reported, counted, excluded from gaps) instead of dropping it.
"""

from __future__ import annotations

import itertools
import math
import numbers
import re
from collections.abc import Mapping, Sequence

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
