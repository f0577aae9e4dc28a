"""Crash-safe training state: a checkpoint after every epoch (atomically, rank 0), loaded at start if present.

A checkpoint holds everything an uninterrupted run would carry into the next epoch: network, optimiser, scheduler,
trainer (epoch, iteration), best-model saver, early stopping (counter, best score), the AMP GradScaler, the random
generators (:class:`RNGState`) and the run's fingerprint (:class:`bundle.run_identity.RunIdentity`). Before training,
:meth:`ResumeCheckpoint.check` refuses to resume a checkpoint of another run, or starts afresh (``resume=False``:
the old checkpoints are deleted). docs/reliability.md.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import random
import re
import types
from collections.abc import Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import EarlyStopHandler

from bundle.handlers.best_model import BestModelSaver
from bundle.utils.atomic import torch_save_atomic
from bundle.utils.dist import is_rank0, unwrap

logger = logging.getLogger("bundle")

__all__ = ["ResumeCheckpoint", "RNGState"]

_OPTIONAL = ("scaler",)  # state that may be absent from a checkpoint (a CPU checkpoint resumed with fp16 AMP)


# ------------------------------------------------------------------------------------------------ random generators
def _np_state(state) -> dict:
    """A numpy ``RandomState.get_state()`` tuple as plain data (a tensor and numbers: weights_only loads it)."""
    name, keys, pos, has_gauss, cached = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _np_unstate(d: Mapping) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached_gaussian"])


def _walk_generators(obj, path: tuple, out: dict, seen: set, depth: int = 0) -> None:
    """Every ``np.random.RandomState`` reachable from ``obj`` (attributes, lists, dicts), by path, in a stable order."""
    if isinstance(obj, np.random.RandomState):
        out.setdefault(path, obj)
        return
    if depth > 10 or id(obj) in seen:
        return
    if isinstance(obj, (str, bytes, int, float, bool, type(None), np.ndarray, torch.Tensor, type)):
        return
    if isinstance(obj, (types.FunctionType, types.MethodType, types.ModuleType, torch.nn.Module)):
        return
    seen.add(id(obj))
    if isinstance(obj, Mapping):
        for k, v in list(obj.items()):
            _walk_generators(v, path + (("key", k),), out, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk_generators(v, path + (("item", i),), out, seen, depth + 1)
    elif hasattr(obj, "__dict__"):
        for k, v in list(vars(obj).items()):
            _walk_generators(v, path + (("attr", k),), out, seen, depth + 1)


def _resolve(root, path: tuple):
    """The object at ``path`` under ``root``, or None. A dict entry that does not exist yet is created when its owner
    makes such entries on demand: ``owner._things[key]`` by ``owner._thing(key)`` (JointAugmentd builds its RandAffined
    per image size on first use; MONAI has no hook for lazily built sub-transforms, so this naming convention is it)."""
    obj, owner, attr = root, None, None
    for kind, name in path:
        if kind == "attr":
            owner, attr = obj, name
            obj = getattr(obj, name, None)
        elif kind == "item":
            obj = obj[name] if isinstance(obj, (list, tuple)) and 0 <= name < len(obj) else None
        elif isinstance(obj, Mapping):
            if name not in obj and attr and attr.endswith("s") and callable(getattr(owner, attr[:-1], None)):
                getattr(owner, attr[:-1])(name)
            obj = obj.get(name)
        else:
            obj = None
        if obj is None:
            return None
    return obj


class RNGState:
    """The random generators of a training as checkpointable state: torch (CPU and CUDA), numpy, Python's ``random``,
    and the generator of every random transform of ``data`` (a DataLoader, a Dataset or a transform).

    With ``num_workers=0`` the random transforms run in the training process and their generators advance from epoch
    to epoch; restoring them (and torch's generator, which shuffles the loader) makes a resumed run continue exactly as
    an uninterrupted one (docs/reliability.md). With worker processes each worker re-seeds its copy of the transforms
    from torch's generator; their within-epoch state cannot be saved, so a resumed run's augmentation differs from an
    uninterrupted one after a resume (the sample order is still restored). Saved as tensors and numbers, so
    ``torch.load(weights_only=True)`` reads it.
    """

    def __init__(self, data=None):
        self.data = data

    def _root(self):
        root = self.data
        root = getattr(root, "dataset", root)  # DataLoader -> Dataset
        return getattr(root, "transform", root)  # Dataset -> its transform (a Compose)

    def _generators(self) -> dict[tuple, np.random.RandomState]:
        out: dict[tuple, np.random.RandomState] = {}
        if self.data is not None:
            _walk_generators(self._root(), (), out, set())
        return out

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _np_state(np.random.get_state()),
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "transforms": [{"path": list(p), "state": _np_state(g.get_state())} for p, g in self._generators().items()],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(_np_unstate(state["numpy"]))
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        missing = []
        root = self._root() if self.data is not None else None
        for entry in state.get("transforms", []):
            path = tuple((kind, name) for kind, name in entry["path"])
            gen = _resolve(root, path) if root is not None else None
            if isinstance(gen, np.random.RandomState):
                gen.set_state(_np_unstate(entry["state"]))
            else:
                missing.append(path)
        if missing:
            logger.warning(
                f"{len(missing)} saved transform generator(s) have no counterpart in this pipeline (it changed?): "
                f"their augmentation restarts from the initial seed"
            )


# ------------------------------------------------------------------------------------------------ the checkpoint
class ResumeCheckpoint:
    """Crash-safe training state: saved atomically after every epoch, loaded at start if present.

    ``objects`` is ``{"network": ..., "optimizer": ..., "trainer": ..., ...}``; anything with
    ``state_dict``/``load_state_dict`` works (lr scheduler, BestModelSaver, :class:`RNGState`); a MONAI
    ``EarlyStopHandler`` is saved through its ignite ``EarlyStopping`` (counter, best score; call its
    ``set_trainer`` before attaching); the trainer's AMP ``scaler`` is added when there is one. Attach to the
    trainer *after* the ValidationHandler so the saved state includes the epoch's validation.

    ``run`` (:class:`bundle.run_identity.RunIdentity`): the run's fingerprint, saved in every checkpoint;
    :meth:`check` (called by :meth:`attach`, before training) refuses a checkpoint with another fingerprint and
    writes ``run.json``; the best model's file is recorded after each epoch, and :meth:`check_best_model` verifies
    before the final evaluation that it is still this run's. ``resume=False`` starts afresh: the checkpoints in
    ``save_dir`` are deleted.
    """

    pattern = "checkpoint_epoch={}.pt"

    def __init__(self, save_dir: str, objects: Mapping, resume: bool = True, keep: int = 1, run=None):
        self.save_dir, self.objects, self.resume, self.keep = save_dir, dict(objects), resume, keep
        self.run = run
        self._checked = False
        self._ckpt: dict | None = None  # the checkpoint read by check(), loaded into the objects at STARTED
        self._ckpt_file: str | None = None

    def attach(self, engine: Engine) -> None:
        self.check()
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _files(self) -> list[str]:
        files = glob.glob(os.path.join(self.save_dir, self.pattern.format("*")))
        return sorted(files, key=self._epoch_of)

    @staticmethod
    def _epoch_of(path: str) -> int:
        return int(re.search(r"epoch=(\d+)", os.path.basename(path)).group(1))

    def _objects(self, engine: Engine | None = None) -> dict:
        out = {}
        for k, v in self.objects.items():
            if v is None:
                continue
            if isinstance(v, torch.nn.Module):
                v = unwrap(v)
            elif isinstance(v, EarlyStopHandler):  # saved through its ignite EarlyStopping (counter, best score)
                if v._handler is None:
                    raise RuntimeError(f"ResumeCheckpoint: {k}: call set_trainer() before attaching ResumeCheckpoint")
                v = v._handler
            out[k] = v
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "scaler" not in out and hasattr(scaler, "state_dict"):
            out["scaler"] = scaler
        return out

    def _best_saver(self) -> BestModelSaver | None:
        return next((v for v in self.objects.values() if isinstance(v, BestModelSaver)), None)

    def _read(self, path: str) -> dict:
        try:
            # weights_only: a checkpoint holds tensors, numbers, strings and containers only; anything else in the
            # pickle (a planted __reduce__ payload) is refused before it can run
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise RuntimeError(
                f"{path}: not a plain training checkpoint, refused (weights_only load: {str(e).splitlines()[0]}). "
                f"Delete it, or start afresh with --resume false."
            ) from None

    def check(self) -> None:
        """Before training: resume (the last checkpoint must be of this run) or start afresh; write ``run.json``."""
        if self._checked:
            return
        self._checked = True
        files = self._files()
        if self.resume and files:
            self._ckpt_file = files[-1]
            self._ckpt = self._read(files[-1])
            if self.run is not None:
                self.run.check_resume(self._ckpt.get("run"), files[-1], self._epoch_of(files[-1]))
        elif files and is_rank0():
            for f in files:
                os.remove(f)
            logger.warning(
                f"resume is off: starting afresh; deleted {len(files)} checkpoint(s) of the previous run in "
                f"{self.save_dir}"
            )
        if self.run is not None:
            self.run.write()

    def load(self, engine: Engine) -> None:
        self.check()
        if self._ckpt is None:
            return
        ckpt, path = self._ckpt, self._ckpt_file
        self._ckpt = None  # free the memory once loaded
        objects = self._objects(engine)
        missing = [k for k in objects if k not in ckpt]
        for k in [k for k in missing if k in _OPTIONAL]:
            logger.warning(f"{path} has no saved {k} state: it starts afresh")
            objects.pop(k)
            missing.remove(k)
        if missing:
            raise RuntimeError(
                f"{path}: no saved state for {missing} (written by an older version of the bundle?). Start afresh "
                f"with --resume false, or give this run another --output_dir."
            )
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=objects, checkpoint=ckpt)
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        stopped = [
            k
            for k, v in objects.items()
            if hasattr(v, "counter") and hasattr(v, "patience") and v.counter >= v.patience
        ]
        if stopped:  # the run had ended by early stopping: nothing is left to train
            engine.state.max_epochs = engine.state.epoch
            logger.info(f"{path}: the run had stopped early at epoch {engine.state.epoch}; nothing left to train")
        logger.info(f"resumed from {path} (epoch {engine.state.epoch} of {engine.state.max_epochs})")

    def save(self, engine: Engine) -> None:
        best = self._best_saver()
        if self.run is not None and best is not None and best.best_epoch >= 0:
            self.run.note_best_model(best.save_path, best.best_epoch, best.best)
        if not is_rank0():
            return
        state = {k: v.state_dict() for k, v in self._objects(engine).items()}
        if self.run is not None:
            state["run"] = self.run.state_dict()
        torch_save_atomic(os.path.join(self.save_dir, self.pattern.format(engine.state.epoch)), state)
        for f in self._files()[: -self.keep]:
            os.remove(f)

    def check_best_model(self) -> None:
        """Raise unless the best model file is the one this run saved (call before the final evaluation)."""
        best = self._best_saver()
        if self.run is None or best is None:
            return
        self.run.verify_best_model(best.save_path, best.metric_name)
