"""Subgroups of the samples a collection holds: records + sample indices -> group labels and patient ids.

Metadata (sex, age, patient id) stays in the split's records and is joined by each sample's ``index`` after
collection, so strings never cross process boundaries. The sex and age rules are :mod:`bundle.demographics`'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bundle.demographics import age_groups, sex_labels

__all__ = ["groups_for_records"]


def groups_for_records(
    records: Sequence[Mapping],
    index: Sequence[int] | np.ndarray,
    attributes: Sequence[str] = ("sex", "age"),
    age_scheme="chexclusion",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(groups, patient_ids)`` of the records at ``index``: one object array of labels per attribute.

    ``sex`` and ``age`` follow :func:`bundle.demographics.sex_labels` / :func:`~bundle.demographics.age_groups`
    (``age_scheme``); any other attribute is its value as a string ("unknown" when missing). A record without a
    patient id is its own patient (never merged with other id-less records).
    """
    recs = [records[int(i)] for i in index]
    groups = {}
    for a in attributes:
        vals = [r.get(a) for r in recs]
        if a == "sex":
            groups[a] = np.asarray(sex_labels(vals), dtype=object)
        elif a == "age":
            ages = np.array([np.nan if v is None else float(v) for v in vals], dtype=float)
            groups[a] = np.asarray(age_groups(ages, scheme=age_scheme), dtype=object)
        else:
            groups[a] = np.asarray(["unknown" if v is None else str(v) for v in vals], dtype=object)
    pids = np.asarray(
        [
            f"__record_{i}" if r.get("patient_id") in (None, "") else str(r["patient_id"])
            for r, i in zip(recs, index, strict=True)
        ],
        dtype=object,
    )
    return groups, pids
