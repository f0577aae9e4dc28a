"""The ignite side of the collection metrics: a thin ``IgniteMetricHandler`` over a :mod:`bundle.metrics.collection`
metric, fed the evaluator's whole batched output (as ``monai.handlers.ROCAUC`` wraps ``ROCAUCMetric``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ignite.metrics.metric import reinit__is_reduced
from monai.handlers.ignite_metric import IgniteMetricHandler

from bundle.metrics.collection import PredictionCollection

__all__ = ["CollectionMetricHandler", "PredictionCollector", "batch_output"]


def batch_output(output):
    """Engine output -> 1-tuple: ignite metrics refuse a mapping without ('y_pred', 'y') keys, we need all keys."""
    return (output,)


class CollectionMetricHandler(IgniteMetricHandler):
    """Feeds ``pred``, ``label``, ``index`` and, when present, ``attn``, ``attn_mask``, ``attn_available`` and
    ``failed`` (placeholders of files that failed to load, left out) of the (non-decollated) engine output to
    ``metric_fn``; ``compute`` is ``metric_fn.aggregate()``.

    MONAI's ``IgniteMetricHandler.update`` passes ``(y_pred, y)`` only, so ``update`` is the one override.
    """

    def __init__(self, metric_fn: PredictionCollection, output_transform: Callable = batch_output) -> None:
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=False)

    @reinit__is_reduced
    def update(self, output: Mapping | tuple) -> None:
        output = output[0] if isinstance(output, tuple) else output
        self.metric_fn(
            output["pred"],
            output["label"],
            index=output.get("index"),
            attn=output.get("attn"),
            attn_mask=output.get("attn_mask"),
            attn_available=output.get("attn_available"),
            failed=output.get("failed"),
        )

    @property
    def last(self) -> dict:
        """The latest non-empty gathered arrays (sorted by index, each sample once)."""
        return self.metric_fn.last


class PredictionCollector(CollectionMetricHandler):
    """Collects per-sample arrays from the evaluator's batched output and gathers them across ranks.

    ``compute`` returns ``{"index", "pred", "label", "hit", "iou", "mass"}`` as numpy arrays sorted by ``index``
    (each sample exactly once); see :class:`bundle.metrics.collection.PredictionCollection`.
    """

    def __init__(self, output_transform: Callable = batch_output) -> None:
        super().__init__(PredictionCollection(), output_transform=output_transform)
