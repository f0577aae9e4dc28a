"""Cumulative metrics over an evaluation run: per-sample arrays gathered across ranks, each sample exactly once.

Shaped like MONAI's cumulative metrics (``monai.metrics.CumulativeIterationMetric``): call the metric on every
batch, ``aggregate()`` at the end, ``reset()`` before the next round; :mod:`bundle.handlers` wraps each one as an
ignite metric, as ``monai.handlers.ROCAUC`` wraps ``monai.metrics.ROCAUCMetric``. No ignite here.

Under torch.distributed every rank collects its shard; :meth:`SampleCollector.gather` all-gathers with
``monai.utils.evenly_divisible_all_gather`` (ignite's all_gather crashes on uneven shards) and de-duplicates by
the sample ``index``, so that a padding sampler cannot count a sample twice. MONAI's ``Cumulative`` gathers too,
but keeps positional buffers and has no de-duplication, hence this collector. Metadata (sex, age, patient id) is
joined afterwards from the split's records by ``index`` (:mod:`bundle.metrics.subgroups`), so strings never cross
process boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import Metric
from monai.utils import evenly_divisible_all_gather

from .pairs import pair_alignment
from .summary import epoch_fairness_summary, mean_auc

__all__ = ["SampleCollector", "PredictionCollection", "MeanAUCMetric", "FairnessAlignmentMetric"]


class SampleCollector:
    """Per-sample tensors by name (one ``index`` per sample), gathered across ranks, sorted by index, no duplicates."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._parts: dict[str, list[torch.Tensor]] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        """Append a batch-first tensor to the ``key`` buffer (detached, on the CPU)."""
        self._parts.setdefault(key, []).append(value.detach().to("cpu"))

    def gather(self) -> dict[str, np.ndarray]:
        """Every buffer over all ranks as numpy, rows sorted by ``index``, each sample once; {} when empty."""
        if not self._parts:
            return {}
        out = {}
        for k, parts in self._parts.items():
            local = torch.cat(parts)
            out[k] = evenly_divisible_all_gather(local, concat=True).numpy()
        _, first = np.unique(out["index"], return_index=True)  # de-duplicate (padding samplers)
        order = first[np.argsort(out["index"][first])]
        return {k: v[order] for k, v in out.items()}


class PredictionCollection(Metric):
    """Collects ``index``, ``pred``, ``label`` and, with attention maps and masks, the per-pair ``hit`` (pointing
    game), ``iou`` (Otsu-thresholded map vs mask) and ``mass`` (attention mass inside the mask).

    ``aggregate()`` returns them as numpy arrays sorted by ``index`` (each sample exactly once); the per-pair values
    are (N, C), NaN where the pair has no human mask. ``last`` keeps the latest non-empty result. Subclasses turn the
    arrays into metrics. ``alignment=False`` collects predictions only.
    """

    def __init__(self, alignment: bool = True) -> None:
        self.alignment = alignment
        self.last: dict[str, np.ndarray] = {}
        self.collector = SampleCollector()

    def reset(self) -> None:
        self.collector.reset()

    def __call__(
        self,
        y_pred: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | Sequence[int] | None = None,
        attn: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        attn_available: torch.Tensor | None = None,
        failed: torch.Tensor | Sequence[bool] | None = None,
    ) -> None:
        """Add one batch: ``y_pred`` (B, C) probabilities, ``y`` (B, C) labels, ``index`` (B,) record positions.

        ``failed`` (B,) marks placeholder samples (files that failed to load, ``bundle.inference.SkipFailedDataset``
        with ``failed_key="failed"``): they are left out of every collected array.
        """
        n = y_pred.shape[0]
        if index is None:
            raise ValueError("PredictionCollector needs 'index' in the batch (each record's position in its split)")
        keep = None
        if failed is not None:
            keep = ~torch.as_tensor(failed).reshape(n).to(device=y_pred.device, dtype=torch.bool)
        values = {
            "index": torch.as_tensor(index).reshape(n).long(),
            "pred": y_pred.float(),
            "label": y.float(),
        }
        if self.alignment and attn is not None and attn_mask is not None:
            values.update(pair_alignment(attn, attn_mask, attn_available))
        for key, value in values.items():
            self.collector.add(key, value if keep is None else value[keep.to(value.device)])

    def aggregate(self):
        d = self.collector.gather()
        if d:
            self.last = d
        return d


class MeanAUCMetric(PredictionCollection):
    """Macro AUC over classes, unknown labels (-1) excluded per class (NaN classes skipped); NaN when empty."""

    def __init__(self) -> None:
        super().__init__(alignment=False)

    def aggregate(self) -> float:
        d = super().aggregate()
        if not d:
            return float("nan")
        return mean_auc(d["label"], d["pred"])


class FairnessAlignmentMetric(PredictionCollection):
    """Per-epoch fairness and alignment summary of one split, as flat scalars named ``<prefix><name>``.

    The names are those of :func:`bundle.metrics.summary.epoch_fairness_summary`; ``last_report`` keeps the
    fairness report they come from.
    """

    def __init__(
        self,
        records: Sequence[Mapping],
        classes: Sequence[str],
        attributes: Sequence[str] = ("sex", "age"),
        age_scheme="chexclusion",
        min_count: int = 5,
        prefix: str = "val_",
    ) -> None:
        super().__init__(alignment=True)
        self.records, self.classes, self.prefix = list(records), list(classes), prefix
        self.attributes, self.age_scheme, self.min_count = list(attributes), age_scheme, min_count
        self.last_report: dict | None = None

    def aggregate(self) -> dict[str, float]:
        d = super().aggregate()
        if not d:
            return {}
        out, self.last_report = epoch_fairness_summary(
            d, self.records, self.classes, self.attributes, self.age_scheme, self.min_count
        )
        return {f"{self.prefix}{k}": v for k, v in out.items()}
