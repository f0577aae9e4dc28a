"""Saves the network whenever the key metric improves (atomically, rank 0), with a checkpointable best value.

Beside the plain state_dict (``models/model.pt``, as the MONAI bundle spec requires) it writes the architecture the
weights belong to (``models/model.json``: ``bundle.networks.write_network_config``), so that inference, evaluation,
export and Deploy rebuild the network without repeating the training sizes on the command line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import torch
from ignite.engine import Engine, Events

from bundle.utils.atomic import torch_save_atomic
from bundle.utils.dist import is_rank0, unwrap

logger = logging.getLogger("bundle")

__all__ = ["BestModelSaver"]


class BestModelSaver:
    """Saves the network's state_dict to ``save_path`` (atomically) whenever the key metric improves.

    Attach to the validator. Rank 0 writes; the state (best value and epoch) is itself checkpointable so
    a resumed run does not overwrite a better model with a worse one.

    ``save_config``: also write the architecture sidecar (``config_path``, default ``save_path`` with ``.json``)
    right after the weights, with their sha256; networks that are not an AlignerVLM get none (logged once).
    """

    def __init__(
        self,
        save_path: str,
        network: torch.nn.Module,
        metric_name: str | None = None,
        mode: str = "max",
        epoch_getter: Callable[[], int] | None = None,
        save_config: bool = True,
        config_path: str | None = None,
    ):
        self.save_path, self.network, self.metric_name, self.mode = save_path, network, metric_name, mode
        self.save_config, self.config_path = bool(save_config), config_path
        self.epoch_getter = epoch_getter
        self.best, self.best_epoch = -math.inf if mode == "max" else math.inf, -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        value = engine.state.metrics.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        better = value > self.best if self.mode == "max" else value < self.best
        if better:
            self.best = float(value)
            self.best_epoch = self.epoch_getter() if self.epoch_getter else engine.state.epoch
            if is_rank0():
                net = unwrap(self.network)
                torch_save_atomic(self.save_path, net.state_dict())
                saved = self.save_path
                if self.save_config:
                    saved += self._save_config(net)
                logger.info(f"new best {name} = {value:.4f} at epoch {self.best_epoch}: saved {saved}")

    def _save_config(self, net: torch.nn.Module) -> str:
        """Write the architecture sidecar of the just-saved weights; returns " + <path>" (or "" when skipped)."""
        from bundle.networks import AlignerVLM, write_network_config

        if not isinstance(net, AlignerVLM):
            if self.save_config:
                logger.info(
                    f"{type(net).__name__} is not an AlignerVLM: no architecture sidecar beside {self.save_path}"
                )
                self.save_config = False
            return ""
        return " + " + write_network_config(self.save_path, net, self.config_path)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
