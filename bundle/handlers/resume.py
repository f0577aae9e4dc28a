"""Crash-safe training state: a checkpoint after every epoch (atomically, rank 0), loaded at start if present."""

from __future__ import annotations

import glob
import logging
import os
import pickle
import re
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from bundle.utils.atomic import torch_save_atomic
from bundle.utils.dist import is_rank0, unwrap

logger = logging.getLogger("bundle")

__all__ = ["ResumeCheckpoint"]


class ResumeCheckpoint:
    """Crash-safe training state: saved atomically after every epoch, loaded at start if present.

    ``objects`` is ``{"network": ..., "optimizer": ..., "trainer": ..., ...}``; anything with
    ``state_dict``/``load_state_dict`` works (lr scheduler, BestModelSaver, EarlyStopHandler's ignite
    handler). Attach to the trainer *after* the ValidationHandler so the saved state includes the
    epoch's validation. ``resume=False`` starts afresh (existing files are then overwritten).
    """

    pattern = "checkpoint_epoch={}.pt"

    def __init__(self, save_dir: str, objects: Mapping, resume: bool = True, keep: int = 1):
        self.save_dir, self.objects, self.resume, self.keep = save_dir, dict(objects), resume, keep

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _files(self) -> list[str]:
        files = glob.glob(os.path.join(self.save_dir, self.pattern.format("*")))
        return sorted(files, key=lambda f: int(re.search(r"epoch=(\d+)", f).group(1)))

    def _objects(self) -> dict:
        return {k: unwrap(v) if isinstance(v, torch.nn.Module) else v for k, v in self.objects.items() if v is not None}

    def load(self, engine: Engine) -> None:
        files = self._files()
        if not self.resume or not files:
            return
        try:
            # weights_only: a checkpoint holds tensors, numbers, strings and containers only; anything else in the
            # pickle (a planted __reduce__ payload) is refused before it can run
            ckpt = torch.load(files[-1], map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise RuntimeError(
                f"{files[-1]}: not a plain training checkpoint, refused (weights_only load: {str(e).splitlines()[0]}). "
                f"Delete it, or start afresh with --resume false."
            ) from None
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self._objects(), checkpoint=ckpt)
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        logger.info(f"resumed from {files[-1]} (epoch {engine.state.epoch} of {engine.state.max_epochs})")

    def save(self, engine: Engine) -> None:
        if not is_rank0():
            return
        state = {k: v.state_dict() for k, v in self._objects().items()}
        torch_save_atomic(os.path.join(self.save_dir, self.pattern.format(engine.state.epoch)), state)
        for f in self._files()[: -self.keep]:
            os.remove(f)
