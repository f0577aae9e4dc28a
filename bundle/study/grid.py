"""The study's grid: settings (alignment level p, random alignment, data ratio), runs (setting x seed), run ids,
this machine's share of them, and the command line of one run.

    build_settings(grid) -> [Setting("p0.00"), ..., Setting("random_p1.00"), Setting("ratio0.25_p0.00"), ...]
    expand_runs(settings, seeds) -> [RunSpec("p0.00_seed0"), ...]       (seed-major: the fixed run order)
    train_command(cfg, spec) -> [python, -m, monai.bundle, run, training, ..., --alignment_fraction, 0.5, ...]
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bundle.study.layout import BUNDLE_ROOT

if TYPE_CHECKING:  # annotations only: config imports this module
    from bundle.study.config import StudyConfig

__all__ = [
    "GROUPS",
    "GRID_KEYS",
    "DEFAULT_GRID",
    "Setting",
    "RunSpec",
    "build_settings",
    "expand_runs",
    "select_runs",
    "fire_value",
    "train_command",
]

GROUPS = ("alignment", "random", "data_ratio")
GRID_KEYS = ("groups", "alignment_fractions", "random_alignment_fractions", "data_ratios", "data_ratio_fractions")
DEFAULT_GRID = {
    "groups": list(GROUPS),
    "alignment_fractions": [0.0, 0.25, 0.5, 0.75, 1.0],
    "random_alignment_fractions": [1.0],
    "data_ratios": [0.25, 0.5, 0.75, 1.0],
    "data_ratio_fractions": [0.0, 1.0],
}


def _fmt(x: float) -> str:
    return f"{float(x):.2f}"


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
        return {
            "setting": self.id,
            "alignment_fraction": self.alignment_fraction,
            "random_alignment": self.random_alignment,
            "data_ratio": self.data_ratio,
            "groups": list(self.groups),
        }


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
                raise ValueError(
                    f"{where}: grid.random_alignment_fractions contains 0; random alignment at p = 0 "
                    "is the baseline (no masks used); use values > 0, e.g. [1.0]"
                )
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


def select_runs(
    runs: Sequence[RunSpec], shard: tuple[int, int] | None = None, only: Sequence[str] | None = None
) -> list[RunSpec]:
    """This machine's share (``shard`` = (i, n): runs whose position % n == i - 1) matching any ``only`` glob."""
    out = list(runs)
    if shard:
        i, n = shard
        out = [r for r in out if r.index % n == i - 1]
    if only:
        out = [
            r
            for r in out
            if any(fnmatch.fnmatchcase(r.run_id, pat) or fnmatch.fnmatchcase(r.setting.id, pat) for pat in only)
        ]
    return out


# ================================================================================================ the command
def fire_value(v) -> str:
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


def train_command(
    cfg: StudyConfig, spec: RunSpec, datalist_file: str | None = None, parent_run_id: str | None = None
) -> list[str]:
    """The command line of one run (the training job with the run's setting, folders and MLflow nesting).

    The keys set here are the training config's (configs/train.yaml) names: keep them when that file changes.
    """
    rdir = cfg.run_dir(spec)
    cf = cfg.train_config[0] if len(cfg.train_config) == 1 else repr(cfg.train_config)
    subst = {"python": sys.executable, "config_file": cf, "bundle_root": BUNDLE_ROOT}
    cmd = [c.format(**subst) for c in cfg.train_command]
    tags = {
        "study": cfg.name,
        "profile": cfg.profile,
        "run_id": spec.run_id,
        "setting": spec.setting.id,
        "alignment_fraction": spec.setting.alignment_fraction,
        "random_alignment": spec.setting.random_alignment,
        "data_ratio": spec.setting.data_ratio,
        "seed": spec.seed,
        "groups": ",".join(spec.setting.groups),
    }
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
        cmd += [f"--{k}", fire_value(v)]
    return cmd
