"""Summary statistics of a generated benchmark (prevalence, demographics, shortcut correlation per subgroup) and
the sample-grid figure of docs/synthetic.md."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np

from bundle.data import datalist as dl
from bundle.data.synthetic.params import (
    CLASSES,
    DATALIST_NAME,
    GENERATOR_VERSION,
    SITE_OF_SPLIT,
    SPLITS,
    SyntheticParams,
    params_hash,
)
from bundle.demographics import age_groups, sex_label
from bundle.utils.atomic import save_figure_atomic

__all__ = ["save_sample_grid", "shortcut_stats", "synthetic_summary"]


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
    return {
        "n": len(y),
        "n_pos": n11 + n01,
        "p_tag_pos": _rate(n11, n11 + n01),
        "p_tag_neg": _rate(n10, n10 + n00),
        "phi": round((n11 * n00 - n10 * n01) / den, 4) if den else None,
    }


def synthetic_summary(datalist: Mapping, seed: int, params: SyntheticParams) -> dict:
    """Realised prevalence, demographics, annotated share and shortcut correlation per split and subgroup."""
    counts = dl.summarize(datalist)
    out = {
        "generator": "bundle.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "params_hash": params_hash(seed, params),
        "params": asdict(params),
        "datalist": DATALIST_NAME,
        "classes": list(CLASSES),
        "splits": {},
    }
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
                sel = [r for r, m in zip(recs, member, strict=False) if m]
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
    return arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 else 255.0)


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
            pos = ",".join(c.split("_")[0] for c, y in zip(CLASSES, r["label"], strict=False) if y == 1) or "healthy"
            tags = "".join(str(t) for t in r["shortcut"])
            ax.set_title(f"{split} ({r['site']}) {r['sex']} {r['age']}y\n{pos} | tags {tags}", fontsize=8)
    handles = [Line2D([0], [0], color=c, lw=2, label=k) for k, c in colours.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(
        "Synthetic CXR benchmark: site A (PNG, top) and site B (DICOM MONOCHROME1, bottom); "
        "contours = human masks; tags = shortcut glyphs per class",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    return os.path.abspath(save_figure_atomic(out_png, fig, dpi=110, close=False))  # not a pyplot figure
