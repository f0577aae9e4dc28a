"""Inference results: ``predictions.csv`` / ``predictions.json`` (probabilities and attention peaks per image, in the
original image's pixels), ``skipped.csv``, attention overlays at the original geometry and the raw maps as NIfTI.

docs/inference.md describes every file and column.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from ignite.engine import Engine, Events

from bundle.utils.atomic import rows_to_csv, write_json_atomic, write_text_atomic
from bundle.utils.dist import is_rank0

logger = logging.getLogger("bundle")

__all__ = ["InferenceWriter"]

COORDINATES = (
    "attn_peak_row / attn_peak_col: pixel indices in the original image (row 0 = top, col 0 = left; "
    "height x width = orig_height x orig_width), not the letterboxed network input"
)


class InferenceWriter:
    """Writes, under ``output_dir``:

    - ``predictions.csv`` and ``predictions.json``: one entry per scored image (probability and attention peak
      per class; peaks in original pixels);
    - ``skipped.csv``: every input not scored, with the field and the reason: those of the header scan
      (``skipped``, from :func:`bundle.inference.scan_inputs`) and the images that failed to decode (the
      ``error`` of :class:`bundle.inference.SkipFailedDataset`'s items);
    - ``overlays/<index>_<stem>.png`` (``save_overlays``): :func:`bundle.plots.attention_overlay_original`;
    - ``maps/<index>_<stem>.nii.gz`` (``save_maps``): the raw attention maps (:func:`save_attention_nifti`).

    ``privacy`` (a :class:`bundle.privacy.Privacy` or the config key ``privacy``; docs/privacy.md) rewrites the image
    paths of every file written (the ``image`` and ``file`` columns, skip reasons, the overlay's ``Source`` text) and
    the ``<stem>`` of the file names: relative to its root, or keyed pseudonyms.

    Reads the letterbox geometry and the decode errors from the engine's batch (``engine.state.batch``). Rank 0;
    every file written atomically.
    """

    def __init__(
        self,
        output_dir: str,
        records: Sequence[Mapping],
        classes: Sequence[str],
        save_overlays: bool = True,
        save_maps: bool = True,
        skipped: Sequence[Mapping] = (),
        privacy=None,
    ):
        from bundle.privacy import Privacy
        from bundle.workflow import as_bool

        self.privacy = Privacy.from_config(privacy)

        self.output_dir, self.classes = output_dir, list(classes)
        self.records = {int(r.get("index", i)): r for i, r in enumerate(records)}
        self.save_overlays = as_bool(save_overlays, "save_overlays")
        self.save_maps = as_bool(save_maps, "save_maps")
        self.scan_skipped = [dict(s) for s in skipped]
        self.results: list[dict] = []
        self.load_skipped: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iter)
        engine.add_event_handler(Events.COMPLETED, self._done)

    def _start(self, engine: Engine) -> None:
        self.results.clear()
        self.load_skipped.clear()

    def _iter(self, engine: Engine) -> None:
        from bundle.inference import attention_peaks, maps_to_original

        o, batch = engine.state.output, engine.state.batch
        probs, attn = o["pred"].detach().cpu(), o["attn"].detach().cpu()
        letterbox = torch.as_tensor(batch["letterbox"]).cpu().numpy()
        errors = batch.get("error") or [""] * len(probs)
        for b, idx in enumerate(o["index"].cpu().tolist()):
            path = self.records[idx]["image"]
            if errors[b]:
                field = "PixelData" if "pixel data" in errors[b].lower() else "file"
                self.load_skipped.append({"file": path, "stage": "load", "field": field, "reason": errors[b]})
                logger.warning(f"inference: skipped {path}: {errors[b]}")
                continue
            lb = letterbox[b]
            maps = maps_to_original(attn[b], lb)  # (C, H, W) over the original pixels
            peaks = attention_peaks(maps)
            h, w = int(lb[3]), int(lb[4])
            res = {
                "index": idx,
                "image": self.privacy.path(path),
                "orig_height": h,
                "orig_width": w,
                "findings": {
                    c: {
                        "prob": round(float(probs[b, k]), 6),
                        "attn_peak_row": peaks[k][0],
                        "attn_peak_col": peaks[k][1],
                    }
                    for k, c in enumerate(self.classes)
                },
                "overlay": None,
                "attention_map": None,
            }
            if is_rank0():
                stem = f"{idx:05d}_{self.privacy.stem(path)}"
                if self.save_maps:
                    res["attention_map"] = self._save_map(stem, attn[b], lb)
                if self.save_overlays:
                    res["overlay"] = self._save_overlay(stem, path, maps, probs[b], peaks)
            self.results.append(res)

    def _save_map(self, stem: str, attn, lb) -> str:
        from bundle.inference import save_attention_nifti

        rel = os.path.join("maps", f"{stem}.nii.gz")
        save_attention_nifti(os.path.join(self.output_dir, rel), attn.numpy(), lb, self.classes)
        return rel

    def _save_overlay(self, stem: str, path: str, maps, probs, peaks) -> str | None:
        from bundle.plots import attention_overlay_original
        from bundle.transforms import load_cxr

        rel = os.path.join("overlays", f"{stem}.png")
        try:
            grey = load_cxr(path)  # full resolution, the model's display convention
        except Exception as e:  # it decoded a moment ago at the network's size; do not lose the scores over a picture
            logger.warning(f"inference: no overlay for {path}: {e}")
            return None
        text = {
            "Source": self.privacy.path(path),
            "Description": "panels left to right: " + ", ".join(self.classes) + "; + = attention peak",
            "Peaks": "; ".join(f"{c}: row {r}, col {col}" for c, (r, col) in zip(self.classes, peaks, strict=True)),
        }
        attention_overlay_original(
            grey, maps.numpy(), self.classes, probs.tolist(), peaks, os.path.join(self.output_dir, rel), text=text
        )
        return rel

    def _done(self, engine: Engine) -> None:
        from bundle.inference import privacy_rows, write_skipped

        if not is_rank0():
            return
        results = sorted(self.results, key=lambda r: r["index"])
        skipped = privacy_rows(self.scan_skipped + self.load_skipped, self.privacy)
        rows = []
        for r in results:
            row = {"index": r["index"], "image": r["image"]}
            for c in self.classes:
                f = r["findings"][c]
                row.update({f"prob_{c}": f"{f['prob']:.6f}", f"attn_peak_row_{c}": f["attn_peak_row"]})
                row[f"attn_peak_col_{c}"] = f["attn_peak_col"]
            row.update({"orig_height": r["orig_height"], "orig_width": r["orig_width"]})
            rows.append(row)
        path = os.path.join(self.output_dir, "predictions.csv")
        write_text_atomic(path, rows_to_csv(rows) if rows else self._empty_header())
        write_json_atomic(
            os.path.join(self.output_dir, "predictions.json"),
            {
                "classes": self.classes,
                "coordinates": COORDINATES,
                "n_images": len(results),
                "n_skipped": len(skipped),
                "images": results,
                "skipped": skipped,
            },
        )
        write_skipped(os.path.join(self.output_dir, "skipped.csv"), skipped)
        logger.info(f"inference: {len(results)} images -> {path}; {len(skipped)} files skipped (skipped.csv)")

    def _empty_header(self) -> str:
        head = [f"{k}_{c}" for c in self.classes for k in ("prob", "attn_peak_row", "attn_peak_col")]
        return ",".join(["index", "image", *head, "orig_height", "orig_width"]) + "\r\n"
