"""Patient-level splitting and subsampling.

Every function here works on patients, never on images: several images of one patient always land
in the same split / the same subsample, so no patient leaks between training and evaluation.
Randomness comes from a seeded ``numpy.random.Generator`` over the *sorted* patient ids, so results
depend only on the seed and the set of patients, not on record order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["patient_ids", "patient_split", "subsample_patients", "nested_patient_subset"]


def _pid(rec: Mapping, key: str, i: int) -> str:
    pid = rec.get(key)
    # A record without a patient id is its own patient (no leakage possible through it).
    return f"__record_{i}" if pid is None or str(pid) == "" else str(pid)


def patient_ids(records: Sequence[Mapping], key: str = "patient_id") -> list[str]:
    """The patient id of each record (records without one count as their own patient)."""
    return [_pid(r, key, i) for i, r in enumerate(records)]


def _patient_order(records: Sequence[Mapping], key: str, seed: int) -> tuple[list[str], np.ndarray]:
    pids = patient_ids(records, key)
    unique = sorted(set(pids))
    perm = np.random.default_rng(seed).permutation(len(unique))
    return pids, np.asarray(unique, dtype=object)[perm]


def patient_split(
    records: Sequence[Mapping],
    fractions: Mapping[str, float],
    seed: int = 0,
    key: str = "patient_id",
) -> dict[str, list]:
    """Split records into named splits by patient, e.g. ``{"training": .7, "validation": .1, "test": .2}``.

    Fractions are shares of patients (they are normalised to sum to 1). Returns ``{split: [records]}``
    with the records of each split in their original order.
    """
    if not fractions:
        raise ValueError("patient_split: give at least one split fraction, e.g. {'training': 0.8, 'test': 0.2}")
    if any(f < 0 for f in fractions.values()):
        raise ValueError(f"patient_split: fractions must be >= 0, got {dict(fractions)}")
    total = float(sum(fractions.values()))
    if total <= 0:
        raise ValueError(f"patient_split: fractions sum to {total}; they must sum to a positive number")
    pids, order = _patient_order(records, key, seed)
    n = len(order)
    bounds = np.round(np.cumsum([f / total for f in fractions.values()]) * n).astype(int)
    assign, start = {}, 0
    for name, end in zip(fractions, bounds, strict=False):
        for p in order[start:end]:
            assign[p] = name
        start = end
    out: dict[str, list] = {name: [] for name in fractions}
    for rec, p in zip(records, pids, strict=False):
        out[assign[p]].append(rec)
    return out


def nested_patient_subset(records: Sequence[Mapping], ratio: float, seed: int = 0, key: str = "patient_id"):
    """Boolean mask (one per record) selecting ``ratio`` of the patients.

    Nested by construction: for one seed, the patients chosen at ratio r are a subset of those
    chosen at any r' > r (they are prefixes of one seeded permutation).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    pids, order = _patient_order(records, key, seed)
    keep = set(order[: int(round(ratio * len(order)))])
    return np.array([p in keep for p in pids], dtype=bool)


def subsample_patients(records: Sequence[Mapping], ratio: float, seed: int = 0, key: str = "patient_id") -> list:
    """The records of a seeded, nested ``ratio`` share of the patients (the training data ratio knob)."""
    mask = nested_patient_subset(records, ratio, seed, key)
    return [r for r, m in zip(records, mask, strict=False) if m]
