"""Figures people look at: per-group metrics with CIs, attention overlays (evaluation); study figures live in report.py.

matplotlib with the non-interactive Agg backend; every figure is written atomically as PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bundle.utils.atomic import save_figure_atomic  # noqa: E402

__all__ = ["attention_overlays", "group_metric_plots"]


def attention_overlays(
    samples: Sequence[Mapping], classes: Sequence[str], path: str, title: str = "", ncols: int = 4
) -> str:
    """Grid of images with the model's attention (upsampled bilinearly, as for the hit rate) and the human mask contour.

    Each sample: ``image`` (H, W), ``attn`` (h, w), ``mask`` (H, W), ``class_index``, ``score``; the title of
    each panel gives the class, the score, and whether the attention's peak hits the mask.
    """
    n = len(samples)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), samples, strict=False):  # the grid may have spare panels
        img, mask = np.asarray(s["image"]), np.asarray(s["mask"])
        attn = torch.as_tensor(np.asarray(s["attn"], dtype=np.float32))[None, None]
        up = F.interpolate(attn, size=img.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        r, c = np.unravel_index(int(np.argmax(up)), up.shape)
        annotated = bool(mask.max() > 0)
        ax.imshow(img, cmap="gray")
        ax.imshow(up, cmap="jet", alpha=0.35)
        if annotated:
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=1.0)
        ax.plot(c, r, marker="+", color="white", markersize=10, mew=2)
        verdict = ("hit" if mask[r, c] > 0 else "miss") if annotated else ""
        ax.set_title(f"{classes[s['class_index']]}  p={s['score']:.2f}  {verdict}", fontsize=8)
    fig.suptitle(
        (title + "\n" if title else "") + "heat: model attention, green: human mask, +: attention peak", fontsize=9
    )
    return save_figure_atomic(path, fig)


def _ci(entry: Mapping, metric: str):
    ci = entry.get("ci", {}).get(metric) if isinstance(entry.get("ci"), Mapping) else None
    if ci is None:
        lo, hi = entry.get(f"{metric}_ci_low"), entry.get(f"{metric}_ci_high")
        ci = (lo, hi) if lo is not None else None
    return ci


def _group_entries(report: Mapping):
    """(class, attribute, group, entry, excluded_reason, overall entry) for every subgroup of a fairness report."""
    for cls, per_attr in report["classes"].items():
        for attr, block in per_attr.items():
            for grp, entry in block["groups"].items():
                yield cls, attr, grp, entry, entry.get("excluded_reason"), report["overall"].get(cls, {})


def group_metric_plots(
    report: Mapping, out_dir: str, metrics: Sequence[str] = ("auc", "sensitivity"), title: str = ""
) -> list[str]:
    """One PNG per metric x attribute: the metric per subgroup with its bootstrap 95% CI, one panel per class.

    Groups excluded from the gap (too few samples) are drawn hollow; the dashed line is the overall value.
    """
    paths = []
    entries = list(_group_entries(report))  # (class, attribute, group, entry, excluded_reason, overall entry)
    classes = list(dict.fromkeys(e[0] for e in entries))
    attributes = list(dict.fromkeys(e[1] for e in entries))
    for metric in metrics:
        for attr in attributes:
            fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.6), squeeze=False)
            for ax, cls in zip(axes[0], classes, strict=True):
                rows = [e for e in entries if e[0] == cls and e[1] == attr]
                xs = np.arange(len(rows))
                for x, (_, _, _grp, entry, excluded, overall_entry) in zip(xs, rows, strict=True):
                    overall = overall_entry.get(metric)
                    v = entry.get(metric)
                    if v is None or (isinstance(v, float) and math.isnan(v)):
                        continue
                    ci = _ci(entry, metric)
                    yerr = None
                    if ci and ci[0] is not None and not any(isinstance(t, float) and math.isnan(t) for t in ci):
                        yerr = [[max(v - ci[0], 0)], [max(ci[1] - v, 0)]]
                    ax.errorbar(
                        [x],
                        [v],
                        yerr=yerr,
                        fmt="o",
                        capsize=4,
                        color="tab:blue",
                        mfc="white" if excluded else "tab:blue",
                    )
                    if overall is not None and x == 0:
                        ax.axhline(overall, ls="--", color="grey", lw=1, label="all samples")
                ax.set_xticks(xs)
                ax.set_xticklabels([f"{r[2]}\n(n={r[3].get('n', '?')})" for r in rows], fontsize=7)
                ax.set_title(cls, fontsize=9)
                ax.set_xlabel(attr)
                ax.set_ylabel(f"{metric.upper() if metric == 'auc' else metric} (95% CI)")
                ax.grid(alpha=0.3)
            fig.suptitle(f"{title}: {metric} by {attr} (hollow = excluded from the gap)", fontsize=10)
            paths.append(save_figure_atomic(os.path.join(out_dir, f"{metric}_by_{attr}.png"), fig))
    return paths
