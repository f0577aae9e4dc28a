"""The study report: every finished run's evaluation, mean +- sd over seeds, the paper's Table 2 and Figs. 3-6.

    make_report("results/quick")   # -> results/quick/report/{results.md, *.csv, *.png}

- :mod:`.collect`: the finished runs' metrics, aggregation over seeds, look-ups, the choice of the best p;
- :mod:`.tables`: Table 2, the positive control, the "X of Y" count, results.md and its prose;
- :mod:`.figures`: Figs. 3-6 and the attention galleries.

The options (control split, best-p criterion, attributes, Fig. 3's gap) and their defaults are
:class:`bundle.study.config.ReportOptions`. The report is logged to the study's parent MLflow run
(:func:`bundle.study.tracking.log_report`). See docs/study.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

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
)
from bundle.study.report.figures import draw_figures, figure_title
from bundle.study.report.tables import (
    GapCount,
    count_gaps,
    count_lowered,
    gap_comparisons,
    positive_control,
    results_markdown,
    table2,
)
from bundle.study.tracking import log_report
from bundle.utils.atomic import rows_to_csv, write_text_atomic

__all__ = [
    "make_report",
    "ReportOptions",
    "collect_runs",
    "long_rows",
    "aggregate",
    "Index",
    "choose_best_p",
    "gap_comparisons",
    "count_lowered",
    "count_gaps",
    "GapCount",
    "table2",
    "positive_control",
    "GAP_METRICS",
]


def make_report(
    study_dir: str,
    out_dir: str | None = None,
    options: Mapping | None = None,
    mlflow: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write the study report (results.md, CSVs, PNGs) to ``<study>/report`` and log it to the parent MLflow run.

    ``options`` (over the ``report`` section recorded by the runner in study_config.json, over the defaults of
    :class:`ReportOptions`): control_split, best_p_by ("split/metric"), attributes, fig_gap_metric. Returns the paths
    written and the headline counts.
    """
    log = log or (lambda s: print(s, flush=True))
    study_dir = os.path.abspath(study_dir)
    if not os.path.isdir(study_dir):
        raise FileNotFoundError(
            f"study folder {study_dir} does not exist; give the folder that scripts/run_study.py "
            "wrote (default results/<name>)"
        )
    rec = read_json(os.path.join(study_dir, CONFIG_FILE)) or {}
    opts = ReportOptions.resolve(rec.get("report"), options)
    out_dir = os.path.abspath(out_dir or os.path.join(study_dir, "report"))
    runs = collect_runs(study_dir)
    if not runs:
        raise ValueError(
            f"{study_dir}: no finished run (runs/*/DONE); run the study first "
            "(python scripts/run_study.py) or check the folder"
        )
    agg = aggregate(runs)
    idx = Index(agg)
    _, found_attrs = idx.classes_attributes()
    attrs = [a for a in opts.attributes if a in found_attrs] or found_attrs
    written: dict[str, str] = {}

    def put(name: str, text: str) -> None:
        write_text_atomic(os.path.join(out_dir, name), text)
        written[name] = os.path.join(out_dir, name)

    put("results.csv", rows_to_csv(long_rows(runs)))
    put("aggregated.csv", rows_to_csv(agg))

    gaps, comparisons = count_gaps(idx, opts.best_p_by, attrs)
    put("gap_comparisons.csv", rows_to_csv(comparisons))
    paper_models, every = gaps.models(idx)
    t2_md, t2_rows = table2(idx, paper_models, attrs)
    t2all_md, t2all_rows = table2(idx, every, attrs)
    put("table2.csv", rows_to_csv(t2_rows))
    put("table2_all_levels.csv", rows_to_csv(t2all_rows))
    split_c = opts.control_split if opts.control_split in idx.splits else (idx.splits[-1] if idx.splits else "")
    pc_md, pc_rows = positive_control(idx, split_c, attrs)
    put("positive_control.csv", rows_to_csv(pc_rows))

    figs = draw_figures(runs, idx, out_dir, attrs, opts.fig_gap_metric, paper_models, gaps.p1, gaps.best_s)
    written.update({k: v for k, v in figs.items() if v})

    cov = coverage(rec, runs, agg)
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
        "lowered_best_p": gaps.lowered_best,
        "lowered_p1": gaps.lowered_p1,
        "n_runs": len(runs),
        "missing": cov["missing"],
        "mlflow_logged": logged,
    }
