"""Per-(sample, class) attention-alignment values of one batch: pointing-game hit, IoU and attention mass in the mask.

The torch side of the alignment metrics: the evaluator's batched attention maps and human masks become one value
per pair, NaN where the pair has no human mask (or the record says none is available). The hit and the IoU are
CheXlocalize's, from :mod:`bundle.metrics.localization`; the summaries with CIs are
:func:`bundle.metrics.pair_metric_report`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .localization import hit_rate, iou

__all__ = ["attention_mass_in_mask", "pair_alignment", "PAIR_KEYS"]

# The per-pair values pair_alignment returns, in the order they are collected.
PAIR_KEYS = ("hit", "iou", "mass")


def attention_mass_in_mask(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of each attention map's mass that falls inside the human mask, per (sample, class).

    ``attn`` (B, C, h, w) sums to 1 over patches; ``mask`` (B, C, H, W) with H, W multiples of h, w.
    The mask is area-pooled to the patch grid (the fraction of each patch it covers), so the value is
    exact for patch-constant attention. Written by hand: no library offers this alignment measure.
    """
    cover = F.adaptive_avg_pool2d(mask.float(), attn.shape[-2:])
    a = attn.float()
    return (a * cover).flatten(2).sum(-1) / a.flatten(2).sum(-1).clamp_min(1e-12)


def pair_alignment(
    attn: torch.Tensor, mask: torch.Tensor, available: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``{"hit", "iou", "mass"}``: (B, C) float32 CPU tensors, NaN where the pair has no (available) human mask.

    ``attn`` (B, C, h, w) attention maps, ``mask`` (B, C, H, W) human masks, ``available`` (B, C) optional flags.
    One implementation of the CheXlocalize pointing game and mIoU (Otsu threshold) for every caller.
    """
    n, c = attn.shape[:2]
    has = mask.flatten(2).amax(-1) > 0
    if available is not None:
        has = has & (available > 0)
    maps = attn.float().reshape(n * c, *attn.shape[-2:]).cpu().numpy()
    masks = mask.float().reshape(n * c, *mask.shape[-2:]).cpu().numpy()
    nan = torch.tensor(float("nan"))
    has = has.cpu()
    out = {}
    for key, values in (("hit", hit_rate(maps, masks)), ("iou", iou(maps, masks, threshold="otsu"))):
        v = torch.as_tensor(np.asarray(values, dtype=np.float32)).reshape(n, c)
        out[key] = torch.where(has, v, nan)
    out["mass"] = torch.where(has, attention_mass_in_mask(attn, mask).cpu(), nan)
    return out
