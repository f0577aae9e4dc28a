"""fairness_report: subgroup metrics, gaps, equalized odds, bootstrap CIs, permutation p-values; flat views."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from bundle.demographics import UNKNOWN, clean_labels, intersect_groups, natural_key

from .bootstrap import (
    ClassPlan,
    GroupedBootstrap,
    default_chunk,
    for_each_chunk,
    patient_index,
    patient_strata,
    percentile_ci,
)
from .core import HIGHER_IS_BETTER, METRICS, as_2d, check_scores, group_metrics, known_mask, resolve_thresholds

__all__ = ["fairness_report", "report_to_rows", "flatten_for_mlflow", "GAP_METRICS_MLFLOW", "REPORT_VERSION"]

REPORT_VERSION = 1
GAP_METRICS_MLFLOW = ("auc", "accuracy", "sensitivity", "f1")
OVERALL_STREAM = 0  # bootstrap stream ids: 0 overall, k for the k-th attribute


def _jsonable(x):
    """numpy scalars -> Python; NaN / inf -> None (strict JSON; None means 'undefined')."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    return x


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _prepare_groups(groups, n, intersections) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, vals in (groups or {}).items():
        lab = clean_labels(vals)
        if lab.shape != (n,):
            raise ValueError(
                f"groups[{name!r}] has {lab.size} values but y_true has {n} rows; give one label per sample"
            )
        out[str(name)] = lab
    for spec in intersections or []:
        parts = [p.strip() for p in spec.split(" x ")] if isinstance(spec, str) else [str(p) for p in spec]
        missing = [p for p in parts if p not in out]
        if len(parts) < 2 or missing:
            raise ValueError(
                f"intersections: {spec!r} must name >= 2 attributes of groups (have {sorted(out)}); "
                "write it as ('sex', 'age') or 'sex x age'"
            )
        out[" x ".join(parts)] = intersect_groups(*(out[p] for p in parts))
    return out


def _exclusion(label: str, m: Mapping, min_count: int) -> str | None:
    if label == UNKNOWN:
        return "unknown attribute value"
    why = []
    if m["n_pos"] < min_count:
        why.append(f"{m['n_pos']} positives < min_count={min_count}")
    if m["n_neg"] < min_count:
        why.append(f"{m['n_neg']} negatives < min_count={min_count}")
    return "; ".join(why) or None


_UNDEFINED = {
    "auc": "AUC undefined (group has one class only)",
    "precision": "precision undefined (no predicted positives)",
    "sensitivity": "sensitivity undefined (no positives)",
    "specificity": "specificity undefined (no negatives)",
    "fpr": "FPR undefined (no negatives)",
}


def _gap_stats(values: Mapping[str, float], metric: str) -> dict:
    """Gap, worst/best group and ratio over the given groups (all finite)."""
    if len(values) < 2:
        return {
            "gap": math.nan,
            "worst_group": None,
            "worst": math.nan,
            "best_group": None,
            "best": math.nan,
            "ratio": math.nan,
        }
    labels = list(values)
    v = np.asarray([values[g] for g in labels])
    lo, hi = int(np.argmin(v)), int(np.argmax(v))
    worst, best = (lo, hi) if HIGHER_IS_BETTER[metric] else (hi, lo)
    return {
        "gap": float(v[hi] - v[lo]),
        "worst_group": labels[worst],
        "worst": float(v[worst]),
        "best_group": labels[best],
        "best": float(v[best]),
        "ratio": float(v[lo] / v[hi]) if v[hi] != 0 else math.nan,
    }


def _boot_gap(arr: np.ndarray) -> np.ndarray:
    """(k, B) group values -> (B,) max - min over the finite ones (NaN where fewer than 2 are finite)."""
    if arr.shape[0] < 2:
        return np.full(arr.shape[1], np.nan)
    ok = np.isfinite(arr)
    hi = np.where(ok, arr, -np.inf).max(axis=0)
    lo = np.where(ok, arr, np.inf).min(axis=0)
    return np.where(ok.sum(axis=0) >= 2, hi - lo, np.nan)


def _eq_odds(tpr: np.ndarray, tnr: np.ndarray) -> np.ndarray:
    """1 - ((maxTPR - minTPR) + (maxTNR - minTNR)) / 2 (axis 0 = groups)."""
    return 1.0 - (_boot_gap(tpr) + _boot_gap(tnr)) / 2.0


def _ci_pair(samples: np.ndarray | None, ci: float) -> list[float] | None:
    if samples is None:
        return None
    lo, hi = percentile_ci(samples, ci)
    return [float(lo), float(hi)]


def _permutation_auc_gap(y, s, codes, n_perm, seed, stream, chunk) -> np.ndarray:
    """AUC gaps under random permutations of the group labels among the given samples (image level)."""
    n = y.size
    labels, codes = np.unique(codes, return_inverse=True)
    n_groups = labels.size
    plan = ClassPlan(y, s, np.zeros(n, np.int64), 1, np.arange(n), 0.5)
    out = np.empty(n_perm)
    for start in range(0, n_perm, chunk):
        k = min(chunk, n_perm - start)
        perm = np.stack(
            [np.random.default_rng([seed, 10_000 + stream, start + j]).permutation(codes) for j in range(k)]
        )
        aucs = np.concatenate([plan.auc((perm == g).astype(np.int32)) for g in range(n_groups)])  # (G, k)
        out[start : start + k] = _boot_gap(aucs)
    return out


def fairness_report(
    y_true,
    y_score,
    groups: Mapping[str, Sequence] | None = None,
    classes: Sequence[str] | None = None,
    patient_id=None,
    threshold="val_f1",
    val=None,
    n_boot: int = 1000,
    min_count: int = 5,
    seed: int = 0,
    ci: float = 0.95,
    intersections: Sequence | None = None,
    permutation_test: int = 0,
    chunk: int | None = None,
    n_jobs: int | None = None,
) -> dict:
    """Subgroup fairness report (JSON-serialisable dict; ``None`` = undefined/NaN).

    y_true (N, C) with 1/0 and -1 or NaN for unknown (excluded per class); y_score (N, C) probabilities.
    groups: {attribute: labels per sample} (use sex_labels / age_groups first; missing -> "unknown").
    threshold: "val_f1" (default, needs ``val=(y_true_val, y_score_val)``), "val_youden", "fixed" (0.5),
    "test_f1" (optimistic), a number, or one number per class. Bootstrap: ``n_boot`` replicates resampling
    patients (``patient_id``; None = each sample its own patient) within each subgroup of the attribute, percentile
    ``ci`` intervals for every group metric, gap and summary. Groups with < ``min_count`` positives or negatives,
    and the "unknown" group, are reported but left out of gaps, with the reason. ``intersections``: e.g.
    ``[("sex", "age")]``. ``permutation_test``: number of label permutations for a p-value of each AUC gap.
    ``chunk`` (replicates per array pass) and ``n_jobs`` (threads, default up to 2) change speed, not results.
    """
    y_all, s_all = as_2d(y_true, "y_true"), as_2d(y_score, "y_score")
    if y_all.shape != s_all.shape:
        raise ValueError(f"y_true shape {y_all.shape} != y_score shape {s_all.shape}; both must be (N, C)")
    n_samples, n_cls = y_all.shape
    classes = [f"class_{i}" for i in range(n_cls)] if classes is None else [str(c) for c in classes]
    if len(classes) != n_cls or len(set(classes)) != n_cls:
        raise ValueError(f"classes: need {n_cls} distinct names (one per column of y_true), got {classes}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), e.g. 0.95; got {ci}")
    if n_boot < 0 or min_count < 0 or permutation_test < 0:
        raise ValueError("n_boot, min_count and permutation_test must be >= 0")
    known = (
        np.stack([known_mask(y_all[:, c]) for c in range(n_cls)], axis=1) if n_cls else np.zeros((n_samples, 0), bool)
    )
    check_scores(s_all[known])
    attrs = _prepare_groups(groups, n_samples, intersections)
    thresholds = resolve_thresholds(threshold, n_cls, classes, y_all, s_all, val)
    thr = [thresholds[c]["value"] for c in classes]
    pidx, n_pat = patient_index(patient_id, n_samples)
    chunk = chunk or default_chunk(n_samples)

    # ---- point estimates
    overall = {c: group_metrics(y_all[known[:, i], i], s_all[known[:, i], i], thr[i]) for i, c in enumerate(classes)}
    glabels = {a: sorted(set(lab.tolist()), key=natural_key) for a, lab in attrs.items()}
    gcodes = {a: _codes(lab, glabels[a]) for a, lab in attrs.items()}
    per: dict = {c: {} for c in classes}
    for i, c in enumerate(classes):
        for a in attrs:
            gm = {}
            for k, g in enumerate(glabels[a]):
                sel = known[:, i] & (gcodes[a] == k)
                m = group_metrics(y_all[sel, i], s_all[sel, i], thr[i])
                m["excluded_reason"] = _exclusion(g, m, min_count)
                m["in_gap"] = m["excluded_reason"] is None
                gm[g] = m
            per[c][a] = {"groups": gm}

    # ---- bootstrap: metric samples per (class, attribute) -> {metric: (G, B)}; overall -> {metric: (B,)}
    boot: dict = {c: {} for c in classes}
    boot_overall: dict = dict.fromkeys(classes)
    if n_boot > 0:
        streams = [("__overall__", np.zeros(n_samples, np.int64), 1, OVERALL_STREAM)]
        streams += [(a, gcodes[a], len(glabels[a]), k + 1) for k, a in enumerate(attrs)]
        for name, codes, n_groups, stream in streams:
            engine = GroupedBootstrap(y_all, s_all, known, codes, n_groups, pidx, n_pat, thr)
            acc = {m: np.empty((n_cls, n_groups, n_boot)) for m in METRICS}

            def fill(wts, start, engine=engine, acc=acc):
                res = engine.metrics(wts)
                for m in METRICS:
                    acc[m][:, :, start : start + wts.shape[0]] = res[m]

            for_each_chunk(fill, patient_strata(pidx, codes, n_pat), n_boot, seed, stream, chunk, n_jobs)
            for i, c in enumerate(classes):
                if name == "__overall__":
                    boot_overall[c] = {m: acc[m][i, 0] for m in METRICS}
                else:
                    boot[c][name] = {m: acc[m][i] for m in METRICS}

    # ---- assemble per class x attribute
    for i, c in enumerate(classes):
        for a in attrs:
            entry = per[c][a]
            gm = entry["groups"]
            bs = boot[c].get(a)
            for k, g in enumerate(glabels[a]):
                gm[g]["ci"] = {m: _ci_pair(bs[m][k], ci) for m in METRICS} if bs else None
            gaps = {}
            for m in METRICS:
                use, excluded = [], {}
                for k, g in enumerate(glabels[a]):
                    why = gm[g]["excluded_reason"]
                    if why is None and not math.isfinite(gm[g][m]):
                        why = _UNDEFINED.get(m, f"{m} undefined (0/0)")
                    if why is None:
                        use.append(k)
                    else:
                        excluded[g] = why
                st = _gap_stats({glabels[a][k]: gm[glabels[a][k]][m] for k in use}, m)
                st["groups"] = [glabels[a][k] for k in use]
                st["excluded"] = excluded
                if len(use) < 2:
                    st["note"] = f"fewer than 2 eligible groups ({len(use)}); gap undefined"
                st["boot"] = _boot_gap(bs[m][use]) if bs else None  # removed before output
                st["ci"] = _ci_pair(st["boot"], ci) if bs else None
                gaps[m] = st
            entry["gaps"] = gaps
            use = [
                k
                for k, g in enumerate(glabels[a])
                if gm[g]["in_gap"] and math.isfinite(gm[g]["sensitivity"]) and math.isfinite(gm[g]["specificity"])
            ]
            tpr = np.asarray([[gm[glabels[a][k]]["sensitivity"]] for k in use]).reshape(len(use), 1)
            tnr = np.asarray([[gm[glabels[a][k]]["specificity"]] for k in use]).reshape(len(use), 1)
            eo = {"value": float(_eq_odds(tpr, tnr)[0]), "groups": [glabels[a][k] for k in use]}
            eo["boot"] = _eq_odds(bs["sensitivity"][use], bs["specificity"][use]) if bs else None
            eo["ci"] = _ci_pair(eo["boot"], ci) if bs else None
            entry["equalized_odds"] = eo
            if permutation_test > 0:
                entry["permutation"] = _perm_entry(
                    y_all[:, i],
                    s_all[:, i],
                    known[:, i],
                    gcodes[a],
                    glabels[a],
                    gaps["auc"],
                    permutation_test,
                    seed,
                    1000 * i + list(attrs).index(a),
                    chunk,
                )

    # ---- overall CIs and macro averages
    for c in classes:
        bo = boot_overall[c]
        overall[c]["ci"] = {m: _ci_pair(bo[m], ci) for m in METRICS} if bo else None
    macro = {"overall": {}, "gaps": {a: {} for a in attrs}, "equalized_odds": {}}
    for m in METRICS:
        vals = np.asarray([overall[c][m] for c in classes], dtype=float)
        use = np.isfinite(vals)
        entry = {"value": float(vals[use].mean()) if use.any() else math.nan, "n_classes": int(use.sum())}
        if n_boot > 0 and use.any():
            entry["ci"] = _ci_pair(
                np.mean([boot_overall[c][m] for c, u in zip(classes, use, strict=False) if u], axis=0), ci
            )
        macro["overall"][m] = entry
    for a in attrs:
        for m in METRICS:
            macro["gaps"][a][m] = _macro_entry([per[c][a]["gaps"][m] for c in classes], "gap", ci)
        macro["equalized_odds"][a] = _macro_entry([per[c][a]["equalized_odds"] for c in classes], "value", ci)
    for c in classes:  # drop the raw bootstrap samples (kept above only for the macro CIs)
        for a in attrs:
            for m in METRICS:
                per[c][a]["gaps"][m].pop("boot")
            per[c][a]["equalized_odds"].pop("boot")

    report = {
        "version": REPORT_VERSION,
        "meta": {
            "n_samples": n_samples,
            "n_patients": n_pat,
            "classes": classes,
            "attributes": list(attrs),
            "groups": glabels,
            "n_boot": n_boot,
            "ci": ci,
            "min_count": min_count,
            "seed": seed,
            "bootstrap": "patient-clustered (all images of a drawn patient), stratified by subgroup (a patient's "
            "stratum is the group of their first image), percentile intervals; overall metrics: "
            "unstratified patient bootstrap",
            "permutation_test": permutation_test,
            "labels": "1 positive, 0 negative; -1/NaN unknown, excluded per class",
            "undefined": "null = undefined (NaN), e.g. AUC of a group with one class",
        },
        "thresholds": thresholds,
        "overall": overall,
        "classes": per,
        "macro": macro,
    }
    return _jsonable(report)


def _codes(labels: np.ndarray, ordered: list[str]) -> np.ndarray:
    lookup = {g: k for k, g in enumerate(ordered)}
    return np.fromiter((lookup[v] for v in labels.tolist()), dtype=np.int64, count=labels.size)


def _macro_entry(items: list[dict], key: str, ci: float) -> dict:
    vals = np.asarray([_num(it[key]) for it in items], dtype=float)
    use = np.isfinite(vals)
    entry = {"value": float(vals[use].mean()) if use.any() else math.nan, "n_classes": int(use.sum())}
    boots = [it["boot"] for it, u in zip(items, use, strict=False) if u and it.get("boot") is not None]
    if boots and len(boots) == int(use.sum()):
        entry["ci"] = _ci_pair(np.nanmean(np.stack(boots), axis=0) if len(boots) > 1 else boots[0], ci)
    return entry


def _perm_entry(y, s, known, codes, labels, auc_gap: dict, n_perm, seed, stream, chunk) -> dict:
    incl = [labels.index(g) for g in auc_gap["groups"]]
    obs = auc_gap["gap"]
    if len(incl) < 2 or not math.isfinite(obs):
        return {"auc_gap_p_value": math.nan, "n_permutations": n_perm, "note": "AUC gap undefined"}
    sel = known & np.isin(codes, incl)
    null = _permutation_auc_gap(y[sel], s[sel], codes[sel], n_perm, seed, stream, chunk)
    p = (1 + int(np.sum(null >= obs - 1e-12))) / (n_perm + 1)
    return {
        "auc_gap_p_value": p,
        "n_permutations": n_perm,
        "null_mean_gap": float(np.nanmean(null)),
        "scheme": "group labels shuffled among the samples of the eligible groups (image level)",
    }


_ROW_KEYS = (
    "section",
    "class",
    "attribute",
    "group",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "n_pos",
    "n_neg",
    "included",
    "note",
)


def _row(**kw) -> dict:
    row = dict.fromkeys(_ROW_KEYS)
    row.update(kw)
    return row


def _ci_kw(ci) -> dict:
    return {"ci_low": ci[0], "ci_high": ci[1]} if ci else {}


def report_to_rows(report: Mapping) -> list[dict]:
    """Long-format rows (one per value) for a CSV: section, class, attribute, group, metric, value, ci_low, ci_high,
    n, n_pos, n_neg, included, note. Sections: threshold, overall, group, gap, worst, ratio, equalized_odds,
    permutation, macro_overall, macro_gap, macro_equalized_odds."""
    rows = []
    for c, t in report["thresholds"].items():
        rows.append(
            _row(
                section="threshold",
                **{"class": c},
                metric="threshold",
                value=t["value"],
                note=f"{t['method']} ({t['source']})" + (f"; {t['note']}" if t.get("note") else ""),
            )
        )
    for c, m in report["overall"].items():
        for k in METRICS:
            rows.append(
                _row(
                    section="overall",
                    **{"class": c},
                    metric=k,
                    value=m[k],
                    n=m["n"],
                    n_pos=m["n_pos"],
                    n_neg=m["n_neg"],
                    **_ci_kw((m.get("ci") or {}).get(k)),
                )
            )
    for c, per_attr in report["classes"].items():
        for a, e in per_attr.items():
            for g, m in e["groups"].items():
                for k in METRICS:
                    rows.append(
                        _row(
                            section="group",
                            **{"class": c},
                            attribute=a,
                            group=g,
                            metric=k,
                            value=m[k],
                            n=m["n"],
                            n_pos=m["n_pos"],
                            n_neg=m["n_neg"],
                            included=m["in_gap"],
                            note=m["excluded_reason"],
                            **_ci_kw((m.get("ci") or {}).get(k)),
                        )
                    )
            for k, gst in e["gaps"].items():
                excl = "; ".join(f"{g}: {why}" for g, why in gst["excluded"].items())
                rows.append(
                    _row(
                        section="gap",
                        **{"class": c},
                        attribute=a,
                        metric=k,
                        value=gst["gap"],
                        note=(gst.get("note") or "") + (f" excluded: {excl}" if excl else "") or None,
                        **_ci_kw(gst.get("ci")),
                    )
                )
                rows.append(
                    _row(
                        section="worst",
                        **{"class": c},
                        attribute=a,
                        group=gst["worst_group"],
                        metric=k,
                        value=gst["worst"],
                    )
                )
                rows.append(_row(section="ratio", **{"class": c}, attribute=a, metric=k, value=gst["ratio"]))
            eo = e["equalized_odds"]
            rows.append(
                _row(
                    section="equalized_odds",
                    **{"class": c},
                    attribute=a,
                    metric="equalized_odds",
                    value=eo["value"],
                    note=", ".join(eo["groups"]),
                    **_ci_kw(eo.get("ci")),
                )
            )
            if "permutation" in e:
                p = e["permutation"]
                rows.append(
                    _row(
                        section="permutation",
                        **{"class": c},
                        attribute=a,
                        metric="auc_gap_p_value",
                        value=p["auc_gap_p_value"],
                        n=p["n_permutations"],
                        note=p.get("note"),
                    )
                )
    mac = report["macro"]
    for k, v in mac["overall"].items():
        rows.append(
            _row(
                section="macro_overall",
                **{"class": "macro"},
                metric=k,
                value=v["value"],
                note=f"{v['n_classes']} classes",
                **_ci_kw(v.get("ci")),
            )
        )
    for a, per_m in mac["gaps"].items():
        for k, v in per_m.items():
            rows.append(
                _row(
                    section="macro_gap",
                    **{"class": "macro"},
                    attribute=a,
                    metric=k,
                    value=v["value"],
                    note=f"{v['n_classes']} classes",
                    **_ci_kw(v.get("ci")),
                )
            )
    for a, v in mac["equalized_odds"].items():
        rows.append(
            _row(
                section="macro_equalized_odds",
                **{"class": "macro"},
                attribute=a,
                metric="equalized_odds",
                value=v["value"],
                note=f"{v['n_classes']} classes",
                **_ci_kw(v.get("ci")),
            )
        )
    return rows


def _mlflow_name(*parts: str) -> str:
    # A hierarchical name ("class/attribute/metric"): each part keeps only alphanumerics, "_", "-" and ".".
    # Stricter than bundle.utils.mlflow.sanitize_key on purpose: "/" separates the levels, so a part may not
    # contain one; spaces become "_" too, so that metric names stay single tokens in the MLflow UI and queries.
    return "/".join(re.sub(r"[^A-Za-z0-9_\-.]+", "_", str(p)).strip("_") or "_" for p in parts)


def flatten_for_mlflow(report: Mapping, prefix: str = "") -> dict[str, float]:
    """A modest set of scalars: per class overall AUC, per class x attribute gaps of auc/accuracy/sensitivity/f1
    and the equalized-odds summary, and the macro versions. Undefined values are NaN (MLflow stores NaN)."""
    out: dict[str, float] = {}
    pre = prefix
    for c, m in report["overall"].items():
        out[pre + _mlflow_name(c, "auc")] = _num(m["auc"])
    out[pre + _mlflow_name("macro", "auc")] = _num(report["macro"]["overall"]["auc"]["value"])
    for c, per_attr in report["classes"].items():
        for a, e in per_attr.items():
            for k in GAP_METRICS_MLFLOW:
                out[pre + _mlflow_name(c, a, f"gap_{k}")] = _num(e["gaps"][k]["gap"])
            out[pre + _mlflow_name(c, a, "eq_odds")] = _num(e["equalized_odds"]["value"])
    for a, per_m in report["macro"]["gaps"].items():
        for k in GAP_METRICS_MLFLOW:
            out[pre + _mlflow_name("macro", a, f"gap_{k}")] = _num(per_m[k]["value"])
        out[pre + _mlflow_name("macro", a, "eq_odds")] = _num(report["macro"]["equalized_odds"][a]["value"])
    return out
