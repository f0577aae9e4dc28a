"""Keeps a few positive, annotated (sample, class) pairs of an evaluation run for the attention-overlay figure."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events

from bundle.utils.dist import is_rank0

__all__ = ["OverlaySampler"]


class OverlaySampler:
    """Keeps the first ``n`` positive, annotated (sample, class) pairs seen: image, attention, mask (rank 0)."""

    def __init__(self, n: int = 16):
        self.n, self.samples = n, []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if len(self.samples) >= self.n or not is_rank0():
            return
        o = engine.state.output
        if "attn" not in o or "attn_mask" not in o:
            return
        label, mask = o["label"].cpu(), o["attn_mask"].cpu()
        for b, c in zip(*torch.nonzero((label == 1) & (mask.flatten(2).amax(-1) > 0), as_tuple=True), strict=True):
            if len(self.samples) >= self.n:
                break
            self.samples.append(
                {
                    "index": int(o["index"][b]),
                    "class_index": int(c),
                    "score": float(o["pred"][b, c]),
                    "image": o["image"][b, 0].cpu().numpy(),
                    "attn": o["attn"][b, c].cpu().numpy(),
                    "mask": mask[b, c].numpy(),
                }
            )
