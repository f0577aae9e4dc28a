"""The report's figures (matplotlib, Agg backend, written atomically): the paper's Figs. 3-6 and an attention gallery.

    fig3_gap_vs_performance   macro gap vs mean AUC per alignment level, one panel per split x attribute
    fig4_random_vs_aligned    baseline vs human-mask vs random-shape alignment: AUC, gaps, hit rate
    fig5_data_ratio           accuracy, AUC, sensitivity and F1 gaps vs training data ratio, p = 0 vs p = 1
    fig6_radar                accuracy, AUC, sensitivity, F1 per condition (finding) and OOD split, w/o vs best p
    attention_gallery         the runs' attention overlays of one split side by side

Each returns the path written, or None when the settings it needs have not finished.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from bundle.study.config import ReportOptions
from bundle.study.report.collect import GAP_LABEL, GAP_METRICS, Index
from bundle.utils.atomic import save_figure_atomic

__all__ = [
    "fig3_gap_vs_performance",
    "fig4_random_vs_aligned",
    "fig5_data_ratio",
    "fig6_radar",
    "radar_panels",
    "attention_gallery",
    "figure_title",
    "draw_figures",
]

FIGURE_TITLES = {
    "fig3_gap_vs_performance.png": "Fig. 3: fairness gap vs performance per alignment level",
    "fig4_random_vs_aligned.png": "Fig. 4: random vs human-mask alignment vs baseline",
    "fig5_data_ratio.png": "Fig. 5: fairness gaps vs training data ratio",
    "fig6_radar.png": "Fig. 6: out-of-domain performance radar per condition",
}
GALLERY_PREFIX = "attention_gallery_"


def figure_title(name: str) -> str:
    """The heading of a figure file in results.md."""
    return FIGURE_TITLES.get(name, f"Attention gallery ({name[len(GALLERY_PREFIX):-4]})")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    return save_figure_atomic(path, fig, dpi=110)


def _attr_gap_label(a: str, metric: str) -> str:
    return f"{GAP_LABEL.get(metric, metric + ' gap')}, {a} (percentage points)"


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def fig3_gap_vs_performance(
    idx: Index, path: str, attributes: Sequence[str], gap_metric: str = ReportOptions.fig_gap_metric
) -> str | None:
    """Fairness gap vs mean AUC for each alignment level (human masks, all data), error bars = sd over seeds. The
    levels are told apart by colour and marker in one legend (no labels next to the points: they overlapped)."""
    levels = idx.aligned()
    if not levels or not idx.splits:
        return None
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    nr, nc = len(attributes), len(idx.splits)
    fig, axes = plt.subplots(nr, nc, figsize=(4.6 * nc, 3.8 * nr), squeeze=False)
    handles: dict[str, object] = {}
    for i, a in enumerate(attributes):
        for j, split in enumerate(idx.splits):
            ax = axes[i][j]
            xs, ys = [], []
            for k, (p, s) in enumerate(levels.items()):
                x, xsd, _ = idx.get(s, split, "mean_auc")
                y, ysd, _ = idx.get(s, split, f"macro/{a}/gap_{gap_metric}")
                if not (math.isfinite(x) and math.isfinite(y)):
                    continue
                col = cmap(0.85 * p if len(levels) > 1 else 0.4)  # viridis' yellow end is unreadable on white
                h = ax.errorbar(
                    100 * x,
                    100 * y,
                    xerr=100 * xsd if math.isfinite(xsd) else None,
                    yerr=100 * ysd if math.isfinite(ysd) else None,
                    fmt=MARKERS[k % len(MARKERS)],
                    color=col,
                    capsize=3,
                    ms=7,
                    label=f"p = {p:g}",
                )
                handles.setdefault(f"p = {p:g}", h)
                xs.append(100 * x)
                ys.append(100 * y)
            if len(xs) > 1:
                ax.plot(xs, ys, ":", color="grey", lw=1, zorder=0)
            if not xs:
                ax.text(
                    0.5,
                    0.5,
                    "gap undefined\n(too few positives per subgroup)",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    color="grey",
                )
            ax.set_xlabel(f"mean AUC over findings, {split} (%)")
            ax.set_ylabel(_attr_gap_label(a, gap_metric))
            ax.set_title(f"{split}: {a}")
            ax.grid(alpha=0.3)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            title="alignment fraction",
            loc="lower center",
            ncol=len(handles),
            fontsize=9,
        )
    fig.suptitle(
        "Fig. 3: fairness gap vs performance per alignment level (mean ± sd over seeds; lower-right is better)"
    )
    fig.tight_layout(rect=(0, 0.1 / nr, 1, 1))
    return _save(fig, path)


def _percent_axis(ax, vals: Sequence[float], top: float | None = None) -> None:
    """A fixed y axis from 0: to ``top`` (AUC, hit rate: 100 %) or a little above the highest bar + error."""
    finite = [v for v in vals if math.isfinite(v)]
    ax.set_ylim(0, top if top is not None else max(1.0, 1.15 * max(finite, default=1.0)))


def fig4_random_vs_aligned(idx: Index, path: str, attributes: Sequence[str]) -> str | None:
    """Baseline (p = 0) vs aligned (human masks) vs random shapes at the same p: AUC, gaps, hit rate (all in %, y
    axes from 0; AUC and hit rate 0-100 %)."""
    rnd = idx.random()
    aligned = idx.aligned()
    if not rnd or 0.0 not in aligned:
        return None
    p = max(rnd)
    models = [("baseline (p = 0)", aligned[0.0], "#7f7f7f")]
    if p in aligned:
        models.append((f"aligned, human masks (p = {p:g})", aligned[p], "#1f77b4"))
    models.append((f"aligned, random shapes (p = {p:g})", rnd[p], "#ff7f0e"))
    panels = [("mean_auc", "mean AUC over findings (%)", 100.0)]
    panels += [(f"macro/{a}/gap_auc", f"AUC gap, {a} (percentage points)", None) for a in attributes]
    panels += [("hit_rate", "hit rate of the attention (%)", 100.0)]
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    width = 0.8 / len(models)
    x = np.arange(len(idx.splits))
    for ax, (metric, ylabel, top) in zip(axes[0], panels, strict=True):
        tops = []
        for k, (label, s, col) in enumerate(models):
            vals = [idx.get(s, sp, metric) for sp in idx.splits]
            xs = x + (k - (len(models) - 1) / 2) * width
            heights = [100 * v[0] if math.isfinite(v[0]) else np.nan for v in vals]
            errs = [100 * v[1] if math.isfinite(v[1]) else 0 for v in vals]
            tops += [h + e for h, e in zip(heights, errs, strict=True)]
            # undefined values (e.g. a gap without two eligible subgroups) get no bar but an "n/a", never a 0 bar
            ax.bar(xs, heights, width, yerr=errs, capsize=3, color=col, label=label)
            for xi, v in zip(xs, vals, strict=True):
                if not math.isfinite(v[0]):
                    ax.text(
                        xi,
                        0.02,
                        "n/a",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        rotation=90,
                        color="grey",
                        transform=ax.get_xaxis_transform(),
                    )
        ax.set_xlim(-0.5, len(idx.splits) - 0.5)
        _percent_axis(ax, tops, top)
        ax.set_xticks(x, idx.splits)
        ax.set_xlabel("test split")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(models), fontsize=9, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Fig. 4: random vs human-mask alignment vs baseline (mean ± sd over seeds)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, path)


def fig5_data_ratio(idx: Index, path: str, attributes: Sequence[str]) -> str | None:
    """The accuracy, AUC, sensitivity and F1 gaps (macro over findings) vs training data ratio, with and without
    alignment: one row per gap metric, one column per split x attribute."""
    ps = sorted(
        {m["alignment_fraction"] for m in idx.meta.values() if m["data_ratio"] != 1.0 and not m["random_alignment"]}
    )
    if not ps:
        return None
    plt = _plt()
    cols = [(split, a) for split in idx.splits for a in attributes]
    nr, nc = len(GAP_METRICS), len(cols)
    fig, axes = plt.subplots(nr, nc, figsize=(4.0 * nc, 2.9 * nr), squeeze=False)
    colors = plt.get_cmap("viridis")
    for i, m in enumerate(GAP_METRICS):
        for j, (split, a) in enumerate(cols):
            ax = axes[i][j]
            for k, p in enumerate(ps):
                series = idx.ratios(p)
                v = [idx.get(s, split, f"macro/{a}/gap_{m}") for s in series.values()]
                ax.errorbar(
                    [100 * r for r in series],
                    [100 * t[0] for t in v],
                    yerr=[100 * t[1] if math.isfinite(t[1]) else 0 for t in v],
                    marker=MARKERS[k % len(MARKERS)],
                    capsize=3,
                    color=colors(0.85 * p if len(ps) > 1 else 0.4),
                    label=f"p = {p:g}" + (" (no alignment)" if p == 0 else " (aligned)"),
                )
            ax.set_ylabel(f"{GAP_LABEL[m]} (pp)")
            if i == 0:
                ax.set_title(f"{split}: {a}")
            if i == nr - 1:
                ax.set_xlabel("training data ratio (% of patients)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(ps), fontsize=9)
    fig.suptitle("Fig. 5: fairness gaps vs training data ratio, with and without alignment (mean ± sd over seeds)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


RADAR_METRICS = (("accuracy", "accuracy"), ("auc", "AUC"), ("sensitivity", "sensitivity"), ("f1", "F1"))


def fig6_radar(panels: Sequence[tuple[str, Index, Sequence[tuple[str, str]], str, str]], path: str) -> str | None:
    """One radar per condition and out-of-domain split: the finding's accuracy, AUC, sensitivity and F1 (%),
    w/o vs best p. ``panels``: [(title, index, [(label, setting id)], split, finding)]. The axis labels sit
    outside the circle."""
    panels = [pn for pn in panels if pn[2]]
    if not panels:
        return None
    plt = _plt()
    n = len(panels)
    nc = min(n, 3)
    nr = math.ceil(n / nc)
    ang = np.linspace(0, 2 * np.pi, len(RADAR_METRICS), endpoint=False)
    fig, axes = plt.subplots(nr, nc, figsize=(4.8 * nc, 4.9 * nr), squeeze=False, subplot_kw={"polar": True})
    cols = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728"]
    handles: dict[str, object] = {}
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (title, idx, models, split, finding) in zip(axes.flat, panels, strict=False):
        for k, (label, s) in enumerate(models):
            vals = [idx.get(s, split, f"{finding}/{m}")[0] for m, _ in RADAR_METRICS]
            if not any(math.isfinite(v) for v in vals):
                continue
            v = np.asarray([100 * x if math.isfinite(x) else 0.0 for x in vals])
            (h,) = ax.plot(
                np.r_[ang, ang[:1]],
                np.r_[v, v[:1]],
                "--o" if k == 0 else "-o",
                color=cols[k % len(cols)],
                label=label,
                ms=4,
            )  # dashed baseline stays visible where the polygons coincide
            ax.fill(np.r_[ang, ang[:1]], np.r_[v, v[:1]], color=cols[k % len(cols)], alpha=0.12)
            handles.setdefault("Aligner (best p of the condition)" if k and "best p" in label else label, h)
        ax.set_ylim(0, 100)
        ax.set_xticks(ang, [""] * len(ang))
        for t, (_, name) in zip(ang, RADAR_METRICS, strict=True):  # labels outside the circle, aligned away from it
            c, si = math.cos(t), math.sin(t)
            ha = "left" if c > 0.3 else ("right" if c < -0.3 else "center")
            va = "bottom" if si > 0.3 else ("top" if si < -0.3 else "center")
            ax.text(t, 112, f"{name} (%)", ha=ha, va=va, fontsize=9)
        ax.set_rlabel_position(67.5)
        ax.set_yticks([25, 50, 75, 100], ["25", "50", "75", "100"], fontsize=7, color="grey")
        ax.set_title(title, pad=34, fontsize=10)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle("Fig. 6: out-of-domain performance per condition (mean over seeds)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _save(fig, path)


def radar_panels(
    idx: Index,
    models: Sequence[tuple[str, str]],
    ood_splits: Sequence[str],
    condition: str | None = None,
    classes: Sequence[str] | None = None,
) -> list[tuple[str, Index, list[tuple[str, str]], str, str]]:
    """Fig. 6's panels of one study: each finding (default all) on each out-of-domain split (``condition`` prefixes
    the title)."""
    classes = classes or idx.classes_attributes()[0]
    best = next((m[0].split("(")[-1].rstrip(")") for m in models[1:] if "best p" in m[0]), None)
    return [
        (
            (f"{condition}: " if condition else "") + f"{c}, {split}" + (f" ({best})" if best else ""),
            idx,
            list(models),
            split,
            c,
        )
        for split in idx.splits
        if split in ood_splits
        for c in classes
    ]


def attention_gallery(
    runs: Sequence[Mapping], idx: Index, split: str, models: Sequence[tuple[str, str]], path: str
) -> str | None:
    """The attention overlays of one seed per model side by side. Each run draws its overlays from the first positive,
    annotated findings of the split in datalist order, so every panel shows the same test images."""
    by = {(r["setting"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    pick = None
    for seed in seeds:
        files = [
            (
                os.path.join(by[(s, seed)]["dir"], "eval", "report", split, "plots", "attention_overlays.png")
                if (s, seed) in by and by[(s, seed)]["dir"]
                else None
            )
            for _, s in models
        ]
        if all(f and os.path.isfile(f) for f in files):
            pick = (seed, files)
            break
    if pick is None:
        return None
    plt = _plt()
    seed, files = pick
    imgs = [plt.imread(f) for f in files]
    fig, axes = plt.subplots(1, len(imgs), figsize=(6.5 * len(imgs), 7.5), squeeze=False)
    for ax, img, (label, _) in zip(axes[0], imgs, models, strict=True):
        ax.imshow(img)
        ax.set_title(f"{label} (seed {seed})", fontsize=13)
        ax.axis("off")
    fig.suptitle(
        f"Attention gallery, {split}: the same test images without and with alignment\n"
        "(heat = model attention, green = human mask, + = attention peak)",
        fontsize=14,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)


def draw_figures(
    runs: Sequence[Mapping],
    idx: Index,
    out_dir: str,
    attributes: Sequence[str],
    gap_metric: str,
    paper_models: Sequence[tuple[str, str]],
    p1: str | None,
    best_s: str | None,
    ood_splits: Sequence[str] = ReportOptions.ood_splits,
) -> dict[str, str | None]:
    """Every figure of the report into ``out_dir``: {file name: path, or None when not drawn}, in results.md order.

    ``paper_models``: [(label, setting id)] of w/o and best p; the gallery adds p = 1 when it is not the best p.
    """
    figs: dict[str, str | None] = {}
    figs["fig3_gap_vs_performance.png"] = fig3_gap_vs_performance(
        idx, os.path.join(out_dir, "fig3_gap_vs_performance.png"), attributes, gap_metric
    )
    figs["fig4_random_vs_aligned.png"] = fig4_random_vs_aligned(
        idx, os.path.join(out_dir, "fig4_random_vs_aligned.png"), attributes
    )
    figs["fig5_data_ratio.png"] = fig5_data_ratio(idx, os.path.join(out_dir, "fig5_data_ratio.png"), attributes)
    figs["fig6_radar.png"] = fig6_radar(
        radar_panels(idx, paper_models, ood_splits), os.path.join(out_dir, "fig6_radar.png")
    )
    gallery_models = list(paper_models)
    if p1 and p1 != best_s:
        gallery_models.append(("Aligner p = 1", p1))
    for split in idx.splits:
        name = f"{GALLERY_PREFIX}{split}.png"
        figs[name] = (
            attention_gallery(runs, idx, split, gallery_models, os.path.join(out_dir, name))
            if len(gallery_models) >= 1
            else None
        )
    return figs
