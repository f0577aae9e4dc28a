"""The study configuration: configs/study.yaml, its profiles and overrides -> :class:`StudyConfig`; the report's
options and their defaults (:class:`ReportOptions`, defined here once: the runner records them, the report reads them).

    cfg = load_study_config("configs/study.yaml", profile="quick", train_overrides={"max_epochs": 3})
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import yaml

from bundle.study.grid import DEFAULT_GRID, RunSpec, Setting, build_settings, expand_runs
from bundle.study.layout import BUNDLE_ROOT

__all__ = [
    "DEFAULT_STUDY_YAML",
    "RESERVED_TRAIN_KEYS",
    "STUDY_KEYS",
    "DEFAULT_COMMAND",
    "ReportOptions",
    "RayOptions",
    "EXECUTORS",
    "StudyConfig",
    "load_study_config",
    "deep_merge",
    "drop_synthetic_keys",
    "SYNTHETIC_ONLY_KEYS",
    "resolve_path",
]

DEFAULT_STUDY_YAML = os.path.join(BUNDLE_ROOT, "configs", "study.yaml")
# keys the study sets for every run: a profile must not set them in train_overrides
RESERVED_TRAIN_KEYS = (
    "alignment_fraction",
    "random_alignment",
    "data_ratio",
    "seed",
    "output_dir",
    "best_model_path",
    "tracking_uri",
    "experiment_name",
    "run_name",
    "mlflow_parent_run_id",
    "mlflow_tags",
)
STUDY_KEYS = (
    "name",
    "output_root",
    "train_config",
    "train_command",
    "experiment_name",
    "tracking_uri",
    "seeds",
    "grid",
    "train_overrides",
    "report",
    "profiles",
    "default_profile",
    "description",
    "executor",
    "ray",
)
EXECUTORS = ("local", "ray")
DEFAULT_COMMAND = ["{python}", "-m", "monai.bundle", "run", "training", "--config_file", "{config_file}"]


@dataclass(frozen=True)
class ReportOptions:
    """The report's options (the ``report`` section of the study YAML) and their defaults, the only copy of them."""

    control_split: str = "test_ood"  # the split of the positive-control table
    # "best p" of Table 2 = the p > 0 with the highest mean of this split/metric; "validation" is the checkpoint's
    # validation split (eval/report/model_selection.json of each run), as in the paper
    best_p_by: str = "validation/mean_auc"
    # used, with a warning in the report, when a setting lacks best_p_by; "" = no fallback (an error instead)
    best_p_fallback: str = "test/mean_auc"
    ood_splits: tuple[str, ...] = ("test_ood",)  # the out-of-domain splits of the paper's count and Fig. 6
    attributes: tuple[str, ...] = ("sex", "age")  # the attributes of the tables and figures (those found)
    fig_gap_metric: str = "auc"  # the gap on the y axis of Fig. 3
    ceiling: float = (
        0.999  # a finding at or above this AUC (sensitivity, ...) in every seed: that gap is ~0 by construction
    )
    weak_auc: float = 0.6  # a baseline below this mean AUC on a finding barely learned it
    degenerate_sd: float = 1e-3  # scores with a smaller sd over a split's images are constant (degenerate model)

    @classmethod
    def resolve(cls, *layers: Mapping | None) -> ReportOptions:
        """The defaults updated by each mapping in turn (later wins); keys that are not options are ignored."""
        known = {f.name for f in fields(cls)}
        merged: dict = {}
        for layer in layers:
            merged.update({k: v for k, v in (layer or {}).items() if k in known})
        for k in ("attributes", "ood_splits"):
            if k in merged:
                merged[k] = (merged[k],) if isinstance(merged[k], str) else tuple(merged[k])
        return cls(**merged)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attributes"], d["ood_splits"] = list(self.attributes), list(self.ood_splits)
        return d


@dataclass(frozen=True)
class RayOptions:
    """The ``ray`` section of the study YAML (``--executor ray``; docs/study.md), the only copy of its defaults."""

    address: str | None = None  # None: $RAY_ADDRESS, else a new local instance; "local", "auto", host:6379, ray://
    cpus_per_run: float = 1  # num_cpus of each run's task = the training's OMP/MKL threads
    gpus_per_run: float = 0  # num_gpus of each run's task (Ray sets CUDA_VISIBLE_DEVICES; 0.5 = two runs per GPU)
    max_retries: int = 2  # a failed training is retried at most this many times (resuming from its checkpoints)
    num_cpus: int | None = None  # a new local instance only: the CPUs it offers (None: all cores)

    @classmethod
    def resolve(cls, section: Mapping | None, where: str = "study config") -> RayOptions:
        """The defaults updated by ``section``; an unknown key or a bad value is an error naming the field."""
        section = dict(section or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) ray.{unknown}; valid: {known}")
        opts = cls(**section)
        if opts.address is not None and not isinstance(opts.address, str):
            raise ValueError(f"{where}: ray.address must be a string (auto, local, host:6379, ray://host:10001)")
        for k, lo in (("cpus_per_run", 0.0), ("gpus_per_run", 0.0)):
            v = getattr(opts, k)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < lo or (k == "cpus_per_run" and v <= 0):
                raise ValueError(f"{where}: ray.{k} must be a number {'> 0' if k == 'cpus_per_run' else '>= 0'}")
        if isinstance(opts.max_retries, bool) or not isinstance(opts.max_retries, int) or opts.max_retries < 0:
            raise ValueError(f"{where}: ray.max_retries must be an integer >= 0, got {opts.max_retries!r}")
        if opts.num_cpus is not None and (not isinstance(opts.num_cpus, int) or opts.num_cpus < 1):
            raise ValueError(f"{where}: ray.num_cpus must be null or an integer >= 1, got {opts.num_cpus!r}")
        return opts

    def to_dict(self) -> dict:
        return asdict(self)


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
    dropped_train_overrides: dict = field(default_factory=dict)
    description: str = ""
    settings: list[Setting] = field(default_factory=list)
    executor: str = "local"  # how runs are executed; not part of a run's fingerprint (the runs are identical)
    ray: RayOptions = field(default_factory=RayOptions)

    @property
    def runs(self) -> list[RunSpec]:
        return expand_runs(self.settings, self.seeds)

    def run_dir(self, spec: RunSpec) -> str:
        return os.path.join(self.study_dir, "runs", spec.run_id)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "study_dir": self.study_dir,
            "profile": self.profile,
            "train_config": self.train_config,
            "train_command": self.train_command,
            "seeds": self.seeds,
            "grid": self.grid,
            "train_overrides": self.train_overrides,
            "experiment_name": self.experiment_name,
            "tracking_uri": self.tracking_uri,
            "report": self.report,
            "source": self.source,
            "dropped_train_overrides": self.dropped_train_overrides,
            "description": self.description,
            "settings": [s.fields() for s in self.settings],
            "executor": self.executor,
            "ray": self.ray.to_dict(),
        }


def deep_merge(base: dict, over: Mapping) -> dict:
    """``over`` on a copy of ``base``: mappings merged key by key, lists and values replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# train.yaml keys that only feed the built-in synthetic benchmark: meaningless once a datalist_file is given
SYNTHETIC_ONLY_KEYS = ("dataset_dir", "synthetic_params")


def drop_synthetic_keys(profile_tov: Mapping, user_tov: Mapping) -> tuple[dict, dict]:
    """The train overrides of the YAML/profile (``profile_tov``) merged with the user's (``user_tov``), without the
    synthetic benchmark's keys that the YAML/profile set when a ``datalist_file`` (not a ``$`` expression) replaces
    the synthetic datalist. Keys the user set explicitly are kept. Returns (overrides, dropped)."""
    tov = deep_merge(dict(profile_tov or {}), user_tov or {})
    dl = tov.get("datalist_file")
    if not (isinstance(dl, str) and dl and not dl.startswith("$")):
        return tov, {}
    dropped = {k: tov.pop(k) for k in SYNTHETIC_ONLY_KEYS if k in tov and k not in (user_tov or {})}
    return tov, dropped


def resolve_path(path: str, base: str = BUNDLE_ROOT) -> str:
    """``path`` (``~`` expanded) made absolute relative to ``base`` (the bundle root) unless it is absolute."""
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


def _sqlite_uri(study_dir: str) -> str:
    return "sqlite:///" + os.path.join(os.path.abspath(study_dir), "mlruns.db")


def load_study_config(
    path: str = DEFAULT_STUDY_YAML,
    profile: str | None = None,
    overrides: Mapping | None = None,
    train_overrides: Mapping | None = None,
    name: str | None = None,
    study_dir: str | None = None,
    tracking_uri: str | None = None,
) -> StudyConfig:
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
        raise FileNotFoundError(
            f"study config {where} not found; pass --config configs/study.yaml (the default) "
            "or the path of your own copy"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of study keys at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {list(STUDY_KEYS)}")
    profiles = raw.get("profiles") or {}
    profile = profile or raw.get("default_profile") or "default"
    if profile not in profiles and profile != "default":
        raise ValueError(
            f"{where}: profile {profile!r} is not defined under `profiles`; choose one of "
            f"{sorted(profiles)} or add it to the file"
        )
    prof = profiles.get(profile) or {}
    bad = sorted(set(prof) - set(STUDY_KEYS) - {"profiles", "default_profile"})
    if bad:
        raise ValueError(f"{where}: profiles.{profile} has unknown key(s) {bad}; valid: {list(STUDY_KEYS)}")
    cfg = deep_merge({k: v for k, v in raw.items() if k not in ("profiles", "default_profile")}, prof)
    for k, v in (overrides or {}).items():
        _set_dotted(cfg, k, v)
    if not isinstance(cfg.get("train_overrides") or {}, Mapping):
        raise ValueError(
            f"{where}: train_overrides must be a mapping of train.yaml keys, got {cfg['train_overrides']!r}"
        )
    cfg["train_overrides"], dropped = drop_synthetic_keys(cfg.get("train_overrides") or {}, train_overrides or {})
    where_p = f"{where} (profile {profile})"

    nm = name or cfg.get("name") or f"study_{profile}"
    if not isinstance(nm, str) or not nm or any(c in nm for c in "/\\ ") or nm.startswith("."):
        raise ValueError(f"{where_p}: name {nm!r} must be a plain folder name (no slashes or spaces), e.g. quick")
    root = resolve_path(cfg.get("output_root") or "results")
    sdir = os.path.abspath(study_dir) if study_dir else os.path.join(root, nm)
    tc = cfg.get("train_config") or ["configs/train.yaml"]
    tc = [tc] if isinstance(tc, str) else list(tc)
    tc = [resolve_path(p) for p in tc]
    for p in tc:
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{where_p}: train_config {p} does not exist; list training YAMLs relative to "
                "the bundle root, e.g. [configs/train.yaml, configs/paper.yaml]"
            )
    cmd = cfg.get("train_command") or DEFAULT_COMMAND
    if not isinstance(cmd, list | tuple) or not all(isinstance(c, str) for c in cmd):
        raise ValueError(
            f"{where_p}: train_command must be a list of strings (placeholders {{python}}, "
            f"{{config_file}}, {{bundle_root}}), got {cmd!r}"
        )
    seeds = cfg.get("seeds", [0, 1, 2, 3, 4])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if (
        not isinstance(seeds, list | tuple)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(
            f"{where_p}: seeds must be a count (e.g. 5 = seeds 0..4) or a list of distinct integers, got {seeds!r}"
        )
    grid = deep_merge(DEFAULT_GRID, cfg.get("grid") or {})
    settings = build_settings(grid, where_p)
    tov = cfg["train_overrides"]
    if not isinstance(tov, dict):
        raise ValueError(f"{where_p}: train_overrides must be a mapping of train.yaml keys, got {tov!r}")
    clash = sorted(set(tov) & set(RESERVED_TRAIN_KEYS))
    if clash:
        raise ValueError(
            f"{where_p}: train_overrides sets {clash}, which the study sets per run; change the grid "
            "(grid.*, seeds) or the study options (--tracking-uri, experiment_name) instead"
        )
    uri = tracking_uri or cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or _sqlite_uri(sdir)
    executor = cfg.get("executor") or "local"
    if executor not in EXECUTORS:
        raise ValueError(f"{where_p}: executor {executor!r} is not one of {list(EXECUTORS)} (--executor)")
    ray_opts = RayOptions.resolve(cfg.get("ray"), where_p)
    # the recorded report section: every option (the defaults of ReportOptions under the YAML's), unknown keys kept
    report = deep_merge(ReportOptions().to_dict(), cfg.get("report") or {})
    return StudyConfig(
        name=nm,
        study_dir=sdir,
        profile=profile,
        train_config=tc,
        train_command=list(cmd),
        seeds=list(seeds),
        grid=grid,
        train_overrides=dict(tov),
        experiment_name=cfg.get("experiment_name") or f"cxr_aligner_study_{nm}",
        tracking_uri=uri,
        report=report,
        source=where,
        description=str(cfg.get("description") or ""),
        settings=settings,
        dropped_train_overrides=dropped,
        executor=executor,
        ray=ray_opts,
    )
