"""Reading a study's finished runs and summarising them: one record per run, mean +- sd over seeds per setting x
split x metric (:func:`aggregate`), look-ups by role (:class:`Index`) and the choice of the best p.

Inputs are the files each training run writes at its end (bundle/evaluation.py): ``eval/report/summary.json`` and
``eval/report/<split>/fairness_report.json`` of every run folder with a ``DONE`` marker (bundle/study/layout.py).
Metric names follow summary.json without the split prefix: ``mean_auc``, ``hit_rate``, ``macro/sex/gap_auc``,
``edema/age/gap_f1``; from the fairness report: ``macro/accuracy`` etc. (overall, macro over findings),
``<finding>/<metric>`` and ``<finding>/hit_rate``. Gaps are best minus worst subgroup.
"""

from __future__ import annotations

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
]

GAP_METRICS = ("accuracy", "auc", "sensitivity", "f1")  # the four gap columns of the paper's Table 2
GAP_LABEL = {"accuracy": "acc gap", "auc": "AUC gap", "sensitivity": "sens gap", "f1": "F1 gap"}
OVERALL_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")
SETTING_FIELDS = ("setting", "alignment_fraction", "random_alignment", "data_ratio", "groups")


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
    return out


def collect_runs(study_dir: str) -> list[dict]:
    """Every finished run (``runs/<id>/DONE``): its setting fields, seed and metrics, in run-id order."""
    runs_dir = os.path.join(study_dir, "runs")
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
    runs mix fingerprints (configurations), and the runs per setting."""
    expected = [f"{s['setting']}_seed{seed}" for seed in rec.get("seeds", []) for s in rec.get("settings", [])]
    have = {r["run_id"] for r in runs}
    fps: dict[str, set] = {}
    for r in runs:
        fps.setdefault(r["setting"], set()).add(r["fingerprint"])
    return {
        "expected": expected,
        "missing": [e for e in expected if e not in have],
        "mixed": sorted(s for s, f in fps.items() if len(f - {None}) > 1),
        "seeds_per": {s: m["n_runs"] for s, m in {r["setting"]: r for r in agg}.items()},
    }


class Index:
    """Look-ups into the aggregated rows: settings by role, (mean, sd, n) by setting x split x metric."""

    def __init__(self, agg: Sequence[Mapping]):
        self.cells = {(r["setting"], r["split"], r["metric"]): (r["mean"], r["sd"], r["n"]) for r in agg}
        self.meta: dict[str, dict] = {}
        for r in agg:
            self.meta.setdefault(r["setting"], {k: r[k] for k in SETTING_FIELDS})
        self.splits = _ordered(r["split"] for r in agg)
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


def choose_best_p(idx: Index, best_p_by: str = ReportOptions.best_p_by) -> tuple[float | None, str | None, str]:
    """The alignment level p > 0 (human masks, all data) with the highest mean of ``split/metric`` over seeds.

    Chosen on performance, never on the gaps that the comparisons count. Returns (p, setting id, how it was chosen).
    """
    aligned = {p: s for p, s in idx.aligned().items() if p > 0}
    if not aligned:
        return None, None, "no aligned setting (p > 0) finished"
    split, _, metric = best_p_by.partition("/")
    if not metric:
        raise ValueError(f"report.best_p_by {best_p_by!r}: write it as split/metric, e.g. test/mean_auc")
    note = ""
    if split not in idx.splits:
        fallback = idx.splits[0] if idx.splits else split
        note = f" (split {split!r} not evaluated; used {fallback!r})"
        split = fallback
    scored = [(idx.get(s, split, metric)[0], p, s) for p, s in aligned.items()]
    scored = [t for t in scored if math.isfinite(t[0])]
    if not scored:
        p, s = max(aligned.items())
        return p, s, f"highest p (no finite {split} {metric} to choose by){note}"
    best = max(scored, key=lambda t: (t[0], -t[1]))  # ties: the smaller p
    return best[1], best[2], f"highest mean {split} {metric} over seeds among p > 0{note}"
