"""Subgroup fairness and attention-alignment metrics (pure numpy / scikit-learn; no engine needed).

See docs/fairness_metrics.md for the definitions, defaults and the bootstrap scheme.
"""
from .bootstrap import ClassPlan, patient_index, patient_strata, patient_weights, percentile_ci
from .core import (
    HIGHER_IS_BETTER,
    METRICS,
    THRESHOLD_METHODS,
    group_metrics,
    select_threshold,
    select_thresholds_info,
)
from bundle.demographics import AGE_SCHEMES, UNKNOWN, age_groups, clean_labels, demographic_groups, intersect_groups, sex_labels
from .localization import hit_rate, hit_rate_report, iou, miou, miou_report, pair_metric_report, upsample_bilinear
from .report import GAP_METRICS_MLFLOW, fairness_report, flatten_for_mlflow, report_to_rows

__all__ = [
    "AGE_SCHEMES", "UNKNOWN", "METRICS", "HIGHER_IS_BETTER", "THRESHOLD_METHODS", "GAP_METRICS_MLFLOW",
    "sex_labels", "age_groups", "clean_labels", "intersect_groups", "demographic_groups",
    "group_metrics", "select_threshold", "select_thresholds_info",
    "fairness_report", "report_to_rows", "flatten_for_mlflow",
    "patient_index", "patient_strata", "patient_weights", "percentile_ci", "ClassPlan",
    "upsample_bilinear", "hit_rate", "iou", "miou", "pair_metric_report", "hit_rate_report", "miou_report",
]
