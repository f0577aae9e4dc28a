"""Planning: every decision except pixel geometry (patients, splits, labels, shortcut tags, annotations).

Cheap, sequential and seeded: each patient draws from its own ``SeedSequence``, the tags are drawn exactly per
(sex, age group, subgroup strength) cell, so realised rates equal the requested ones in every subgroup.
"""

from __future__ import annotations

import numpy as np

from bundle.data.datalist import AGE_BINS
from bundle.data.splits import patient_split
from bundle.data.synthetic.params import CLASSES, SPLIT_CODE, SPLITS, SyntheticParams
from bundle.demographics import age_groups

__all__ = ["plan"]


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
        "tex": [
            [float(x) for x in (rng.uniform(4, 11), rng.uniform(4, 11), rng.random(), rng.uniform(-1, 1))]
            for _ in range(3)
        ],
    }
    return {
        "sex": sex,
        "age": age,
        "n_images": n_img,
        "anatomy": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in anatomy.items()},
    }


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
            items.append(
                {
                    "patient_id": f"{site}{no:05d}",
                    "image_no": k,
                    "site": site,
                    "sex": pat["sex"],
                    "age": age,
                    "label": [int(x) for x in state],
                    "anatomy": pat["anatomy"],
                }
            )
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
    splits = (
        patient_split(site_a, {k: v for k, v in fractions.items() if v > 0} or {"training": 1}, seed=seed)
        if site_a
        else {}
    )
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
        ages = age_groups([it["age"] for it in items], list(AGE_BINS))
        keys = [(it["sex"], str(g), bool(st)) for it, g, st in zip(items, ages, strong, strict=False)]
        cells = {k: np.asarray([i for i, kk in enumerate(keys) if kk == k], dtype=int) for k in sorted(set(keys))}
        for c in range(len(CLASSES)):
            for y in (1, 0):
                carry = {}
                for (_sex, _group, is_strong), members in cells.items():
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
