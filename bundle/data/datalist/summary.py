"""Counts of a datalist: :func:`summarize` (per split: images, patients, classes, sex, age groups, sources)
and :func:`format_summary`, the text the converters print."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from bundle.data.datalist.schema import AGE_BINS, age_scheme, split_names
from bundle.demographics import AGE_SCHEMES, UNKNOWN, age_groups
from bundle.demographics import sex_labels as _sex_array

__all__ = ["format_summary", "summarize"]


def _label_codes(recs: list, n_classes: int) -> np.ndarray:
    """(n, C) int8: 1 positive, 0 negative, -1 anything else (null, -1, missing or malformed value)."""
    labels = [r.get("label") for r in recs]
    try:
        arr = np.array(labels, dtype=np.float64).reshape(len(recs), n_classes)  # null -> NaN
    except (TypeError, ValueError):  # ragged or malformed labels (raw datalists): value by value
        arr = np.full((len(recs), n_classes), np.nan)
        for i, lab in enumerate(labels):
            if isinstance(lab, (list, tuple)):
                for j, v in enumerate(lab[:n_classes]):
                    try:
                        arr[i, j] = float(v)
                    except (TypeError, ValueError):
                        pass
    return np.where(arr == 1, 1, np.where(arr == 0, 0, -1)).astype(np.int8)


def _age_group_order(bins) -> list[str]:
    """Every label of the scheme in order, then "unknown" (so empty groups show as 0)."""
    edges = AGE_SCHEMES.get(bins, bins) if isinstance(bins, str) else list(bins)
    probe = [0, 61] if edges == "binary60" else list(edges)
    return list(dict.fromkeys(age_groups(probe, bins).tolist() + [UNKNOWN]))


def summarize(datalist: Mapping, age_bins=AGE_BINS, report=None) -> dict:
    """Counts of a datalist (raw or loaded; values are normalised on the fly).

    Returns ``{"name", "classes", "total_images", "splits": {split: {...}}}`` and, with ``report`` (a
    conversion report: ``.to_dict()`` or a mapping), ``"report"``. Per split: ``n_images``, ``n_patients``
    (records without patient_id count as distinct patients), ``classes`` {class: positive, negative, unknown,
    positive_with_attention, attention_shapes}, ``sex`` {M, F, unknown}, ``age_groups`` (every group of
    ``age_bins``, lower edges or a bundle.metrics scheme name, then unknown) and ``datasets`` {name: images}.
    """
    classes = list(datalist.get("classes") or [])
    bins = age_scheme(age_bins)
    order = _age_group_order(bins)
    ci = {c: j for j, c in enumerate(classes)}
    out: dict = {"name": datalist.get("name"), "classes": classes, "total_images": 0, "splits": {}}
    for split in split_names(datalist):
        recs = [r for r in datalist[split] if type(r) is dict or isinstance(r, Mapping)]  # ABC check is slow
        lab = _label_codes(recs, len(classes))
        with_att = np.zeros(lab.shape, dtype=bool)
        shapes = np.zeros(len(classes), dtype=np.int64)
        pids = set()
        for k, r in enumerate(recs):  # one pass; attention lists are short and mostly empty
            for a in r.get("attention") or ():
                j = ci.get(a.get("class")) if isinstance(a, Mapping) else None
                if j is not None:
                    with_att[k, j] = True
                    shapes[j] += 1
            pid = r.get("patient_id")
            pids.add(str(pid) if pid is not None and str(pid) != "" else f"__record_{k}")
        per_class = {
            c: {
                "positive": int((lab[:, j] == 1).sum()),
                "negative": int((lab[:, j] == 0).sum()),
                "unknown": int((lab[:, j] == -1).sum()),
                "positive_with_attention": int(((lab[:, j] == 1) & with_att[:, j]).sum()),
                "attention_shapes": int(shapes[j]),
            }
            for j, c in enumerate(classes)
        }
        sex = Counter(_sex_array([r.get("sex") for r in recs]).tolist())
        ages = Counter(age_groups([r.get("age") for r in recs], bins).tolist())
        datasets: Counter = Counter()
        for name, n in Counter([r.get("dataset") for r in recs]).items():
            datasets[str(name) if name not in (None, "") else UNKNOWN] += n
        out["splits"][split] = {
            "n_images": len(recs),
            "n_patients": len(pids),
            "classes": per_class,
            "sex": {g: sex.get(g, 0) for g in ("M", "F", UNKNOWN)},
            "age_groups": {g: ages.get(g, 0) for g in order},
            "datasets": dict(sorted(datasets.items())),
        }
        out["total_images"] += len(recs)
    if report is not None:
        out["report"] = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    return out


def format_summary(summary: Mapping) -> str:
    """Human-readable text of :func:`summarize`'s result (printed by the converters)."""
    lines = [f"datalist {str(summary.get('name'))!r}: {summary['total_images']} images"]
    for split, s in summary["splits"].items():
        ages = {g: n for g, n in s["age_groups"].items() if n}
        lines.append(f"  {split}: {s['n_images']} images, {s['n_patients']} patients; sex {s['sex']}; age {ages}")
        for c, v in s["classes"].items():
            lines.append(
                f"    {c}: +{v['positive']} -{v['negative']} ?{v['unknown']}; positives with attention "
                f"{v['positive_with_attention']} ({v['attention_shapes']} shapes)"
            )
    rep = summary.get("report")
    if rep:
        lines.append("  issues:" if rep.get("issues") or rep.get("notes") else "  issues: none")
        for kind, e in rep.get("issues", {}).items():
            where = f" in {e['file']}" if e.get("file") else ""
            lines.append(f"    {kind}{where}: {e['count']} ({e.get('action', '')}); e.g. {e['examples'][:3]}")
        for n in rep.get("notes", []):
            lines.append(f"    note: {n}")
    return "\n".join(lines)
