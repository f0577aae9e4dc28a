"""The study report: every finished run's evaluation, mean +- sd over seeds, the paper's Table 2 and Figs. 3-6.

    make_report("results/quick")                                   # -> results/quick/report/{results.md, *.csv, *.png}
    make_merged_report({"effusion": "results/effusion", "edema": "results/edema"}, "results/merged")

- :mod:`.collect`: the finished runs' metrics, aggregation over seeds, look-ups, the choice of the best p, the flags;
- :mod:`.tables`: Table 2, the positive control, the "X of Y" count, the flags, results.md and its prose;
- :mod:`.figures`: Figs. 3-6 and the attention galleries.

The options (control split, best-p criterion and fallback, OOD splits, attributes, Fig. 3's gap, flag thresholds) and
their defaults are :class:`bundle.study.config.ReportOptions`. The report is logged to the study's parent MLflow run
(:func:`bundle.study.tracking.log_report`). See docs/study.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bundle.study.config import ReportOptions
from bundle.study.layout import CONFIG_FILE, read_json
from bundle.study.report.collect import (
    GAP_METRICS,
    Index,
    aggregate,
    choose_best_p,
    collect_runs,
    coverage,
    long_rows,
    model_flags,
)
from bundle.study.report.figures import GALLERY_PREFIX, draw_figures, fig6_radar, figure_title, radar_panels
from bundle.study.report.tables import (
    COMPARISON_NOTE,
    HIT_RATE_DEFINITION,
    NO_GAP_ON_SPLIT,
    GapCount,
    count_gaps,
    count_improved,
    coverage_lines,
    flag_rows,
    flags_markdown,
    gap_comparisons,
    positive_control,
    results_markdown,
    table2,
    table2_block,
    table2_header,
)
from bundle.study.tracking import log_report
from bundle.utils.atomic import rows_to_csv, write_text_atomic

__all__ = [
    "make_report",
    "make_merged_report",
    "load_study",
    "Study",
    "ReportOptions",
    "collect_runs",
    "long_rows",
    "aggregate",
    "Index",
    "choose_best_p",
    "gap_comparisons",
    "count_improved",
    "count_gaps",
    "model_flags",
    "GapCount",
    "table2",
    "positive_control",
    "GAP_METRICS",
]


@dataclass
class Study:
    """One study folder read and summarised: its runs, the aggregate, the count and the flags."""

    study_dir: str
    rec: dict
    opts: ReportOptions
    runs: list
    agg: list
    idx: Index
    attrs: list
    flags: dict
    gaps: GapCount
    comparisons: list

    @property
    def ood_splits(self) -> list[str]:
        return [s for s in self.idx.splits if s in self.opts.ood_splits]


def load_study(study_dir: str, options: Mapping | None = None, classes: Sequence[str] | None = None) -> Study:
    """Read a study folder (run folders, or a report's results.csv + study_config.json) and count its comparisons.
    ``options`` override the ``report`` section recorded in study_config.json, which overrides the defaults;
    ``classes`` limits the count to these findings (default all)."""
    study_dir = os.path.abspath(study_dir)
    if not os.path.isdir(study_dir):
        raise FileNotFoundError(
            f"study folder {study_dir} does not exist; give the folder that scripts/run_study.py "
            "wrote (default results/<name>)"
        )
    rec = read_json(os.path.join(study_dir, CONFIG_FILE)) or {}
    opts = ReportOptions.resolve(rec.get("report"), options)
    runs = collect_runs(study_dir)
    if not runs:
        raise ValueError(
            f"{study_dir}: no finished run (runs/*/DONE, or a report's results.csv); run the study first "
            "(python scripts/run_study.py) or check the folder"
        )
    agg = aggregate(runs)
    idx = Index(agg)
    found_classes, found_attrs = idx.classes_attributes()
    unknown = sorted(set(classes or ()) - set(found_classes))
    if unknown:
        raise ValueError(f"{study_dir}: finding(s) {unknown} not in this study; it has {found_classes}")
    attrs = [a for a in opts.attributes if a in found_attrs] or found_attrs
    flags = model_flags(runs, opts)
    gaps, comparisons = count_gaps(idx, opts, attrs, flags, classes=classes)
    return Study(study_dir, rec, opts, runs, agg, idx, attrs, flags, gaps, comparisons)


def _writer(out_dir: str, written: dict):
    def put(name: str, text: str) -> None:
        write_text_atomic(os.path.join(out_dir, name), text)
        written[name] = os.path.join(out_dir, name)

    return put


def make_report(
    study_dir: str,
    out_dir: str | None = None,
    options: Mapping | None = None,
    mlflow: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write the study report (results.md, CSVs, PNGs) to ``<study>/report`` and log it to the parent MLflow run.

    ``options`` (over the ``report`` section recorded by the runner in study_config.json, over the defaults of
    :class:`ReportOptions`). Returns the paths written and the headline counts.
    """
    log = log or (lambda s: print(s, flush=True))
    st = load_study(study_dir, options)
    study_dir, rec, opts, runs, idx, attrs, gaps = st.study_dir, st.rec, st.opts, st.runs, st.idx, st.attrs, st.gaps
    out_dir = os.path.abspath(out_dir or os.path.join(study_dir, "report"))
    written: dict[str, str] = {}
    put = _writer(out_dir, written)
    if gaps.warning:
        log(f"WARNING: {gaps.warning}")

    put("results.csv", rows_to_csv(long_rows(runs)))
    put("aggregated.csv", rows_to_csv(st.agg))
    put("gap_comparisons.csv", rows_to_csv(st.comparisons))
    paper_models, every = gaps.models(idx)
    t2_md, t2_rows = table2(idx, paper_models, attrs, splits=st.ood_splits, flags=st.flags)
    if not st.ood_splits:
        t2_md = f"_no out-of-domain split (report.ood_splits = {list(opts.ood_splits)}) was evaluated_\n"
    t2all_md, t2all_rows = table2(idx, every, attrs, flags=st.flags)
    put("table2.csv", rows_to_csv(t2_rows))
    put("table2_all_levels.csv", rows_to_csv(t2all_rows))
    split_c = opts.control_split if opts.control_split in idx.splits else (idx.splits[-1] if idx.splits else "")
    pc_md, pc_rows = positive_control(idx, split_c, attrs)
    put("positive_control.csv", rows_to_csv(pc_rows))
    frows = flag_rows(st.flags, every, gaps.base)
    put("flags.csv", rows_to_csv(frows) if frows else "model,setting,split,finding,flags\n")

    figs = draw_figures(
        runs, idx, out_dir, attrs, opts.fig_gap_metric, paper_models, gaps.p1, gaps.best_s, opts.ood_splits
    )
    if all(r["dir"] is None for r in runs):  # read from results.csv: no overlays; keep galleries already there
        for name, path in figs.items():
            kept = os.path.join(out_dir, name)
            if path is None and name.startswith(GALLERY_PREFIX) and os.path.isfile(kept):
                figs[name] = kept
                log(f"kept {kept}: no run folders to redraw it from")
    written.update({k: v for k, v in figs.items() if v})

    cov = coverage(rec, runs, st.agg)
    if cov["mixed"]:
        log(f"WARNING: settings {cov['mixed']} mix runs made with different configurations")
    put(
        "results.md",
        results_markdown(
            title=rec.get("name", os.path.basename(study_dir)),
            study_dir=study_dir,
            profile=rec.get("profile", "?"),
            written=time.strftime("%F %T"),
            n_runs=len(runs),
            n_settings=len(idx.meta),
            coverage=cov,
            control_split=split_c,
            control_md=pc_md,
            gaps=gaps,
            flags_md=flags_markdown(frows, opts),
            table2_md=t2_md,
            table2_all_md=t2all_md,
            figures=[(name, figure_title(name), path) for name, path in figs.items()],
        ),
    )

    logged = log_report(study_dir, out_dir, gaps.headline(len(runs)), log) if mlflow else False
    return {
        "report_dir": out_dir,
        "files": written,
        "best_p": gaps.best_p,
        "best_p_how": gaps.how,
        "best_p_warning": gaps.warning,
        "lowered_best_p": gaps.lowered_best,
        "lowered_p1": gaps.lowered_p1,
        "unflagged_best_p": gaps.unflagged_best,
        "unflagged_p1": gaps.unflagged_p1,
        "n_runs": len(runs),
        "missing": cov["missing"],
        "mixed": cov["mixed"],
        "mlflow_logged": logged,
    }


MERGED_TITLE = "# Merged study report: {n} conditions"
MERGED_COUNT = (
    "**Alignment (best p of each condition) improved {x} of {y} comparisons** over the conditions' out-of-domain "
    "splits; without the flagged comparisons {xu} of {yu}. With p = 1: {x1} of {y1} (without flagged: {xu1} of {yu1})."
)


def make_merged_report(
    studies: Mapping[str, str],
    out_dir: str,
    options: Mapping | None = None,
    findings: Mapping[str, Sequence[str]] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """One report over several studies, one per condition (e.g. {"effusion": dir, "edema": dir, "nodule": dir}), as
    the paper's Table 2: one table of the conditions' out-of-domain splits, one Fig. 6 radar per condition x finding x
    OOD split, and one count over them all. Each study keeps its own best p (by ``best_p_by``, e.g. validation AUC).
    ``findings``: {condition: [finding, ...]} counts only these findings of that study (default all its findings).
    Writes results.md, table2.csv, gap_comparisons.csv, flags.csv and fig6_radar.png to ``out_dir``."""
    log = log or (lambda s: print(s, flush=True))
    if not studies:
        raise ValueError("no study folder to merge")
    findings = findings or {}
    unknown = sorted(set(findings) - set(studies))
    if unknown:
        raise ValueError(f"findings given for unknown condition(s) {unknown}; conditions: {list(studies)}")
    loaded = {c: load_study(d, options, findings.get(c)) for c, d in studies.items()}
    out_dir = os.path.abspath(out_dir)
    written: dict[str, str] = {}
    put = _writer(out_dir, written)
    opts0 = next(iter(loaded.values())).opts
    t2_lines, t2_rows, comps, frows, panels, md_best = [], [], [], [], [], []
    for c, st in loaded.items():
        paper_models, _ = st.gaps.models(st.idx)
        cls = findings.get(c)
        for split in st.ood_splits:
            lines, rows = table2_block(st.idx, paper_models, st.attrs, split, condition=c, flags=st.flags, classes=cls)
            t2_lines += lines
            t2_rows += rows
        comps += [{"condition": c, **r} for r in st.comparisons]
        frows += [
            {"condition": c, **r}
            for r in flag_rows(st.flags, paper_models, st.gaps.base)
            if r["split"] in st.ood_splits and (not cls or r["finding"] in cls)
        ]
        panels += radar_panels(st.idx, paper_models, st.opts.ood_splits, condition=c, classes=cls)
        g = st.gaps
        x, y = g.lowered_best
        mixed = coverage(st.rec, st.runs, st.agg)["mixed"]
        line = f"- {c} (`{st.study_dir}`, {len(st.runs)} runs, OOD split(s) {', '.join(st.ood_splits) or 'none'}): "
        line += f"best p = {g.best_p:g} ({g.how}); {x} of {y}" if g.best_s else "no aligned setting"
        line += f". **Warning**: {g.warning}" if g.warning else ""
        line += f". **Warning**: settings {mixed} mix runs made with different configurations" if mixed else ""
        md_best.append(line + ".")
        if g.warning:
            log(f"WARNING {c}: {g.warning}")
    best_rows = [r for r in comps if r["comparison"] == "best_p"]
    p1_rows = [r for r in comps if r["comparison"] == "p1"]
    counts = {
        "best_p": count_improved(best_rows),
        "best_p_unflagged": count_improved(best_rows, unflagged=True),
        "p1": count_improved(p1_rows),
        "p1_unflagged": count_improved(p1_rows, unflagged=True),
    }
    put("gap_comparisons.csv", rows_to_csv(comps))
    put("table2.csv", rows_to_csv(t2_rows))
    put("flags.csv", rows_to_csv(frows) if frows else "condition,model,setting,split,finding,flags\n")
    fig6 = fig6_radar(panels, os.path.join(out_dir, "fig6_radar.png"))
    if fig6:
        written["fig6_radar.png"] = fig6
    md = [MERGED_TITLE.format(n=len(loaded)), "", f"Written {time.strftime('%F %T')}.", "", HIT_RATE_DEFINITION, ""]
    md += ["## Did alignment lower the gap?", ""]
    md.append(
        MERGED_COUNT.format(
            x=counts["best_p"][0],
            y=counts["best_p"][1],
            xu=counts["best_p_unflagged"][0],
            yu=counts["best_p_unflagged"][1],
            x1=counts["p1"][0],
            y1=counts["p1"][1],
            xu1=counts["p1_unflagged"][0],
            yu1=counts["p1_unflagged"][1],
        )
    )
    md += ["", *md_best, COMPARISON_NOTE, ""]
    md += flags_markdown(frows, opts0, condition=True)
    md += ["## Table 2: fairness gaps (%) and hit rate (%), out-of-domain splits, per condition", ""]
    md += (table2_header(condition=True) + t2_lines) if t2_lines else [NO_GAP_ON_SPLIT]
    md += ["", "## Fig. 6", "", "![Fig. 6](fig6_radar.png)" if fig6 else "_not drawn_", ""]
    for c, st in loaded.items():
        md += [f"{c}: " + " ".join(coverage_lines(coverage(st.rec, st.runs, st.agg)) or ["complete."])]
    put("results.md", "\n".join(md) + "\n")
    return {
        "report_dir": out_dir,
        "files": written,
        "best_p": {c: st.gaps.best_p for c, st in loaded.items()},
        "counts": counts,
        "lowered_best_p": counts["best_p"],
        "lowered_p1": counts["p1"],
    }
