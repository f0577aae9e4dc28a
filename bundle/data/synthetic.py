"""The built-in synthetic chest X-ray benchmark (docs/synthetic.md): the positive control of the study.

A seeded generator of chest-like radiographs with three findings and exact masks, plus a planted
SPURIOUS SHORTCUT: per class, a bright "device tag" glyph at a fixed place on the top edge whose
presence correlates with the label, strongly in one subgroup (by default: women or age >= 60) and
weakly in the rest, in site A (training / validation / test). In site B (test_ood: DICOM
MONOCHROME1, another size, contrast, noise and blur) the tag is independent of the label. A model
that reads the tag is therefore unfair (group-dependent reliance) and brittle out of domain; a model
that looks at the findings (e.g. aligned to the masks) is neither.

Generation is two-staged: :func:`plan` draws every patient, label, tag and annotation decision
(cheap, sequential, seeded), then :func:`render` draws each image from its own
``SeedSequence([seed, split, index])`` streams (vectorised numpy on cached grids), so the bytes do not
depend on the number of worker processes. :func:`ensure_synthetic` generates on first use only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import numpy as np

from bundle.data import datalist as dl
from bundle.data.splits import patient_split
from bundle.demographics import age_groups, sex_label

__all__ = [
    "CLASSES",
    "SPLITS",
    "SyntheticParams",
    "ensure_synthetic",
    "generate",
    "params_hash",
    "plan",
    "render",
    "save_sample_grid",
    "shortcut_stats",
    "synthetic_summary",
    "windowed_dicom",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
CLASSES = ("nodule_mass", "pleural_effusion", "edema")
SPLITS = ("training", "validation", "test", "test_ood")
SPLIT_CODE = {"training": 0, "validation": 1, "test": 2, "test_ood": 3}
SITE_OF_SPLIT = {"training": "A", "validation": "A", "test": "A", "test_ood": "B"}
DATALIST_NAME = "datalist.json"
SUMMARY_NAME = "synthetic_summary.json"
_UID_ROOT = "cxr_aligner_fairness/synthetic"

# Site B DICOM encoding: modality value v = 0.5 * stored - 200; the VOI window maps [0, 1199] to the
# full display range. The collimation border is stored at 4095 (far outside the window), so naive
# min-max scaling of the stored values gives an inverted, washed-out picture while correct
# modality LUT + VOI window + MONOCHROME1 inversion reproduces the rendered image.
_DCM_SLOPE, _DCM_INTERCEPT, _DCM_CENTER, _DCM_WIDTH, _DCM_BITS = 0.5, -200.0, 600.0, 1200.0, 12
_PNG_BITS = 12  # significant bits of the site A 16-bit PNGs


@dataclass(frozen=True)
class SyntheticParams:
    """Every knob of the generator (all part of the params hash, so changing one regenerates)."""

    n_train: int = 2400  # images (approximate after the patient-level split)
    n_val: int = 400
    n_test: int = 600
    n_ood: int = 600
    size_a: tuple[int, int] = (256, 256)  # (height, width) of site A PNGs
    size_b: tuple[int, int] = (320, 288)  # (height, width) of site B DICOMs: not square on purpose
    images_per_patient: tuple[float, float, float] = (0.55, 0.3, 0.15)  # P(1), P(2), P(3 images)
    prevalence: tuple[float, float, float] = (0.3, 0.3, 0.3)  # per class at age 55
    prevalence_age_slope: float = 0.08  # prevalence change per 40 years of age
    label_persistence: float = 0.8  # P(a follow-up image keeps the patient's finding state)
    # finding contrast (display units; lung darkness is ~0.3): learnable but less salient than the tag
    # (0.22, 0.15, 0.05) was calibrated against a CLS-token ViT probe; the cross-attention VLM needed stronger
    # findings to learn them within the CPU budget of the demo and the quick study (docs/synthetic.md)
    finding_contrast: tuple[float, float, float] = (0.4, 0.3, 0.12)
    annotated_fraction: tuple[tuple[str, float], ...] = (
        ("training", 0.8), ("validation", 1.0), ("test", 1.0), ("test_ood", 1.0))
    # the shortcut: (P(tag | positive), P(tag | negative)) in the strong and the weak subgroup (site A)
    shortcut_strong: tuple[float, float] = (0.95, 0.05)
    shortcut_weak: tuple[float, float] = (0.65, 0.35)
    strong_sex: str = "F"
    strong_age_min: float = 60.0
    strong_rule: str = "or"  # "or" | "and" | "sex" | "age" | "none": who is in the strong subgroup
    ood_marker_rate: float = 0.5  # site B: P(tag) for positives and negatives alike
    marker_size: float = 0.075  # glyph side as a share of the image width
    marker_intensity: float = 1.0
    noise_a: float = 0.012
    noise_b: float = 0.03
    gamma_b: float = 0.7
    blur_b: float = 1.0  # pixels (Gaussian sigma)
    png_compress_level: int = 1  # zlib level of the site A PNGs (1: fast; 6 saves ~3% at 3x the time)

    @classmethod
    def from_kwargs(cls, **kw) -> SyntheticParams:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ValueError(f"unknown synthetic parameter(s) {unknown}; valid: {sorted(names)}")
        if isinstance(kw.get("annotated_fraction"), Mapping):
            merged = dict(cls.annotated_fraction) | dict(kw["annotated_fraction"])
            kw["annotated_fraction"] = tuple((s, float(merged[s])) for s in SPLITS if s in merged)
        for k, v in list(kw.items()):  # JSON/YAML give lists; the dataclass is hashable with tuples
            if isinstance(v, list):
                kw[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        p = cls(**kw)
        p.check()
        return p

    def check(self):
        for k in ("n_train", "n_val", "n_test", "n_ood"):
            if int(getattr(self, k)) < 0:
                raise ValueError(f"synthetic parameter {k} must be >= 0, got {getattr(self, k)}")
        for k in ("size_a", "size_b"):
            s = getattr(self, k)
            if len(s) != 2 or min(s) < 64 or s[0] % 2 or s[1] % 2:
                raise ValueError(f"synthetic parameter {k} must be (height, width), even and >= 64 px, got {s}")
        for k in ("shortcut_strong", "shortcut_weak"):
            if not all(0 <= x <= 1 for x in getattr(self, k)):
                raise ValueError(f"synthetic parameter {k} must be two probabilities, got {getattr(self, k)}")
        if self.strong_rule not in ("or", "and", "sex", "age", "none"):
            raise ValueError(f"strong_rule must be one of or/and/sex/age/none, got {self.strong_rule!r}")
        if len(self.prevalence) != len(CLASSES) or len(self.finding_contrast) != len(CLASSES):
            raise ValueError(f"prevalence and finding_contrast need one value per class {CLASSES}")
        if abs(sum(self.images_per_patient) - 1) > 1e-6:
            raise ValueError(f"images_per_patient must sum to 1, got {self.images_per_patient}")

    def annotated(self, split: str) -> float:
        return dict(self.annotated_fraction).get(split, 1.0)

    def in_strong_group(self, sex: str, age) -> bool:
        s = sex == self.strong_sex
        a = age is not None and age >= self.strong_age_min
        return {"or": s or a, "and": s and a, "sex": s, "age": a, "none": False}[self.strong_rule]


def params_hash(seed: int, params: SyntheticParams) -> str:
    blob = json.dumps({"seed": int(seed), "version": GENERATOR_VERSION, "params": asdict(params)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ================================================================================================ plan
def _draw_patient(seed: int, site: str, no: int, params: SyntheticParams) -> dict:
    """Sex, age, number of images and anatomy of one patient (its own seeded stream)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 10 + (site == "B"), no]))
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(np.clip(round(rng.normal(55, 17)), 18, 95))
    n_img = int(rng.choice(3, p=params.images_per_patient)) + 1
    male, a = float(sex == "M"), (age - 55) / 40.0
    n = rng.normal
    anatomy = {
        "body_w": 0.43 + 0.02 * male + n(0, 0.01),
        "tissue": 0.40 + n(0, 0.02),
        "lung_dx": 0.205 + 0.01 * male + n(0, 0.006),
        "lung_rx": 0.150 + 0.01 * male + n(0, 0.006),
        "lung_ry": 0.34 + n(0, 0.01),
        "lung_cy": 0.49 + n(0, 0.01),
        "lung_dark": 0.30 - 0.05 * a + n(0, 0.015),  # lungs less dark with age
        "dome_h": 0.055 - 0.01 * a + n(0, 0.008),  # flatter domes with age
        "dome_base": 0.80 + n(0, 0.01),
        "heart_r": 0.160 + 0.018 * male + 0.018 * max(a, -0.5) + n(0, 0.008),  # larger in men, with age
        "heart_int": 0.05 + n(0, 0.01),
        "rib_period": 0.070 + n(0, 0.003),
        "rib_phase": rng.random(),
        "rib_arc": 0.32 + 0.15 * max(a, 0.0) + n(0, 0.03),  # kyphosis: steeper rib arcs
        "rib_int": 0.075 - 0.02 * a + n(0, 0.006),  # osteopenia
        "breast": (0.85 + 0.4 * rng.random()) if sex == "F" else 0.0,
        "calc": float(np.clip((age - 50) / 30, 0, 1)) * (0.5 + 0.5 * rng.random()) if rng.random() < 0.8 else 0.0,
        "tex": [[float(x) for x in (rng.uniform(4, 11), rng.uniform(4, 11), rng.random(), rng.uniform(-1, 1))]
                for _ in range(3)],
    }
    return {"sex": sex, "age": age, "n_images": n_img, "anatomy": {k: (round(v, 6) if isinstance(v, float) else v)
                                                                   for k, v in anatomy.items()}}


def _site_patients(seed: int, site: str, n_images: int, params: SyntheticParams) -> list[dict]:
    """Image-level items (patient attributes and labels) for ``n_images`` images of one site."""
    items, no = [], 0
    while len(items) < n_images:
        pat = _draw_patient(seed, site, no, params)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 20 + (site == "B"), no]))
        ages = pat["age"] + np.sort(rng.integers(0, 3, size=pat["n_images"]))  # follow-ups within 2 years
        state = None
        for k in range(min(pat["n_images"], n_images - len(items))):
            age = int(min(ages[k], 95))
            prev = np.clip(np.asarray(params.prevalence) + params.prevalence_age_slope * (age - 55) / 40, 0.02, 0.95)
            fresh = (rng.random(len(CLASSES)) < prev).astype(int)
            if state is None:
                state = fresh
            else:
                keep = rng.random(len(CLASSES)) < params.label_persistence
                state = np.where(keep, state, fresh)
            items.append({"patient_id": f"{site}{no:05d}", "image_no": k, "site": site, "sex": pat["sex"],
                          "age": age, "label": [int(x) for x in state], "anatomy": pat["anatomy"]})
        no += 1
    return items


def _exact_choice(rng, idx: np.ndarray, p: float, carry: float = 0.0) -> tuple[set, float]:
    """round(p * n + carry) of ``idx`` and the rounding remainder to carry into the next cell.

    Stratified draws keep realised rates at the requested ones in every cell, and the carry keeps the
    total exact across many small cells."""
    target = p * len(idx) + carry
    k = min(len(idx), max(0, int(round(target))))
    chosen = set(idx[rng.permutation(len(idx))[:k]].tolist()) if k else set()
    return chosen, target - k


def plan(seed: int = 0, params: SyntheticParams | None = None) -> dict[str, list[dict]]:
    """Every decision except pixel geometry: patients, splits, labels, tags, annotations (no files)."""
    params = params or SyntheticParams()
    n_a = params.n_train + params.n_val + params.n_test
    site_a = _site_patients(seed, "A", n_a, params)
    fractions = {"training": params.n_train, "validation": params.n_val, "test": params.n_test}
    splits = patient_split(site_a, {k: v for k, v in fractions.items() if v > 0} or {"training": 1}, seed=seed) \
        if site_a else {}
    splits = {s: splits.get(s, []) for s in ("training", "validation", "test")}
    splits["test_ood"] = _site_patients(seed, "B", params.n_ood, params)
    out = {}
    for split in SPLITS:
        items = [dict(it, split=split, index=i) for i, it in enumerate(splits[split])]
        rng = np.random.default_rng(np.random.SeedSequence([seed, 200 + SPLIT_CODE[split]]))
        labels = np.asarray([it["label"] for it in items], dtype=int).reshape(len(items), len(CLASSES))
        strong = np.asarray([params.in_strong_group(it["sex"], it["age"]) for it in items], dtype=bool)
        tags = np.zeros_like(labels)
        annotated = np.zeros_like(labels)
        # cells = (sex, age group, subgroup strength): tags are drawn exactly per cell, so the realised
        # tag/label correlation is the requested one in every sex and age subgroup (0 in test_ood)
        ages = age_groups([it["age"] for it in items], list(dl.AGE_BINS))
        keys = [(it["sex"], str(g), bool(st)) for it, g, st in zip(items, ages, strong)]
        cells = {k: np.asarray([i for i, kk in enumerate(keys) if kk == k], dtype=int) for k in sorted(set(keys))}
        for c in range(len(CLASSES)):
            for y in (1, 0):
                carry = {}
                for (sex, group, is_strong), members in cells.items():
                    if split == "test_ood":  # the tag carries no information about the label here
                        p = params.ood_marker_rate
                    else:
                        p = (params.shortcut_strong if is_strong else params.shortcut_weak)[1 - y]
                    chosen, carry[p] = _exact_choice(rng, members[labels[members, c] == y], p, carry.get(p, 0.0))
                    for i in chosen:
                        tags[i, c] = 1
            pos = np.flatnonzero(labels[:, c] == 1)
            for i in _exact_choice(rng, pos, params.annotated(split))[0]:
                annotated[i, c] = 1
        for i, it in enumerate(items):
            it["shortcut"] = [int(x) for x in tags[i]]
            it["annotated"] = [int(x) for x in annotated[i]]
            it["strong_group"] = bool(strong[i])
        out[split] = items
    return out


# ================================================================================================ render
@lru_cache(maxsize=8)
def _grid(h: int, w: int):
    u = (np.arange(w, dtype=np.float32) + 0.5) / w
    v = (np.arange(h, dtype=np.float32) + 0.5) / h
    return np.broadcast_to(u[None, :], (h, w)), np.broadcast_to(v[:, None], (h, w))


_GLYPHS = (  # 5x5 tag glyphs, one per class: ring, plus, cross
    np.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]),
    np.array([[0, 0, 1, 0, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0], [0, 0, 1, 0, 0]]),
    np.array([[1, 0, 0, 0, 1], [0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 0, 0, 0, 1]]),
)
MARKER_POS = ((0.18, 0.06), (0.5, 0.06), (0.82, 0.06))  # (u, v) centres on the top edge, outside the lungs


@lru_cache(maxsize=16)
def _stamp(c: int, h: int, w: int, size: float, intensity: float):
    """The tag of class c as (y0, x0, patch): a dark square with a bright glyph, 7x7 cells."""
    cell = max(1, int(round(size * w / 7)))
    g = np.zeros((7, 7), np.float32)
    g[1:6, 1:6] = _GLYPHS[c] * intensity
    patch = np.kron(g, np.ones((cell, cell), np.float32))
    u, v = MARKER_POS[c]
    y0 = int(round(v * h - patch.shape[0] / 2))
    x0 = int(round(u * w - patch.shape[1] / 2))
    return max(y0, 0), max(x0, 0), patch


def _ramp(x, width):
    """Soft inside-ness: 0 below -width/2, 1 above width/2 (cheap stand-in for a smoothstep)."""
    return np.clip(x * (1.0 / width) + 0.5, 0.0, 1.0)


def _segment_d2(u, v, a, b):
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    t = np.clip(((u - ax) * dx + (v - ay) * dy) * (1.0 / (dx * dx + dy * dy)), 0.0, 1.0)
    return (u - ax - t * dx) ** 2 + (v - ay - t * dy) ** 2


def _upsample2(a: np.ndarray) -> np.ndarray:
    """Bilinear x2 upsampling with pixel-centre alignment and edge replication (what
    scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest") computes), written with slices because
    it is several times faster and runs on every image."""
    r = np.empty((2 * a.shape[0], a.shape[1]), a.dtype)
    q, t = 0.25 * a, 0.75 * a
    r[2::2] = t[1:] + q[:-1]
    r[1:-1:2] = t[:-1] + q[1:]
    r[0], r[-1] = a[0], a[-1]
    out = np.empty((r.shape[0], 2 * a.shape[1]), a.dtype)
    q, t = 0.25 * r, 0.75 * r
    out[:, 2::2] = t[:, 1:] + q[:, :-1]
    out[:, 1:-1:2] = t[:, :-1] + q[:, 1:]
    out[:, 0], out[:, -1] = r[:, 0], r[:, -1]
    return out


@lru_cache(maxsize=4)
def _noise_bank(h: int, w: int) -> np.ndarray:
    """Unit Gaussian noise fields, (4, 2h, 2w), from a fixed seed. Each image adds a window at a random
    offset: drawing 65k fresh normals per image costs more than all the anatomy."""
    return np.random.default_rng(np.random.SeedSequence([20250501, h, w])).standard_normal((4, 2 * h, 2 * w),
                                                                                          dtype=np.float32)


def _noise(rng, h: int, w: int) -> np.ndarray:
    bank = _noise_bank(h, w)
    k, oy, ox = int(rng.integers(4)), int(rng.integers(h)), int(rng.integers(w))
    return bank[k, oy:oy + h, ox:ox + w]


def _pose(rng) -> tuple[float, float, float, float]:
    """Small per-image pose change: shift, rotation, scale (as an inverse map of the grid)."""
    dx, dy = (float(x) for x in rng.normal(0, 0.012, 2))
    rot = float(np.deg2rad(rng.normal(0, 1.5)))
    sc = 1.0 + float(rng.normal(0, 0.025))
    return dx, dy, math.cos(rot) / sc, math.sin(rot) / sc


class _Grid:
    """Posed normalised coordinates (u = x / W, v = y / H of the patient) of an (h, w) image.

    Local structures are evaluated only in the pixel box that can contain them (``box``), which is
    what keeps the generator above 100 images/s per core.
    """

    def __init__(self, h: int, w: int, pose):
        self.h, self.w, self.pose = h, w, pose

    def coords(self, ys=slice(None), xs=slice(None)):
        dx, dy, c, s = self.pose
        u0, v0 = _grid(self.h, self.w)
        x, y = u0[ys, xs] - (0.5 + dx), v0[ys, xs] - (0.5 + dy)
        return c * x - s * y + 0.5, s * x + c * y + 0.5

    def at(self, row: int, col: int) -> tuple[float, float]:
        dx, dy, c, s = self.pose
        x, y = (col + 0.5) / self.w - 0.5 - dx, (row + 0.5) / self.h - 0.5 - dy
        return c * x - s * y + 0.5, s * x + c * y + 0.5

    def box(self, u0: float, u1: float, v0: float, v1: float):
        """Pixel slices covering the posed region [u0, u1] x [v0, v1] (+1 px), or None if off-image."""
        dx, dy, c, s = self.pose
        det = c * c + s * s
        cols, rows = [], []
        for uu in (u0, u1):
            for vv in (v0, v1):
                a, b = uu - 0.5, vv - 0.5
                cols.append(((c * a + s * b) / det + 0.5 + dx) * self.w - 0.5)
                rows.append(((-s * a + c * b) / det + 0.5 + dy) * self.h - 0.5)
        y0, y1 = max(0, math.floor(min(rows)) - 1), min(self.h, math.ceil(max(rows)) + 2)
        x0, x1 = max(0, math.floor(min(cols)) - 1), min(self.w, math.ceil(max(cols)) + 2)
        return (slice(y0, y1), slice(x0, x1)) if y1 > y0 and x1 > x0 else None


def _add_local(img, grid, region, fn):
    """img[box] += fn(u, v) over the pixel box of ``region`` = (u0, u1, v0, v1)."""
    box = grid.box(*region)
    if box is not None:
        img[box] += fn(*grid.coords(*box))


def _anatomy(grid: _Grid, an: dict) -> tuple[np.ndarray, np.ndarray]:
    """Healthy chest in display convention (lung dark, bone bright) and the soft lung map in [0, 1].

    Smooth structures only: it is evaluated at half resolution and upsampled (4x fewer pixel ops).
    """
    u, v = grid.coords()
    ax = np.abs(u - 0.5)
    # body: thorax sides and shoulders; air (dark) outside
    top = 0.02 + 0.28 * np.clip((ax - 0.07) * (1.0 / 0.38), 0, 1) ** 2
    body = _ramp(an["body_w"] - ax, 0.03) * _ramp(v - top, 0.03)
    img = 0.05 + body * (an["tissue"] + 0.12 * v)
    # lungs: superellipses, narrow at the apex and widening downwards, cut by the diaphragm domes
    lung = np.zeros_like(img)
    apex = an["lung_cy"] - an["lung_ry"]
    t = np.clip((v - apex) * (1.0 / (0.9 * an["lung_ry"])), 0, 1)
    taper = 1.0 / (an["lung_rx"] * (0.55 + 0.45 * t * (2.0 - t)))
    py = (v - an["lung_cy"]) * (1.0 / an["lung_ry"])
    py2 = py * py
    py4 = py2 * py2
    for s in (-1.0, 1.0):
        cx = 0.5 + s * an["lung_dx"]
        px = (u - cx - s * 0.03 * t) * taper
        px2 = px * px
        e = 0.5 * (px2 + py2) + 0.5 * (px2 * px2 + py4)
        base = an["dome_base"] + (0.02 if s > 0 else 0.0)  # the left (image right) dome sits lower
        dome = base - an["dome_h"] * (1 - np.clip(((u - cx) * (1.0 / (1.15 * an["lung_rx"]))) ** 2, 0, 1))
        np.maximum(lung, _ramp(1.0 - e, 0.08) * _ramp(dome - v, 0.012), out=lung)
    # heart (shifted to the patient's left = image right), mediastinum and aortic knob cover the medial lungs
    hr = an["heart_r"]
    hx = (u - 0.535) * (1.0 / hr)
    hy = (v - 0.655) * (1.0 / (0.72 * hr))
    heart = _ramp(1.0 - (hx * hx + hy * hy), 0.15)
    med = _ramp(0.06 + 0.03 * v - ax, 0.02) * _ramp(v - 0.08, 0.04) * _ramp(0.75 - v, 0.04)
    cover = np.maximum(heart, med)
    box = grid.box(0.5, 0.59, 0.26, 0.34)
    if box is not None:
        ku, kv = grid.coords(*box)
        knob = _ramp(1.0 - ((ku - 0.545) ** 2 + (kv - 0.30) ** 2) * (1.0 / 0.035 ** 2), 0.2)
        np.maximum(cover[box], knob, out=cover[box])
    lung_vis = lung * (1.0 - cover)
    img += 0.05 * cover + an["heart_int"] * heart - an["lung_dark"] * lung_vis
    # vascular markings: brighter near the hila, a faint texture (the perihilar look of normal lungs)
    tex = np.cos(2 * np.pi * (an["tex"][0][0] * u + an["tex"][0][3] * an["tex"][0][1] * v + an["tex"][0][2]))
    for fu, fv, ph, sgn in an["tex"][1:]:
        tex += np.cos(2 * np.pi * (fu * u + sgn * fv * v + ph))
    img += 0.012 * lung_vis * tex
    for s in (-1.0, 1.0):
        hu = 0.5 + s * 0.1
        box = grid.box(hu - 0.19, hu + 0.19, 0.46 - 0.245, 0.46 + 0.245)
        if box is not None:
            bu, bv = grid.coords(*box)
            d = np.clip(1.0 - ((bu - hu) ** 2 + 0.6 * (bv - 0.46) ** 2) * (1.0 / 0.035), 0, 1)
            img[box] += 0.07 * lung_vis[box] * d * d
    # posterior ribs: periodic bands in a warped coordinate (arcs rise from the spine, then fall laterally)
    rib_v = v + an["rib_arc"] * ax - 1.5 * ax * ax
    ribs = np.clip((np.cos(2 * np.pi * (rib_v * (1.0 / an["rib_period"]) + an["rib_phase"])) - 0.45) * 3.0, 0, 1)
    cage = _ramp(an["body_w"] - 0.03 - ax, 0.03) * _ramp(ax - 0.04, 0.02) * _ramp(v - 0.1, 0.04) \
        * _ramp(0.82 - v, 0.06)
    img += an["rib_int"] * ribs * cage
    # spine (faint through the mediastinum) with vertebral bodies
    _add_local(img, grid, (0.45, 0.55, 0.0, 1.0),
               lambda bu, bv: 0.05 * _ramp(0.032 - np.abs(bu - 0.5), 0.01) * (0.8 + 0.2 * np.cos(2 * np.pi * bv * 14.0))
               * _ramp(bv - 0.05, 0.05))
    # clavicles
    for s in (-1.0, 1.0):
        a, b = (0.5 + s * 0.05, 0.17), (0.5 + s * 0.33, 0.11)
        _add_local(img, grid, (min(a[0], b[0]) - 0.02, max(a[0], b[0]) + 0.02, 0.09, 0.19),
                   lambda bu, bv: 0.12 * np.clip((0.014 ** 2 - _segment_d2(bu, bv, a, b)) * (1.0 / (0.5 * 0.014 ** 2)),
                                                 0, 1))
    # breast shadows (women): soft domes over the lower lateral lung fields with a sharp lower fold
    if an["breast"] > 0:
        bs = an["breast"]
        for s in (-1.0, 1.0):
            cu = 0.5 + s * 0.24

            def breast(bu, bv, cu=cu):
                bx = (bu - cu) * (1.0 / (0.17 * bs))
                by = (bv - 0.70) * (1.0 / (0.14 * bs))
                return 0.16 * np.clip(1.0 - (bx * bx + by * by), 0, 1) * _ramp(0.70 + 0.12 * bs - bv, 0.01)

            _add_local(img, grid, (cu - 0.17 * bs, cu + 0.17 * bs, 0.70 - 0.14 * bs, 0.70 + 0.14 * bs), breast)
    # age: calcified aortic knob (a bright arc on the knob's upper-left rim)
    if an["calc"] > 0:
        def calc(bu, bv):
            r2 = (bu - 0.545) ** 2 + (bv - 0.30) ** 2
            ring = np.clip(1.0 - np.abs(r2 - 0.033 ** 2) * (1.0 / (0.006 ** 2)), 0, 1)
            return 0.16 * an["calc"] * ring * ((bv < 0.30) & (bu < 0.56))

        _add_local(img, grid, (0.5, 0.59, 0.26, 0.34), calc)
    return img.astype(np.float32, copy=False), lung


def _nodules(grid: _Grid, an, lung, rng):
    """1-3 round nodules or one lobulated mass inside the lungs: [(box, layer)]."""
    ys, xs = np.nonzero(lung)
    if len(ys) == 0:
        return []
    blobs = [(rng.uniform(0.03, 0.045), 1)] * int(rng.integers(1, 4)) if rng.random() < 0.7 \
        else [(rng.uniform(0.055, 0.08), 3)]
    h, w = grid.h, grid.w
    out = []
    for r, lobes in blobs:
        for _ in range(50):  # a centre whose disc lies inside the lung
            k = int(rng.integers(len(ys)))
            ry, rx = int(r * h), int(r * w)
            if all(lung[min(h - 1, max(0, ys[k] + dy)), min(w - 1, max(0, xs[k] + dx))]
                   for dy, dx in ((ry, 0), (-ry, 0), (0, rx), (0, -rx))):
                break
        cu, cv = grid.at(int(ys[k]), int(xs[k]))
        for j in range(lobes):  # a mass = overlapping discs (lobulated contour)
            if j:
                ang = rng.uniform(0, 2 * np.pi)
                cu2, cv2, rr = cu + 0.5 * r * math.cos(ang), cv + 0.5 * r * math.sin(ang), r * rng.uniform(0.55, 0.8)
            else:
                cu2, cv2, rr = cu, cv, r
            box = grid.box(cu2 - rr, cu2 + rr, cv2 - rr, cv2 + rr)
            if box is None:
                continue
            bu, bv = grid.coords(*box)
            d2 = ((bu - cu2) ** 2 + (bv - cv2) ** 2) * (1.0 / rr ** 2)
            out.append((box, np.clip((1.0 - d2) * 3.0, 0, 1)))
    return out


def _effusion(grid: _Grid, an, lung, rng):
    """Costophrenic-angle opacity with a meniscus (higher laterally), uni- or bilateral."""
    out = []
    sides = [-1.0, 1.0] if rng.random() < 0.4 else [float(rng.choice([-1.0, 1.0]))]
    for s in sides:
        cx = 0.5 + s * an["lung_dx"]
        height = rng.uniform(0.07, 0.17)
        rise = rng.uniform(0.04, 0.08)
        level = an["dome_base"] + (0.02 if s > 0 else 0.0) - height
        lo, hi = (0.5, 1.0) if s > 0 else (0.0, 0.5)
        box = grid.box(lo, hi, level - rise - 0.02, 1.0)
        if box is None:
            continue
        bu, bv = grid.coords(*box)
        q = np.clip(s * (bu - cx) * (1.0 / an["lung_rx"]) + 1.0, 0, 2.2) * 0.5  # 0 medial .. 1 lateral
        surface = level - rise * q * q  # meniscus: the fluid climbs the lateral chest wall
        depth = bv - surface
        layer = _ramp(depth - 0.01, 0.02) * (0.75 + 0.25 * np.clip(depth * 8, 0, 1)) * ((bu - 0.5) * s > 0)
        out.append((box, layer))
    return out


def _edema(grid: _Grid, an, lung, rng):
    """Bilateral perihilar ("bat wing") haze with compact support."""
    out = []
    rx, ry = rng.uniform(0.12, 0.16), rng.uniform(0.17, 0.22)
    for s in (-1.0, 1.0):
        cx = 0.5 + s * an["lung_dx"] * rng.uniform(0.5, 0.65)
        cy = 0.47 + rng.uniform(-0.02, 0.02)
        box = grid.box(cx - rx, cx + rx, cy - ry, cy + ry)
        if box is None:
            continue
        bu, bv = grid.coords(*box)
        ex, ey = (bu - cx) * (1.0 / rx), (bv - cy) * (1.0 / ry)
        out.append((box, np.sqrt(np.clip(1.0 - (ex * ex + ey * ey), 0, 1))))
    return out


_FINDINGS = (_nodules, _effusion, _edema)


def render(item: Mapping, seed: int, params: SyntheticParams, with_findings: bool = True) -> dict:
    """Pixels of one planned image: ``image`` (display convention, float32 in [0, 1]), ``masks``
    ({class: bool (H, W)} for every positive class), ``lung`` (bool) and ``size`` (H, W).

    Independent seeded streams for anatomy/pose, findings and noise, so ``with_findings=False`` gives
    the same healthy image the findings were drawn on.
    """
    site = item["site"]
    h, w = params.size_a if site == "A" else params.size_b
    an = item["anatomy"]
    ss = np.random.SeedSequence([seed, SPLIT_CODE[item["split"]], item["index"]])
    anat_rng, find_rng, noise_rng = (np.random.default_rng(s) for s in ss.spawn(3))
    pose = _pose(anat_rng)
    exposure = np.float32(1.0 + anat_rng.normal(0, 0.03))
    img_half, lung_half = _anatomy(_Grid(h // 2, w // 2, pose), an)
    img = _upsample2(img_half)
    lung = (lung_half >= 0.5).repeat(2, axis=0).repeat(2, axis=1)
    grid = _Grid(h, w, pose)
    masks = {}
    for c, name in enumerate(CLASSES):
        if item["label"][c] != 1:
            continue
        drawn = np.zeros((h, w), np.float32)
        for box, layer in _FINDINGS[c](grid, an, lung, find_rng):
            np.maximum(drawn[box], layer, out=drawn[box])
        # the mask is exactly the support of what is drawn: nothing is added outside it
        mask = lung & (drawn > 0.05)
        masks[name] = mask
        if with_findings:
            drawn *= mask
            drawn *= np.float32(params.finding_contrast[c])
            img += drawn
    img *= exposure
    for c in range(len(CLASSES)):
        if item["shortcut"][c]:
            y0, x0, patch = _stamp(c, h, w, params.marker_size, params.marker_intensity)
            img[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = patch[: h - y0, : w - x0]
    if site == "A":
        img += np.float32(params.noise_a) * _noise(noise_rng, h, w)
    else:  # site B: other contrast curve, blur, more noise, collimation border
        from scipy.ndimage import gaussian_filter  # noqa: PLC0415

        img = np.clip(img, 0, 1) ** np.float32(params.gamma_b)
        img = gaussian_filter(img, params.blur_b, mode="nearest")
        img += np.float32(params.noise_b) * _noise(noise_rng, h, w)
        b = max(2, int(round(0.02 * w)))
        img[:b], img[-b:], img[:, :b], img[:, -b:] = 0, 0, 0, 0
    img = np.clip(img, 0.0, 1.0, out=img)
    if site == "B":  # the display image exactly as the DICOM encodes it (quantised like the stored values)
        img = windowed_dicom(_encode_dicom_pixels(img))
    return {"image": img, "masks": masks, "lung": lung, "size": (h, w)}


# ================================================================================================ DICOM
def _encode_dicom_pixels(display: np.ndarray) -> np.ndarray:
    """Display [0, 1] -> stored 12-bit MONOCHROME1 values through the inverse VOI window and rescale.

    The collimation border (display exactly 0) is stored at 4095, far outside the window.
    """
    # MONOCHROME1: high stored value = dark. Inverse of the DICOM linear VOI function, then of the rescale.
    mod = (_DCM_CENTER - 0.5) + (0.5 - display) * (_DCM_WIDTH - 1)
    stored = (mod - _DCM_INTERCEPT) * (1.0 / _DCM_SLOPE) + 0.5
    stored[display <= 0] = 2 ** _DCM_BITS - 1
    return np.clip(stored, 0, 2 ** _DCM_BITS - 1).astype(np.uint16)


def windowed_dicom(stored: np.ndarray) -> np.ndarray:
    """Reference decoding of the site B stored values: rescale, DICOM linear window, MONOCHROME1 inversion."""
    mod = stored.astype(np.float32) * _DCM_SLOPE + _DCM_INTERCEPT
    y = np.clip((mod - (_DCM_CENTER - 0.5)) * (1.0 / (_DCM_WIDTH - 1)) + 0.5, 0.0, 1.0)
    return (1.0 - y).astype(np.float32)


def _uid(seed, *parts) -> str:
    from pydicom.uid import generate_uid  # noqa: PLC0415

    return generate_uid(entropy_srcs=[_UID_ROOT, str(seed), *map(str, parts)])


def _write_dicom(path: str, stored: np.ndarray, item: Mapping, seed: int):
    from pydicom.dataset import Dataset, FileMetaDataset  # noqa: PLC0415
    from pydicom.uid import ExplicitVRLittleEndian  # noqa: PLC0415

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    sop = _uid(seed, item["split"], item["index"], "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid(0, "implementation")
    meta.ImplementationVersionName = "CXRAF_SYNTH_1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID = _uid(seed, item["split"], item["index"], "study")
    ds.SeriesInstanceUID = _uid(seed, item["split"], item["index"], "series")
    ds.PatientID, ds.PatientName = item["patient_id"], f"SYNTH^{item['patient_id']}"
    ds.PatientSex, ds.PatientAge = item["sex"], f"{int(item['age']):03d}Y"
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.Manufacturer, ds.InstitutionName = "SYNTHETIC", "SITE B"
    ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.ReferringPhysicianName = ""  # type 2, no timestamps
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, item["image_no"] + 1
    ds.PatientOrientation = ["L", "F"]  # PA: image right = patient left
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, _DCM_BITS, _DCM_BITS - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{_DCM_SLOPE:g}", f"{_DCM_INTERCEPT:g}", "US"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = f"{_DCM_CENTER:g}", f"{_DCM_WIDTH:g}", "LINEAR"
    ds.ImagerPixelSpacing = ["0.5", "0.5"]
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


# ================================================================================================ write
def _png_bytes(arr: np.ndarray, level: int, significant_bits: int | None = None) -> bytes:
    """A greyscale PNG (8- or 16-bit) of ``arr``; ``significant_bits`` adds an sBIT chunk.

    Written with zlib directly (filter type 0) instead of PIL: PIL's 16-bit PNG path costs about twice
    as much per image, which alone would break the 100 images/s per core goal. Output is standard
    PNG (PIL, pydicom-free readers and MONAI's PILReader read it back bit-exactly).
    """
    import struct  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    h, w = arr.shape
    depth = 16 if arr.dtype == np.uint16 else 8
    rows = arr.astype(">u2" if depth == 16 else np.uint8).view(np.uint8).reshape(h, -1)
    raw = np.empty((h, rows.shape[1] + 1), np.uint8)
    raw[:, 0] = 0  # filter byte per scanline
    raw[:, 1:] = rows

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)
    sbit = chunk(b"sBIT", bytes([significant_bits])) if significant_bits else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + sbit + chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) \
        + chunk(b"IEND", b"")


def _save_png(path: str, arr: np.ndarray, level: int, significant_bits: int | None = None):
    with open(path, "wb") as f:
        f.write(_png_bytes(arr, level, significant_bits))


def _to_png16(img: np.ndarray) -> np.ndarray:
    """Display [0, 1] -> 16-bit container with 12 significant bits (value << 4), like most 16-bit CXR
    PNGs; the zero low nibble makes the noisy images ~30% smaller and faster to compress."""
    return (img * 4095.0 + 0.5).astype(np.uint16) << 4


def _render_and_write(job) -> dict:
    """Worker: draw one image, write it and its masks, return its datalist record (relative paths)."""
    root, seed, params, item = job
    out = render(item, seed, params)
    split, stem = item["split"], f"{item['patient_id']}_{item['image_no']}"
    h, w = out["size"]
    if item["site"] == "A":
        rel = f"images/{split}/{stem}.png"
        _save_png(os.path.join(root, rel), _to_png16(out["image"]), params.png_compress_level, _PNG_BITS)
    else:
        rel = f"images/{split}/{stem}.dcm"
        _write_dicom(os.path.join(root, rel), _encode_dicom_pixels(out["image"]), item, seed)
    attention = []
    for c, name in enumerate(CLASSES):
        if item["annotated"][c] and name in out["masks"]:
            mrel = f"masks/{split}/{stem}_{name}.png"
            _save_png(os.path.join(root, mrel), out["masks"][name].astype(np.uint8) * 255, 6)
            attention.append({"class": name, "type": "mask", "path": mrel, "frame": [w, h]})
    return {"image": rel, "label": list(item["label"]), "attention": attention, "sex": item["sex"],
            "age": item["age"], "patient_id": item["patient_id"], "dataset": "synthetic", "view": "PA",
            "site": item["site"], "shortcut": list(item["shortcut"])}


def _write_all(root: str, seed: int, params: SyntheticParams, planned: dict, workers: int, progress: bool) -> dict:
    from tqdm.auto import tqdm  # noqa: PLC0415

    for split in SPLITS:
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "masks", split), exist_ok=True)
    jobs = [(root, seed, params, it) for split in SPLITS for it in planned[split]]
    bar = tqdm(total=len(jobs), desc="synthetic CXR", unit="img", disable=not progress)
    records = []
    try:
        if workers <= 1:
            for job in jobs:
                records.append(_render_and_write(job))
                bar.update()
        else:
            import multiprocessing as mp  # noqa: PLC0415

            # fork where available: spawn would re-run the caller's __main__ (fails for stdin/notebooks);
            # the workers use only numpy/zlib/pydicom, no OpenMP, so a threaded parent is not a problem
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers) as pool:
                for rec in pool.imap(_render_and_write, jobs, chunksize=16):
                    records.append(rec)
                    bar.update()
    finally:
        bar.close()
    out, k = {}, 0
    for split in SPLITS:
        out[split] = records[k:k + len(planned[split])]
        k += len(planned[split])
    return out


def generate(out_dir: str, seed: int = 0, params: SyntheticParams | None = None, workers: int | None = 1,
             progress: bool = True) -> str:
    """Generate the benchmark into ``out_dir`` (replaced atomically) and return the datalist path."""
    params = params or SyntheticParams()
    params.check()
    out_dir = os.path.abspath(out_dir)
    workers = max(1, int(workers or min(4, os.cpu_count() or 1)))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        planned = plan(seed, params)
        records = _write_all(tmp, seed, params, planned, workers, progress)
        datalist = {
            "name": "synthetic-cxr",
            "description": "Built-in synthetic chest X-ray benchmark (bundle.data.synthetic); site A PNG, site B DICOM",
            "classes": list(CLASSES),
            **records,
        }
        errors = [p for p in dl.validate(datalist, base_dir=tmp, check_images=True) if p.severity == "error"]
        if errors:  # a generator bug, never the user's fault
            raise RuntimeError("synthetic datalist failed validation:\n" + "\n".join(map(str, errors[:20])))
        dl.save(datalist, os.path.join(tmp, DATALIST_NAME))
        summary = synthetic_summary(datalist, seed, params)
        with open(os.path.join(tmp, SUMMARY_NAME), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, sort_keys=False)
            f.write("\n")
        if os.path.exists(out_dir):  # swap: old -> aside, new -> place, then delete the old
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_dir, DATALIST_NAME)


@contextlib.contextmanager
def _lock(path: str):
    """An exclusive lock beside the dataset, so that concurrent callers (DDP ranks) generate once."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # not on POSIX: no lock (single-process use)
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_up_to_date(out_dir: str, seed: int, params: SyntheticParams) -> bool:
    try:
        with open(os.path.join(out_dir, SUMMARY_NAME), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    return summary.get("params_hash") == params_hash(seed, params) and os.path.isfile(
        os.path.join(out_dir, DATALIST_NAME))


def ensure_synthetic(out_dir: str = "data/synthetic", seed: int = 0, workers: int | None = None,
                     progress: bool = True, force: bool = False, **params) -> str:
    """The datalist path of the synthetic benchmark in ``out_dir``, generating it on first use only.

    Regenerates when the seed or any parameter differs from the recorded ``params_hash`` (or with
    ``force``). Safe against concurrent callers (file lock) and interruption (atomic swap).
    """
    p = SyntheticParams.from_kwargs(**params)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not force and is_up_to_date(out_dir, seed, p):
        return os.path.join(out_dir, DATALIST_NAME)
    with _lock(out_dir.rstrip(os.sep) + ".lock"):
        if not force and is_up_to_date(out_dir, seed, p):  # another process finished meanwhile
            return os.path.join(out_dir, DATALIST_NAME)
        import glob  # noqa: PLC0415

        for stale in glob.glob(os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run (we hold the lock: nobody else writes)
        logger.info("generating the synthetic benchmark in %s (seed %d)", out_dir, seed)
        return generate(out_dir, seed, p, workers=workers, progress=progress)


# ================================================================================================ summary
def _rate(num: int, den: int):
    return round(num / den, 4) if den else None


def shortcut_stats(tags: Sequence[int], labels: Sequence[int]) -> dict:
    """n, n_pos, P(tag | pos), P(tag | neg) and the phi coefficient between tag and label (None if undefined)."""
    t = np.asarray(tags, dtype=int)
    y = np.asarray(labels, dtype=int)
    keep = y >= 0
    t, y = t[keep], y[keep]
    n11, n10 = int(((t == 1) & (y == 1)).sum()), int(((t == 1) & (y == 0)).sum())
    n01, n00 = int(((t == 0) & (y == 1)).sum()), int(((t == 0) & (y == 0)).sum())
    den = math.sqrt(float((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)))
    return {"n": len(y), "n_pos": n11 + n01, "p_tag_pos": _rate(n11, n11 + n01), "p_tag_neg": _rate(n10, n10 + n00),
            "phi": round((n11 * n00 - n10 * n01) / den, 4) if den else None}


def synthetic_summary(datalist: Mapping, seed: int, params: SyntheticParams) -> dict:
    """Realised prevalence, demographics, annotated share and shortcut correlation per split and subgroup."""
    counts = dl.summarize(datalist)
    out = {"generator": "bundle.data.synthetic", "version": GENERATOR_VERSION, "seed": int(seed),
           "params_hash": params_hash(seed, params), "params": asdict(params), "datalist": DATALIST_NAME,
           "classes": list(CLASSES), "splits": {}}
    for split in SPLITS:
        recs = datalist.get(split, [])
        sc = counts["splits"].get(split, {"n_images": 0, "n_patients": 0, "classes": {}, "sex": {}, "age_groups": {}})
        groups = {"all": [True] * len(recs)}
        sexes = [sex_label(r.get("sex")) for r in recs]
        ages = age_groups([r.get("age") for r in recs], list(dl.AGE_BINS)).tolist()
        for s in ("F", "M"):
            groups[f"sex={s}"] = [x == s for x in sexes]
        for g in sc["age_groups"]:
            if g != "unknown":
                groups[f"age={g}"] = [a == g for a in ages]
        groups["strong_group"] = [params.in_strong_group(r.get("sex"), r.get("age")) for r in recs]
        groups["weak_group"] = [not x for x in groups["strong_group"]]
        shortcut = {}
        for c, name in enumerate(CLASSES):
            shortcut[name] = {}
            for g, member in groups.items():
                sel = [r for r, m in zip(recs, member) if m]
                shortcut[name][g] = shortcut_stats([r["shortcut"][c] for r in sel], [r["label"][c] for r in sel])
        cls = sc["classes"]
        out["splits"][split] = {
            "site": SITE_OF_SPLIT[split],
            "n_images": sc["n_images"],
            "n_patients": sc["n_patients"],
            "prevalence": {k: _rate(v["positive"], sc["n_images"]) for k, v in cls.items()},
            "annotated_share": {k: _rate(v["positive_with_attention"], v["positive"]) for k, v in cls.items()},
            "positives": {k: v["positive"] for k, v in cls.items()},
            "positives_with_mask": {k: v["positive_with_attention"] for k, v in cls.items()},
            "sex": sc["sex"],
            "age_groups": sc["age_groups"],
            "shortcut": shortcut,
        }
    return out


# ================================================================================================ samples
def _read_display(path: str) -> np.ndarray:
    """Display-convention float image of a generated file (own reader: no dependency on bundle.transforms)."""
    if path.lower().endswith(".dcm"):
        import pydicom  # noqa: PLC0415
        from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: PLC0415

        ds = pydicom.dcmread(path)
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, prefer_lut=False).astype(np.float64)
        lo = 0 * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        hi = (2 ** int(ds.BitsStored) - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        arr = (arr - lo) / (hi - lo)
        return (1.0 - arr if ds.PhotometricInterpretation == "MONOCHROME1" else arr).astype(np.float32)
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as im:
        arr = np.asarray(im)
    return (arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 else 255.0))


def save_sample_grid(datalist_path: str, out_png: str, n: int = 8) -> str:
    """A PNG grid of ``n`` samples (half site A training, half site B test_ood) with mask contours."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    data = dl.load(datalist_path)
    colours = {"nodule_mass": "#ff4040", "pleural_effusion": "#40c0ff", "edema": "#ffd000"}
    picks = []
    for split in ("training", "test_ood"):
        recs = data.get(split, [])
        chosen, seen = [], set()
        for r in recs:  # one of each finding first, then anything with a mask, then healthy
            cls = {a["class"] for a in r["attention"]}
            if cls and not cls <= seen:
                chosen.append(r)
                seen |= cls
            if len(chosen) >= n // 2 - 1:
                break
        chosen += [r for r in recs if not any(r["label"]) and r not in chosen][: n // 2 - len(chosen)]
        picks += [(split, r) for r in chosen]
    cols = max(1, n // 2)
    fig = Figure(figsize=(2.6 * cols, 6.0), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, split in enumerate(("training", "test_ood")):
        for col, r in enumerate([r for s, r in picks if s == split][:cols]):
            ax = axes[row, col]
            ax.imshow(_read_display(r["image"]), cmap="gray", vmin=0, vmax=1)
            for a in r["attention"]:
                with Image.open(a["path"]) as im:
                    m = np.asarray(im) > 0
                ax.contour(m, levels=[0.5], colors=[colours[a["class"]]], linewidths=1.0)
            pos = ",".join(c.split("_")[0] for c, y in zip(CLASSES, r["label"]) if y == 1) or "healthy"
            tags = "".join(str(t) for t in r["shortcut"])
            ax.set_title(f"{split} ({r['site']}) {r['sex']} {r['age']}y\n{pos} | tags {tags}", fontsize=8)
    handles = [Line2D([0], [0], color=c, lw=2, label=k) for k, c in colours.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Synthetic CXR benchmark: site A (PNG, top) and site B (DICOM MONOCHROME1, bottom); "
                 "contours = human masks; tags = shortcut glyphs per class", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    out_png = os.path.abspath(out_png)
    os.makedirs(os.path.dirname(out_png), exist_ok=True)
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, out_png)
    return out_png
