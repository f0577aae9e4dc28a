"""Ignite/MONAI handlers of the bundle, one per module; each metric handler is a thin wrapper over a metric in
:mod:`bundle.metrics` (as ``monai.handlers.ROCAUC`` wraps ``monai.metrics.ROCAUCMetric``).

- :mod:`.collect`: ``PredictionCollector`` (per-sample arrays gathered across ranks) and the wrapper base class;
- :mod:`.mean_auc`: ``MeanAUC``, the key validation metric;
- :mod:`.fairness`: ``AlignmentFairnessMetric``, per-epoch subgroup gaps and alignment scalars;
- :mod:`.best_model`: ``BestModelSaver``; :mod:`.resume`: ``ResumeCheckpoint`` and ``RNGState``;
- :mod:`.mlflow_handler`: ``SafeMLFlowHandler`` and the trainer's ``loss_components`` output_transform;
- :mod:`.epoch_summary`: ``EpochSummary``; :mod:`.inference_writer`: ``InferenceWriter``;
- :mod:`.overlays`: ``OverlaySampler`` (attention-overlay samples of an evaluation run).
"""

from .best_model import BestModelSaver
from .collect import CollectionMetricHandler, PredictionCollector, batch_output
from .epoch_summary import EpochSummary
from .fairness import AlignmentFairnessMetric
from .inference_writer import InferenceWriter
from .mean_auc import MeanAUC
from .mlflow_handler import SafeMLFlowHandler, loss_components
from .overlays import OverlaySampler
from .resume import ResumeCheckpoint, RNGState

__all__ = [
    "PredictionCollector",
    "CollectionMetricHandler",
    "batch_output",
    "MeanAUC",
    "AlignmentFairnessMetric",
    "BestModelSaver",
    "ResumeCheckpoint",
    "RNGState",
    "SafeMLFlowHandler",
    "loss_components",
    "EpochSummary",
    "InferenceWriter",
    "OverlaySampler",
]
