"""Epoch means of the training losses and the training throughput, as engine metrics and one log line per epoch."""

from __future__ import annotations

import logging
import time

from ignite.engine import Engine, Events

logger = logging.getLogger("bundle")

__all__ = ["EpochSummary"]


class EpochSummary:
    """Epoch means of L_CE, L_AL, aligned pairs and the training throughput (images/s, training time only).

    Written to ``engine.state.metrics`` (so MLflow logs them per epoch) and printed as one line per epoch.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iter)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _reset(self, engine: Engine) -> None:
        self._sum, self._n, self._images, self._t0 = {}, 0, 0, time.perf_counter()
        self._t_last = self._t0

    def _iter(self, engine: Engine) -> None:
        self._t_last = time.perf_counter()  # training time only: validation runs after the last iteration
        out = engine.state.output
        self._images += int(out["image"].shape[0]) if "image" in out else 0
        for k in ("loss", "loss_ce", "loss_al", "n_aligned"):
            if k in out:
                self._sum[k] = self._sum.get(k, 0.0) + float(out[k])
        self._n += 1

    def _epoch(self, engine: Engine) -> None:
        n = max(self._n, 1)
        secs = self._t_last - self._t0
        means = {f"train_{k}_epoch": v / n for k, v in self._sum.items()}
        means["train_images_per_s"] = self._images / max(secs, 1e-9)
        engine.state.metrics.update(means)
        msg = " ".join(f"{k[6:-6] if k.endswith('_epoch') else k[6:]}={v:.4g}" for k, v in means.items())
        logger.info(f"epoch {engine.state.epoch}/{engine.state.max_epochs} train: {msg} ({secs:.1f}s)")
