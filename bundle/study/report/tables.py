"""The report's tables and text: Table 2 (gaps and hit rate, without vs with alignment), the positive-control table,
the "alignment improved X of Y comparisons" count (the paper's: out-of-domain splits x findings x attributes x the
accuracy, AUC, sensitivity and F1 gaps and the hit rate), the flags, and results.md with its prose (templates here).

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
    "COUNT_METRICS",
    "HIT_RATE_DEFINITION",
    "gap_comparisons",
    "count_improved",
    "flag_rows",
    "flags_markdown",
    "coverage_lines",
    "table2_header",
    "table2_block",
    "GapCount",
    "count_gaps",
    "table2",
    "positive_control",
    "results_markdown",
]

# ------------------------------------------------------------------------------------------------ results.md prose
HIT_RATE_DEFINITION = (
    "Hit rate (one definition everywhere: Table 2, Fig. 4, the positive control): the share of positive, "
    "annotated (image, finding) pairs whose attention peak lies inside the human mask (pointing game, CheXlocalize), "
    "pooled over the pairs in scope: a finding's pairs in a finding's row, every finding's pairs in the "
    '"all findings" rows and the figures.'
)
NUMBERS_NOTE = (
    "All numbers: mean ± sample sd over seeds (– when one seed). Gaps = best minus worst subgroup "
    "(percentage points); subgroups with too few positives/negatives are left out of a gap by the "
    "evaluation (docs/fairness_metrics.md). " + HIT_RATE_DEFINITION
)
CONTROL_TITLE = "## Positive control ({split}): alignment level vs gap, performance and hit rate"
CONTROL_NOTE = "AUC gap = macro over findings of the per-finding subgroup AUC gap; mean AUC = mean over findings."
NO_BASELINE = "No p = 0 baseline finished: no comparison."
COUNT_LINE = (
    "- {who} vs w/o (p = 0): alignment improved **{x} of {y}** comparisons (the paper's count: out-of-domain "
    "split(s) {ood}); without the flagged comparisons: **{xu} of {yu}** ({nf} flagged: {why})."
)
BEST_WHO = "Aligner with the best p (p = {p:g}, chosen by {how})"
NO_ALIGNED = "- no aligned setting."
BEST_IS_P1 = "- The best p is p = 1, so the p = 1 comparison is the same."
IN_DOMAIN_LINE = (
    "- Not the paper's count, for reference: on the in-domain split(s) {splits}, best p improved {xb} of {yb}, "
    "p = 1 {x1} of {y1} comparisons."
)
COMPARISON_NOTE = (
    "- A comparison is one cell of Table 2 on an out-of-domain split: finding x attribute x metric, the metrics "
    "being the accuracy, AUC, sensitivity and F1 gaps and the hit rate (5 metrics; the paper: 5 metrics x 3 OOD "
    "datasets x 2 attributes = 30). *Improved* = the aligned model's mean over seeds is strictly below the "
    "baseline's for a gap, strictly above for the hit rate (the hit rate does not depend on the attribute, so it is "
    "compared once per attribute, as in the paper's table). Cells where either mean is undefined are not counted; "
    'the "all findings" rows are not counted. Every cell, with its flags: gap_comparisons.csv.'
)
FLAGS_TITLE = "## Flags: comparisons that say little"
FLAGS_NOTE = (
    "A gap comparison is flagged when either model is *degenerate* on the finding in some seed (constant scores, "
    "sd < {sd:g}; no positive prediction; or only positive predictions: its threshold-based gaps of 0 are "
    "artifacts), is *at ceiling* on the gap's metric (AUC, sensitivity, ... >= {ceil:g} in every seed: that gap is ~0 "
    "by construction), or when the baseline "
    "*barely learned* the finding (mean AUC < {weak:g}). Hit-rate comparisons are not flagged. The counts above are "
    "given with and without the flagged comparisons."
)
NO_FLAGS = "No model of Table 2 is degenerate, at ceiling or barely learned on any finding."
SELECTION_WARNING = "**Warning**: {w}."
MIXED_WARNING = (
    "**Warning**: settings {mixed} mix runs made with different configurations (fingerprints without the seed)."
)
UNCHECKED_NOTE = (
    "Configurations not checked for {n} setting(s): their runs carry no seed-free fingerprint (made before it was "
    "recorded, or read from results.csv)."
)
TABLE2_TITLE = "## Table 2: fairness gaps (%) and hit rate (%), without vs with alignment, out-of-domain splits"
TABLE2_NOTE = "Best of each block in bold (lowest gap, highest hit rate); † = flagged (see Flags)."
TABLE2_ALL_TITLE = "## Table 2, every alignment level and every test split"
NOT_DRAWN = "_not drawn: the settings it needs have not finished (or are not in this study's grid)_"
FILES_NOTE = (
    "results.csv (one row per run x split x metric), aggregated.csv (mean, sd, n per setting x split x "
    "metric), table2.csv, table2_all_levels.csv, gap_comparisons.csv, positive_control.csv, flags.csv, PNGs."
)
NO_GAP_ON_SPLIT = (
    "_no gap is defined on this split: every subgroup comparison lacks enough positives and negatives "
    "(see the runs' fairness_report.json)_"
)
COUNT_METRICS = (*GAP_METRICS, "hit_rate")  # the five metrics of the paper's count


# ------------------------------------------------------------------------------------------------ counts
def _cell_flags(
    flags: Mapping, base: str, aligned: str, split: str, finding: str, metric: str | None = None
) -> list[str]:
    """The reasons a gap comparison of ``finding`` on ``split`` (of ``metric``, default any) says little (see
    :func:`bundle.study.report.collect.model_flags`)."""
    out = []
    for role, s in (("baseline", base), ("aligned", aligned)):
        f = flags.get((s, split, finding)) or {}
        if f.get("degenerate"):
            out.append(f"degenerate {role} ({', '.join(f['degenerate'])})")
        ceil = [m for m in f.get("ceiling") or () if metric is None or m == metric]
        if ceil:
            out.append(f"{role} at ceiling ({', '.join(ceil)})")
        if role == "baseline" and f.get("weak"):
            out.append("baseline barely learned")
    return out


def gap_comparisons(
    idx: Index,
    base: str | None,
    aligned: str | None,
    splits: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    attributes: Sequence[str] | None = None,
    flags: Mapping | None = None,
    ood_splits: Sequence[str] = ReportOptions.ood_splits,
) -> list[dict]:
    """The cells of Table 2 that compare two settings: split x finding x attribute x metric (accuracy, AUC,
    sensitivity and F1 gaps, hit rate). ``improved`` = the aligned setting's mean over seeds is strictly below the
    baseline's (gaps) or above it (hit rate); cells where either mean is undefined get ``improved = None`` (not
    counted). ``ood`` = the split is out-of-domain (the paper's count); ``flags`` = why a gap comparison says
    little ("" when nothing)."""
    if base is None or aligned is None:
        return []
    c_all, a_all = idx.classes_attributes()
    rows = []
    for split in splits or idx.splits:
        for c in classes or c_all:
            for a in attributes or a_all:
                for m in COUNT_METRICS:
                    key = f"{c}/hit_rate" if m == "hit_rate" else f"{c}/{a}/gap_{m}"
                    b, al = idx.get(base, split, key)[0], idx.get(aligned, split, key)[0]
                    ok = math.isfinite(b) and math.isfinite(al)
                    rows.append(
                        {
                            "split": split,
                            "ood": split in ood_splits,
                            "finding": c,
                            "attribute": a,
                            "metric": m,
                            "baseline": base,
                            "aligned": aligned,
                            "baseline_value": b,
                            "aligned_value": al,
                            "improved": ((al > b) if m == "hit_rate" else (al < b)) if ok else None,
                            "flags": (
                                ""
                                if m == "hit_rate"
                                else "; ".join(_cell_flags(flags or {}, base, aligned, split, c, m))
                            ),
                        }
                    )
    return rows


def count_improved(rows: Sequence[Mapping], ood: bool | None = True, unflagged: bool = False) -> tuple[int, int]:
    """(X, Y) over the counted rows: ``ood`` True = out-of-domain splits only (the paper's count), False = the
    others, None = all; ``unflagged`` leaves the flagged comparisons out."""
    counted = [
        r
        for r in rows
        if r["improved"] is not None and (ood is None or r["ood"] == ood) and not (unflagged and r["flags"])
    ]
    return sum(bool(r["improved"]) for r in counted), len(counted)


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


def _hit_metric(finding: str) -> str:
    """The hit rate of a Table 2 row: the finding's, or every finding's pairs pooled (``hit_rate``)."""
    return "hit_rate" if finding == "macro" else f"{finding}/hit_rate"


TABLE2_COLS = [*(GAP_LABEL[m] + " (%)" for m in GAP_METRICS), "hit rate (%)"]


def table2_header(condition: bool = False) -> list[str]:
    first = "| condition | split | finding | attribute | model | " if condition else "| finding | attribute | model | "
    return [
        first + " | ".join(TABLE2_COLS) + " | seeds |",
        "|---|---|---|" + ("---|---|" if condition else "") + "---|" * (len(TABLE2_COLS) + 1),
    ]


def table2_block(
    idx: Index,
    models: Sequence[tuple[str, str]],
    attributes: Sequence[str],
    split: str,
    condition: str | None = None,
    flags: Mapping | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[list[str], list[dict]]:
    """The Markdown lines and rows of one split's Table 2 (no header): per finding (and all findings) x attribute x
    model, the accuracy/AUC/sensitivity/F1 gaps (%) and the hit rate (%), mean ± sd over seeds; the best of each
    block in bold (lowest gap, highest hit rate); † marks a gap of a finding flagged against the baseline (flags of
    :func:`model_flags`). ``condition`` adds the condition and split columns (merged report); ``classes``: the
    findings (default all)."""
    # the "all findings" row averages every finding: shown only when every finding is
    findings = [*idx.classes_attributes()[0], "macro"] if classes is None else list(classes)
    base = models[0][1] if models else None
    md, rows = [], []
    for c in findings:
        for a in attributes:
            block = []
            for label, s in models:
                vals = [idx.get(s, split, f"{c}/{a}/gap_{m}") for m in GAP_METRICS]
                vals.append(idx.get(s, split, _hit_metric(c)))
                flagged = [
                    bool(flags) and c != "macro" and bool(_cell_flags(flags, base, s, split, c, m)) for m in GAP_METRICS
                ]
                block.append((label, s, vals, flagged))
                rows.append(
                    {
                        **({"condition": condition} if condition is not None else {}),
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
                        "flagged": ",".join(m for m, f in zip(GAP_METRICS, flagged, strict=True) if f),
                    }
                )
            if all(not math.isfinite(v[0]) for _, _, vals, _ in block for v in vals[:-1]):
                continue  # no gap defined for this finding x attribute (e.g. too few positives per group)
            columns = [
                _bold_best(
                    [(vals[j][0], _pct(*vals[j])) for _, _, vals, _ in block], higher_better=(j == len(TABLE2_COLS) - 1)
                )
                for j in range(len(TABLE2_COLS))
            ]
            for i, (label, _, vals, flagged) in enumerate(block):
                name = "all findings" if c == "macro" else c
                cells = [
                    col[i] + (" †" if j < len(GAP_METRICS) and flagged[j] else "") for j, col in enumerate(columns)
                ]
                lead = f"| {condition} | {split} | " if condition is not None else "| "
                md.append(f"{lead}{name} | {a} | {label} | " + " | ".join(cells) + f" | {max(v[2] for v in vals)} |")
    return md, rows


def table2(
    idx: Index,
    models: Sequence[tuple[str, str]],
    attributes: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    flags: Mapping | None = None,
) -> tuple[str, list]:
    """Markdown (one table per split, default every evaluated split) and rows of Table 2 (:func:`table2_block`).
    ``models``: [(label, setting id)], the baseline first."""
    _, attrs = idx.classes_attributes()
    attrs = [a for a in (attributes or attrs) if a in attrs] or attrs
    md, rows = [], []
    for split in splits if splits is not None else idx.splits:
        lines, r = table2_block(idx, models, attrs, split, flags=flags)
        md += [f"**{split}**", ""] + (table2_header() + lines if lines else [NO_GAP_ON_SPLIT]) + [""]
        rows += r
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
    """The "alignment improved X of Y comparisons" of the report: p = 0 (``base``) vs the best p and vs p = 1
    (setting ids, None when not finished), with every compared cell (``rows_best``, ``rows_p1``)."""

    base: str | None
    best_p: float | None
    best_s: str | None
    how: str
    p1: str | None
    rows_best: tuple = ()
    rows_p1: tuple = ()
    warning: str = ""  # e.g. the best p fell back to another criterion
    ood_splits: tuple = ReportOptions.ood_splits

    @property
    def lowered_best(self) -> tuple[int, int]:
        """The paper's count, best p vs p = 0: out-of-domain splits, five metrics."""
        return count_improved(self.rows_best)

    @property
    def lowered_p1(self) -> tuple[int, int]:
        return count_improved(self.rows_p1)

    @property
    def unflagged_best(self) -> tuple[int, int]:
        return count_improved(self.rows_best, unflagged=True)

    @property
    def unflagged_p1(self) -> tuple[int, int]:
        return count_improved(self.rows_p1, unflagged=True)

    def lines(self) -> list[str]:
        """Its bullet points in results.md."""
        if self.base is None:
            return [NO_BASELINE]
        ood = ", ".join(self.ood_splits)
        lines = [SELECTION_WARNING.format(w=self.warning), ""] if self.warning else []

        def line(who: str, rows) -> str:
            (x, y), (xu, yu) = count_improved(rows), count_improved(rows, unflagged=True)
            flagged = [r["flags"] for r in rows if r["ood"] and r["improved"] is not None and r["flags"]]
            why = ", ".join(
                f"{sum(k in f for f in flagged)} {k}"
                for k in ("degenerate", "ceiling", "barely learned")
                if any(k in f for f in flagged)
            )
            return COUNT_LINE.format(who=who, x=x, y=y, ood=ood, xu=xu, yu=yu, nf=len(flagged), why=why or "none")

        lines.append(line(BEST_WHO.format(p=self.best_p, how=self.how), self.rows_best) if self.best_s else NO_ALIGNED)
        if self.p1 and self.p1 == self.best_s:
            lines.append(BEST_IS_P1)
        elif self.p1:
            lines.append(line("Aligner with p = 1", self.rows_p1))
        in_dom = sorted({r["split"] for r in (*self.rows_best, *self.rows_p1) if not r["ood"]})
        if in_dom:
            (xb, yb), (x1, y1) = count_improved(self.rows_best, ood=False), count_improved(self.rows_p1, ood=False)
            lines.append(IN_DOMAIN_LINE.format(splits=", ".join(in_dom), xb=xb, yb=yb, x1=x1, y1=y1))
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
            "report_gap_lowered_best_p_unflagged": float(self.unflagged_best[0]),
            "report_gap_comparisons_best_p_unflagged": float(self.unflagged_best[1]),
            "report_gap_lowered_p1": float(self.lowered_p1[0]),
            "report_gap_comparisons_p1": float(self.lowered_p1[1]),
            "report_finished_runs": float(n_runs),
        }
        if self.best_p is not None:
            head["report_best_p"] = float(self.best_p)
        return head


def count_gaps(
    idx: Index,
    opts: ReportOptions,
    attributes: Sequence[str],
    flags: Mapping | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[GapCount, list[dict]]:
    """p = 0 vs the best p (chosen on performance by ``opts.best_p_by``) and vs p = 1: the count and every compared
    cell (gap_comparisons.csv rows, ``comparison`` = best_p | p1)."""
    base = idx.aligned().get(0.0)
    best_p, best_s, how, warning = choose_best_p(idx, opts.best_p_by, opts.best_p_fallback)
    p1 = idx.aligned().get(1.0)
    kw = {"attributes": attributes, "flags": flags, "ood_splits": opts.ood_splits, "classes": classes}
    comp_best = gap_comparisons(idx, base, best_s, **kw)
    comp_p1 = gap_comparisons(idx, base, p1, **kw)
    gaps = GapCount(base, best_p, best_s, how, p1, tuple(comp_best), tuple(comp_p1), warning, tuple(opts.ood_splits))
    return gaps, [{"comparison": "best_p", **r} for r in comp_best] + [{"comparison": "p1", **r} for r in comp_p1]


def flag_rows(flags: Mapping, models: Sequence[tuple[str, str]], baseline: str | None) -> list[dict]:
    """One row per flagged model x split x finding of ``models`` (flags.csv and the Flags table)."""
    rows = []
    for label, s in models:
        for (setting, split, c), f in sorted(flags.items()):
            if setting != s:
                continue
            what = []
            if f["degenerate"]:
                what.append(f"degenerate in {', '.join(f['degenerate'])}")
            if f["ceiling"]:
                what.append(f"at ceiling ({', '.join(f['ceiling'])})")
            if f["weak"] and s == baseline:
                what.append("barely learned (baseline)")
            if what:
                rows.append({"model": label, "setting": s, "split": split, "finding": c, "flags": "; ".join(what)})
    return rows


def flags_markdown(rows: Sequence[Mapping], opts: ReportOptions, condition: bool = False) -> list[str]:
    md = [FLAGS_TITLE, "", FLAGS_NOTE.format(sd=opts.degenerate_sd, ceil=opts.ceiling, weak=opts.weak_auc), ""]
    if not rows:
        return md + [NO_FLAGS, ""]
    head = "| condition | model | split | finding | flags |" if condition else "| model | split | finding | flags |"
    md += [head, "|---" * head.count("| ") + "|"]
    for r in rows:
        lead = f"| {r['condition']} " if condition else ""
        md.append(f"{lead}| {r['model']} | {r['split']} | {r['finding']} | {r['flags']} |")
    return md + [""]


def coverage_lines(coverage: Mapping) -> list[str]:
    """The completeness and configuration lines of results.md."""
    expected, missing, mixed = coverage["expected"], coverage["missing"], coverage["mixed"]
    md = []
    if expected:
        md.append(
            f"Expected {len(expected)} runs; missing {len(missing)}"
            + (f": {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}" if missing else "")
            + "."
        )
    if mixed:
        md.append(MIXED_WARNING.format(mixed=mixed))
    if coverage.get("unchecked"):
        md.append(UNCHECKED_NOTE.format(n=len(coverage["unchecked"])))
    return md


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
    flags_md: Sequence[str],
    table2_md: str,
    table2_all_md: str,
    figures: Sequence[tuple[str, str, str | None]],
) -> str:
    """results.md: header and coverage, the positive control, the gap count, the flags, both Table 2s, the figures
    (``figures``: [(file name, title, path or None when not drawn)]) and the list of files."""
    md = [
        f"# Study report: {title}",
        "",
        f"Folder `{study_dir}`; profile `{profile}`; written {written}.",
        f"{n_runs} finished run(s) over {n_settings} setting(s); seeds per setting: "
        + ", ".join(f"{s} {n}" for s, n in sorted(coverage["seeds_per"].items()))
        + ".",
    ]
    md += coverage_lines(coverage)
    md += ["", NUMBERS_NOTE, ""]
    md += [CONTROL_TITLE.format(split=control_split), "", CONTROL_NOTE, "", control_md, ""]
    md += ["## Did alignment lower the gap?", ""]
    md += gaps.lines()
    md += ["", *flags_md]
    md += ["", TABLE2_TITLE, "", TABLE2_NOTE, "", table2_md, TABLE2_ALL_TITLE, "", table2_all_md]
    md += ["## Figures", ""]
    for name, fig_title, path in figures:
        md += [f"### {fig_title}", "", f"![{fig_title}]({name})" if path else NOT_DRAWN, ""]
    md += ["## Files", "", FILES_NOTE, ""]
    return "\n".join(md)
