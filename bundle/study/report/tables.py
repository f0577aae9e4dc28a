"""The report's tables and text: Table 2 (gaps and hit rate, without vs with alignment), the positive-control table,
the "alignment lowered the gap in X of Y comparisons" count, and results.md with its prose (templates here).

Cells are "mean ± sd" over seeds in percent ("± –" for one seed, "n/a" when undefined); the best of each Table 2
block is in bold (lowest gap, highest hit rate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bundle.study.config import ReportOptions
from bundle.study.report.collect import GAP_LABEL, GAP_METRICS, Index, choose_best_p

__all__ = [
    "gap_comparisons",
    "count_lowered",
    "GapCount",
    "count_gaps",
    "table2",
    "positive_control",
    "results_markdown",
]

# ------------------------------------------------------------------------------------------------ results.md prose
NUMBERS_NOTE = (
    "All numbers: mean ± sample sd over seeds (– when one seed). Gaps = best minus worst subgroup "
    "(percentage points); subgroups with too few positives/negatives are left out of a gap by the "
    "evaluation (docs/fairness_metrics.md). Hit rate = share of positive, annotated findings whose "
    "attention peak lies inside the human mask."
)
CONTROL_TITLE = "## Positive control ({split}): alignment level vs gap, performance and hit rate"
CONTROL_NOTE = "AUC gap = macro over findings of the per-finding subgroup AUC gap; mean AUC = mean over findings."
NO_BASELINE = "No p = 0 baseline finished: no comparison."
BEST_P_LINE = (
    "- Aligner with the best p (p = {p:g}, chosen by {how}) vs w/o (p = 0): alignment lowered the gap in "
    "**{lowered} of {total}** comparisons."
)
NO_ALIGNED = "- no aligned setting."
BEST_IS_P1 = "- The best p is p = 1, so the p = 1 comparison is the same."
P1_LINE = "- Aligner with p = 1 vs w/o (p = 0): alignment lowered the gap in **{lowered} of {total}** comparisons."
COMPARISON_NOTE = (
    "- A comparison is one cell of Table 2 below: test split x finding x attribute x gap metric "
    "(accuracy, AUC, sensitivity, F1); *lowered* = the aligned model's mean gap over seeds is strictly "
    "below the baseline's. Cells where either mean is undefined are not counted; the macro rows are "
    "not counted (they average the findings). Every cell: gap_comparisons.csv."
)
TABLE2_TITLE = "## Table 2: fairness gaps (%) and hit rate (%), without vs with alignment"
TABLE2_NOTE = "Best of each block in bold (lowest gap, highest hit rate)."
TABLE2_ALL_TITLE = "## Table 2, every alignment level"
NOT_DRAWN = "_not drawn: the settings it needs have not finished (or are not in this study's grid)_"
FILES_NOTE = (
    "results.csv (one row per run x split x metric), aggregated.csv (mean, sd, n per setting x split x "
    "metric), table2.csv, table2_all_levels.csv, gap_comparisons.csv, positive_control.csv, PNGs."
)
NO_GAP_ON_SPLIT = (
    "_no gap is defined on this split: every subgroup comparison lacks enough positives and negatives "
    "(see the runs' fairness_report.json)_"
)


# ------------------------------------------------------------------------------------------------ counts
def gap_comparisons(
    idx: Index,
    base: str | None,
    aligned: str | None,
    splits: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    attributes: Sequence[str] | None = None,
) -> list[dict]:
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
                    rows.append(
                        {
                            "split": split,
                            "finding": c,
                            "attribute": a,
                            "metric": m,
                            "baseline": base,
                            "aligned": aligned,
                            "baseline_gap": b,
                            "aligned_gap": al,
                            "lowered": (al < b) if ok else None,
                        }
                    )
    return rows


def count_lowered(rows: Sequence[Mapping]) -> tuple[int, int]:
    counted = [r for r in rows if r["lowered"] is not None]
    return sum(bool(r["lowered"]) for r in counted), len(counted)


# ------------------------------------------------------------------------------------------------ tables
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
    return [f"**{t}**" if math.isfinite(v) and math.isclose(v, best, rel_tol=0, abs_tol=1e-12) else t for v, t in cells]


def _hit_metric(idx: Index, finding: str) -> str:
    return (
        f"{finding}/hit_rate"
        if finding != "macro"
        else ("macro/hit_rate" if "macro/hit_rate" in idx.metrics else "hit_rate")
    )


def table2(idx: Index, models: Sequence[tuple[str, str]], attributes: Sequence[str] | None = None) -> tuple[str, list]:
    """Markdown (one table per test split) and rows: per finding (and the macro average) x attribute x model, the
    accuracy/AUC/sensitivity/F1 gaps (%) and the hit rate (%), mean ± sd over seeds; the best of each block in bold
    (lowest gap, highest hit rate). ``models``: [(label, setting id)]."""
    classes, attrs = idx.classes_attributes()
    attrs = [a for a in (attributes or attrs) if a in attrs] or attrs
    md, rows = [], []
    cols = [*(GAP_LABEL[m] + " (%)" for m in GAP_METRICS), "hit rate (%)"]
    for split in idx.splits:
        md += [
            f"**{split}**",
            "",
            "| finding | attribute | model | " + " | ".join(cols) + " | seeds |",
            "|---|---|---|" + "---|" * (len(cols) + 1),
        ]
        n_lines = len(md)
        for c in [*classes, "macro"]:
            for a in attrs:
                block = []
                for label, s in models:
                    vals = [idx.get(s, split, f"{c}/{a}/gap_{m}") for m in GAP_METRICS]
                    vals.append(idx.get(s, split, _hit_metric(idx, c)))
                    block.append((label, s, vals))
                    rows.append(
                        {
                            "split": split,
                            "finding": c,
                            "attribute": a,
                            "model": label,
                            "setting": s,
                            **{f"{m}_gap_mean": v[0] for m, v in zip(GAP_METRICS, vals, strict=False)},  # + hit rate
                            **{f"{m}_gap_sd": v[1] for m, v in zip(GAP_METRICS, vals, strict=False)},
                            "hit_rate_mean": vals[-1][0],
                            "hit_rate_sd": vals[-1][1],
                            "seeds": max(v[2] for v in vals),
                        }
                    )
                if all(not math.isfinite(v[0]) for _, _, vals in block for v in vals[:-1]):
                    continue  # no gap defined for this finding x attribute (e.g. too few positives per group)
                columns = []
                for j in range(len(cols)):
                    columns.append(
                        _bold_best(
                            [(vals[j][0], _pct(*vals[j])) for _, _, vals in block], higher_better=(j == len(cols) - 1)
                        )
                    )
                for i, (label, _, vals) in enumerate(block):
                    name = "all findings (macro)" if c == "macro" else c
                    md.append(
                        f"| {name} | {a} | {label} | "
                        + " | ".join(col[i] for col in columns)
                        + f" | {max(v[2] for v in vals)} |"
                    )
        if len(md) == n_lines:
            md[-2:] = [NO_GAP_ON_SPLIT]
        md.append("")
    return "\n".join(md), rows


def positive_control(idx: Index, split: str, attributes: Sequence[str] = ReportOptions.attributes) -> tuple[str, list]:
    """Per alignment level and random alignment: the split's macro AUC gap per attribute, mean AUC and hit rate."""
    settings = [(f"p = {p:g}", s) for p, s in idx.aligned().items()]
    settings += [(f"random, p = {p:g}", s) for p, s in idx.random().items()]
    metrics = [(f"AUC gap {a} (%)", f"macro/{a}/gap_auc", 100.0, 2) for a in attributes]
    metrics += [("mean AUC", "mean_auc", 1.0, 3), ("hit rate (%)", "hit_rate", 100.0, 1)]
    md = ["| setting | " + " | ".join(m[0] for m in metrics) + " | seeds |", "|---|" + "---|" * (len(metrics) + 1)]
    rows = []
    for label, s in settings:
        vals = [idx.get(s, split, key) for _, key, _, _ in metrics]
        md.append(
            f"| {label} | "
            + " | ".join(_pct(*v, scale=sc, digits=d) for v, (_, _, sc, d) in zip(vals, metrics, strict=True))
            + f" | {max(v[2] for v in vals)} |"
        )
        rows.append(
            {
                "split": split,
                "setting": s,
                "label": label,
                **{f"{key}_mean": v[0] for v, (_, key, _, _) in zip(vals, metrics, strict=True)},
                **{f"{key}_sd": v[1] for v, (_, key, _, _) in zip(vals, metrics, strict=True)},
                "seeds": max(v[2] for v in vals),
            }
        )
    return "\n".join(md), rows


# ------------------------------------------------------------------------------------------------ the count, results.md
@dataclass(frozen=True)
class GapCount:
    """The "alignment lowered the gap in X of Y comparisons" of the report: p = 0 (``base``) vs the best p and vs
    p = 1 (setting ids, None when not finished); ``lowered_*`` = (X, Y)."""

    base: str | None
    best_p: float | None
    best_s: str | None
    how: str
    p1: str | None
    lowered_best: tuple[int, int]
    lowered_p1: tuple[int, int]

    def lines(self) -> list[str]:
        """Its bullet points in results.md."""
        if self.base is None:
            return [NO_BASELINE]
        lb, tb = self.lowered_best
        lines = [BEST_P_LINE.format(p=self.best_p, how=self.how, lowered=lb, total=tb) if self.best_s else NO_ALIGNED]
        if self.p1 and self.p1 == self.best_s:
            lines.append(BEST_IS_P1)
        elif self.p1:
            lines.append(P1_LINE.format(lowered=self.lowered_p1[0], total=self.lowered_p1[1]))
        lines.append(COMPARISON_NOTE)
        return lines

    def models(self, idx: Index) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """[(label, setting id)] of the finished models: the paper's Table 2 (w/o, best p) and every level."""
        paper = [("w/o (p = 0)", self.base)]
        paper += [(f"Aligner (best p = {self.best_p:g})", self.best_s)] if self.best_s else []
        every = [("w/o (p = 0)", self.base)]
        every += [
            (f"Aligner p = {p:g}" + (" (best)" if s == self.best_s else ""), s)
            for p, s in idx.aligned().items()
            if p > 0
        ]
        return [m for m in paper if m[1]], [m for m in every if m[1]]

    def headline(self, n_runs: int) -> dict[str, float]:
        """The numbers logged to the parent MLflow run."""
        head = {
            "report_gap_lowered_best_p": float(self.lowered_best[0]),
            "report_gap_comparisons_best_p": float(self.lowered_best[1]),
            "report_gap_lowered_p1": float(self.lowered_p1[0]),
            "report_gap_comparisons_p1": float(self.lowered_p1[1]),
            "report_finished_runs": float(n_runs),
        }
        if self.best_p is not None:
            head["report_best_p"] = float(self.best_p)
        return head


def count_gaps(idx: Index, best_p_by: str, attributes: Sequence[str]) -> tuple[GapCount, list[dict]]:
    """p = 0 vs the best p (chosen on performance by ``best_p_by``) and vs p = 1: the count and every compared cell
    (gap_comparisons.csv rows, ``comparison`` = best_p | p1)."""
    base = idx.aligned().get(0.0)
    best_p, best_s, how = choose_best_p(idx, best_p_by)
    p1 = idx.aligned().get(1.0)
    comp_best = gap_comparisons(idx, base, best_s, attributes=attributes)
    comp_p1 = gap_comparisons(idx, base, p1, attributes=attributes)
    gaps = GapCount(base, best_p, best_s, how, p1, count_lowered(comp_best), count_lowered(comp_p1))
    return gaps, [{"comparison": "best_p", **r} for r in comp_best] + [{"comparison": "p1", **r} for r in comp_p1]


def results_markdown(
    *,
    title: str,
    study_dir: str,
    profile: str,
    written: str,
    n_runs: int,
    n_settings: int,
    coverage: Mapping,
    control_split: str,
    control_md: str,
    gaps: GapCount,
    table2_md: str,
    table2_all_md: str,
    figures: Sequence[tuple[str, str, str | None]],
) -> str:
    """results.md: header and coverage, the positive control, the gap count, both Table 2s, the figures
    (``figures``: [(file name, title, path or None when not drawn)]) and the list of files."""
    expected, missing, mixed = coverage["expected"], coverage["missing"], coverage["mixed"]
    md = [
        f"# Study report: {title}",
        "",
        f"Folder `{study_dir}`; profile `{profile}`; written {written}.",
        f"{n_runs} finished run(s) over {n_settings} setting(s); seeds per setting: "
        + ", ".join(f"{s} {n}" for s, n in sorted(coverage["seeds_per"].items()))
        + ".",
    ]
    if expected:
        md.append(
            f"Expected {len(expected)} runs; missing {len(missing)}"
            + (f": {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}" if missing else "")
            + "."
        )
    if mixed:
        md.append(f"**Warning**: settings {mixed} mix runs made with different configurations (fingerprints).")
    md += ["", NUMBERS_NOTE, ""]
    md += [CONTROL_TITLE.format(split=control_split), "", CONTROL_NOTE, "", control_md, ""]
    md += ["## Did alignment lower the gap?", ""]
    md += gaps.lines()
    md += ["", TABLE2_TITLE, "", TABLE2_NOTE, "", table2_md, TABLE2_ALL_TITLE, "", table2_all_md]
    md += ["## Figures", ""]
    for name, fig_title, path in figures:
        md += [f"### {fig_title}", "", f"![{fig_title}]({name})" if path else NOT_DRAWN, ""]
    md += ["## Files", "", FILES_NOTE, ""]
    return "\n".join(md)
