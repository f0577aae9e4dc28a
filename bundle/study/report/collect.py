"""Reading a study's finished runs and summarising them: one record per run, mean +- sd over seeds per setting x
split x metric (:func:`aggregate`), look-ups by role (:class:`Index`) and the choice of the best p.

Inputs are the files each training run writes at its end (bundle/evaluation.py): ``eval/report/summary.json`` and
``eval/report/<split>/fairness_report.json`` of every run folder with a ``DONE`` marker (bundle/study/layout.py).
Metric names follow summary.json without the split prefix: ``mean_auc``, ``hit_rate``, ``macro/sex/gap_auc``,
``edema/age/gap_f1``; from the fairness report: ``macro/accuracy`` etc. (overall, macro over findings),
``<finding>/<metric>`` and ``<finding>/hit_rate``; from ``eval/report/model_selection.json``: the checkpoint's
validation ``mean_auc`` under the split ``validation``; from ``<split>/predictions.csv``: ``<finding>/score_sd`` (the sd
of the scores over the split's images, for the degenerate-model flag). Gaps are best minus worst subgroup.

A folder without ``runs/`` but with a report's ``results.csv`` (e.g. docs/quick_study) is read from that file.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from bundle.study.config import ReportOptions
from bundle.study.layout import DONE, read_json

__all__ = [
    "GAP_METRICS",
    "GAP_LABEL",
    "SETTING_FIELDS",
    "collect_runs",
    "long_rows",
    "aggregate",
    "Index",
    "choose_best_p",
    "coverage",
    "model_flags",
    "VALIDATION",
]

GAP_METRICS = ("accuracy", "auc", "sensitivity", "f1")  # the four gap columns of the paper's Table 2
GAP_LABEL = {"accuracy": "acc gap", "auc": "AUC gap", "sensitivity": "sens gap", "f1": "F1 gap"}
OVERALL_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")
SETTING_FIELDS = ("setting", "alignment_fraction", "random_alignment", "data_ratio", "groups")
VALIDATION = "validation"  # the split name of the model-selection metrics (model_selection.json)
VALIDATION_ALIASES = (VALIDATION, "val")


def _num(v) -> float:
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _run_metrics(run_dir: str) -> dict[tuple[str, str], float]:
    """{(split, metric): value} from a run's summary.json and fairness reports."""
    rep = os.path.join(run_dir, "eval", "report")
    summary = read_json(os.path.join(rep, "summary.json"))
    if not isinstance(summary, dict):
        return {}
    out: dict[tuple[str, str], float] = {}
    for split, d in summary.items():
        if not isinstance(d, dict):
            continue
        for k, v in d.items():
            if k == "report_dir" or isinstance(v, str | dict | list):
                continue
            out[(split, k[len(split) + 1 :] if k.startswith(f"{split}_") else k)] = _num(v)
        fr = read_json(os.path.join(rep, split, "fairness_report.json"))
        if not isinstance(fr, dict):
            continue
        for m, e in (fr.get("macro", {}).get("overall") or {}).items():
            out.setdefault((split, f"macro/{m}"), _num(e.get("value")))
        for c, e in (fr.get("overall") or {}).items():
            for m in OVERALL_METRICS:
                out.setdefault((split, f"{c}/{m}"), _num(e.get(m)))
        hr = (fr.get("alignment") or {}).get("hit_rate")
        if isinstance(hr, dict):
            for c, e in (hr.get("per_class") or {}).items():
                out.setdefault((split, f"{c}/hit_rate"), _num(e.get("value")))
            out.setdefault((split, "macro/hit_rate"), _num((hr.get("macro") or {}).get("value")))
        out.update({(split, k): v for k, v in _score_sd(os.path.join(rep, split, "predictions.csv")).items()})
    sel = read_json(os.path.join(rep, "model_selection.json"))
    if isinstance(sel, dict):
        for k, v in sel.items():
            if k not in ("split", "n") and not isinstance(v, str | dict | list):
                out[(VALIDATION, k)] = _num(v)
    return out


def _score_sd(path: str) -> dict[str, float]:
    """{"<finding>/score_sd": sd of the finding's scores over the split's images} from a predictions.csv."""
    if not os.path.isfile(path):
        return {}
    cols: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k and k.startswith("score_"):
                    cols.setdefault(k[len("score_") :], []).append(_num(v))
    out = {}
    for c, vals in cols.items():
        a = np.asarray(vals, dtype=float)
        a = a[np.isfinite(a)]
        out[f"{c}/score_sd"] = float(a.std()) if a.size else math.nan
    return out


def _runs_from_csv(path: str) -> list[dict]:
    """The runs of a report's results.csv (one row per run x split x metric): no folders, fingerprints or overlays."""
    runs: dict[str, dict] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            r = runs.setdefault(
                row["run_id"],
                {
                    "run_id": row["run_id"],
                    "setting": row["setting"],
                    "alignment_fraction": float(row["alignment_fraction"]),
                    "random_alignment": row["random_alignment"].strip().lower() in ("true", "1"),
                    "data_ratio": float(row["data_ratio"]),
                    "seed": int(row["seed"]),
                    "groups": row.get("groups", ""),
                    "fingerprint": None,
                    "config_fingerprint": None,
                    "elapsed_s": None,
                    "dir": None,
                    "metrics": {},
                },
            )
            r["metrics"][(row["split"], row["metric"])] = _num(row["value"]) if row["value"] != "" else math.nan
    return [runs[k] for k in sorted(runs)]


def collect_runs(study_dir: str) -> list[dict]:
    """Every finished run (``runs/<id>/DONE``): its setting fields, seed and metrics, in run-id order. A folder
    without ``runs/`` that holds a report's ``results.csv`` is read from it (``dir`` is then None)."""
    runs_dir = os.path.join(study_dir, "runs")
    if not os.path.isdir(runs_dir) and os.path.isfile(os.path.join(study_dir, "results.csv")):
        return _runs_from_csv(os.path.join(study_dir, "results.csv"))
    out = []
    for rid in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        rdir = os.path.join(runs_dir, rid)
        done = read_json(os.path.join(rdir, DONE))
        if not isinstance(done, dict):
            continue
        missing = [k for k in ("alignment_fraction", "random_alignment", "data_ratio", "seed") if k not in done]
        if missing:
            raise ValueError(
                f"{os.path.join(rdir, DONE)}: missing field(s) {missing}; the marker was not written by "
                "bundle.study: delete it and rerun the study to redo this run"
            )
        groups = done.get("groups") or []
        out.append(
            {
                "run_id": done.get("run_id", rid),
                "setting": done.get("setting", rid.rsplit("_seed", 1)[0]),
                "alignment_fraction": float(done["alignment_fraction"]),
                "random_alignment": bool(done["random_alignment"]),
                "data_ratio": float(done["data_ratio"]),
                "seed": int(done["seed"]),
                "groups": ",".join(groups) if isinstance(groups, list) else str(groups),
                "fingerprint": done.get("fingerprint"),
                "config_fingerprint": done.get("config_fingerprint"),
                "elapsed_s": done.get("elapsed_s"),
                "dir": rdir,
                "metrics": _run_metrics(rdir),
            }
        )
    return out


def long_rows(runs: Sequence[Mapping]) -> list[dict]:
    """One row per run x split x metric (results.csv)."""
    rows = []
    for r in runs:
        for (split, metric), v in sorted(r["metrics"].items()):
            rows.append(
                {
                    "run_id": r["run_id"],
                    **{k: r[k] for k in SETTING_FIELDS},
                    "seed": r["seed"],
                    "split": split,
                    "metric": metric,
                    "value": v,
                }
            )
    return rows


def aggregate(runs: Sequence[Mapping]) -> list[dict]:
    """Mean and sample sd (ddof 1) over seeds per setting x split x metric, over the finite values only
    (``n`` = how many; sd is NaN for n < 2); ``n_runs`` counts the runs of the setting."""
    by: dict[tuple, list[float]] = {}
    meta: dict[str, dict] = {}
    nruns: dict[str, int] = {}
    for r in runs:
        meta[r["setting"]] = {k: r[k] for k in SETTING_FIELDS}
        nruns[r["setting"]] = nruns.get(r["setting"], 0) + 1
        for (split, metric), v in r["metrics"].items():
            by.setdefault((r["setting"], split, metric), []).append(v)
    out = []
    for (setting, split, metric), vals in sorted(by.items()):
        a = np.asarray(vals, dtype=float)
        a = a[np.isfinite(a)]
        out.append(
            {
                **meta[setting],
                "split": split,
                "metric": metric,
                "mean": float(a.mean()) if a.size else math.nan,
                "sd": float(a.std(ddof=1)) if a.size >= 2 else math.nan,
                "n": int(a.size),
                "n_runs": nruns[setting],
            }
        )
    return out


def coverage(rec: Mapping, runs: Sequence[Mapping], agg: Sequence[Mapping]) -> dict:
    """What the report says about completeness: the runs the study config expects, those missing, the settings whose
    runs really mix configurations (different seed-free ``config_fingerprint``), the settings that could not be checked
    (runs without one: made before it was recorded, or read from results.csv), and the runs per setting."""
    expected = [f"{s['setting']}_seed{seed}" for seed in rec.get("seeds", []) for s in rec.get("settings", [])]
    have = {r["run_id"] for r in runs}
    fps: dict[str, set] = {}
    for r in runs:
        fps.setdefault(r["setting"], set()).add(r.get("config_fingerprint"))
    return {
        "expected": expected,
        "missing": [e for e in expected if e not in have],
        "mixed": sorted(s for s, f in fps.items() if len(f - {None}) > 1),
        "unchecked": sorted(s for s, f in fps.items() if None in f),
        "seeds_per": {s: m["n_runs"] for s, m in {r["setting"]: r for r in agg}.items()},
    }


class Index:
    """Look-ups into the aggregated rows: settings by role, (mean, sd, n) by setting x split x metric."""

    def __init__(self, agg: Sequence[Mapping]):
        self.cells = {(r["setting"], r["split"], r["metric"]): (r["mean"], r["sd"], r["n"]) for r in agg}
        self.meta: dict[str, dict] = {}
        for r in agg:
            self.meta.setdefault(r["setting"], {k: r[k] for k in SETTING_FIELDS})
        self.splits = _ordered(r["split"] for r in agg if r["split"] != VALIDATION)  # evaluated (test) splits
        self.metrics = _ordered(r["metric"] for r in agg)

    def get(self, setting: str | None, split: str, metric: str) -> tuple[float, float, int]:
        return self.cells.get((setting, split, metric), (math.nan, math.nan, 0))

    def aligned(self, data_ratio: float = 1.0) -> dict[float, str]:
        """{p: setting id} of the human-mask settings (no random shapes) at a data ratio, p = 0 included."""
        return dict(
            sorted(
                (m["alignment_fraction"], s)
                for s, m in self.meta.items()
                if not m["random_alignment"] and m["data_ratio"] == data_ratio
            )
        )

    def random(self) -> dict[float, str]:
        return dict(
            sorted(
                (m["alignment_fraction"], s)
                for s, m in self.meta.items()
                if m["random_alignment"] and m["data_ratio"] == 1.0
            )
        )

    def ratios(self, p: float) -> dict[float, str]:
        return dict(
            sorted(
                (m["data_ratio"], s)
                for s, m in self.meta.items()
                if not m["random_alignment"] and m["alignment_fraction"] == p
            )
        )

    def classes_attributes(self) -> tuple[list[str], list[str]]:
        classes, attrs = [], []
        for m in self.metrics:
            parts = m.split("/")
            if len(parts) == 3 and parts[2].startswith("gap_"):
                if parts[0] != "macro" and parts[0] not in classes:
                    classes.append(parts[0])
                if parts[1] not in attrs:
                    attrs.append(parts[1])
        return classes, attrs


def _ordered(items) -> list:
    seen: dict = {}
    for x in items:
        seen.setdefault(x, None)
    out = list(seen)
    # conventional order of the bundle's splits first, then the rest alphabetically
    pri = {"test": 0, "test_ood": 1}
    return sorted(out, key=lambda s: (pri.get(s, 2), s))


def _split_metric(spec: str, what: str) -> tuple[str, str]:
    split, _, metric = str(spec).partition("/")
    if not split or not metric:
        raise ValueError(f"{what} {spec!r}: write it as split/metric, e.g. validation/mean_auc or test/mean_auc")
    return (VALIDATION if split in VALIDATION_ALIASES else split), metric


def choose_best_p(
    idx: Index, best_p_by: str = ReportOptions.best_p_by, fallback: str | None = ReportOptions.best_p_fallback
) -> tuple[float | None, str | None, str, str]:
    """The alignment level p > 0 (human masks, all data) with the highest mean of ``split/metric`` over seeds.

    ``validation/mean_auc`` (alias ``val/mean_auc``) is the checkpoint's validation AUC of each run
    (model_selection.json), the paper's model selection. When an aligned setting has no finite value of it, the
    ``fallback`` split/metric is used and the returned warning says so; with no fallback ("" or None) that is an
    error. Chosen on performance, never on the gaps that the comparisons count.

    Returns (p, setting id, how it was chosen, warning or "").
    """
    aligned = {p: s for p, s in idx.aligned().items() if p > 0}
    if not aligned:
        return None, None, "no aligned setting (p > 0) finished", ""

    def missing(split: str, metric: str) -> list[str]:
        return [s for s in aligned.values() if not math.isfinite(idx.get(s, split, metric)[0])]

    split, metric = _split_metric(best_p_by, "report.best_p_by")
    warning = ""
    lacking = missing(split, metric)
    if lacking:
        where = "model_selection.json" if split == VALIDATION else f"the {split!r} evaluation"
        if not fallback:
            raise ValueError(
                f"best p by {best_p_by}: no value for {lacking} ({where} missing); rerun those runs' evaluation, or "
                "choose another criterion (--best-p-by test/mean_auc) or a fallback (report.best_p_fallback)"
            )
        fsplit, fmetric = _split_metric(fallback, "report.best_p_fallback")
        warning = (
            f"best p could not be chosen by {best_p_by} ({where} has no value for {', '.join(lacking)}); "
            f"FALLBACK: chosen by {fsplit} {fmetric} instead"
        )
        split, metric = fsplit, fmetric
        if missing(split, metric):
            p, s = max(aligned.items())
            return p, s, f"highest p (no finite {split} {metric} either)", warning
    scored = [(idx.get(s, split, metric)[0], p, s) for p, s in aligned.items()]
    best = max(scored, key=lambda t: (t[0], -t[1]))  # ties: the smaller p
    data = "validation data" if split == VALIDATION else f"{split} data: not the paper's validation-based selection"
    return best[1], best[2], f"highest mean {split} {metric} over seeds among p > 0 ({data})", warning


def model_flags(runs: Sequence[Mapping], opts: ReportOptions | None = None) -> dict[tuple[str, str, str], dict]:
    """Per setting x split x finding, what makes its gaps uninformative:

    - ``degenerate``: the seeds (run ids) with constant scores (sd over the images < ``opts.degenerate_sd``, when
      predictions.csv is there), no positive prediction (sensitivity 0 and specificity 1) or only positive ones
      (sensitivity 1 and specificity 0): their threshold-based gaps of 0 are artifacts;
    - ``ceiling``: the metrics among accuracy, AUC, sensitivity and F1 whose overall value on the finding is >=
      ``opts.ceiling`` in every seed (their gaps are ~0 by construction);
    - ``weak``: True when the mean AUC over seeds is below ``opts.weak_auc`` (a model that barely learned).
    """
    opts = opts or ReportOptions()
    by: dict[tuple[str, str, str], list[tuple[str, dict]]] = {}
    for r in runs:
        for split, metric in r["metrics"]:
            c, _, m = metric.partition("/")
            if m == "auc" and c != "macro":
                by.setdefault((r["setting"], split, c), []).append((r["run_id"], r["metrics"]))
    out = {}
    for (setting, split, c), items in by.items():
        degenerate, aucs = [], []
        ceiling = [
            m for m in GAP_METRICS if all(met.get((split, f"{c}/{m}"), math.nan) >= opts.ceiling for _, met in items)
        ]
        for rid, met in items:
            sd = met.get((split, f"{c}/score_sd"), math.nan)
            sens = met.get((split, f"{c}/sensitivity"), math.nan)
            spec = met.get((split, f"{c}/specificity"), math.nan)
            if (
                (math.isfinite(sd) and sd < opts.degenerate_sd)
                or (sens == 0.0 and spec == 1.0)
                or (sens == 1.0 and spec == 0.0)
            ):
                degenerate.append(rid)
            aucs.append(met.get((split, f"{c}/auc"), math.nan))
        a = np.asarray(aucs, dtype=float)
        a = a[np.isfinite(a)]
        out[(setting, split, c)] = {
            "degenerate": degenerate,
            "ceiling": ceiling,
            "weak": bool(a.size) and float(a.mean()) < opts.weak_auc,
        }
    return out
