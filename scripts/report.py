#!/usr/bin/env python
"""Write (again) the report of a study from its finished runs: results.md, CSVs and figures in <study>/report/.

    python scripts/report.py results/quick
    python scripts/report.py results/study --best-p-by test_ood/mean_auc --no-mlflow

The study runner writes it automatically at its end; this is for partial studies (while runs are going)
and for other report options. The report is also logged to the study's parent MLflow run. See docs/study.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.report import make_report  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study_dir", help="the study folder (default of the runner: results/<name>)")
    ap.add_argument("--out", default=None, help="report folder (default <study_dir>/report)")
    ap.add_argument("--best-p-by", default=None, metavar="SPLIT/METRIC",
                    help="choose Table 2's best p by this mean (default: the study's report.best_p_by, test/mean_auc)")
    ap.add_argument("--control-split", default=None, help="split of the positive-control table (default test_ood)")
    ap.add_argument("--attributes", default=None, help="comma-separated attributes (default sex,age)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log the report to the parent MLflow run")
    args = ap.parse_args(argv)
    opts = {k: v for k, v in {"best_p_by": args.best_p_by, "control_split": args.control_split,
                              "attributes": args.attributes.split(",") if args.attributes else None}.items()
            if v is not None}
    try:
        out = make_report(args.study_dir, out_dir=args.out, options=opts, mlflow=not args.no_mlflow)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lb, tb = out["lowered_best_p"]
    print(f"{out['n_runs']} finished runs; best p = {out['best_p']} ({out['best_p_how']}); alignment lowered the gap "
          f"in {lb} of {tb} comparisons (best p), {out['lowered_p1'][0]} of {out['lowered_p1'][1]} (p = 1)")
    print(f"report: {os.path.join(out['report_dir'], 'results.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
