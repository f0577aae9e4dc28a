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

__all__ = ["attention_overlays", "attention_overlay_original", "group_metric_plots"]


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


def blend_heatmap(grey: np.ndarray, heat: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """(H, W) grey in [0, 1] and an (H, W) map -> (H, W, 3) uint8 RGB: the map min-max scaled through matplotlib's
    jet colour map, blended over the grey image with opacity ``alpha`` (inference overlays and the Deploy SC)."""
    from matplotlib import colormaps

    heat = np.asarray(heat, dtype=np.float32)
    heat = heat - heat.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    rgb = np.asarray(grey, dtype=np.float32)[..., None] * (1 - alpha) + colormaps["jet"](heat)[..., :3] * alpha
    return (rgb.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def attention_overlay_original(
    image: np.ndarray,
    maps,
    classes: Sequence[str],
    probs: Sequence[float],
    peaks: Sequence[tuple[int, int]],
    path: str,
    alpha: float = 0.35,
    text: Mapping[str, str] | None = None,
) -> str:
    """One PNG per image at the original geometry: one panel per finding, side by side, each exactly H x W.

    ``image`` (H, W) grey in [0, 1] (display convention); ``maps`` (C, H, W) attention over the original pixels
    (``bundle.inference.maps_to_original``), each shown min-max scaled with matplotlib's jet colour map; a white
    cross marks ``peaks[c]`` (row, col); the panel's top-left corner names the finding and its probability.
    Pixel (row, k * W + col) of the PNG is original pixel (row, col) of panel k. ``text`` goes into PNG tEXt chunks.
    PIL composes and writes the pixels: a matplotlib figure cannot guarantee an exact pixel size (its canvas
    size is figsize * dpi, truncated), and the overlay must match the original pixel for pixel.
    """
    from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

    from bundle.utils.atomic import atomic_path

    grey = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    h, w = grey.shape
    maps = np.asarray(maps, dtype=np.float32)
    strip = Image.new("RGB", (w * len(classes), h))
    font = ImageFont.load_default(size=max(10, h // 40))
    arm, lw = max(3, min(h, w) // 40), max(1, min(h, w) // 200)
    for k, name in enumerate(classes):
        panel = Image.fromarray(blend_heatmap(grey, maps[k], alpha), mode="RGB")
        draw = ImageDraw.Draw(panel)
        r, c = (int(v) for v in peaks[k])
        draw.line([(c - arm, r), (c + arm, r)], fill=(255, 255, 255), width=lw)
        draw.line([(c, r - arm), (c, r + arm)], fill=(255, 255, 255), width=lw)
        label = f"{name} p={float(probs[k]):.2f}"
        draw.text((2, 2), label, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
        strip.paste(panel, (k * w, 0))
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(str(key), str(value))
    with atomic_path(path, suffix=".png") as tmp:
        # zlib level 1: a third of the default level's time on a 3000 x 2500 radiograph, a few % larger
        strip.save(tmp, format="PNG", pnginfo=info, compress_level=1)
    return path


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
