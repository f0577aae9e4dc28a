"""Command lines of scripts/run_study.py and scripts/report.py (the scripts only call :func:`run_study_main` and
:func:`report_main`), and the parsers of their values (``--set``/``--train`` assignments, ``--shard i/n``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Sequence

import yaml

from bundle.study.config import DEFAULT_STUDY_YAML, EXECUTORS, RayOptions, ReportOptions, load_study_config
from bundle.study.executors import RAY_PIN, RayMissingError
from bundle.study.report import make_merged_report, make_report
from bundle.study.runner import run_study

__all__ = ["parse_assignments", "parse_shard", "parse_conditions", "run_study_main", "report_main"]


def parse_assignments(items: Iterable[str], what: str) -> dict:
    """['a.b=1', 'x=[0, 1]'] -> {'a.b': 1, 'x': [0, 1]} (values parsed as YAML)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} {item!r}: write it as KEY=VALUE, e.g. {what} max_epochs=3")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'2/3' -> (2, 3): this machine takes runs 2, 5, 8, ... (1-based) of the study's fixed run order."""
    if text in (None, ""):
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: write it as i/n with 1 <= i <= n, e.g. --shard 1/3") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard {text!r}: need 1 <= i <= n (shards are numbered from 1), e.g. --shard 1/{max(n, 1)}")
    return i, n


def run_study_main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """scripts/run_study.py: 0 when every selected run is done, 1 when any failed, 2 on a usage error, 130 when
    interrupted."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_STUDY_YAML, help="study YAML (default configs/study.yaml)")
    ap.add_argument("--profile", default=None, help="a profile of the YAML: default, quick, paper, smoke, ...")
    ap.add_argument("--name", default=None, help="study name (folder <output_root>/<name>); default: the profile's")
    ap.add_argument("--output-dir", default=None, help="the study folder itself (overrides output_root/name)")
    ap.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=None,
        help="local: subprocesses on this machine (default); ray: one Ray task per run on a Ray cluster (needs "
        f"pip install {RAY_PIN})",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local: trainings at a time on this machine (default 1); ray: at most this many runs in flight "
        "(default: as many as the cluster's resources allow)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per training (local default cores // workers; ray: the task's num_cpus, default "
        "ray.cpus_per_run = 1)",
    )
    ap.add_argument("--gpus", default=None, help="local: comma-separated GPU ids; worker k uses GPU k mod len (0,1)")
    ap.add_argument(
        "--address",
        default=None,
        help="ray: the cluster (auto = the one this node belongs to, host:6379, ray://host:10001, local = a new "
        "local instance); default ray.address of the YAML, else $RAY_ADDRESS, else a new local instance",
    )
    ap.add_argument("--gpus-per-run", type=float, default=None, help="ray: num_gpus of each run (e.g. 1, or 0.5)")
    ap.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help="ray: retries of a failed training (each resumes from the run's checkpoints; default ray.max_retries = 2)",
    )
    ap.add_argument(
        "--ray-num-cpus", type=int, default=None, help="ray: the CPUs a new local instance offers (default all)"
    )
    ap.add_argument(
        "--shard",
        default=None,
        help="local only: i/n, this invocation takes every n-th run starting at the i-th (SLURM arrays on a "
        "filesystem whose locks are node-local; docs/study.md)",
    )
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="only runs whose id or setting matches (repeatable), e.g. 'p0.*' or 'random_*_seed0'",
    )
    ap.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow URI (default $MLFLOW_TRACKING_URI, else SQLite in the study folder)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a study key (YAML value, dotted keys), e.g. --set seeds=[0,1] --set grid.groups=[alignment]",
    )
    ap.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train.yaml key for every run (YAML value), e.g. --train max_epochs=3",
    )
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their status; start nothing")
    ap.add_argument(
        "--redo-stale", action="store_true", help="redo finished runs whose configuration differs from the current one"
    )
    ap.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = load_study_config(
            args.config,
            profile=args.profile,
            overrides=parse_assignments(args.set, "--set"),
            train_overrides=parse_assignments(args.train, "--train"),
            name=args.name,
            study_dir=args.output_dir,
            tracking_uri=args.tracking_uri,
        )
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        ray_set = {
            k: v
            for k, v in {
                "address": args.address,
                "gpus_per_run": args.gpus_per_run,
                "max_retries": args.max_retries,
                "num_cpus": args.ray_num_cpus,
            }.items()
            if v is not None
        }
        executor = args.executor or cfg.executor
        if ray_set and executor != "ray":
            flags = ", ".join("--" + k.replace("_", "-") for k in ray_set).replace("--num-cpus", "--ray-num-cpus")
            raise ValueError(f"{flags} only apply to --executor ray (the study's executor is {executor})")
        ray_opts = RayOptions.resolve({**cfg.ray.to_dict(), **ray_set}, "command line")
        res = run_study(
            cfg,
            workers=args.workers,
            shard=parse_shard(args.shard),
            only=args.only,
            dry_run=args.dry_run,
            report=not args.no_report,
            redo_stale=args.redo_stale,
            threads=args.threads,
            gpus=gpus,
            executor=executor,
            ray=ray_opts,
        )
    except (ValueError, FileNotFoundError, RayMissingError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if res.interrupted:
        return 130
    return 0 if res.ok else 1


def parse_conditions(items: Sequence[str]) -> dict[str, str]:
    """['effusion=results/eff', 'results/edema'] -> {'effusion': 'results/eff', 'edema': 'results/edema'} (a folder
    without a label is labelled by its name)."""
    out: dict[str, str] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = os.path.basename(os.path.normpath(item)), item
        if not label or not path:
            raise ValueError(f"study {item!r}: give a folder or LABEL=FOLDER, e.g. effusion=results/effusion")
        if label in out:
            raise ValueError(f"condition {label!r} given twice; label the folders, e.g. effusion=results/effusion")
        out[label] = path
    return out


def report_main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """scripts/report.py: 0 when the report was written, 2 on a usage error (no study, no finished run, a missing
    best-p criterion without fallback)."""
    d = ReportOptions
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "study_dir",
        nargs="+",
        help="the study folder (default of the runner: results/<name>), or a folder with a report's results.csv and "
        "study_config.json; several (LABEL=FOLDER, one per condition) = one merged report (needs --out)",
    )
    ap.add_argument("--out", default=None, help="report folder (default <study_dir>/report)")
    ap.add_argument(
        "--best-p-by",
        default=None,
        metavar="SPLIT/METRIC",
        help=f"choose Table 2's best p by this mean (default: the study's report.best_p_by, else {d.best_p_by}; "
        "validation/... = the runs' model_selection.json)",
    )
    ap.add_argument(
        "--best-p-fallback",
        default=None,
        metavar="SPLIT/METRIC",
        help=f"used, with a warning, when a setting lacks the best-p criterion; 'none' = an error instead "
        f"(default {d.best_p_fallback})",
    )
    ap.add_argument(
        "--control-split", default=None, help=f"split of the positive-control table (default {d.control_split})"
    )
    ap.add_argument("--ood-splits", default=None, help=f"comma-separated OOD splits (default {','.join(d.ood_splits)})")
    ap.add_argument("--attributes", default=None, help=f"comma-separated attributes (default {','.join(d.attributes)})")
    ap.add_argument(
        "--findings",
        action="append",
        default=[],
        metavar="LABEL=F1,F2",
        help="merged report: count only these findings of condition LABEL (repeatable)",
    )
    ap.add_argument("--no-mlflow", action="store_true", help="do not log the report to the parent MLflow run")
    args = ap.parse_args(argv)
    fallback = args.best_p_fallback
    opts = {
        k: v
        for k, v in {
            "best_p_by": args.best_p_by,
            "best_p_fallback": "" if fallback is not None and fallback.lower() in ("none", "") else fallback,
            "control_split": args.control_split,
            "ood_splits": args.ood_splits.split(",") if args.ood_splits else None,
            "attributes": args.attributes.split(",") if args.attributes else None,
        }.items()
        if v is not None
    }
    try:
        if len(args.study_dir) > 1 or args.findings:
            if not args.out:
                raise ValueError("several study folders make one merged report: give its folder with --out")
            findings = {
                k: [f for f in str(v).split(",") if f]
                for k, v in parse_assignments(args.findings, "--findings").items()
            }
            out = make_merged_report(parse_conditions(args.study_dir), args.out, options=opts, findings=findings)
            c = out["counts"]
            print(
                f"{len(out['best_p'])} conditions; best p {out['best_p']}; alignment improved {c['best_p'][0]} of "
                f"{c['best_p'][1]} comparisons (best p; without flagged {c['best_p_unflagged'][0]} of "
                f"{c['best_p_unflagged'][1]}), {c['p1'][0]} of {c['p1'][1]} (p = 1)"
            )
            print(f"report: {os.path.join(out['report_dir'], 'results.md')}")
            return 0
        out = make_report(args.study_dir[0], out_dir=args.out, options=opts, mlflow=not args.no_mlflow)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lb, tb = out["lowered_best_p"]
    ub, vb = out["unflagged_best_p"]
    print(
        f"{out['n_runs']} finished runs; best p = {out['best_p']} ({out['best_p_how']}); alignment improved "
        f"{lb} of {tb} comparisons (best p; without flagged {ub} of {vb}), {out['lowered_p1'][0]} of "
        f"{out['lowered_p1'][1]} (p = 1)"
    )
    print(f"report: {os.path.join(out['report_dir'], 'results.md')}")
    return 0
