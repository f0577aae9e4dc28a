"""Attention alignment: CheXlocalize hit rate (pointing game) and mIoU, per class and per subgroup, with CIs.

Semantics follow CheXlocalize (Saporta et al. 2022, ``eval.py`` / ``heatmap_to_segmentation.py``): the map is
upsampled bilinearly to the mask's size with PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``
rule (re-implemented here in numpy as two interpolation matrices, so no torch is needed and the same numbers
come out); hit = mask[argmax] == 1; pairs with an empty mask are NaN and excluded. mIoU: min-max normalise,
quantise to uint8 as CheXlocalize does, Otsu threshold (skimage) or a fixed threshold, IoU with the mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from skimage.filters import threshold_otsu

from bundle.demographics import UNKNOWN, clean_labels, natural_key

from .bootstrap import default_chunk, patient_index, patient_strata, patient_weights, percentile_ci
from .report import _jsonable

__all__ = ["upsample_bilinear", "hit_rate", "iou", "miou", "pair_metric_report", "hit_rate_report", "miou_report"]


@lru_cache(maxsize=64)
def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights with half-pixel centres (torch align_corners=False)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)  # torch clamps negative sources to 0
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    interp = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(interp, (rows, i0), 1.0 - lam)
    np.add.at(interp, (rows, i1), lam)
    interp.setflags(write=False)
    return interp


def upsample_bilinear(maps, size: tuple[int, int]) -> np.ndarray:
    """Resize (h, w) or (K, h, w) maps to ``size`` = (H, W), bilinear, align_corners=False (no antialiasing)."""
    a = np.asarray(maps, dtype=np.float64)
    if a.ndim not in (2, 3):
        raise ValueError(f"upsample_bilinear: expected (h, w) or (K, h, w) maps, got shape {a.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    interp_y, interp_x = _interp_matrix(a.shape[-2], out_h), _interp_matrix(a.shape[-1], out_w)
    return interp_y @ a @ interp_x.T


def _pairs(attention, masks, name: str):
    if isinstance(attention, np.ndarray) and attention.ndim == 2:
        attention, masks = attention[None], np.asarray(masks)[None]
    att = list(attention)
    msk = list(masks)
    if len(att) != len(msk):
        raise ValueError(f"{name}: {len(att)} attention maps but {len(msk)} masks; give one mask per map")
    for k, (a, m) in enumerate(zip(att, msk, strict=False)):
        a, m = np.asarray(a), np.asarray(m)
        if a.ndim != 2 or m.ndim != 2:
            raise ValueError(f"{name}: pair {k}: attention {a.shape} and mask {m.shape} must both be 2-D")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name}: attention map {k} contains NaN or inf")
        if m.dtype != bool and not np.all(np.isin(m, (0, 1))):
            raise ValueError(
                f"{name}: mask {k} is not binary (values {np.unique(m)[:5].tolist()}); rasterise "
                "annotations to 0/1 masks (boxes: the union of the boxes)"
            )
        yield a, m


def hit_rate(attention, masks) -> np.ndarray:
    """Per-pair pointing-game hits: 1.0 if the argmax pixel of the upsampled map lies in the mask, else 0.0; NaN
    where the mask is empty (excluded). ``np.nanmean`` of the result is the hit rate.

    attention: (K, h, w) array or a list of 2-D maps; masks: (K, H, W) array or a list of 2-D 0/1 masks. The map
    is upsampled to its mask's size first; the first maximum in row-major order is taken (numpy argmax, as in
    CheXlocalize).
    """
    out = []
    for a, m in _pairs(attention, masks, "hit_rate"):
        if not m.any():
            out.append(math.nan)
            continue
        up = upsample_bilinear(a, m.shape)
        r, c = np.unravel_index(int(np.argmax(up)), up.shape)
        out.append(1.0 if m[r, c] == 1 else 0.0)
    return np.asarray(out, dtype=float)


def _segment(up: np.ndarray, threshold) -> np.ndarray:
    lo, hi = up.min(), up.max()
    norm = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold={threshold!r}: use 'otsu' or a number in [0, 1]")
        q = (255 * norm).astype(np.uint8)  # CheXlocalize: np.uint8(255 * normalised map), then Otsu on uint8
        if q.min() == q.max():
            return np.zeros(q.shape, dtype=bool)  # a flat map points nowhere
        return q > threshold_otsu(q)
    t = float(threshold)
    if not 0 <= t <= 1:
        raise ValueError(f"threshold={t}: a fixed threshold applies to the min-max normalised map, use [0, 1]")
    return norm >= t


def iou(attention, masks, threshold="otsu") -> np.ndarray:
    """Per-pair IoU of the thresholded, upsampled map with the mask; NaN where the mask is empty (excluded).

    The map is upsampled to the mask's size, min-max normalised, then binarised: "otsu" (default) applies
    skimage's Otsu threshold to the uint8-quantised map (foreground = above the threshold, as CheXlocalize's
    cv2.THRESH_OTSU); a number t in [0, 1] keeps normalised values >= t. An empty prediction gives IoU 0.
    """
    out = []
    for a, m in _pairs(attention, masks, "iou"):
        m = m.astype(bool)
        if not m.any():
            out.append(math.nan)
            continue
        seg = _segment(upsample_bilinear(a, m.shape), threshold)
        out.append(float(np.logical_and(seg, m).sum() / np.logical_or(seg, m).sum()))
    return np.asarray(out, dtype=float)


def miou(attention, masks, threshold="otsu") -> float:
    """Mean IoU over the pairs with a non-empty mask (NaN if there are none)."""
    v = iou(attention, masks, threshold)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


def _cells_per_pair(values, labels, available):
    vals = np.asarray(values, dtype=float)
    lab = np.asarray(labels, dtype=float)
    if vals.ndim == 1:
        vals, lab = vals[:, None], lab.reshape(-1, 1)
    if vals.shape != lab.shape:
        raise ValueError(f"values shape {vals.shape} != labels shape {lab.shape}; both must be (N, C)")
    valid = (lab == 1) & np.isfinite(vals)
    if available is not None:
        av = np.asarray(available, dtype=float).reshape(vals.shape)
        valid &= av > 0
    return vals, valid


def pair_metric_report(
    values,
    labels,
    classes: Sequence[str] | None = None,
    groups: Mapping[str, Sequence] | None = None,
    patient_id=None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    available=None,
    min_count: int = 5,
    name: str = "hit_rate",
) -> dict:
    """Mean of a per-(image, class) value (hit, IoU) over positive, annotated pairs, per class, pooled over
    classes, and per subgroup, with patient-clustered bootstrap CIs (stratified by subgroup for group entries).

    values (N, C): NaN = no annotation / empty mask (excluded); labels (N, C): only label 1 pairs count;
    available (N, C) optional: pairs with 0 are excluded. Subgroup gaps (max - min) leave out "unknown" and groups
    with fewer than ``min_count`` pairs, with the reason.
    """
    vals, valid = _cells_per_pair(values, labels, available)
    n_samples, n_cls = vals.shape
    classes = [f"class_{i}" for i in range(n_cls)] if classes is None else [str(c) for c in classes]
    if len(classes) != n_cls:
        raise ValueError(f"classes: need {n_cls} names, got {len(classes)}")
    pidx, n_pat = patient_index(patient_id, n_samples)
    v0 = np.where(valid, vals, 0.0)
    attrs = {}
    for a, lab in (groups or {}).items():
        lab = clean_labels(lab)
        if lab.shape != (n_samples,):
            raise ValueError(f"groups[{a!r}] has {lab.size} values but there are {n_samples} samples")
        attrs[str(a)] = lab

    def cells(codes, n_groups):
        # per patient sums of value and count for each (group, class) cell and for (group, all classes)
        n_cells = n_groups * (n_cls + 1)
        sums = np.zeros((n_pat, n_cells))
        counts = np.zeros((n_pat, n_cells))
        for i in range(n_cls):
            np.add.at(sums, (pidx, codes * (n_cls + 1) + i), v0[:, i])
            np.add.at(counts, (pidx, codes * (n_cls + 1) + i), valid[:, i])
        np.add.at(sums, (pidx, codes * (n_cls + 1) + n_cls), v0.sum(axis=1))
        np.add.at(counts, (pidx, codes * (n_cls + 1) + n_cls), valid.sum(axis=1))
        return sums, counts

    def estimate(codes, n_groups, stream):
        sums, counts = cells(codes, n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            point = sums.sum(0) / counts.sum(0)
        boots = None
        if n_boot > 0:
            boots = np.empty((sums.shape[1], n_boot))
            start = 0
            for wts in patient_weights(patient_strata(pidx, codes, n_pat), n_boot, seed, stream, default_chunk(n_pat)):
                wts_f = wts.astype(np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    boots[:, start : start + wts.shape[0]] = ((wts_f @ sums) / (wts_f @ counts)).T
                start += wts.shape[0]
        return point, counts.sum(0).astype(int), boots

    def cell(point, n, boots, k):
        return {
            "value": point[k],
            "n_pairs": int(n[k]),
            "ci": _ci(boots[k], ci) if boots is not None and n[k] > 0 else None,
        }

    point, n, boots = estimate(np.zeros(n_samples, np.int64), 1, 0)
    report = {
        "metric": name,
        "n_boot": n_boot,
        "ci": ci,
        "min_count": min_count,
        "pairs": "label == 1, finite value (non-empty mask)" + (", available" if available is not None else ""),
        "per_class": {c: cell(point, n, boots, i) for i, c in enumerate(classes)},
        "all_classes": cell(point, n, boots, n_cls),
    }
    pc = np.asarray([point[i] for i in range(n_cls)], dtype=float)
    report["macro"] = {
        "value": float(np.nanmean(pc)) if np.isfinite(pc).any() else math.nan,
        "n_classes": int(np.isfinite(pc).sum()),
    }
    report["groups"] = {}
    for k_attr, (a, lab) in enumerate(attrs.items()):
        order = sorted(set(lab.tolist()), key=natural_key)
        lookup = {g: j for j, g in enumerate(order)}
        codes = np.fromiter((lookup[v] for v in lab.tolist()), dtype=np.int64, count=n_samples)
        point, n, boots = estimate(codes, len(order), k_attr + 1)
        entry = {"groups": {}, "gaps": {}}
        for j, g in enumerate(order):
            base = j * (n_cls + 1)
            entry["groups"][g] = {
                "all_classes": cell(point, n, boots, base + n_cls),
                "per_class": {c: cell(point, n, boots, base + i) for i, c in enumerate(classes)},
            }
        for i, c in enumerate(classes + ["all_classes"]):
            use, excluded = [], {}
            for j, g in enumerate(order):
                k = j * (n_cls + 1) + i
                if g == UNKNOWN:
                    excluded[g] = "unknown attribute value"
                elif n[k] < max(min_count, 1):
                    excluded[g] = f"{n[k]} pairs < min_count={min_count}"
                else:
                    use.append(k)
            vals_g = point[use]
            gap = float(vals_g.max() - vals_g.min()) if len(use) >= 2 else math.nan
            gci = None
            if boots is not None and len(use) >= 2:
                b = boots[use]
                ok = np.isfinite(b)
                g_b = np.where(ok.sum(0) >= 2, np.where(ok, b, -np.inf).max(0) - np.where(ok, b, np.inf).min(0), np.nan)
                gci = _ci(g_b, ci)
            entry["gaps"][c] = {
                "gap": gap,
                "ci": gci,
                "groups": [order[k // (n_cls + 1)] for k in use],
                "excluded": excluded,
            }
        report["groups"][a] = entry
    return _jsonable(report)


def _ci(samples, ci):
    lo, hi = percentile_ci(samples, ci)
    return [float(lo), float(hi)]


def _per_pair(fn, attention, masks, labels, available, **kw) -> np.ndarray:
    """Apply a per-pair function to the positive (and available) (image, class) pairs; others NaN."""
    lab = np.asarray(labels, dtype=float)
    if lab.ndim != 2:
        raise ValueError(f"labels: expected (N, C), got shape {lab.shape}")
    n_samples, n_cls = lab.shape
    want = lab == 1
    if available is not None:
        want &= np.asarray(available, dtype=float).reshape(n_samples, n_cls) > 0
    out = np.full((n_samples, n_cls), np.nan)
    idx = np.argwhere(want)
    if idx.size:
        att = [np.asarray(attention[i][c]) for i, c in idx]
        msk = [np.asarray(masks[i][c]) for i, c in idx]
        out[idx[:, 0], idx[:, 1]] = fn(att, msk, **kw)
    return out


def hit_rate_report(
    attention,
    masks,
    labels,
    classes=None,
    groups=None,
    patient_id=None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    available=None,
    min_count: int = 5,
) -> dict:
    """Hit rate per class, pooled, and per subgroup with bootstrap CIs, over positive annotated pairs.

    attention (N, C, h, w), masks (N, C, H, W) (arrays or nested lists), labels (N, C); see pair_metric_report.
    """
    hits = _per_pair(hit_rate, attention, masks, labels, available)
    return pair_metric_report(
        hits, labels, classes, groups, patient_id, n_boot, seed, ci, available, min_count, name="hit_rate"
    )


def miou_report(
    attention,
    masks,
    labels,
    classes=None,
    groups=None,
    patient_id=None,
    threshold="otsu",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    available=None,
    min_count: int = 5,
) -> dict:
    """mIoU per class, pooled, and per subgroup with bootstrap CIs, over positive annotated pairs."""
    ious = _per_pair(iou, attention, masks, labels, available, threshold=threshold)
    rep = pair_metric_report(
        ious, labels, classes, groups, patient_id, n_boot, seed, ci, available, min_count, name="miou"
    )
    rep["threshold"] = threshold
    return rep
