"""Subgroup labels: sex normalisation, age binning schemes, intersections.

Every function returns plain ``str`` labels (object arrays) so reports stay JSON-serialisable, and maps
anything it cannot interpret to ``"unknown"`` (reported, counted, excluded from gaps) instead of dropping it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "UNKNOWN",
    "AGE_SCHEMES",
    "normalize_sex",
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

# ISO/IEC 5218 numeric codes (1 male, 2 female; 0 not known, 9 not applicable -> unknown).
_MALE = {"m", "male", "1"}
_FEMALE = {"f", "female", "2"}


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


def _sex_one(v) -> str:
    if _is_missing(v) or isinstance(v, bool | np.bool_):
        return UNKNOWN  # a boolean carries no documented sex coding
    if isinstance(v, int | np.integer | float | np.floating):
        v = str(int(v)) if float(v).is_integer() else str(v)
    s = str(v).strip().lower()
    return "M" if s in _MALE else "F" if s in _FEMALE else UNKNOWN


def _map_unique(values, fn) -> np.ndarray:
    """Apply ``fn`` once per distinct value (few distinct values, many samples); missing -> fn(None)."""
    lst = _as_list(values)
    if any(isinstance(v, bool | np.bool_) for v in lst):  # factorize would merge True with 1
        return np.asarray([fn(v) for v in lst], dtype=object).reshape(len(lst))
    arr = np.empty(len(lst), dtype=object)
    arr[:] = lst
    codes, uniq = pd.factorize(arr)  # None / NaN -> -1
    lookup = np.asarray([fn(u) for u in uniq] + [fn(None)], dtype=object)
    return lookup[codes]


def normalize_sex(values) -> np.ndarray:
    """Map sex codes to "M" / "F" / "unknown".

    "M", "Male", "male" (any case) and the ISO/IEC 5218 code 1 -> "M"; "F", "Female" and code 2 -> "F";
    anything else (missing, "O", "Other", 0, 9, ...) -> "unknown".
    """
    return _map_unique(values, _sex_one)


def _edge_str(e: float) -> str:
    return str(int(e)) if float(e).is_integer() else repr(float(e))


def _to_age(v) -> float:
    if _is_missing(v) or isinstance(v, bool | np.bool_):
        return math.nan
    try:
        a = float(v)
    except (TypeError, ValueError):
        return math.nan
    if not math.isfinite(a) or a < AGE_MIN or a > AGE_MAX:
        return math.nan
    return a


def age_groups(ages, scheme: str | Sequence[float] = "chexclusion") -> np.ndarray:
    """Bin ages into left-closed labels such as "[0,20)", ..., "[80,inf)".

    ``scheme``: "chexclusion" ([0,20) [20,40) [40,60) [60,80) [80,inf)), "yang2024" ([0,18) [18,40) [40,60)
    [60,80) [80,inf)), "binary60" ("<=60" / ">60"), or a custom increasing list of lower edges ``[e0, ..., ek]``
    giving [e0,e1) ... [ek,inf) (ages below e0 -> "unknown"). Missing, non-numeric, negative or > 110 ages
    -> "unknown".
    """
    vals = np.asarray([_to_age(v) for v in _as_list(ages)], dtype=float)
    out = np.full(vals.shape, UNKNOWN, dtype=object)
    ok = ~np.isnan(vals)
    if isinstance(scheme, str):
        if scheme not in AGE_SCHEMES:
            raise ValueError(f"age_groups: unknown scheme {scheme!r}; use one of {sorted(AGE_SCHEMES)} "
                             "or a list of increasing lower bin edges such as [0, 20, 40, 60, 80]")
        spec = AGE_SCHEMES[scheme]
        if spec == "binary60":
            out[ok & (vals <= 60)] = "<=60"
            out[ok & (vals > 60)] = ">60"
            return out
        edges = np.asarray(spec, dtype=float)
    else:
        edges = np.asarray(list(scheme), dtype=float)
        if edges.ndim != 1 or edges.size == 0 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise ValueError(f"age_groups: custom scheme must be a non-empty, strictly increasing list of finite "
                             f"lower edges, e.g. [0, 20, 40, 60, 80]; got {list(scheme)}")
    labels = [f"[{_edge_str(lo)},{_edge_str(hi)})" for lo, hi in zip(edges[:-1], edges[1:])]
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
    out = [UNKNOWN if UNKNOWN in parts else sep.join(parts) for parts in zip(*arrs)]
    return np.asarray(out, dtype=object)


def demographic_groups(
    sex=None,
    age=None,
    age_scheme: str | Sequence[float] = "chexclusion",
    extra: Mapping[str, Sequence] | None = None,
) -> dict[str, np.ndarray]:
    """Convenience: ``{"sex": normalize_sex(sex), "age": age_groups(age, age_scheme), **extra}``."""
    groups: dict[str, np.ndarray] = {}
    if sex is not None:
        groups["sex"] = normalize_sex(sex)
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
