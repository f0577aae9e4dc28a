#!/usr/bin/env python
"""Send what a training could not send to MLflow (its spool) into the same MLflow run.

    python scripts/mlflow_replay.py eval/mlflow_spool                     # every run spooled there
    python scripts/mlflow_replay.py eval/mlflow_spool/<run_id>            # one run
    python scripts/mlflow_replay.py eval/mlflow_spool --tracking_uri http://host:5000   # the server moved

Points the run already has are skipped, so replaying twice adds nothing. A spool whose records are all sent is
removed (``--keep`` keeps it). Exit status: 0 all sent, 1 something is left (rerun later), 2 no spool there.
See docs/mlflow.md (bundle/utils/mlflow_spool.py does the work).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.utils.mlflow_spool import replay  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spool", nargs="+", help="a spool folder (<output_dir>/mlflow_spool) or one run's subfolder")
    ap.add_argument("--tracking_uri", default=None, help="the MLflow store to send to (default: the run's, recorded)")
    ap.add_argument("--keep", action="store_true", help="keep the spool after everything is sent")
    ap.add_argument("--from_start", action="store_true", help="resend the whole spool (MLflow's points are skipped)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a process still sending it")
    args = ap.parse_args(argv)
    rc = 0
    for path in args.spool:
        rc = max(rc, replay(path, args.tracking_uri, keep=args.keep, from_start=args.from_start, lock_wait=args.wait))
    return rc


if __name__ == "__main__":
    sys.exit(main())
