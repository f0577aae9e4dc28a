"""The generator's constants and knobs: :class:`SyntheticParams` and :func:`params_hash` (what "up to date" means)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

__all__ = [
    "CLASSES",
    "DATALIST_NAME",
    "GENERATOR_VERSION",
    "SITE_OF_SPLIT",
    "SPLITS",
    "SPLIT_CODE",
    "SUMMARY_NAME",
    "SyntheticParams",
    "params_hash",
]

GENERATOR_VERSION = 1
CLASSES = ("nodule_mass", "pleural_effusion", "edema")
SPLITS = ("training", "validation", "test", "test_ood")
SPLIT_CODE = {"training": 0, "validation": 1, "test": 2, "test_ood": 3}
SITE_OF_SPLIT = {"training": "A", "validation": "A", "test": "A", "test_ood": "B"}
DATALIST_NAME = "datalist.json"
SUMMARY_NAME = "synthetic_summary.json"


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
        ("training", 0.8),
        ("validation", 1.0),
        ("test", 1.0),
        ("test_ood", 1.0),
    )
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
