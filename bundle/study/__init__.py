"""The study: a grid of trainings (alignment level p, random-alignment ablation, training data ratio) x seeds.

Every (setting, seed) is one *run*: a subprocess of the training job (configs/train.yaml) with its own folder
``<study>/runs/<run_id>/``, its own MLflow child run (nested under one parent run per study) and a ``DONE``
marker written atomically after success. Rerunning skips finished runs and redoes the others (the training's own
checkpoint resume continues an interrupted one). ``workers`` runs several at once on one machine; ``shard`` and the
per-run file locks spread a study over machines that share the study folder and an MLflow server.

    cfg = load_study_config("configs/study.yaml", profile="quick")
    result = run_study(cfg, workers=2)          # writes the report at its end
    out = make_report(cfg.study_dir)            # the report again (also: scripts/report.py)

The modules, each importing only those above it (no cycle):

    layout      the study folder: bundle root, run files (DONE/FAILED/setting.json), fingerprints, locks, run status
    grid        settings, runs and their ids, shards, the command line of one run
    config      configs/study.yaml + profile + overrides -> StudyConfig; ReportOptions (the report's defaults)
    tracking    the MLflow parent run, child-run cleanup, logging the report
    report/     collect (runs, aggregation, best p), tables (Table 2, counts, results.md), figures (Figs. 3-6)
    executors   one run (lock, fingerprint check, the training subprocess, DONE/FAILED), shared by the local
                executor and the Ray executor (one Ray task per run, resources, retries)
    runner      run_study and the local executor (threads: workers, shards, resume, Ctrl-C)
    cli         scripts/run_study.py and scripts/report.py

See docs/study.md.
"""

from bundle.study.cli import parse_assignments, parse_shard
from bundle.study.config import ReportOptions, StudyConfig, load_study_config
from bundle.study.grid import GROUPS, RunSpec, Setting, build_settings, expand_runs, select_runs, train_command
from bundle.study.layout import BUNDLE_ROOT, CONFIG_FILE, DONE, FAILED, LOCK, PARENT_FILE, fingerprint, run_status
from bundle.study.report import make_report
from bundle.study.runner import StudyResult, format_duration, run_study
from bundle.study.tracking import ensure_parent_run, finish_parent_run

__all__ = [
    "BUNDLE_ROOT",
    "GROUPS",
    "DONE",
    "FAILED",
    "LOCK",
    "CONFIG_FILE",
    "PARENT_FILE",
    "Setting",
    "RunSpec",
    "StudyConfig",
    "ReportOptions",
    "StudyResult",
    "load_study_config",
    "build_settings",
    "expand_runs",
    "select_runs",
    "run_status",
    "fingerprint",
    "train_command",
    "ensure_parent_run",
    "finish_parent_run",
    "run_study",
    "make_report",
    "parse_shard",
    "parse_assignments",
    "format_duration",
]
