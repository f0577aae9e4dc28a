"""The study folder on disk: where the bundle is, the files of a study and of each run, fingerprints, locks, status.

    <study>/study_config.json, mlflow_parent.json, .parent.lock
    <study>/runs/<run_id>/setting.json, train.log, DONE | FAILED, .lock, eval/report/summary.json

Markers are written atomically (readers see a whole file or none), so a crash never leaves half a ``DONE``. This
module imports nothing else of the study: the grid, the config, the runner, tracking and the report all build on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

from bundle.utils.atomic import read_json, write_json_atomic
from bundle.utils.lock import file_lock

if TYPE_CHECKING:  # annotations only: config and grid import this module
    from bundle.study.config import StudyConfig
    from bundle.study.grid import RunSpec

__all__ = [
    "BUNDLE_ROOT",
    "DONE",
    "FAILED",
    "SETTING",
    "LOCK",
    "LOG",
    "PARENT_FILE",
    "CONFIG_FILE",
    "PARENT_LOCK",
    "write_record",
    "read_json",
    "fingerprint",
    "config_fingerprint",
    "summary_path",
    "expects_summary",
    "try_run_lock",
    "run_status",
    "wipe_run_dir",
    "log_tail",
]

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DONE, FAILED, SETTING, LOCK, LOG = "DONE", "FAILED", "setting.json", ".lock", "train.log"
PARENT_FILE = "mlflow_parent.json"
CONFIG_FILE = "study_config.json"
PARENT_LOCK = ".parent.lock"


def write_record(path: str, obj) -> None:
    """A study record (marker, setting.json, study_config.json, mlflow_parent.json): sorted keys, the zoo's JSON layout
    (4-space indent, as its pretty-format-json hook wants), fsynced."""
    write_json_atomic(path, obj, indent=4, sort_keys=True, default=str, fsync=True)


def _fingerprint_key(cfg: StudyConfig, spec: RunSpec, datalist_file: str | None) -> dict:
    return {
        "train_config": [os.path.relpath(p, BUNDLE_ROOT) for p in cfg.train_config],
        "train_command": cfg.train_command,
        "overrides": cfg.train_overrides,
        "setting": [spec.setting.alignment_fraction, spec.setting.random_alignment, spec.setting.data_ratio],
        "datalist_file": datalist_file,
    }


def _digest(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fingerprint(cfg: StudyConfig, spec: RunSpec, datalist_file: str | None) -> str:
    """What makes a run's result: configs, command, overrides, data, setting and seed. Output and tracking locations
    do not count. A finished run whose fingerprint differs from the current one is stale."""
    return _digest({**_fingerprint_key(cfg, spec, datalist_file), "seed": spec.seed})


def config_fingerprint(cfg: StudyConfig, spec: RunSpec, datalist_file: str | None) -> str:
    """:func:`fingerprint` without the seed: equal for every seed of one setting made with one configuration, so the
    report can tell whether a setting's seeds really mix configurations."""
    return _digest(_fingerprint_key(cfg, spec, datalist_file))


def summary_path(cfg: StudyConfig, spec: RunSpec) -> str:
    return os.path.join(cfg.run_dir(spec), "eval", "report", "summary.json")


def expects_summary(cfg: StudyConfig) -> bool:
    """False when the runs skip their final evaluation (then no summary.json is required for DONE)."""
    v = cfg.train_overrides.get("final_evaluation", True)
    return str(v).strip().lower() not in ("false", "0", "no", "off", "$false")


@contextlib.contextmanager
def try_run_lock(run_dir: str) -> Iterator[int | None]:
    """The run's exclusive, non-blocking lock (``<run>/.lock``): yields the open fd, or None when another process
    holds it.

    flock locks live as long as any process holds the fd: the training child inherits it (pass_fds), so an orphaned
    child keeps its run locked even if the runner is killed. NFS clients emulate flock with POSIX locks.
    """
    with file_lock(os.path.join(run_dir, LOCK), blocking=False, owner_note=True) as fd:
        yield fd


def run_status(cfg: StudyConfig, spec: RunSpec, fp: str | None = None) -> str:
    """done | stale (done with another configuration) | running (locked by another process) | failed (last attempt
    crashed) | partial (started, will resume) | pending."""
    rdir = cfg.run_dir(spec)
    done = read_json(os.path.join(rdir, DONE))
    if done is not None:
        return "stale" if fp and done.get("fingerprint") not in (None, fp) else "done"
    if not os.path.isdir(rdir):
        return "pending"
    with try_run_lock(rdir) as fd:
        if fd is None:
            return "running"
    if os.path.exists(os.path.join(rdir, FAILED)):
        return "failed"
    return "partial" if os.path.exists(os.path.join(rdir, SETTING)) else "pending"


def wipe_run_dir(rdir: str) -> None:
    """Empty a run folder for a fresh start, keeping its lock file (held by the caller)."""
    for name in os.listdir(rdir):
        if name in (LOCK,):
            continue
        p = os.path.join(rdir, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def log_tail(path: str, n: int = 15) -> str:
    """The last ``n`` lines of a run's log (each cut to 300 characters), "" when unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 20000))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(line[-300:] for line in lines[-n:])
