#!/usr/bin/env python
"""Run the study (configs/study.yaml): every setting x seed trained and evaluated, then the report.

    python scripts/run_study.py --profile quick                 # the positive control on this machine
    python scripts/run_study.py --profile quick --dry-run       # the runs and their status, nothing started
    python scripts/run_study.py --workers 2                     # two trainings at a time (threads split)
    python scripts/run_study.py --executor ray --address auto --output-dir /shared/study --threads 4 --gpus-per-run 1
                                                                # one Ray task per run on a Ray cluster
    python scripts/run_study.py --shard 1/3 --tracking-uri http://mlflow:5000   # invocation 1 of 3 (shared folder)
    python scripts/run_study.py --profile quick --train max_epochs=3 --set seeds=[0,1] --name quick_e3
    python scripts/run_study.py --only 'p1.00_*' --only 'random_*'

Rerun the same command after a crash or Ctrl-C: finished runs are skipped, unfinished ones resume.
Results: <output_root>/<name>/ (default results/<profile name>/), report in its report/ folder. See docs/study.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.study.cli import run_study_main  # noqa: E402


def main(argv=None) -> int:
    return run_study_main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
