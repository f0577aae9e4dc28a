"""Per-epoch summaries of collected predictions: masked per-class AUCs, the macro AUC, NaN-aware means and the
flat fairness + alignment scalars the validator logs every epoch."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from .report import fairness_report, flatten_for_mlflow
from .subgroups import groups_for_records

__all__ = ["masked_aucs", "mean_auc", "nanmean_or_nan", "alignment_means", "epoch_fairness_summary"]

# Collected per-pair arrays summarised per epoch, and the names their means are logged under.
ALIGNMENT_SUMMARIES = (("hit", "hit_rate"), ("mass", "attn_mass"))


def masked_aucs(label: np.ndarray, pred: np.ndarray) -> list[float]:
    """ROC AUC per class (column), unknown labels (-1) excluded; NaN for a class without both outcomes."""
    aucs = []
    for c in range(label.shape[1]):
        known = label[:, c] >= 0
        y, s = label[known, c], pred[known, c]
        aucs.append(float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan"))
    return aucs


def mean_auc(label: np.ndarray, pred: np.ndarray) -> float:
    """The key metric: macro AUC over classes, unknown labels (-1) excluded per class, NaN classes skipped."""
    aucs = [a for a in masked_aucs(label, pred) if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def nanmean_or_nan(values: np.ndarray) -> float:
    """Mean of the finite-or-NaN ``values`` ignoring NaN; NaN (without a warning) when none is finite."""
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def alignment_means(arrays: Mapping[str, np.ndarray], classes: Sequence[str]) -> dict[str, float]:
    """``hit_rate`` / ``hit_rate_<class>`` and ``attn_mass`` / ``attn_mass_<class>`` of collected (N, C) pair values."""
    out: dict[str, float] = {}
    for key, name in ALIGNMENT_SUMMARIES:
        if key in arrays:
            v = arrays[key]
            out[name] = nanmean_or_nan(v)
            for ci, cname in enumerate(classes):
                out[f"{name}_{cname}"] = nanmean_or_nan(v[:, ci])
    return out


def epoch_fairness_summary(
    arrays: Mapping[str, np.ndarray],
    records: Sequence[Mapping],
    classes: Sequence[str],
    attributes: Sequence[str] = ("sex", "age"),
    age_scheme="chexclusion",
    min_count: int = 5,
) -> tuple[dict[str, float], dict]:
    """``(scalars, report)`` of one split's collected arrays: ``auc_<class>``, the alignment means and the subgroup
    gaps of :func:`flatten_for_mlflow` (prefixed ``fair_``), and the fairness report they come from.

    Bootstrap off (per-epoch values only); thresholds are the split's own max-F1 ("test_f1").
    """
    out: dict[str, float] = {}
    for cname, auc in zip(classes, masked_aucs(arrays["label"], arrays["pred"]), strict=False):
        out[f"auc_{cname}"] = auc
    out.update(alignment_means(arrays, classes))
    groups, pids = groups_for_records(records, arrays["index"], attributes, age_scheme)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fairness_report(
            arrays["label"],
            arrays["pred"],
            groups=groups,
            classes=list(classes),
            patient_id=pids,
            threshold="test_f1",
            n_boot=0,
            min_count=min_count,
        )
    out.update(flatten_for_mlflow(report, prefix="fair_"))
    return out, report
