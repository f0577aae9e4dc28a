#!/usr/bin/env python
"""Write (again) the report of a study from its finished runs: results.md, CSVs and figures in <study>/report/.

    python scripts/report.py results/quick
    python scripts/report.py results/study --best-p-by test_ood/mean_auc --no-mlflow

The study runner writes it automatically at its end; this is for partial studies (while runs are going)
and for other report options. The report is also logged to the study's parent MLflow run. See docs/study.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.study.cli import report_main  # noqa: E402


def main(argv=None) -> int:
    return report_main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
