"""The study: a grid of trainings (alignment level p, random-alignment ablation, training data ratio) x seeds.

Every (setting, seed) is one *run*: a subprocess of the training job (configs/train.yaml) with its own folder
``<study>/runs/<run_id>/``, its own MLflow child run (nested under one parent run per study) and a ``DONE``
marker written atomically after success. Rerunning skips finished runs and redoes the others (the training's own
checkpoint resume continues an interrupted one). ``workers`` runs several at once on one machine; ``shard`` and the
per-run file locks spread a study over machines that share the study folder and an MLflow server.

    cfg = load_study_config("configs/study.yaml", profile="quick")
    result = run_study(cfg, workers=2)          # then bundle.report.make_report(cfg.study_dir)

See docs/study.md.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import yaml

from bundle.utils.atomic import write_text_atomic

logger = logging.getLogger("bundle.study")

__all__ = [
    "BUNDLE_ROOT", "GROUPS", "Setting", "RunSpec", "StudyConfig", "StudyResult", "load_study_config",
    "build_settings", "expand_runs", "select_runs", "run_status", "train_command", "ensure_parent_run",
    "run_study", "parse_shard", "format_duration", "write_json_atomic", "read_json",
]

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("alignment", "random", "data_ratio")
# keys the study sets for every run: a profile must not set them in train_overrides
RESERVED_TRAIN_KEYS = ("alignment_fraction", "random_alignment", "data_ratio", "seed", "output_dir",
                       "best_model_path", "tracking_uri", "experiment_name", "run_name", "mlflow_parent_run_id",
                       "mlflow_tags")
STUDY_KEYS = ("name", "output_root", "train_config", "train_command", "experiment_name", "tracking_uri", "seeds",
              "grid", "train_overrides", "report", "profiles", "default_profile", "description")
GRID_KEYS = ("groups", "alignment_fractions", "random_alignment_fractions", "data_ratios", "data_ratio_fractions")
DEFAULT_GRID = {
    "groups": list(GROUPS),
    "alignment_fractions": [0.0, 0.25, 0.5, 0.75, 1.0],
    "random_alignment_fractions": [1.0],
    "data_ratios": [0.25, 0.5, 0.75, 1.0],
    "data_ratio_fractions": [0.0, 1.0],
}
DEFAULT_COMMAND = ["{python}", "-m", "monai.bundle", "run", "training", "--config_file", "{config_file}"]
DONE, FAILED, SETTING, LOCK, LOG = "DONE", "FAILED", "setting.json", ".lock", "train.log"
PARENT_FILE = "mlflow_parent.json"
CONFIG_FILE = "study_config.json"


# ================================================================================================ small helpers
def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str), fsync=True)


def read_json(path: str):
    """The JSON in ``path``, or None when missing or unreadable (a half-written file cannot exist: atomic writes)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


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


def _fire_value(v) -> str:
    """A value as `python -m monai.bundle run` (python-fire) will parse it back to the same Python object."""
    if isinstance(v, str):
        try:
            parsed = ast.literal_eval(v)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return v
        return v if isinstance(parsed, str) and parsed == v else repr(v)  # "1", "True", "None" stay strings
    if isinstance(v, dict | list):
        try:  # JSON reads better on a command line than repr's quotes, and fire parses both the same way
            j = json.dumps(v)
            if ast.literal_eval(j) == v:
                return j
        except (TypeError, ValueError, SyntaxError):
            pass
    return repr(v)


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _fmt(x: float) -> str:
    return f"{float(x):.2f}"


# ================================================================================================ the grid
@dataclass(frozen=True)
class Setting:
    """One training configuration of the grid; ``groups`` lists the parts of the study it belongs to."""

    alignment_fraction: float
    random_alignment: bool = False
    data_ratio: float = 1.0
    groups: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        p = f"p{_fmt(self.alignment_fraction)}"
        if self.random_alignment:
            return f"random_{p}" + (f"_ratio{_fmt(self.data_ratio)}" if self.data_ratio != 1.0 else "")
        return f"ratio{_fmt(self.data_ratio)}_{p}" if self.data_ratio != 1.0 else p

    def fields(self) -> dict:
        return {"setting": self.id, "alignment_fraction": self.alignment_fraction,
                "random_alignment": self.random_alignment, "data_ratio": self.data_ratio, "groups": list(self.groups)}


@dataclass(frozen=True)
class RunSpec:
    setting: Setting
    seed: int
    index: int  # position in the study's fixed run order (sharding uses it)

    @property
    def run_id(self) -> str:
        return f"{self.setting.id}_seed{self.seed}"

    def fields(self) -> dict:
        return {"run_id": self.run_id, "seed": self.seed, **self.setting.fields()}


def _floats(grid: Mapping, key: str, lo: float, hi: float, where: str) -> list[float]:
    vals = grid.get(key)
    if not isinstance(vals, list | tuple) or not vals:
        raise ValueError(f"{where}: grid.{key} must be a non-empty list of numbers, got {vals!r}")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= float(v) <= hi:
            raise ValueError(f"{where}: grid.{key} has {v!r}; each value must be a number in [{lo}, {hi}]")
        out.append(float(v))
    return out


def build_settings(grid: Mapping, where: str = "study config") -> list[Setting]:
    """The settings of the grid, each once (e.g. data ratio 1 at p = 0 *is* the p = 0 setting), in a fixed order.

    groups: ``alignment`` (p over alignment_fractions, human masks, all data), ``random`` (random shapes at each p of
    random_alignment_fractions), ``data_ratio`` (each ratio of data_ratios at each p of data_ratio_fractions).
    """
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown grid key(s) {unknown}; valid: {list(GRID_KEYS)}")
    groups = list(grid.get("groups", GROUPS))
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise ValueError(f"{where}: grid.groups has {bad or groups!r}; choose from {list(GROUPS)}")
    found: dict[tuple, list[str]] = {}

    def add(p, rnd, ratio, group):
        found.setdefault((p, rnd, ratio), [])
        if group not in found[(p, rnd, ratio)]:
            found[(p, rnd, ratio)].append(group)

    if "alignment" in groups:
        for p in _floats(grid, "alignment_fractions", 0, 1, where):
            add(p, False, 1.0, "alignment")
    if "random" in groups:
        for p in _floats(grid, "random_alignment_fractions", 0, 1, where):
            if p == 0:
                raise ValueError(f"{where}: grid.random_alignment_fractions contains 0; random alignment at p = 0 "
                                 "is the baseline (no masks used); use values > 0, e.g. [1.0]")
            add(p, True, 1.0, "random")
    if "data_ratio" in groups:
        for r in _floats(grid, "data_ratios", 0, 1, where):
            if r == 0:
                raise ValueError(f"{where}: grid.data_ratios contains 0; a ratio must be > 0, e.g. [0.25, 0.5, 1.0]")
            for p in _floats(grid, "data_ratio_fractions", 0, 1, where):
                add(p, False, r, "data_ratio")
    return [Setting(p, rnd, r, tuple(g)) for (p, rnd, r), g in found.items()]


def expand_runs(settings: Sequence[Setting], seeds: Sequence[int]) -> list[RunSpec]:
    """Seed-major order: every setting with seed 0 first, so an early report already covers the whole grid."""
    runs, k = [], 0
    for seed in seeds:
        for s in settings:
            runs.append(RunSpec(s, int(seed), k))
            k += 1
    return runs


def select_runs(runs: Sequence[RunSpec], shard: tuple[int, int] | None = None,
                only: Sequence[str] | None = None) -> list[RunSpec]:
    """This machine's share (``shard`` = (i, n): runs whose position % n == i - 1) matching any ``only`` glob."""
    out = list(runs)
    if shard:
        i, n = shard
        out = [r for r in out if r.index % n == i - 1]
    if only:
        out = [r for r in out if any(fnmatch.fnmatchcase(r.run_id, pat) or fnmatch.fnmatchcase(r.setting.id, pat)
                                     for pat in only)]
    return out


# ================================================================================================ the config
@dataclass
class StudyConfig:
    name: str
    study_dir: str
    profile: str
    train_config: list[str]
    train_command: list[str]
    seeds: list[int]
    grid: dict
    train_overrides: dict
    experiment_name: str
    tracking_uri: str
    report: dict
    source: str = ""
    description: str = ""
    settings: list[Setting] = field(default_factory=list)

    @property
    def runs(self) -> list[RunSpec]:
        return expand_runs(self.settings, self.seeds)

    def run_dir(self, spec: RunSpec) -> str:
        return os.path.join(self.study_dir, "runs", spec.run_id)

    def to_dict(self) -> dict:
        return {"name": self.name, "study_dir": self.study_dir, "profile": self.profile,
                "train_config": self.train_config, "train_command": self.train_command, "seeds": self.seeds,
                "grid": self.grid, "train_overrides": self.train_overrides, "experiment_name": self.experiment_name,
                "tracking_uri": self.tracking_uri, "report": self.report, "source": self.source,
                "description": self.description, "settings": [s.fields() for s in self.settings]}


def _abs(path: str, base: str) -> str:
    path = os.path.expanduser(str(path))
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value


def load_study_config(path: str = os.path.join(BUNDLE_ROOT, "configs", "study.yaml"), profile: str | None = None,
                      overrides: Mapping | None = None, train_overrides: Mapping | None = None,
                      name: str | None = None, study_dir: str | None = None,
                      tracking_uri: str | None = None) -> StudyConfig:
    """Read the study YAML, apply a profile (deep-merged over the top level), then ``overrides`` (dotted keys, e.g.
    ``{"seeds": [0, 1], "grid.groups": ["alignment"]}``) and ``train_overrides`` (train.yaml keys).

    Relative paths in the YAML (``output_root``, ``train_config``) are relative to the bundle root. The study folder
    is ``<output_root>/<name>`` unless ``study_dir`` is given. Tracking: ``tracking_uri`` argument, else the YAML's,
    else ``MLFLOW_TRACKING_URI``, else SQLite in the study folder.
    """
    where = os.path.abspath(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"study config {where} not found; pass --config configs/study.yaml (the default) "
                                "or the path of your own copy") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of study keys at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {list(STUDY_KEYS)}")
    profiles = raw.get("profiles") or {}
    profile = profile or raw.get("default_profile") or "default"
    if profile not in profiles and profile != "default":
        raise ValueError(f"{where}: profile {profile!r} is not defined under `profiles`; choose one of "
                         f"{sorted(profiles)} or add it to the file")
    prof = profiles.get(profile) or {}
    bad = sorted(set(prof) - set(STUDY_KEYS) - {"profiles", "default_profile"})
    if bad:
        raise ValueError(f"{where}: profiles.{profile} has unknown key(s) {bad}; valid: {list(STUDY_KEYS)}")
    cfg = _deep_merge({k: v for k, v in raw.items() if k not in ("profiles", "default_profile")}, prof)
    for k, v in (overrides or {}).items():
        _set_dotted(cfg, k, v)
    cfg["train_overrides"] = _deep_merge(cfg.get("train_overrides") or {}, train_overrides or {})
    where_p = f"{where} (profile {profile})"

    nm = name or cfg.get("name") or f"study_{profile}"
    if not isinstance(nm, str) or not nm or any(c in nm for c in "/\\ ") or nm.startswith("."):
        raise ValueError(f"{where_p}: name {nm!r} must be a plain folder name (no slashes or spaces), e.g. quick")
    root = _abs(cfg.get("output_root") or "results", BUNDLE_ROOT)
    sdir = os.path.abspath(study_dir) if study_dir else os.path.join(root, nm)
    tc = cfg.get("train_config") or ["configs/train.yaml"]
    tc = [tc] if isinstance(tc, str) else list(tc)
    tc = [_abs(p, BUNDLE_ROOT) for p in tc]
    for p in tc:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{where_p}: train_config {p} does not exist; list training YAMLs relative to "
                                    "the bundle root, e.g. [configs/train.yaml, configs/paper.yaml]")
    cmd = cfg.get("train_command") or DEFAULT_COMMAND
    if not isinstance(cmd, list | tuple) or not all(isinstance(c, str) for c in cmd):
        raise ValueError(f"{where_p}: train_command must be a list of strings (placeholders {{python}}, "
                         f"{{config_file}}, {{bundle_root}}), got {cmd!r}")
    seeds = cfg.get("seeds", [0, 1, 2, 3, 4])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list | tuple) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                   for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"{where_p}: seeds must be a count (e.g. 5 = seeds 0..4) or a list of distinct integers, "
                         f"got {seeds!r}")
    grid = _deep_merge(DEFAULT_GRID, cfg.get("grid") or {})
    settings = build_settings(grid, where_p)
    tov = cfg["train_overrides"]
    if not isinstance(tov, dict):
        raise ValueError(f"{where_p}: train_overrides must be a mapping of train.yaml keys, got {tov!r}")
    clash = sorted(set(tov) & set(RESERVED_TRAIN_KEYS))
    if clash:
        raise ValueError(f"{where_p}: train_overrides sets {clash}, which the study sets per run; change the grid "
                         "(grid.*, seeds) or the study options (--tracking-uri, experiment_name) instead")
    uri = tracking_uri or cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or _sqlite_uri(sdir)
    report = _deep_merge({"control_split": "test_ood", "best_p_by": "test/mean_auc", "attributes": ["sex", "age"],
                          "fig_gap_metric": "auc"}, cfg.get("report") or {})
    return StudyConfig(
        name=nm, study_dir=sdir, profile=profile, train_config=tc, train_command=list(cmd), seeds=list(seeds),
        grid=grid, train_overrides=dict(tov), experiment_name=cfg.get("experiment_name") or f"cxr_aligner_study_{nm}",
        tracking_uri=uri, report=report, source=where, description=str(cfg.get("description") or ""),
        settings=settings)


def _sqlite_uri(study_dir: str) -> str:
    return "sqlite:///" + os.path.join(os.path.abspath(study_dir), "mlruns.db")


# ================================================================================================ one run
def fingerprint(cfg: StudyConfig, spec: RunSpec, datalist_file: str | None) -> str:
    """What makes a run's result: configs, command, overrides, data. Output and tracking locations do not count."""
    key = {"train_config": [os.path.relpath(p, BUNDLE_ROOT) for p in cfg.train_config],
           "train_command": cfg.train_command, "overrides": cfg.train_overrides, "seed": spec.seed,
           "setting": [spec.setting.alignment_fraction, spec.setting.random_alignment, spec.setting.data_ratio],
           "datalist_file": datalist_file}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_command(cfg: StudyConfig, spec: RunSpec, datalist_file: str | None = None,
                  parent_run_id: str | None = None) -> list[str]:
    """The command line of one run (the training job with the run's setting, folders and MLflow nesting)."""
    rdir = cfg.run_dir(spec)
    cf = cfg.train_config[0] if len(cfg.train_config) == 1 else repr(cfg.train_config)
    subst = {"python": sys.executable, "config_file": cf, "bundle_root": BUNDLE_ROOT}
    cmd = [c.format(**subst) for c in cfg.train_command]
    tags = {"study": cfg.name, "profile": cfg.profile, "run_id": spec.run_id, "setting": spec.setting.id,
            "alignment_fraction": spec.setting.alignment_fraction,
            "random_alignment": spec.setting.random_alignment, "data_ratio": spec.setting.data_ratio,
            "seed": spec.seed, "groups": ",".join(spec.setting.groups)}
    args = {
        "alignment_fraction": spec.setting.alignment_fraction,
        "random_alignment": spec.setting.random_alignment,
        "data_ratio": spec.setting.data_ratio,
        "seed": spec.seed,
        "output_dir": os.path.join(rdir, "eval"),
        "best_model_path": os.path.join(rdir, "model.pt"),
        "tracking_uri": cfg.tracking_uri,
        "experiment_name": cfg.experiment_name,
        "run_name": spec.run_id,
        "mlflow_tags": {k: str(v) for k, v in tags.items()},
    }
    if parent_run_id:
        args["mlflow_parent_run_id"] = parent_run_id
    if datalist_file:
        args["datalist_file"] = datalist_file
    args.update({k: v for k, v in cfg.train_overrides.items() if not (k == "datalist_file" and datalist_file)})
    for k, v in args.items():
        cmd += [f"--{k}", _fire_value(v)]
    return cmd


def _expects_summary(cfg: StudyConfig) -> bool:
    v = cfg.train_overrides.get("final_evaluation", True)
    return str(v).strip().lower() not in ("false", "0", "no", "off", "$false")


def summary_path(cfg: StudyConfig, spec: RunSpec) -> str:
    return os.path.join(cfg.run_dir(spec), "eval", "report", "summary.json")


@contextmanager
def _try_lock(path: str):
    """An exclusive, non-blocking flock on ``path``: yields the open fd, or None when another process holds it.

    flock locks live as long as any process holds the fd: the training child inherits it (pass_fds), so an orphaned
    child keeps its run locked even if the runner is killed. NFS clients emulate flock with POSIX locks.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _wait_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def run_status(cfg: StudyConfig, spec: RunSpec, fp: str | None = None) -> str:
    """done | stale (done with another configuration) | running (locked by another process) | failed (last attempt
    crashed) | partial (started, will resume) | pending."""
    rdir = cfg.run_dir(spec)
    done = read_json(os.path.join(rdir, DONE))
    if done is not None:
        return "stale" if fp and done.get("fingerprint") not in (None, fp) else "done"
    if not os.path.isdir(rdir):
        return "pending"
    with _try_lock(os.path.join(rdir, LOCK)) as fd:
        if fd is None:
            return "running"
    if os.path.exists(os.path.join(rdir, FAILED)):
        return "failed"
    return "partial" if os.path.exists(os.path.join(rdir, SETTING)) else "pending"


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 20000))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(line[-300:] for line in lines[-n:])


# ================================================================================================ MLflow
def _mlflow_reachable(uri: str, timeout: float = 3.0) -> bool:
    """An http(s) server answers /health within ``timeout`` (MLflow's own client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
        return True
    except Exception:
        return False


def _flat_params(d: Mapping, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, default=str)[:6000] if not isinstance(v, str) else v[:6000]
    return out


def ensure_parent_run(cfg: StudyConfig, log: Callable[[str], None] = print) -> str | None:
    """The study's parent MLflow run id (created once, recorded in ``<study>/mlflow_parent.json``, reused and reopened
    by later invocations and other machines). None (with a warning) when MLflow is unavailable: runs still train."""
    os.makedirs(cfg.study_dir, exist_ok=True)
    rec_path = os.path.join(cfg.study_dir, PARENT_FILE)
    if not _mlflow_reachable(cfg.tracking_uri):
        log(f"WARNING: MLflow server {cfg.tracking_uri} is unreachable: no parent run; each run falls back to its "
            "own store")
        return None
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        with _wait_lock(os.path.join(cfg.study_dir, ".parent.lock")):  # two machines starting at once: one parent
            rec = read_json(rec_path) or {}
            if rec.get("tracking_uri") == cfg.tracking_uri and rec.get("run_id"):
                try:
                    run = client.get_run(rec["run_id"])
                    if run.info.lifecycle_stage == "active":
                        if run.info.status != "RUNNING":
                            client.update_run(run.info.run_id, status="RUNNING")
                        _log_config_artifact(client, run.info.run_id, cfg)
                        return run.info.run_id
                except Exception as e:  # deleted or from another store: make a new one
                    log(f"WARNING: recorded parent run {rec['run_id']} not usable ({type(e).__name__}); creating one")
            exp = client.get_experiment_by_name(cfg.experiment_name)
            if exp is None:
                art = None
                if cfg.tracking_uri.startswith("sqlite:///"):  # keep artifacts next to the SQLite store
                    art = os.path.join(os.path.dirname(cfg.tracking_uri[len("sqlite:///"):]), "mlruns")
                exp_id = client.create_experiment(cfg.experiment_name, artifact_location=art)
            else:
                exp_id = exp.experiment_id
            run = client.create_run(exp_id, run_name=cfg.name, tags={
                "study": cfg.name, "profile": cfg.profile, "role": "study_parent",
                "mlflow.note.content": cfg.description or f"study {cfg.name} (profile {cfg.profile})"})
            params = _flat_params({"profile": cfg.profile, "seeds": cfg.seeds, "grid": cfg.grid,
                                   "train_config": [os.path.relpath(p, BUNDLE_ROOT) for p in cfg.train_config],
                                   "train_overrides": cfg.train_overrides, "n_settings": len(cfg.settings),
                                   "n_runs": len(cfg.runs)})
            # MLflow keys allow alphanumerics and _-. :/ only ("network_def#vit_layers" -> "network_def_vit_layers")
            items = [Param(re.sub(r"[^A-Za-z0-9_\-. :/]", "_", k)[:250], v) for k, v in params.items()]
            try:
                for i in range(0, len(items), 100):
                    client.log_batch(run.info.run_id, params=items[i:i + 100])
                _log_config_artifact(client, run.info.run_id, cfg)
            except Exception as e:  # the parent is still usable for nesting
                log(f"WARNING: could not log the study config to the parent run ({type(e).__name__}: {e})")
            write_json_atomic(rec_path, {"run_id": run.info.run_id, "experiment_id": exp_id,
                                         "tracking_uri": cfg.tracking_uri, "created": time.strftime("%FT%T")})
            return run.info.run_id
    except Exception as e:  # tracking must never stop the study
        log(f"WARNING: MLflow parent run not available ({type(e).__name__}: {e}); runs are not nested")
        return None


def _log_config_artifact(client, run_id: str, cfg: StudyConfig) -> None:
    path = os.path.join(cfg.study_dir, CONFIG_FILE)
    write_json_atomic(path, cfg.to_dict())
    client.log_artifact(run_id, path)


def finish_parent_run(cfg: StudyConfig, run_id: str | None, status: str, log: Callable[[str], None] = print) -> None:
    if not run_id or not _mlflow_reachable(cfg.tracking_uri):
        return
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=cfg.tracking_uri).set_terminated(run_id, status)
    except Exception as e:
        log(f"WARNING: could not set the parent run's status ({type(e).__name__}: {e})")


def _delete_child_runs(cfg: StudyConfig, parent_run_id: str | None, run_name: str, log) -> None:
    """Redoing a stale run: remove its old MLflow child run(s) so the study shows one run per id."""
    if not parent_run_id or not _mlflow_reachable(cfg.tracking_uri):
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        exp = client.get_experiment_by_name(cfg.experiment_name)
        if exp is None:
            return
        for r in client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
                                    f" and attributes.run_name = '{run_name}'"):
            client.delete_run(r.info.run_id)
    except Exception as e:
        log(f"WARNING: could not delete the old MLflow run of {run_name} ({type(e).__name__}: {e})")


# ================================================================================================ the runner
def resolve_datalist(cfg: StudyConfig) -> str:
    """The datalist every run uses, prepared once here (the built-in synthetic benchmark is generated on first use)
    instead of by each run: fails early, and the path and digest become part of each run's fingerprint."""
    dl = cfg.train_overrides.get("datalist_file")
    if isinstance(dl, str) and not dl.startswith("$"):
        path = _abs(dl, BUNDLE_ROOT)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{cfg.source}: train_overrides.datalist_file {path} does not exist; give the "
                                    "path of a datalist JSON (docs/datalist.md)")
        return path
    if BUNDLE_ROOT not in sys.path:
        sys.path.insert(0, BUNDLE_ROOT)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(cfg.train_config)
    parser.update({"bundle_root": BUNDLE_ROOT, **cfg.train_overrides})
    with contextlib.chdir(BUNDLE_ROOT):  # relative paths in overrides mean what they mean to the runs (cwd = root)
        return os.path.abspath(parser.get_parsed_content("datalist_file"))


@dataclass
class StudyResult:
    study_dir: str
    selected: list[str]
    done: list[str] = field(default_factory=list)         # finished now or before
    finished_now: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped_busy: list[str] = field(default_factory=list)  # locked by another worker/machine
    stale: list[str] = field(default_factory=list)
    interrupted: bool = False
    parent_run_id: str | None = None
    report_dir: str | None = None
    statuses: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


class _Runner:
    def __init__(self, cfg: StudyConfig, specs: list[RunSpec], workers: int, threads: int, env: Mapping,
                 datalist_file: str | None, parent_run_id: str | None, gpus: Sequence[str] | None,
                 redo_stale: bool, log: Callable[[str], None], total: int, prior_durations: list[float]):
        self.cfg, self.specs, self.workers, self.threads = cfg, specs, workers, threads
        self.env, self.datalist, self.parent = dict(env), datalist_file, parent_run_id
        self.gpus, self.redo_stale, self.log = list(gpus or []), redo_stale, log
        self.queue = list(specs)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.procs: dict[str, subprocess.Popen] = {}
        self.durations = list(prior_durations)
        self.finished, self.failed, self.busy = [], [], []
        self.total, self.n_done_before = total, 0
        self.t0 = time.time()

    def _next(self) -> RunSpec | None:
        with self.lock:
            return self.queue.pop(0) if self.queue and not self.stop.is_set() else None

    def worker(self, slot: int) -> None:
        while (spec := self._next()) is not None:
            try:
                self.run_one(spec, slot)
            except Exception as e:  # a runner bug for one run must not end the study
                with self.lock:
                    self.failed.append(spec.run_id)
                self.log(f"ERROR {spec.run_id}: {type(e).__name__}: {e}")

    def run_one(self, spec: RunSpec, slot: int) -> None:
        cfg = self.cfg
        rdir = cfg.run_dir(spec)
        fp = fingerprint(cfg, spec, self.datalist)
        os.makedirs(rdir, exist_ok=True)
        with _try_lock(os.path.join(rdir, LOCK)) as fd:
            if fd is None:
                with self.lock:
                    self.busy.append(spec.run_id)
                self.log(f"skip {spec.run_id}: another worker or machine is running it")
                return
            done = read_json(os.path.join(rdir, DONE))
            if done is not None:
                if done.get("fingerprint") in (None, fp) or not self.redo_stale:
                    return  # finished meanwhile by another machine (or stale, kept)
                self.log(f"redo {spec.run_id}: finished with another configuration (--redo-stale)")
                _delete_child_runs(cfg, self.parent, spec.run_id, self.log)
                self._wipe(rdir)
            prev = read_json(os.path.join(rdir, SETTING))
            if prev is not None and prev.get("fingerprint") != fp:
                self.log(f"restart {spec.run_id}: its unfinished attempt used another configuration")
                self._wipe(rdir)
            cmd = train_command(cfg, spec, self.datalist, self.parent)
            write_json_atomic(os.path.join(rdir, SETTING), {**spec.fields(), "fingerprint": fp, "command": cmd,
                                                            "study": cfg.name, "profile": cfg.profile})
            if os.path.exists(os.path.join(rdir, FAILED)):
                os.remove(os.path.join(rdir, FAILED))
            env = {**self.env, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
                   "MLFLOW_TRACKING_URI": cfg.tracking_uri}
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
            t0 = time.time()
            with open(os.path.join(rdir, LOG), "ab") as logf:
                logf.write(f"\n===== {time.strftime('%F %T')} on {socket.gethostname()}: {shlex.join(cmd)}\n"
                           .encode())
                logf.flush()
                try:
                    proc = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, pass_fds=(fd,))
                except OSError as e:
                    rc, proc = f"could not start ({e})", None
                if proc is not None:
                    with self.lock:
                        self.procs[spec.run_id] = proc
                    rc = proc.wait()
                    with self.lock:
                        self.procs.pop(spec.run_id, None)
            elapsed = time.time() - t0
            if self.stop.is_set() or rc in (-signal.SIGINT, 130, -signal.SIGTERM, 143):
                self.log(f"interrupted {spec.run_id} after {format_duration(elapsed)}: resumes next time")
                return  # Ctrl-C / SIGTERM: unfinished, not failed; the training resumes from its last checkpoint
            summ = summary_path(cfg, spec)
            if rc == 0 and (not _expects_summary(cfg) or os.path.isfile(summ)):
                write_json_atomic(os.path.join(rdir, DONE), {
                    **spec.fields(), "fingerprint": fp, "elapsed_s": round(elapsed, 1), "host": socket.gethostname(),
                    "finished": time.strftime("%FT%T"), "summary": os.path.relpath(summ, rdir)})
                with self.lock:
                    self.finished.append(spec.run_id)
                    self.durations.append(elapsed)
                self._progress(spec, elapsed)
            else:
                why = f"exit code {rc}" if rc != 0 else f"exit code 0 but no {os.path.relpath(summ, rdir)}"
                write_json_atomic(os.path.join(rdir, FAILED), {"returncode": rc if isinstance(rc, int) else None,
                                                               "why": why, "at": time.strftime("%FT%T"),
                                                               "host": socket.gethostname()})
                with self.lock:
                    self.failed.append(spec.run_id)
                self.log(f"FAILED {spec.run_id} after {format_duration(elapsed)} ({why}); log: "
                         f"{os.path.join(rdir, LOG)}\n    " + _tail(os.path.join(rdir, LOG)).replace("\n", "\n    "))

    @staticmethod
    def _wipe(rdir: str) -> None:
        for name in os.listdir(rdir):
            if name in (LOCK,):
                continue
            p = os.path.join(rdir, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)

    def _progress(self, spec: RunSpec, elapsed: float) -> None:
        with self.lock:
            n_fin, n_fail = len(self.finished), len(self.failed)
            left = len(self.queue) + len(self.procs)
            mean = sum(self.durations) / len(self.durations) if self.durations else None
        done_total = self.n_done_before + n_fin
        eta = mean * left / max(1, min(self.workers, left)) if mean is not None and left else 0.0
        self.log(f"[{done_total}/{self.total}] {spec.run_id} done in {format_duration(elapsed)} | this invocation: "
                 f"{n_fin} done, {n_fail} failed, {left} to go | elapsed {format_duration(time.time() - self.t0)}, "
                 f"ETA {format_duration(eta)}")

    def terminate(self, grace: float = 20.0) -> None:
        self.stop.set()
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # lets the training stop like Ctrl-C (checkpoint from last epoch kept)
        deadline = time.time() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()


def run_study(cfg: StudyConfig, workers: int = 1, shard: tuple[int, int] | None = None,
              only: Sequence[str] | None = None, dry_run: bool = False, report: bool = True,
              redo_stale: bool = False, threads: int | None = None, gpus: Sequence[str] | None = None,
              log: Callable[[str], None] | None = None, env: Mapping | None = None) -> StudyResult:
    """Train (and evaluate) every unfinished run of the study (this shard's share, matching ``only``).

    ``workers`` subprocesses at a time, each with ``threads`` CPU threads (default: cores // workers). A failing run is
    reported and left for the next invocation; Ctrl-C / SIGTERM stops the children (they resume next time).
    ``dry_run`` only reports each run's status. At the end (unless ``report`` is False) the report is written,
    for a shard only once the whole study is finished.
    """
    log = log or (lambda s: print(s, flush=True))
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    all_runs = cfg.runs
    specs = select_runs(all_runs, shard, only)
    if only and not specs:
        raise ValueError(f"--only {list(only)} matches no run of study {cfg.name}; run ids look like "
                         f"{all_runs[0].run_id!r} (try --dry-run)")
    res = StudyResult(cfg.study_dir, [s.run_id for s in specs])
    # fingerprints need the datalist path; a dry run does not prepare data, so it uses the recorded one
    datalist = None if dry_run else resolve_datalist(cfg)
    if dry_run:
        datalist = (read_json(os.path.join(cfg.study_dir, CONFIG_FILE)) or {}).get("datalist_file")
    statuses = {s.run_id: run_status(cfg, s, fingerprint(cfg, s, datalist) if datalist else None) for s in specs}
    res.statuses = statuses
    res.stale = [k for k, v in statuses.items() if v == "stale"]
    res.done = [k for k, v in statuses.items() if v in ("done", "stale")]
    if dry_run:
        _print_plan(cfg, specs, statuses, shard, datalist, log)
        return res
    os.makedirs(cfg.study_dir, exist_ok=True)
    threads = threads or max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else os.cpu_count() or 1) // workers)
    todo = [s for s in specs if statuses[s.run_id] not in ("done",) and not (statuses[s.run_id] == "stale"
                                                                               and not redo_stale)]
    if res.stale and not redo_stale:
        log(f"WARNING: {len(res.stale)} finished run(s) were made with another configuration and are kept: "
            f"{', '.join(res.stale[:6])}{' ...' if len(res.stale) > 6 else ''}. Use --redo-stale to redo them or "
            "--name to start a new study.")
    parent = ensure_parent_run(cfg, log)
    res.parent_run_id = parent
    rec = {**cfg.to_dict(), "datalist_file": datalist, "parent_run_id": parent}
    write_json_atomic(os.path.join(cfg.study_dir, CONFIG_FILE), rec)
    prior = [d["elapsed_s"] for s in specs if (d := read_json(os.path.join(cfg.run_dir(s), DONE)))
             and isinstance(d.get("elapsed_s"), int | float)]
    log(f"study {cfg.name} (profile {cfg.profile}): {len(all_runs)} runs in all, {len(specs)} selected"
        f"{f' (shard {shard[0]}/{shard[1]})' if shard else ''}, {len(res.done)} finished, {len(todo)} to run with "
        f"{workers} worker(s) x {threads} thread(s); folder {cfg.study_dir}; MLflow {cfg.tracking_uri}")
    runner = _Runner(cfg, todo, workers, threads, env if env is not None else os.environ, datalist, parent, gpus,
                     redo_stale, log, len(specs), prior)
    runner.n_done_before = len(specs) - len(todo)
    pool = [threading.Thread(target=runner.worker, args=(k,), daemon=True) for k in range(min(workers, len(todo)))]
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum, frame):
            raise KeyboardInterrupt
        old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        for t in pool:
            t.start()
        while any(t.is_alive() for t in pool):
            for t in pool:
                t.join(0.2)
    except KeyboardInterrupt:
        res.interrupted = True
        log("interrupted: stopping the running trainings (they resume from their last checkpoint next time)")
        runner.terminate()
        for t in pool:
            t.join(5)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    res.finished_now, res.failed, res.skipped_busy = runner.finished, runner.failed, runner.busy
    res.done = sorted(set(res.done) | set(runner.finished))
    all_done = all(run_status(cfg, s) in ("done", "stale") for s in all_runs)
    if res.failed or res.interrupted:
        finish_parent_run(cfg, parent, "FAILED" if res.failed else "KILLED", log)
    elif all_done:
        finish_parent_run(cfg, parent, "FINISHED", log)
    log(f"study {cfg.name}: {len(res.done)}/{len(specs)} selected runs finished"
        + (f", {len(res.failed)} FAILED ({', '.join(res.failed)}): run the same command again to retry them"
           if res.failed else "")
        + (f", {len(res.skipped_busy)} left to other workers" if res.skipped_busy else "")
        + (" (interrupted)" if res.interrupted else ""))
    if report and not res.interrupted and (all_done or not shard):
        try:
            from bundle.report import make_report

            out = make_report(cfg.study_dir, log=log)
            res.report_dir = out["report_dir"]
            log(f"report: {os.path.join(res.report_dir, 'results.md')}")
        except Exception as e:  # the runs are safe on disk; the report can be redone with scripts/report.py
            log(f"WARNING: the report failed ({type(e).__name__}: {e}); rerun: python scripts/report.py "
                f"{cfg.study_dir}")
    return res


def _print_plan(cfg: StudyConfig, specs: Sequence[RunSpec], statuses: Mapping[str, str],
                shard, datalist: str | None, log) -> None:
    log(f"study {cfg.name} (profile {cfg.profile}) in {cfg.study_dir}")
    log(f"  {len(cfg.settings)} settings x {len(cfg.seeds)} seeds = {len(cfg.runs)} runs; selected {len(specs)}"
        + (f" (shard {shard[0]}/{shard[1]})" if shard else ""))
    log(f"  MLflow: {cfg.tracking_uri} (experiment {cfg.experiment_name})")
    for s in specs:
        log(f"  {statuses[s.run_id]:<8} {s.run_id:<28} groups={','.join(s.setting.groups)}")
    counts: dict[str, int] = {}
    for v in statuses.values():
        counts[v] = counts.get(v, 0) + 1
    log("  " + ", ".join(f"{v}: {k}" for k, v in sorted(counts.items())))
    pending = [s for s in specs if statuses[s.run_id] not in ("done", "stale")]
    if pending:
        log("  command of the first run to do:\n    " + shlex.join(train_command(cfg, pending[0], datalist)))


def parse_assignments(items: Iterable[str], what: str) -> dict:
    """['a.b=1', 'x=[0, 1]'] -> {'a.b': 1, 'x': [0, 1]} (values parsed as YAML)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} {item!r}: write it as KEY=VALUE, e.g. {what} max_epochs=3")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out
