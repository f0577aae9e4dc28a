"""The study report: every finished run's evaluation, mean +- sd over seeds, the paper's Table 2 and Figs. 3-6.

    make_report("results/quick")   # -> results/quick/report/{results.md, *.csv, *.png}

Inputs are the files each training run writes at its end (bundle/evaluation.py): ``eval/report/summary.json`` and
``eval/report/<split>/fairness_report.json`` of every run folder with a ``DONE`` marker (bundle/study.py). Metric
names follow summary.json without the split prefix: ``mean_auc``, ``hit_rate``, ``macro/sex/gap_auc``,
``edema/age/gap_f1``; from the fairness report: ``macro/accuracy`` etc. (overall, macro over findings),
``<finding>/<metric>`` and ``<finding>/hit_rate``. Gaps are best minus worst subgroup. See docs/study.md.
"""
from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from bundle.utils.atomic import rows_to_csv, write_text_atomic

from bundle.study import CONFIG_FILE, DONE, PARENT_FILE, read_json

__all__ = ["collect_runs", "long_rows", "aggregate", "Index", "choose_best_p", "gap_comparisons", "table2",
           "positive_control", "make_report", "GAP_METRICS"]

GAP_METRICS = ("accuracy", "auc", "sensitivity", "f1")  # the four gap columns of the paper's Table 2
GAP_LABEL = {"accuracy": "acc gap", "auc": "AUC gap", "sensitivity": "sens gap", "f1": "F1 gap"}
OVERALL_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")
SETTING_FIELDS = ("setting", "alignment_fraction", "random_alignment", "data_ratio", "groups")


# ================================================================================================ collection
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
            out[(split, k[len(split) + 1:] if k.startswith(f"{split}_") else k)] = _num(v)
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
            raise ValueError(f"{os.path.join(rdir, DONE)}: missing field(s) {missing}; the marker was not written by "
                             "bundle.study: delete it and rerun the study to redo this run")
        groups = done.get("groups") or []
        out.append({
            "run_id": done.get("run_id", rid), "setting": done.get("setting", rid.rsplit("_seed", 1)[0]),
            "alignment_fraction": float(done["alignment_fraction"]), "random_alignment": bool(done["random_alignment"]),
            "data_ratio": float(done["data_ratio"]), "seed": int(done["seed"]),
            "groups": ",".join(groups) if isinstance(groups, list) else str(groups),
            "fingerprint": done.get("fingerprint"), "elapsed_s": done.get("elapsed_s"), "dir": rdir,
            "metrics": _run_metrics(rdir),
        })
    return out


def long_rows(runs: Sequence[Mapping]) -> list[dict]:
    """One row per run x split x metric (results.csv)."""
    rows = []
    for r in runs:
        for (split, metric), v in sorted(r["metrics"].items()):
            rows.append({"run_id": r["run_id"], **{k: r[k] for k in SETTING_FIELDS}, "seed": r["seed"],
                         "split": split, "metric": metric, "value": v})
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
        out.append({**meta[setting], "split": split, "metric": metric,
                    "mean": float(a.mean()) if a.size else math.nan,
                    "sd": float(a.std(ddof=1)) if a.size >= 2 else math.nan,
                    "n": int(a.size), "n_runs": nruns[setting]})
    return out


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
        return dict(sorted((m["alignment_fraction"], s) for s, m in self.meta.items()
                           if not m["random_alignment"] and m["data_ratio"] == data_ratio))

    def random(self) -> dict[float, str]:
        return dict(sorted((m["alignment_fraction"], s) for s, m in self.meta.items()
                           if m["random_alignment"] and m["data_ratio"] == 1.0))

    def ratios(self, p: float) -> dict[float, str]:
        return dict(sorted((m["data_ratio"], s) for s, m in self.meta.items()
                           if not m["random_alignment"] and m["alignment_fraction"] == p))

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


# ================================================================================================ analysis
def choose_best_p(idx: Index, best_p_by: str = "test/mean_auc") -> tuple[float | None, str | None, str]:
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


def gap_comparisons(idx: Index, base: str | None, aligned: str | None, splits: Sequence[str] | None = None,
                    classes: Sequence[str] | None = None, attributes: Sequence[str] | None = None) -> list[dict]:
    """The cells of Table 2 that compare two settings: split x finding x attribute x gap metric (accuracy, AUC,
    sensitivity, F1). ``lowered`` = the aligned setting's mean gap over seeds is strictly below the baseline's; cells
    where either mean is undefined are returned with ``lowered = None`` (not counted)."""
    if base is None or aligned is None:
        return []
    c_all, a_all = idx.classes_attributes()
    rows = []
    for split in splits or idx.splits:
        for c in classes or c_all:
            for a in attributes or a_all:
                for m in GAP_METRICS:
                    key = f"{c}/{a}/gap_{m}"
                    b, al = idx.get(base, split, key)[0], idx.get(aligned, split, key)[0]
                    ok = math.isfinite(b) and math.isfinite(al)
                    rows.append({"split": split, "finding": c, "attribute": a, "metric": m, "baseline": base,
                                 "aligned": aligned, "baseline_gap": b, "aligned_gap": al,
                                 "lowered": (al < b) if ok else None})
    return rows


def count_lowered(rows: Sequence[Mapping]) -> tuple[int, int]:
    counted = [r for r in rows if r["lowered"] is not None]
    return sum(bool(r["lowered"]) for r in counted), len(counted)


def _pct(mean: float, sd: float, n: int, scale: float = 100.0, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "n/a"
    s = f"{mean * scale:.{digits}f}"
    return s + (f" ± {sd * scale:.{digits}f}" if n >= 2 and math.isfinite(sd) else " ± –")


def _bold_best(cells: list[tuple[float, str]], higher_better: bool) -> list[str]:
    vals = [v for v, _ in cells if math.isfinite(v)]
    if len(vals) < 2 or max(vals) - min(vals) <= 1e-12:  # nothing to single out
        return [t for _, t in cells]
    best = max(vals) if higher_better else min(vals)
    return [f"**{t}**" if math.isfinite(v) and math.isclose(v, best, rel_tol=0, abs_tol=1e-12) else t
            for v, t in cells]


def _hit_metric(idx: Index, finding: str) -> str:
    return f"{finding}/hit_rate" if finding != "macro" else ("macro/hit_rate" if "macro/hit_rate" in idx.metrics
                                                             else "hit_rate")


def table2(idx: Index, models: Sequence[tuple[str, str]], attributes: Sequence[str] | None = None) -> tuple[str, list]:
    """Markdown (one table per test split) and rows: per finding (and the macro average) x attribute x model, the
    accuracy/AUC/sensitivity/F1 gaps (%) and the hit rate (%), mean ± sd over seeds; the best of each block in bold
    (lowest gap, highest hit rate). ``models``: [(label, setting id)]."""
    classes, attrs = idx.classes_attributes()
    attrs = [a for a in (attributes or attrs) if a in attrs] or attrs
    md, rows = [], []
    cols = [*(GAP_LABEL[m] + " (%)" for m in GAP_METRICS), "hit rate (%)"]
    for split in idx.splits:
        md += [f"**{split}**", "", "| finding | attribute | model | " + " | ".join(cols) + " | seeds |",
               "|---|---|---|" + "---|" * (len(cols) + 1)]
        n_lines = len(md)
        for c in [*classes, "macro"]:
            for a in attrs:
                block = []
                for label, s in models:
                    vals = [idx.get(s, split, f"{c}/{a}/gap_{m}") for m in GAP_METRICS]
                    vals.append(idx.get(s, split, _hit_metric(idx, c)))
                    block.append((label, s, vals))
                    rows.append({"split": split, "finding": c, "attribute": a, "model": label, "setting": s,
                                 **{f"{m}_gap_mean": v[0] for m, v in zip(GAP_METRICS, vals)},
                                 **{f"{m}_gap_sd": v[1] for m, v in zip(GAP_METRICS, vals)},
                                 "hit_rate_mean": vals[-1][0], "hit_rate_sd": vals[-1][1],
                                 "seeds": max(v[2] for v in vals)})
                if all(not math.isfinite(v[0]) for _, _, vals in block for v in vals[:-1]):
                    continue  # no gap defined for this finding x attribute (e.g. too few positives per group)
                columns = []
                for j in range(len(cols)):
                    columns.append(_bold_best([(vals[j][0], _pct(*vals[j])) for _, _, vals in block],
                                              higher_better=(j == len(cols) - 1)))
                for i, (label, _, vals) in enumerate(block):
                    name = "all findings (macro)" if c == "macro" else c
                    md.append(f"| {name} | {a} | {label} | " + " | ".join(col[i] for col in columns)
                              + f" | {max(v[2] for v in vals)} |")
        if len(md) == n_lines:
            md[-2:] = ["_no gap is defined on this split: every subgroup comparison lacks enough positives and "
                       "negatives (see the runs' fairness_report.json)_"]
        md.append("")
    return "\n".join(md), rows


def positive_control(idx: Index, split: str, attributes: Sequence[str] = ("sex", "age")) -> tuple[str, list]:
    """Per alignment level and random alignment: the split's macro AUC gap per attribute, mean AUC and hit rate."""
    settings = [(f"p = {p:g}", s) for p, s in idx.aligned().items()]
    settings += [(f"random, p = {p:g}", s) for p, s in idx.random().items()]
    metrics = [(f"AUC gap {a} (%)", f"macro/{a}/gap_auc", 100.0, 2) for a in attributes]
    metrics += [("mean AUC", "mean_auc", 1.0, 3), ("hit rate (%)", "hit_rate", 100.0, 1)]
    md = ["| setting | " + " | ".join(m[0] for m in metrics) + " | seeds |", "|---|" + "---|" * (len(metrics) + 1)]
    rows = []
    for label, s in settings:
        vals = [idx.get(s, split, key) for _, key, _, _ in metrics]
        md.append(f"| {label} | " + " | ".join(_pct(*v, scale=sc, digits=d) for v, (_, _, sc, d) in zip(vals, metrics))
                  + f" | {max(v[2] for v in vals)} |")
        rows.append({"split": split, "setting": s, "label": label,
                     **{f"{key}_mean": v[0] for v, (_, key, _, _) in zip(vals, metrics)},
                     **{f"{key}_sd": v[1] for v, (_, key, _, _) in zip(vals, metrics)},
                     "seeds": max(v[2] for v in vals)})
    return "\n".join(md), rows


# ================================================================================================ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    """Atomic PNG write (bundle.plots.save_figure does the same but imports torch, seconds for nothing here)."""
    plt = _plt()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _attr_gap_label(a: str, metric: str) -> str:
    return f"{GAP_LABEL.get(metric, metric + ' gap')}, {a} (percentage points)"


def fig3_gap_vs_performance(idx: Index, path: str, attributes: Sequence[str], gap_metric: str = "auc") -> str | None:
    """Fairness gap vs mean AUC for each alignment level (human masks, all data), error bars = sd over seeds."""
    levels = idx.aligned()
    if not levels or not idx.splits:
        return None
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    nr, nc = len(attributes), len(idx.splits)
    fig, axes = plt.subplots(nr, nc, figsize=(4.6 * nc, 3.8 * nr), squeeze=False)
    for i, a in enumerate(attributes):
        for j, split in enumerate(idx.splits):
            ax = axes[i][j]
            xs, ys = [], []
            for k, (p, s) in enumerate(levels.items()):
                x, xsd, _ = idx.get(s, split, "mean_auc")
                y, ysd, _ = idx.get(s, split, f"macro/{a}/gap_{gap_metric}")
                if not (math.isfinite(x) and math.isfinite(y)):
                    continue
                col = cmap(0.85 * p if len(levels) > 1 else 0.4)  # viridis' yellow end is unreadable on white
                ax.errorbar(100 * x, 100 * y, xerr=100 * xsd if math.isfinite(xsd) else None,
                            yerr=100 * ysd if math.isfinite(ysd) else None, fmt="o", color=col, capsize=3, ms=7,
                            label=f"p = {p:g}")
                ax.annotate(f"{p:g}", (100 * x, 100 * y), textcoords="offset points", xytext=(6, 4), fontsize=8)
                xs.append(100 * x)
                ys.append(100 * y)
            if len(xs) > 1:
                ax.plot(xs, ys, ":", color="grey", lw=1, zorder=0)
            if not xs:
                ax.text(0.5, 0.5, "gap undefined\n(too few positives per subgroup)", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
            ax.set_xlabel(f"mean AUC over findings, {split} (%)")
            ax.set_ylabel(_attr_gap_label(a, gap_metric))
            ax.set_title(f"{split}: {a}")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0 and xs:
                ax.legend(title="alignment fraction", fontsize=8)
    fig.suptitle("Fig. 3: fairness gap vs performance per alignment level (mean ± sd over seeds; "
                 "lower-right is better)")
    fig.tight_layout()
    return _save(fig, path)


def fig4_random_vs_aligned(idx: Index, path: str, attributes: Sequence[str]) -> str | None:
    """Baseline (p = 0) vs aligned (human masks) vs random shapes at the same p: AUC, gaps, hit rate."""
    rnd = idx.random()
    aligned = idx.aligned()
    if not rnd or 0.0 not in aligned:
        return None
    p = max(rnd)
    models = [("baseline (p = 0)", aligned[0.0], "#7f7f7f")]
    if p in aligned:
        models.append((f"aligned, human masks (p = {p:g})", aligned[p], "#1f77b4"))
    models.append((f"aligned, random shapes (p = {p:g})", rnd[p], "#ff7f0e"))
    panels = [("mean_auc", "mean AUC over findings (%)")]
    panels += [(f"macro/{a}/gap_auc", f"AUC gap, {a} (percentage points)") for a in attributes]
    panels += [("hit_rate", "hit rate of the attention (%)")]
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    width = 0.8 / len(models)
    x = np.arange(len(idx.splits))
    for ax, (metric, ylabel) in zip(axes[0], panels):
        for k, (label, s, col) in enumerate(models):
            vals = [idx.get(s, sp, metric) for sp in idx.splits]
            xs = x + (k - (len(models) - 1) / 2) * width
            # undefined values (e.g. a gap without two eligible subgroups) get no bar but an "n/a", never a 0 bar
            ax.bar(xs, [100 * v[0] if math.isfinite(v[0]) else np.nan for v in vals], width,
                   yerr=[100 * v[1] if math.isfinite(v[1]) else 0 for v in vals], capsize=3, color=col, label=label)
            for xi, v in zip(xs, vals):
                if not math.isfinite(v[0]):
                    ax.text(xi, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="grey",
                            transform=ax.get_xaxis_transform())
        ax.set_xlim(-0.5, len(idx.splits) - 0.5)
        if ax.get_ylim()[0] < 0:  # nothing finite to draw: keep a positive axis
            ax.set_ylim(0, 1)
        ax.set_xticks(x, idx.splits)
        ax.set_xlabel("test split")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(models), fontsize=9, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Fig. 4: random vs human-mask alignment vs baseline (mean ± sd over seeds)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, path)


def fig5_data_ratio(idx: Index, path: str, attributes: Sequence[str]) -> str | None:
    """Mean AUC and AUC gaps vs training data ratio, with and without alignment."""
    ps = [p for p in sorted({m["alignment_fraction"] for m in idx.meta.values() if m["data_ratio"] != 1.0
                             and not m["random_alignment"]})]
    if not ps:
        return None
    plt = _plt()
    panels = [("mean_auc", "mean AUC over findings (%)")]
    panels += [(f"macro/{a}/gap_auc", f"AUC gap, {a} (percentage points)") for a in attributes]
    nr, nc = len(panels), len(idx.splits)
    fig, axes = plt.subplots(nr, nc, figsize=(4.4 * nc, 3.2 * nr), squeeze=False)
    colors = plt.get_cmap("viridis")
    for i, (metric, ylabel) in enumerate(panels):
        for j, split in enumerate(idx.splits):
            ax = axes[i][j]
            for p in ps:
                series = idx.ratios(p)
                r = [100 * k for k in series]
                v = [idx.get(s, split, metric) for s in series.values()]
                ax.errorbar(r, [100 * t[0] for t in v], yerr=[100 * t[1] if math.isfinite(t[1]) else 0 for t in v],
                            marker="o", capsize=3, color=colors(0.85 * p if len(ps) > 1 else 0.4),
                            label=f"p = {p:g}" + (" (no alignment)" if p == 0 else ""))
            ax.set_xlabel("training data ratio (% of patients)")
            ax.set_ylabel(ylabel)
            ax.set_title(split)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("Fig. 5: performance and fairness gap vs training data ratio (mean ± sd over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def fig6_radar(idx: Index, path: str, models: Sequence[tuple[str, str]]) -> str | None:
    """Radar of macro accuracy, AUC, sensitivity and F1 (%) per test split, with and without alignment."""
    metrics = [("accuracy", "accuracy"), ("auc", "AUC"), ("sensitivity", "sensitivity"), ("f1", "F1")]
    if not models or not idx.splits:
        return None
    plt = _plt()
    ang = np.linspace(0, 2 * np.pi, len(metrics), endpoint=False)
    fig, axes = plt.subplots(1, len(idx.splits), figsize=(4.6 * len(idx.splits), 4.6), squeeze=False,
                             subplot_kw={"polar": True})
    cols = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728"]
    for ax, split in zip(axes[0], idx.splits):
        for k, (label, s) in enumerate(models):
            vals = [idx.get(s, split, f"macro/{m}")[0] for m, _ in metrics]
            if not any(math.isfinite(v) for v in vals):
                continue
            v = np.asarray([100 * x if math.isfinite(x) else 0.0 for x in vals])
            ax.plot(np.r_[ang, ang[:1]], np.r_[v, v[:1]], "--o" if k == 0 else "-o", color=cols[k % len(cols)],
                    label=label, ms=4)  # dashed baseline stays visible where the polygons coincide
            ax.fill(np.r_[ang, ang[:1]], np.r_[v, v[:1]], color=cols[k % len(cols)], alpha=0.12)
        ax.set_xticks(ang, [f"{n} (%)" for _, n in metrics])
        ax.tick_params(axis="x", pad=12)
        ax.set_rlabel_position(45)
        ax.set_ylim(0, 100)
        ax.set_title(split, pad=18)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(loc="lower left", bbox_to_anchor=(-0.25, -0.25), fontsize=8)
    fig.suptitle("Fig. 6: performance per test split (macro over findings, mean over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def attention_gallery(runs: Sequence[Mapping], idx: Index, split: str, models: Sequence[tuple[str, str]],
                      path: str) -> str | None:
    """The attention overlays of one seed per model side by side. Each run draws its overlays from the first positive,
    annotated findings of the split in datalist order, so every panel shows the same test images."""
    by = {(r["setting"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    pick = None
    for seed in seeds:
        files = [os.path.join(by[(s, seed)]["dir"], "eval", "report", split, "plots", "attention_overlays.png")
                 if (s, seed) in by else None for _, s in models]
        if all(f and os.path.isfile(f) for f in files):
            pick = (seed, files)
            break
    if pick is None:
        return None
    plt = _plt()
    seed, files = pick
    imgs = [plt.imread(f) for f in files]
    fig, axes = plt.subplots(1, len(imgs), figsize=(6.5 * len(imgs), 7.5), squeeze=False)
    for ax, img, (label, _) in zip(axes[0], imgs, models):
        ax.imshow(img)
        ax.set_title(f"{label} (seed {seed})", fontsize=13)
        ax.axis("off")
    fig.suptitle(f"Attention gallery, {split}: the same test images without and with alignment\n"
                 "(heat = model attention, green = human mask, + = attention peak)", fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)


# ================================================================================================ writing
def _log_to_mlflow(study_dir: str, report_dir: str, metrics: Mapping[str, float], log) -> bool:
    """Log the report folder (and headline numbers) to the study's parent run; False (with a warning) on any error."""
    rec = read_json(os.path.join(study_dir, PARENT_FILE))
    if not rec or not rec.get("run_id") or not rec.get("tracking_uri"):
        log("note: no MLflow parent run recorded for this study; the report is not logged to MLflow")
        return False
    uri = rec["tracking_uri"]
    try:
        from bundle.study import _mlflow_reachable

        if not _mlflow_reachable(uri):
            log(f"WARNING: MLflow server {uri} is unreachable; the report is only on disk")
            return False
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(tracking_uri=uri)
        client.log_artifacts(rec["run_id"], report_dir, artifact_path="report")
        ts = int(time.time() * 1000)
        items = [Metric(re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k), float(v), ts, 0) for k, v in metrics.items()
                 if math.isfinite(v)]
        if items:
            client.log_batch(rec["run_id"], metrics=items)
        return True
    except Exception as e:  # the report on disk is what matters
        log(f"WARNING: could not log the report to MLflow ({type(e).__name__}: {e})")
        return False


def make_report(study_dir: str, out_dir: str | None = None, options: Mapping | None = None, mlflow: bool = True,
                log: Callable[[str], None] | None = None) -> dict:
    """Write the study report (results.md, CSVs, PNGs) to ``<study>/report`` and log it to the parent MLflow run.

    ``options`` (default: the ``report`` section recorded by the runner in study_config.json): control_split,
    best_p_by ("split/metric"), attributes, fig_gap_metric. Returns the paths written and the headline counts.
    """
    log = log or (lambda s: print(s, flush=True))
    study_dir = os.path.abspath(study_dir)
    if not os.path.isdir(study_dir):
        raise FileNotFoundError(f"study folder {study_dir} does not exist; give the folder that scripts/run_study.py "
                                "wrote (default results/<name>)")
    rec = read_json(os.path.join(study_dir, CONFIG_FILE)) or {}
    opts = {"control_split": "test_ood", "best_p_by": "test/mean_auc", "attributes": ["sex", "age"],
            "fig_gap_metric": "auc", **(rec.get("report") or {}), **(options or {})}
    out_dir = os.path.abspath(out_dir or os.path.join(study_dir, "report"))
    runs = collect_runs(study_dir)
    if not runs:
        raise ValueError(f"{study_dir}: no finished run (runs/*/DONE); run the study first "
                         "(python scripts/run_study.py) or check the folder")
    agg = aggregate(runs)
    idx = Index(agg)
    _, found_attrs = idx.classes_attributes()
    attrs = [a for a in opts["attributes"] if a in found_attrs] or found_attrs
    written: dict[str, str] = {}

    def put(name: str, text: str) -> None:
        write_text_atomic(os.path.join(out_dir, name), text)
        written[name] = os.path.join(out_dir, name)

    put("results.csv", rows_to_csv(long_rows(runs)))
    put("aggregated.csv", rows_to_csv(agg))

    base = idx.aligned().get(0.0)
    best_p, best_s, how = choose_best_p(idx, opts["best_p_by"])
    p1 = idx.aligned().get(1.0)
    comp_best = gap_comparisons(idx, base, best_s, attributes=attrs)
    comp_p1 = gap_comparisons(idx, base, p1, attributes=attrs)
    lowered_best, total_best = count_lowered(comp_best)
    lowered_p1, total_p1 = count_lowered(comp_p1)
    put("gap_comparisons.csv", rows_to_csv([{"comparison": "best_p", **r} for r in comp_best]
                                    + [{"comparison": "p1", **r} for r in comp_p1]))

    paper_models = [("w/o (p = 0)", base)] + ([(f"Aligner (best p = {best_p:g})", best_s)] if best_s else [])
    every = [("w/o (p = 0)", base)] + [(f"Aligner p = {p:g}" + (" (best)" if s == best_s else ""), s)
                                       for p, s in idx.aligned().items() if p > 0]
    t2_md, t2_rows = table2(idx, [m for m in paper_models if m[1]], attrs)
    t2all_md, t2all_rows = table2(idx, [m for m in every if m[1]], attrs)
    put("table2.csv", rows_to_csv(t2_rows))
    put("table2_all_levels.csv", rows_to_csv(t2all_rows))
    split_c = opts["control_split"] if opts["control_split"] in idx.splits else (idx.splits[-1] if idx.splits else "")
    pc_md, pc_rows = positive_control(idx, split_c, attrs)
    put("positive_control.csv", rows_to_csv(pc_rows))

    figs: dict[str, str | None] = {}
    figs["fig3_gap_vs_performance.png"] = fig3_gap_vs_performance(
        idx, os.path.join(out_dir, "fig3_gap_vs_performance.png"), attrs, opts["fig_gap_metric"])
    figs["fig4_random_vs_aligned.png"] = fig4_random_vs_aligned(idx, os.path.join(out_dir,
                                                                                  "fig4_random_vs_aligned.png"), attrs)
    figs["fig5_data_ratio.png"] = fig5_data_ratio(idx, os.path.join(out_dir, "fig5_data_ratio.png"), attrs)
    radar_models = [m for m in paper_models if m[1]]
    figs["fig6_radar.png"] = fig6_radar(idx, os.path.join(out_dir, "fig6_radar.png"), radar_models)
    gallery_models = [m for m in paper_models if m[1]]
    if p1 and p1 != best_s:
        gallery_models.append(("Aligner p = 1", p1))
    for split in idx.splits:
        name = f"attention_gallery_{split}.png"
        figs[name] = attention_gallery(runs, idx, split, gallery_models, os.path.join(out_dir, name)) \
            if len(gallery_models) >= 1 else None
    written.update({k: v for k, v in figs.items() if v})

    # ---- results.md
    expected = [f"{s['setting']}_seed{seed}" for seed in rec.get("seeds", []) for s in rec.get("settings", [])]
    have = {r["run_id"] for r in runs}
    missing = [e for e in expected if e not in have]
    fps: dict[str, set] = {}
    for r in runs:
        fps.setdefault(r["setting"], set()).add(r["fingerprint"])
    mixed = sorted(s for s, f in fps.items() if len(f - {None}) > 1)
    seeds_per = {s: m["n_runs"] for s, m in {r["setting"]: r for r in agg}.items()}
    md = [f"# Study report: {rec.get('name', os.path.basename(study_dir))}", "",
          f"Folder `{study_dir}`; profile `{rec.get('profile', '?')}`; written {time.strftime('%F %T')}.",
          f"{len(runs)} finished run(s) over {len(idx.meta)} setting(s); seeds per setting: "
          + ", ".join(f"{s} {n}" for s, n in sorted(seeds_per.items())) + "."]
    if expected:
        md.append(f"Expected {len(expected)} runs; missing {len(missing)}"
                  + (f": {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}" if missing else "") + ".")
    if mixed:
        md.append(f"**Warning**: settings {mixed} mix runs made with different configurations (fingerprints).")
    md += ["", "All numbers: mean ± sample sd over seeds (– when one seed). Gaps = best minus worst subgroup "
           "(percentage points); subgroups with too few positives/negatives are left out of a gap by the "
           "evaluation (docs/fairness_metrics.md). Hit rate = share of positive, annotated findings whose attention "
           "peak lies inside the human mask.", ""]
    md += [f"## Positive control ({split_c}): alignment level vs gap, performance and hit rate", "",
           "AUC gap = macro over findings of the per-finding subgroup AUC gap; mean AUC = mean over findings.", "",
           pc_md, ""]
    md += ["## Did alignment lower the gap?", ""]
    if base is None:
        md.append("No p = 0 baseline finished: no comparison.")
    else:
        md.append(f"- Aligner with the best p (p = {best_p:g}, chosen by {how}) vs w/o (p = 0): alignment lowered "
                  f"the gap in **{lowered_best} of {total_best}** comparisons." if best_s else "- no aligned setting.")
        if p1 and p1 == best_s:
            md.append("- The best p is p = 1, so the p = 1 comparison is the same.")
        elif p1:
            md.append(f"- Aligner with p = 1 vs w/o (p = 0): alignment lowered the gap in **{lowered_p1} of "
                      f"{total_p1}** comparisons.")
        md.append("- A comparison is one cell of Table 2 below: test split x finding x attribute x gap metric "
                  "(accuracy, AUC, sensitivity, F1); *lowered* = the aligned model's mean gap over seeds is strictly "
                  "below the baseline's. Cells where either mean is undefined are not counted; the macro rows are "
                  "not counted (they average the findings). Every cell: gap_comparisons.csv.")
    md += ["", "## Table 2: fairness gaps (%) and hit rate (%), without vs with alignment", "",
           "Best of each block in bold (lowest gap, highest hit rate).", "", t2_md,
           "## Table 2, every alignment level", "", t2all_md]
    fig_titles = {"fig3_gap_vs_performance.png": "Fig. 3: fairness gap vs performance per alignment level",
                  "fig4_random_vs_aligned.png": "Fig. 4: random vs human-mask alignment vs baseline",
                  "fig5_data_ratio.png": "Fig. 5: gap and AUC vs training data ratio",
                  "fig6_radar.png": "Fig. 6: performance radar per test split"}
    md += ["## Figures", ""]
    for name, p in figs.items():
        title = fig_titles.get(name, f"Attention gallery ({name[len('attention_gallery_'):-4]})")
        md += [f"### {title}", "", f"![{title}]({name})" if p else "_not drawn: the settings it needs have not "
               "finished (or are not in this study's grid)_", ""]
    md += ["## Files", "", "results.csv (one row per run x split x metric), aggregated.csv (mean, sd, n per setting "
           "x split x metric), table2.csv, table2_all_levels.csv, gap_comparisons.csv, positive_control.csv, PNGs.", ""]
    put("results.md", "\n".join(md))

    head = {"report_gap_lowered_best_p": float(lowered_best), "report_gap_comparisons_best_p": float(total_best),
            "report_gap_lowered_p1": float(lowered_p1), "report_gap_comparisons_p1": float(total_p1),
            "report_finished_runs": float(len(runs))}
    if best_p is not None:
        head["report_best_p"] = float(best_p)
    logged = _log_to_mlflow(study_dir, out_dir, head, log) if mlflow else False
    return {"report_dir": out_dir, "files": written, "best_p": best_p, "best_p_how": how,
            "lowered_best_p": (lowered_best, total_best), "lowered_p1": (lowered_p1, total_p1),
            "n_runs": len(runs), "missing": missing, "mlflow_logged": logged}
