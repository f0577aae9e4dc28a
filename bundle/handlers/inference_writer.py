"""Inference results: ``predictions.csv`` (probabilities and attention peaks per image) and attention overlays."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from bundle.utils.atomic import write_text_atomic
from bundle.utils.dist import is_rank0

logger = logging.getLogger("bundle")

__all__ = ["InferenceWriter"]


class InferenceWriter:
    """Writes inference results: ``predictions.csv`` (one row per image: probabilities and the attention peak
    per class) and, optionally, one attention-overlay PNG per image. Rank 0; files written atomically."""

    def __init__(self, output_dir: str, records: Sequence[Mapping], classes: Sequence[str], save_overlays: bool = True):
        self.output_dir, self.records, self.classes = output_dir, list(records), list(classes)
        self.save_overlays = save_overlays
        self.rows: list[list] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iter)
        engine.add_event_handler(Events.COMPLETED, self._done)

    def _iter(self, engine: Engine) -> None:
        from bundle.plots import attention_overlays

        o = engine.state.output
        probs, attn, image = o["pred"].cpu(), o["attn"].cpu(), o["image"].cpu()
        size = image.shape[-2:]
        up = F.interpolate(attn.float(), size=size, mode="bilinear", align_corners=False)
        for b, idx in enumerate(o["index"].cpu().tolist()):
            path = self.records[idx]["image"]
            row = [idx, path]
            for c in range(len(self.classes)):
                r, col = divmod(int(torch.argmax(up[b, c])), size[-1])
                row += [f"{float(probs[b, c]):.6f}", r, col]
            self.rows.append(row)
            if self.save_overlays and is_rank0():
                stem = os.path.splitext(os.path.basename(path))[0]
                samples = [
                    {
                        "image": image[b, 0].numpy(),
                        "attn": attn[b, c].numpy(),
                        "mask": np.zeros(tuple(size)),
                        "class_index": c,
                        "score": float(probs[b, c]),
                    }
                    for c in range(len(self.classes))
                ]
                out = os.path.join(self.output_dir, "overlays", f"{idx:05d}_{stem}.png")
                attention_overlays(samples, self.classes, out, title=os.path.basename(path), ncols=len(self.classes))

    def _done(self, engine: Engine) -> None:
        if not is_rank0():
            return
        buf = io.StringIO()
        w = csv.writer(buf)
        head = [f"{k}_{c}" for c in self.classes for k in ("prob", "attn_peak_row", "attn_peak_col")]
        w.writerow(["index", "image"] + head)
        w.writerows(sorted(self.rows, key=lambda r: r[0]))
        path = os.path.join(self.output_dir, "predictions.csv")
        write_text_atomic(path, buf.getvalue())
        logger.info(f"inference: {len(self.rows)} images -> {path}")
