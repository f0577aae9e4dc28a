"""Subgroup fairness and attention-alignment metrics (pure numpy / scikit-learn; no engine needed).

See docs/fairness_metrics.md for the definitions, defaults and the bootstrap scheme. The torch-side pieces
(per-pair alignment values of a batch, the cumulative metrics gathered across ranks that :mod:`bundle.handlers`
wraps) are imported on first use, so ``import bundle.metrics`` does not import torch.
"""

import importlib

from bundle.demographics import (
    AGE_SCHEMES,
    UNKNOWN,
    age_groups,
    clean_labels,
    demographic_groups,
    intersect_groups,
    sex_labels,
)

from .bootstrap import ClassPlan, patient_index, patient_strata, patient_weights, percentile_ci
from .core import HIGHER_IS_BETTER, METRICS, THRESHOLD_METHODS, group_metrics, select_threshold, select_thresholds_info
from .localization import hit_rate, hit_rate_report, iou, miou, miou_report, pair_metric_report, upsample_bilinear
from .report import GAP_METRICS_MLFLOW, fairness_report, flatten_for_mlflow, report_to_rows
from .subgroups import groups_for_records
from .summary import alignment_means, epoch_fairness_summary, masked_aucs, mean_auc, nanmean_or_nan

# name -> submodule, imported on first access (these need torch)
_LAZY = {
    "attention_mass_in_mask": "pairs",
    "pair_alignment": "pairs",
    "SampleCollector": "collection",
    "PredictionCollection": "collection",
    "MeanAUCMetric": "collection",
    "FairnessAlignmentMetric": "collection",
}

__all__ = [
    "AGE_SCHEMES", "UNKNOWN", "METRICS", "HIGHER_IS_BETTER", "THRESHOLD_METHODS", "GAP_METRICS_MLFLOW",
    "sex_labels", "age_groups", "clean_labels", "intersect_groups", "demographic_groups",
    "group_metrics", "select_threshold", "select_thresholds_info",
    "fairness_report", "report_to_rows", "flatten_for_mlflow",
    "patient_index", "patient_strata", "patient_weights", "percentile_ci", "ClassPlan",
    "upsample_bilinear", "hit_rate", "iou", "miou", "pair_metric_report", "hit_rate_report", "miou_report",
    "groups_for_records", "masked_aucs", "mean_auc", "nanmean_or_nan", "alignment_means", "epoch_fairness_summary",
    *_LAZY,
]  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
