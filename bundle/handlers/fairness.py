"""Per-epoch fairness and alignment scalars of one split as an ignite metric
(:class:`bundle.metrics.FairnessAlignmentMetric`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from bundle.metrics.collection import FairnessAlignmentMetric

from .collect import CollectionMetricHandler, batch_output

__all__ = ["AlignmentFairnessMetric"]


class AlignmentFairnessMetric(CollectionMetricHandler):
    """Per-epoch fairness and alignment summary for one split, as flat scalar metrics.

    Produces (each with ``prefix``) ``auc_<class>``, ``hit_rate`` / ``hit_rate_<class>``, ``attn_mass`` /
    ``attn_mass_<class>`` and the subgroup gaps from ``bundle.metrics.flatten_for_mlflow`` (bootstrap off: per-epoch
    values only; ``configs/evaluate.yaml`` computes CIs). Thresholds are the split's own max-F1 ("test_f1").
    """

    def __init__(
        self, records: Sequence[Mapping], classes: Sequence[str], *, output_transform: Callable = batch_output, **kwargs
    ) -> None:
        # kwargs: attributes=("sex", "age"), age_scheme="chexclusion", min_count=5, prefix="val_"
        super().__init__(FairnessAlignmentMetric(records, classes, **kwargs), output_transform=output_transform)

    @property
    def last_report(self) -> dict | None:
        """The fairness report of the latest ``compute``."""
        return self.metric_fn.last_report
