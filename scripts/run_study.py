#!/usr/bin/env python
"""Run the study (configs/study.yaml): every setting x seed trained and evaluated, then the report.

    python scripts/run_study.py --profile quick                 # the positive control on this machine
    python scripts/run_study.py --profile quick --dry-run       # the runs and their status, nothing started
    python scripts/run_study.py --workers 2                     # two trainings at a time (threads split)
    python scripts/run_study.py --shard 1/3 --tracking-uri http://mlflow:5000   # machine 1 of 3 (shared folder)
    python scripts/run_study.py --profile quick --train max_epochs=3 --set seeds=[0,1] --name quick_e3
    python scripts/run_study.py --only 'p1.00_*' --only 'random_*'

Rerun the same command after a crash or Ctrl-C: finished runs are skipped, unfinished ones resume.
Results: <output_root>/<name>/ (default results/<profile name>/), report in its report/ folder. See docs/study.md.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle import study  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(study.BUNDLE_ROOT, "configs", "study.yaml"),
                    help="study YAML (default configs/study.yaml)")
    ap.add_argument("--profile", default=None, help="a profile of the YAML: default, quick, paper, smoke, ...")
    ap.add_argument("--name", default=None, help="study name (folder <output_root>/<name>); default: the profile's")
    ap.add_argument("--output-dir", default=None, help="the study folder itself (overrides output_root/name)")
    ap.add_argument("--workers", type=int, default=1, help="trainings at a time on this machine (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per training (default cores // workers)")
    ap.add_argument("--gpus", default=None, help="comma-separated GPU ids; worker k uses GPU k mod len (e.g. 0,1)")
    ap.add_argument("--shard", default=None, help="i/n: this machine takes every n-th run starting at the i-th")
    ap.add_argument("--only", action="append", default=[], metavar="GLOB",
                    help="only runs whose id or setting matches (repeatable), e.g. 'p0.*' or 'random_*_seed0'")
    ap.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI, else SQLite in "
                                                          "the study folder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a study key (YAML value, dotted keys), e.g. --set seeds=[0,1] "
                         "--set grid.groups=[alignment]")
    ap.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train.yaml key for every run (YAML value), e.g. --train max_epochs=3")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their status; start nothing")
    ap.add_argument("--redo-stale", action="store_true",
                    help="redo finished runs whose configuration differs from the current one")
    ap.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = study.load_study_config(
            args.config, profile=args.profile, overrides=study.parse_assignments(args.set, "--set"),
            train_overrides=study.parse_assignments(args.train, "--train"), name=args.name,
            study_dir=args.output_dir, tracking_uri=args.tracking_uri)
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        res = study.run_study(cfg, workers=args.workers, shard=study.parse_shard(args.shard), only=args.only,
                              dry_run=args.dry_run, report=not args.no_report, redo_stale=args.redo_stale,
                              threads=args.threads, gpus=gpus)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if res.interrupted:
        return 130
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
