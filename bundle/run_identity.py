"""What a training run is, and that one process at a time is it (docs/reliability.md).

- :func:`claim_output_dir` (the first step of the training): an exclusive lock on the output folder and on the best
  model's path, held until the process exits (``flock``: a crash or a kill frees it); a second process is refused
  with the holder's pid, host, start time and command. Then orphaned temp files of killed atomic writes are removed.
- :class:`RunIdentity`: the run's fingerprint (the knobs that decide its result, the network, the optimiser, the
  scheduler, the loss and the image pipeline as built, the datalist's path and content digest, the world size and
  the code: a digest of ``bundle/`` plus the git commit), written to ``<output_dir>/run.json`` at training start.
  :class:`bundle.handlers.ResumeCheckpoint` stores it in every epoch checkpoint and refuses to resume a checkpoint
  whose fingerprint differs, listing the differing keys; it also records which file the run's best model is, so
  that the final evaluation never evaluates another run's ``model.pt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

import torch

from bundle.utils.atomic import file_sha256, read_json, remove_stale_temp_files, write_json_atomic
from bundle.utils.dist import is_rank0, unwrap
from bundle.utils.lock import hold_lock, lock_holder

logger = logging.getLogger("bundle")

__all__ = [
    "RUN_FILE",
    "LOCK_FILE",
    "RunInUseError",
    "RunMismatchError",
    "claim_output_dir",
    "model_lock_path",
    "code_version",
    "describe",
    "flatten",
    "RunIdentity",
]

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILE = "run.json"
LOCK_FILE = ".train.lock"
FORMAT = 1
# keys recorded in the fingerprint but never compared: the commit changes with a docs-only commit; the sources digest
# is what decides whether the code that trains differs
_INFO_ONLY = ("code.git_commit", "code.git_dirty")
_MAX_LISTED = 25


class RunInUseError(RuntimeError):
    """Another process holds the output folder (or the best model's path) of this training."""

    def cli_message(self) -> str:
        return str(self)


class RunMismatchError(RuntimeError):
    """The checkpoint in the output folder belongs to another run (another fingerprint); nothing was trained."""

    def cli_message(self) -> str:
        return str(self)


# ---------------------------------------------------------------------------------------------------- the lock
def model_lock_path(best_model_path: str) -> str:
    """The lock file beside the best model: ``<folder>/.<name>.lock``."""
    p = os.path.abspath(best_model_path)
    return os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.lock")


def claim_output_dir(
    output_dir: str, best_model_path: str | None = None, stale_hours: float = 24.0
) -> dict[str, list[str]]:
    """Make this process the only training writing ``output_dir`` (and ``best_model_path``), then clean up.

    Rank 0 only (under DDP the other ranks write nothing there; torchrun stops them when rank 0 fails). The locks
    are held until the process exits. Raises :class:`RunInUseError` naming the holder when another process has
    either. Then removes orphaned temp files (:func:`bundle.utils.atomic.remove_stale_temp_files`) under
    ``output_dir`` and beside ``best_model_path``. Returns ``{"locks": [...], "removed": [...]}``.
    """
    out: dict[str, list[str]] = {"locks": [], "removed": []}
    if not is_rank0():
        return out
    output_dir = os.path.abspath(output_dir)
    targets = [(output_dir, os.path.join(output_dir, LOCK_FILE), "--output_dir")]
    if best_model_path:
        targets.append((os.path.abspath(best_model_path), model_lock_path(best_model_path), "--best_model_path"))
    for target, lock, option in targets:
        if hold_lock(lock) is None:
            msg = (
                f"{target} is in use by another training: {lock_holder(lock)} (lock file {lock}). Wait for it to "
                f"finish or stop it, or give this run its own {option}."
            )
            logger.error(msg)
            raise RunInUseError(msg)
        out["locks"].append(lock)
    removed = remove_stale_temp_files(output_dir, recursive=True, max_age_hours=stale_hours)
    if best_model_path:
        folder = os.path.dirname(os.path.abspath(best_model_path))
        if os.path.commonpath([folder, output_dir]) != output_dir:  # not already covered by the recursive walk
            removed += remove_stale_temp_files(folder, recursive=False, max_age_hours=stale_hours)
    for path in removed:
        logger.warning(f"removed {path}: the temp file of an interrupted write (its process is gone)")
    out["removed"] = removed
    return out


# ---------------------------------------------------------------------------------------------------- the fingerprint
def _sources_digest(root: str) -> str:
    """sha256 over the relative paths and contents of every ``.py`` file under ``root/bundle``."""
    h = hashlib.sha256()
    base = os.path.join(root, "bundle")
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, base).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
            h.update(b"\0")
    return h.hexdigest()[:16]


def _git(root: str, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def code_version(root: str = BUNDLE_ROOT) -> dict:
    """``bundle_sources`` (digest of ``bundle/**/*.py``, compared on resume), ``git_commit`` and ``git_dirty``
    (whether ``bundle/`` or ``configs/`` have uncommitted changes; both None outside a git checkout)."""
    commit = _git(root, "rev-parse", "HEAD")
    dirty = None
    if commit:
        status = _git(root, "status", "--porcelain", "--", "bundle", "configs")
        dirty = bool(status) if status is not None else None
    return {"bundle_sources": _sources_digest(root), "git_commit": commit, "git_dirty": dirty}


_SKIP = object()
_PLAIN = (bool, int, float, str, type(None))
# attributes that change while training (or are random generators): not part of what a component *is*
_MUTABLE = {"R", "training", "last_epoch", "state"}


def _plain(v, depth: int = 0):
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, torch.dtype):
        return str(v)
    if depth >= 3:
        return _SKIP
    if isinstance(v, (list, tuple)):
        items = [_plain(x, depth + 1) for x in v]
        return _SKIP if any(x is _SKIP for x in items) else items
    if isinstance(v, Mapping) and all(isinstance(k, str) for k in v):
        items = {k: _plain(x, depth + 1) for k, x in v.items()}
        return _SKIP if any(x is _SKIP for x in items.values()) else items
    return _SKIP


def describe(obj) -> dict:
    """A component as plain data: its class and its public attributes that are plain values (numbers, strings,
    flags and lists of them); for a ``torch.nn.Module``, its children too. Generators and mutable training state are
    left out, so the description of an object is the same before and after training."""
    d: dict = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for k, v in sorted(getattr(obj, "__dict__", {}).items()):
        if k.startswith("_") or k in _MUTABLE:
            continue
        pv = _plain(v)
        if pv is not _SKIP:
            d[k] = pv
    if isinstance(obj, torch.nn.Module):
        children = {name: describe(child) for name, child in obj.named_children()}
        if children:
            d["children"] = children
    return d


def _describe_pipeline(transform) -> list:
    """The transforms of a (nested) MONAI Compose, each described; a single transform is a list of one."""
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return [x for t in inner for x in _describe_pipeline(t)]
    return [describe(transform)]


def _describe_network(net) -> dict:
    net = unwrap(net)
    try:
        from bundle.networks import AlignerVLM, network_config

        if isinstance(net, AlignerVLM):
            return {"class": "bundle.networks.AlignerVLM", **network_config(net)}
    except ImportError:  # pragma: no cover
        pass
    return {**describe(net), "n_parameters": int(sum(p.numel() for p in net.parameters()))}


def _describe_component(name: str, obj):
    if obj is None:
        return None
    if name == "network":
        return _describe_network(obj)
    if isinstance(obj, torch.optim.Optimizer):
        defaults = {k: _plain(v) for k, v in obj.defaults.items()}
        return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"} | {
            k: v for k, v in defaults.items() if v is not _SKIP
        }
    if isinstance(getattr(obj, "transforms", None), (list, tuple)):
        return _describe_pipeline(obj)
    return describe(obj)


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """Nested dicts and lists as ``{"a.b[0].c": leaf}``."""
    out: dict[str, object] = {}
    if isinstance(obj, Mapping):
        if not obj and prefix:
            out[prefix] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        if not obj and prefix:
            out[prefix] = []
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def _canon(v) -> str:
    """The value as compared: numbers as floats (``--data_ratio 1`` equals ``data_ratio: 1.0``), then JSON."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (int, float)):
        f = float(v)
        return json.dumps(f) if math.isfinite(f) else str(f)
    return json.dumps(v, sort_keys=True, default=str)


def _show(v) -> str:
    s = "(absent)" if v is _SKIP else json.dumps(v, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


class RunIdentity:
    """The fingerprint of a training run and its record ``<output_dir>/run.json``.

    Args:
        output_dir: the run's folder (``run.json`` goes there).
        knobs: the scalar settings that decide the result (the paper's knobs, the training hyper-parameters, the
            image size...), by name.
        datalist_file: the datalist (its absolute path and the sha256 of its content are fingerprinted).
        components: built objects described from what they are (``network``: the AlignerVLM's architecture record;
            ``pipeline``: each transform's class and settings; the optimiser, scheduler and loss: class and plain
            settings).
        allow_code_change: when true, a resume may continue with other code (``bundle/`` sources); the change is
            recorded in ``run.json``'s history. Everything else must match.
        code_root: the bundle root whose ``bundle/`` sources and git commit are recorded.
    """

    def __init__(
        self,
        output_dir: str,
        knobs: Mapping,
        datalist_file: str | None = None,
        components: Mapping | None = None,
        allow_code_change: bool = False,
        code_root: str = BUNDLE_ROOT,
    ):
        self.output_dir = os.path.abspath(output_dir)
        self.path = os.path.join(self.output_dir, RUN_FILE)
        self.knobs, self.datalist_file = dict(knobs), datalist_file
        self.components = dict(components or {})
        clash = set(self.knobs) & (set(self.components) | {"data", "code", "distributed"})
        if clash:
            raise ValueError(f"RunIdentity: knob names {sorted(clash)} clash with the fingerprint's sections")
        self.allow_code_change = bool(allow_code_change)
        self.code_root = code_root
        self.best_model: dict | None = None
        self.history: list[dict] = []
        self.resumed_from: dict | None = None
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._fingerprint: dict | None = None

    # ---- the fingerprint
    @property
    def fingerprint(self) -> dict:
        """The fingerprint as plain data (computed once)."""
        if self._fingerprint is None:
            fp: dict = {}
            for k, v in self.knobs.items():
                pv = _plain(v)
                fp[k] = str(v) if pv is _SKIP else pv
            for name, obj in self.components.items():
                fp[name] = _describe_component(name, obj)
            if self.datalist_file:
                path = os.path.abspath(os.fspath(self.datalist_file))
                fp["data"] = {"datalist_file": path, "datalist_sha256": file_sha256(path)[:16]}
            dist = torch.distributed
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            fp["distributed"] = {"world_size": world}
            fp["code"] = code_version(self.code_root)
            self._fingerprint = fp
        return self._fingerprint

    def compared(self, fingerprint: Mapping | None = None) -> dict[str, str]:
        """The flattened fingerprint as compared on resume (canonical values; the git commit is information only)."""
        flat = flatten(self.fingerprint if fingerprint is None else fingerprint)
        return {k: _canon(v) for k, v in flat.items() if k not in _INFO_ONLY}

    def digest(self, fingerprint: Mapping | None = None) -> str:
        """Short sha256 of the compared fingerprint: equal digests, same run."""
        text = json.dumps(self.compared(fingerprint), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, recorded: Mapping) -> list[tuple[str, object, object]]:
        """``(key, recorded value, this run's value)`` for every compared key that differs."""
        old, new = self.compared(recorded), self.compared()
        old_raw, new_raw = flatten(recorded), flatten(self.fingerprint)
        keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
        return [(k, old_raw.get(k, _SKIP), new_raw.get(k, _SKIP)) for k in keys]

    # ---- resume
    def check_resume(self, recorded: Mapping | None, ckpt_file: str, ckpt_epoch: int) -> None:
        """Accept resuming ``ckpt_file`` (saved state ``recorded``: :meth:`state_dict` of the run that wrote it) or
        raise :class:`RunMismatchError` listing the differing keys and the fix. Allowed differences (recorded in
        the history, with a warning): a larger ``max_epochs`` (the run is extended) and, with
        ``allow_code_change``, the code."""
        fix = (
            f"Either give this run its own folder (--output_dir NEW_DIR, and --best_model_path NEW_DIR/model.pt to "
            f"keep the old run's best model), or start afresh here with --resume false (this deletes the checkpoints "
            f"in {os.path.dirname(os.path.abspath(ckpt_file))} and overwrites the old run's results)."
        )
        if not isinstance(recorded, Mapping) or not isinstance(recorded.get("fingerprint"), Mapping):
            msg = (
                f"cannot resume {ckpt_file} (epoch {ckpt_epoch}): the checkpoint records no run fingerprint (it was "
                f"written before runs recorded one), so whether it belongs to this configuration is unknown. {fix}"
            )
            logger.error(msg)
            raise RunMismatchError(msg)
        diffs = self.differences(recorded["fingerprint"])
        allowed, events = [], []
        grown = [
            (o, n) for k, o, n in diffs if k == "max_epochs" and isinstance(o, int) and isinstance(n, int) and n > o
        ]
        for key, old, new in diffs:
            if grown and (key == "max_epochs" or (old, new) == grown[0]):  # + what follows max_epochs (T_max)
                allowed.append(key)
            elif key.startswith("code.") and self.allow_code_change:
                allowed.append(key)
        if grown:
            events.append({"event": "extended", "max_epochs": list(grown[0])})
        if self.allow_code_change and any(k.startswith("code.") for k in allowed):
            old_code, new_code = recorded["fingerprint"].get("code", {}), self.fingerprint["code"]
            events.append({"event": "code_changed", "from": old_code, "to": new_code})
        refused = [d for d in diffs if d[0] not in allowed]
        if refused:
            lines = [f"  {k}: {_show(o)} -> {_show(n)}" for k, o, n in refused[:_MAX_LISTED]]
            if len(refused) > _MAX_LISTED:
                lines.append(f"  ... and {len(refused) - _MAX_LISTED} more")
            hint = ""
            if any(k.startswith("code.") for k, _, _ in refused):
                hint = (
                    " The code (bundle/ sources) changed since the checkpoint; --resume_on_code_change true resumes "
                    "anyway (recorded in run.json) when the change cannot alter the result."
                )
            if any(k == "max_epochs" for k, _, _ in refused):
                hint += " max_epochs may only grow on resume (the run is then extended)."
            msg = (
                f"cannot resume {ckpt_file} (epoch {ckpt_epoch}): it belongs to another run; "
                f"{len(refused)} setting(s) differ (checkpoint -> this command):\n" + "\n".join(lines) + "\n"
                f"Nothing was trained. {fix}{hint}"
            )
            logger.error(msg)
            raise RunMismatchError(msg)
        self.load_state_dict(recorded)
        stamp = {"at_epoch": int(ckpt_epoch), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname()}
        for ev in events:
            self.history.append({**ev, **stamp})
            logger.warning(f"resuming {ckpt_file} with a change: {ev['event']} (recorded in {self.path})")
        self.history.append({"event": "resumed", **stamp})
        self.resumed_from = {"checkpoint": os.path.abspath(ckpt_file), "epoch": int(ckpt_epoch)}

    def state_dict(self) -> dict:
        """Plain data (``torch.load(weights_only=True)`` reads it): fingerprint, digest, best model, history."""
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "digest": self.digest(),
            "best_model": dict(self.best_model) if self.best_model else None,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Adopt the best-model record and the history of the run that saved ``state`` (its fingerprint is this
        run's: :meth:`check_resume` compared them)."""
        self.best_model = dict(state["best_model"]) if state.get("best_model") else None
        self.history = [dict(h) for h in state.get("history") or []]

    # ---- run.json
    def record(self) -> dict:
        """The content of ``run.json``."""
        dist = torch.distributed
        return {
            "format": FORMAT,
            "digest": self.digest(),
            "fingerprint": self.fingerprint,
            "started": self.started,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "argv": list(sys.argv),
            "resumed_from": self.resumed_from,
            "history": self.history,
            "best_model": self.best_model,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "monai": _version("monai"),
                "cuda_available": torch.cuda.is_available(),
                "torch_threads": torch.get_num_threads(),
                "rank0_of": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
            },
        }

    def write(self) -> str | None:
        """Write ``run.json`` atomically (rank 0). Returns its path (None on other ranks)."""
        if not is_rank0():
            return None
        return write_json_atomic(self.path, self.record(), indent=1, sort_keys=False)

    def read(self) -> dict | None:
        """The ``run.json`` in the output folder, None when there is none."""
        return read_json(self.path)

    # ---- the best model
    def note_best_model(self, path: str, epoch: int, value: float | None = None) -> None:
        """Record that this run's best model is ``path`` as saved at ``epoch`` (its sha256); rank 0 rewrites run.json.
        A no-op when that epoch is already recorded."""
        if not is_rank0() or epoch is None or epoch < 0:
            return
        if self.best_model and self.best_model.get("epoch") == int(epoch):
            return
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            return
        self.best_model = {
            "path": path,
            "sha256": file_sha256(path),
            "epoch": int(epoch),
            "value": None if value is None or not math.isfinite(float(value)) else float(value),
        }
        self.write()

    def verify_best_model(self, path: str, metric_name: str | None = None) -> None:
        """Raise unless ``path`` is the best model this run saved (same file content). Rank 0 only (it wrote it)."""
        if not is_rank0():
            return
        path = os.path.abspath(path)
        metric = metric_name or "the key metric"
        if not self.best_model and not os.path.exists(path):
            # nothing stale can be taken for this run's model; what needs it (the final evaluation) says it is missing
            logger.warning(
                f"this run saved no best model: no validation gave a finite {metric}; {path} does not exist. Check "
                f"that the validation split has positives and negatives of every class and that val_interval <= "
                f"max_epochs."
            )
            return
        if not self.best_model:
            where = "comes from another run"
            msg = (
                f"this run saved no best model: no validation gave a finite {metric}, so {path} {where} and is not "
                f"evaluated as this run's. Check that the validation split has positives and negatives of every "
                f"class and that val_interval <= max_epochs."
            )
            logger.error(msg)
            raise RuntimeError(msg)
        rec = self.best_model
        if os.path.abspath(rec["path"]) != path:
            msg = f"{path} is not where this run saved its best model ({rec['path']}); evaluate that file instead"
            logger.error(msg)
            raise RuntimeError(msg)
        actual = file_sha256(path) if os.path.isfile(path) else None
        if actual != rec["sha256"]:
            what = "was deleted" if actual is None else "was replaced since (another run with the same path?)"
            msg = (
                f"{path} is not the best model this run saved at epoch {rec['epoch']} (sha256 {rec['sha256'][:12]}): "
                f"it {what}. Its final evaluation would not be this run's; retrain with its own --best_model_path."
            )
            logger.error(msg)
            raise RuntimeError(msg)


def _version(dist_name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist_name)
    except Exception:  # pragma: no cover
        return None
