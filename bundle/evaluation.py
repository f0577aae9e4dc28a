"""Fairness + alignment evaluation of a checkpoint on named splits (configs/evaluate.yaml, and the end of training).

For each split the MONAI ``AlignmentEvaluator`` runs with the collection metrics of ``bundle.handlers``
(every sample exactly once, also under torch.distributed); then ``bundle.metrics`` computes the subgroup
report with thresholds chosen on the validation split, and a report folder is written per split:

    <output_dir>/<split>/fairness_report.json   the full nested report (CIs, gaps, exclusions, thresholds)
    <output_dir>/<split>/fairness_report.csv    one row per class x attribute x group (and gap rows)
    <output_dir>/<split>/predictions.csv        one row per image: metadata, labels, scores, decisions, hits
    <output_dir>/<split>/plots/*.png            per-group AUC with CIs; attention overlays of positives
    <output_dir>/summary.json                   headline numbers of every split

All files are written atomically and logged to MLflow (metrics + artifacts) when a tracking URI is given.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.data import DataLoader, Dataset, DistributedSampler

from bundle.engines import AlignmentEvaluator
from bundle.handlers import MeanAUC, OverlaySampler, PredictionCollector
from bundle.metrics import groups_for_records, nanmean_or_nan
from bundle.utils.atomic import rows_to_csv, write_json_atomic, write_text_atomic
from bundle.utils.dist import is_rank0, unwrap
from bundle.workflow import split_records

logger = logging.getLogger("bundle")

__all__ = ["collect_split", "evaluate", "load_checkpoint"]


def load_checkpoint(network: torch.nn.Module, path: str, strict: bool = True) -> torch.nn.Module:
    """Load a state_dict (models/model.pt) into the network, with an error that says what to do.

    On a mismatch, ``bundle.networks.CheckpointConfigError`` (a RuntimeError) names the sizes that differ: the ones
    in the checkpoint's architecture sidecar (models/model.json) when there is one, else those read off its shapes.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path!r} not found: train first (python -m monai.bundle run training --config_file "
            f"configs/train.yaml) or pass --ckpt_path /path/to/model.pt"
        )
    from bundle.networks import CheckpointConfigError, mismatch_message

    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        unwrap(network).load_state_dict(state, strict=strict)
    except RuntimeError as e:  # size mismatch / missing keys: say which sizes differ and how to fix it
        raise CheckpointConfigError(mismatch_message(path, unwrap(network), e, state)) from None
    return network


def collect_split(
    network,
    records,
    preprocessing,
    device,
    batch_size: int = 64,
    num_workers: int = 0,
    amp: bool = False,
    n_overlays: int = 16,
    classes: Sequence[str] | None = None,
) -> dict:
    """Run the evaluator over one split: arrays sorted by index (pred, label, hit, mass), overlays, mean AUC."""
    ds = Dataset(data=list(records), transform=preprocessing)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler = DistributedSampler(ds, even_divisible=False, shuffle=False) if dist else None
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers)
    collector, overlays = PredictionCollector(), OverlaySampler(n_overlays)
    evaluator = AlignmentEvaluator(
        device=device,
        val_data_loader=loader,
        network=network,
        key_val_metric={"mean_auc": MeanAUC()},
        additional_metrics={"collected": collector},
        val_handlers=[overlays],
        amp=amp,
    )
    evaluator.run()
    return {
        "arrays": collector.last,
        "mean_auc": float(evaluator.state.metrics["mean_auc"]),
        "overlays": overlays.samples,
    }


def _metadata_columns(records, index) -> dict[str, list]:
    cols = {k: [] for k in ("image", "patient_id", "sex", "age", "dataset", "view")}
    for i in index:
        r = records[int(i)]
        for k in cols:
            cols[k].append(r.get(k))
    return cols


def _predictions_csv(records, classes, arrays, thresholds, age_group_labels) -> str:
    idx = arrays["index"]
    meta = _metadata_columns(records, idx)
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["index", *meta.keys(), "age_group"]
    for c in classes:
        head += [f"label_{c}", f"score_{c}", f"decision_{c}"] + ([f"hit_{c}"] if "hit" in arrays else [])
    w.writerow(head)
    for row in range(len(idx)):
        vals = [int(idx[row]), *(meta[k][row] for k in meta), age_group_labels[row]]
        for ci in range(len(classes)):
            s = float(arrays["pred"][row, ci])
            vals += [int(arrays["label"][row, ci]), f"{s:.6f}", int(s >= thresholds[ci])]
            if "hit" in arrays:
                h = arrays["hit"][row, ci]
                vals.append("" if math.isnan(h) else int(h))
        w.writerow(vals)
    return buf.getvalue()


def evaluate(
    network: torch.nn.Module,
    datalist: Mapping,
    preprocessing,
    output_dir: str,
    splits: Sequence[str] = ("test", "test_ood"),
    threshold: str = "val_f1",
    threshold_split: str = "validation",
    attributes: Sequence[str] = ("sex", "age"),
    age_scheme="chexclusion",
    n_boot: int = 1000,
    min_count: int = 5,
    seed: int = 0,
    device=None,
    batch_size: int = 64,
    num_workers: int = 0,
    amp: bool = False,
    ckpt_path: str | None = None,
    n_overlays: int = 16,
    mlflow_logger=None,
) -> dict:
    """Evaluate ``network`` on ``splits``; thresholds from ``threshold_split`` (validation) for "val_*" methods.

    Returns ``{split: {"report_dir", "mean_auc", "hit_rate", ...}}`` (also written to summary.json).
    ``mlflow_logger`` is a started ``SafeMLFlowHandler`` (metrics and artifacts go to its run) or None.
    """
    from bundle import metrics as M
    from bundle import plots

    classes = list(datalist["classes"])
    own_run = False
    if mlflow_logger is not None and mlflow_logger.cur_run is None:
        own_run = mlflow_logger.start_standalone(
            {
                "evaluated_checkpoint": ckpt_path,
                "splits": list(splits),
                "threshold": threshold,
                "n_boot": n_boot,
                "age_scheme": age_scheme,
            }
        )
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if ckpt_path:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 writes the best model; the others must not read it before it exists
        load_checkpoint(network, ckpt_path)
    network = network.to(device)
    val = None
    summary: dict = {}
    if threshold.startswith("val_") or threshold_split in datalist:
        # the validation split gives the thresholds (val_* methods) and the checkpoint's validation AUC,
        # which is what model selection (e.g. the study's best p) should use instead of a test split
        val_records = split_records(datalist, threshold_split)
        got = collect_split(network, val_records, preprocessing, device, batch_size, num_workers, amp, 0)
        val = (got["arrays"]["label"], got["arrays"]["pred"])
        if is_rank0():  # beside summary.json, not in it: summary.json lists evaluated (test) splits only
            selection = {"split": threshold_split, "n": int(len(got["arrays"]["index"])), "mean_auc": got["mean_auc"]}
            write_json_atomic(os.path.join(output_dir, "model_selection.json"), selection, indent=None)
        if mlflow_logger is not None and _finite(got["mean_auc"]):
            mlflow_logger.log_metrics({f"{threshold_split}_mean_auc": got["mean_auc"]})
    for split in splits:
        records = split_records(datalist, split)
        logger.info(f"evaluating {split} ({len(records)} images)")
        got = collect_split(network, records, preprocessing, device, batch_size, num_workers, amp, n_overlays)
        if not is_rank0():
            continue
        arrays = got["arrays"]
        groups, pids = groups_for_records(records, arrays["index"], attributes, age_scheme)
        report = M.fairness_report(
            arrays["label"],
            arrays["pred"],
            groups=groups,
            classes=classes,
            patient_id=pids,
            threshold=threshold,
            val=val,
            n_boot=n_boot,
            min_count=min_count,
            seed=seed,
        )
        if "hit" in arrays:
            # per-pair values were computed during collection (bundle.metrics.PredictionCollection);
            # pair_metric_report adds per-class / per-subgroup summaries with patient-clustered bootstrap CIs.
            report["alignment"] = {
                name: M.pair_metric_report(
                    arrays[key], arrays["label"], classes, groups, pids, n_boot, seed, name=name, min_count=min_count
                )
                for key, name in (("hit", "hit_rate"), ("iou", "miou"), ("mass", "attention_mass_in_mask"))
                if key in arrays
            }
        out = os.path.join(output_dir, split)
        thresholds = [report["thresholds"][c]["value"] for c in classes]
        write_json_atomic(os.path.join(out, "fairness_report.json"), report, indent=1)
        write_text_atomic(os.path.join(out, "fairness_report.csv"), rows_to_csv(M.report_to_rows(report)))
        age_lab = list(
            M.age_groups(
                [r if r is not None else np.nan for r in _metadata_columns(records, arrays["index"])["age"]],
                scheme=age_scheme,
            )
        )
        write_text_atomic(
            os.path.join(out, "predictions.csv"), _predictions_csv(records, classes, arrays, thresholds, age_lab)
        )
        pngs = plots.group_metric_plots(report, os.path.join(out, "plots"), title=split)
        if got["overlays"]:
            pngs.append(
                plots.attention_overlays(
                    got["overlays"],
                    classes,
                    os.path.join(out, "plots", "attention_overlays.png"),
                    title=f"{split}: attention on positive, annotated findings",
                )
            )
        flat = M.flatten_for_mlflow(report, prefix=f"{split}_")
        flat[f"{split}_mean_auc"] = got["mean_auc"]
        if "hit" in arrays:
            flat[f"{split}_hit_rate"] = nanmean_or_nan(arrays["hit"])
            flat[f"{split}_attn_mass"] = nanmean_or_nan(arrays["mass"])
        summary[split] = {"report_dir": out, "n": int(len(arrays["index"])), **flat}
        if mlflow_logger is not None:
            mlflow_logger.log_metrics({k: v for k, v in flat.items() if _finite(v)})
            mlflow_logger.log_artifact(out, artifact_path=f"evaluation/{split}")
    if is_rank0():
        write_json_atomic(os.path.join(output_dir, "summary.json"), summary, indent=1)
        if mlflow_logger is not None:
            mlflow_logger.log_artifact(os.path.join(output_dir, "summary.json"), artifact_path="evaluation")
            if own_run:
                mlflow_logger.close()
    return summary


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
