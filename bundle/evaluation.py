"""Fairness + alignment evaluation of a checkpoint on named splits (configs/evaluate.yaml, and the end of training).

For each split the MONAI ``AlignmentEvaluator`` runs with the collection metrics of ``bundle.handlers``
(every sample exactly once, also under torch.distributed); then ``bundle.metrics`` computes the subgroup
report with thresholds chosen on the validation split, and a report folder is written per split:

    <output_dir>/<split>/fairness_report.json   the full nested report (CIs, gaps, exclusions, thresholds)
    <output_dir>/<split>/fairness_report.csv    one row per class x attribute x group (and gap rows)
    <output_dir>/<split>/predictions.csv        one row per image: metadata (sex/age with their sources), labels,
                                                scores, decisions, hits
    <output_dir>/<split>/plots/*.png            per-group AUC with CIs; attention overlays of positives
    <output_dir>/<split>/skipped.csv            files that failed to load (file, reason); header only when none
    <output_dir>/summary.json                   headline numbers of every split (``<split>_n_skipped`` and the
                                                counts of unknown sex / age included)

Demographics: a record whose datalist entry lacks sex or age gets it from its DICOM header (PatientSex, PatientAge,
else PatientBirthDate with StudyDate/AcquisitionDate; header only, :func:`bundle.transforms.io.read_dicom_demographics`
via :func:`bundle.demographics.fill_demographics`); the datalist wins when it knows the value. The sources are
counted in fairness_report.json (``demographics``) and summary.json, and a split with images of unknown sex or age
gets a warning that says how many (they are in no sex / age gap).

Identifiers: ``privacy`` (docs/privacy.md, :class:`bundle.privacy.Privacy`) pseudonymises patient ids and image paths
or makes paths relative to ``path_root`` in every file written here (and so in MLflow); off by default.

A file that fails to load (truncated DICOM, unreadable PNG: ``bundle.transforms.CXRLoadError`` or any other error of
the preprocessing) does not stop the evaluation: it becomes a placeholder (:class:`bundle.inference.SkipFailedDataset`)
flagged ``failed``, which the collection metrics drop, so it is in no metric; it is listed in skipped.csv and
logged as a warning. A split whose every file fails gets a report that says so, and the other splits are evaluated.

The JSON files are strict JSON (NaN/inf written as null) and the strings from the datalist (patient ids, paths)
are sanitised (lone surrogates escaped), so a strange value never crashes the report. All files are written
atomically and logged to MLflow (metrics + artifacts) when a tracking URI is given.
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

from bundle.demographics import UNKNOWN, demographics_counts, fill_demographics
from bundle.engines import BATCH_KEYS, AlignmentEvaluator, AlignmentPrepareBatch
from bundle.handlers import MeanAUC, OverlaySampler, PredictionCollector
from bundle.inference import SkipFailedDataset, load_error_message
from bundle.metrics import groups_for_records, nanmean_or_nan
from bundle.privacy import Privacy
from bundle.transforms.io import read_dicom_demographics
from bundle.utils.atomic import rows_to_csv, write_json_atomic, write_text_atomic
from bundle.utils.dist import is_rank0, unwrap
from bundle.workflow import split_records

logger = logging.getLogger("bundle")

__all__ = ["collect_split", "evaluate", "load_checkpoint", "strict_json", "clean_str"]

SKIPPED_COLUMNS = ("file", "reason")
FAILED_KEY = "failed"  # per-sample flag of the placeholders of files that failed to load


def clean_str(v):
    """``v`` when it is not a string; else a string that encodes as UTF-8 (lone surrogates, e.g. from a file name
    decoded with surrogateescape, become ``\\udcff``), so a strange patient id or path cannot crash a writer."""
    if not isinstance(v, str):
        return v
    try:
        v.encode("utf-8")
        return v
    except UnicodeEncodeError:
        return v.encode("utf-8", errors="backslashreplace").decode("utf-8")


def strict_json(obj):
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts: non-finite floats (NaN, inf) become
    None (JSON null), strings are :func:`clean_str`-ed, numpy scalars and arrays become Python values."""
    if isinstance(obj, Mapping):
        return {clean_str(k) if isinstance(k, str) else k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, (np.generic, torch.Tensor)) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return clean_str(obj)


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
    """Run the evaluator over one split: arrays sorted by index (pred, label, hit, mass), overlays, mean AUC, and
    ``skipped``: the files that failed to load (``{"index", "file", "reason"}``, sorted by index, every rank's).

    The samples of the skipped files are in no array and no metric. When no file of the split loads, the evaluator
    is not run: ``arrays`` is {} and ``mean_auc`` NaN.
    """
    records = list(records)
    plain = Dataset(data=records, transform=preprocessing)
    template, first_errors = None, []
    for i, r in enumerate(records):  # the first item that loads: the placeholders copy its keys and shapes
        try:
            template = plain[i]
            break
        except Exception as e:
            first_errors.append({"index": int(r.get("index", i)), "file": r.get("image"), "reason": _reason(e, r)})
    if template is None:
        return {"arrays": {}, "mean_auc": math.nan, "overlays": [], "skipped": first_errors}
    ds = SkipFailedDataset(data=records, transform=preprocessing, template=template, failed_key=FAILED_KEY)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler = DistributedSampler(ds, even_divisible=False, shuffle=False) if dist else None
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers)
    collector, overlays = PredictionCollector(), OverlaySampler(n_overlays)
    evaluator = AlignmentEvaluator(
        device=device,
        val_data_loader=loader,
        network=network,
        prepare_batch=AlignmentPrepareBatch(extra_keys=(*BATCH_KEYS, FAILED_KEY)),
        key_val_metric={"mean_auc": MeanAUC()},
        additional_metrics={"collected": collector},
        val_handlers=[overlays],
        amp=amp,
    )
    errors: dict[int, str] = {}

    def note_errors(engine) -> None:
        batch = engine.state.batch
        for idx, err in zip(torch.as_tensor(batch["index"]).reshape(-1).tolist(), batch["error"], strict=True):
            if err:
                errors[int(idx)] = err

    from ignite.engine import Events

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, note_errors)
    evaluator.run()
    if dist:  # every rank saw its shard's failures; rank 0 writes them all
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, errors)
        errors = {k: v for p in parts for k, v in (p or {}).items()}
    by_index = {int(r.get("index", i)): r for i, r in enumerate(records)}
    skipped = [{"index": k, "file": by_index.get(k, {}).get("image"), "reason": errors[k]} for k in sorted(errors)]
    return {
        "arrays": collector.last,
        "mean_auc": float(evaluator.state.metrics["mean_auc"]),
        "overlays": overlays.samples,
        "skipped": skipped,
    }


def _reason(e: BaseException, record: Mapping) -> str:
    return load_error_message(e, record.get("image"))


def _write_skipped(path: str, skipped: Sequence[Mapping], privacy: Privacy | None = None) -> str:
    """``skipped.csv``: columns :data:`SKIPPED_COLUMNS`, the header even when nothing was skipped."""
    privacy = privacy or Privacy()
    rows = [
        {
            "file": clean_str(privacy.path(s.get("file", ""))),
            "reason": clean_str(privacy.text(s.get("reason", ""), [s.get("file")])),
        }
        for s in skipped
    ]
    return write_text_atomic(path, rows_to_csv(rows) if rows else ",".join(SKIPPED_COLUMNS) + "\r\n")


METADATA_COLUMNS = ("image", "patient_id", "sex", "age", "dataset", "view")
SOURCE_COLUMNS = ("sex_source", "age_source")  # where sex / age came from (bundle.demographics.fill_demographics)


def _metadata_columns(records, index, privacy: Privacy | None = None) -> dict[str, list]:
    privacy = privacy or Privacy()
    cols = {k: [] for k in METADATA_COLUMNS}
    for i in index:
        r = records[int(i)]
        for k in cols:
            v = r.get(k)
            v = privacy.path(v) if k == "image" else privacy.patient_id(v) if k == "patient_id" else v
            cols[k].append(clean_str(v))
    return cols


def _predictions_csv(records, classes, arrays, thresholds, age_group_labels, privacy: Privacy | None = None) -> str:
    idx = arrays["index"]
    meta = _metadata_columns(records, idx, privacy)
    sources = [[records[int(i)].get(k, UNKNOWN) for k in SOURCE_COLUMNS] for i in idx]
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["index", *meta.keys(), "age_group", *SOURCE_COLUMNS]
    for c in classes:
        head += [f"label_{c}", f"score_{c}", f"decision_{c}"] + ([f"hit_{c}"] if "hit" in arrays else [])
    w.writerow(head)
    for row in range(len(idx)):
        vals = [int(idx[row]), *(meta[k][row] for k in meta), age_group_labels[row], *sources[row]]
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
    privacy: Mapping | Privacy | None = None,
    path_root: str | None = None,
) -> dict:
    """Evaluate ``network`` on ``splits``; thresholds from ``threshold_split`` (validation) for "val_*" methods.

    Returns ``{split: {"report_dir", "mean_auc", "hit_rate", ...}}`` (also written to summary.json).
    ``mlflow_logger`` is a started ``SafeMLFlowHandler`` (metrics and artifacts go to its run) or None.
    ``privacy``: the config key ``privacy`` (docs/privacy.md) or a :class:`bundle.privacy.Privacy`; ``path_root``: the
    folder written paths are relative to (the data root or the datalist's folder; None: the images' common folder).
    """
    from bundle import metrics as M
    from bundle import plots

    classes = list(datalist["classes"])
    privacy = _privacy(privacy, path_root, datalist)  # before any work: a missing key fails now, not after a split
    own_run = False
    if mlflow_logger is not None and mlflow_logger.cur_run is None:
        own_run = mlflow_logger.start_standalone(
            {
                "evaluated_checkpoint": _checkpoint_name(ckpt_path, privacy),
                "splits": list(splits),
                "threshold": threshold,
                "n_boot": n_boot,
                "age_scheme": age_scheme,
            }
        )
    try:
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
            if not got["arrays"]:
                raise RuntimeError(
                    f"none of the {len(val_records)} images of the {threshold_split!r} split could be loaded, so no "
                    f"threshold can be chosen on it (first: {got['skipped'][0]['file']}: {got['skipped'][0]['reason']})"
                    if got["skipped"]
                    else f"the {threshold_split!r} split is empty: no threshold can be chosen on it"
                )
            val = (got["arrays"]["label"], got["arrays"]["pred"])
            if is_rank0():  # beside summary.json, not in it: summary.json lists evaluated (test) splits only
                _warn_skipped(threshold_split, got["skipped"])
                if got["skipped"]:  # <output_dir>/<threshold_split>/skipped.csv only when some failed
                    _write_skipped(os.path.join(output_dir, threshold_split, "skipped.csv"), got["skipped"], privacy)
                selection = {
                    "split": threshold_split,
                    "n": int(len(got["arrays"]["index"])),
                    "n_skipped": len(got["skipped"]),
                    "mean_auc": got["mean_auc"],
                }
                write_json_atomic(
                    os.path.join(output_dir, "model_selection.json"),
                    strict_json(selection),
                    indent=None,
                    allow_nan=False,
                )
            if mlflow_logger is not None and _finite(got["mean_auc"]):
                mlflow_logger.log_metrics({f"{threshold_split}_mean_auc": got["mean_auc"]})
        for split in splits:
            records = split_records(datalist, split)
            logger.info(f"evaluating {split} ({len(records)} images)")
            got = collect_split(network, records, preprocessing, device, batch_size, num_workers, amp, n_overlays)
            if not is_rank0():
                continue
            arrays, skipped, out = got["arrays"], got["skipped"], os.path.join(output_dir, split)
            _warn_skipped(split, skipped)
            _write_skipped(os.path.join(out, "skipped.csv"), skipped, privacy)
            report_dir = os.path.relpath(out, output_dir) if privacy.active else out
            if not arrays or not len(arrays["index"]):
                summary[split] = {**_failed_split(split, out, records, skipped, classes), "report_dir": report_dir}
                if mlflow_logger is not None:
                    mlflow_logger.log_metrics({f"{split}_n_skipped": len(skipped)})
                    mlflow_logger.log_artifact(out, artifact_path=f"evaluation/{split}")
                continue
            # sex / age from the DICOM headers where the datalist lacks them (header only; datalist values win)
            records = _with_demographics(records, arrays["index"])
            demo = demographics_counts([records[int(i)] for i in arrays["index"]])
            _warn_unknown_demographics(split, demo, attributes)
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
                        arrays[key],
                        arrays["label"],
                        classes,
                        groups,
                        pids,
                        n_boot,
                        seed,
                        name=name,
                        min_count=min_count,
                    )
                    for key, name in (("hit", "hit_rate"), ("iou", "miou"), ("mass", "attention_mass_in_mask"))
                    if key in arrays
                }
            thresholds = [report["thresholds"][c]["value"] for c in classes]
            write_json_atomic(
                os.path.join(out, "fairness_report.json"),
                strict_json({**report, "n_skipped": len(skipped), "demographics": demo}),
                indent=1,
                allow_nan=False,
            )
            rows = [{k: clean_str(v) for k, v in r.items()} for r in M.report_to_rows(report)]
            write_text_atomic(os.path.join(out, "fairness_report.csv"), rows_to_csv(rows))
            age_lab = list(
                M.age_groups(
                    [r if r is not None else np.nan for r in _metadata_columns(records, arrays["index"])["age"]],
                    scheme=age_scheme,
                )
            )
            write_text_atomic(
                os.path.join(out, "predictions.csv"),
                _predictions_csv(records, classes, arrays, thresholds, age_lab, privacy),
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
            flat[f"{split}_n_skipped"] = len(skipped)
            flat.update(_demographics_flat(split, demo))
            summary[split] = {"report_dir": report_dir, "n": int(len(arrays["index"])), **flat}
            if mlflow_logger is not None:
                mlflow_logger.log_metrics({k: v for k, v in flat.items() if _finite(v)})
                mlflow_logger.log_artifact(out, artifact_path=f"evaluation/{split}")
        if is_rank0():
            write_json_atomic(os.path.join(output_dir, "summary.json"), strict_json(summary), indent=1, allow_nan=False)
            if mlflow_logger is not None:
                mlflow_logger.log_artifact(os.path.join(output_dir, "summary.json"), artifact_path="evaluation")
    finally:  # the run this call opened is closed even when the evaluation fails (never left RUNNING)
        if own_run:
            mlflow_logger.close()
    return summary


def _privacy(privacy, path_root, datalist) -> Privacy:
    """The :class:`Privacy` of this evaluation; its root is ``path_root``, else the images' common folder."""
    privacy = Privacy.from_config(privacy, root=path_root)
    if privacy.active and privacy.root is None:
        images = [
            os.path.abspath(r["image"])
            for split, recs in datalist.items()
            if isinstance(recs, list) and not str(split).startswith("_")
            for r in recs
            if isinstance(r, Mapping) and isinstance(r.get("image"), str) and r["image"]
        ]
        try:
            common = os.path.commonpath(images) if images else None
        except ValueError:  # different drives: no common folder
            common = None
        if common is not None and len(set(images)) == 1:
            common = os.path.dirname(common)  # one file: its folder
        privacy = privacy.with_root(common)
    return privacy


def _checkpoint_name(ckpt_path, privacy: Privacy):
    """The checkpoint as an MLflow param: its path, or only its file name when ``privacy`` rewrites paths."""
    return os.path.basename(os.fspath(ckpt_path)) if ckpt_path and privacy.active else ckpt_path


def _with_demographics(records: Sequence[Mapping], index) -> list[dict]:
    """``records`` with the evaluated ones (at ``index``) filled by :func:`bundle.demographics.fill_demographics`
    from their DICOM headers (only read for records that lack sex or age); the others are left as they are."""
    out = list(records)
    idx = [int(i) for i in index]
    for i, r in zip(idx, fill_demographics([records[i] for i in idx], read_dicom_demographics), strict=True):
        out[i] = r
    return out


def _demographics_flat(split: str, demo: Mapping) -> dict[str, int]:
    """summary.json / MLflow counts: images of unknown sex / age, and those whose value came from a DICOM header."""
    return {
        f"{split}_n_unknown_sex": demo["sex"][UNKNOWN],
        f"{split}_n_unknown_age": demo["age"][UNKNOWN],
        f"{split}_n_sex_from_dicom": demo["sex"]["dicom"],
        f"{split}_n_age_from_dicom": demo["age"]["dicom"] + demo["age"]["dicom_birth_date"],
    }


def _warn_unknown_demographics(split: str, demo: Mapping, attributes: Sequence[str]) -> None:
    """One warning per evaluated attribute (sex, age) with images whose value is unknown: they are in no gap."""
    for a, tag in (("sex", "PatientSex"), ("age", "PatientAge or PatientBirthDate with StudyDate")):
        if a not in attributes or not demo[a][UNKNOWN]:
            continue
        n, unknown = sum(demo[a].values()), demo[a][UNKNOWN]
        whole = " (all of them: no " + a + " gap can be computed)" if unknown == n else ""
        logger.warning(
            f"evaluation: {split}: {unknown} of {n} images have unknown {a}{whole}: not in the datalist and no "
            f"usable DICOM {tag}; they form the 'unknown' group, which is left out of the {a} gaps "
            f"(give the datalist records a {a!r} value to include them)"
        )


def _warn_skipped(split: str, skipped: Sequence[Mapping]) -> None:
    for s in skipped:
        logger.warning(f"evaluation: {split}: skipped {clean_str(s['file'])}: {clean_str(s['reason'])}")


def _failed_split(split: str, out: str, records, skipped: Sequence[Mapping], classes) -> dict:
    """Report of a split none of whose files could be loaded (or that is empty): says so, no metrics."""
    why = (
        f"none of the {len(records)} files of the split could be loaded; the reasons are in skipped.csv"
        if records
        else "the split has no images"
    )
    logger.error(f"evaluation: {split}: no report: {why}")
    report = {"split": split, "n": 0, "n_skipped": len(skipped), "classes": list(classes), "error": why}
    write_json_atomic(os.path.join(out, "fairness_report.json"), strict_json(report), indent=1, allow_nan=False)
    write_text_atomic(os.path.join(out, "fairness_report.csv"), rows_to_csv([{"split": split, "error": why}]))
    head = ["index", *METADATA_COLUMNS, "age_group", *SOURCE_COLUMNS]
    write_text_atomic(os.path.join(out, "predictions.csv"), ",".join(head) + "\r\n")
    return {"report_dir": out, "n": 0, f"{split}_n_skipped": len(skipped), "error": clean_str(why)}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
