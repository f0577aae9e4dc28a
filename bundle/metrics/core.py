"""Per-group binary metrics and decision thresholds (pure numpy / scikit-learn)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "METRICS",
    "HIGHER_IS_BETTER",
    "THRESHOLD_METHODS",
    "N_ECE_BINS",
    "as_2d",
    "known_mask",
    "check_scores",
    "group_metrics",
    "select_threshold",
    "ece_bins",
    "bce_terms",
]

# Metrics reported per group (besides the counts n, n_pos, n_neg) and whether higher is better.
METRICS = ("auc", "accuracy", "sensitivity", "specificity", "fpr", "precision", "f1", "ece", "bce")
HIGHER_IS_BETTER = {
    "auc": True,
    "accuracy": True,
    "sensitivity": True,
    "specificity": True,
    "fpr": False,
    "precision": True,
    "f1": True,
    "ece": False,
    "bce": False,
}
THRESHOLD_METHODS = ("val_f1", "val_youden", "fixed", "test_f1")
N_ECE_BINS = 10
FIXED_THRESHOLD = 0.5


def as_2d(a, name: str) -> np.ndarray:
    """(N,) or (N, C) -> float (N, C)."""
    arr = np.asarray(a, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape (N,) or (N, C), got {arr.shape}")
    return arr


def known_mask(y: np.ndarray) -> np.ndarray:
    """Labels 0/1 are known; -1 (unknown) and NaN are excluded; anything else is an error."""
    known = np.isin(y, (0.0, 1.0))
    bad = ~known & ~np.isnan(y) & (y != -1)
    if bad.any():
        vals = np.unique(y[bad])[:5]
        raise ValueError(
            f"y_true: labels must be 1 (positive), 0 (negative) or -1/NaN (unknown, excluded); "
            f"found {vals.tolist()}"
        )
    return known


def check_scores(s: np.ndarray, name: str = "y_score") -> None:
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name}: contains NaN or inf; every prediction must be a finite probability")
    if s.size and (s.min() < 0 or s.max() > 1):
        raise ValueError(
            f"{name}: values must be probabilities in [0, 1] (range found [{s.min():.4g}, "
            f"{s.max():.4g}]); apply a sigmoid to logits first"
        )


def ece_bins(s: np.ndarray) -> np.ndarray:
    """Index of the equal-width bin on [0, 1] (10 bins; a score of exactly 1 falls in the last bin)."""
    return np.minimum((np.asarray(s) * N_ECE_BINS).astype(np.int64), N_ECE_BINS - 1)


def bce_terms(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per-sample binary cross-entropy, probabilities clipped to [eps, 1-eps] like sklearn.metrics.log_loss."""
    eps = np.finfo(np.float64).eps
    p = np.clip(s, eps, 1 - eps)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def metrics_from_sums(npos, nneg, tp, fp, u2, ece_abs_sum, bce_sum) -> dict[str, np.ndarray]:
    """Metrics from (weighted) sufficient statistics; undefined ratios (0/0) are NaN.

    ``u2`` is twice the Mann-Whitney U (pairs ranked right count 2, ties 1), so AUC = u2 / (2 npos nneg).
    ``ece_abs_sum`` = sum over bins of |sum_i (y_i - s_i)|, so ECE = ece_abs_sum / n.
    """
    npos, nneg, tp, fp = (np.asarray(x, dtype=float) for x in (npos, nneg, tp, fp))
    n = npos + nneg
    fn, tn = npos - tp, nneg - fp
    return {
        "auc": _div(np.asarray(u2, dtype=float), 2.0 * npos * nneg),
        "accuracy": _div(tp + tn, n),
        "sensitivity": _div(tp, npos),
        "specificity": _div(tn, nneg),
        "fpr": _div(fp, nneg),
        "precision": _div(tp, tp + fp),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "ece": _div(np.asarray(ece_abs_sum, dtype=float), n),
        "bce": _div(np.asarray(bce_sum, dtype=float), n),
    }


def group_metrics(y_true, y_score, threshold: float) -> dict[str, float]:
    """All metrics of one binary task on one group.

    Labels -1/NaN are dropped first. AUC is sklearn's roc_auc_score, NaN when the group has one class only.
    With yhat = score >= threshold: accuracy, sensitivity (TPR), specificity (TNR), FPR, precision, F1; ratios
    with a zero denominator are NaN (e.g. precision without predicted positives). ECE uses 10 equal-width bins
    on [0, 1]; BCE is sklearn's log_loss.
    """
    y = np.asarray(y_true, dtype=float).ravel()
    s = np.asarray(y_score, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"group_metrics: y_true has {y.size} values but y_score has {s.size}")
    keep = known_mask(y)
    y, s = y[keep], s[keep]
    check_scores(s)
    pos = y == 1
    npos, nneg = int(pos.sum()), int((~pos).sum())
    yhat = s >= threshold
    tp, fp = int((yhat & pos).sum()), int((yhat & ~pos).sum())
    ece_abs = float(np.abs(np.bincount(ece_bins(s), weights=y - s, minlength=N_ECE_BINS)).sum()) if y.size else 0.0
    m = metrics_from_sums(npos, nneg, tp, fp, 0.0, ece_abs, float(bce_terms(y, s).sum()))
    out = {"n": npos + nneg, "n_pos": npos, "n_neg": nneg}
    for k in METRICS:
        out[k] = float(m[k])
    out["auc"] = float(roc_auc_score(y, s)) if npos and nneg else math.nan
    return out


def _threshold_1d(y, s, method: str) -> tuple[float, str | None]:
    keep = known_mask(y)
    y, s = y[keep], s[keep]
    check_scores(s)
    npos, nneg = int((y == 1).sum()), int((y == 0).sum())
    if method == "fixed":
        return FIXED_THRESHOLD, None
    if npos == 0:
        return FIXED_THRESHOLD, f"no positives to tune {method} on; fell back to {FIXED_THRESHOLD}"
    if method in ("val_f1", "test_f1"):
        prec, rec, thr = precision_recall_curve(y, s)
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)[:-1]  # last point has no threshold
        return float(thr[int(np.argmax(f1))]), None
    if nneg == 0:
        return FIXED_THRESHOLD, f"no negatives to tune {method} on; fell back to {FIXED_THRESHOLD}"
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    j = tpr - fpr
    j[~np.isfinite(thr)] = -np.inf  # sklearn's first threshold is +inf (predict nothing positive)
    return float(thr[int(np.argmax(j))]), None


def select_threshold(y_true, y_score, method: str = "val_f1"):
    """Decision threshold(s) per class, yhat = score >= threshold.

    method: "val_f1" / "test_f1" maximise F1 (same computation; the name records whether the data are the
    validation set or, optimistically, the evaluated set itself), "val_youden" maximises TPR - FPR, "fixed" is
    0.5. Pass the data the threshold is to be chosen on. 1-D input returns a float, (N, C) input an array (C,).
    A class without positives (or, for Youden, negatives) falls back to 0.5 (see ``select_thresholds_info``).
    """
    thr, _ = select_thresholds_info(y_true, y_score, method)
    return thr[0] if np.asarray(y_true).ndim == 1 else thr


def select_thresholds_info(y_true, y_score, method: str) -> tuple[np.ndarray, list[str | None]]:
    """Thresholds (C,) and, per class, a note when a fallback was needed."""
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method {method!r} unknown; use one of {THRESHOLD_METHODS} or a number")
    y, s = as_2d(y_true, "y_true"), as_2d(y_score, "y_score")
    if y.shape != s.shape:
        raise ValueError(f"select_threshold: y_true shape {y.shape} != y_score shape {s.shape}")
    res = [_threshold_1d(y[:, c], s[:, c], method) for c in range(y.shape[1])]
    return np.asarray([r[0] for r in res]), [r[1] for r in res]


def resolve_thresholds(
    threshold,
    n_classes: int,
    classes: Sequence[str],
    y_test: np.ndarray,
    s_test: np.ndarray,
    val,
) -> dict[str, dict]:
    """Turn the ``threshold`` argument of fairness_report into {class: {value, method, source, ...}}."""
    if isinstance(threshold, str):
        method = threshold
        if method not in THRESHOLD_METHODS:
            raise ValueError(
                f"threshold={method!r} unknown; use one of {THRESHOLD_METHODS}, a number, or one number per class"
            )
        if method.startswith("val_"):
            if val is None:
                raise ValueError(
                    f"threshold={method!r} needs validation predictions: pass val=(y_true_val, "
                    "y_score_val), or threshold='fixed' / 'test_f1'"
                )
            yv, sv = as_2d(val[0], "val y_true"), as_2d(val[1], "val y_score")
            if yv.shape[1] != n_classes or sv.shape != yv.shape:
                raise ValueError(f"val: shapes {yv.shape} / {sv.shape} do not match {n_classes} classes")
            thr, notes = select_thresholds_info(yv, sv, method)
            source = "validation"
        elif method == "test_f1":
            thr, notes = select_thresholds_info(y_test, s_test, method)
            source = "evaluated set (optimistic)"
        else:
            thr, notes = np.full(n_classes, FIXED_THRESHOLD), [None] * n_classes
            source = "fixed"
        return {
            c: {
                "value": float(thr[i]),
                "method": method,
                "source": source,
                "optimistic": method == "test_f1",
                "note": notes[i],
            }
            for i, c in enumerate(classes)
        }
    if isinstance(threshold, Mapping):
        missing = [c for c in classes if c not in threshold]
        if missing:
            raise ValueError(f"threshold dict lacks classes {missing}; give one number per class")
        vals = [float(threshold[c]) for c in classes]
    elif np.ndim(threshold) == 0:
        vals = [float(threshold)] * n_classes
    else:
        vals = [float(v) for v in threshold]
        if len(vals) != n_classes:
            raise ValueError(f"threshold has {len(vals)} values for {n_classes} classes")
    return {
        c: {"value": v, "method": "fixed", "source": "given", "optimistic": False, "note": None}
        for c, v in zip(classes, vals, strict=False)
    }
