"""The experimental knobs of the paper that decide what the alignment loss sees.

- alignment fraction p: a seeded share of the training samples whose human masks feed L_AL. The
  subsets are nested (prefixes of one seeded permutation of the images), so p = .25 lies inside p = .5
  and levels differ only in p. ``alignment_fraction_of``: p of all training images ("all", the default
  reading of the paper) or of the images that carry a human mask on a positive finding ("annotated").
- random alignment (ablation): the human masks of the aligned pairs are replaced, every epoch, by
  random shapes at random positions with the same area as the mask they replace (so the area
  distribution equals the real one exactly).
- training data ratio: a seeded, nested, patient-level subsample of the training split.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from bundle.data.splits import nested_patient_subset, subsample_patients

__all__ = ["prepare_training_records", "has_annotated_positive", "AlignFlagsd", "RandomAttentiond", "random_shape_mask"]

ALIGN_SUBSET_KEY = "in_align_subset"
FRACTION_OF = ("all", "annotated")


def has_annotated_positive(record: Mapping, classes: Sequence[str] | None = None) -> bool:
    """Whether ``record`` has a human localisation (``attention`` entry) on a class it is positive for.

    Without ``classes`` (the label order) any attention entry counts (datalists put them on positives only; a mask on
    a negative is a validation warning)."""
    entries = [a for a in (record.get("attention") or []) if isinstance(a, Mapping)]
    if classes is None:
        return bool(entries)
    label = np.asarray(record.get("label", []), dtype=float).reshape(-1)
    positive = {str(c) for c, y in zip(classes, label, strict=False) if y == 1}
    return any(str(a.get("class")) in positive for a in entries)


def prepare_training_records(
    records: Sequence[Mapping],
    data_ratio: float = 1.0,
    alignment_fraction: float = 1.0,
    seed: int = 0,
    alignment_fraction_of: str = "all",
    classes: Sequence[str] | None = None,
) -> list[dict]:
    """Apply the training data ratio (patient level) and mark the alignment subset (sample level).

    Both draws are seeded and nested. Returns shallow copies of the records with
    ``in_align_subset`` (bool) added; the input is left unchanged.

    ``alignment_fraction_of``: "all" (default): p of all kept training images are in the subset (images without a
    human mask in it contribute no L_AL); "annotated": p of the kept images that have a human mask on a positive
    finding (``has_annotated_positive``; ``classes`` = the label order), exactly round(p * n) of them, the others
    never. Both are prefixes of one seeded permutation, so the subsets are nested across p.
    """
    if not 0.0 < data_ratio <= 1.0:
        raise ValueError(f"data_ratio must be in (0, 1], got {data_ratio}: it is the share of training patients kept")
    if not 0.0 <= alignment_fraction <= 1.0:
        raise ValueError(f"alignment_fraction (p) must be in [0, 1], got {alignment_fraction}")
    if alignment_fraction_of not in FRACTION_OF:
        raise ValueError(f"alignment_fraction_of={alignment_fraction_of!r}: use one of {FRACTION_OF}")
    kept = subsample_patients(records, data_ratio, seed=seed) if data_ratio < 1.0 else list(records)
    # Sample level (key = image path): p is "the share of the samples whose human masks are used".
    # A different seed stream than the data ratio, so the two draws are independent.
    if alignment_fraction_of == "all":
        selected = nested_patient_subset(kept, alignment_fraction, seed=seed + 7919, key="image")
    else:
        eligible = [i for i, r in enumerate(kept) if has_annotated_positive(r, classes)]
        chosen = nested_patient_subset([kept[i] for i in eligible], alignment_fraction, seed=seed + 7919, key="image")
        selected = np.zeros(len(kept), dtype=bool)
        selected[[i for i, c in zip(eligible, chosen, strict=True) if c]] = True
    out = []
    for rec, sel in zip(kept, selected, strict=True):
        r = dict(rec)
        r[ALIGN_SUBSET_KEY] = bool(sel)
        out.append(r)
    return out


class AlignFlagsd(MapTransform):
    """``align[c] = label[c] == 1 and attn_available[c] and record in the alignment subset``.

    Records without ``in_align_subset`` (validation, test) are never aligned.
    """

    def __init__(self, label_key="label", avail_key="attn_available", out_key="align", subset_key=ALIGN_SUBSET_KEY):
        super().__init__(keys=[label_key], allow_missing_keys=False)
        self.label_key, self.avail_key, self.out_key, self.subset_key = label_key, avail_key, out_key, subset_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        label = torch.as_tensor(np.asarray(d[self.label_key]), dtype=torch.float32)
        avail = torch.as_tensor(np.asarray(d.get(self.avail_key, np.zeros(label.shape))), dtype=torch.float32)
        in_subset = float(bool(d.get(self.subset_key, False)))
        d[self.out_key] = ((label == 1).float() * (avail > 0).float() * in_subset).float()
        return d


def random_shape_mask(shape: tuple[int, int], area: float, rng: np.random.RandomState, valid=None) -> np.ndarray:
    """A random ellipse, rectangle or blob of ``area`` pixels (within ~10%) at a random position.

    ``valid`` (bool array) restricts the centre to the image content (not the letterbox padding).
    Shapes clipped by the border or self-overlapping (blobs) are grown until the area matches.
    """
    h, w = shape
    area = float(np.clip(area, 4.0, 0.5 * h * w))
    kind = rng.randint(3)
    aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
    if valid is not None and valid.any():
        ys, xs = np.nonzero(valid)
        j = rng.randint(len(ys))
        cy, cx = float(ys[j]), float(xs[j])
    else:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    offsets = rng.normal(0, 1, size=(3, 2))  # blob disc offsets, in units of the disc radius
    yy, xx = np.ogrid[:h, :w]

    def draw(a_target: float) -> np.ndarray:
        if kind == 0:  # ellipse: pi * a * b = area
            b = math.sqrt(a_target / (math.pi * aspect))
            return ((xx - cx) / (aspect * b)) ** 2 + ((yy - cy) / b) ** 2 <= 1.0
        if kind == 1:  # rectangle: (2a)(2b) = area
            b = math.sqrt(a_target / (4 * aspect))
            return (np.abs(xx - cx) <= aspect * b) & (np.abs(yy - cy) <= b)
        r = math.sqrt(a_target / (3 * math.pi))  # blob: union of three discs
        m = np.zeros((h, w), bool)
        for oy, ox in offsets * r:
            m |= (xx - cx - ox) ** 2 + (yy - cy - oy) ** 2 <= r * r
        return m

    target, m = area, draw(area)
    for _ in range(6):
        got = float(m.sum())
        if got > 0 and abs(got - area) <= 0.1 * area:
            break
        target *= area / max(got, 1.0)
        target = min(target, 4.0 * h * w)
        m = draw(target)
    return m.astype(np.float32)


class RandomAttentiond(Randomizable, MapTransform):
    """Random-alignment ablation: replace the masks of the aligned pairs by random shapes, new every call.

    Used after caching in the training transforms, so every epoch draws new shapes. The area of each
    random shape equals the area of the human mask it replaces; the centre lies in the image content
    (the non-padded region given by ``letterbox``), so shapes never sit entirely in the padding.
    """

    def __init__(self, mask_key="attn_mask", align_key="align", letterbox_key="letterbox", enabled: bool = True):
        super().__init__(keys=[mask_key], allow_missing_keys=False)
        self.mask_key, self.align_key, self.letterbox_key, self.enabled = mask_key, align_key, letterbox_key, enabled

    def randomize(self, data=None) -> None:  # randomness is drawn inside __call__ from self.R
        pass

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        mask = d[self.mask_key]
        align = np.asarray(d[self.align_key]).reshape(-1)
        is_tensor = isinstance(mask, torch.Tensor)
        m = mask.detach().cpu().numpy() if is_tensor else np.asarray(mask)
        m = m.copy()
        h, w = m.shape[-2:]
        valid = None
        if self.letterbox_key in d:
            lb = np.asarray(d[self.letterbox_key], dtype=float).reshape(-1)
            scale, top, left, oh, ow = lb[:5]
            valid = np.zeros((h, w), bool)
            valid[int(top) : int(round(top + oh * scale)), int(left) : int(round(left + ow * scale))] = True
        for c in np.nonzero(align > 0)[0]:
            area = float(m[c].sum())
            if area > 0:
                m[c] = random_shape_mask((h, w), area, self.R, valid)
        d[self.mask_key] = torch.as_tensor(m) if is_tensor else m
        return d
