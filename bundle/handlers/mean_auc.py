"""The key validation metric as an ignite metric: macro AUC over classes (:class:`bundle.metrics.MeanAUCMetric`)."""

from __future__ import annotations

from collections.abc import Callable

from bundle.metrics.collection import MeanAUCMetric

from .collect import CollectionMetricHandler, batch_output

__all__ = ["MeanAUC"]


class MeanAUC(CollectionMetricHandler):
    """Macro AUC over classes, unknown labels (-1) excluded per class (NaN classes skipped), every sample once."""

    def __init__(self, output_transform: Callable = batch_output) -> None:
        super().__init__(MeanAUCMetric(), output_transform=output_transform)
